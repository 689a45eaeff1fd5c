//! Teacher ODE pairs (`ode-pairs`): shards `pairs-*.safetensors` of latents `z` [N, ...], int64
//! `labels` [N] and teacher outputs `x` [N, ...], plus `pairs.json` (`label_dim`, counts).

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

pub const INFO_FILE: &str = "pairs.json";

/// Latent/output pairs on a device, labels one-hot when the teacher is conditional.
pub struct Pairs {
    pub z: Tensor,
    pub labels: Option<Tensor>,
    pub x: Tensor,
}

impl Pairs {
    pub fn len(&self) -> i64 {
        self.z.size().first().copied().unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The file name of shard `index`.
pub fn shard_name(index: usize) -> String {
    format!("pairs-{index:05}.safetensors")
}

/// Writes one shard.
pub fn write_shard(path: &Path, z: &Tensor, labels: &[i64], x: &Tensor) -> Result<()> {
    let tensors = [
        ("z".to_string(), z.shallow_clone()),
        ("labels".to_string(), Tensor::from_slice(labels)),
        ("x".to_string(), x.shallow_clone()),
    ];
    super::tensors::write_safetensors(path, &tensors, Default::default())
}

/// Loads every shard of a pairs artifact onto `device`.
pub fn load(dir: &Path, device: Device) -> Result<Pairs> {
    let info_path = dir.join(INFO_FILE);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&info_path).with_context(|| format!("reading {}", info_path.display()))?)?;
    let label_dim = info["label_dim"].as_i64().unwrap_or(0);
    let mut shards: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail!("{}: no pair shards", dir.display());
    }
    let (mut zs, mut xs, mut ls) = (Vec::new(), Vec::new(), Vec::new());
    for s in shards {
        let (mut t, _) = super::tensors::read_safetensors(&s)?;
        zs.push(super::tensors::take(&mut t, "z", &s)?);
        xs.push(super::tensors::take(&mut t, "x", &s)?);
        ls.push(super::tensors::take(&mut t, "labels", &s)?);
    }
    let (z, x, labels) = (Tensor::f_cat(&zs, 0)?, Tensor::f_cat(&xs, 0)?, Tensor::f_cat(&ls, 0)?);
    if z.size().first() != x.size().first() || z.size().first() != labels.size().first() {
        bail!("{}: shards hold different numbers of z, x and labels", dir.display());
    }
    let labels = match label_dim {
        0 => None,
        d => Some(
            labels
                .f_one_hot(d)
                .context("pair labels outside 0..label_dim")?
                .to_kind(Kind::Float)
                .to_device(device),
        ),
    };
    Ok(Pairs {
        z: z.to_device(device),
        x: x.to_device(device),
        labels,
    })
}
