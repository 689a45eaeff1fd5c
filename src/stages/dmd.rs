//! `dmd`: distils a teacher stage into a one-step generator (Distribution Matching
//! Distillation), optionally with the regression loss on an `ode-pairs` stage. Writes the
//! generator as a denoiser artifact (sample it with `solver = "onestep"`), the losses, grad
//! norms and learning rate per log step (CSV + plot), and a class-labelled grid (images) or a
//! teacher-vs-student scatter plot (2-D data).

use anyhow::{Context, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
use crate::nn::{Denoiser, weights};
use crate::render::{Canvas, line_plot};
use crate::sample::{SamplerConfig, Solver, class_grid, sample};
use crate::train::dmd::{DmdOptions, dmd_train_with_grids};

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
        let mut v = vec![Upstream {
            role: "teacher",
            stage: self.teacher.clone(),
            accepts: &[ArtifactType::Denoiser],
        }];
        if let Some(p) = &self.pairs {
            v.push(Upstream {
                role: "pairs",
                stage: p.clone(),
                accepts: &[ArtifactType::Pairs],
            });
        }
        if let Some(d) = &self.dataset {
            v.push(Upstream {
                role: "dataset",
                stage: d.clone(),
                accepts: &[ArtifactType::Images, ArtifactType::Points2d],
            });
        }
        if let Some(e) = &self.eval {
            v.push(Upstream {
                role: "fid_reference",
                stage: e.reference.clone(),
                accepts: &[ArtifactType::FidStats],
            });
        }
        v
    }
    fn input_paths(&self) -> Vec<super::InputPath> {
        let mut v: Vec<super::InputPath> = self
            .lpips_weights
            .iter()
            .map(|p| super::InputPath {
                role: "lpips_weights",
                path: p.clone(),
            })
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
        if t.regression_loss == crate::train::dmd::RegressionLoss::Lpips && self.lpips_weights.is_none() {
            return Err(FieldIssue::new("train", "regression_loss = \"lpips\" needs `lpips_weights`")
                .help("VGG's ImageNet weights are not bundled: give a safetensors file, or use \"l2\" / \"pseudo-huber\""));
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
        let device = crate::torch_shim::device(&ctx.device)?;
        let device = crate::dist::local_device(device);
        let teacher = crate::nn::load_denoiser_dir(ctx.upstream_dir("teacher")?, device)?;
        for (_, v) in teacher.vs.variables() {
            let _ = v.set_requires_grad(false);
        }
        let mut config = teacher.config.clone();
        config.set_dropout(0.0);
        let init = |c: &crate::nn::NetworkConfig| -> anyhow::Result<Denoiser> {
            let mut d = Denoiser::new(c, device);
            d.copy_from(&teacher)?;
            Ok(d)
        };
        let generator = init(&config)?;
        let fake = init(&config)?;
        let ema = self.train.ema_halflife_images.map(|_| init(&config)).transpose()?;
        let pairs = match &self.pairs {
            Some(_) => Some(crate::artifact::pairs::load(ctx.upstream_dir("pairs")?, device)?),
            None => None,
        };
        if let Some(p) = &pairs
            && p.z.size()[1..] != config.sample_shape()[..]
        {
            bail!(
                "the pairs have samples of shape {:?}, the teacher {:?}",
                &p.z.size()[1..],
                config.sample_shape()
            );
        }
        ctx.progress.set_length(self.train.iterations);
        let bar = ctx.progress.clone();
        let mut csv = String::from(
            "iteration,loss_dm,loss_reg,loss_fake,grad_norm_g,grad_norm_fake,loss_gan_g,loss_gan_d,lr,iterations_per_second\n",
        );
        let one = SamplerConfig {
            solver: Solver::OneStep,
            sigma_max: self.train.sigma_max,
            ..Default::default()
        };
        let class_names: Vec<String> = match &self.dataset {
            Some(_) if config.label_dim() > 0 => crate::data::artifact::read_info(ctx.upstream_dir("dataset")?)?
                .classes
                .into_iter()
                .take(10)
                .collect(),
            _ if config.label_dim() > 0 => (0..config.label_dim().min(10)).map(|i| format!("class {i}")).collect(),
            _ => Vec::new(),
        };
        let lpips = match &self.lpips_weights {
            Some(_) => Some(crate::nn::lpips::Lpips::load(ctx.input("lpips_weights")?, device)?),
            None => None,
        };
        let is_mlp = matches!(config, crate::nn::NetworkConfig::Mlp(_));
        let evaluator = match &self.eval {
            Some(e) if !is_mlp => Some((
                e,
                crate::eval::inception::Inception::load(ctx.input("inception")?, device)?,
                crate::eval::fid::FidReference::new(&crate::eval::fid::FidStats::load_npz(
                    &ctx.upstream_dir("fid_reference")?.join(crate::artifact::fid_stats::STATS_FILE),
                )?)?,
            )),
            _ => None,
        };
        let mut fid_curve: Vec<(u64, f64)> = Vec::new();
        let mut fid_curve_ema: Vec<(u64, f64)> = Vec::new();
        let quiet = indicatif::ProgressBar::hidden();
        let ema_ref = ema.as_ref();
        let mut evaluate = |it: u64, g: &Denoiser| -> anyhow::Result<()> {
            let Some((e, net, reference)) = &evaluator else { return Ok(()) };
            if !crate::dist::is_main() {
                return Ok(());
            }
            if fid_curve.last().is_some_and(|l| l.0 == it) {
                return Ok(());
            }
            // The parts of an evaluation's cost, logged so that the curve's price is visible.
            let mut secs = [0.0f64; 3]; // sampling, Inception, distance
            let mut fid_of = |net_g: &Denoiser| -> anyhow::Result<f64> {
                let s = crate::eval::stats::generator_stats(net, net_g, &one, e.num_samples, e.seed, 500, self.train.bf16, &quiet, false)?;
                let t = std::time::Instant::now();
                let d = reference.distance(&s.stats)?;
                secs[0] += s.sampling_seconds;
                secs[1] += s.inception_seconds;
                secs[2] += t.elapsed().as_secs_f64();
                Ok(d)
            };
            let fid = fid_of(g)?;
            fid_curve.push((it, fid));
            let fid_ema = ema_ref.map(&mut fid_of).transpose()?;
            let [sampling_s, inception_s, distance_s] = secs;
            match fid_ema {
                Some(fe) => {
                    tracing::info!(
                        iteration = it,
                        fid,
                        fid_ema = fe,
                        samples = e.num_samples,
                        sampling_s,
                        inception_s,
                        distance_s,
                        "dmd fid"
                    );
                    fid_curve_ema.push((it, fe));
                }
                None => tracing::info!(
                    iteration = it,
                    fid,
                    samples = e.num_samples,
                    sampling_s,
                    inception_s,
                    distance_s,
                    "dmd fid"
                ),
            }
            Ok(())
        };
        let real_images = if self.train.gan_generator_weight > 0.0 {
            let ds = crate::data::artifact::ImageDataset::read(ctx.upstream_dir("dataset")?).context("real images for the GAN head")?;
            let (n, h, w, c) = (ds.len() as i64, ds.height as i64, ds.width as i64, ds.channels as i64);
            let images = Tensor::from_slice(&ds.images)
                .reshape([n, h, w, c])
                .permute([0, 3, 1, 2])
                .contiguous()
                .to_device(device);
            let labels = (config.label_dim() > 0).then(|| {
                Tensor::eye(config.label_dim(), (Kind::Float, device)).index_select(0, &Tensor::from_slice(&ds.labels).to_device(device))
            });
            Some(crate::train::dmd::RealImages { images, labels })
        } else {
            None
        };
        let progress_dir = ctx.out_dir.join("progress");
        let grid_at = |it: u64, g: &Denoiser| -> anyhow::Result<()> {
            std::fs::create_dir_all(&progress_dir)?;
            let grid = class_grid(
                config.img_resolution(),
                config.img_channels(),
                config.label_dim(),
                &class_names,
                self.grid_columns,
                0,
                device,
                |z, y| {
                    let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.train.bf16).expect("autocast");
                    sample(g, z, y, &one)
                },
            );
            grid.save_png(&progress_dir.join(format!("grid-iter{it:07}.png")))
        };
        if !ctx.work_dir.join("dmd_checkpoint.safetensors").exists() {
            evaluate(0, &generator)?;
        }
        let (grid_every, eval_every) = (self.grid_every.unwrap_or(0), self.eval.as_ref().map_or(0, |e| e.every));
        let mut hook = |it: u64, g: &Denoiser| -> anyhow::Result<()> {
            if is_mlp {
                return Ok(());
            }
            if grid_every > 0 && it.is_multiple_of(grid_every) {
                grid_at(it, g)?;
            }
            if eval_every > 0 && it.is_multiple_of(eval_every) {
                evaluate(it, g)?;
            }
            Ok(())
        };
        let grids = (grid_every > 0 || eval_every > 0).then_some((1, &mut hook as &mut dyn FnMut(u64, &Denoiser) -> anyhow::Result<()>));
        let summary = dmd_train_with_grids(
            &teacher,
            &generator,
            &fake,
            ema.as_ref(),
            pairs.as_ref(),
            &self.train,
            &ctx.work_dir,
            |r| {
                bar.set_position(r.iteration);
                bar.set_message(format!(
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
                csv.push_str(&format!(
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
            },
            grids,
            lpips.as_ref(),
            real_images.as_ref(),
        )?;
        if !crate::dist::is_main() {
            return Ok(serde_json::json!({})); // a worker: rank 0 writes the outputs
        }
        std::fs::write(ctx.measurements_dir()?.join("dmd_log.csv"), csv)?;
        evaluate(summary.iterations, &generator)?;
        if !fid_curve.is_empty() {
            let mut c = String::from(if fid_curve_ema.is_empty() {
                "iteration,fid\n"
            } else {
                "iteration,fid,fid_ema\n"
            });
            for (k, (i, f)) in fid_curve.iter().enumerate() {
                match fid_curve_ema.get(k) {
                    Some((_, fe)) => c.push_str(&format!("{i},{f},{fe}\n")),
                    None => c.push_str(&format!("{i},{f}\n")),
                }
            }
            std::fs::write(ctx.out_dir.join("fid_curve.csv"), c)?;
            let pts = |v: &[(u64, f64)]| v.iter().map(|&(i, f)| (i as f64, f)).collect::<Vec<(f64, f64)>>();
            let mut lines = vec![("fid", pts(&fid_curve))];
            if !fid_curve_ema.is_empty() {
                lines.push(("fid ema", pts(&fid_curve_ema)));
            }
            line_plot("one-step FID vs DMD iteration", &lines, true).save_png(&ctx.out_dir.join("fid_curve.png"))?;
        }
        let series =
            |f: fn(&crate::train::dmd::DmdLogRow) -> f64| summary.log.iter().map(|r| (r.iteration as f64, f(r))).collect::<Vec<_>>();
        line_plot(
            "DMD losses vs iteration",
            &[
                ("loss_dm", series(|r| r.loss_dm)),
                ("loss_reg", series(|r| r.loss_reg)),
                ("loss_fake", series(|r| r.loss_fake)),
            ],
            true,
        )
        .save_png(&ctx.out_dir.join("losses.png"))?;
        let (main, other, other_file) = match (&ema, self.export_ema) {
            (Some(e), true) => (e, Some(&generator), "generator_raw.safetensors"),
            (Some(e), false) => (&generator, Some(e), "generator_ema.safetensors"),
            (None, _) => (&generator, None, ""),
        };
        weights::save_safetensors(main, &ctx.out_dir.join(crate::artifact::denoiser::WEIGHTS_FILE)).context("saving the generator")?;
        if let Some(o) = other {
            weights::save_safetensors(o, &ctx.out_dir.join(other_file))?;
        }
        let last = summary.log.last();
        let mut m = serde_json::json!({
            "iterations": summary.iterations,
            "seconds": summary.seconds,
            "iterations_per_second": summary.iterations_per_second,
            "resumed_from": summary.resumed_from,
            "final_loss_dm": last.map(|r| r.loss_dm),
            "final_loss_reg": last.map(|r| r.loss_reg),
            "final_loss_fake": last.map(|r| r.loss_fake),
            "final_loss_gan_g": last.map(|r| r.loss_gan_g),
            "final_loss_gan_d": last.map(|r| r.loss_gan_d),
            "parameters": generator.num_params(),
        });
        if let Some(&(_, last_fid)) = fid_curve.last() {
            m["fid_curve"] = serde_json::json!(fid_curve);
            m["fid_at_end"] = last_fid.into();
        }
        if let Some(&(_, last_fid)) = fid_curve_ema.last() {
            m["fid_curve_ema"] = serde_json::json!(fid_curve_ema);
            m["fid_ema_at_end"] = last_fid.into();
        }
        m["exported"] = if self.export_ema { "ema" } else { "raw" }.into();
        if matches!(config, crate::nn::NetworkConfig::Mlp(_)) {
            let extra = toy_report(ctx, &teacher, &generator, &one, self.dataset.is_some())?;
            m.as_object_mut().expect("object").extend(extra);
        } else {
            let names: Vec<String> = match &self.dataset {
                Some(_) => crate::data::artifact::read_info(ctx.upstream_dir("dataset")?)?.classes,
                None => (0..config.label_dim().min(10)).map(|i| format!("class {i}")).collect(),
            };
            let names: Vec<String> = if config.label_dim() > 0 {
                names.into_iter().take(10).collect()
            } else {
                Vec::new()
            };
            let grid = class_grid(
                config.img_resolution(),
                config.img_channels(),
                config.label_dim(),
                &names,
                self.grid_columns,
                0,
                device,
                |z, y| {
                    let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.train.bf16).expect("autocast");
                    sample(&generator, z, y, &one)
                },
            );
            grid.save_png(&ctx.out_dir.join("grid.png"))?;
        }
        Ok(m)
    }
}

/// 2-D data: scatter of teacher (Heun) vs student (one step) samples, and energy distances of
/// both to the data.
fn toy_report(
    ctx: &StageContext,
    teacher: &Denoiser,
    generator: &Denoiser,
    one: &SamplerConfig,
    has_data: bool,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let n = 2000usize;
    let seeds: Vec<u64> = (0..n as u64).collect();
    let z = crate::sample::latents(&seeds, &[2], generator.device());
    let student = sample(generator, &z, None, one);
    let teacher_s = sample(teacher, &z, None, &SamplerConfig::default());
    let pts = |t: &Tensor| {
        Vec::<Vec<f32>>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float))
            .map(|v| v.into_iter().map(|p| [p[0], p[1]]).collect::<Vec<[f32; 2]>>())
    };
    let (s, t) = (pts(&student)?, pts(&teacher_s)?);
    let mut out = serde_json::Map::new();
    let all: Vec<&[f32; 2]> = s.iter().chain(t.iter()).collect();
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for p in &all {
        for d in 0..2 {
            if p[d].is_finite() {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
            }
        }
    }
    let mut canvas = Canvas::new(512, 512, [255, 255, 255]);
    for p in &t {
        canvas.dot(p[0], p[1], lo, hi, [255, 127, 14]);
    }
    for p in &s {
        canvas.dot(p[0], p[1], lo, hi, [31, 119, 180]);
    }
    canvas.text(8, 8, "teacher heun", 2, [255, 127, 14]);
    canvas.text(8, 26, "student one step", 2, [31, 119, 180]);
    canvas.frame([0, 0, 0]);
    canvas.save_png(&ctx.out_dir.join("scatter.png"))?;
    if has_data {
        let data = crate::data::artifact::PointsDataset::read(ctx.upstream_dir("dataset")?)?;
        let d: Vec<[f32; 2]> = data.points.iter().take(n).copied().collect();
        out.insert("energy_distance_student".into(), energy_distance(&s, &d).into());
        out.insert("energy_distance_teacher".into(), energy_distance(&t, &d).into());
    }
    Ok(out)
}

/// 2 E|X - Y| - E|X - X'| - E|Y - Y'|.
pub fn energy_distance(a: &[[f32; 2]], b: &[[f32; 2]]) -> f64 {
    let mean = |p: &[[f32; 2]], q: &[[f32; 2]]| {
        let mut s = 0.0f64;
        for x in p {
            for y in q {
                s += (((x[0] - y[0]) as f64).powi(2) + ((x[1] - y[1]) as f64).powi(2)).sqrt();
            }
        }
        s / (p.len() * q.len()).max(1) as f64
    };
    2.0 * mean(a, b) - mean(a, a) - mean(b, b)
}
