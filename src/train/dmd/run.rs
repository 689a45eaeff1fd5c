//! The DMD training loop: resume, iterate (captured as a CUDA graph where it can be), log a
//! window of iterations at a time, checkpoint, stop on time or on a non-finite loss.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::trainer::{DmdData, DmdNets, DmdTrainer};
use super::{DmdOptions, Pairs, RealScore};
use crate::nn::Denoiser;

/// The checkpoint file inside a DMD run's work directory.
pub const CHECKPOINT_FILE: &str = "dmd_checkpoint.safetensors";

/// Eager iterations before the capture (cuDNN autotuning and lazy allocations happen there).
const EAGER_BEFORE_CAPTURE: u64 = 3;

/// What a caller watches during a run: each log row, and (on rank 0) the generator every
/// `grid_every` iterations, e.g. to draw a sample grid or an FID point.
pub trait DmdHooks {
    fn on_log(&mut self, _row: &DmdLogRow) {}
    fn grid_every(&self) -> u64 {
        0
    }
    fn on_grid(&mut self, _iteration: u64, _generator: &Denoiser) -> Result<()> {
        Ok(())
    }
}

/// No hooks.
pub struct NoHooks;
impl DmdHooks for NoHooks {}

/// A log callback as hooks.
struct OnLog<F>(F);
impl<F: FnMut(&DmdLogRow)> DmdHooks for OnLog<F> {
    fn on_log(&mut self, row: &DmdLogRow) {
        (self.0)(row)
    }
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

/// Trains the generator (and the fake score, both initialised from the teacher by the caller)
/// against `real`, with regression on `pairs` when given. Checkpoints into `work_dir` and
/// resumes from it.
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
    let nets = DmdNets {
        real,
        generator,
        fake,
        ema,
    };
    let data = DmdData {
        pairs,
        ..Default::default()
    };
    train_dmd(nets, data, opts, work_dir, &mut OnLog(on_log))
}

/// The whole run: see [`dmd_train`]; `hooks` sees every log row and the periodic generator.
pub fn train_dmd(nets: DmdNets, data: DmdData, opts: &DmdOptions, work_dir: &Path, hooks: &mut dyn DmdHooks) -> Result<DmdSummary> {
    let trainer = DmdTrainer::new(nets, data, opts)?;
    let ckpt = work_dir.join(CHECKPOINT_FILE);
    let (mut it, mut log) = if ckpt.exists() { trainer.restore(&ckpt)? } else { (0, Vec::new()) };
    if it > 0 {
        tracing::info!(iteration = it, "resumed DMD from checkpoint");
    }
    let resumed_from = it;
    let start = Instant::now();
    let mut window = Window::new(it);
    let cuda = trainer.generator().device().is_cuda();
    let mut runner = crate::cuda_graph::CapturedStep::new(opts.cuda_graph, cuda, EAGER_BEFORE_CAPTURE, "DMD iteration")?;
    trainer.broadcast_weights()?;
    let world = crate::dist::world();
    let check_every = crate::dist::debug_check_every();
    let timed_out = || opts.max_seconds.is_some_and(|m| start.elapsed().as_secs_f64() >= m);
    let mut stop = false;
    while it < opts.iterations && !stop {
        let lr = trainer.set_learning_rates(it);
        crate::train::rng::seed_step(opts.seed, it + 1);
        window.losses.push(runner.run(&|| trainer.step())?);
        trainer.update_ema(it + 1)?;
        it += 1;
        let every = hooks.grid_every();
        if every > 0 && it.is_multiple_of(every) && crate::dist::is_main() {
            hooks.on_grid(it, trainer.generator())?;
        }
        // Ranks must agree on when to stop: in a group the time limit is read at log steps only.
        if world == 1 {
            stop = timed_out();
        }
        if it.is_multiple_of(opts.log_every) || it >= opts.iterations || stop {
            if world > 1 {
                stop = crate::dist::agree(timed_out())?;
                if check_every > 0 && it % check_every < opts.log_every {
                    trainer.check_ranks_agree()?;
                }
            }
            let row = window.close(it, lr, &ckpt)?;
            hooks.on_log(&row);
            log.push(row);
            let preempted = crate::dist::preempt::agreed()?;
            if (preempted || it % opts.checkpoint_every < opts.log_every) && crate::dist::is_main() {
                trainer.save(&ckpt, it, &log)?;
            }
            if preempted {
                return Err(crate::dist::preempt::Preempted { at: Some(it) }.into());
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

/// The iterations since the last log row: their loss vectors and when they started.
struct Window {
    losses: Vec<Tensor>,
    started: Instant,
    first: u64,
}

impl Window {
    fn new(it: u64) -> Self {
        Window {
            losses: Vec::new(),
            started: Instant::now(),
            first: it,
        }
    }

    /// The log row of the window ending at iteration `it` (averaged over ranks); a non-finite
    /// loss is an error naming its iteration. Starts the next window.
    fn close(&mut self, it: u64, lr: f64, ckpt: &Path) -> Result<DmdLogRow> {
        let stacked = crate::dist::mean_over_ranks(&Tensor::stack(&self.losses, 0))?;
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
        let rate = (it - self.first) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        *self = Window::new(it);
        Ok(DmdLogRow {
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
        })
    }
}
