//! SIGKILL a training stage after its first checkpoint, run it again: the result equals an
//! uninterrupted run's byte for byte (CPU), for `teacher` and `dmd`. SIGTERM (a cluster's
//! preemption) instead: the stage saves a checkpoint, the run exits with code 75, and the same
//! command resumes to the same bytes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pipeline(dir: &Path) {
    let text = format!(
        "[pipeline]\ndevice = \"cpu\"\n\n{}\n\
         [stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\n\
         network = {{ arch = \"mlp\", dim = 2, hidden = 32, layers = 2 }}\n\
         train = {{ batch = 64, images = 64_000, log_every = 10, checkpoint_every = 50, lr_warmup_images = 640 }}\n\n\
         [stages.pairs]\nkind = \"ode-pairs\"\nteacher = \"teacher\"\nsampler = {{ solver = \"euler\", steps = 4 }}\ncount = 64\n\n\
         [stages.dmd]\nkind = \"dmd\"\nteacher = \"teacher\"\npairs = \"pairs\"\n\
         train = {{ batch = 64, iterations = 1500, log_every = 10, checkpoint_every = 50, bf16 = false, fake_updates_per_g = 2 }}\n",
        common::gmm_stage("data", 1, 2000)
    );
    std::fs::write(dir.join("p.toml"), text).unwrap();
}

fn dmdpipe(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(args)
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dmdpipe {args:?}:\n{text}");
    text
}

/// The bytes of a stage's weights.
fn weights(dir: &Path, stage: &str) -> Vec<u8> {
    let path = dmdpipe(dir, &["path", "p.toml", stage]);
    std::fs::read(dir.join(path.trim()).join("denoiser.safetensors")).unwrap()
}

/// Starts `run`, waits until `checkpoint` exists in some work folder, sends `signal`; returns
/// the exit status and what the run printed on stderr.
fn signal_after_checkpoint(dir: &Path, checkpoint: &str, signal: i32) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(["run", "p.toml"])
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let work = dir.join("cache/work");
    let start = Instant::now();
    let found = loop {
        let hit = std::fs::read_dir(&work)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|e| e.path().join(checkpoint).exists());
        if hit || start.elapsed() > Duration::from_secs(300) {
            break hit;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    assert!(found, "no {checkpoint} appeared before the run ended");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Weights of `stage` from an uninterrupted run and from a run killed after `checkpoint` was
/// written and started again (whose log must say `resumed`).
fn first_and_resumed(checkpoint: &str, stage: &str, resumed: &str, signal: i32) -> (Vec<u8>, Vec<u8>) {
    let whole = tempfile::tempdir().unwrap();
    pipeline(whole.path());
    dmdpipe(whole.path(), &["run", "p.toml"]);
    let killed = tempfile::tempdir().unwrap();
    pipeline(killed.path());
    let (status, stderr) = signal_after_checkpoint(killed.path(), checkpoint, signal);
    if signal != libc::SIGKILL {
        assert_eq!(status.code(), Some(75), "a preempted run exits with 75:\n{stderr}");
        assert!(stderr.contains("preempted at step"), "{stderr}");
    }
    if signal == libc::SIGINT {
        assert!(
            stderr.contains("run the same command to resume (Ctrl-C again stops at once)"),
            "{stderr}"
        );
    }
    let out = dmdpipe(killed.path(), &["run", "p.toml", "-v"]);
    assert!(out.contains(resumed), "the second run did not resume from the checkpoint:\n{out}");
    (weights(whole.path(), stage), weights(killed.path(), stage))
}

#[test]
fn teacher_killed_after_a_checkpoint_resumes_to_the_same_bytes() {
    let (a, b) = first_and_resumed("checkpoint.safetensors", "teacher", "resumed from checkpoint", libc::SIGKILL);
    assert!(a == b, "the resumed teacher's weights differ from the uninterrupted one's");
}

#[test]
fn dmd_killed_after_a_checkpoint_resumes_to_the_same_bytes() {
    let (a, b) = first_and_resumed("dmd_checkpoint.safetensors", "dmd", "resumed DMD from checkpoint", libc::SIGKILL);
    assert!(a == b, "the resumed generator's weights differ from the uninterrupted one's");
}

#[test]
fn teacher_preempted_by_sigterm_saves_exits_75_and_resumes_to_the_same_bytes() {
    let (a, b) = first_and_resumed("checkpoint.safetensors", "teacher", "resumed from checkpoint", libc::SIGTERM);
    assert!(a == b, "the preempted teacher's weights differ from the uninterrupted one's");
}

#[test]
fn dmd_preempted_by_sigterm_saves_exits_75_and_resumes_to_the_same_bytes() {
    let (a, b) = first_and_resumed("dmd_checkpoint.safetensors", "dmd", "resumed DMD from checkpoint", libc::SIGTERM);
    assert!(a == b, "the preempted generator's weights differ from the uninterrupted one's");
}

#[test]
fn teacher_interrupted_by_ctrl_c_says_what_is_kept_and_resumes_to_the_same_bytes() {
    let (a, b) = first_and_resumed("checkpoint.safetensors", "teacher", "resumed from checkpoint", libc::SIGINT);
    assert!(a == b, "the interrupted teacher's weights differ from the uninterrupted one's");
}
