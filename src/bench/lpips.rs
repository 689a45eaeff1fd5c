//! `dmdpipe bench lpips`: LPIPS distances of image pairs from `.npy` files, from the weight files
//! users have (to compare with the `lpips` package on the same weights), and their throughput.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::data::npy::{NpyData, read_npy};

fn images(path: &Path, device: tch::Device) -> Result<Tensor> {
    let a = read_npy(path)?;
    let t = match &a.data {
        NpyData::F32(v) => Tensor::from_slice(v),
        NpyData::F64(v) => Tensor::from_slice(v).to_kind(Kind::Float),
        _ => bail!("{}: expected float images in [-1, 1]", path.display()),
    };
    let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
    if shape.len() != 4 || shape[1] != 3 {
        bail!("{}: expected [N, 3, H, W], got {shape:?}", path.display());
    }
    Ok(t.reshape(shape.as_slice()).to_device(device))
}

/// Per-pair distances of `a` and `b` (resized to `resize` first, as DMD does, when given).
pub fn bench_lpips(backbone: &Path, heads: &Path, a: &Path, b: &Path, resize: Option<i64>, device: &str) -> Result<Value> {
    let device = crate::torch_shim::device(device)?;
    let mut net = crate::nn::lpips::Lpips::from_torch(backbone, heads, device)?;
    net.resize = resize;
    let (a, b) = (images(a, device)?, images(b, device)?);
    let d = tch::no_grad(|| net.distance(&a, &b));
    let start = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        let _ = tch::no_grad(|| net.distance(&a, &b)).double_value(&[0]);
    }
    let per = start.elapsed().as_secs_f64() / reps as f64;
    Ok(json!({
        "device": format!("{device:?}"),
        "resize": resize,
        "distances": Vec::<f64>::try_from(d.to_kind(Kind::Double).to_device(tch::Device::Cpu))?,
        "pairs_per_second": a.size()[0] as f64 / per,
    }))
}
