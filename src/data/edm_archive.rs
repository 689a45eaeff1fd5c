//! EDM's prepared datasets, as its `dataset_tool.py --dest` writes them: a zip (or a folder) of
//! images named `00000/img00000000.png`, ..., and `dataset.json` holding
//! `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`. Images are read in
//! sorted-name order with their labels, as EDM's `ImageFolderDataset` reads them, so a user's
//! existing `cifar10-32x32.zip` or `imagenet-64x64.zip` is the training set EDM used.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::artifact::ImageDataset;
use super::image::decode_rgb_bytes;

const LABELS_FILE: &str = "dataset.json";

/// Where the files live: inside a zip archive or under a folder.
enum Archive {
    Zip(Box<zip::ZipArchive<std::fs::File>>),
    Folder(PathBuf),
}

impl Archive {
    fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Archive::Folder(path.to_path_buf()));
        }
        super::file::check_regular(path)?;
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let zip = zip::ZipArchive::new(file).with_context(|| {
            format!(
                "{} is neither a folder nor a zip archive (EDM's dataset_tool.py --dest)",
                path.display()
            )
        })?;
        Ok(Archive::Zip(Box::new(zip)))
    }

    /// Every file's name, '/'-separated and relative to the archive's root.
    fn names(&self) -> Result<Vec<String>> {
        Ok(match self {
            Archive::Zip(z) => {
                let names = z.file_names().map(|n| n.map(|n| n.into_owned())).collect::<Result<Vec<_>, _>>()?;
                names.into_iter().filter(|n| !n.ends_with('/')).collect()
            }
            Archive::Folder(root) => walkdir::WalkDir::new(root)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .filter_map(|e| e.path().strip_prefix(root).ok().map(|p| p.to_string_lossy().replace('\\', "/")))
                .collect(),
        })
    }

    fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        match self {
            Archive::Zip(z) => {
                z.by_name(name)?.read_to_end(&mut bytes)?;
            }
            Archive::Folder(root) => bytes = std::fs::read(root.join(name))?,
        }
        Ok(bytes)
    }
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"].iter().any(|e| lower.ends_with(e))
}

/// The labels `dataset.json` gives, by file name; None for an unlabelled dataset.
fn labels_by_name(archive: &mut Archive, names: &[String]) -> Result<Option<HashMap<String, i64>>> {
    if !names.iter().any(|n| n == LABELS_FILE) {
        return Ok(None);
    }
    let json: serde_json::Value = serde_json::from_slice(&archive.read(LABELS_FILE)?).context("dataset.json is not JSON")?;
    let Some(entries) = json.get("labels").and_then(|l| (!l.is_null()).then_some(l)) else {
        return Ok(None);
    };
    let entries = entries.as_array().context("dataset.json: `labels` is neither null nor a list")?;
    let mut labels = HashMap::with_capacity(entries.len());
    for e in entries {
        match (e.get(0).and_then(|n| n.as_str()), e.get(1).and_then(|l| l.as_i64())) {
            (Some(name), Some(label)) if label >= 0 => labels.insert(name.to_string(), label),
            _ => bail!("dataset.json: a label entry is not [file name, class >= 0]: {e}"),
        };
    }
    Ok(Some(labels))
}

/// Reads an EDM dataset archive: at most `max_images` images (decoded to RGB, each at most
/// `max_side` a side, all of one size) and their labels; `on_image` is called after each.
pub fn read_edm_dataset(path: &Path, max_images: Option<usize>, max_side: u32, on_image: &dyn Fn()) -> Result<ImageDataset> {
    let mut archive = Archive::open(path)?;
    let all = archive.names()?;
    let labels = labels_by_name(&mut archive, &all)?;
    let mut names: Vec<&String> = all.iter().filter(|n| is_image(n)).collect();
    names.sort();
    names.truncate(max_images.unwrap_or(usize::MAX));
    if names.is_empty() {
        bail!("{} holds no PNG or JPEG images", path.display());
    }
    let mut images = Vec::new();
    let mut size = None;
    let mut image_labels = Vec::with_capacity(names.len());
    for name in names {
        let img = decode_rgb_bytes(&archive.read(name)?, max_side).with_context(|| format!("{}: {name}", path.display()))?;
        if *size.get_or_insert(img.dimensions()) != img.dimensions() {
            bail!(
                "{}: {name} is {:?}, the images before it {:?}",
                path.display(),
                img.dimensions(),
                size.unwrap_or_default()
            );
        }
        images.extend_from_slice(img.as_raw());
        image_labels.push(match &labels {
            Some(l) => *l
                .get(name)
                .with_context(|| format!("{}: dataset.json has no label for {name}", path.display()))?,
            None => 0,
        });
        on_image();
    }
    let (width, height) = size.unwrap_or_default();
    let count = labels.as_ref().map_or(0, |_| image_labels.iter().max().map_or(0, |m| m + 1));
    Ok(ImageDataset {
        images,
        height: height as usize,
        width: width as usize,
        channels: 3,
        labels: image_labels,
        classes: (0..count).map(|c| c.to_string()).collect(),
    })
}
