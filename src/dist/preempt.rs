//! Preemption as clusters do it: SIGTERM (Slurm's and torchrun's stop signal) or SIGUSR1 (Slurm's
//! `--signal=USR1@SECONDS` warning) asks training to stop. A training loop notices at its next
//! log step (all ranks agree on it there), writes its checkpoint and fails with [`Preempted`];
//! the command exits with [`EXIT_CODE`], and the same command resumes from the checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};

/// EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
pub const EXIT_CODE: u8 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: nothing else is async-signal-safe.
    REQUESTED.store(true, Ordering::SeqCst);
}

const CTRL_C_MESSAGE: &[u8] =
    b"\nstopping at the next log step: the checkpoint and every finished stage are kept; run the same command to resume (Ctrl-C again stops at once)\n";

extern "C" fn on_interrupt(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // The second Ctrl-C: the default action, now.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    // write(2) is async-signal-safe; the message is static.
    unsafe { libc::write(2, CTRL_C_MESSAGE.as_ptr().cast(), CTRL_C_MESSAGE.len()) };
}

/// Makes SIGTERM and SIGUSR1 request a stop instead of ending the process, and the first Ctrl-C
/// (SIGINT) too, saying so; a second Ctrl-C ends the process at once.
pub fn install() {
    install_handler(libc::SIGINT, on_interrupt);
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        install_handler(sig, on_signal);
    }
}

fn install_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(sig, &action, std::ptr::null_mut());
    }
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks for a stop as a signal would (tests, and stages that stop the run themselves).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Training stopped on request, its state saved.
#[derive(Debug)]
pub struct Preempted {
    /// The step or iteration the checkpoint holds (None: stopped between stages).
    pub at: Option<u64>,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some(n) => write!(
                f,
                "preempted at step {n}: the checkpoint is saved; run the same command again to resume"
            ),
            None => write!(f, "preempted between stages: run the same command again to continue"),
        }
    }
}

impl std::error::Error for Preempted {}

/// At a log step: whether every rank has been asked to stop (in a group, whether any has).
pub fn agreed() -> anyhow::Result<bool> {
    super::agree(requested())
}
