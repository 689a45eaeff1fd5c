//! SIGKILL at random moments: the cache must never hold an entry that points at missing or
//! partial data, and the previous good outputs must survive.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dmdpipe::pipeline::cache::{Cache, LockMode};
use dmdpipe::pipeline::runner;
use rand::{Rng, SeedableRng};

/// Kills that must land while the run is still going.
const KILLS: usize = 50;

fn pipeline(seed: u64) -> String {
    format!(
        "{}{}{}{}",
        gmm_stage("a", seed, 200_000),
        plot_stage("plot_a", "a", 256),
        gmm_stage("b", seed % 3, 150_000),
        plot_stage("plot_b", "b", 256)
    )
}

#[test]
fn kill_at_random_points_never_corrupts_the_cache() {
    let p = Project::new();
    let file = p.path().join("p.toml");
    let cmd = || {
        Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
            .arg("run")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Time one full run to spread the kills over it.
    p.write("p.toml", &pipeline(1000));
    let t0 = Instant::now();
    assert!(cmd().wait().unwrap().success());
    let full = t0.elapsed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut killed_mid_run = 0;
    let mut trial = 0;
    while killed_mid_run < KILLS {
        trial += 1;
        assert!(trial < 4 * KILLS, "too few kills landed mid-run");
        let seed = trial as u64 + 1;
        p.write("p.toml", &pipeline(seed));
        let before = runner::record(&p.cache(), "p").unwrap();
        let mut child = cmd();
        let delay = full.mul_f64(rng.random_range(0.0..1.0));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let cache = Cache::open(&p.cache(), LockMode::Shared).unwrap();
        let problems = cache.check_integrity().unwrap();
        assert!(problems.is_empty(), "trial {trial} (killed after {delay:?}): {problems:?}");
        for (stage, key) in &before.stages {
            assert!(cache.read_entry(key).is_some(), "trial {trial}: previous output of {stage} lost");
        }
    }
    // Afterwards a normal run completes and everything verifies.
    assert!(cmd().wait().unwrap().success());
    let report = runner::status(&p.load("p.toml"), None).unwrap();
    assert!(report.all_fresh());
    assert!(
        Cache::open(&p.cache(), LockMode::Shared)
            .unwrap()
            .check_integrity()
            .unwrap()
            .is_empty()
    );
    eprintln!("{trial} kill trials passed ({killed_mid_run} landed mid-run; full run {full:?})");
    let _ = Duration::ZERO;
}
