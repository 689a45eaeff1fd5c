//! What a DMD run is asked to do: every option, with the paper's defaults.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RegressionLoss {
    /// Mean squared error (the paper's ablation: FID 2.78 vs 2.66 with LPIPS).
    #[default]
    L2,
    /// sqrt(mean((a - b)^2) + c^2) - c per sample, c = 0.03.
    PseudoHuber,
    /// LPIPS-VGG on images upsampled to 224 (the paper's choice); needs LPIPS weights.
    Lpips,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DmdOptions {
    /// The global generator batch (the paper's 392 = 56 per GPU on 7 GPUs): split over the GPUs
    /// the stage runs on, each GPU's share computed in micro-batches (see `micro_batch`) whose
    /// gradients are summed, so a step does not depend on the GPU count.
    pub batch: usize,
    /// Largest batch one GPU computes at once (a memory cap): the stage picks the fewest
    /// micro-batches of at most this size that split its share evenly.
    pub micro_batch: Option<usize>,
    pub iterations: u64,
    /// Also stop after this many seconds, if given.
    pub max_seconds: Option<f64>,
    pub lr: f64,
    /// Learning rate of the fake score (default: `lr`).
    pub fake_lr: Option<f64>,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Linear learning-rate warm-up, in iterations.
    pub warmup_steps: u64,
    /// Global gradient-norm clip for both networks.
    pub grad_clip: f64,
    /// Weight of the regression loss on ODE pairs (0: DMD2's "no regression").
    pub regression_weight: f64,
    pub regression_loss: RegressionLoss,
    /// Fake-score updates per generator update (DMD2's two time-scale rule: 5).
    pub fake_updates_per_g: usize,
    /// Micro-batches per update, as an explicit count instead of `micro_batch`.
    pub grad_accumulation: usize,
    pub levels: usize,
    pub t_min_index: usize,
    pub t_max_index: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub rho: f64,
    pub bf16: bool,
    /// Evaluate the real and fake scores for the distribution-matching gradient in fp32 even
    /// when the generator runs in bf16: g is a small difference of two close denoiser outputs
    /// (equal at initialisation), which bf16 rounding would swamp.
    pub score_fp32: bool,
    pub tf32: bool,
    pub seed: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
    /// EMA of the generator with this half-life in images, reported beside the raw generator.
    pub ema_halflife_images: Option<f64>,
    /// DMD2's GAN head on the fake score's bottleneck: weight of the generator's
    /// non-saturating GAN loss (0: off; DMD2 uses 3e-3). Needs real images (a dataset stage).
    pub gan_generator_weight: f64,
    /// Weight of the discriminator loss, added to the fake-score loss (DMD2: 1e-2).
    pub gan_discriminator_weight: f64,
    /// On CUDA, capture the whole iteration as a CUDA graph and replay it (small networks are
    /// launch-bound: this is what makes short runs fast). Ignored on the CPU.
    pub cuda_graph: bool,
}

impl Default for DmdOptions {
    fn default() -> Self {
        DmdOptions {
            batch: 56,
            micro_batch: None,
            iterations: 300_000,
            max_seconds: None,
            lr: 5e-5,
            fake_lr: None,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            warmup_steps: 500,
            grad_clip: 10.0,
            regression_weight: 0.25,
            regression_loss: RegressionLoss::L2,
            fake_updates_per_g: 1,
            grad_accumulation: 1,
            levels: 1000,
            t_min_index: 20,
            t_max_index: 980,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
            bf16: true,
            score_fp32: true,
            tf32: true,
            seed: 0,
            log_every: 10,
            checkpoint_every: 500,
            ema_halflife_images: None,
            gan_generator_weight: 0.0,
            gan_discriminator_weight: 1e-2,
            cuda_graph: true,
        }
    }
}
