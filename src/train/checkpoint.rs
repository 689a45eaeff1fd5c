//! Resumable training state as one safetensors file: named tensor groups plus JSON metadata,
//! written atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

pub fn tensor_bytes(t: &Tensor) -> (Vec<u8>, Vec<usize>) {
    let t = t.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0f32; numel];
    t.copy_data(&mut buf, numel);
    (
        buf.iter().flat_map(|v| v.to_le_bytes()).collect(),
        t.size().iter().map(|&s| s as usize).collect(),
    )
}

/// Writes `tensors` (as f32) and `meta` to `path` via a temp file and rename.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> Result<()> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (b, s) = tensor_bytes(t);
            (n.clone(), b, s)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copies tensors named `prefix + name` from `src` into `dst` (same order as `names`).
pub fn restore(src: &HashMap<String, Tensor>, prefix: &str, names: &[String], dst: &[Tensor]) -> Result<()> {
    for (n, d) in names.iter().zip(dst) {
        let key = format!("{prefix}{n}");
        let t = src.get(&key).with_context(|| format!("checkpoint lacks `{key}`"))?;
        tch::no_grad(|| {
            d.shallow_clone()
                .copy_(&t.to_kind(d.kind()).to_device(d.device()).reshape(d.size()))
        });
    }
    Ok(())
}
