//! Resumable training state as one safetensors file: named tensor groups plus JSON metadata,
//! written atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tch::Tensor;

/// Writes `tensors` (floats as f32) and `meta` to `path` atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> Result<()> {
    super::tensors::write_safetensors(path, tensors, meta)
}

/// Reads a checkpoint's tensors and metadata.
pub fn load(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    super::tensors::read_safetensors(path)
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
