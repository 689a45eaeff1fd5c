//! `dmdpipe bench gpu`: throughput of the full EDM CIFAR-10 network (55.7M parameters) and the
//! small speedrun network (8.8M): teacher training img/s (batch 512) and one-step sampling img/s
//! (batch 1024), in bf16 autocast and in TF32.

use std::time::Instant;

use anyhow::Result;
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use crate::nn::config::SongUNetConfig;
use crate::nn::{Denoiser, NetworkConfig};
use crate::sample::one_hot;
use crate::torch_shim::{self, AutocastBf16};
use crate::train::optim::{AdamW, ema_update};
use crate::train::teacher::edm_loss;

fn ddpmpp(model_channels: i64, num_blocks: i64) -> NetworkConfig {
    let mut c: SongUNetConfig = serde_json::from_value(json!({})).expect("defaults");
    c.model_channels = model_channels;
    c.num_blocks = num_blocks;
    if model_channels < 128 {
        c.augment_dim = 0; // the speedrun network trains without augmentation labels
    }
    NetworkConfig::Ddpmpp(c)
}

fn timed(device: tch::Device, warmup: usize, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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

fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn bench_gpu(device_name: &str, quick: bool, channels_last: bool, inception: Option<&std::path::Path>) -> Result<Value> {
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
    let peak = matmul_peak_tflops(device, if quick { 256 } else { 8192 })?;
    out.insert("bf16_matmul_peak_tflops".into(), peak.into());
    let (train_b, sample_b, steps) = if quick { (8, 8, 2) } else { (512, 1024, 20) };
    for (tag, cfg) in [("edm55m", ddpmpp(128, 4)), ("speedrun9m", ddpmpp(64, 2))] {
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        let mut ema = Denoiser::new(&cfg, device);
        ema.copy_from(&net)?;
        out.insert(format!("{tag}_parameters"), net.num_params().into());
        let opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        // Channels-last (`--channels-last`) comes last: it re-lays out the weights for good.
        // Measured slower on an H200 (0.75x training, 0.77x sampling), so off by default.
        // `bf16_edm_attention`: attention as EDM writes it instead of the fused kernel.
        let variants = [
            ("bf16", true, false, true),
            ("tf32", false, false, true),
            ("bf16_edm_attention", true, false, false),
            ("bf16_channels_last", true, true, true),
        ];
        for &(prec, bf16, cl, fused_attention) in variants.iter().filter(|v| channels_last || !v.2) {
            crate::nn::unet_block::set_fused_attention(fused_attention);
            if cl {
                let all = |d: &Denoiser| d.vs.variables().into_values().collect::<Vec<_>>();
                torch_shim::to_channels_last(&all(&net))?;
                torch_shim::to_channels_last(&all(&ema))?;
                torch_shim::to_channels_last(&opt.exp_avg)?;
                torch_shim::to_channels_last(&opt.exp_avg_sq)?;
            }
            let layout = |t: Tensor| if cl { torch_shim::channels_last(&t) } else { Ok(t) };
            let per_step = timed(device, 5.min(steps), steps, || {
                opt.zero_grad();
                let y = layout(Tensor::rand([train_b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0)?;
                let labels = Tensor::randint(10, [train_b], (Kind::Int64, device))
                    .one_hot(10)
                    .to_kind(Kind::Float);
                let (loss, _) = {
                    let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                    edm_loss(&net, &y, Some(&labels), -1.2, 1.2, true)
                };
                loss.backward();
                opt.step(1e-4, 0.0)?;
                ema_update(&ema, &net, 0.999)
            })?;
            out.insert(format!("{tag}_train_{prec}_img_s"), (train_b as f64 / per_step).into());
            let z = layout(Tensor::randn([sample_b, 3, 32, 32], (Kind::Float, device)) * 80.0)?;
            let labels = one_hot(&(0..sample_b).map(|i| i % 10).collect::<Vec<_>>(), 10, device);
            let sigma = Tensor::from(80.0f32).to_device(device);
            let per_call = timed(device, 3.min(steps), 10.min(steps), || {
                let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                let _ = tch::no_grad(|| ema.denoise(&z, &sigma, Some(&labels), false));
                Ok(())
            })?;
            out.insert(format!("{tag}_onestep_{prec}_img_s"), (sample_b as f64 / per_call).into());
            // DMDPIPE_BENCH_NO_GRAPH=1 skips the graph variants (their capture failed once on an
            // H200 in cuDNN's engine search, then reported as `*_graph_error`; docs/RESULTS.md).
            let graphs = std::env::var("DMDPIPE_BENCH_NO_GRAPH").map_or(true, |v| v != "1");
            if prec == "bf16" && graphs && device.is_cuda() && crate::cuda_graph::available() {
                match bench_graphed(&net, &opt, device, train_b, &z, &labels, steps) {
                    Ok((train, sample)) => {
                        out.insert(format!("{tag}_train_bf16_graph_img_s"), train.into());
                        out.insert(format!("{tag}_onestep_bf16_graph_img_s"), sample.into());
                    }
                    // Reported, not fatal: the eager figures and the DMD benches still run.
                    Err(e) => {
                        out.insert(format!("{tag}_graph_error"), format!("{e:#}").into());
                    }
                }
            }
        }
    }
    crate::nn::unet_block::set_fused_attention(true);
    if let Some(w) = inception.filter(|w| w.exists()) {
        use crate::eval::inception::Layout;
        let mut net = crate::eval::inception::Inception::load(w, device)?;
        let n = if quick { 8 } else { 250 };
        let imgs = (Tensor::rand([n, 32, 32, 3], (Kind::Float, device)) * 255.0).to_kind(Kind::Uint8);
        // bf16 (autocast) is a throughput figure only: FID is defined with fp32 features.
        for (prec, tf32, bf16) in [("tf32", true, false), ("fp32", false, false), ("bf16", true, true)] {
            torch_shim::set_tf32(tf32);
            for (lay, layout) in [("", Layout::AsInput), ("_nchw", Layout::Nchw), ("_nhwc", Layout::Nhwc)] {
                net.layout = layout;
                // Features to the host in f64, as the FID stages (and the PyTorch script) take them.
                let per = timed(device, 2, if quick { 1 } else { 20 }, || {
                    let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                    let _ = net.features(&imgs).to_kind(Kind::Double).to_device(tch::Device::Cpu);
                    Ok(())
                })?;
                out.insert(format!("inception_{prec}{lay}_img_s"), (n as f64 / per).into());
            }
        }
        torch_shim::set_tf32(true);
    }
    if !quick {
        for (tag, cfg) in [("edm55m", ddpmpp(128, 4)), ("speedrun9m", ddpmpp(64, 2))] {
            for batch in [56usize, 128] {
                let ips = bench_dmd(&cfg, device, batch, 40, true)?;
                out.insert(format!("{tag}_dmd_b{batch}_it_s"), ips.into());
                let eager = bench_dmd(&cfg, device, batch, 20, false)?;
                out.insert(format!("{tag}_dmd_b{batch}_eager_it_s"), eager.into());
            }
        }
    } else {
        out.insert(
            "speedrun9m_dmd_b4_it_s".into(),
            bench_dmd(&ddpmpp(64, 2), device, 4, 2, true)?.into(),
        );
    }
    add_tflops(&mut out, peak);
    Ok(Value::Object(out))
}

/// The bf16 training step (without the EMA) and the one-step sampling call, each captured as a
/// CUDA graph and replayed: (train img/s, sampling img/s).
fn bench_graphed(
    net: &Denoiser,
    opt: &AdamW,
    device: tch::Device,
    train_b: i64,
    z: &Tensor,
    labels: &Tensor,
    steps: usize,
) -> Result<(f64, f64)> {
    use crate::cuda_graph::{CudaGraph, SideStream};
    let _side = SideStream::enter()?;
    let lr = Tensor::from(1e-4f32).to_device(device);
    let eye = Tensor::eye(10, (Kind::Float, device));
    let step = || -> Result<Tensor> {
        opt.zero_grad();
        let y = Tensor::rand([train_b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0;
        let l = eye.index_select(0, &Tensor::randint(10, [train_b], (Kind::Int64, device)));
        let (loss, _) = {
            let _ac = AutocastBf16::new(true)?;
            edm_loss(net, &y, Some(&l), -1.2, 1.2, true)
        };
        loss.backward();
        opt.step(&lr, 0.0)?;
        Ok(loss.detach())
    };
    for _ in 0..3 {
        let _ = step()?;
    }
    let (g, _) = CudaGraph::capture(&step)?;
    let per_step = timed(device, 2, steps, || g.replay())?;
    let sigma = Tensor::from(80.0f32).to_device(device);
    let sample = || -> Result<Tensor> {
        let _ac = AutocastBf16::new(true)?;
        Ok(tch::no_grad(|| net.denoise(z, &sigma, Some(labels), false)))
    };
    for _ in 0..2 {
        let _ = sample()?;
    }
    let (g, _) = CudaGraph::capture(&sample)?;
    let per_call = timed(device, 2, 10.min(steps), || g.replay())?;
    Ok((train_b as f64 / per_step, z.size()[0] as f64 / per_call))
}

/// Achieved TFLOP/s beside every throughput figure (forward FLOPs counted layer by layer;
/// training = 3 forwards; a DMD iteration with regression and one fake update = 11 forwards
/// per sample), and the fraction of the measured bf16 matmul peak.
fn add_tflops(out: &mut Map<String, Value>, peak: f64) {
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
fn matmul_peak_tflops(device: tch::Device, n: i64) -> Result<f64> {
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
fn bench_dmd(cfg: &NetworkConfig, device: tch::Device, batch: usize, iterations: u64, cuda_graph: bool) -> Result<f64> {
    bench_dmd_gan(cfg, device, batch, iterations, cuda_graph, false)
}

/// [`bench_dmd`], optionally with DMD2's GAN head (random "real" images).
fn bench_dmd_gan(cfg: &NetworkConfig, device: tch::Device, batch: usize, iterations: u64, cuda_graph: bool, gan: bool) -> Result<f64> {
    use crate::train::dmd::{DmdOptions, Pairs, RealImages, dmd_train_with_grids};
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
    let summary = dmd_train_with_grids(
        &teacher,
        &g,
        &f,
        None,
        Some(&pairs),
        &opts,
        work.path(),
        |_| {},
        None,
        None,
        real.as_ref(),
    )?;
    let timed: Vec<f64> = summary.log.iter().skip(1).map(|r| r.iterations_per_second).collect();
    Ok(timed.len() as f64 / timed.iter().map(|r| 1.0 / r).sum::<f64>())
}

/// Inception features for the 60,000 CIFAR-10 images in TF32 and strict fp32: throughput and
/// FID(train, test), the workload of `bench/pytorch_inception.py`.
pub fn bench_inception(device_name: &str, weights: &std::path::Path, cifar_dir: &std::path::Path, limit: Option<usize>) -> Result<Value> {
    use crate::eval::fid::{StatsAccumulator, frechet_distance};
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(device.is_cuda());
    let net = crate::eval::inception::Inception::load(weights, device)?;
    let none = |_: &str| None;
    let mut train = crate::data::cifar10::read_files(cifar_dir, &crate::data::cifar10::TRAIN_FILES, &none)?;
    let mut test = crate::data::cifar10::read_files(cifar_dir, &crate::data::cifar10::TEST_FILES, &none)?;
    if let Some(n) = limit {
        for ds in [&mut train, &mut test] {
            let n = n.min(ds.len());
            ds.images.truncate(n * 3072);
            ds.labels.truncate(n);
        }
    }
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
    for (prec, tf32) in [("tf32", true), ("fp32", false)] {
        torch_shim::set_tf32(device.is_cuda() && tf32);
        let feats = |ds: &crate::data::artifact::ImageDataset| -> Result<crate::eval::fid::FidStats> {
            let mut acc = StatsAccumulator::new();
            for start in (0..ds.len()).step_by(250) {
                let n = 250.min(ds.len() - start);
                let b = Tensor::from_slice(&ds.images[start * 3072..(start + n) * 3072]).reshape([n as i64, 32, 32, 3]);
                acc.add(&net.features(&b));
            }
            acc.finish()
        };
        let _ = feats(&crate::data::artifact::ImageDataset {
            images: train.images[..3072 * 500.min(train.len())].to_vec(),
            labels: train.labels[..500.min(train.len())].to_vec(),
            ..train.clone()
        })?;
        sync(device);
        let t = Instant::now();
        let s_train = feats(&train)?;
        let s_test = feats(&test)?;
        sync(device);
        let secs = t.elapsed().as_secs_f64();
        let n = (train.len() + test.len()) as f64;
        out.insert(format!("{prec}_seconds"), secs.into());
        out.insert(format!("{prec}_images_per_second"), (n / secs).into());
        out.insert(format!("{prec}_fid_train_test"), frechet_distance(&s_test, &s_train)?.into());
    }
    Ok(Value::Object(out))
}

/// One rank of `bench scaling` (run under `dmdpipe launch`, or alone for 1 GPU): teacher
/// training img/s at `per_gpu_batch` images per GPU (and at 56 for the 55.7M network), DMD it/s
/// at 56 and 128 per GPU (55.7M, with graph capture) and 128 per GPU (8.8M), and two short runs
/// whose loss curves are compared across GPU counts at the same global batch: the 8.8M teacher
/// at 256, and DMD (8.8M) at `dmd_global_batch` in micro-batches of 56 per GPU, accumulated to
/// the global batch. Rank 0 returns the numbers.
pub fn bench_data_parallel(per_gpu_batch: usize, dmd_global_batch: usize, quick: bool) -> Result<Value> {
    crate::dist::init_from_env()?;
    let world = crate::dist::world();
    let device = crate::dist::local_device(torch_shim::device(if quick { "auto" } else { "cuda" })?);
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let mut out = Map::new();
    out.insert("gpus".into(), world.into());
    let steps = if quick { 3 } else { 20 };
    let runs = [
        ("edm55m_train_img_s", ddpmpp(128, 4), per_gpu_batch),
        ("edm55m_train_b56_img_s", ddpmpp(128, 4), 56),
        ("speedrun9m_train_img_s", ddpmpp(64, 2), per_gpu_batch),
    ];
    for (key, cfg, per_gpu) in runs {
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        let opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        crate::dist::broadcast_from_main(&opt.params)?;
        let b = if quick { 2 } else { per_gpu as i64 };
        let per_step = timed(device, 3, steps, || {
            opt.zero_grad();
            let y = Tensor::rand([b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0;
            let labels = Tensor::randint(10, [b], (Kind::Int64, device)).one_hot(10).to_kind(Kind::Float);
            let (loss, _) = {
                let _ac = AutocastBf16::new(true)?;
                edm_loss(&net, &y, Some(&labels), -1.2, 1.2, true)
            };
            loss.backward();
            opt.step(1e-4, 0.0)?;
            Ok(())
        })?;
        out.insert(key.into(), ((b as usize * world) as f64 / per_step).into());
        crate::dist::check_identical(&opt.params, "parameters after the timed steps")?;
    }
    for (tag, cfg, batches) in [
        ("edm55m", ddpmpp(128, 4), vec![56usize, 128]),
        ("speedrun9m", ddpmpp(64, 2), vec![56, 128]),
    ] {
        for per_gpu in batches {
            let b = if quick { 2 } else { per_gpu };
            let ips = bench_dmd(&cfg, device, b * world, if quick { 2 } else { 40 }, true)?;
            out.insert(format!("{tag}_dmd_b{per_gpu}_per_gpu_it_s"), ips.into());
        }
    }
    let gan_b = if quick { 2 } else { 128 };
    let gan = bench_dmd_gan(&ddpmpp(64, 2), device, gan_b * world, if quick { 2 } else { 40 }, true, true)?;
    out.insert("speedrun9m_dmd_gan_b128_per_gpu_it_s".into(), gan.into());
    // Loss tracking: the 8.8M teacher on 2,048 fixed images, global batch 256, same seeds.
    tch::manual_seed(1);
    let n = 2048usize;
    let images: Vec<u8> =
        Vec::<u8>::try_from((Tensor::rand([n as i64 * 3072], (Kind::Float, tch::Device::Cpu)) * 255.0).to_kind(Kind::Uint8))?;
    let ds = crate::data::artifact::ImageDataset {
        images,
        height: 32,
        width: 32,
        channels: 3,
        labels: (0..n as i64).map(|i| i % 10).collect(),
        classes: (0..10).map(|i| format!("c{i}")).collect(),
    };
    let data = crate::train::device_data::DeviceImages::new(&ds, device);
    tch::manual_seed(2);
    let net = Denoiser::new(&ddpmpp(64, 2), device);
    let ema = net.duplicate()?;
    let opts: crate::train::teacher::TrainOptions = serde_json::from_value(json!({
        "batch": if quick { 4 } else { 256 }, "images": if quick { 8 } else { 256 * 300 }, "lr": 1e-3, "lr_warmup_images": 25600,
        "log_every": 10, "checkpoint_every": 1_000_000, "xflip": false
    }))?;
    let work = tempfile::tempdir()?;
    let summary = crate::train::teacher::train(&net, &ema, &data, &opts, work.path(), |_, _, _, _| {})?;
    out.insert("loss_curve_global_batch_256".into(), json!(summary.loss_curve));
    if dmd_global_batch > 0 {
        let micro = if quick { 2 } else { 56 };
        let global = if quick { micro * dmd_global_batch / 56 } else { dmd_global_batch };
        anyhow::ensure!(
            global % (micro * world) == 0,
            "the DMD global batch {global} is not a multiple of {micro} x {world} GPUs"
        );
        let accum = global / (micro * world);
        let iters = if quick { 4 } else { 200 };
        let log = dmd_loss_run(&ddpmpp(64, 2), device, global, accum, iters, 0)?;
        out.insert("dmd_track_global_batch".into(), global.into());
        out.insert("dmd_track_grad_accumulation".into(), accum.into());
        for (k, f) in [
            (
                "loss_fake",
                (|r: &crate::train::dmd::DmdLogRow| r.loss_fake) as fn(&crate::train::dmd::DmdLogRow) -> f64,
            ),
            ("loss_dm", |r| r.loss_dm),
            ("loss_reg", |r| r.loss_reg),
            ("grad_norm_g", |r| r.grad_norm_g),
        ] {
            out.insert(format!("dmd_curve_{k}"), json!(log.log.iter().map(f).collect::<Vec<_>>()));
        }
        out.insert("dmd_track_it_s".into(), log.iterations_per_second.into());
        // The noise floor for comparing these curves: the same run from another seed (alone
        // only, so that the N-GPU runs do not pay for it).
        if world == 1 {
            let other = dmd_loss_run(&ddpmpp(64, 2), device, global, accum, iters, 1)?;
            for (k, f) in [
                (
                    "loss_fake",
                    (|r: &crate::train::dmd::DmdLogRow| r.loss_fake) as fn(&crate::train::dmd::DmdLogRow) -> f64,
                ),
                ("loss_dm", |r| r.loss_dm),
            ] {
                out.insert(format!("dmd_seed1_curve_{k}"), json!(other.log.iter().map(f).collect::<Vec<_>>()));
            }
        }
    }
    Ok(if crate::dist::is_main() { Value::Object(out) } else { Value::Null })
}

/// A short DMD run (random teacher, random pairs, fixed seeds) for loss-curve comparisons.
fn dmd_loss_run(
    cfg: &NetworkConfig,
    device: tch::Device,
    batch: usize,
    accum: usize,
    iterations: u64,
    seed: u64,
) -> Result<crate::train::dmd::DmdSummary> {
    use crate::train::dmd::{DmdOptions, Pairs, dmd_train};
    let mut cfg = cfg.clone();
    cfg.set_dropout(0.0);
    tch::manual_seed(5);
    let teacher = Denoiser::new(&cfg, device);
    let (g, f) = (teacher.duplicate()?, teacher.duplicate()?);
    tch::manual_seed(6);
    let pairs = Pairs {
        z: Tensor::randn([4096, 3, 32, 32], (Kind::Float, device)),
        labels: Some(Tensor::eye(10, (Kind::Float, device)).index_select(0, &Tensor::randint(10, [4096], (Kind::Int64, device)))),
        x: Tensor::randn([4096, 3, 32, 32], (Kind::Float, device)) * 0.5,
    };
    let work = tempfile::tempdir()?;
    let opts = DmdOptions {
        batch,
        iterations,
        lr: 1e-4,
        warmup_steps: 20,
        regression_weight: 1.0,
        fake_updates_per_g: 2,
        grad_accumulation: accum,
        seed,
        log_every: 10,
        checkpoint_every: u64::MAX,
        cuda_graph: device.is_cuda(),
        ..Default::default()
    };
    dmd_train(&teacher, &g, &f, None, Some(&pairs), &opts, work.path(), |_| {})
}

/// Mean |a - b| over the mean of a, from the 5th point on (past the warm-up transient).
fn curve_rel_diff(a: &[f64], b: &[f64]) -> Option<f64> {
    let pairs: Vec<(f64, f64)> = a.iter().copied().zip(b.iter().copied()).skip(4).collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let scale = pairs.iter().map(|p| p.0.abs()).sum::<f64>() / n;
    Some(pairs.iter().map(|(x, y)| (x - y).abs()).sum::<f64>() / n / scale.max(1e-12))
}

/// The curve's own noise on the same scale: mean |a_i - a_{i+1}| over the mean of a.
fn curve_noise(a: &[f64]) -> Option<f64> {
    let t: Vec<f64> = a.iter().copied().skip(4).collect();
    if t.len() < 2 {
        return None;
    }
    let scale = t.iter().map(|x| x.abs()).sum::<f64>() / t.len() as f64;
    Some(t.windows(2).map(|w| (w[0] - w[1]).abs()).sum::<f64>() / (t.len() - 1) as f64 / scale.max(1e-12))
}

/// `bench scaling`: `bench data-parallel` alone on one GPU, then on each of `gpus` GPU counts
/// through `launch`, each in fresh processes; speed-ups (N-GPU throughput over 1-GPU
/// throughput, at the same per-GPU batch), efficiencies (speed-up / N), and the loss curves of
/// every run at the same global batch (DMD: 56 per GPU times the largest count, accumulated).
pub fn bench_scaling(gpus: &[usize], per_gpu_batch: usize, quick: bool) -> Result<Value> {
    anyhow::ensure!(
        !gpus.is_empty() && gpus.iter().all(|&n| n >= 2),
        "--gpus takes GPU counts of 2 or more"
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let dmd_global = 56 * gpus.iter().copied().max().unwrap_or(1);
    let args = |file: &std::path::Path| {
        let mut a = vec![
            "bench".to_string(),
            "data-parallel".into(),
            "--per-gpu-batch".into(),
            per_gpu_batch.to_string(),
            "--dmd-global-batch".into(),
            dmd_global.to_string(),
        ];
        if quick {
            a.push("--quick".into());
        }
        a.extend(["--out".into(), file.display().to_string()]);
        a
    };
    let read = |f: &std::path::Path| -> Result<Map<String, Value>> {
        Ok(serde_json::from_str::<Value>(&std::fs::read_to_string(f)?)?
            .as_object()
            .cloned()
            .unwrap_or_default())
    };
    let one_file = dir.path().join("one.json");
    let status = std::process::Command::new(&exe)
        .args(args(&one_file))
        .env_remove("WORLD_SIZE")
        .status()?;
    anyhow::ensure!(status.success(), "the 1-GPU run failed ({status})");
    let one = read(&one_file)?;
    let mut out = Map::new();
    out.insert("gpus".into(), json!(gpus));
    out.insert("per_gpu_batch".into(), per_gpu_batch.into());
    let curves = |m: &Map<String, Value>, k: &str| -> Vec<f64> {
        m.get(k)
            .and_then(|v| v.as_array())
            // Plain numbers, or [images, loss] points.
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64().or_else(|| x.as_array()?.last()?.as_f64()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (k, v) in &one {
        if k.contains("curve") || k.starts_with("dmd_track") {
            out.insert(format!("{k}_1gpu"), v.clone());
        }
    }
    // Two seeds on one GPU: how far apart DMD curves land from noise alone.
    for k in ["loss_fake", "loss_dm"] {
        let (a, b) = (
            curves(&one, &format!("dmd_curve_{k}")),
            curves(&one, &format!("dmd_seed1_curve_{k}")),
        );
        if let Some(d) = curve_rel_diff(&a, &b) {
            out.insert(format!("dmd_curve_{k}_rel_diff_between_seeds_1gpu"), d.into());
        }
    }
    for &n in gpus {
        let many_file = dir.path().join(format!("gpus{n}.json"));
        let spec = crate::dist::launch::LaunchSpec {
            nproc: n,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
        };
        crate::dist::launch::launch(&spec, &args(&many_file))?;
        let many = read(&many_file)?;
        for (k, v1) in &one {
            let (Some(a), Some(b)) = (v1.as_f64(), many.get(k).and_then(|v| v.as_f64())) else {
                continue;
            };
            if k == "gpus" || k.starts_with("dmd_track") {
                continue;
            }
            // Training img/s are global; DMD it/s are at a fixed per-GPU batch (N times the samples).
            let speedup = if k.contains("_dmd_") { n as f64 * b / a } else { b / a };
            out.insert(format!("{k}_1gpu"), a.into());
            out.insert(format!("{k}_{n}gpu"), b.into());
            out.insert(format!("{k}_speedup_{n}gpu"), speedup.into());
            out.insert(format!("{k}_efficiency_{n}gpu"), (speedup / n as f64).into());
        }
        for (k, v) in &many {
            if k.contains("curve") || k.starts_with("dmd_track") {
                out.insert(format!("{k}_{n}gpu"), v.clone());
                let (a, b) = (curves(&one, k), curves(&many, k));
                if let (Some(d), Some(noise)) = (curve_rel_diff(&a, &b), curve_noise(&a)) {
                    out.insert(format!("{k}_rel_diff_{n}gpu"), d.into());
                    out.insert(format!("{k}_rel_noise_1gpu"), noise.into());
                }
            }
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_difference_and_noise_are_relative_and_skip_the_warm_up() {
        // The first four points differ wildly and are ignored.
        let a = [9.0, 9.0, 9.0, 9.0, 1.0, 1.2, 1.0, 1.2];
        let b = [0.0, 0.0, 0.0, 0.0, 1.1, 1.1, 1.1, 1.1];
        let d = curve_rel_diff(&a, &b).unwrap();
        assert!((d - 0.1 / 1.1).abs() < 1e-12, "{d}");
        let noise = curve_noise(&a).unwrap();
        assert!((noise - 0.2 / 1.1).abs() < 1e-12, "{noise}");
        assert_eq!(curve_rel_diff(&a[..4], &b[..4]), None);
        assert_eq!(curve_noise(&a[..5]), None);
    }
}
