//! The artifacts dataset stages write: `images.safetensors` / `points.safetensors` beside a
//! `dataset.json` describing classes and shape.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

pub const IMAGES_FILE: &str = "images.safetensors";
pub const POINTS_FILE: &str = "points.safetensors";
pub const INFO_FILE: &str = "dataset.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetInfo {
    pub count: usize,
    /// [H, W, C] for images, [2] for points.
    pub shape: Vec<usize>,
    /// Class names; empty for an unconditional dataset.
    pub classes: Vec<String>,
}

/// uint8 images, NHWC, with integer labels (all 0 for unconditional data).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    pub images: Vec<u8>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub labels: Vec<i64>,
    pub classes: Vec<String>,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.images[i * n..(i + 1) * n]
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let n = self.len();
        if self.images.len() != n * self.image_bytes() {
            bail!(
                "image buffer holds {} bytes, expected {}",
                self.images.len(),
                n * self.image_bytes()
            );
        }
        let labels: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let tensors = [
            (
                "images",
                TensorView::new(Dtype::U8, vec![n, self.height, self.width, self.channels], &self.images)?,
            ),
            ("labels", TensorView::new(Dtype::I64, vec![n], &labels)?),
        ];
        let path = dir.join(IMAGES_FILE);
        safetensors::serialize_to_file(tensors, None::<HashMap<String, String>>, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let info = DatasetInfo {
            count: n,
            shape: vec![self.height, self.width, self.channels],
            classes: self.classes.clone(),
        };
        write_info(dir, &info)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(IMAGES_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        let images = st
            .tensor("images")
            .with_context(|| format!("{}: no `images` tensor", path.display()))?;
        let labels = st
            .tensor("labels")
            .with_context(|| format!("{}: no `labels` tensor", path.display()))?;
        let shape = images.shape().to_vec();
        if images.dtype() != Dtype::U8 || shape.len() != 4 {
            bail!(
                "{}: `images` must be uint8 [N, H, W, C], found {:?} {:?}",
                path.display(),
                images.dtype(),
                shape
            );
        }
        if labels.dtype() != Dtype::I64 || labels.shape() != [shape[0]] {
            bail!("{}: `labels` must be int64 [N]", path.display());
        }
        let labels = labels
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let info = read_info(dir)?;
        Ok(ImageDataset {
            images: images.data().to_vec(),
            height: shape[1],
            width: shape[2],
            channels: shape[3],
            labels,
            classes: info.classes,
        })
    }

    /// Per-channel mean and standard deviation on [0, 1], accumulated in f64.
    pub fn channel_stats(&self) -> (Vec<f64>, Vec<f64>) {
        let c = self.channels;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        let mut counts = vec![[0u64; 256]; c];
        for (i, &v) in self.images.iter().enumerate() {
            counts[i % c][v as usize] += 1;
        }
        let total = (self.images.len() / c.max(1)) as f64;
        for ch in 0..c {
            for (v, &k) in counts[ch].iter().enumerate() {
                let x = v as f64 / 255.0;
                sum[ch] += k as f64 * x;
                sq[ch] += k as f64 * x * x;
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / total).collect();
        let std = sq.iter().zip(&mean).map(|(s, m)| (s / total - m * m).max(0.0).sqrt()).collect();
        (mean, std)
    }

    pub fn class_counts(&self) -> Vec<usize> {
        let k = self.classes.len().max(1);
        let mut counts = vec![0usize; k];
        for &l in &self.labels {
            if (l as usize) < k {
                counts[l as usize] += 1;
            }
        }
        counts
    }

    /// Metrics every image dataset stage reports.
    pub fn metrics(&self) -> serde_json::Value {
        let (mean, std) = self.channel_stats();
        serde_json::json!({
            "count": self.len(),
            "resolution": [self.height, self.width],
            "channels": self.channels,
            "num_classes": self.classes.len(),
            "channel_mean": mean,
            "channel_std": std,
            "class_counts": self.class_counts(),
        })
    }
}

/// 2-D points with integer labels (the mixture component for `gmm2d`).
#[derive(Debug, Clone, PartialEq)]
pub struct PointsDataset {
    pub points: Vec<[f32; 2]>,
    pub labels: Vec<i64>,
    pub classes: Vec<String>,
}

impl PointsDataset {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let n = self.points.len();
        let pts: Vec<u8> = self.points.iter().flat_map(|p| p.iter().flat_map(|v| v.to_le_bytes())).collect();
        let labels: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let tensors = [
            ("points", TensorView::new(Dtype::F32, vec![n, 2], &pts)?),
            ("labels", TensorView::new(Dtype::I64, vec![n], &labels)?),
        ];
        let path = dir.join(POINTS_FILE);
        safetensors::serialize_to_file(tensors, None::<HashMap<String, String>>, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        write_info(
            dir,
            &DatasetInfo {
                count: n,
                shape: vec![2],
                classes: self.classes.clone(),
            },
        )
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(POINTS_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        let pts = st
            .tensor("points")
            .with_context(|| format!("{}: no `points` tensor", path.display()))?;
        let labels = st
            .tensor("labels")
            .with_context(|| format!("{}: no `labels` tensor", path.display()))?;
        if pts.dtype() != Dtype::F32 || pts.shape().len() != 2 || pts.shape()[1] != 2 {
            bail!("{}: `points` must be f32 [N, 2]", path.display());
        }
        let vals: Vec<f32> = pts
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let points = vals.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        let labels = labels
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(PointsDataset {
            points,
            labels,
            classes: read_info(dir)?.classes,
        })
    }
}

fn write_info(dir: &Path, info: &DatasetInfo) -> Result<()> {
    let path = dir.join(INFO_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(info)?).with_context(|| format!("writing {}", path.display()))
}

pub fn read_info(dir: &Path) -> Result<DatasetInfo> {
    let path = dir.join(INFO_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dataset_round_trips_and_reports_stats() {
        let dir = tempfile::tempdir().unwrap();
        let ds = ImageDataset {
            images: vec![0, 255, 51, 255, 255, 51],
            height: 1,
            width: 1,
            channels: 3,
            labels: vec![1, 0],
            classes: vec!["a".into(), "b".into()],
        };
        ds.write(dir.path()).unwrap();
        let back = ImageDataset::read(dir.path()).unwrap();
        assert_eq!(back, ds);
        let (mean, std) = ds.channel_stats();
        assert!((mean[0] - 0.5).abs() < 1e-12 && (mean[1] - 1.0).abs() < 1e-12 && (mean[2] - 0.2).abs() < 1e-12);
        assert!((std[0] - 0.5).abs() < 1e-12 && std[1].abs() < 1e-12);
        assert_eq!(ds.class_counts(), vec![1, 1]);
    }
}
