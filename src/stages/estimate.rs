//! What a run will cost, for `dmdpipe run --dry-run`: each stage's work (images, iterations,
//! network calls) and an estimate of its GPU time.
//!
//! The estimate scales throughput measured with dmdpipe on one NVIDIA H200 (docs/RESULTS.md,
//! `bench gpu`, 2026-11) for EDM's 55.7M CIFAR-10 network by the ratio of forward FLOPs of the
//! stage's own network; data-parallel stages (teacher training, DMD) divide by the GPU count at
//! the measured 94% efficiency, the others run on one GPU. It is a plan, not a promise: larger
//! networks usually run at a higher fraction of the peak than the 55.7M one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::StageSpec;
use super::teacher::TeacherMode;
use crate::nn::NetworkConfig;
use crate::sample::Solver;

/// Measured on one H200 with dmdpipe, EDM's 55.7M CIFAR-10 network, images (or network calls)
/// per second.
pub struct Throughput {
    pub sample_bf16: f64,
    pub sample_fp32: f64,
    pub train_bf16: f64,
    pub train_fp32: f64,
    /// Generator images per second in DMD (batch 128: 2.83 it/s).
    pub dmd_bf16: f64,
    pub dmd_fp32: f64,
    /// Inception-v3 features per second (strict fp32 / TF32).
    pub inception_fp32: f64,
    pub inception_tf32: f64,
    /// Data-parallel efficiency (DMD and teacher training on 2 and 4 H200s: 0.94-0.99).
    pub parallel_efficiency: f64,
}

pub const H200: Throughput = Throughput {
    sample_bf16: 5_135.0,
    sample_fp32: 3_186.0,
    train_bf16: 1_860.0,
    train_fp32: 1_024.0,
    dmd_bf16: 2.83 * 128.0,
    dmd_fp32: 2.83 * 128.0 * 1_024.0 / 1_860.0,
    inception_fp32: 2_006.0,
    inception_tf32: 5_858.0,
    parallel_efficiency: 0.94,
};

/// One stage's work and its estimated GPU time.
#[derive(Debug, Clone)]
pub struct StageEstimate {
    pub work: String,
    /// Wall-clock seconds on the GPUs it runs on.
    pub seconds: Option<f64>,
    /// GPUs it occupies (data-parallel stages use them all).
    pub gpus: usize,
}

impl StageEstimate {
    pub fn gpu_hours(&self) -> Option<f64> {
        self.seconds.map(|s| s * self.gpus as f64 / 3600.0)
    }
}

/// Estimates every stage of a pipeline on `gpus` H200s. `resolve` turns a path of the file into
/// one on disk (to read an imported teacher's config when the file does not declare `network`).
pub fn estimate(stages: &[(String, StageSpec)], gpus: usize, resolve: &dyn Fn(&Path) -> PathBuf) -> Vec<(String, StageEstimate)> {
    let specs: HashMap<&str, &StageSpec> = stages.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut flops_cache: HashMap<String, Option<f64>> = HashMap::new();
    let reference = reference_flops();
    let mut relative = |stage: &str| -> Option<f64> {
        let f = flops_cache
            .entry(stage.to_string())
            .or_insert_with(|| network_of(stage, &specs, resolve, 0).map(|c| crate::nn::flops::forward_flops(&c)))
            .as_ref()
            .copied()?;
        Some(f / reference)
    };
    stages
        .iter()
        .filter_map(|(name, spec)| {
            let images = |stage: &str| dataset_images(specs.get(stage).copied());
            stage_estimate(name, spec, gpus.max(1), &mut relative, &images).map(|e| (name.clone(), e))
        })
        .collect()
}

fn reference_flops() -> f64 {
    let config: NetworkConfig = serde_json::from_value(serde_json::json!({ "arch": "ddpmpp" })).expect("EDM's CIFAR-10 config");
    crate::nn::flops::forward_flops(&config)
}

/// The network a stage's output is: a teacher's own, or (for a DMD generator) its teacher's.
fn network_of(stage: &str, specs: &HashMap<&str, &StageSpec>, resolve: &dyn Fn(&Path) -> PathBuf, depth: usize) -> Option<NetworkConfig> {
    if depth > 16 {
        return None;
    }
    match specs.get(stage)? {
        StageSpec::Teacher(t) => match (&t.network, t.mode, &t.weights) {
            (Some(n), _, _) => Some(n.clone()),
            (None, TeacherMode::Import, Some(w)) => crate::nn::import::read_weights(&resolve(w)).ok()?.config,
            _ => None,
        },
        StageSpec::Dmd(d) => network_of(&d.teacher, specs, resolve, depth + 1),
        _ => None,
    }
}

/// Images in a dataset stage, where the kind fixes it.
fn dataset_images(spec: Option<&StageSpec>) -> Option<u64> {
    match spec? {
        StageSpec::Cifar10(c) => Some(match c.split {
            super::cifar10::Split::Train => 50_000,
            super::cifar10::Split::Test => 10_000,
        }),
        _ => None,
    }
}

fn inception_rate(p: crate::eval::stats::Precision) -> f64 {
    match p {
        crate::eval::stats::Precision::Fp32 => H200.inception_fp32,
        crate::eval::stats::Precision::Tf32 => H200.inception_tf32,
    }
}

/// Inception features of a dataset stage's images.
fn features_of(dataset: &str, precision: crate::eval::stats::Precision, images: &dyn Fn(&str) -> Option<u64>) -> StageEstimate {
    let n = images(dataset);
    StageEstimate {
        work: match n {
            Some(n) => format!("Inception features of {} images", group_thousands(n)),
            None => format!("Inception features of `{dataset}`"),
        },
        seconds: n.map(|n| n as f64 / inception_rate(precision)),
        gpus: 1,
    }
}

/// A training time limited by a wall-clock budget.
fn capped(seconds: f64, budget: Option<f64>) -> f64 {
    budget.map_or(seconds, |b| seconds.min(b))
}

fn stage_estimate(
    name: &str,
    spec: &StageSpec,
    gpus: usize,
    relative: &mut dyn FnMut(&str) -> Option<f64>,
    images: &dyn Fn(&str) -> Option<u64>,
) -> Option<StageEstimate> {
    let h = &H200;
    let parallel = |s: f64| s / (gpus as f64 * if gpus > 1 { h.parallel_efficiency } else { 1.0 });
    let fmt = |n: u64| group_thousands(n);
    Some(match spec {
        StageSpec::Teacher(t) if t.mode == TeacherMode::Train => {
            let rate = if t.train.bf16 { h.train_bf16 } else { h.train_fp32 };
            let seconds = relative(name).map(|r| capped(parallel(t.train.images as f64 * r / rate), t.train.max_seconds));
            let budget = t
                .train
                .max_seconds
                .map(|m| format!(" or {m} s, whichever ends first"))
                .unwrap_or_default();
            StageEstimate {
                work: format!("{} training images{budget}, batch {}", fmt(t.train.images), t.train.batch),
                seconds,
                gpus,
            }
        }
        StageSpec::OdePairs(p) => {
            let calls = p.sampler.network_calls() as u64;
            let rate = if p.bf16 { h.sample_bf16 } else { h.sample_fp32 };
            StageEstimate {
                work: format!("{} pairs x {calls} network calls ({})", fmt(p.count as u64), precision(p.bf16)),
                seconds: relative(&p.teacher).map(|r| (p.count as u64 * calls) as f64 * r / rate),
                gpus: 1,
            }
        }
        StageSpec::Dmd(d) => {
            let t = &d.train;
            let rate = if t.bf16 { h.dmd_bf16 } else { h.dmd_fp32 };
            let eval_points = d.eval.as_ref().map(|e| t.iterations / e.every.max(1) + 2).unwrap_or(0);
            let eval_samples = d.eval.as_ref().map(|e| e.num_samples as u64).unwrap_or(0) * eval_points;
            let seconds = relative(&d.teacher).map(|r| {
                capped(parallel((t.iterations * t.batch as u64) as f64 * r / rate), t.max_seconds)
                    + eval_samples as f64 * (r / h.sample_bf16 + 1.0 / h.inception_tf32)
            });
            let micro = t.micro_batch.map(|m| format!(", micro-batches of at most {m}")).unwrap_or_default();
            StageEstimate {
                work: format!(
                    "{} iterations x global batch {}{micro} ({})",
                    fmt(t.iterations),
                    t.batch,
                    precision(t.bf16)
                ),
                seconds,
                gpus,
            }
        }
        StageSpec::FidRef(f) => match &f.dataset {
            Some(d) => features_of(d, f.precision, images),
            None => return None,
        },
        StageSpec::Fid(f) => {
            let inception = inception_rate(f.precision);
            let Some(g) = &f.generator else {
                return Some(features_of(f.images.as_deref().unwrap_or_default(), f.precision, images));
            };
            let n = (f.num_samples * f.repeats) as u64;
            let calls = f.sampler.network_calls() as u64;
            let rate = if f.bf16 { h.sample_bf16 } else { h.sample_fp32 };
            StageEstimate {
                work: format!(
                    "{} samples ({} x {} seed sets) x {calls} network calls ({}), Inception",
                    fmt(n),
                    fmt(f.num_samples as u64),
                    f.repeats,
                    precision(f.bf16)
                ),
                seconds: relative(g).map(|r| (n * calls) as f64 * r / rate + n as f64 / inception),
                gpus: 1,
            }
        }
        StageSpec::SampleGrid(g) => {
            let calls = match g.sampler.solver {
                Solver::OneStep => 1,
                _ => g.sampler.network_calls(),
            };
            StageEstimate {
                work: format!("one grid, {calls} network calls per image"),
                seconds: Some(1.0),
                gpus: 1,
            }
        }
        _ => return None,
    })
}

fn precision(bf16: bool) -> &'static str {
    if bf16 { "bf16" } else { "fp32" }
}

/// 300000 -> "300,000".
pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as "45 s", "12.5 min", "3.2 h".
pub fn human_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 5400.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(392), "392");
        assert_eq!(group_thousands(300_000), "300,000");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(human_duration(30.0), "30 s");
        assert_eq!(human_duration(600.0), "10.0 min");
        assert_eq!(human_duration(36_000.0), "10.0 h");
    }
}
