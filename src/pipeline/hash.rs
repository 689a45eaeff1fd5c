//! Content digests: sha256 of files and directory trees, with a stat cache so that unchanged
//! large inputs are not read again.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fsutil::atomic_write;

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// One file of a tree: path relative to the tree root (with `/`), digest and size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    pub path: String,
    pub digest: String,
    pub size: u64,
}

/// Digest of a directory: sha256 over its sorted (relative path, file digest) list.
pub fn tree_digest(files: &[FileDigest]) -> String {
    let mut sorted: Vec<&FileDigest> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = Sha256::new();
    for f in sorted {
        hasher.update(f.path.as_bytes());
        hasher.update([0]);
        hasher.update(f.digest.as_bytes());
        hasher.update([b'\n']);
    }
    hex::encode(hasher.finalize())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stat {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatEntry {
    stat: Stat,
    digest: String,
}

/// (device, inode) -> (size, mtime, ctime, digest), persisted in the cache directory.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, StatEntry>,
    dirty: bool,
    /// Bytes actually read and hashed (not answered from the cache) since creation.
    pub bytes_hashed: u64,
}

impl StatCache {
    /// A cache that lives only in memory.
    pub fn in_memory() -> Self {
        StatCache::default()
    }

    pub fn load(path: &Path) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
            bytes_hashed: 0,
        }
    }

    pub fn save(&mut self) -> Result<()> {
        if let (Some(path), true) = (&self.path, self.dirty) {
            atomic_write(path, &serde_json::to_vec(&self.entries)?)?;
            self.dirty = false;
        }
        Ok(())
    }

    pub fn file_digest(&mut self, path: &Path) -> Result<String> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let meta = std::fs::metadata(&abs).with_context(|| format!("{} does not exist", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!("{} is not a regular file (devices, FIFOs and sockets are not read)", path.display());
        }
        let stat = Stat::of(&meta);
        // Keyed by inode, so a file moved within the filesystem (outputs into the store) stays known.
        let key = format!("{}:{}", stat.dev, stat.ino);
        if let Some(e) = self.entries.get(&key)
            && e.stat == stat
        {
            return Ok(e.digest.clone());
        }
        let digest = sha256_file(&abs)?;
        self.bytes_hashed += stat.size;
        self.entries.insert(
            key,
            StatEntry {
                stat,
                digest: digest.clone(),
            },
        );
        self.dirty = true;
        Ok(digest)
    }

    /// Every regular file under `dir`, sorted by path. Links are followed; a dangling one is
    /// skipped (nothing could read it either), and so is any folder tagged as a cache
    /// (`CACHEDIR.TAG`, e.g. a dmdpipe cache inside an input folder, which changes on every run).
    pub fn tree(&mut self, dir: &Path) -> Result<Vec<FileDigest>> {
        let mut files = Vec::new();
        let walk = walkdir::WalkDir::new(dir)
            .sort_by_file_name()
            .follow_links(true)
            .into_iter()
            .filter_entry(|e| !(e.depth() > 0 && e.file_type().is_dir() && e.path().join("CACHEDIR.TAG").is_file()));
        for entry in walk {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) => {
                    tracing::warn!("skipping a dangling link: {e}");
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("walking {}", dir.display())),
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let rel = entry.path().strip_prefix(dir).expect("walkdir stays under its root");
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            files.push(FileDigest {
                path: rel,
                digest: self.file_digest(entry.path())?,
                size,
            });
        }
        Ok(files)
    }

    /// Digest of a file, or of a directory tree.
    pub fn path_digest(&mut self, path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path).with_context(|| format!("input {} does not exist", path.display()))?;
        if meta.is_dir() {
            Ok(tree_digest(&self.tree(path)?))
        } else {
            self.file_digest(path)
        }
    }
}

/// Prints hashing throughput: a cold pass over `path` (or 256 MB of generated data), then a
/// pass answered by the stat cache.
pub fn bench(path: Option<&Path>) -> Result<()> {
    let tmp;
    let target = match path {
        Some(p) => p.to_path_buf(),
        None => {
            tmp = tempfile::tempdir()?;
            let f = tmp.path().join("data.bin");
            let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            let mut file = std::fs::File::create(&f)?;
            for _ in 0..256 {
                std::io::Write::write_all(&mut file, &block)?;
            }
            tmp.path().to_path_buf()
        }
    };
    let mut sc = StatCache::in_memory();
    let t = std::time::Instant::now();
    let digest = sc.path_digest(&target)?;
    let cold = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let again = sc.path_digest(&target)?;
    let warm = t.elapsed().as_secs_f64();
    assert_eq!(digest, again);
    let mb = sc.bytes_hashed as f64 / 1e6;
    println!("hashed {mb:.1} MB in {cold:.3} s: {:.0} MB/s (sha256, one core)", mb / cold);
    println!("unchanged, through the stat cache: {:.2} ms", warm * 1e3);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cache_skips_unchanged_files_and_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        let mut sc = StatCache::in_memory();
        let d1 = sc.file_digest(&f).unwrap();
        assert_eq!(d1, sha256_bytes(b"hello"));
        assert_eq!(sc.bytes_hashed, 5);
        assert_eq!(sc.file_digest(&f).unwrap(), d1);
        assert_eq!(sc.bytes_hashed, 5, "second lookup answered from the stat cache");
        std::fs::write(&f, b"hellO!").unwrap();
        assert_eq!(sc.file_digest(&f).unwrap(), sha256_bytes(b"hellO!"));
    }

    #[test]
    fn tree_digest_depends_on_paths_and_contents_not_order() {
        let a = FileDigest {
            path: "a".into(),
            digest: "1".into(),
            size: 1,
        };
        let b = FileDigest {
            path: "b/c".into(),
            digest: "2".into(),
            size: 1,
        };
        assert_eq!(tree_digest(&[a.clone(), b.clone()]), tree_digest(&[b.clone(), a.clone()]));
        let renamed = FileDigest {
            path: "b/d".into(),
            ..b.clone()
        };
        assert_ne!(tree_digest(&[a.clone(), b]), tree_digest(&[a, renamed]));
    }
}
