//! A `dmd` stage's run: the networks from the teacher, the data the options ask for, training
//! with progress, grids and the FID curve as hooks, then the report.

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

use super::DmdParams;
use super::evaluate::FidCurve;
use super::networks::networks;
use super::report::{self, Grids};
use crate::nn::{Denoiser, NetworkConfig};
use crate::sample::{SamplerConfig, Solver};
use crate::stages::StageContext;
use crate::train::dmd::{DmdData, DmdHooks, DmdLogRow, DmdNets, RealImages, train_dmd};

const CSV_HEADER: &str = "iteration,loss_dm,loss_reg,loss_fake,grad_norm_g,grad_norm_fake,loss_gan_g,loss_gan_d,lr,iterations_per_second\n";

fn pairs(p: &DmdParams, ctx: &StageContext, config: &NetworkConfig, device: Device) -> Result<Option<crate::train::dmd::Pairs>> {
    let Some(_) = &p.pairs else { return Ok(None) };
    let pairs = crate::artifact::pairs::load(ctx.upstream_dir("pairs")?, device)?;
    if pairs.z.size()[1..] != config.sample_shape()[..] {
        bail!(
            "the pairs have samples of shape {:?}, the teacher {:?}",
            &pairs.z.size()[1..],
            config.sample_shape()
        );
    }
    Ok(Some(pairs))
}

/// The dataset's images on the device, for DMD2's GAN head.
fn real_images(p: &DmdParams, ctx: &StageContext, config: &NetworkConfig, device: Device) -> Result<Option<RealImages>> {
    if p.train.gan_generator_weight <= 0.0 {
        return Ok(None);
    }
    let ds = crate::data::artifact::ImageDataset::read(ctx.upstream_dir("dataset")?).context("real images for the GAN head")?;
    let (n, h, w, c) = (ds.len() as i64, ds.height as i64, ds.width as i64, ds.channels as i64);
    let images = Tensor::from_slice(&ds.images)
        .reshape([n, h, w, c])
        .permute([0, 3, 1, 2])
        .contiguous()
        .to_device(device);
    let labels = (config.label_dim() > 0)
        .then(|| Tensor::eye(config.label_dim(), (Kind::Float, device)).index_select(0, &Tensor::from_slice(&ds.labels).to_device(device)));
    Ok(Some(RealImages { images, labels }))
}

/// What the stage watches while training: the progress bar and log, grids, the FID curve.
struct StageHooks<'a> {
    bar: ProgressBar,
    csv: String,
    grids: Option<Grids<'a>>,
    grid_every: u64,
    curve: FidCurve<'a>,
    ema: Option<&'a Denoiser>,
}

impl DmdHooks for StageHooks<'_> {
    fn on_log(&mut self, r: &DmdLogRow) {
        self.bar.set_position(r.iteration);
        self.bar.set_message(format!(
            "dm {:.4} reg {:.4} fake {:.4} {:.1} it/s",
            r.loss_dm, r.loss_reg, r.loss_fake, r.iterations_per_second
        ));
        tracing::info!(
            iteration = r.iteration,
            loss_dm = r.loss_dm,
            loss_reg = r.loss_reg,
            loss_fake = r.loss_fake,
            grad_norm_g = r.grad_norm_g,
            lr = r.lr,
            "dmd"
        );
        self.csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            r.iteration,
            r.loss_dm,
            r.loss_reg,
            r.loss_fake,
            r.grad_norm_g,
            r.grad_norm_fake,
            r.loss_gan_g,
            r.loss_gan_d,
            r.lr,
            r.iterations_per_second
        ));
    }
    fn grid_every(&self) -> u64 {
        if self.grids.is_some() && (self.grid_every > 0 || self.curve.every() > 0) {
            1
        } else {
            0
        }
    }
    fn on_grid(&mut self, it: u64, g: &Denoiser) -> Result<()> {
        if let Some(grids) = &self.grids
            && self.grid_every > 0
            && it.is_multiple_of(self.grid_every)
        {
            grids.save(g, &format!("progress/grid-iter{it:07}.png"))?;
        }
        let every = self.curve.every();
        if every > 0 && it.is_multiple_of(every) {
            self.curve.evaluate(it, g, self.ema)?;
        }
        Ok(())
    }
}

pub fn run(p: &DmdParams, ctx: &mut StageContext) -> Result<serde_json::Value> {
    let device = crate::dist::local_device(crate::torch_shim::device(&ctx.device)?);
    let nets = networks(p, ctx, device)?;
    let config = nets.generator.config.clone();
    let pairs = pairs(p, ctx, &config, device)?;
    let lpips = match (&p.lpips_weights, &p.lpips_backbone) {
        (Some(_), _) => Some(crate::nn::lpips::Lpips::load(ctx.input("lpips_weights")?, device)?),
        (None, Some(_)) => Some(crate::nn::lpips::Lpips::from_torch(
            ctx.input("lpips_backbone")?,
            ctx.input("lpips_heads")?,
            device,
        )?),
        (None, None) => None,
    };
    let real_images = real_images(p, ctx, &config, device)?;
    ctx.progress.set_length(p.train.iterations);
    let one_step = SamplerConfig {
        solver: Solver::OneStep,
        sigma_max: p.train.sigma_max,
        ..Default::default()
    };
    let is_mlp = matches!(config, NetworkConfig::Mlp(_));
    let eval = match &p.eval {
        Some(e) if !is_mlp => Some((e, ctx.input("inception")?, ctx.upstream_dir("fid_reference")?)),
        _ => None,
    };
    let class_names = report::class_names(p, ctx, &config)?;
    let mut hooks = StageHooks {
        bar: ctx.progress.clone(),
        csv: CSV_HEADER.to_string(),
        grids: (!is_mlp).then(|| Grids::new(&ctx.out_dir, &config, class_names, p.grid_columns, &one_step, p.train.bf16)),
        grid_every: p.grid_every.unwrap_or(0),
        curve: FidCurve::new(eval, one_step.clone(), p.train.bf16, device)?,
        ema: nets.ema.as_ref(),
    };
    if !ctx.work_dir.join(crate::train::dmd::CHECKPOINT_FILE).exists() {
        hooks.curve.evaluate(0, &nets.generator, nets.ema.as_ref())?;
    }
    let summary = train_dmd(
        DmdNets {
            real: &nets.teacher,
            generator: &nets.generator,
            fake: &nets.fake,
            ema: nets.ema.as_ref(),
        },
        DmdData {
            pairs: pairs.as_ref(),
            lpips: lpips.as_ref(),
            real_images: real_images.as_ref(),
        },
        &p.train,
        &ctx.work_dir,
        &mut hooks,
    )?;
    if !crate::dist::is_main() {
        return Ok(serde_json::json!({})); // a worker: rank 0 writes the outputs
    }
    std::fs::write(ctx.measurements_dir()?.join("dmd_log.csv"), &hooks.csv)?;
    hooks.curve.evaluate(summary.iterations, &nets.generator, nets.ema.as_ref())?;
    report::write(p, ctx, &nets, &summary, &hooks.curve, hooks.grids.as_ref(), &one_step)
}
