//! `dmdpipe bench gpu`: throughput of the full EDM CIFAR-10 network (55.7M parameters) and the
//! small speedrun network (8.8M): teacher training img/s (batch 512) and one-step sampling img/s
//! (batch 1024), in bf16 autocast and in TF32.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use crate::nn::config::SongUNetConfig;
use crate::nn::{Denoiser, NetworkConfig};
use crate::sample::one_hot;
use crate::torch_shim::{self, AutocastBf16};
use crate::train::optim::{ema_update, AdamW};
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

pub fn bench_gpu(device_name: &str, quick: bool) -> Result<Value> {
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
        let mut opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        for bf16 in [true, false] {
            let prec = if bf16 { "bf16" } else { "tf32" };
            let per_step = timed(device, 5.min(steps), steps, || {
                opt.zero_grad();
                let y = Tensor::rand([train_b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0;
                let labels = Tensor::randint(10, [train_b], (Kind::Int64, device)).one_hot(10).to_kind(Kind::Float);
                let (loss, _) = {
                    let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                    edm_loss(&net, &y, Some(&labels), -1.2, 1.2, true)
                };
                loss.backward();
                opt.step(1e-4, 0.0)?;
                ema_update(&ema, &net, 0.999)
            })?;
            out.insert(format!("{tag}_train_{prec}_img_s"), (train_b as f64 / per_step).into());
            let z = Tensor::randn([sample_b, 3, 32, 32], (Kind::Float, device)) * 80.0;
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
    Ok(Value::Object(out))
}
