//! `subset`: a smaller image dataset from a larger one: the first N per class, or a seeded
//! random sample (for quick runs and class-balanced evaluation sets).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
use crate::data::artifact::ImageDataset;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubsetParams {
    /// The image dataset stage to draw from.
    pub dataset: String,
    /// Images per class (class-balanced); exactly one of `per_class` and `count`.
    pub per_class: Option<usize>,
    /// Total images, drawn at random with `seed`.
    pub count: Option<usize>,
    #[serde(default)]
    pub seed: u64,
}

impl Stage for SubsetParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Images
    }
    fn upstream(&self) -> Vec<Upstream> {
        vec![Upstream {
            role: "dataset",
            stage: self.dataset.clone(),
            accepts: &[ArtifactType::Images],
        }]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        match (self.per_class, self.count) {
            (Some(0), _) | (_, Some(0)) => Err(FieldIssue::new(
                if self.count == Some(0) { "count" } else { "per_class" },
                "must be at least 1",
            )),
            (Some(_), Some(_)) => Err(FieldIssue::new("count", "give either `per_class` or `count`, not both")),
            (None, None) => Err(FieldIssue::new("dataset", "a subset needs `per_class` or `count`")),
            _ => Ok(()),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let src = ImageDataset::read(ctx.upstream_dir("dataset")?)?;
        let chosen: Vec<usize> = if let Some(k) = self.per_class {
            let mut taken = vec![0usize; src.classes.len().max(1)];
            let mut idx = Vec::new();
            for (i, &l) in src.labels.iter().enumerate() {
                let last = taken.len() - 1;
                let slot = &mut taken[(l as usize).min(last)];
                if *slot < k {
                    *slot += 1;
                    idx.push(i);
                }
            }
            if let Some((c, n)) = taken.iter().enumerate().find(|(_, n)| **n < k) {
                anyhow::bail!("class {c} has only {n} images, fewer than per_class = {k}");
            }
            idx
        } else {
            let n = self.count.unwrap_or(0);
            anyhow::ensure!(n <= src.len(), "count = {n} exceeds the {} images of the dataset", src.len());
            let mut idx: Vec<usize> = (0..src.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed));
            idx.truncate(n);
            idx.sort_unstable();
            idx
        };
        let mut images = Vec::with_capacity(chosen.len() * src.image_bytes());
        for &i in &chosen {
            images.extend_from_slice(src.image(i));
        }
        let ds = ImageDataset {
            images,
            height: src.height,
            width: src.width,
            channels: src.channels,
            labels: chosen.iter().map(|&i| src.labels[i]).collect(),
            classes: src.classes.clone(),
        };
        ds.write(&ctx.out_dir)?;
        Ok(ds.metrics())
    }
}
