//! FID statistics artifacts (`fid-ref`, `fid`): `stats.npz` in EDM's layout (`mu`, `sigma`) and,
//! when kept, the raw Inception features for KID and precision/recall.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use tch::Tensor;

pub const STATS_FILE: &str = "stats.npz";
pub const FEATURES_FILE: &str = "features.safetensors";

/// The statistics file inside an FID artifact's folder.
pub fn stats_path(dir: &Path) -> PathBuf {
    dir.join(STATS_FILE)
}

/// Writes the features of every image into `dir`.
pub fn save_features(dir: &Path, features: &Tensor) -> Result<()> {
    let tensors = [("features".to_string(), features.shallow_clone())];
    super::tensors::write_safetensors(&dir.join(FEATURES_FILE), &tensors, Default::default())
}

/// Reads the features an FID artifact kept.
pub fn load_features(dir: &Path) -> Result<Tensor> {
    let path = dir.join(FEATURES_FILE);
    if !path.exists() {
        bail!("kid_pr = true needs the reference's features: set keep_features = true on its fid-ref stage");
    }
    let (mut t, _) = super::tensors::read_safetensors(&path)?;
    super::tensors::take(&mut t, "features", &path)
}
