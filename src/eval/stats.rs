//! Inception statistics of images and of a generator's samples (what `fid-ref`, `fid` and the
//! DMD evaluation curve compute).

use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::fid::{FidStats, StatsAccumulator};
use super::inception::Inception;
use crate::sample::{SamplerConfig, one_hot, sample, seeded_latents, to_uint8_nhwc};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Strict fp32 convolutions (the reference numbers).
    #[default]
    Fp32,
    /// TF32 convolutions on CUDA (about 2x faster; FID moves by ~5e-4).
    Tf32,
}

/// Streams uint8 NHWC batches through Inception; returns (statistics, seconds in Inception).
pub fn stats_of(
    net: &Inception,
    batches: impl Iterator<Item = Tensor>,
    progress: &indicatif::ProgressBar,
    kept: Option<&mut Vec<Tensor>>,
) -> anyhow::Result<(FidStats, f64)> {
    let mut acc = StatsAccumulator::new();
    let mut secs = 0.0;
    let mut kept = kept;
    for b in batches {
        let t = Instant::now();
        let f = net.features(&b);
        acc.add(&f);
        if let Some(k) = kept.as_mut() {
            k.push(f.to_device(Device::Cpu));
        }
        if let Device::Cuda(i) = net.device {
            tch::Cuda::synchronize(i as i64);
        }
        secs += t.elapsed().as_secs_f64();
        progress.inc(b.size()[0] as u64);
    }
    Ok((acc.finish()?, secs))
}

/// The Inception network on `device`, in the layout fastest for `precision`; TF32 as
/// `precision` says (the caller's numerics scope restores it).
pub fn inception_for(device: &str, precision: Precision, inception: &std::path::Path) -> anyhow::Result<Inception> {
    let device = crate::torch_shim::device(device)?;
    crate::torch_shim::set_tf32(device.is_cuda() && precision == Precision::Tf32);
    tch::Cuda::cudnn_set_benchmark(device.is_cuda());
    let mut net = Inception::load(inception, device)?;
    net.layout = crate::eval::inception::Layout::fastest_for(precision == Precision::Fp32);
    Ok(net)
}

pub struct GeneratorStats {
    pub stats: FidStats,
    /// Every feature vector [n, 2048] on the CPU, when asked for (KID, precision/recall).
    pub features: Option<Tensor>,
    pub sampling_seconds: f64,
    pub inception_seconds: f64,
}

/// Inception statistics of `n` samples of `generator`: image i has the latents of seed
/// `seed + i` and, for a conditional model, class i mod label_dim (class-balanced).
#[allow(clippy::too_many_arguments)]
pub fn generator_stats(
    net: &Inception,
    generator: &crate::nn::Denoiser,
    sampler: &SamplerConfig,
    n: usize,
    seed: u64,
    batch: usize,
    bf16: bool,
    progress: &indicatif::ProgressBar,
    keep_features: bool,
) -> anyhow::Result<GeneratorStats> {
    let cfg = &generator.config;
    let (res, ch, label_dim) = (cfg.img_resolution(), cfg.img_channels(), cfg.label_dim());
    let mut acc = StatsAccumulator::new();
    let mut kept = Vec::new();
    let (mut gen_secs, mut inc_secs) = (0.0, 0.0);
    for start in (0..n).step_by(batch.max(1)) {
        let count = batch.min(n - start);
        let seeds: Vec<u64> = (start..start + count).map(|i| seed + i as u64).collect();
        let t = Instant::now();
        let z = seeded_latents(&seeds, [ch, res, res], net.device);
        let labels = (label_dim > 0).then(|| {
            one_hot(
                &(start..start + count).map(|i| (i as i64) % label_dim).collect::<Vec<_>>(),
                label_dim,
                net.device,
            )
        });
        let x = tch::no_grad(|| -> anyhow::Result<Tensor> {
            let _ac = crate::torch_shim::AutocastBf16::new(net.device.is_cuda() && bf16)?;
            Ok(sample(generator, &z, labels.as_ref(), sampler))
        })?;
        let u8s = to_uint8_nhwc(&x);
        gen_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b = Tensor::from_slice(&u8s).reshape([count as i64, res, res, ch]);
        let f = net.features(&b);
        acc.add(&f);
        if keep_features {
            kept.push(f.to_device(Device::Cpu));
        }
        inc_secs += t.elapsed().as_secs_f64();
        progress.inc(count as u64);
    }
    Ok(GeneratorStats {
        stats: acc.finish()?,
        features: keep_features.then(|| Tensor::cat(&kept, 0)),
        sampling_seconds: gen_secs,
        inception_seconds: inc_secs,
    })
}
