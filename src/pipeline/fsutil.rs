//! Filesystem helpers for crash safety.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `path` with `.` removed and `dir/..` folded, without touching the file system (as cargo
/// does): `pipelines/../cache` is `cache`, `./x` is `x`. A leading `..` stays.
pub fn clean_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            Component::ParentDir if matches!(out.last(), Some(Component::RootDir | Component::Prefix(_))) => {}
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one:
/// a temp file in the same directory, fsync, rename, fsync of the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("atomic_write needs a parent directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Total size in bytes of the files under `path`.
pub fn du(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Removes a directory tree that may contain read-only files.
pub fn remove_tree(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    // A plain file or a link (also a dangling one) where a folder was expected.
    if !meta.is_dir() {
        return std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()));
    }
    for entry in walkdir::WalkDir::new(path).into_iter().filter_map(Result::ok) {
        if let Ok(meta) = entry.metadata() {
            let mut perm = meta.permissions();
            if perm.readonly() {
                #[allow(clippy::permissions_set_readonly_false)]
                perm.set_readonly(false);
                let _ = std::fs::set_permissions(entry.path(), perm);
            }
        }
    }
    std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths_fold_dots_lexically() {
        assert_eq!(clean_path(Path::new("pipelines/../cache")), PathBuf::from("cache"));
        assert_eq!(clean_path(Path::new("./../cache/x")), PathBuf::from("../cache/x"));
        assert_eq!(clean_path(Path::new("/a/b/../../..")), PathBuf::from("/"));
        assert_eq!(clean_path(Path::new("a/./b/")), PathBuf::from("a/b"));
        assert_eq!(clean_path(Path::new(".")), PathBuf::from("."));
    }
}
