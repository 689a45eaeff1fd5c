//! `cifar10`: the official binary CIFAR-10 from a local directory or a downloaded archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, InputPath, Stage, StageContext};
use crate::data::cifar10 as cifar;
use crate::data::download;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The 50,000 training images (data_batch_1..5).
    Train,
    /// The 10,000 test images.
    Test,
}

fn default_split() -> Split {
    Split::Train
}
fn default_archive_md5() -> String {
    cifar::ARCHIVE_MD5.to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cifar10Params {
    /// Directory holding the `*.bin` files (`cifar-10-batches-bin`). Exactly one of `source`
    /// and `url`.
    pub source: Option<PathBuf>,
    /// URL of `cifar-10-binary.tar.gz`; downloaded once (resumable) and checked against
    /// `archive_md5`.
    pub url: Option<String>,
    #[serde(default = "default_archive_md5")]
    pub archive_md5: String,
    #[serde(default = "default_split")]
    pub split: Split,
    /// Check each file's md5 (the official ones unless `md5` overrides them).
    #[serde(default = "super::yes")]
    pub verify_md5: bool,
    /// Expected md5 per file name, overriding the official values.
    #[serde(default)]
    pub md5: BTreeMap<String, String>,
}

impl Cifar10Params {
    fn files(&self) -> &'static [&'static str] {
        match self.split {
            Split::Train => &cifar::TRAIN_FILES,
            Split::Test => &cifar::TEST_FILES,
        }
    }

    fn expected_md5(&self, file: &str) -> Option<String> {
        if !self.verify_md5 {
            return None;
        }
        self.md5
            .get(file)
            .cloned()
            .or_else(|| cifar::official_md5(file).map(str::to_string))
    }

    /// Downloads and unpacks the archive (once per archive md5) and returns the batches dir.
    fn fetch_archive(&self, url: &str, ctx: &StageContext) -> anyhow::Result<PathBuf> {
        let archive = ctx.downloads_dir.join(format!("cifar-10-binary-{}.tar.gz", self.archive_md5));
        ctx.progress.set_message("downloading");
        download::fetch(url, &archive, &self.archive_md5, &ctx.progress)?;
        let unpack = ctx.work_dir.join("unpacked");
        if unpack.exists() {
            std::fs::remove_dir_all(&unpack)?;
        }
        std::fs::create_dir_all(&unpack)?;
        let file = std::fs::File::open(&archive)?;
        tar::Archive::new(flate2::read::GzDecoder::new(file))
            .unpack(&unpack)
            .with_context(|| format!("unpacking {}", archive.display()))?;
        let dir = unpack.join(cifar::ARCHIVE_DIR);
        anyhow::ensure!(
            dir.is_dir(),
            "{}: the archive has no {}/ directory",
            archive.display(),
            cifar::ARCHIVE_DIR
        );
        Ok(dir)
    }
}

impl Stage for Cifar10Params {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Images
    }
    fn input_paths(&self) -> Vec<InputPath> {
        self.source.iter().map(|p| InputPath::source(p)).collect()
    }
    fn non_key_fields(&self) -> &'static [&'static str] {
        // The archive's content is pinned by `archive_md5`; where it is served from does not matter.
        &["url"]
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        match (&self.source, &self.url) {
            (Some(_), Some(_)) => Err(FieldIssue::new("url", "give either `source` or `url`, not both")),
            (None, None) => Err(
                FieldIssue::new("kind", "a cifar10 stage needs `source` (a cifar-10-batches-bin directory) or `url`")
                    .help("e.g. source = \"data/cifar-10-batches-bin\""),
            ),
            _ if self.archive_md5.len() != 32 || !self.archive_md5.chars().all(|c| c.is_ascii_hexdigit()) => {
                Err(FieldIssue::new("archive_md5", "`archive_md5` must be 32 hex digits"))
            }
            _ => Ok(()),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let dir = match &self.url {
            Some(url) => self.fetch_archive(url, ctx)?,
            None => ctx.input("source")?.to_path_buf(),
        };
        ctx.progress.set_message("decoding");
        let ds = cifar::read_files(Path::new(&dir), self.files(), &|f| self.expected_md5(f))?;
        ds.write(&ctx.out_dir)?;
        Ok(ds.metrics())
    }
}
