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
        let variants = [("bf16", true, false), ("tf32", false, false), ("bf16_channels_last", true, true)];
        for &(prec, bf16, cl) in variants.iter().filter(|v| channels_last || !v.2) {
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
            if prec == "bf16" && device.is_cuda() && crate::cuda_graph::available() {
                let (train, sample) = bench_graphed(&net, &opt, device, train_b, &z, &labels, steps)?;
                out.insert(format!("{tag}_train_bf16_graph_img_s"), train.into());
                out.insert(format!("{tag}_onestep_bf16_graph_img_s"), sample.into());
            }
        }
    }
    if let Some(w) = inception.filter(|w| w.exists()) {
        let net = crate::eval::inception::Inception::load(w, device)?;
        let n = if quick { 8 } else { 250 };
        let imgs = (Tensor::rand([n, 32, 32, 3], (Kind::Float, device)) * 255.0).to_kind(Kind::Uint8);
        let per = timed(device, 2, if quick { 1 } else { 20 }, || {
            let _ = net.features(&imgs);
            Ok(())
        })?;
        out.insert("inception_tf32_img_s".into(), (n as f64 / per).into());
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
/// training img/s at `per_gpu_batch` images per GPU, DMD it/s at 56 and 128 per GPU (55.7M, with
/// graph capture) and 128 per GPU (8.8M), and a short teacher run on fixed images whose loss
/// curve is compared across GPU counts at the same global batch. Rank 0 returns the numbers.
pub fn bench_data_parallel(per_gpu_batch: usize, quick: bool) -> Result<Value> {
    crate::dist::init_from_env()?;
    let world = crate::dist::world();
    let device = crate::dist::local_device(torch_shim::device(if quick { "auto" } else { "cuda" })?);
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let mut out = Map::new();
    out.insert("gpus".into(), world.into());
    let steps = if quick { 3 } else { 20 };
    for (tag, cfg) in [("edm55m", ddpmpp(128, 4)), ("speedrun9m", ddpmpp(64, 2))] {
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        let opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        crate::dist::broadcast_from_main(&opt.params)?;
        let b = per_gpu_batch as i64;
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
        out.insert(format!("{tag}_train_img_s"), ((per_gpu_batch * world) as f64 / per_step).into());
        crate::dist::check_identical(&opt.params, "parameters after the timed steps")?;
    }
    for (tag, cfg, batches) in [
        ("edm55m", ddpmpp(128, 4), vec![56usize, 128]),
        ("speedrun9m", ddpmpp(64, 2), vec![128]),
    ] {
        for per_gpu in batches {
            let per_gpu = if quick { 2 } else { per_gpu };
            let ips = bench_dmd(&cfg, device, per_gpu * world, if quick { 2 } else { 40 }, true)?;
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
    Ok(if crate::dist::is_main() { Value::Object(out) } else { Value::Null })
}

/// `bench scaling`: `bench data-parallel` alone on one GPU, then on `gpus` GPUs through
/// `launch`, each in fresh processes; speed-ups (N-GPU throughput over 1-GPU throughput, at the
/// same per-GPU batch) and efficiencies (speed-up / N).
pub fn bench_scaling(gpus: usize, per_gpu_batch: usize, quick: bool) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let args = |file: &std::path::Path| {
        let mut a = vec![
            "bench".to_string(),
            "data-parallel".into(),
            "--per-gpu-batch".into(),
            per_gpu_batch.to_string(),
        ];
        if quick {
            a.push("--quick".into());
        }
        a.extend(["--out".into(), file.display().to_string()]);
        a
    };
    let one_file = dir.path().join("one.json");
    let status = std::process::Command::new(&exe)
        .args(args(&one_file))
        .env_remove("WORLD_SIZE")
        .status()?;
    anyhow::ensure!(status.success(), "the 1-GPU run failed ({status})");
    let many_file = dir.path().join("many.json");
    let spec = crate::dist::launch::LaunchSpec {
        nproc: gpus,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
    };
    crate::dist::launch::launch(&spec, &args(&many_file))?;
    let read = |f: &std::path::Path| -> Result<Map<String, Value>> {
        Ok(serde_json::from_str::<Value>(&std::fs::read_to_string(f)?)?
            .as_object()
            .cloned()
            .unwrap_or_default())
    };
    let (one, many) = (read(&one_file)?, read(&many_file)?);
    let mut out = Map::new();
    out.insert("gpus".into(), gpus.into());
    out.insert("per_gpu_batch".into(), per_gpu_batch.into());
    for (k, v1) in &one {
        let (Some(a), Some(b)) = (v1.as_f64(), many.get(k).and_then(|v| v.as_f64())) else {
            continue;
        };
        if k == "gpus" {
            continue;
        }
        // Training img/s are global; DMD it/s are at a fixed per-GPU batch (N times the samples).
        let speedup = if k.contains("_dmd_") { gpus as f64 * b / a } else { b / a };
        out.insert(format!("{k}_1gpu"), a.into());
        out.insert(format!("{k}_{gpus}gpu"), b.into());
        out.insert(format!("{k}_speedup"), speedup.into());
        out.insert(format!("{k}_efficiency"), (speedup / gpus as f64).into());
    }
    for (tag, m) in [("1gpu", &one), ("ngpu", &many)] {
        if let Some(c) = m.get("loss_curve_global_batch_256") {
            out.insert(format!("loss_curve_{tag}"), c.clone());
        }
    }
    Ok(Value::Object(out))
}
