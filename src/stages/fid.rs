//! `fid-ref` (Inception statistics of a dataset) and `fid` (FID of a dataset or of samples from
//! a denoiser stage against reference statistics), EDM's protocol: 2048-d pool features of the
//! TF Inception-v3, class-balanced samples with fixed seeds, min/mean over repeats.

use std::path::PathBuf;

use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext, Upstream};
use crate::artifact::fid_stats;
use crate::data::artifact::ImageDataset;
use crate::eval::fid::{FidStats, frechet_distance};
use crate::eval::inception::Inception;
pub use crate::eval::stats::Precision;
use crate::eval::stats::{generator_stats, inception_for, stats_of};
use crate::sample::SamplerConfig;

fn d_batch() -> usize {
    250
}

/// Statistics (and, with `keep`, every feature vector) of the image dataset upstream as `role`;
/// also the seconds spent in Inception.
fn dataset_stats(
    net: &Inception,
    ctx: &StageContext,
    role: &str,
    batch: usize,
    keep: bool,
) -> anyhow::Result<(FidStats, f64, Option<Tensor>)> {
    let ds = ImageDataset::read(ctx.upstream_dir(role)?)?;
    ctx.progress.set_length(ds.len() as u64);
    let mut kept = Vec::new();
    let (stats, secs) = stats_of(net, dataset_batches(&ds, batch), &ctx.progress, keep.then_some(&mut kept))?;
    Ok((stats, secs, keep.then(|| Tensor::cat(&kept, 0))))
}

fn dataset_batches(ds: &ImageDataset, batch: usize) -> impl Iterator<Item = Tensor> + '_ {
    let (h, w, c) = (ds.height as i64, ds.width as i64, ds.channels as i64);
    (0..ds.len()).step_by(batch).map(move |start| {
        let n = batch.min(ds.len() - start);
        Tensor::from_slice(&ds.images[start * ds.image_bytes()..(start + n) * ds.image_bytes()]).reshape([n as i64, h, w, c])
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FidRefParams {
    /// The image dataset stage (e.g. the 50,000 CIFAR-10 training images); or give `stats`.
    pub dataset: Option<String>,
    /// Precomputed statistics in EDM's npz layout (`mu`, `sigma`), e.g. EDM's published
    /// `cifar10-32x32.npz`, used instead of computing them from a dataset.
    pub stats: Option<PathBuf>,
    /// The Inception weights (inception-2015-12-05.safetensors; see `dmdpipe import-weights`).
    pub inception: PathBuf,
    #[serde(default = "d_batch")]
    pub batch: usize,
    #[serde(default)]
    pub precision: Precision,
    /// Also keep every feature vector (`features.safetensors`, 8 KB per image) for KID and
    /// precision/recall in `fid` stages (`kid_pr = true`).
    #[serde(default)]
    pub keep_features: bool,
}

impl Stage for FidRefParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::FidStats
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[("dataset", self.dataset.as_ref(), &[ArtifactType::Images])])
    }
    fn input_paths(&self) -> Vec<InputPath> {
        let mut v = vec![InputPath {
            role: "inception",
            path: self.inception.clone(),
        }];
        v.extend(self.stats.iter().map(|s| InputPath {
            role: "stats",
            path: s.clone(),
        }));
        v
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if self.batch == 0 {
            return Err(FieldIssue::new("batch", "batch must be at least 1"));
        }
        if self.dataset.is_some() == self.stats.is_some() {
            return Err(FieldIssue::new("inception", "give exactly one of `dataset` and `stats`"));
        }
        if self.keep_features && self.stats.is_some() {
            return Err(FieldIssue::new(
                "keep_features",
                "keep_features needs `dataset` (imported statistics have no features)",
            ));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        if self.stats.is_some() {
            let stats = FidStats::load_npz(ctx.input("stats")?)?;
            stats.save_npz(&fid_stats::stats_path(&ctx.out_dir))?;
            return Ok(serde_json::json!({ "count": stats.count, "imported": true }));
        }
        let net = inception_for(&ctx.device, self.precision, ctx.input("inception")?)?;
        let (stats, secs, features) = dataset_stats(&net, ctx, "dataset", self.batch, self.keep_features)?;
        stats.save_npz(&fid_stats::stats_path(&ctx.out_dir))?;
        if let Some(f) = &features {
            fid_stats::save_features(&ctx.out_dir, f)?;
        }
        Ok(serde_json::json!({ "count": stats.count, "inception_seconds": secs, "images_per_second": stats.count as f64 / secs }))
    }
}

fn d_samples() -> usize {
    50_000
}
fn d_repeats() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FidParams {
    /// The `fid-ref` stage whose statistics are the reference.
    pub reference: String,
    /// Either an image dataset stage to score as it is...
    pub images: Option<String>,
    /// ...or a denoiser stage (`teacher`, or a DMD generator) to sample from.
    pub generator: Option<String>,
    /// How to sample from the generator (default: Heun, 18 steps = 35 calls; use
    /// `solver = "onestep"` for a one-step generator).
    #[serde(default)]
    pub sampler: SamplerConfig,
    #[serde(default = "d_samples")]
    pub num_samples: usize,
    /// Image i of repeat r uses latents from seed `seed + r * num_samples + i`.
    #[serde(default)]
    pub seed: u64,
    /// Independent seed sets; EDM reports the minimum of three.
    #[serde(default = "d_repeats")]
    pub repeats: usize,
    pub inception: PathBuf,
    #[serde(default = "d_batch")]
    pub batch: usize,
    #[serde(default)]
    pub precision: Precision,
    /// bf16 autocast for the generator on CUDA. Off by default: EDM and DMD sample in fp32 for
    /// the numbers they report.
    #[serde(default)]
    pub bf16: bool,
    /// Also Kernel Inception Distance (100 subsets of 1,000) and precision/recall (k = 3, on
    /// at most `pr_samples` of each set); needs `keep_features = true` on the reference.
    #[serde(default)]
    pub kid_pr: bool,
    #[serde(default = "d_pr_samples")]
    pub pr_samples: usize,
}

fn d_pr_samples() -> usize {
    10_000
}

/// KID and precision/recall of `fake` against `real` features, as metrics.
fn kid_pr_metrics(real: &Tensor, fake: &Tensor, pr_samples: usize, device: Device) -> anyhow::Result<serde_json::Value> {
    let (real, fake) = (real.to_device(device), fake.to_device(device));
    let (kid, kid_std) = crate::eval::kid_pr::kid(&real, &fake, 100, 1000, 0)?;
    let cap = |t: &Tensor| t.narrow(0, 0, (pr_samples as i64).min(t.size()[0]));
    let (precision, recall) = crate::eval::kid_pr::precision_recall(&cap(&real), &cap(&fake), 3)?;
    Ok(serde_json::json!({ "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall }))
}

impl Stage for FidParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Report
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[
            ("reference", Some(&self.reference), &[ArtifactType::FidStats]),
            ("images", self.images.as_ref(), &[ArtifactType::Images]),
            ("generator", self.generator.as_ref(), &[ArtifactType::Denoiser]),
        ])
    }
    fn input_paths(&self) -> Vec<InputPath> {
        vec![InputPath {
            role: "inception",
            path: self.inception.clone(),
        }]
    }
    fn latent_seeds(&self) -> Vec<super::LatentSeeds> {
        let count = (self.num_samples as u64).saturating_mul(self.repeats as u64);
        match self.generator {
            Some(_) => vec![super::LatentSeeds {
                field: "seed",
                purpose: super::SeedUse::Evaluation,
                seeds: self.seed..self.seed.saturating_add(count),
            }],
            None => Vec::new(),
        }
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if let Err(e) = self.sampler.check() {
            return Err(FieldIssue::new("sampler", e));
        }
        super::count_in_range("num_samples", self.num_samples as u64, 10_000_000)?;
        super::count_in_range("repeats", self.repeats as u64, 100)?;
        match (&self.images, &self.generator) {
            (Some(_), Some(_)) => Err(FieldIssue::new("generator", "give either `images` or `generator`, not both")),
            (None, None) => Err(FieldIssue::new("reference", "an fid stage needs `images` or `generator`")),
            _ if self.num_samples < 2 => Err(FieldIssue::new("num_samples", "num_samples must be at least 2")),
            _ if self.repeats == 0 => Err(FieldIssue::new("repeats", "repeats must be at least 1")),
            _ if self.batch == 0 => Err(FieldIssue::new("batch", "batch must be at least 1")),
            _ => Ok(()),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let net = inception_for(&ctx.device, self.precision, ctx.input("inception")?)?;
        let reference = FidStats::load_npz(&fid_stats::stats_path(ctx.upstream_dir("reference")?))?;
        // Checked before any work: the reference must have kept its features.
        let real_features = self
            .kid_pr
            .then(|| fid_stats::load_features(ctx.upstream_dir("reference")?))
            .transpose()?;
        let extra = |fake: &Tensor| -> anyhow::Result<serde_json::Value> {
            match &real_features {
                Some(real) => kid_pr_metrics(real, fake, self.pr_samples, net.device),
                None => Ok(serde_json::json!({})),
            }
        };
        let merge = |mut a: serde_json::Value, b: serde_json::Value| {
            if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
                a.extend(b.clone());
            }
            a
        };
        if self.images.is_some() {
            let (stats, secs, features) = dataset_stats(&net, ctx, "images", self.batch, self.kid_pr)?;
            let fid = frechet_distance(&stats, &reference)?;
            stats.save_npz(&fid_stats::stats_path(&ctx.out_dir))?;
            let n = stats.count;
            let m = serde_json::json!({ "fid": fid, "num_images": n, "inception_seconds": secs, "images_per_second": n as f64 / secs });
            let e = match &features {
                Some(f) => extra(f)?,
                None => serde_json::json!({}),
            };
            return Ok(merge(m, e));
        }
        let generator = crate::nn::load_denoiser_dir(ctx.upstream_dir("generator")?, net.device).context("loading the generator")?;
        let n = self.num_samples;
        ctx.progress.set_length((n * self.repeats) as u64);
        let mut fids = Vec::new();
        let prepared = crate::eval::fid::FidReference::new(&reference)?;
        let mut extra_metrics = serde_json::json!({});
        let (mut gen_secs, mut inc_secs) = (0.0, 0.0);
        for r in 0..self.repeats {
            let base = self.seed + (r * n) as u64;
            let keep = self.kid_pr && r == 0;
            let s = generator_stats(&net, &generator, &self.sampler, n, base, self.batch, self.bf16, &ctx.progress, keep)?;
            if let Some(f) = &s.features {
                extra_metrics = extra(f)?;
            }
            gen_secs += s.sampling_seconds;
            inc_secs += s.inception_seconds;
            let fid = prepared.distance(&s.stats)?;
            tracing::info!(repeat = r, fid, "fid");
            if r == 0 {
                s.stats.save_npz(&fid_stats::stats_path(&ctx.out_dir))?;
            }
            fids.push(fid);
        }
        let min = fids.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean = fids.iter().sum::<f64>() / fids.len() as f64;
        let m = serde_json::json!({
            "fid": min,
            "fid_mean": mean,
            "fid_repeats": fids,
            "num_samples": n,
            "seeds": format!("{}..{}", self.seed, self.seed + (n * self.repeats) as u64),
            "sampler_calls": self.sampler.network_calls(),
            "sampling_seconds": gen_secs,
            "inception_seconds": inc_secs,
        });
        Ok(merge(m, extra_metrics))
    }
}
