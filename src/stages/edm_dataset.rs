//! `edm-dataset`: a dataset EDM's `dataset_tool.py` already prepared (its `--dest` zip or
//! folder, e.g. `imagenet-64x64.zip`), read as EDM's training loop reads it.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext};

fn default_max_side() -> u32 {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdmDatasetParams {
    /// EDM's dataset zip (or the folder `--dest` wrote), with its `dataset.json`.
    pub source: PathBuf,
    /// Keep the class labels of `dataset.json` (false: an unconditional dataset, every label 0).
    #[serde(default = "super::yes")]
    pub labels: bool,
    /// Keep only the first images (in file-name order), e.g. for a quick run.
    pub max_images: Option<usize>,
    /// Images wider or taller than this are refused before they are decoded.
    #[serde(default = "default_max_side")]
    pub max_side: u32,
}

impl Stage for EdmDatasetParams {
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
        if self.max_images == Some(0) {
            return Err(FieldIssue::new("max_images", "max_images must be at least 1"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let source = ctx.input("source")?.to_path_buf();
        let bar = ctx.progress.clone();
        let mut ds = crate::data::edm_archive::read_edm_dataset(&source, self.max_images, self.max_side, &|| bar.inc(1))?;
        if !self.labels {
            ds.labels.iter_mut().for_each(|l| *l = 0);
            ds.classes.clear();
        }
        ds.write(&ctx.out_dir)?;
        Ok(ds.metrics())
    }
}
