//! `dmd`: distils a teacher stage into a one-step generator (Distribution Matching
//! Distillation), optionally with the regression loss on an `ode-pairs` stage. Writes the
//! generator as a denoiser artifact (sample it with `solver = "onestep"`), the losses, grad
//! norms and learning rate per log step (CSV + plot), and a class-labelled grid (images) or a
//! teacher-vs-student scatter plot (2-D data).

mod evaluate;
mod networks;
mod report;
mod run;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
pub use crate::eval::energy::energy_distance;
use crate::train::dmd::DmdOptions;

fn d_columns() -> usize {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DmdParams {
    /// The teacher (the frozen real score; also the initial generator and fake score).
    pub teacher: String,
    /// ODE pairs for the regression loss (omit, or set regression_weight = 0, to train without).
    pub pairs: Option<String>,
    /// A dataset stage: class names for the grid; for 2-D data, the reference for the energy
    /// distance and the scatter plot.
    pub dataset: Option<String>,
    #[serde(default)]
    pub train: DmdOptions,
    #[serde(default = "d_columns")]
    pub grid_columns: usize,
    /// Also draw a one-step grid every this many iterations (into `progress/` of the output).
    pub grid_every: Option<u64>,
    /// LPIPS-VGG weights (safetensors, names in `nn::lpips`) for `regression_loss = "lpips"`.
    pub lpips_weights: Option<std::path::PathBuf>,
    /// torchvision's VGG16 checkpoint (`vgg16-397923af.pth`) for `regression_loss = "lpips"`,
    /// with `lpips_heads`.
    pub lpips_backbone: Option<std::path::PathBuf>,
    /// The `lpips` package's v0.1 linear heads (`lpips/weights/v0.1/vgg.pth`).
    pub lpips_heads: Option<std::path::PathBuf>,
    /// FID of the one-step generator during training (the FID-vs-iterations curve; with
    /// `train.ema_halflife_images`, also of the EMA generator).
    pub eval: Option<DmdEval>,
    /// Which generator is the stage's output when `train.ema_halflife_images` is set: the EMA
    /// (`true`) or the raw one; the other is saved beside it.
    #[serde(default)]
    pub export_ema: bool,
}

fn d_eval_samples() -> usize {
    5000
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DmdEval {
    /// The `fid-ref` stage with the reference statistics.
    pub reference: String,
    pub inception: std::path::PathBuf,
    /// Evaluate before training, every this many iterations, and at the end.
    pub every: u64,
    /// Samples per evaluation (class-balanced, seeds `seed`..`seed + num_samples`); fewer than
    /// the final FID's 50k, so the curve reads high by a roughly constant offset.
    #[serde(default = "d_eval_samples")]
    pub num_samples: usize,
    #[serde(default)]
    pub seed: u64,
}

impl Stage for DmdParams {
    fn data_parallel(&self) -> bool {
        true
    }
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Denoiser
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[
            ("teacher", Some(&self.teacher), &[ArtifactType::Denoiser]),
            ("pairs", self.pairs.as_ref(), &[ArtifactType::Pairs]),
            ("dataset", self.dataset.as_ref(), &[ArtifactType::Images, ArtifactType::Points2d]),
            ("fid_reference", self.eval.as_ref().map(|e| &e.reference), &[ArtifactType::FidStats]),
        ])
    }
    fn input_paths(&self) -> Vec<super::InputPath> {
        let files = [
            ("lpips_weights", &self.lpips_weights),
            ("lpips_backbone", &self.lpips_backbone),
            ("lpips_heads", &self.lpips_heads),
        ];
        let mut v: Vec<super::InputPath> = files
            .into_iter()
            .filter_map(|(role, p)| p.clone().map(|path| super::InputPath { role, path }))
            .collect();
        if let Some(e) = &self.eval {
            v.push(super::InputPath {
                role: "inception",
                path: e.inception.clone(),
            });
        }
        v
    }
    fn latent_seeds(&self) -> Vec<super::LatentSeeds> {
        self.eval
            .iter()
            .map(|e| super::LatentSeeds {
                field: "eval",
                purpose: super::SeedUse::Evaluation,
                seeds: e.seed..e.seed.saturating_add(e.num_samples as u64),
            })
            .collect()
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        let t = &self.train;
        let torch_files = self.lpips_backbone.is_some() as u8 + self.lpips_heads.is_some() as u8;
        if torch_files == 1 {
            return Err(FieldIssue::new("lpips_backbone", "give both `lpips_backbone` and `lpips_heads`"));
        }
        if t.regression_loss == crate::train::dmd::RegressionLoss::Lpips && self.lpips_weights.is_none() && torch_files == 0 {
            return Err(FieldIssue::new("train", "regression_loss = \"lpips\" needs `lpips_backbone` and `lpips_heads` (or `lpips_weights`)")
                .help("lpips_backbone = torchvision's vgg16-397923af.pth and lpips_heads = the lpips package's weights/v0.1/vgg.pth (or lpips_weights, one safetensors file)"));
        }
        if t.checkpoint_every == 0 || t.log_every == 0 || t.micro_batch == Some(0) {
            return Err(FieldIssue::new(
                "train",
                "train.checkpoint_every, train.log_every and train.micro_batch must be at least 1",
            ));
        }
        if t.batch == 0 || t.fake_updates_per_g == 0 {
            return Err(FieldIssue::new(
                "train",
                "train.batch and train.fake_updates_per_g must be at least 1",
            ));
        }
        if !(t.t_min_index < t.t_max_index && t.t_max_index <= t.levels) {
            return Err(FieldIssue::new(
                "train",
                format!(
                    "need t_min_index < t_max_index <= levels (got {} < {} <= {})",
                    t.t_min_index, t.t_max_index, t.levels
                ),
            ));
        }
        if t.gan_generator_weight > 0.0 && self.dataset.is_none() {
            return Err(FieldIssue::new(
                "train",
                "train.gan_generator_weight > 0 (DMD2's GAN head) needs `dataset` for real images",
            ));
        }
        if self.export_ema && t.ema_halflife_images.is_none() {
            return Err(FieldIssue::new("export_ema", "export_ema needs train.ema_halflife_images"));
        }
        if let Some(e) = &self.eval
            && (e.every == 0 || e.num_samples < 2)
        {
            return Err(FieldIssue::new(
                "eval",
                "eval.every must be at least 1 and eval.num_samples at least 2",
            ));
        }
        if t.regression_weight > 0.0 && self.pairs.is_none() {
            return Err(
                FieldIssue::new("teacher", "train.regression_weight > 0 needs `pairs` (an ode-pairs stage)")
                    .help("add pairs = \"<ode-pairs stage>\", or set train.regression_weight = 0"),
            );
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        run::run(self, ctx)
    }
}
