//! The EDM training loop: sigma ~ logN(P_mean, P_std), loss weight (s^2 + sd^2) / (s sd)^2,
//! Adam with a linear warm-up, EMA with a half-life in images, checkpoints and resume.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::augment::{AugmentDraws, AugmentOptions, augment};
use super::device_data::TrainData;
use super::optim::{AdamW, ema_beta, ema_update};
use crate::artifact::checkpoint;
use crate::nn::Denoiser;
use crate::torch_shim::AutocastBf16;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// The global batch: split over the GPUs the stage runs on, each GPU's share computed in
    /// micro-batches of at most `micro_batch` whose gradients are summed.
    pub batch: usize,
    /// Largest batch one GPU computes at once (a memory cap; the result does not depend on it).
    pub micro_batch: Option<usize>,
    /// Stop after this many training images.
    pub images: u64,
    /// Also stop after this many seconds of training (a wall-clock budget), if given.
    pub max_seconds: Option<f64>,
    pub lr: f64,
    pub lr_warmup_images: u64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub ema_halflife_images: f64,
    /// Limit the EMA half-life to this fraction of the images seen so far (EDM: 0.05).
    pub ema_rampup: Option<f64>,
    pub p_mean: f64,
    pub p_std: f64,
    /// Random horizontal flips of the dataset (unlabelled; EDM's `--xflip`).
    pub xflip: bool,
    /// EDM's non-leaking augmentation (`augment = { p = 0.12 }`: EDM's CIFAR-10 setting); the
    /// network's `augment_dim` must equal its label count (9).
    pub augment: Option<AugmentOptions>,
    pub seed: u64,
    /// bf16 autocast on CUDA (f32 on CPU).
    pub bf16: bool,
    /// TF32 matmuls and convolutions on CUDA.
    pub tf32: bool,
    pub checkpoint_every: u64,
    /// Steps between loss reads (and NaN checks).
    pub log_every: u64,
    /// On CUDA, capture the training step (data, loss, backward, Adam) as a CUDA graph after
    /// three eager steps and replay it; the EMA update stays eager. Off by default: measured for
    /// the DMD iteration, not yet for teacher training (`bench gpu` times both ways).
    pub cuda_graph: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            batch: 512,
            micro_batch: None,
            images: 200_000_000,
            max_seconds: None,
            lr: 1e-3,
            lr_warmup_images: 10_000_000,
            betas: (0.9, 0.999),
            eps: 1e-8,
            ema_halflife_images: 500_000.0,
            ema_rampup: Some(0.05),
            p_mean: -1.2,
            p_std: 1.2,
            xflip: true,
            augment: None,
            seed: 0,
            bf16: true,
            tf32: true,
            checkpoint_every: 1000,
            log_every: 10,
            cuda_graph: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub images: u64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub final_loss: f64,
    /// (images seen, mean loss over the log window).
    pub loss_curve: Vec<(u64, f64)>,
    pub resumed_from_step: u64,
}

/// EDM's loss for one batch (weighted squared error summed per image, averaged over the batch),
/// and the per-element mean for logging.
pub fn edm_loss(net: &Denoiser, y: &Tensor, labels: Option<&Tensor>, p_mean: f64, p_std: f64, train: bool) -> (Tensor, Tensor) {
    let noise = EdmNoise::draw(y, p_mean, p_std);
    let (sum, mean) = edm_loss_sum(net, y, labels, None, &noise, train);
    (sum / y.size()[0] as f64, mean)
}

/// The random numbers of EDM's loss for a batch: per-image sigma and the noise.
pub struct EdmNoise {
    pub sigma: Tensor,
    pub noise: Tensor,
}

impl EdmNoise {
    pub fn draw(y: &Tensor, p_mean: f64, p_std: f64) -> Self {
        let mut shape = vec![y.size()[0]];
        shape.extend(std::iter::repeat_n(1, y.dim() - 1));
        let sigma = (Tensor::randn(shape.as_slice(), (Kind::Float, y.device())) * p_std + p_mean).exp();
        EdmNoise {
            sigma,
            noise: Tensor::randn_like(y),
        }
    }
    /// Rows [start, start + len).
    pub fn narrow(&self, start: i64, len: i64) -> Self {
        EdmNoise {
            sigma: self.sigma.narrow(0, start, len),
            noise: self.noise.narrow(0, start, len),
        }
    }
}

/// EDM's weighted squared error summed over a (micro-)batch with given random numbers (and the
/// augmentation labels of `y`, if augmented), and its per-element mean for logging.
pub fn edm_loss_sum(
    net: &Denoiser,
    y: &Tensor,
    labels: Option<&Tensor>,
    augment_labels: Option<&Tensor>,
    noise: &EdmNoise,
    train: bool,
) -> (Tensor, Tensor) {
    let sd = net.config.sigma_data();
    let sigma = &noise.sigma;
    let weight = (sigma.square() + sd * sd) / (sigma * sd).square();
    let noisy = y + &noise.noise * sigma;
    let d = net.denoise_aug(&noisy, sigma, labels, augment_labels, train);
    let per = weight * (d - y).square();
    let mean = per.mean(Kind::Float).detach();
    (per.sum(Kind::Float), mean)
}

/// Every rank starts from rank 0's weights (network and EMA).
fn start_from_main_weights(opt: &AdamW, ema: &Denoiser) -> Result<()> {
    crate::dist::broadcast_from_main(&opt.params)?;
    let ema_weights: Vec<Tensor> = ema.vs.variables().into_values().filter(|t| t.is_floating_point()).collect();
    crate::dist::broadcast_from_main(&ema_weights)
}

/// The batch augmented with EDM's pipeline, and its augmentation labels, when asked for.
fn augmented(y: Tensor, options: Option<&AugmentOptions>) -> (Tensor, Option<Tensor>) {
    match options {
        Some(a) => {
            let (y, labels) = augment(&y, a, &AugmentDraws::draw(y.size()[0], y.device()));
            (y, Some(labels))
        }
        None => (y, None),
    }
}

/// Trains `net` (and its EMA `ema`) on `data`; checkpoints into `work_dir` and resumes from it.
/// `on_log` sees (step, images, loss, images/s) at each log point.
pub fn train(
    net: &Denoiser,
    ema: &Denoiser,
    data: &dyn TrainData,
    opts: &TrainOptions,
    work_dir: &Path,
    on_log: impl FnMut(u64, u64, f64, f64),
) -> Result<TrainSummary> {
    train_with_grids(net, ema, data, opts, work_dir, on_log, None)
}

/// A callback run every N steps with the EMA network (e.g. to draw a sample grid).
pub type GridHook<'a> = (u64, &'a mut dyn FnMut(u64, &Denoiser) -> Result<()>);

/// [`train`], calling `grids.1(step, ema)` every `grids.0` steps.
pub fn train_with_grids(
    net: &Denoiser,
    ema: &Denoiser,
    data: &dyn TrainData,
    opts: &TrainOptions,
    work_dir: &Path,
    mut on_log: impl FnMut(u64, u64, f64, f64),
    mut grids: Option<GridHook>,
) -> Result<TrainSummary> {
    let cuda = net.device().is_cuda();
    crate::torch_shim::set_tf32(cuda && opts.tf32);
    let (rank, world) = (crate::dist::rank(), crate::dist::world());
    tch::manual_seed(crate::dist::rank_seed(opts.seed, rank) as i64);
    let opt = AdamW::new(net, opts.betas, opts.eps, 0.0);
    start_from_main_weights(&opt, ema)?;
    let ema_names: Vec<String> = sorted_names(ema);
    let ckpt_path = work_dir.join("checkpoint.safetensors");
    let (mut step, mut images, mut curve) = match ckpt_path.exists() {
        true => restore_checkpoint(&ckpt_path, &opt, ema, &ema_names)?,
        false => (0, 0, Vec::new()),
    };
    let resumed_from_step = step;
    let start = Instant::now();
    let mut window = Vec::new();
    let mut window_start = (Instant::now(), images);
    let mut last_loss = f64::NAN;
    // `batch` is global: each of the `world` ranks trains on its share.
    let b = crate::dist::batch_share(opts.batch, world)? as i64;
    // Each GPU's share in micro-batches; every random number is drawn for the whole share
    // first, so the step equals one batch of `b` up to summation order.
    let micro = crate::dist::micro_batches(b as usize, opts.micro_batch)? as i64;
    let mb = b / micro;
    let check_every = crate::dist::debug_check_every();
    let mut stop = false;
    // The learning rate lives in a device tensor so that a captured step follows the warm-up.
    let lr_t = Tensor::zeros([], (Kind::Float, net.device()));
    // One training step, device work only (no host reads): it can be captured as a CUDA graph.
    let train_step = || -> Result<Tensor> {
        opt.zero_grad();
        let (y, labels) = data.batch(b, opts.xflip);
        let (y, augment_labels) = augmented(y, opts.augment.as_ref());
        let noise = EdmNoise::draw(&y, opts.p_mean, opts.p_std);
        let mut means = Vec::with_capacity(micro as usize);
        for i in 0..micro {
            let rows = |t: &Tensor| t.narrow(0, i * mb, mb);
            let (sum, mean) = {
                let _ac = AutocastBf16::new(cuda && opts.bf16)?;
                let aug = augment_labels.as_ref().map(rows);
                edm_loss_sum(
                    net,
                    &rows(&y),
                    labels.as_ref().map(rows).as_ref(),
                    aug.as_ref(),
                    &noise.narrow(i * mb, mb),
                    true,
                )
            };
            (sum / b as f64).backward();
            means.push(mean);
        }
        opt.step(&lr_t, 0.0)?;
        Ok(Tensor::stack(&means, 0).mean(Kind::Float))
    };
    let mut runner = crate::cuda_graph::CapturedStep::new(opts.cuda_graph, cuda, 3, "training step")?;
    while images < opts.images && !stop {
        images += opts.batch as u64;
        step += 1;
        let lr = opts.lr * (images as f64 / opts.lr_warmup_images.max(1) as f64).min(1.0);
        let _ = lr_t.shallow_clone().fill_(lr);
        super::rng::seed_step(crate::dist::rank_seed(opts.seed, rank), step);
        let mean = runner.run(&train_step)?;
        ema_update(ema, net, ema_beta(opts.batch, images, opts.ema_halflife_images, opts.ema_rampup))?;
        if let Some((every, hook)) = grids.as_mut()
            && *every > 0
            && step.is_multiple_of(*every)
            && crate::dist::is_main()
        {
            hook(step, ema)?;
        }
        window.push(mean);
        // Ranks must agree on when to stop: in a group the time limit is read at log steps only.
        let timed_out = || opts.max_seconds.is_some_and(|m| start.elapsed().as_secs_f64() >= m);
        if world == 1 {
            stop = timed_out();
        }
        if step.is_multiple_of(opts.log_every) || images >= opts.images || stop {
            if world > 1 {
                stop = crate::dist::agree(timed_out())?;
                if check_every > 0 && step % check_every < opts.log_every {
                    crate::dist::check_identical(&opt.params, "teacher parameters")?;
                }
            }
            let losses = window_losses(&window, step, &ckpt_path)?;
            last_loss = losses.iter().sum::<f64>() / losses.len() as f64;
            let rate = (images - window_start.1) as f64 / window_start.0.elapsed().as_secs_f64().max(1e-9);
            curve.push((images, last_loss));
            on_log(step, images, last_loss, rate);
            window.clear();
            window_start = (Instant::now(), images);
            let preempted = crate::dist::preempt::agreed()?;
            if (preempted || step % opts.checkpoint_every < opts.log_every) && crate::dist::is_main() {
                save_checkpoint(&ckpt_path, &opt, ema, &ema_names, step, images, &curve)?;
            }
            if preempted {
                return Err(crate::dist::preempt::Preempted { at: Some(step) }.into());
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let trained = images.saturating_sub(resumed_from_step * opts.batch as u64);
    Ok(TrainSummary {
        steps: step,
        images,
        seconds,
        images_per_second: trained as f64 / seconds.max(1e-9),
        final_loss: last_loss,
        loss_curve: curve,
        resumed_from_step,
    })
}

/// Restores what `save_checkpoint` wrote: returns the step, the images seen and the loss curve.
fn restore_checkpoint(path: &Path, opt: &AdamW, ema: &Denoiser, ema_names: &[String]) -> Result<(u64, u64, Vec<(u64, f64)>)> {
    let (t, meta) = checkpoint::load(path)?;
    checkpoint::restore(&t, "net.", &opt.names, &opt.params)?;
    checkpoint::restore(&t, "adam_m.", &opt.names, &opt.exp_avg)?;
    checkpoint::restore(&t, "adam_v.", &opt.names, &opt.exp_avg_sq)?;
    checkpoint::restore(&t, "adam_step.", &opt.names, &opt.steps)?;
    let ev = ema.vs.variables();
    let ema_t: Vec<Tensor> = ema_names.iter().map(|n| ev[n].shallow_clone()).collect();
    checkpoint::restore(&t, "ema.", ema_names, &ema_t)?;
    let step = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
    let images = meta.get("images").and_then(|s| s.parse().ok()).unwrap_or(0);
    let curve = meta.get("curve").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    tracing::info!(step, images, "resumed from checkpoint");
    Ok((step, images, curve))
}

/// The mean losses of the steps since the last log (averaged over ranks); a non-finite one is an
/// error naming its step.
fn window_losses(window: &[Tensor], step: u64, ckpt_path: &Path) -> Result<Vec<f64>> {
    let losses = Vec::<f64>::try_from(crate::dist::mean_over_ranks(&Tensor::stack(window, 0))?.to_kind(Kind::Double))?;
    if let Some(i) = losses.iter().position(|l| !l.is_finite()) {
        let bad = step - losses.len() as u64 + i as u64 + 1;
        bail!(
            "non-finite loss ({}) at step {bad}; the last good checkpoint is kept in {}",
            losses[i],
            ckpt_path.display()
        );
    }
    Ok(losses)
}

fn sorted_names(net: &Denoiser) -> Vec<String> {
    let mut n: Vec<String> = net.vs.variables().into_keys().collect();
    n.sort();
    n
}

fn save_checkpoint(
    path: &Path,
    opt: &AdamW,
    ema: &Denoiser,
    ema_names: &[String],
    step: u64,
    images: u64,
    curve: &[(u64, f64)],
) -> Result<()> {
    let mut t: Vec<(String, Tensor)> = Vec::new();
    for (i, n) in opt.names.iter().enumerate() {
        t.push((format!("net.{n}"), opt.params[i].shallow_clone()));
        t.push((format!("adam_m.{n}"), opt.exp_avg[i].shallow_clone()));
        t.push((format!("adam_v.{n}"), opt.exp_avg_sq[i].shallow_clone()));
        t.push((format!("adam_step.{n}"), opt.steps[i].shallow_clone()));
    }
    let ev = ema.vs.variables();
    for n in ema_names {
        t.push((format!("ema.{n}"), ev[n].shallow_clone()));
    }
    let mut meta = HashMap::new();
    meta.insert("step".into(), step.to_string());
    meta.insert("images".into(), images.to_string());
    meta.insert("curve".into(), serde_json::to_string(curve)?);
    checkpoint::save(path, &t, meta)
}
