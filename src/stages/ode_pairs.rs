//! `ode-pairs`: (z, class, teacher ODE output from sigma_max z) triples for DMD's regression
//! loss, class-balanced, each pair with its own noise (seed + index), in safetensors shards.

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
use crate::artifact::pairs;
use crate::sample::{SamplerConfig, latents, one_hot, sample};

fn d_batch() -> usize {
    500
}
fn d_seed() -> u64 {
    1_000_000_000
}
fn d_shard() -> usize {
    10_000
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OdePairsParams {
    /// The teacher (denoiser) stage.
    pub teacher: String,
    /// Deterministic sampler that defines the pairs (paper: Heun, 18 steps for CIFAR-10).
    #[serde(default)]
    pub sampler: SamplerConfig,
    /// Number of pairs (class-balanced: pair i has class i mod label_dim).
    pub count: usize,
    /// Pair i uses latents from seed `seed + i`. The default starts far above the seeds FID
    /// stages use (0, 1, ...), so that no evaluation latent is a training latent.
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_batch")]
    pub batch: usize,
    #[serde(default = "d_shard")]
    pub shard_size: usize,
    /// bf16 autocast for the teacher on CUDA (off: the teacher's own fp32, as EDM samples).
    #[serde(default)]
    pub bf16: bool,
}

impl Stage for OdePairsParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Pairs
    }
    fn upstream(&self) -> Vec<Upstream> {
        vec![Upstream {
            role: "teacher",
            stage: self.teacher.clone(),
            accepts: &[ArtifactType::Denoiser],
        }]
    }
    fn latent_seeds(&self) -> Vec<super::LatentSeeds> {
        vec![super::LatentSeeds {
            field: "seed",
            purpose: super::SeedUse::Training,
            seeds: self.seed..self.seed.saturating_add(self.count as u64),
        }]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if let Err(e) = self.sampler.check() {
            return Err(FieldIssue::new("sampler", e));
        }
        super::count_in_range("count", self.count as u64, 100_000_000)?;
        if self.count == 0 || self.batch == 0 || self.shard_size == 0 {
            return Err(FieldIssue::new("count", "count, batch and shard_size must be at least 1"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<serde_json::Value> {
        let device = crate::torch_shim::device(&ctx.device)?;
        let teacher = crate::nn::load_denoiser_dir(ctx.upstream_dir("teacher")?, device)?;
        let shape = teacher.config.sample_shape();
        let label_dim = teacher.config.label_dim();
        ctx.progress.set_length(self.count as u64);
        let t0 = std::time::Instant::now();
        let mut shard = 0;
        for start in (0..self.count).step_by(self.shard_size) {
            let end = (start + self.shard_size).min(self.count);
            let (mut zs, mut xs, mut ls) = (Vec::new(), Vec::new(), Vec::new());
            for b in (start..end).step_by(self.batch) {
                let n = self.batch.min(end - b);
                let seeds: Vec<u64> = (b..b + n).map(|i| self.seed + i as u64).collect();
                let z = latents(&seeds, &shape, device);
                let labels: Vec<i64> = (b..b + n).map(|i| if label_dim > 0 { i as i64 % label_dim } else { 0 }).collect();
                let y = (label_dim > 0).then(|| one_hot(&labels, label_dim, device));
                let x = {
                    let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.bf16)?;
                    sample(&teacher, &z, y.as_ref(), &self.sampler)
                };
                zs.push(z.to_device(Device::Cpu));
                xs.push(x.to_device(Device::Cpu));
                ls.extend(labels);
                ctx.progress.inc(n as u64);
            }
            pairs::write_shard(
                &ctx.out_dir.join(pairs::shard_name(shard)),
                &Tensor::cat(&zs, 0),
                &ls,
                &Tensor::cat(&xs, 0),
            )?;
            shard += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        let info = serde_json::json!({ "count": self.count, "shape": shape, "label_dim": label_dim, "shards": shard, "sampler_calls": self.sampler.network_calls(), "seed": self.seed });
        std::fs::write(ctx.out_dir.join(pairs::INFO_FILE), serde_json::to_vec_pretty(&info)?)?;
        Ok(
            serde_json::json!({ "count": self.count, "shards": shard, "seconds": secs, "pairs_per_second": self.count as f64 / secs, "sampler_calls": self.sampler.network_calls() }),
        )
    }
}
