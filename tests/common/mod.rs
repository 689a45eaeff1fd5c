//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod fixtures;
pub mod pickle_writer;

use std::path::{Path, PathBuf};

use dmdpipe::pipeline::config::{self, Pipeline};
use dmdpipe::pipeline::runner::{self, Outcome, RunOptions, RunReport};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn load(&self, rel: &str) -> Pipeline {
        config::load(&self.path().join(rel)).unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn run(&self, rel: &str) -> RunReport {
        self.run_with(rel, RunOptions::default())
    }
    pub fn run_with(&self, rel: &str, opts: RunOptions) -> RunReport {
        runner::run(&self.load(rel), &opts).unwrap_or_else(|e| panic!("{e:#}"))
    }
    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }
}

pub fn outcomes(r: &RunReport) -> Vec<(String, Outcome)> {
    r.stages.iter().map(|s| (s.name.clone(), s.outcome)).collect()
}

pub fn ran(r: &RunReport) -> Vec<String> {
    r.stages
        .iter()
        .filter(|s| s.outcome == Outcome::Ran)
        .map(|s| s.name.clone())
        .collect()
}

/// LPIPS stand-ins under `root/models` with the names the shipped pipelines use: a reduced-width
/// VGG16 and heads that real torch wrote (tests/fixtures/lpips).
pub fn lpips_standins(root: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lpips");
    std::fs::create_dir_all(root.join("models")).unwrap();
    std::fs::copy(fixtures.join("vgg_tiny.pth"), root.join("models/vgg16-397923af.pth")).unwrap();
    std::fs::copy(fixtures.join("heads_legacy.pth"), root.join("models/lpips-vgg-v0.1.pth")).unwrap();
}

/// A gmm2d stage named `name` with `seed` and `count`.
pub fn gmm_stage(name: &str, seed: u64, count: usize) -> String {
    format!(
        "[stages.{name}]\nkind = \"gmm2d\"\nseed = {seed}\ncount = {count}\ncomponents = [\n  {{ weight = 1.0, mean = [1.0, 0.0], std = 0.1 }},\n  {{ weight = 2.0, mean = [-1.0, 0.0], std = 0.2 }},\n]\n"
    )
}

pub fn plot_stage(name: &str, points: &str, size: u32) -> String {
    format!("[stages.{name}]\nkind = \"scatter-plot\"\npoints = \"{points}\"\nsize = {size}\n")
}

/// A file under ../shared (data, weights and golden references beside the checkout). When the
/// folder is absent, tests that need it print a notice and skip; with DMDPIPE_REQUIRE_SHARED=1
/// (CI sets it) they fail instead.
pub fn shared_file(rel: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("DMDPIPE_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("{} is missing and DMDPIPE_REQUIRE_SHARED=1", path.display());
    }
    // Straight to the file descriptor: the test harness captures eprintln! of passing tests.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "notice: {} is absent; skipping the part of this test that needs it\n",
            path.display()
        )
        .as_bytes(),
    );
    None
}
