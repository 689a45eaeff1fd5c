//! Stage kinds. Each kind is a typed params struct implementing [`Stage`]; the registry below
//! maps the `kind` string of a pipeline file to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod cifar10;
pub mod dmd;
mod edm_dataset;
pub mod estimate;
pub mod fid;
mod gmm2d;
mod image_folder;
mod imagenet64;
pub mod ode_pairs;
mod sample_grid;
mod scatter_plot;
mod subset;
pub mod teacher;

pub use cifar10::Cifar10Params;
pub use dmd::DmdParams;
pub use edm_dataset::EdmDatasetParams;
pub use fid::{FidParams, FidRefParams};
pub use gmm2d::{Gmm2dComponent, Gmm2dParams};
pub use image_folder::ImageFolderParams;
pub use imagenet64::Imagenet64Params;
pub use ode_pairs::OdePairsParams;
pub use sample_grid::SampleGridParams;
pub use scatter_plot::ScatterPlotParams;
pub use subset::SubsetParams;
pub use teacher::TeacherParams;

/// `#[serde(default = "super::yes")]`: a flag that is on unless the file turns it off.
pub(crate) fn yes() -> bool {
    true
}

/// Whether `device` (a stage's `device` setting) names a CUDA device here.
pub fn device_is_cuda(device: &str) -> anyhow::Result<bool> {
    Ok(crate::torch_shim::device(device)?.is_cuda())
}

/// How many CUDA devices this process sees (0 without libtorch_cuda or a GPU).
pub fn cuda_device_count() -> usize {
    if crate::torch_shim::init_cuda() {
        tch::Cuda::device_count() as usize
    } else {
        0
    }
}

/// What a stage's output directory holds, so references can be checked before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactType {
    /// `images.safetensors` (uint8 NHWC `images`, int64 `labels`) + `dataset.json`.
    Images,
    /// `points.safetensors` (f32 `points` [N, 2], int64 `labels`) + `dataset.json`.
    Points2d,
    /// `denoiser.safetensors`: an EDM denoiser's weights with its config in the metadata.
    Denoiser,
    /// `pairs-*.safetensors` (z, labels, x) + `pairs.json`: teacher ODE pairs.
    Pairs,
    /// `stats.npz`: Inception feature statistics (EDM's layout).
    FidStats,
    /// Pictures and metrics only; nothing downstream consumes it.
    Report,
}

/// A reference from a stage field to another stage's output.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The field that names the stage; also the role under which its digest enters the key.
    pub role: &'static str,
    pub stage: String,
    pub accepts: &'static [ArtifactType],
}

/// The references of a stage's fields that name other stages: (field, the stage it names if
/// set, the artifact types it accepts).
pub type Reference<'a> = (&'static str, Option<&'a String>, &'static [ArtifactType]);

pub fn references(fields: &[Reference]) -> Vec<Upstream> {
    fields
        .iter()
        .filter_map(|&(role, stage, accepts)| {
            stage.map(|s| Upstream {
                role,
                stage: s.clone(),
                accepts,
            })
        })
        .collect()
}

/// A file or directory a stage reads, hashed into its key (the path itself is not).
#[derive(Debug, Clone)]
pub struct InputPath {
    pub role: &'static str,
    pub path: PathBuf,
}

impl InputPath {
    /// The `source` a dataset kind reads (a file or a folder).
    pub fn source(path: &std::path::Path) -> Self {
        InputPath {
            role: "source",
            path: path.to_path_buf(),
        }
    }
}

/// A semantic problem with one field.
#[derive(Debug, Clone)]
pub struct FieldIssue {
    pub field: String,
    pub message: String,
    pub help: Option<String>,
}

impl FieldIssue {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldIssue {
            field: field.to_string(),
            message: message.into(),
            help: None,
        }
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// The folder of a stage's output for measurements that differ from run to run (durations,
/// rates, logs with them): kept with the artifact, left out of what downstream keys see.
pub const MEASUREMENTS_DIR: &str = "measurements";

/// Checks that a count a stage will allocate or loop over lies in 1..=`max`.
pub fn count_in_range(field: &str, value: u64, max: u64) -> Result<(), FieldIssue> {
    if value == 0 {
        return Err(FieldIssue::new(field, format!("`{field}` must be at least 1")));
    }
    if value > max {
        let shown = estimate::group_thousands(max);
        return Err(FieldIssue::new(field, format!("`{field}` must be at most {shown} (got {value})")));
    }
    Ok(())
}

/// What a stage's seeded latents are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedUse {
    /// Latents a student learns from (ODE pairs).
    Training,
    /// Latents a metric is computed on (FID samples).
    Evaluation,
}

/// The seeds a stage draws latents from (latent i from seed i): a pipeline refuses evaluation
/// seeds that overlap training seeds, so that no metric is computed on a latent the student
/// was regressed on.
#[derive(Debug, Clone)]
pub struct LatentSeeds {
    pub field: &'static str,
    pub purpose: SeedUse,
    pub seeds: std::ops::Range<u64>,
}

/// What the runner hands a running stage. Stages never touch the cache themselves.
pub struct StageContext {
    pub stage_name: String,
    /// Write every output here; it becomes the artifact when the stage succeeds.
    pub out_dir: PathBuf,
    /// Survives a crash: resumable work (checkpoints) for this exact cache key.
    pub work_dir: PathBuf,
    /// Where downloads are kept between runs (content-verified by the stage).
    pub downloads_dir: PathBuf,
    /// Upstream artifact directories by role.
    pub upstream: BTreeMap<String, PathBuf>,
    /// Resolved input paths by role.
    pub inputs: BTreeMap<String, PathBuf>,
    pub progress: indicatif::ProgressBar,
    /// Device requested by the pipeline (`auto`, `cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// CUDA devices for data-parallel training (empty or one: a single process).
    pub devices: Vec<usize>,
}

impl StageContext {
    pub fn upstream_dir(&self, role: &str) -> anyhow::Result<&Path> {
        self.upstream
            .get(role)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("no upstream artifact for `{role}`"))
    }
    /// `out_dir/measurements`, created: where logs with timings go.
    pub fn measurements_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.out_dir.join(MEASUREMENTS_DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
    pub fn input(&self, role: &str) -> anyhow::Result<&Path> {
        self.inputs
            .get(role)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("no input path for `{role}`"))
    }
}

/// One stage kind's behaviour. Params structs implement it.
pub trait Stage {
    /// Bump when the implementation changes what it produces: every cached result of the kind
    /// becomes stale.
    fn version(&self) -> u32;
    fn output_type(&self) -> ArtifactType;
    fn upstream(&self) -> Vec<Upstream> {
        Vec::new()
    }
    fn input_paths(&self) -> Vec<InputPath> {
        Vec::new()
    }
    /// Fields that do not change the result (e.g. a download URL when the content is pinned by
    /// digest) and so stay out of the cache key.
    fn non_key_fields(&self) -> &'static [&'static str] {
        &[]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        Ok(())
    }
    fn latent_seeds(&self) -> Vec<LatentSeeds> {
        Vec::new()
    }
    /// Whether the runner may start it on several GPUs at once (one process per GPU, every rank
    /// running `run`, only rank 0 writing outputs).
    fn data_parallel(&self) -> bool {
        false
    }
    /// Runs the stage, writing outputs into `ctx.out_dir`; returns metrics (a JSON object).
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value>;
}

macro_rules! stage_kinds {
    ($($kind:literal => $variant:ident($ty:ty)),* $(,)?) => {
        /// A stage's kind and typed params: one variant per kind.
        #[derive(Debug, Clone, Serialize, JsonSchema)]
        #[serde(tag = "kind")]
        pub enum StageSpec {
            $( #[serde(rename = $kind)] $variant($ty), )*
        }

        /// Every kind a pipeline may name.
        pub const KINDS: &[&str] = &[$($kind),*];

        impl StageSpec {
            /// Deserializes the params of `kind`; `None` when the kind is unknown.
            pub fn parse<'de, D: serde::Deserializer<'de>>(kind: &str, de: D) -> Option<Result<Self, D::Error>> {
                match kind {
                    $( $kind => Some(<$ty>::deserialize(de).map(StageSpec::$variant)), )*
                    _ => None,
                }
            }
            pub fn kind(&self) -> &'static str {
                match self { $( StageSpec::$variant(_) => $kind, )* }
            }
            pub fn stage(&self) -> &dyn Stage {
                match self { $( StageSpec::$variant(p) => p, )* }
            }
            /// The params as JSON (without `kind`).
            pub fn params_json(&self) -> serde_json::Value {
                let value = match self { $( StageSpec::$variant(p) => serde_json::to_value(p), )* };
                value.expect("stage params serialize to JSON")
            }
        }
    };
}

stage_kinds! {
    "gmm2d" => Gmm2d(Gmm2dParams),
    "cifar10" => Cifar10(Cifar10Params),
    "image-folder" => ImageFolder(ImageFolderParams),
    "edm-dataset" => EdmDataset(EdmDatasetParams),
    "imagenet64" => Imagenet64(Imagenet64Params),
    "subset" => Subset(SubsetParams),
    "scatter-plot" => ScatterPlot(ScatterPlotParams),
    "teacher" => Teacher(TeacherParams),
    "fid-ref" => FidRef(FidRefParams),
    "fid" => Fid(FidParams),
    "sample-grid" => SampleGrid(SampleGridParams),
    "ode-pairs" => OdePairs(OdePairsParams),
    "dmd" => Dmd(DmdParams),
}

impl StageSpec {
    /// Runs the stage from default numerics (strict fp32, no GroupNorm override), whatever ran
    /// before it in this process, and puts them back afterwards.
    pub fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let _numerics = crate::torch_shim::NumericsScope::defaults();
        self.stage().run(ctx)
    }

    /// The params that enter the cache key: everything but stage references, input paths
    /// (their digests enter instead) and fields the kind marks as not affecting the result.
    pub fn key_params(&self) -> serde_json::Value {
        let mut value = self.params_json();
        let stage = self.stage();
        if let Some(map) = value.as_object_mut() {
            for up in stage.upstream() {
                map.remove(up.role);
            }
            for input in stage.input_paths() {
                map.remove(input.role);
            }
            for field in stage.non_key_fields() {
                map.remove(*field);
            }
            map.retain(|_, v| !v.is_null());
        }
        value
    }
}
