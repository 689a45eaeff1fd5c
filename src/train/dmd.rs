//! Distribution Matching Distillation (Yin et al., CVPR 2024) in EDM's parameterisation.
//!
//! Generator: x = G(z, y) = D_G(sigma_max z; sigma_max, y). Per iteration:
//! - distribution matching: t uniform in [t_min, t_max) of a 1000-level Karras schedule,
//!   x_t = x + sigma_t eps, real = D_real(x_t), fake = D_fake(x_t) (no gradient),
//!   w = mean_{CHW} |x - real|, g = (fake - real) / w, loss_DM = 0.5 mean((x - sg(x - g))^2);
//! - regression on ODE pairs: loss_reg = d(G(z_ref), y_ref), weighted (0.25 in the paper);
//! - fake-score update on x detached: sigma over all levels, EDM-weighted denoising loss.
//!
//! DMD2 options: several fake updates per generator update, no regression.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::optim::{AdamW, ema_beta, ema_update};
use crate::artifact::checkpoint;
use crate::nn::Denoiser;
use crate::nn::gmm::GmmDenoiser;
use crate::sample::karras_sigmas;
use crate::torch_shim::AutocastBf16;

/// The frozen "real" score: a teacher network, or a closed-form denoiser in tests.
pub trait RealScore {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, labels: Option<&Tensor>) -> Tensor;
}

impl RealScore for Denoiser {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, labels: Option<&Tensor>) -> Tensor {
        self.denoise(x, sigma, labels, false)
    }
}

impl RealScore for GmmDenoiser {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, _labels: Option<&Tensor>) -> Tensor {
        self.denoise(x, sigma)
    }
}

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

/// Eager iterations before the capture (cuDNN autotuning and lazy allocations happen there).
const EAGER_BEFORE_CAPTURE: u64 = 3;

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

pub use crate::artifact::pairs::Pairs;

/// Rows [start, start + len) of a random batch of `global` pairs.
fn pair_batch(p: &Pairs, global: i64, (start, len): (i64, i64)) -> (Tensor, Option<Tensor>, Tensor) {
    let idx = Tensor::randint(p.len(), [global], (Kind::Int64, p.z.device())).narrow(0, start, len);
    (
        p.z.index_select(0, &idx),
        p.labels.as_ref().map(|l| l.index_select(0, &idx)),
        p.x.index_select(0, &idx),
    )
}

/// Real images on the training device for the GAN head: uint8 [N, C, H, W] and one-hot labels.
pub struct RealImages {
    pub images: Tensor,
    pub labels: Option<Tensor>,
}

impl RealImages {
    /// Rows [start, start + len) of a random batch of `global` images in [-1, 1] (device ops
    /// only, so it can be captured).
    fn batch(&self, global: i64, (start, len): (i64, i64)) -> (Tensor, Option<Tensor>) {
        let idx = Tensor::randint(self.images.size()[0], [global], (Kind::Int64, self.images.device())).narrow(0, start, len);
        let x = self.images.index_select(0, &idx).to_kind(Kind::Float) / 127.5 - 1.0;
        (x, self.labels.as_ref().map(|l| l.index_select(0, &idx)))
    }
}

/// The distribution-matching gradient g = (fake - real) / mean_{non-batch}|x - real|.
pub fn dm_gradient(x: &Tensor, real: &Tensor, fake: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    let w = (x - real).abs().mean_dim(dims.as_slice(), true, Kind::Float);
    (fake - real) / w.clamp_min(1e-12)
}

/// 0.5 mean((x - sg(x - g))^2): its gradient in x is g / numel.
pub fn dm_loss(x: &Tensor, g: &Tensor) -> Tensor {
    let target = (x.detach() - g).detach();
    (x - target).square().mean(Kind::Float) * 0.5
}

pub fn regression_loss(pred: &Tensor, target: &Tensor, kind: RegressionLoss, lpips: Option<&crate::nn::lpips::Lpips>) -> Tensor {
    match kind {
        RegressionLoss::Lpips => lpips
            .expect("LPIPS weights are loaded when regression_loss = \"lpips\"")
            .distance(pred, target)
            .mean(Kind::Float),
        RegressionLoss::L2 => (pred - target).square().mean(Kind::Float),
        RegressionLoss::PseudoHuber => {
            let c = 0.03;
            let dims: Vec<i64> = (1..pred.dim() as i64).collect();
            let mse = (pred - target).square().mean_dim(dims.as_slice(), false, Kind::Float);
            ((mse + c * c).sqrt() - c).mean(Kind::Float)
        }
    }
}

/// EDM-weighted denoising loss of the fake score on generator samples (detached).
pub fn fake_score_loss(fake: &Denoiser, x: &Tensor, labels: Option<&Tensor>, sigma: &Tensor, eps: &Tensor) -> Tensor {
    let sd = fake.config.sigma_data();
    let noisy = x + eps * sigma;
    let pred = fake.denoise(&noisy, sigma, labels, true);
    let lambda = (sigma.square() + sd * sd) / (sigma * sd).square();
    (lambda * (pred - x).square()).mean(Kind::Float)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DmdLogRow {
    pub iteration: u64,
    pub loss_dm: f64,
    pub loss_reg: f64,
    pub loss_fake: f64,
    pub grad_norm_g: f64,
    pub grad_norm_fake: f64,
    pub loss_gan_g: f64,
    pub loss_gan_d: f64,
    pub lr: f64,
    pub iterations_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DmdSummary {
    pub iterations: u64,
    pub seconds: f64,
    pub iterations_per_second: f64,
    pub resumed_from: u64,
    pub log: Vec<DmdLogRow>,
}

fn sorted_vars(net: &Denoiser) -> (Vec<String>, Vec<Tensor>) {
    let vars = net.vs.variables();
    let mut names: Vec<String> = vars.keys().cloned().collect();
    names.sort();
    let t = names.iter().map(|n| vars[n].shallow_clone()).collect();
    (names, t)
}

/// Trains the generator `generator` (and the fake score `fake`, both initialised from the teacher by
/// the caller) against `real`. Checkpoints into `work_dir` and resumes from it.
#[allow(clippy::too_many_arguments)]
pub fn dmd_train(
    real: &dyn RealScore,
    generator: &Denoiser,
    fake: &Denoiser,
    ema: Option<&Denoiser>,
    pairs: Option<&Pairs>,
    opts: &DmdOptions,
    work_dir: &Path,
    on_log: impl FnMut(&DmdLogRow),
) -> Result<DmdSummary> {
    dmd_train_with_grids(real, generator, fake, ema, pairs, opts, work_dir, on_log, None, None, None)
}

/// [`dmd_train`], calling `grids.1(iteration, generator)` every `grids.0` iterations.
#[allow(clippy::too_many_arguments)]
pub fn dmd_train_with_grids(
    real: &dyn RealScore,
    generator: &Denoiser,
    fake: &Denoiser,
    ema: Option<&Denoiser>,
    pairs: Option<&Pairs>,
    opts: &DmdOptions,
    work_dir: &Path,
    mut on_log: impl FnMut(&DmdLogRow),
    mut grids: Option<super::teacher::GridHook>,
    lpips: Option<&crate::nn::lpips::Lpips>,
    real_images: Option<&RealImages>,
) -> Result<DmdSummary> {
    if opts.regression_loss == RegressionLoss::Lpips && lpips.is_none() && opts.regression_weight > 0.0 {
        bail!("regression_loss = \"lpips\" needs LPIPS weights");
    }
    let (rank, world) = (crate::dist::rank(), crate::dist::world());
    // Every rank draws the random numbers of the whole global batch from the same stream and
    // keeps its own slice, so that a run does not depend on how its batch is split over GPUs
    // and micro-batches (up to summation order). Seeded before the GAN head is initialised,
    // so that a run is reproducible from its seed.
    tch::manual_seed(opts.seed as i64);
    let gan = opts.gan_generator_weight > 0.0;
    let head = match (gan, fake.bottleneck_channels(), real_images) {
        (false, _, _) => None,
        (true, None, _) => bail!("the GAN head needs a DDPM++ fake score (its encoder bottleneck)"),
        (true, _, None) => bail!("the GAN head needs real images (a dataset stage)"),
        (true, Some(c), Some(_)) => Some(super::gan::GanHead::new(c, generator.device())),
    };
    let opt_h = head
        .as_ref()
        .map(|h| AdamW::from_varstore(&h.vs, opts.betas, opts.eps, opts.weight_decay));
    let device = generator.device();
    let cuda = device.is_cuda();
    crate::torch_shim::set_tf32(cuda && opts.tf32);
    let opt_g = AdamW::new(generator, opts.betas, opts.eps, opts.weight_decay);
    let opt_f = AdamW::new(fake, opts.betas, opts.eps, opts.weight_decay);
    let mut sched = karras_sigmas(opts.levels, opts.sigma_min, opts.sigma_max, opts.rho);
    sched.pop();
    let sched = Tensor::from_slice(&sched).to_kind(Kind::Float).to_device(device);
    let shape = generator.config.sample_shape();
    let label_dim = generator.config.label_dim();
    // `batch` is global: each of the `world` ranks generates its share.
    let b = crate::dist::batch_share(opts.batch, world)? as i64;
    let accum = match (opts.micro_batch, opts.grad_accumulation) {
        (Some(_), n) if n > 1 => bail!("give either micro_batch or grad_accumulation, not both"),
        (Some(cap), _) => crate::dist::micro_batches(b as usize, Some(cap))? as i64,
        (None, n) => n.max(1) as i64,
    };
    if b % accum != 0 {
        bail!(
            "grad_accumulation = {accum} does not divide the batch per GPU ({b} = {} / {world})",
            opts.batch
        );
    }
    let mb = b / accum;
    let global = b * world as i64;
    let slice = (rank as i64 * b, b);
    let gshape: Vec<i64> = std::iter::once(global).chain(shape.iter().copied()).collect();
    let mut sshape = vec![b];
    sshape.extend(std::iter::repeat_n(1, shape.len()));
    let smax = Tensor::from(opts.sigma_max as f32).to_device(device);
    let ckpt = work_dir.join("dmd_checkpoint.safetensors");
    let mut it = 0u64;
    let mut log: Vec<DmdLogRow> = Vec::new();
    if ckpt.exists() {
        let (t, meta) = crate::artifact::tensors::read_safetensors(&ckpt)?;
        for (prefix, opt) in [("g", &opt_g), ("f", &opt_f)].into_iter().chain(opt_h.as_ref().map(|o| ("h", o))) {
            checkpoint::restore(&t, &format!("{prefix}.net."), &opt.names, &opt.params)?;
            checkpoint::restore(&t, &format!("{prefix}.m."), &opt.names, &opt.exp_avg)?;
            checkpoint::restore(&t, &format!("{prefix}.v."), &opt.names, &opt.exp_avg_sq)?;
            checkpoint::restore(&t, &format!("{prefix}.step."), &opt.names, &opt.steps)?;
        }
        if let Some(e) = ema {
            let (n, v) = sorted_vars(e);
            checkpoint::restore(&t, "ema.", &n, &v)?;
        }
        it = meta.get("iteration").and_then(|s| s.parse().ok()).unwrap_or(0);
        log = match meta.get("log") {
            Some(s) => serde_json::from_str(s).context("the checkpoint's DMD log")?,
            None => Vec::new(),
        };
        tracing::info!(iteration = it, "resumed DMD from checkpoint");
    }
    let resumed_from = it;
    let start = Instant::now();
    let mut window: Vec<Tensor> = Vec::new();
    let mut window_start = (Instant::now(), it);
    // Rows of an identity matrix rather than one_hot, whose range checks may read the device.
    let eye = (label_dim > 0).then(|| Tensor::eye(label_dim, (Kind::Float, device)));
    let mine = |t: Tensor| t.narrow(0, slice.0, slice.1);
    let labels = || {
        eye.as_ref()
            .map(|e| e.index_select(0, &mine(Tensor::randint(label_dim, [global], (Kind::Int64, device)))))
    };
    let generate = |z: &Tensor, y: Option<&Tensor>| -> Result<Tensor> {
        let _ac = AutocastBf16::new(cuda && opts.bf16)?;
        Ok(generator.denoise(&(z * opts.sigma_max), &smax, y, false))
    };
    let sigma_at = |lo: usize, hi: usize| {
        sched
            .index_select(0, &mine(Tensor::randint_low(lo as i64, hi as i64, [global], (Kind::Int64, device))))
            .reshape(sshape.as_slice())
    };
    let zero = Tensor::zeros([], (Kind::Float, device));
    // Learning rates live in device tensors so that a captured iteration follows the warm-up.
    let lr_g_t = Tensor::zeros([], (Kind::Float, device));
    let lr_f_t = Tensor::zeros([], (Kind::Float, device));
    let randn = || mine(Tensor::randn(gshape.as_slice(), (Kind::Float, device)));
    // Micro-batches of a pass: [i * mb, (i + 1) * mb) of the per-rank batch.
    let chunk = |t: &Tensor, i: i64| t.narrow(0, i * mb, mb);
    let chunk_opt = |t: Option<&Tensor>, i: i64| t.map(|t| chunk(t, i));
    // Logits of the GAN head for x noised at `sigma` with `eps`.
    let gan_logits = |h: &super::gan::GanHead, x: &Tensor, y: Option<&Tensor>, sigma: &Tensor, eps: &Tensor, train: bool| -> Tensor {
        let xt = x + eps * sigma;
        h.forward(&fake.bottleneck(&xt, sigma, y, train).expect("checked: DDPM++"))
    };
    // Fake-score update (plus the discriminator's, with the GAN head) on detached samples of the
    // whole per-rank batch: returns the fake-score loss, its gradient norm and the
    // discriminator loss. Its random numbers are drawn for the whole batch before the split.
    let fake_step = |x: &Tensor, y: Option<&Tensor>| -> Result<(Tensor, Tensor, Tensor)> {
        let (sigma, eps) = (sigma_at(0, opts.levels), randn());
        let gan = match (&head, real_images) {
            (Some(_), Some(r)) => {
                let (xr, yr) = r.batch(global, slice);
                Some((xr, yr, [sigma_at(0, opts.levels), randn(), sigma_at(0, opts.levels), randn()]))
            }
            _ => None,
        };
        opt_f.zero_grad();
        if let Some(o) = &opt_h {
            o.zero_grad();
        }
        let (mut loss_sum, mut d_sum) = (zero.shallow_clone(), zero.shallow_clone());
        for i in 0..accum {
            let (xi, yi) = (chunk(x, i), chunk_opt(y, i));
            let (loss, d) = {
                let _ac = AutocastBf16::new(cuda && opts.bf16)?;
                let loss = fake_score_loss(fake, &xi, yi.as_ref(), &chunk(&sigma, i), &chunk(&eps, i));
                match (&head, &gan) {
                    (Some(h), Some((xr, yr, [sf, ef, sr, er]))) => {
                        let lf = gan_logits(h, &xi, yi.as_ref(), &chunk(sf, i), &chunk(ef, i), true);
                        let yri = chunk_opt(yr.as_ref(), i);
                        let lr = gan_logits(h, &chunk(xr, i), yri.as_ref(), &chunk(sr, i), &chunk(er, i), true);
                        let d = super::gan::discriminator_loss(&lf, &lr);
                        (&loss + &d * opts.gan_discriminator_weight, d)
                    }
                    _ => (loss, zero.shallow_clone()),
                }
            };
            (&loss / accum as f64).backward();
            loss_sum = loss_sum + loss.detach();
            d_sum = d_sum + d.detach();
        }
        let gn = opt_f.step(&lr_f_t, opts.grad_clip)?.unwrap_or_else(|| zero.shallow_clone());
        if let Some(o) = &opt_h {
            o.step(&lr_f_t, opts.grad_clip)?;
        }
        Ok((loss_sum / accum as f64, gn, d_sum / accum as f64))
    };
    let regress = pairs.filter(|_| opts.regression_weight > 0.0);
    // Generator samples of the whole per-rank batch without gradient, a micro-batch at a time.
    let generate_detached = |z: &Tensor, y: Option<&Tensor>| -> Result<Tensor> {
        let parts = (0..accum)
            .map(|i| tch::no_grad(|| generate(&chunk(z, i), chunk_opt(y, i).as_ref())))
            .collect::<Result<Vec<_>>>()?;
        Ok(join_batches(parts))
    };
    // One DMD iteration, device work only (no host reads), so that it can be captured as a
    // CUDA graph. Returns [loss_dm, loss_reg, loss_fake, grad_norm_g, grad_norm_fake,
    // loss_gan_g, loss_gan_d]. With gradient accumulation every random number is drawn for the
    // whole per-rank batch before it is split, so k micro-batches of B/k compute exactly the
    // update of one batch of B (up to summation order).
    let iteration = || -> Result<Tensor> {
        for _ in 1..opts.fake_updates_per_g.max(1) {
            let y = labels();
            let x = generate_detached(&randn(), y.as_ref())?;
            let _ = fake_step(&x, y.as_ref())?;
        }
        let y = labels();
        let z = randn();
        let pair = regress.map(|p| pair_batch(p, global, slice));
        let (sigma_dm, eps_dm) = (sigma_at(opts.t_min_index, opts.t_max_index), randn());
        let gan_g = head.as_ref().map(|_| (sigma_at(0, opts.levels), randn()));
        opt_g.zero_grad();
        let mut sums = [zero.shallow_clone(), zero.shallow_clone(), zero.shallow_clone()];
        let mut xds = Vec::with_capacity(accum as usize);
        for i in 0..accum {
            let (zi, yi) = (chunk(&z, i), chunk_opt(y.as_ref(), i));
            // The generator sees its DM batch and its regression batch in one call (fewer launches).
            let (x, reg) = match &pair {
                Some((zr, yr, xr)) => {
                    let yri = chunk_opt(yr.as_ref(), i);
                    let yy = yi.as_ref().zip(yri.as_ref()).map(|(a, c)| Tensor::cat(&[a, c], 0));
                    let both = generate(&Tensor::cat(&[&zi, &chunk(zr, i)], 0), yy.as_ref())?;
                    (both.narrow(0, 0, mb), Some((both.narrow(0, mb, mb), chunk(xr, i))))
                }
                None => (generate(&zi, yi.as_ref())?, None),
            };
            let xd = x.detach();
            let g = tch::no_grad(|| -> Result<Tensor> {
                let sigma = chunk(&sigma_dm, i);
                let xt = &xd + chunk(&eps_dm, i) * &sigma;
                let _ac = AutocastBf16::new(cuda && opts.bf16 && !opts.score_fp32)?;
                let real_d = real.real_denoise(&xt, &sigma, yi.as_ref()).to_kind(Kind::Float);
                let fake_d = fake.denoise(&xt, &sigma, yi.as_ref(), false).to_kind(Kind::Float);
                Ok(dm_gradient(&xd, &real_d, &fake_d))
            })?;
            let loss_dm = dm_loss(&x, &g);
            let (mut loss, loss_reg) = match reg {
                Some((pred, target)) => {
                    let l = regression_loss(&pred, &target, opts.regression_loss, lpips);
                    (&loss_dm + &l * opts.regression_weight, l)
                }
                None => (loss_dm.shallow_clone(), zero.shallow_clone()),
            };
            // The generator's GAN loss flows through the fake score's encoder and the head; their
            // gradients from this pass are dropped by the fake step's zero_grad.
            let loss_gan_g = match (&head, &gan_g) {
                (Some(h), Some((sigma, eps))) => {
                    let _ac = AutocastBf16::new(cuda && opts.bf16)?;
                    let l = super::gan::generator_loss(&gan_logits(h, &x, yi.as_ref(), &chunk(sigma, i), &chunk(eps, i), false));
                    loss = loss + &l * opts.gan_generator_weight;
                    l
                }
                _ => zero.shallow_clone(),
            };
            (loss / accum as f64).backward();
            for (s, l) in sums.iter_mut().zip([loss_dm, loss_reg, loss_gan_g]) {
                *s = &*s + l.detach();
            }
            xds.push(xd);
        }
        let gn_g = opt_g.step(&lr_g_t, opts.grad_clip)?.unwrap_or_else(|| zero.shallow_clone());
        // Fake-score update on the same (detached) samples.
        let (loss_f, gn_f, loss_gan_d) = fake_step(&join_batches(xds), y.as_ref())?;
        let [dm, reg, gan_g] = sums.map(|s| s / accum as f64);
        Ok(Tensor::stack(
            &[dm, reg, loss_f, gn_g.reshape([]), gn_f.reshape([]), gan_g, loss_gan_d],
            0,
        ))
    };
    let mut runner = crate::cuda_graph::CapturedStep::new(opts.cuda_graph, cuda, EAGER_BEFORE_CAPTURE, "DMD iteration")?;
    // Every rank starts from rank 0's weights (they are copies of the same teacher anyway).
    for o in [Some(&opt_g), Some(&opt_f), opt_h.as_ref()].into_iter().flatten() {
        crate::dist::broadcast_from_main(&o.params)?;
    }
    let check_every = crate::dist::debug_check_every();
    let timed_out = || opts.max_seconds.is_some_and(|m| start.elapsed().as_secs_f64() >= m);
    let mut stop = false;
    while it < opts.iterations && !stop {
        let ramp = ((it + 1) as f64 / opts.warmup_steps.max(1) as f64).min(1.0);
        let lr = opts.lr * ramp;
        let lr_f = opts.fake_lr.unwrap_or(opts.lr) * ramp;
        let _ = lr_g_t.shallow_clone().fill_(lr);
        let _ = lr_f_t.shallow_clone().fill_(lr_f);
        super::rng::seed_step(opts.seed, it + 1);
        let stats = runner.run(&iteration)?;
        if let Some(e) = ema {
            let h = opts.ema_halflife_images.unwrap_or(0.0);
            ema_update(e, generator, ema_beta(opts.batch, (it + 1) * opts.batch as u64, h, None))?;
        }
        it += 1;
        if let Some((every, hook)) = grids.as_mut()
            && *every > 0
            && it.is_multiple_of(*every)
            && crate::dist::is_main()
        {
            hook(it, generator)?;
        }
        window.push(stats);
        // Ranks must agree on when to stop: in a group the time limit is read at log steps only.
        if world == 1 {
            stop = timed_out();
        }
        if it.is_multiple_of(opts.log_every) || it >= opts.iterations || stop {
            if world > 1 {
                stop = crate::dist::agree(timed_out())?;
                if check_every > 0 && it % check_every < opts.log_every {
                    crate::dist::check_identical(&opt_g.params, "generator parameters")?;
                    crate::dist::check_identical(&opt_f.params, "fake-score parameters")?;
                }
            }
            let stacked = crate::dist::mean_over_ranks(&Tensor::stack(&window, 0))?;
            let rows = Vec::<Vec<f64>>::try_from(stacked.to_kind(Kind::Double))?;
            if let Some(i) = rows.iter().position(|r| r[..3].iter().any(|v| !v.is_finite())) {
                let bad = it - rows.len() as u64 + i as u64 + 1;
                bail!(
                    "non-finite DMD loss {:?} at iteration {bad}; the last good checkpoint is kept in {}",
                    &rows[i][..3],
                    ckpt.display()
                );
            }
            let n = rows.len() as f64;
            let mean = |k: usize| rows.iter().map(|r| r[k]).sum::<f64>() / n;
            let rate = (it - window_start.1) as f64 / window_start.0.elapsed().as_secs_f64().max(1e-9);
            let row = DmdLogRow {
                iteration: it,
                loss_dm: mean(0),
                loss_reg: mean(1),
                loss_fake: mean(2),
                grad_norm_g: mean(3),
                grad_norm_fake: mean(4),
                loss_gan_g: mean(5),
                loss_gan_d: mean(6),
                lr,
                iterations_per_second: rate,
            };
            on_log(&row);
            log.push(row);
            window.clear();
            window_start = (Instant::now(), it);
            if it % opts.checkpoint_every < opts.log_every && crate::dist::is_main() {
                save(&ckpt, &opt_g, &opt_f, opt_h.as_ref(), ema, it, &log)?;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(DmdSummary {
        iterations: it,
        seconds,
        iterations_per_second: (it - resumed_from) as f64 / seconds.max(1e-9),
        resumed_from,
        log,
    })
}

/// Micro-batches back into one batch (no copy when there is only one).
fn join_batches(mut parts: Vec<Tensor>) -> Tensor {
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// Everything the remaining iterations depend on: both networks, their optimisers, the GAN
/// head, the EMA and the log so far (random numbers come from the iteration number).
fn save(path: &Path, g: &AdamW, f: &AdamW, h: Option<&AdamW>, ema: Option<&Denoiser>, it: u64, log: &[DmdLogRow]) -> Result<()> {
    let mut t = Vec::new();
    for (prefix, opt) in [("g", g), ("f", f)].into_iter().chain(h.map(|o| ("h", o))) {
        for (i, n) in opt.names.iter().enumerate() {
            t.push((format!("{prefix}.net.{n}"), opt.params[i].shallow_clone()));
            t.push((format!("{prefix}.m.{n}"), opt.exp_avg[i].shallow_clone()));
            t.push((format!("{prefix}.v.{n}"), opt.exp_avg_sq[i].shallow_clone()));
            t.push((format!("{prefix}.step.{n}"), opt.steps[i].shallow_clone()));
        }
    }
    if let Some(e) = ema {
        let (names, vars) = sorted_vars(e);
        for (n, v) in names.into_iter().zip(vars) {
            t.push((format!("ema.{n}"), v));
        }
    }
    let meta = HashMap::from([
        ("iteration".to_string(), it.to_string()),
        ("log".to_string(), serde_json::to_string(log)?),
    ]);
    checkpoint::save(path, &t, meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_gradient_follows_the_formula_and_the_loss_gradient_is_g_over_numel() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5])
            .reshape([2, 2])
            .set_requires_grad(true);
        let real = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0]).reshape([2, 2]);
        let fake = Tensor::from_slice(&[0.5f32, 0.0, 1.0, 1.0]).reshape([2, 2]);
        let g = dm_gradient(&x.detach(), &real, &fake);
        // sample 0: w = (|1-0| + |2-1|)/2 = 1; sample 1: w = (1 + 0.5)/2 = 0.75
        let expect = [0.5f32, -1.0, 1.0 / 0.75, 1.0 / 0.75];
        let got = Vec::<f32>::try_from(g.flatten(0, -1)).unwrap();
        for (a, b) in got.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        let loss = dm_loss(&x, &g);
        loss.backward();
        let grad = Vec::<f32>::try_from(x.grad().flatten(0, -1)).unwrap();
        for (a, b) in grad.iter().zip(expect) {
            assert!((a - b / 4.0).abs() < 1e-6, "{grad:?}");
        }
    }

    #[test]
    fn ranks_slices_of_a_global_pair_batch_make_up_the_one_gpu_batch() {
        let pairs = Pairs {
            z: Tensor::arange(100, (Kind::Float, tch::Device::Cpu)).reshape([100, 1]),
            labels: None,
            x: Tensor::arange(100, (Kind::Float, tch::Device::Cpu)).reshape([100, 1]) * 2.0,
        };
        tch::manual_seed(7);
        let (whole, _, xw) = pairs.batch(8, (0, 8));
        // Two ranks, each from the same seed, each keeping its half.
        let halves: Vec<Tensor> = (0..2)
            .map(|r| {
                tch::manual_seed(7);
                pairs.batch(8, (r * 4, 4)).0
            })
            .collect();
        assert!(Tensor::cat(&halves, 0).equal(&whole));
        assert!(xw.equal(&(&whole * 2.0)), "z and x rows stay paired");
        assert!(whole.unique_dim(0, false, false, false).0.size()[0] > 1, "a real random batch");
    }

    #[test]
    fn pseudo_huber_is_small_quadratic_and_large_linear() {
        let a = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
        let small = regression_loss(&(&a + 0.001), &a, RegressionLoss::PseudoHuber, None).double_value(&[]);
        assert!((small - ((1e-6f64 + 0.0009).sqrt() - 0.03)).abs() < 1e-7, "{small}");
        let big = regression_loss(&(&a + 10.0), &a, RegressionLoss::PseudoHuber, None).double_value(&[]);
        assert!((big - ((100.0f64 + 0.0009).sqrt() - 0.03)).abs() < 1e-6);
    }
}
