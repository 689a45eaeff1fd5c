//! One DMD iteration as device work: the generator's distribution-matching (and regression, and
//! GAN) update, then the fake score's; the optimisers and GAN head it owns; and the checkpoint
//! of everything the remaining iterations depend on.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

use super::losses::{dm_gradient, dm_loss, fake_score_loss, regression_loss};
use super::{DmdLogRow, DmdOptions, Pairs, RealScore, RegressionLoss};
use crate::artifact::checkpoint;
use crate::nn::Denoiser;
use crate::nn::lpips::Lpips;
use crate::sample::karras_sigmas;
use crate::torch_shim::AutocastBf16;
use crate::train::gan::{self, GanHead};
use crate::train::optim::AdamW;

/// The networks of a DMD run: the frozen real score, the generator and the fake score (both
/// initialised from the teacher by the caller) and, optionally, the generator's EMA.
pub struct DmdNets<'a> {
    pub real: &'a dyn RealScore,
    pub generator: &'a Denoiser,
    pub fake: &'a Denoiser,
    pub ema: Option<&'a Denoiser>,
}

/// What a DMD run learns from besides the real score: ODE pairs for the regression loss, LPIPS
/// for that loss, real images for the GAN head.
#[derive(Default)]
pub struct DmdData<'a> {
    pub pairs: Option<&'a Pairs>,
    pub lpips: Option<&'a Lpips>,
    pub real_images: Option<&'a RealImages>,
}

/// Rows [start, start + len) of a random batch of `global` pairs.
pub(super) fn pair_batch(p: &Pairs, global: i64, (start, len): (i64, i64)) -> (Tensor, Option<Tensor>, Tensor) {
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

/// The pairs and real images are indexed on their own device: they must be the networks'.
fn check_data_device(data: &DmdData, device: Device) -> Result<()> {
    let on = [
        ("the ODE pairs", data.pairs.map(|p| p.z.device())),
        ("the real images", data.real_images.map(|r| r.images.device())),
    ];
    for (what, d) in on {
        if let Some(d) = d.filter(|d| *d != device) {
            bail!("{what} are on {d:?} but the networks on {device:?}: move them to the training device");
        }
    }
    Ok(())
}

/// How a global batch is laid out: this rank's share as `accum` micro-batches of `micro`, out of `global` samples of which this rank keeps rows `slice`.
struct Layout {
    accum: i64,
    micro: i64,
    global: i64,
    slice: (i64, i64),
    /// [global, C, H, W]: every random number is drawn for the whole global batch.
    global_shape: Vec<i64>,
    /// [per_rank, 1, 1, 1]: noise levels broadcast over a sample.
    sigma_shape: Vec<i64>,
}

impl Layout {
    fn new(opts: &DmdOptions, sample_shape: &[i64]) -> Result<Self> {
        let (rank, world) = (crate::dist::rank(), crate::dist::world());
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
        let global = b * world as i64;
        let mut sigma_shape = vec![b];
        sigma_shape.extend(std::iter::repeat_n(1, sample_shape.len()));
        Ok(Layout {
            accum,
            micro: b / accum,
            global,
            slice: (rank as i64 * b, b),
            global_shape: std::iter::once(global).chain(sample_shape.iter().copied()).collect(),
            sigma_shape,
        })
    }
}

/// A DMD run's state between iterations. Every rank draws the random numbers of the whole
/// global batch from the same stream and keeps its own slice, so that a run does not depend on
/// how its batch is split over GPUs and micro-batches (up to summation order).
pub struct DmdTrainer<'a> {
    nets: DmdNets<'a>,
    data: DmdData<'a>,
    opts: &'a DmdOptions,
    head: Option<GanHead>,
    opt_g: AdamW,
    opt_f: AdamW,
    opt_h: Option<AdamW>,
    /// The Karras schedule's noise levels without the final 0.
    sched: Tensor,
    layout: Layout,
    sigma_max: Tensor,
    /// Rows of an identity matrix rather than one_hot, whose range checks may read the device.
    eye: Option<Tensor>,
    label_dim: i64,
    zero: Tensor,
    /// Learning rates live in device tensors so that a captured iteration follows the warm-up.
    lr_g: Tensor,
    lr_f: Tensor,
    cuda: bool,
}

impl<'a> DmdTrainer<'a> {
    pub fn new(nets: DmdNets<'a>, data: DmdData<'a>, opts: &'a DmdOptions) -> Result<Self> {
        if opts.regression_loss == RegressionLoss::Lpips && data.lpips.is_none() && opts.regression_weight > 0.0 {
            bail!("regression_loss = \"lpips\" needs LPIPS weights");
        }
        let device = nets.generator.device();
        check_data_device(&data, device)?;
        // Seeded before the GAN head is initialised, so that a run is reproducible from its seed.
        tch::manual_seed(opts.seed as i64);
        let head = match (opts.gan_generator_weight > 0.0, nets.fake.bottleneck_channels(), data.real_images) {
            (false, _, _) => None,
            (true, None, _) => bail!("the GAN head needs a U-Net fake score (DDPM++ or ADM: its encoder bottleneck)"),
            (true, _, None) => bail!("the GAN head needs real images (a dataset stage)"),
            (true, Some(c), Some(_)) => Some(GanHead::new(c, device)),
        };
        let opt_h = head
            .as_ref()
            .map(|h| AdamW::from_varstore(&h.vs, opts.betas, opts.eps, opts.weight_decay));
        let cuda = device.is_cuda();
        crate::torch_shim::set_tf32(cuda && opts.tf32);
        let opt_g = AdamW::new(nets.generator, opts.betas, opts.eps, opts.weight_decay);
        let opt_f = AdamW::new(nets.fake, opts.betas, opts.eps, opts.weight_decay);
        let mut sched = karras_sigmas(opts.levels, opts.sigma_min, opts.sigma_max, opts.rho);
        sched.pop();
        let label_dim = nets.generator.config.label_dim();
        let layout = Layout::new(opts, &nets.generator.config.sample_shape())?;
        Ok(DmdTrainer {
            head,
            opt_g,
            opt_f,
            opt_h,
            sched: Tensor::from_slice(&sched).to_kind(Kind::Float).to_device(device),
            layout,
            sigma_max: Tensor::from(opts.sigma_max as f32).to_device(device),
            eye: (label_dim > 0).then(|| Tensor::eye(label_dim, (Kind::Float, device))),
            label_dim,
            zero: Tensor::zeros([], (Kind::Float, device)),
            lr_g: Tensor::zeros([], (Kind::Float, device)),
            lr_f: Tensor::zeros([], (Kind::Float, device)),
            cuda,
            nets,
            data,
            opts,
        })
    }

    /// This rank's rows of a global-batch tensor.
    fn mine(&self, t: Tensor) -> Tensor {
        t.narrow(0, self.layout.slice.0, self.layout.slice.1)
    }
    fn device(&self) -> tch::Device {
        self.zero.device()
    }
    fn labels(&self) -> Option<Tensor> {
        let device = self.device();
        self.eye.as_ref().map(|e| {
            e.index_select(
                0,
                &self.mine(Tensor::randint(self.label_dim, [self.layout.global], (Kind::Int64, device))),
            )
        })
    }
    fn randn(&self) -> Tensor {
        self.mine(Tensor::randn(self.layout.global_shape.as_slice(), (Kind::Float, self.device())))
    }
    /// Noise levels drawn uniformly from schedule indices [lo, hi).
    fn sigma_at(&self, lo: usize, hi: usize) -> Tensor {
        let idx = Tensor::randint_low(lo as i64, hi as i64, [self.layout.global], (Kind::Int64, self.device()));
        self.sched
            .index_select(0, &self.mine(idx))
            .reshape(self.layout.sigma_shape.as_slice())
    }
    /// Micro-batch `i` of a per-rank tensor.
    fn chunk(&self, t: &Tensor, i: i64) -> Tensor {
        t.narrow(0, i * self.layout.micro, self.layout.micro)
    }
    fn chunk_opt(&self, t: Option<&Tensor>, i: i64) -> Option<Tensor> {
        t.map(|t| self.chunk(t, i))
    }
    fn autocast(&self) -> Result<AutocastBf16> {
        AutocastBf16::new(self.cuda && self.opts.bf16)
    }
    /// G(z, y) = D_G(sigma_max z; sigma_max, y).
    fn generate(&self, z: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let _ac = self.autocast()?;
        Ok(self.nets.generator.denoise(&(z * self.opts.sigma_max), &self.sigma_max, y, false))
    }
    /// Generator samples of the whole per-rank batch without gradient, a micro-batch at a time.
    fn generate_detached(&self, z: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let parts = (0..self.layout.accum)
            .map(|i| tch::no_grad(|| self.generate(&self.chunk(z, i), self.chunk_opt(y, i).as_ref())))
            .collect::<Result<Vec<_>>>()?;
        Ok(join_batches(parts))
    }
    /// Logits of the GAN head for x noised at `sigma` with `eps`.
    fn gan_logits(&self, h: &GanHead, x: &Tensor, y: Option<&Tensor>, sigma: &Tensor, eps: &Tensor, train: bool) -> Result<Tensor> {
        let xt = x + eps * sigma;
        Ok(h.forward(
            &self
                .nets
                .fake
                .bottleneck(&xt, sigma, y, train)
                .context("the GAN head needs a U-Net fake score")?,
        ))
    }

    /// Fake-score update (plus the discriminator's, with the GAN head) on detached samples of the
    /// whole per-rank batch: returns the fake-score loss, its gradient norm and the discriminator
    /// loss. Its random numbers are drawn for the whole batch before the split.
    fn fake_step(&self, x: &Tensor, y: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
        let levels = self.opts.levels;
        let (sigma, eps) = (self.sigma_at(0, levels), self.randn());
        let gan = match (&self.head, self.data.real_images) {
            (Some(_), Some(r)) => {
                let (xr, yr) = r.batch(self.layout.global, self.layout.slice);
                Some((
                    xr,
                    yr,
                    [self.sigma_at(0, levels), self.randn(), self.sigma_at(0, levels), self.randn()],
                ))
            }
            _ => None,
        };
        self.opt_f.zero_grad();
        if let Some(o) = &self.opt_h {
            o.zero_grad();
        }
        let accum = self.layout.accum;
        let (mut loss_sum, mut d_sum) = (self.zero.shallow_clone(), self.zero.shallow_clone());
        for i in 0..accum {
            let (xi, yi) = (self.chunk(x, i), self.chunk_opt(y, i));
            let (loss, d) = {
                let _ac = self.autocast()?;
                let loss = fake_score_loss(self.nets.fake, &xi, yi.as_ref(), &self.chunk(&sigma, i), &self.chunk(&eps, i));
                match (&self.head, &gan) {
                    (Some(h), Some((xr, yr, [sf, ef, sr, er]))) => {
                        let lf = self.gan_logits(h, &xi, yi.as_ref(), &self.chunk(sf, i), &self.chunk(ef, i), true)?;
                        let yri = self.chunk_opt(yr.as_ref(), i);
                        let lr = self.gan_logits(h, &self.chunk(xr, i), yri.as_ref(), &self.chunk(sr, i), &self.chunk(er, i), true)?;
                        let d = gan::discriminator_loss(&lf, &lr);
                        (&loss + &d * self.opts.gan_discriminator_weight, d)
                    }
                    _ => (loss, self.zero.shallow_clone()),
                }
            };
            (&loss / accum as f64).backward();
            loss_sum = loss_sum + loss.detach();
            d_sum = d_sum + d.detach();
        }
        let gn = self
            .opt_f
            .step(&self.lr_f, self.opts.grad_clip)?
            .unwrap_or_else(|| self.zero.shallow_clone());
        if let Some(o) = &self.opt_h {
            o.step(&self.lr_f, self.opts.grad_clip)?;
        }
        Ok((loss_sum / accum as f64, gn, d_sum / accum as f64))
    }

    /// The generator's forward and backward on micro-batch `i`: returns its [DM, regression, GAN]
    /// losses and its samples (detached) for the fake-score step.
    fn generator_micro_step(&self, i: i64, draws: &GeneratorDraws) -> Result<([Tensor; 3], Tensor)> {
        let mb = self.layout.micro;
        let (zi, yi) = (self.chunk(&draws.z, i), self.chunk_opt(draws.y.as_ref(), i));
        // The generator sees its DM batch and its regression batch in one call (fewer launches).
        let (x, reg) = match &draws.pair {
            Some((zr, yr, xr)) => {
                let yri = self.chunk_opt(yr.as_ref(), i);
                let yy = yi.as_ref().zip(yri.as_ref()).map(|(a, c)| Tensor::cat(&[a, c], 0));
                let both = self.generate(&Tensor::cat(&[&zi, &self.chunk(zr, i)], 0), yy.as_ref())?;
                (both.narrow(0, 0, mb), Some((both.narrow(0, mb, mb), self.chunk(xr, i))))
            }
            None => (self.generate(&zi, yi.as_ref())?, None),
        };
        let xd = x.detach();
        let g = tch::no_grad(|| -> Result<Tensor> {
            let sigma = self.chunk(&draws.sigma_dm, i);
            let xt = &xd + self.chunk(&draws.eps_dm, i) * &sigma;
            let _ac = AutocastBf16::new(self.cuda && self.opts.bf16 && !self.opts.score_fp32)?;
            let real_d = self.nets.real.real_denoise(&xt, &sigma, yi.as_ref()).to_kind(Kind::Float);
            let fake_d = self.nets.fake.denoise(&xt, &sigma, yi.as_ref(), false).to_kind(Kind::Float);
            Ok(dm_gradient(&xd, &real_d, &fake_d))
        })?;
        let loss_dm = dm_loss(&x, &g);
        let (mut loss, loss_reg) = match reg {
            Some((pred, target)) => {
                let l = regression_loss(&pred, &target, self.opts.regression_loss, self.data.lpips);
                (&loss_dm + &l * self.opts.regression_weight, l)
            }
            None => (loss_dm.shallow_clone(), self.zero.shallow_clone()),
        };
        // The generator's GAN loss flows through the fake score's encoder and the head; their
        // gradients from this pass are dropped by the fake step's zero_grad.
        let loss_gan_g = match (&self.head, &draws.gan) {
            (Some(h), Some((sigma, eps))) => {
                let _ac = self.autocast()?;
                let l = gan::generator_loss(&self.gan_logits(h, &x, yi.as_ref(), &self.chunk(sigma, i), &self.chunk(eps, i), false)?);
                loss = loss + &l * self.opts.gan_generator_weight;
                l
            }
            _ => self.zero.shallow_clone(),
        };
        (loss / self.layout.accum as f64).backward();
        Ok(([loss_dm, loss_reg, loss_gan_g], xd))
    }

    /// One DMD iteration, device work only (no host reads), so that it can be captured as a CUDA
    /// graph. Returns [loss_dm, loss_reg, loss_fake, grad_norm_g, grad_norm_fake, loss_gan_g,
    /// loss_gan_d]. With gradient accumulation every random number is drawn for the whole
    /// per-rank batch before it is split, so k micro-batches of B/k compute exactly the update of
    /// one batch of B (up to summation order).
    pub fn step(&self) -> Result<Tensor> {
        for _ in 1..self.opts.fake_updates_per_g.max(1) {
            let y = self.labels();
            let x = self.generate_detached(&self.randn(), y.as_ref())?;
            let _ = self.fake_step(&x, y.as_ref())?;
        }
        let draws = self.generator_draws();
        self.opt_g.zero_grad();
        let mut sums = [self.zero.shallow_clone(), self.zero.shallow_clone(), self.zero.shallow_clone()];
        let mut xds = Vec::with_capacity(self.layout.accum as usize);
        for i in 0..self.layout.accum {
            let (losses, xd) = self.generator_micro_step(i, &draws)?;
            for (s, l) in sums.iter_mut().zip(losses) {
                *s = &*s + l.detach();
            }
            xds.push(xd);
        }
        let gn_g = self
            .opt_g
            .step(&self.lr_g, self.opts.grad_clip)?
            .unwrap_or_else(|| self.zero.shallow_clone());
        // Fake-score update on the same (detached) samples.
        let (loss_f, gn_f, loss_gan_d) = self.fake_step(&join_batches(xds), draws.y.as_ref())?;
        let [dm, reg, gan_g] = sums.map(|s| s / self.layout.accum as f64);
        Ok(Tensor::stack(
            &[dm, reg, loss_f, gn_g.reshape([]), gn_f.reshape([]), gan_g, loss_gan_d],
            0,
        ))
    }

    /// The random numbers of a generator update, in the order they have always been drawn.
    fn generator_draws(&self) -> GeneratorDraws {
        let y = self.labels();
        let z = self.randn();
        let regress = self.data.pairs.filter(|_| self.opts.regression_weight > 0.0);
        let pair = regress.map(|p| pair_batch(p, self.layout.global, self.layout.slice));
        let (sigma_dm, eps_dm) = (self.sigma_at(self.opts.t_min_index, self.opts.t_max_index), self.randn());
        let gan = self.head.as_ref().map(|_| (self.sigma_at(0, self.opts.levels), self.randn()));
        GeneratorDraws {
            y,
            z,
            pair,
            sigma_dm,
            eps_dm,
            gan,
        }
    }

    /// Sets both learning rates for iteration `it` (0-based) of the linear warm-up; returns the
    /// generator's.
    pub fn set_learning_rates(&self, it: u64) -> f64 {
        let ramp = ((it + 1) as f64 / self.opts.warmup_steps.max(1) as f64).min(1.0);
        let lr = self.opts.lr * ramp;
        let _ = self.lr_g.shallow_clone().fill_(lr);
        let _ = self.lr_f.shallow_clone().fill_(self.opts.fake_lr.unwrap_or(self.opts.lr) * ramp);
        lr
    }

    fn optimisers(&self) -> impl Iterator<Item = (&'static str, &AdamW)> {
        [("g", &self.opt_g), ("f", &self.opt_f)]
            .into_iter()
            .chain(self.opt_h.as_ref().map(|o| ("h", o)))
    }

    /// Every rank starts from rank 0's weights (they are copies of the same teacher anyway).
    pub fn broadcast_weights(&self) -> Result<()> {
        for (_, o) in self.optimisers() {
            crate::dist::broadcast_from_main(&o.params)?;
        }
        Ok(())
    }

    /// Fails when the ranks' networks have drifted apart (a debugging check).
    pub fn check_ranks_agree(&self) -> Result<()> {
        crate::dist::check_identical(&self.opt_g.params, "generator parameters")?;
        crate::dist::check_identical(&self.opt_f.params, "fake-score parameters")
    }

    /// Updates the EMA after iteration `it` (1-based).
    pub fn update_ema(&self, it: u64) -> Result<()> {
        if let Some(e) = self.nets.ema {
            let h = self.opts.ema_halflife_images.unwrap_or(0.0);
            let beta = crate::train::optim::ema_beta(self.opts.batch, it * self.opts.batch as u64, h, None);
            crate::train::optim::ema_update(e, self.nets.generator, beta)?;
        }
        Ok(())
    }

    pub fn generator(&self) -> &Denoiser {
        self.nets.generator
    }

    /// Everything the remaining iterations depend on: both networks, their optimisers, the GAN
    /// head, the EMA and the log so far (random numbers come from the iteration number).
    pub fn save(&self, path: &Path, it: u64, log: &[DmdLogRow]) -> Result<()> {
        let mut t = Vec::new();
        for (prefix, opt) in self.optimisers() {
            for (i, n) in opt.names.iter().enumerate() {
                t.push((format!("{prefix}.net.{n}"), opt.params[i].shallow_clone()));
                t.push((format!("{prefix}.m.{n}"), opt.exp_avg[i].shallow_clone()));
                t.push((format!("{prefix}.v.{n}"), opt.exp_avg_sq[i].shallow_clone()));
                t.push((format!("{prefix}.step.{n}"), opt.steps[i].shallow_clone()));
            }
        }
        if let Some(e) = self.nets.ema {
            let (names, vars) = sorted_vars(e);
            t.extend(names.into_iter().zip(vars).map(|(n, v)| (format!("ema.{n}"), v)));
        }
        let meta = HashMap::from([
            ("iteration".to_string(), it.to_string()),
            ("log".to_string(), serde_json::to_string(log)?),
        ]);
        checkpoint::save(path, &t, meta)
    }

    /// Restores what [`DmdTrainer::save`] wrote; returns the iteration and the log.
    pub fn restore(&self, path: &Path) -> Result<(u64, Vec<DmdLogRow>)> {
        let (t, meta) = checkpoint::load(path)?;
        for (prefix, opt) in self.optimisers() {
            checkpoint::restore(&t, &format!("{prefix}.net."), &opt.names, &opt.params)?;
            checkpoint::restore(&t, &format!("{prefix}.m."), &opt.names, &opt.exp_avg)?;
            checkpoint::restore(&t, &format!("{prefix}.v."), &opt.names, &opt.exp_avg_sq)?;
            checkpoint::restore(&t, &format!("{prefix}.step."), &opt.names, &opt.steps)?;
        }
        if let Some(e) = self.nets.ema {
            let (n, v) = sorted_vars(e);
            checkpoint::restore(&t, "ema.", &n, &v)?;
        }
        let it = meta.get("iteration").and_then(|s| s.parse().ok()).unwrap_or(0);
        let log = match meta.get("log") {
            Some(s) => serde_json::from_str(s).context("the checkpoint's DMD log")?,
            None => Vec::new(),
        };
        Ok((it, log))
    }
}

/// The random numbers of one generator update (drawn before any micro-batch runs).
struct GeneratorDraws {
    y: Option<Tensor>,
    z: Tensor,
    pair: Option<(Tensor, Option<Tensor>, Tensor)>,
    sigma_dm: Tensor,
    eps_dm: Tensor,
    gan: Option<(Tensor, Tensor)>,
}

fn sorted_vars(net: &Denoiser) -> (Vec<String>, Vec<Tensor>) {
    let vars = net.vs.variables();
    let mut names: Vec<String> = vars.keys().cloned().collect();
    names.sort();
    let t = names.iter().map(|n| vars[n].shallow_clone()).collect();
    (names, t)
}

/// Micro-batches back into one batch (no copy when there is only one).
fn join_batches(mut parts: Vec<Tensor>) -> Tensor {
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 0)
    }
}
