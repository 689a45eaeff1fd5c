//! A denoiser artifact (what `teacher` and `dmd` write): one safetensors file of EDM state-dict
//! names, with the network config as JSON under the metadata key `config`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::Tensor;

pub const WEIGHTS_FILE: &str = "denoiser.safetensors";
pub const CONFIG_KEY: &str = "config";

/// The weights file inside a denoiser artifact's folder.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS_FILE)
}

/// Writes named weights (sorted by name) with `config_json` in the metadata.
pub fn write(path: &Path, mut tensors: Vec<(String, Tensor)>, config_json: String) -> Result<()> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    super::tensors::write_safetensors(path, &tensors, HashMap::from([(CONFIG_KEY.to_string(), config_json)]))
}
