//! Progress when stderr is no terminal (a batch job's log, `> run.log 2>&1`): indicatif draws
//! nothing there, so a ticker prints a plain line about the running stage every few seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

/// How often a line is printed.
pub const EVERY: Duration = Duration::from_secs(5);

/// Prints `bar`'s state every [`EVERY`] until dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// A ticker for `stage`, or none when stderr is a terminal (the bars show there).
    pub fn start(stage: &str, bar: &ProgressBar) -> Option<Ticker> {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, bar, stage) = (stop.clone(), bar.clone(), stage.to_string());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut next = EVERY;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if start.elapsed() >= next {
                    next += EVERY;
                    eprintln!("{}", line(&stage, &bar, start.elapsed()));
                }
            }
        });
        Some(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

/// `[  0:00:35] teacher 1200/5000 (24%) loss 0.0311 950 img/s`.
pub fn line(stage: &str, bar: &ProgressBar, elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    let mut out = format!("[{:3}:{:02}:{:02}] {stage}", s / 3600, s / 60 % 60, s % 60);
    if let Some(len) = bar.length().filter(|&l| l > 0) {
        let pos = bar.position();
        out.push_str(&format!(" {pos}/{len} ({}%)", pos * 100 / len));
    }
    let msg = bar.message();
    if !msg.is_empty() {
        out.push(' ');
        out.push_str(&msg);
    }
    out
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_stage_progress_and_message() {
        let bar = ProgressBar::hidden();
        bar.set_length(5000);
        bar.set_position(1200);
        bar.set_message("loss 0.0311");
        assert_eq!(
            line("teacher", &bar, Duration::from_secs(3725)),
            "[  1:02:05] teacher 1200/5000 (24%) loss 0.0311"
        );
        assert_eq!(line("data", &ProgressBar::hidden(), Duration::from_secs(4)), "[  0:00:04] data");
    }
}
