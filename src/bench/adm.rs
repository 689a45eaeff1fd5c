//! `bench adm`: EDM's ImageNet-64 network (ADM, 296M parameters: adaptive scale, attention with
//! 64 channels per head at 32x32, 16x16 and 8x8) with and without `fused_kernels`: bf16 teacher
//! training img/s and one-step sampling img/s. The DDPM++ figures of `bench gpu` do not exercise
//! the adaptive-scale GroupNorm or multi-head attention; this does.

use anyhow::Result;
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use super::timed;
use crate::nn::{Denoiser, NetworkConfig};
use crate::torch_shim::{self, AutocastBf16};
use crate::train::optim::AdamW;
use crate::train::teacher::edm_loss;

/// EDM's ImageNet-64 ADM (`quick`: a small one at 16x16 for a smoke test) with `fused_kernels`.
fn adm_config(quick: bool, fused: bool) -> NetworkConfig {
    let v = if quick {
        json!({"arch": "adm", "img_resolution": 16, "label_dim": 10, "model_channels": 32, "channel_mult": [1, 2],
               "num_blocks": 1, "attn_resolutions": [8], "fused_kernels": fused})
    } else {
        json!({"arch": "adm", "fused_kernels": fused})
    };
    serde_json::from_value(v).expect("a valid ADM config")
}

/// Training img/s (EDM's loss, AdamW) and one-step sampling img/s, eager and fused.
pub fn bench_adm(device_name: &str, quick: bool, train_batch: i64, sample_batch: i64) -> Result<Value> {
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let (train_b, sample_b, steps) = if quick { (2, 2, 1) } else { (train_batch, sample_batch, 10) };
    let bf16 = device.is_cuda();
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
    out.insert("train_batch".into(), train_b.into());
    out.insert("sample_batch".into(), sample_b.into());
    for fused in [false, true] {
        let sfx = if fused { "_fused" } else { "" };
        let cfg = adm_config(quick, fused);
        let (res, classes) = (cfg.img_resolution(), cfg.label_dim());
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        out.insert("adm_parameters".into(), net.num_params().into());
        let opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        let eye = Tensor::eye(classes, (Kind::Float, device));
        let per_step = timed(device, 3.min(steps), steps, || {
            opt.zero_grad();
            let y = Tensor::rand([train_b, 3, res, res], (Kind::Float, device)) * 2.0 - 1.0;
            let labels = eye.index_select(0, &Tensor::randint(classes, [train_b], (Kind::Int64, device)));
            let (loss, _) = {
                let _ac = AutocastBf16::new(bf16)?;
                edm_loss(&net, &y, Some(&labels), -1.2, 1.2, true)
            };
            loss.backward();
            opt.step(1e-4, 0.0).map(|_| ())
        })?;
        out.insert(format!("adm_train_bf16{sfx}_img_s"), (train_b as f64 / per_step).into());
        let z = Tensor::randn([sample_b, 3, res, res], (Kind::Float, device)) * 80.0;
        let labels = eye.index_select(0, &Tensor::randint(classes, [sample_b], (Kind::Int64, device)));
        let sigma = Tensor::from(80.0f32).to_device(device);
        let per_call = timed(device, 2.min(steps), steps, || {
            let _ac = AutocastBf16::new(bf16)?;
            let _ = tch::no_grad(|| net.denoise(&z, &sigma, Some(&labels), false));
            Ok(())
        })?;
        out.insert(format!("adm_onestep_bf16{sfx}_img_s"), (sample_b as f64 / per_call).into());
    }
    Ok(Value::Object(out))
}
