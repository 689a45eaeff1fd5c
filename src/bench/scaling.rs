//! `bench scaling` and its ranks (`bench data-parallel`): data-parallel speed-up and loss curves.

use anyhow::Result;
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use super::{bench_dmd, bench_dmd_gan, ddpmpp, random_train_step, timed};
use crate::nn::{Denoiser, NetworkConfig};
use crate::torch_shim;
use crate::train::optim::AdamW;

/// One rank of `bench scaling` (run under `dmdpipe launch`, or alone for 1 GPU): teacher
/// training img/s at `per_gpu_batch` images per GPU (and at 56 for the 55.7M network), DMD it/s
/// at 56 and 128 per GPU (55.7M, with graph capture) and 128 per GPU (8.8M), and two short runs
/// whose loss curves are compared across GPU counts at the same global batch: the 8.8M teacher
/// at 256, and DMD (8.8M) at `dmd_global_batch` in micro-batches of 56 per GPU, accumulated to
/// the global batch. Teacher training is timed eagerly and as a CUDA-graph replay (`*_graph_*`,
/// the all-reduces captured with the step). `train_only`: the training figures alone (a short
/// call). Rank 0 returns the numbers.
pub fn bench_data_parallel(per_gpu_batch: usize, dmd_global_batch: usize, quick: bool, train_only: bool) -> Result<Value> {
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
        let per_step = timed(device, 3, steps, || random_train_step(&net, &opt, b, true))?;
        out.insert(key.into(), ((b as usize * world) as f64 / per_step).into());
        crate::dist::check_identical(&opt.params, "parameters after the timed steps")?;
        if device.is_cuda() && crate::cuda_graph::available() {
            let mut runner = crate::cuda_graph::CapturedStep::new(true, true, 3, "bench training step")?;
            let step = || -> Result<Tensor> {
                random_train_step(&net, &opt, b, true)?;
                Ok(Tensor::zeros([], (Kind::Float, device)))
            };
            let per_step = timed(device, 5, steps, || runner.run(&step).map(|_| ()))?;
            out.insert(
                key.replace("_train", "_train_graph"),
                ((b as usize * world) as f64 / per_step).into(),
            );
            drop(runner);
            crate::dist::check_identical(&opt.params, "parameters after the graph-replayed steps")?;
        }
    }
    if train_only {
        return Ok(if crate::dist::is_main() { Value::Object(out) } else { Value::Null });
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
pub fn bench_scaling(gpus: &[usize], per_gpu_batch: usize, quick: bool, train_only: bool) -> Result<Value> {
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
        if train_only {
            a.push("--train-only".into());
        }
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
        // A failed count is reported and the others still run (the 1-GPU figures are kept).
        let many = match crate::dist::launch::launch(&spec, &args(&many_file)).and_then(|_| read(&many_file)) {
            Ok(m) => m,
            Err(e) => {
                out.insert(format!("error_{n}gpu"), format!("{e:#}").into());
                continue;
            }
        };
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
