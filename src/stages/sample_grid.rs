//! `sample-grid`: a PNG grid of samples from a denoiser stage with fixed seeds: one labelled row
//! per class for a conditional model (Figure 12 of the DMD paper), a plain grid otherwise.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
use crate::sample::{SamplerConfig, class_grid, sample};

fn d_columns() -> usize {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleGridParams {
    /// A denoiser stage (teacher or DMD generator).
    pub generator: String,
    /// An image dataset stage whose class names label the rows (optional).
    pub classes_from: Option<String>,
    #[serde(default)]
    pub sampler: SamplerConfig,
    #[serde(default = "d_columns")]
    pub columns: usize,
    /// Rows shown for a model with many classes (the first classes), default 10.
    pub rows: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// bf16 autocast for the generator on CUDA (off: fp32).
    #[serde(default)]
    pub bf16: bool,
}

impl Stage for SampleGridParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Report
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[
            ("generator", Some(&self.generator), &[ArtifactType::Denoiser]),
            ("classes_from", self.classes_from.as_ref(), &[ArtifactType::Images]),
        ])
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if let Err(e) = self.sampler.check() {
            return Err(FieldIssue::new("sampler", e));
        }
        if self.columns == 0 || self.columns > 64 {
            return Err(FieldIssue::new("columns", "columns must be in 1..=64"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let device = crate::torch_shim::device(&ctx.device)?;
        let net = crate::nn::load_denoiser_dir(ctx.upstream_dir("generator")?, device)?;
        let cfg = net.config.clone();
        let rows = self.rows.unwrap_or(10).min(cfg.label_dim().max(0) as usize);
        let names: Vec<String> = match &self.classes_from {
            Some(_) => crate::data::artifact::read_info(ctx.upstream_dir("classes_from")?)?.classes,
            None => (0..rows).map(|i| format!("class {i}")).collect(),
        };
        let names: Vec<String> = if cfg.label_dim() > 0 {
            names.into_iter().take(rows).collect()
        } else {
            Vec::new()
        };
        let grid = class_grid(
            cfg.img_resolution(),
            cfg.img_channels(),
            cfg.label_dim(),
            &names,
            self.columns,
            self.seed,
            device,
            |z, y| {
                let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.bf16).expect("autocast");
                sample(&net, z, y, &self.sampler)
            },
        );
        grid.save_png(&ctx.out_dir.join("grid.png"))?;
        Ok(
            serde_json::json!({ "rows": if names.is_empty() { self.columns } else { names.len() }, "columns": self.columns, "sampler_calls": self.sampler.network_calls(), "seed": self.seed }),
        )
    }
}
