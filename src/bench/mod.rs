//! `dmdpipe bench`: throughput on the current device against the PyTorch baselines in
//! `bench/` (`gpu`: networks, DMD, Inception; `adm`: ImageNet's network; `inception`: the 60k-image FID workload;
//! `scaling`/`data-parallel`: several GPUs). Shared here: the benchmarked networks, timing and
//! the DMD iteration bench.

mod adm;
mod allreduce;
mod figures;
mod gpu;
mod inception;
mod lpips;
mod profile;
mod scaling;

pub use adm::bench_adm;
pub use allreduce::bench_all_reduce;
pub use figures::{FigureSink, Figures};
pub use gpu::{GpuBenchOptions, bench_gpu};
pub use inception::bench_inception;
pub use lpips::bench_lpips;
pub use profile::{ProfileSpec, bench_profile, summarize_trace, summary_json};
pub use scaling::{bench_data_parallel, bench_scaling};

use std::time::Instant;

use anyhow::Result;
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use crate::nn::config::SongUNetConfig;
use crate::nn::{Denoiser, NetworkConfig};

pub(crate) fn ddpmpp(model_channels: i64, num_blocks: i64) -> NetworkConfig {
    let mut c: SongUNetConfig = serde_json::from_value(json!({})).expect("defaults");
    c.model_channels = model_channels;
    c.num_blocks = num_blocks;
    if model_channels < 128 {
        c.augment_dim = 0; // the speedrun network trains without augmentation labels
    }
    NetworkConfig::Ddpmpp(c)
}

/// One teacher training step (EDM loss, Adam) on a batch of random images and class labels, in
/// bf16 autocast when `bf16` (and on CUDA): the step the benches time and profile.
pub(crate) fn random_train_step(net: &Denoiser, opt: &crate::train::optim::AdamW, batch: i64, bf16: bool) -> Result<()> {
    let device = net.device();
    opt.zero_grad();
    let y = Tensor::rand([batch, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0;
    let labels = Tensor::randint(10, [batch], (Kind::Int64, device)).one_hot(10).to_kind(Kind::Float);
    let (loss, _) = {
        let _ac = crate::torch_shim::AutocastBf16::new(bf16 && device.is_cuda())?;
        crate::train::teacher::edm_loss(net, &y, Some(&labels), -1.2, 1.2, true)
    };
    loss.backward();
    opt.step(1e-4, 0.0)?;
    Ok(())
}

pub(crate) fn timed(device: tch::Device, warmup: usize, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    sync(device);
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    sync(device);
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

pub(crate) fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Achieved TFLOP/s beside every throughput figure (forward FLOPs counted layer by layer;
/// training = 3 forwards; a DMD iteration with regression and one fake update = 11 forwards
/// per sample), and the fraction of the measured bf16 matmul peak.
pub(crate) fn add_tflops(out: &mut Map<String, Value>, peak: f64) {
    let flops: Vec<(&str, f64)> = [("edm55m", ddpmpp(128, 4)), ("speedrun9m", ddpmpp(64, 2))]
        .iter()
        .map(|(t, c)| (*t, crate::nn::flops::forward_flops(c)))
        .collect();
    let keys: Vec<String> = out.keys().cloned().collect();
    for k in keys {
        let Some(rate) = out[&k].as_f64() else { continue };
        let Some(&(_, f)) = flops.iter().find(|(t, _)| k.starts_with(t)) else {
            continue;
        };
        let per_unit = if k.contains("_train_") {
            3.0 * f
        } else if k.contains("_onestep_") {
            f
        } else if let Some(b) = k
            .split("_dmd_b")
            .nth(1)
            .and_then(|r| r.split('_').next())
            .and_then(|b| b.parse::<f64>().ok())
        {
            11.0 * f * b
        } else {
            continue;
        };
        let tflops = rate * per_unit / 1e12;
        out.insert(format!("{k}_tflops"), tflops.into());
        if peak > 0.0 {
            out.insert(format!("{k}_fraction_of_peak"), (tflops / peak).into());
        }
    }
    for (t, f) in flops {
        out.insert(format!("{t}_forward_gflops_per_image"), (f / 1e9).into());
    }
}

/// Measured bf16 matmul throughput (n x n x n products) in TFLOP/s; 0 on the CPU.
pub(crate) fn matmul_peak_tflops(device: tch::Device, n: i64) -> Result<f64> {
    if !device.is_cuda() {
        return Ok(0.0);
    }
    let a = Tensor::randn([n, n], (Kind::BFloat16, device));
    let b = Tensor::randn([n, n], (Kind::BFloat16, device));
    let per = timed(device, 3, 20, || {
        let _ = a.matmul(&b);
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / per / 1e12)
}

/// DMD iterations per second (generator step with the regression loss + fake-score step), bf16,
/// measured over the iterations after the first `skip` (eager warm-up and graph capture).
pub(crate) fn bench_dmd(cfg: &NetworkConfig, device: tch::Device, batch: usize, iterations: u64, cuda_graph: bool) -> Result<f64> {
    bench_dmd_gan(cfg, device, batch, iterations, cuda_graph, false)
}

/// [`bench_dmd`], optionally with DMD2's GAN head (random "real" images).
pub(crate) fn bench_dmd_gan(
    cfg: &NetworkConfig,
    device: tch::Device,
    batch: usize,
    iterations: u64,
    cuda_graph: bool,
    gan: bool,
) -> Result<f64> {
    use crate::train::dmd::{DmdData, DmdNets, DmdOptions, NoHooks, Pairs, RealImages, train_dmd};
    let mut cfg = cfg.clone();
    cfg.set_dropout(0.0);
    tch::manual_seed(0);
    let teacher = Denoiser::new(&cfg, device);
    let (g, f) = (teacher.duplicate()?, teacher.duplicate()?);
    let pairs = Pairs {
        z: Tensor::randn([1024, 3, 32, 32], (Kind::Float, device)),
        labels: Some(Tensor::randint(10, [1024], (Kind::Int64, device)).one_hot(10).to_kind(Kind::Float)),
        x: Tensor::randn([1024, 3, 32, 32], (Kind::Float, device)) * 0.5,
    };
    let work = tempfile::tempdir()?;
    let skip = 10u64;
    let opts = DmdOptions {
        batch,
        iterations: skip + iterations,
        log_every: skip,
        checkpoint_every: u64::MAX,
        cuda_graph,
        gan_generator_weight: if gan { 3e-3 } else { 0.0 },
        ..Default::default()
    };
    let real = gan.then(|| RealImages {
        images: (Tensor::rand([1024, 3, 32, 32], (Kind::Float, device)) * 255.0).to_kind(Kind::Uint8),
        labels: Some(Tensor::eye(10, (Kind::Float, device)).index_select(0, &Tensor::randint(10, [1024], (Kind::Int64, device)))),
    });
    let nets = DmdNets {
        real: &teacher,
        generator: &g,
        fake: &f,
        ema: None,
    };
    let data = DmdData {
        pairs: Some(&pairs),
        real_images: real.as_ref(),
        ..Default::default()
    };
    let summary = train_dmd(nets, data, &opts, work.path(), &mut NoHooks)?;
    let timed: Vec<f64> = summary.log.iter().skip(1).map(|r| r.iterations_per_second).collect();
    Ok(timed.len() as f64 / timed.iter().map(|r| 1.0 / r).sum::<f64>())
}
