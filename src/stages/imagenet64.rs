//! `imagenet64`: the downsampled ImageNet 64x64 of Chrabaszcz et al. 2017, as its `.npz`
//! batches (`data`: uint8 [N, 12288] in CHW order; `labels`: 1-based class indices).

use std::path::PathBuf;

use anyhow::{Context, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext};
use crate::data::artifact::ImageDataset;
use crate::data::npy;

fn default_files() -> Vec<String> {
    (1..=10).map(|i| format!("train_data_batch_{i}.npz")).collect()
}
fn default_resolution() -> usize {
    64
}
fn default_classes() -> usize {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Imagenet64Params {
    /// Directory holding the `.npz` batches.
    pub source: PathBuf,
    /// Batch files to read, in order. Default: `train_data_batch_1..10.npz`.
    #[serde(default = "default_files")]
    pub files: Vec<String>,
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    #[serde(default = "default_classes")]
    pub num_classes: usize,
    /// Keep at most this many images (the first ones), e.g. for a quick run.
    pub limit: Option<usize>,
}

impl Stage for Imagenet64Params {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Images
    }
    fn input_paths(&self) -> Vec<InputPath> {
        vec![InputPath::source(&self.source)]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if self.files.is_empty() {
            return Err(FieldIssue::new("files", "`files` is empty"));
        }
        if !(1..=1024).contains(&self.resolution) {
            return Err(FieldIssue::new("resolution", "resolution must be in 1..=1024"));
        }
        if self.num_classes == 0 {
            return Err(FieldIssue::new("num_classes", "`num_classes` must be at least 1"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let dir = ctx.input("source")?.to_path_buf();
        let r = self.resolution;
        let per = 3 * r * r;
        let mut images = Vec::new();
        let mut labels = Vec::new();
        ctx.progress.set_length(self.files.len() as u64);
        for file in &self.files {
            let path = dir.join(file);
            if !path.exists() {
                bail!("ImageNet-64 batch {} does not exist", path.display());
            }
            let arrays = npy::read_npz(&path, &["data", "labels"])?;
            let (data, lab) = (&arrays[0], &arrays[1]);
            let npy::NpyData::U8(bytes) = &data.data else {
                bail!("{}: `data` must be uint8", path.display())
            };
            if data.shape.len() != 2 || data.shape[1] != per {
                bail!(
                    "{}: `data` has shape {:?}, expected [N, {per}] for resolution {r}",
                    path.display(),
                    data.shape
                );
            }
            let lab = lab.to_i64().with_context(|| format!("{}: `labels`", path.display()))?;
            if lab.len() != data.shape[0] {
                bail!("{}: {} labels for {} images", path.display(), lab.len(), data.shape[0]);
            }
            for (i, &l) in lab.iter().enumerate() {
                if l < 1 || l as usize > self.num_classes {
                    bail!("{}: label {l} of image {i} is outside 1..={}", path.display(), self.num_classes);
                }
                let chw = &bytes[i * per..(i + 1) * per];
                for p in 0..r * r {
                    for c in 0..3 {
                        images.push(chw[c * r * r + p]);
                    }
                }
                labels.push(l - 1);
                if self.limit.is_some_and(|n| labels.len() >= n) {
                    break;
                }
            }
            ctx.progress.inc(1);
            if self.limit.is_some_and(|n| labels.len() >= n) {
                break;
            }
        }
        let ds = ImageDataset {
            images,
            height: r,
            width: r,
            channels: 3,
            labels,
            classes: (0..self.num_classes).map(|i| format!("class{i}")).collect(),
        };
        ds.write(&ctx.out_dir)?;
        Ok(ds.metrics())
    }
}
