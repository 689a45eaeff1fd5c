//! `teacher`: an EDM denoiser, trained on a dataset stage or imported from a weights file
//! (safetensors, EDM's `.pkl`, or a torch zip checkpoint).

use std::path::PathBuf;

use anyhow::{Context, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext, Upstream};
use crate::data::artifact::ImageDataset;
use crate::nn::{Denoiser, NetworkConfig, weights};
use crate::sample::{SamplerConfig, class_grid, sample};
use crate::train::device_data::DeviceImages;
use crate::train::teacher::{TrainOptions, train, train_with_grids};

use crate::artifact::denoiser::WEIGHTS_FILE;

fn d_columns() -> usize {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GridOptions {
    #[serde(default = "d_columns")]
    pub columns: usize,
    /// Also draw a grid every this many training steps (into `progress/` of the output).
    pub every_steps: Option<u64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub sampler: SamplerConfig,
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            columns: 10,
            every_steps: None,
            seed: 0,
            sampler: SamplerConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TeacherMode {
    Train,
    Import,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeacherParams {
    pub mode: TeacherMode,
    /// The image dataset stage to train on (mode = "train"); its class names label the grid.
    pub dataset: Option<String>,
    /// Weights to import (mode = "import"): `.safetensors`, EDM's `.pkl`, or a torch `.pt` zip.
    pub weights: Option<PathBuf>,
    /// The network. For imports, checked against the file's own config when it has one.
    pub network: Option<NetworkConfig>,
    #[serde(default)]
    pub train: TrainOptions,
    #[serde(default)]
    pub grid: GridOptions,
}

impl Stage for TeacherParams {
    fn data_parallel(&self) -> bool {
        matches!(self.mode, TeacherMode::Train)
    }
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Denoiser
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[("dataset", self.dataset.as_ref(), &[ArtifactType::Images, ArtifactType::Points2d])])
    }
    fn input_paths(&self) -> Vec<InputPath> {
        self.weights
            .iter()
            .map(|w| InputPath {
                role: "weights",
                path: w.clone(),
            })
            .collect()
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if let Some(Err(e)) = self.network.as_ref().map(NetworkConfig::check) {
            return Err(FieldIssue::new("network", e));
        }
        if let Err(e) = self.grid.sampler.check() {
            return Err(FieldIssue::new("grid", format!("grid.{e}")));
        }
        if self.train.checkpoint_every == 0 || self.train.log_every == 0 {
            return Err(FieldIssue::new(
                "train",
                "train.checkpoint_every and train.log_every must be at least 1",
            ));
        }
        if self.train.micro_batch == Some(0) {
            return Err(FieldIssue::new("train", "train.micro_batch must be at least 1"));
        }
        if let Some(a) = &self.train.augment {
            self.check_augment(a)?;
        }
        match self.mode {
            TeacherMode::Train if self.dataset.is_none() => Err(FieldIssue::new("mode", "mode = \"train\" needs `dataset`")),
            TeacherMode::Train if self.network.is_none() => Err(FieldIssue::new("mode", "mode = \"train\" needs a `network` table")
                .help("e.g. network = { arch = \"ddpmpp\" } for EDM's CIFAR-10 DDPM++")),
            TeacherMode::Import if self.weights.is_none() => Err(FieldIssue::new("mode", "mode = \"import\" needs `weights`")),
            _ if self.train.batch == 0 => Err(FieldIssue::new("train", "train.batch must be at least 1")),
            _ if self.grid.columns == 0 => Err(FieldIssue::new("grid", "grid.columns must be at least 1")),
            _ => Ok(()),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let device = crate::torch_shim::device(&ctx.device)?;
        let points = match &self.dataset {
            Some(_) if crate::data::artifact::read_info(ctx.upstream_dir("dataset")?)?.shape == [2] => {
                Some(crate::data::artifact::PointsDataset::read(ctx.upstream_dir("dataset")?)?)
            }
            _ => None,
        };
        let dataset = match (&self.dataset, &points) {
            (Some(_), None) => Some(ImageDataset::read(ctx.upstream_dir("dataset")?)?),
            _ => None,
        };
        let classes = dataset.as_ref().map(|d| d.classes.clone()).unwrap_or_default();
        let mut metrics = serde_json::Map::new();
        let ema = match (&self.mode, &self.network, &points, &dataset) {
            (TeacherMode::Import, ..) => {
                let path = ctx.input("weights")?.to_path_buf();
                let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                metrics.insert("imported_from".into(), name.into());
                crate::nn::import::load_denoiser(&path, self.network.as_ref(), device)?
            }
            (TeacherMode::Train, Some(config), Some(pts), _) => return self.train_points(ctx, pts, config, device),
            (TeacherMode::Train, Some(config), None, Some(ds)) => match self.train_images(ctx, ds, config, device, &mut metrics)? {
                Some(ema) => ema,
                None => return Ok(serde_json::json!({})), // a worker: rank 0 writes the outputs
            },
            (TeacherMode::Train, ..) => bail!("mode = \"train\" needs `network` and `dataset`"),
        };
        weights::save_safetensors(&ema, &ctx.out_dir.join(WEIGHTS_FILE)).context("saving the teacher")?;
        metrics.insert("parameters".into(), ema.num_params().into());
        ctx.progress.set_message("sample grid");
        self.save_grid(&ema, &classes, device, &ctx.out_dir.join("grid.png"))?;
        metrics.insert("grid_sampler_calls".into(), self.grid.sampler.network_calls().into());
        Ok(serde_json::Value::Object(metrics))
    }
}

impl TeacherParams {
    /// Augmentation needs an image network whose `augment_dim` takes its labels, and eager steps
    /// (its padding is read back to the host each step).
    fn check_augment(&self, a: &crate::train::augment::AugmentOptions) -> Result<(), FieldIssue> {
        a.check().map_err(|e| FieldIssue::new("train", format!("train.{e}")))?;
        if self.train.cuda_graph {
            return Err(FieldIssue::new("train", "train.augment cannot run in a captured CUDA graph").help("set train.cuda_graph = false"));
        }
        let dim = match &self.network {
            Some(NetworkConfig::Ddpmpp(c)) => c.augment_dim,
            Some(NetworkConfig::Adm(c)) => c.augment_dim,
            Some(NetworkConfig::Mlp(_)) => {
                return Err(FieldIssue::new("train", "train.augment is for image networks (ddpmpp, adm)"));
            }
            None => return Ok(()),
        };
        if dim != a.label_dim() {
            return Err(FieldIssue::new(
                "network",
                format!("network.augment_dim is {dim}, but train.augment produces {} labels", a.label_dim()),
            )
            .help(format!("set network.augment_dim = {} (EDM's CIFAR-10 models: 9)", a.label_dim())));
        }
        Ok(())
    }

    /// A 2-D toy teacher: trained, saved with its loss plot, no grid.
    fn train_points(
        &self,
        ctx: &mut StageContext,
        pts: &crate::data::artifact::PointsDataset,
        config: &NetworkConfig,
        device: tch::Device,
    ) -> anyhow::Result<serde_json::Value> {
        let mut metrics = serde_json::Map::new();
        tch::manual_seed(self.train.seed as i64);
        let net = Denoiser::new(config, device);
        let ema = net.duplicate()?;
        let data = crate::train::device_data::DevicePoints::new(pts, device);
        let summary = train(&net, &ema, &data, &self.train, &ctx.work_dir, |_, images, _, _| {
            ctx.progress.set_position(images)
        })?;
        let curve: Vec<(f64, f64)> = summary.loss_curve.iter().map(|&(i, l)| (i as f64, l)).collect();
        crate::render::line_plot("teacher loss vs samples", &[("loss", curve)], true).save_png(&ctx.out_dir.join("loss.png"))?;
        metrics.insert("steps".into(), summary.steps.into());
        metrics.insert("final_loss".into(), summary.final_loss.into());
        metrics.insert("train_seconds".into(), summary.seconds.into());
        weights::save_safetensors(&ema, &ctx.out_dir.join(WEIGHTS_FILE)).context("saving the teacher")?;
        metrics.insert("parameters".into(), ema.num_params().into());
        return Ok(serde_json::Value::Object(metrics));
    }

    /// An image teacher, trained (data-parallel when the runner started a group) with progress
    /// grids; None on a worker rank.
    fn train_images(
        &self,
        ctx: &mut StageContext,
        ds: &ImageDataset,
        config: &NetworkConfig,
        device: tch::Device,
        metrics: &mut serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<Option<Denoiser>> {
        if ds.height as i64 != config.img_resolution() || ds.channels as i64 != config.img_channels() {
            bail!(
                "dataset images are {}x{}x{}, the network expects {}x{}x{}",
                ds.height,
                ds.width,
                ds.channels,
                config.img_resolution(),
                config.img_resolution(),
                config.img_channels()
            );
        }
        if config.label_dim() > 0 && config.label_dim() != ds.classes.len() as i64 {
            bail!(
                "the network has label_dim {} but the dataset has {} classes",
                config.label_dim(),
                ds.classes.len()
            );
        }
        let device = crate::dist::local_device(device);
        tch::manual_seed(self.train.seed as i64);
        let net = Denoiser::new(config, device);
        let mut ema = Denoiser::new(config, device);
        ema.copy_from(&net)?;
        let data = DeviceImages::new(ds, device);
        ctx.progress.set_length(self.train.images);
        let bar = ctx.progress.clone();
        let mut log = String::from("step,images,loss,images_per_second\n");
        let progress_dir = ctx.out_dir.join("progress");
        let names: Vec<String> = ds.classes.iter().take(10).cloned().collect();
        let (res, ch, ld) = (config.img_resolution(), config.img_channels(), config.label_dim());
        let mut hook = |step: u64, ema: &Denoiser| -> anyhow::Result<()> {
            std::fs::create_dir_all(&progress_dir)?;
            let grid = class_grid(res, ch, ld, &names, self.grid.columns, self.grid.seed, device, |z, y| {
                let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.train.bf16).expect("autocast");
                sample(ema, z, y, &self.grid.sampler)
            });
            grid.save_png(&progress_dir.join(format!("grid-step{step:07}.png")))
        };
        let grids = self
            .grid
            .every_steps
            .map(|n| (n, &mut hook as &mut dyn FnMut(u64, &Denoiser) -> anyhow::Result<()>));
        let summary = train_with_grids(
            &net,
            &ema,
            &data,
            &self.train,
            &ctx.work_dir,
            |step, images, loss, rate| {
                bar.set_position(images);
                bar.set_message(format!("loss {loss:.4} {rate:.0} img/s"));
                tracing::info!(step, images, loss, rate, "train");
                log.push_str(&format!("{step},{images},{loss},{rate}\n"));
            },
            grids,
        )?;
        if !crate::dist::is_main() {
            return Ok(None);
        }
        std::fs::write(ctx.measurements_dir()?.join("training.csv"), log)?;
        let curve: Vec<(f64, f64)> = summary.loss_curve.iter().map(|&(i, l)| (i as f64, l)).collect();
        crate::render::line_plot("teacher loss vs images", &[("loss", curve)], true).save_png(&ctx.out_dir.join("loss.png"))?;
        metrics.insert("steps".into(), summary.steps.into());
        metrics.insert("images_seen".into(), summary.images.into());
        metrics.insert("final_loss".into(), summary.final_loss.into());
        metrics.insert("train_seconds".into(), summary.seconds.into());
        metrics.insert("images_per_second".into(), summary.images_per_second.into());
        metrics.insert("resumed_from_step".into(), summary.resumed_from_step.into());
        Ok(Some(ema))
    }

    /// The final grid: a row per class (at most 10), the stage's own sampler.
    fn save_grid(&self, ema: &Denoiser, classes: &[String], device: tch::Device, path: &std::path::Path) -> anyhow::Result<()> {
        let cfg = &ema.config;
        let names: Vec<String> = if cfg.label_dim() > 0 {
            if classes.len() as i64 == cfg.label_dim() {
                // At most 10 labelled rows (the first classes) for models with many classes.
                classes.iter().take(10).cloned().collect()
            } else {
                (0..cfg.label_dim().min(10)).map(|i| format!("class {i}")).collect()
            }
        } else {
            Vec::new()
        };
        let grid = class_grid(
            cfg.img_resolution(),
            cfg.img_channels(),
            cfg.label_dim(),
            &names,
            self.grid.columns,
            self.grid.seed,
            device,
            |z, y| {
                let _ac = crate::torch_shim::AutocastBf16::new(device.is_cuda() && self.train.bf16).expect("autocast");
                sample(ema, z, y, &self.grid.sampler)
            },
        );
        grid.save_png(path)
    }
}
