//! What a `dmd` stage leaves behind: the generator (raw or EMA as asked, the other beside it),
//! the loss and FID curves (CSV and plots), a class grid (images) or a teacher-vs-student
//! scatter with energy distances (2-D data), and the metrics.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::DmdParams;
use super::evaluate::FidCurve;
use super::networks::Networks;
use crate::eval::energy::energy_distance;
use crate::nn::{Denoiser, NetworkConfig, weights};
use crate::render::{Canvas, line_plot};
use crate::sample::{SamplerConfig, class_grid, sample};
use crate::stages::StageContext;
use crate::train::dmd::{DmdLogRow, DmdSummary};

/// Up to ten class names for grids: the dataset's, or "class i".
pub fn class_names(p: &DmdParams, ctx: &StageContext, config: &NetworkConfig) -> Result<Vec<String>> {
    if config.label_dim() == 0 {
        return Ok(Vec::new());
    }
    let names = match &p.dataset {
        Some(_) => crate::data::artifact::read_info(ctx.upstream_dir("dataset")?)?.classes,
        None => (0..config.label_dim().min(10)).map(|i| format!("class {i}")).collect(),
    };
    Ok(names.into_iter().take(10).collect())
}

/// One-step sample grids of a generator: a row per class, fixed seeds.
pub struct Grids<'a> {
    out_dir: PathBuf,
    config: &'a NetworkConfig,
    class_names: Vec<String>,
    columns: usize,
    one_step: &'a SamplerConfig,
    bf16: bool,
}

impl<'a> Grids<'a> {
    pub fn new(
        out_dir: &Path,
        config: &'a NetworkConfig,
        class_names: Vec<String>,
        columns: usize,
        one_step: &'a SamplerConfig,
        bf16: bool,
    ) -> Self {
        Grids {
            out_dir: out_dir.to_path_buf(),
            config,
            class_names,
            columns,
            one_step,
            bf16,
        }
    }

    /// Draws `generator`'s grid into `name` under the output folder.
    pub fn save(&self, generator: &Denoiser, name: &str) -> Result<()> {
        let path = self.out_dir.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let c = self.config;
        let device = generator.device();
        let cuda_bf16 = device.is_cuda() && self.bf16;
        let grid = class_grid(
            c.img_resolution(),
            c.img_channels(),
            c.label_dim(),
            &self.class_names,
            self.columns,
            0,
            device,
            |z, y| {
                let _ac = crate::torch_shim::AutocastBf16::new(cuda_bf16).expect("autocast");
                sample(generator, z, y, self.one_step)
            },
        );
        grid.save_png(&path)
    }
}

/// Writes the outputs of a finished run and returns its metrics.
#[allow(clippy::too_many_arguments)]
pub fn write(
    p: &DmdParams,
    ctx: &StageContext,
    nets: &Networks,
    summary: &DmdSummary,
    curve: &FidCurve,
    grids: Option<&Grids>,
    one_step: &SamplerConfig,
) -> Result<serde_json::Value> {
    write_fid_curve(&ctx.out_dir, curve)?;
    write_loss_plot(&ctx.out_dir, &summary.log)?;
    export(p, &ctx.out_dir, nets)?;
    let mut m = metrics(p, nets, summary, curve);
    match grids {
        Some(g) => g.save(&nets.generator, "grid.png")?,
        None => {
            let extra = toy_report(ctx, &nets.teacher, &nets.generator, one_step, p.dataset.is_some())?;
            m.extend(extra);
        }
    }
    Ok(serde_json::Value::Object(m))
}

fn write_fid_curve(out_dir: &Path, curve: &FidCurve) -> Result<()> {
    if curve.raw.is_empty() {
        return Ok(());
    }
    let mut c = String::from(if curve.ema.is_empty() {
        "iteration,fid\n"
    } else {
        "iteration,fid,fid_ema\n"
    });
    for (k, (i, f)) in curve.raw.iter().enumerate() {
        match curve.ema.get(k) {
            Some((_, fe)) => c.push_str(&format!("{i},{f},{fe}\n")),
            None => c.push_str(&format!("{i},{f}\n")),
        }
    }
    std::fs::write(out_dir.join("fid_curve.csv"), c)?;
    let pts = |v: &[(u64, f64)]| v.iter().map(|&(i, f)| (i as f64, f)).collect::<Vec<(f64, f64)>>();
    let mut lines = vec![("fid", pts(&curve.raw))];
    if !curve.ema.is_empty() {
        lines.push(("fid ema", pts(&curve.ema)));
    }
    line_plot("one-step FID vs DMD iteration", &lines, true).save_png(&out_dir.join("fid_curve.png"))
}

fn write_loss_plot(out_dir: &Path, log: &[DmdLogRow]) -> Result<()> {
    let series = |f: fn(&DmdLogRow) -> f64| log.iter().map(|r| (r.iteration as f64, f(r))).collect::<Vec<_>>();
    let lines = [
        ("loss_dm", series(|r| r.loss_dm)),
        ("loss_reg", series(|r| r.loss_reg)),
        ("loss_fake", series(|r| r.loss_fake)),
    ];
    line_plot("DMD losses vs iteration", &lines, true).save_png(&out_dir.join("losses.png"))
}

/// The stage's denoiser artifact (raw or EMA generator, as `export_ema` says), the other beside.
fn export(p: &DmdParams, out_dir: &Path, nets: &Networks) -> Result<()> {
    let (main, other, other_file) = match (&nets.ema, p.export_ema) {
        (Some(e), true) => (e, Some(&nets.generator), "generator_raw.safetensors"),
        (Some(e), false) => (&nets.generator, Some(e), "generator_ema.safetensors"),
        (None, _) => (&nets.generator, None, ""),
    };
    weights::save_safetensors(main, &crate::artifact::denoiser::weights_path(out_dir)).context("saving the generator")?;
    if let Some(o) = other {
        weights::save_safetensors(o, &out_dir.join(other_file))?;
    }
    Ok(())
}

fn metrics(p: &DmdParams, nets: &Networks, summary: &DmdSummary, curve: &FidCurve) -> serde_json::Map<String, serde_json::Value> {
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
        "parameters": nets.generator.num_params(),
    });
    if let Some(&(_, last_fid)) = curve.raw.last() {
        m["fid_curve"] = serde_json::json!(curve.raw);
        m["fid_at_end"] = last_fid.into();
    }
    if let Some(&(_, last_fid)) = curve.ema.last() {
        m["fid_curve_ema"] = serde_json::json!(curve.ema);
        m["fid_ema_at_end"] = last_fid.into();
    }
    m["exported"] = if p.export_ema { "ema" } else { "raw" }.into();
    match m {
        serde_json::Value::Object(o) => o,
        _ => serde_json::Map::new(),
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
