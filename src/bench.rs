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

pub fn bench_gpu(device_name: &str, quick: bool, channels_last: bool) -> Result<Value> {
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
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
        }
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
    Ok(Value::Object(out))
}

/// DMD iterations per second (generator step with the regression loss + fake-score step), bf16,
/// measured over the iterations after the first `skip` (eager warm-up and graph capture).
fn bench_dmd(cfg: &NetworkConfig, device: tch::Device, batch: usize, iterations: u64, cuda_graph: bool) -> Result<f64> {
    use crate::train::dmd::{DmdOptions, Pairs, dmd_train};
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
        ..Default::default()
    };
    let summary = dmd_train(&teacher, &g, &f, None, Some(&pairs), &opts, work.path(), |_| {})?;
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
