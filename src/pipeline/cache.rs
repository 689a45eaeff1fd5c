//! The cache: an action cache (key -> entry naming output digests) over a content store
//! (output trees by digest), per-pipeline records of the last accepted run, and an OS lock.
//!
//! Layout under the cache root:
//! `objects/<tree digest>/…` outputs; `entries/<key>.json` one per accepted stage run (written
//! last: that write is the commit); `pipelines/<name>.json` last accepted key per stage;
//! `tmp/` running stages; `work/<key>/` resumable work; `downloads/`; `logs/`; `history/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::fsutil::{atomic_write, du, remove_tree, sync_dir};
use super::hash::{FileDigest, StatCache, tree_digest};

pub const ENTRY_FORMAT: u32 = 1;

/// One accepted stage run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub format: u32,
    pub key: String,
    /// The canonical key manifest the key was computed from (kept so `why` can diff).
    pub manifest: serde_json::Value,
    /// Digest of the output tree; the outputs live in `objects/<tree>/`.
    pub tree: String,
    /// Digest of the outputs without `measurements/` (durations, rates): what downstream keys
    /// depend on, so that a re-run giving the same results leaves them fresh. Absent in entries
    /// of earlier versions (then `tree` stands in).
    #[serde(default)]
    pub content: Option<String>,
    pub files: Vec<FileDigest>,
    pub metrics: serde_json::Value,
    /// Informational only (not part of the key).
    pub stage: String,
    pub pipeline: String,
    pub created: String,
    pub duration_s: f64,
}

/// The last accepted run of each stage of one pipeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub stages: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers: status, why, dag.
    Shared,
    /// Writers: run, gc.
    Exclusive,
}

pub struct Cache {
    root: PathBuf,
    /// The OS lock is held while this is open (none on a cache no lock file can exist in).
    _lock: Option<File>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_entries: Vec<String>,
    pub removed_objects: Vec<String>,
    pub removed_other: Vec<PathBuf>,
    pub bytes: u64,
    pub kept_entries: usize,
}

/// The folders of a cache (see the module comment).
fn create_layout(root: &Path) -> std::io::Result<()> {
    for sub in ["objects", "entries", "pipelines", "tmp", "work", "downloads", "logs", "history"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    Ok(())
}

/// The lock file, opened for writing (created if absent).
fn open_lock_file(root: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(root.join("lock"))
}

/// The marker that makes a folder recognisable as a dmdpipe cache: a standard cache directory
/// tag (backup tools skip such folders) with dmdpipe's own comment line.
pub const MARKER: &str = "CACHEDIR.TAG";
const MARKER_TEXT: &str =
    "Signature: 8a477f597d28d172789f06886806bc55\n# This folder is a dmdpipe cache: dmdpipe creates and deletes files in it.\n";

/// What a cache made before the marker existed holds, and nothing else.
const CACHE_NAMES: &[&str] = &[
    "objects",
    "entries",
    "pipelines",
    "tmp",
    "work",
    "downloads",
    "logs",
    "history",
    "reports",
    "lock",
    "statcache.json",
];

/// Makes sure `root` is a dmdpipe cache before anything is created or deleted in it: a new or
/// empty folder becomes one (the marker is written), a marked one is used, an unmarked cache of
/// an earlier dmdpipe (only cache names inside, `entries` and `objects` among them) is marked;
/// anything else is refused, since a cache deletes inside itself.
pub fn claim(root: &Path) -> Result<()> {
    check_claimable(root)?;
    let marker = root.join(MARKER);
    if marker.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating the cache folder {}", root.display()))?;
    atomic_write(&marker, MARKER_TEXT.as_bytes()).with_context(|| format!("writing {}", marker.display()))
}

/// Whether `root` may be used as a dmdpipe cache (see [`claim`]), without changing anything.
pub fn check_claimable(root: &Path) -> Result<()> {
    let marker = root.join(MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if text.contains("dmdpipe cache") {
            return Ok(());
        }
        bail!(
            "{} belongs to another program's cache ({}); choose another `cache_dir` (or --cache) for dmdpipe",
            root.display(),
            marker.display()
        );
    }
    let names: Vec<String> = match std::fs::read_dir(root) {
        // A checked-in placeholder (the repository's cache/.gitkeep) does not make a folder used.
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".gitkeep")
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading the cache folder {}", root.display())),
    };
    let earlier_cache = names.iter().any(|n| n == "entries")
        && names.iter().any(|n| n == "objects")
        && names.iter().all(|n| CACHE_NAMES.contains(&n.as_str()));
    if !names.is_empty() && !earlier_cache {
        let mut shown: Vec<&str> = names.iter().map(String::as_str).take(5).collect();
        shown.sort();
        bail!(
            "refusing to use {} as the cache: the folder is not empty ({}{}) and is not a dmdpipe cache (no {MARKER}); \
             dmdpipe deletes inside its cache, so point `cache_dir` (or --cache) at a new or empty folder",
            root.display(),
            shown.join(", "),
            if names.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(())
}

impl Cache {
    /// Opens (creating if needed) the cache at `root` and takes its lock. When another process
    /// holds it, says who and waits.
    pub fn open(root: &Path, mode: LockMode) -> Result<Cache> {
        if mode == LockMode::Shared {
            return Self::open_for_reading(root);
        }
        claim(root)?;
        create_layout(root).with_context(|| format!("creating the cache folders in {}", root.display()))?;
        let file = open_lock_file(root).with_context(|| format!("opening {}", root.join("lock").display()))?;
        Self::locked(root, file, mode)
    }

    /// Readers (`status`, `verify`, `path`, `why`) create nothing: a missing cache reads as an
    /// empty one, and they also work on a cache they cannot write (a read-only mount, another
    /// user's folder): the shared lock is taken on a read-only handle, or skipped when there is
    /// no lock file.
    fn open_for_reading(root: &Path) -> Result<Cache> {
        let unlocked = || Cache {
            root: root.to_path_buf(),
            _lock: None,
        };
        if !root.exists() {
            return Ok(unlocked());
        }
        check_claimable(root)?;
        match File::open(root.join("lock")) {
            Ok(f) => Self::locked(root, f, LockMode::Shared),
            Err(_) => Ok(unlocked()),
        }
    }

    fn locked(root: &Path, mut file: File, mode: LockMode) -> Result<Cache> {
        let lock_path = root.join("lock");
        let attempt = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = if holder.trim().is_empty() {
                    "another dmdpipe process".to_string()
                } else {
                    holder.trim().to_string()
                };
                eprintln!("the cache {} is locked by {holder}; waiting for it to finish", root.display());
                match mode {
                    LockMode::Shared => file.lock_shared(),
                    LockMode::Exclusive => file.lock(),
                }
                .with_context(|| format!("locking {}", lock_path.display()))?;
            }
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", lock_path.display())),
        }
        if mode == LockMode::Exclusive {
            let args: Vec<String> = std::env::args().collect();
            let info = format!(
                "pid {} ({}) since {}\n",
                std::process::id(),
                args.join(" "),
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(info.as_bytes())?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
            _lock: Some(file),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn object_dir(&self, tree: &str) -> PathBuf {
        self.root.join("objects").join(tree)
    }
    fn entry_path(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(format!("{key}.json"))
    }
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }
    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn stat_cache(&self) -> StatCache {
        StatCache::load(&self.root.join("statcache.json"))
    }

    pub fn read_entry(&self, key: &str) -> Option<Entry> {
        let bytes = std::fs::read(self.entry_path(key)).ok()?;
        serde_json::from_slice::<Entry>(&bytes)
            .ok()
            .filter(|e| e.format == ENTRY_FORMAT && e.key == key)
    }

    /// Checks that every output file of `entry` is present with its recorded digest.
    pub fn verify(&self, entry: &Entry, stat: &mut StatCache) -> std::result::Result<(), String> {
        let dir = self.object_dir(&entry.tree);
        if !dir.is_dir() {
            return Err(format!("output directory {} is missing", dir.display()));
        }
        for f in &entry.files {
            let path = dir.join(&f.path);
            match stat.file_digest(&path) {
                Ok(d) if d == f.digest => {}
                Ok(_) => return Err(format!("output {} has changed bytes", path.display())),
                Err(_) => return Err(format!("output {} is missing", path.display())),
            }
        }
        Ok(())
    }

    /// A fresh directory for a running stage, inside the cache so that the final move is a rename.
    pub fn new_tmp_dir(&self, label: &str) -> Result<PathBuf> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{label}-"))
            .tempdir_in(self.root.join("tmp"))?;
        Ok(dir.keep())
    }

    /// Removes leftovers of interrupted runs (only called under the exclusive lock).
    pub fn clean_tmp(&self) -> Result<()> {
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            remove_tree(&entry?.path())?;
        }
        Ok(())
    }

    /// Accepts a stage's outputs: moves `out_dir` into the store, then writes the entry.
    /// A kill at any point leaves either no entry or a complete one.
    pub fn commit(
        &self,
        key: &str,
        manifest: serde_json::Value,
        out_dir: &Path,
        metrics: serde_json::Value,
        info: (&str, &str, f64),
        stat: &mut StatCache,
    ) -> Result<Entry> {
        for entry in walkdir::WalkDir::new(out_dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
        {
            File::open(entry.path())?.sync_all()?;
            let mut perm = entry.metadata()?.permissions();
            perm.set_readonly(true);
            std::fs::set_permissions(entry.path(), perm)?;
        }
        let files = stat.tree(out_dir)?;
        let tree = tree_digest(&files);
        let measured = format!("{}/", crate::stages::MEASUREMENTS_DIR);
        let results: Vec<FileDigest> = files.iter().filter(|f| !f.path.starts_with(&measured)).cloned().collect();
        let content = tree_digest(&results);
        let dest = self.object_dir(&tree);
        let existing_ok = dest.is_dir()
            && files
                .iter()
                .all(|f| stat.file_digest(&dest.join(&f.path)).map(|d| d == f.digest).unwrap_or(false));
        if existing_ok {
            remove_tree(out_dir)?;
        } else {
            if dest.exists() {
                // A corrupted copy of the same tree: move it aside, never edit it in place.
                let trash = self.new_tmp_dir("corrupt")?;
                std::fs::rename(&dest, trash.join("t")).context("moving a corrupted artifact aside")?;
            }
            std::fs::rename(out_dir, &dest).with_context(|| format!("moving outputs into {}", dest.display()))?;
            sync_dir(&self.root.join("objects"));
        }
        let (stage, pipeline, duration_s) = info;
        let entry = Entry {
            format: ENTRY_FORMAT,
            key: key.to_string(),
            manifest,
            tree,
            content: Some(content),
            files,
            metrics,
            stage: stage.to_string(),
            pipeline: pipeline.to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            duration_s,
        };
        atomic_write(&self.entry_path(key), &serde_json::to_vec_pretty(&entry)?)?;
        Ok(entry)
    }

    pub fn read_record(&self, pipeline: &str) -> PipelineRecord {
        std::fs::read(self.root.join("pipelines").join(format!("{pipeline}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write_record(&self, pipeline: &str, record: &PipelineRecord) -> Result<()> {
        atomic_write(
            &self.root.join("pipelines").join(format!("{pipeline}.json")),
            &serde_json::to_vec_pretty(record)?,
        )
    }

    pub fn append_history(&self, pipeline: &str, line: &serde_json::Value) -> Result<()> {
        let path = self.root.join("history").join(format!("{pipeline}.jsonl"));
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(f, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }

    /// Every entry key that some pipeline's last accepted run names.
    /// Every pipeline record, each parsed or with why it could not be.
    fn records(&self) -> Result<Vec<(PathBuf, Result<PipelineRecord>)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join("pipelines"))? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "json") {
                let rec = std::fs::read(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
                    .with_context(|| format!("parsing {}", path.display()));
                out.push((path, rec));
            }
        }
        Ok(out)
    }

    /// The entries the pipelines' last accepted runs name (an unreadable record is an error:
    /// GC must not guess what it protected).
    fn roots(&self) -> Result<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        for (_, rec) in self.records()? {
            keys.extend(rec?.stages.into_values());
        }
        Ok(keys)
    }

    /// Removes entries and outputs that no pipeline's last accepted run references, plus
    /// leftover temp and work directories.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let roots = self.roots()?;
        let mut report = GcReport::default();
        let mut live_trees = BTreeSet::new();
        for e in std::fs::read_dir(self.root.join("entries"))? {
            let path = e?.path();
            let key = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let entry = self.read_entry(&key);
            match entry {
                Some(entry) if roots.contains(&key) => {
                    live_trees.insert(entry.tree);
                    report.kept_entries += 1;
                }
                _ => {
                    report.bytes += du(&path);
                    report.removed_entries.push(key);
                    if !dry_run {
                        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                    }
                }
            }
        }
        for e in std::fs::read_dir(self.root.join("objects"))? {
            let path = e?.path();
            let tree = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if !live_trees.contains(&tree) {
                report.bytes += du(&path);
                report.removed_objects.push(tree);
                if !dry_run {
                    remove_tree(&path)?;
                }
            }
        }
        for sub in ["tmp", "work"] {
            for e in std::fs::read_dir(self.root.join(sub))? {
                let path = e?.path();
                report.bytes += du(&path);
                if !dry_run {
                    remove_tree(&path)?;
                }
                report.removed_other.push(path);
            }
        }
        Ok(report)
    }

    /// Problems that must never exist, whatever happened: an entry whose outputs are missing or
    /// differ from its record. Used by the crash tests and `dmdpipe verify`.
    pub fn check_integrity(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut stat = StatCache::in_memory();
        for e in std::fs::read_dir(self.root.join("entries"))? {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let key = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            match self.read_entry(&key) {
                None => problems.push(format!("{}: unreadable or partial entry", path.display())),
                Some(entry) => {
                    if let Err(p) = self.verify(&entry, &mut stat) {
                        problems.push(format!("entry {key}: {p}"));
                    }
                }
            }
        }
        for (path, rec) in self.records()? {
            match rec {
                Err(e) => problems.push(format!("{}: unreadable pipeline record ({e:#})", path.display())),
                Ok(rec) => {
                    for key in rec.stages.into_values().filter(|k| self.read_entry(k).is_none()) {
                        problems.push(format!("a pipeline record names entry {key}, which does not exist"));
                    }
                }
            }
        }
        Ok(problems)
    }
}

/// Refuses a cache root that is a file, with a clear message.
pub fn check_root(root: &Path) -> Result<()> {
    if root.exists() && !root.is_dir() {
        bail!("cache path {} exists and is not a directory", root.display());
    }
    Ok(())
}
