//! `image-folder`: one subfolder per class of image files, resized to a square resolution
//! (how AFHQ, ILSVRC-2012 and most custom datasets arrive). The transforms are EDM's dataset
//! tool's, bit for bit: JPEGs decoded by libjpeg-turbo as PIL decodes them, the centred square
//! cropped at the same offsets, Pillow's Lanczos resampling (`data::resample`), so an ImageNet-64
//! made from the ILSVRC class folders equals EDM's `imagenet-64x64.zip`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext};
use crate::data::artifact::ImageDataset;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transform {
    /// Crop the largest centred square, then resize (keeps the aspect ratio): EDM's
    /// `--transform=center-crop`, used for its ImageNet-64.
    #[default]
    CenterCrop,
    /// Resize the whole image to a square (distorts non-square images): EDM's dataset tool
    /// without `--transform`.
    Resize,
}

fn default_max_side() -> u32 {
    8192
}

fn default_extensions() -> Vec<String> {
    ["png", "jpg", "jpeg"].iter().map(|s| s.to_string()).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderParams {
    /// Directory with one subfolder per class.
    pub source: PathBuf,
    /// Output images are `resolution` x `resolution` RGB.
    pub resolution: u32,
    /// Class folders in label order; default: every subfolder, sorted by name.
    pub classes: Option<Vec<String>>,
    /// Keep class labels (false: an unconditional dataset, every label 0).
    #[serde(default = "super::yes")]
    pub labels: bool,
    #[serde(default)]
    pub transform: Transform,
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// Images wider or taller than this are refused before they are decoded.
    #[serde(default = "default_max_side")]
    pub max_side: u32,
}

impl ImageFolderParams {
    fn class_dirs(&self, root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
        if !root.is_dir() {
            bail!("image folder {} does not exist or is not a directory", root.display());
        }
        let names = match &self.classes {
            Some(c) => c.clone(),
            None => {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
                    let entry = entry?;
                    // A tagged cache folder (e.g. dmdpipe's own cache placed here) is no class.
                    if entry.file_type()?.is_dir() && !entry.path().join("CACHEDIR.TAG").is_file() {
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                names.sort();
                if names.is_empty() {
                    bail!("{} has no class subfolders", root.display());
                }
                names
            }
        };
        names
            .into_iter()
            .map(|n| {
                let dir = root.join(&n);
                if !dir.is_dir() {
                    bail!("class folder {} is missing", dir.display());
                }
                Ok((n, dir))
            })
            .collect()
    }

    fn load(&self, path: &Path) -> anyhow::Result<Vec<u8>> {
        let img = crate::data::image::decode_rgb(path, self.max_side)?;
        let img = match self.transform {
            Transform::CenterCrop => crate::data::image::center_square(&img),
            Transform::Resize => img,
        };
        let (w, h) = img.dimensions();
        let r = self.resolution as usize;
        Ok(crate::data::resample::lanczos_rgb(img.as_raw(), w as usize, h as usize, r, r))
    }

    /// Every file decoded and resized, in order, on as many threads as libtorch may use.
    fn load_all(&self, files: &[(i64, PathBuf)], progress: &indicatif::ProgressBar) -> anyhow::Result<Vec<u8>> {
        const CHUNK: usize = 64;
        let per_image = (self.resolution * self.resolution * 3) as usize;
        let mut images = vec![0u8; files.len() * per_image];
        let work = Mutex::new(images.chunks_mut(CHUNK * per_image).zip(files.chunks(CHUNK)));
        let failed = AtomicBool::new(false);
        let threads = (tch::get_num_threads().max(1) as usize).min(files.len().div_ceil(CHUNK).max(1));
        let worker = || -> anyhow::Result<()> {
            while !failed.load(Ordering::Relaxed) {
                let Some((out, batch)) = work.lock().expect("image queue lock").next() else {
                    return Ok(());
                };
                for (dst, (_, path)) in out.chunks_mut(per_image).zip(batch) {
                    let pixels = self.load(path).inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                    dst.copy_from_slice(&pixels);
                    progress.inc(1);
                }
            }
            Ok(())
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
            handles.into_iter().try_for_each(|h| h.join().expect("image worker panicked"))
        })?;
        Ok(images)
    }
}

impl Stage for ImageFolderParams {
    fn version(&self) -> u32 {
        // 2: JPEG decoding and Lanczos resampling as EDM's dataset tool (PIL) does them.
        2
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Images
    }
    fn input_paths(&self) -> Vec<InputPath> {
        vec![InputPath::source(&self.source)]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if self.resolution == 0 || self.resolution > 4096 {
            return Err(FieldIssue::new(
                "resolution",
                format!("resolution {} is outside 1..=4096", self.resolution),
            ));
        }
        if matches!(&self.classes, Some(c) if c.is_empty()) {
            return Err(FieldIssue::new("classes", "`classes` is empty").help("omit it to use every subfolder"));
        }
        if self.extensions.is_empty() {
            return Err(FieldIssue::new("extensions", "`extensions` is empty"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let root = ctx.input("source")?.to_path_buf();
        let classes = self.class_dirs(&root)?;
        let mut files = Vec::new();
        for (label, (_, dir)) in classes.iter().enumerate() {
            let mut these: Vec<PathBuf> = walkdir::WalkDir::new(dir)
                .sort_by_file_name()
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .filter(|p| {
                    p.extension()
                        .map(|x| self.extensions.iter().any(|e| x.eq_ignore_ascii_case(e.as_str())))
                        .unwrap_or(false)
                })
                .collect();
            if these.is_empty() {
                bail!(
                    "class folder {} holds no images with extensions {:?}",
                    dir.display(),
                    self.extensions
                );
            }
            these.sort();
            files.extend(these.into_iter().map(|p| (label as i64, p)));
        }
        ctx.progress.set_length(files.len() as u64);
        let images = self.load_all(&files, &ctx.progress)?;
        let labels = files.iter().map(|(label, _)| if self.labels { *label } else { 0 }).collect();
        let ds = ImageDataset {
            images,
            height: self.resolution as usize,
            width: self.resolution as usize,
            channels: 3,
            labels,
            classes: if self.labels {
                classes.into_iter().map(|(n, _)| n).collect()
            } else {
                Vec::new()
            },
        };
        ds.write(&ctx.out_dir)?;
        Ok(ds.metrics())
    }
}
