//! HTTP downloads that resume a partial file and verify an md5 before accepting it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};

/// Downloads `url` to `dest` unless a file with md5 `expected_md5` is already there. Bytes land
/// in `dest.part` first; a later call resumes from its length with an HTTP range request.
pub fn fetch(url: &str, dest: &Path, expected_md5: &str, progress: &indicatif::ProgressBar) -> Result<PathBuf> {
    if dest.exists() && file_md5(dest)? == expected_md5 {
        return Ok(dest.to_path_buf());
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let part = dest.with_extension("part");
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", &format!("bytes={have}-"));
    }
    let response = request.call().with_context(|| format!("downloading {url}"))?;
    let status = response.status().as_u16();
    let append = match status {
        206 => true,
        200 => false,
        416 if have > 0 => true, // nothing left to fetch
        _ => bail!("downloading {url}: HTTP status {status}"),
    };
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| if append { n + have } else { n });
    if let Some(t) = total {
        progress.set_length(t);
    }
    progress.set_position(if append { have } else { 0 });
    if status != 416 {
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).with_context(|| format!("downloading {url}"))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).with_context(|| format!("writing {}", part.display()))?;
            progress.inc(n as u64);
        }
        file.sync_all()?;
    }
    let actual = file_md5(&part)?;
    if actual != expected_md5 {
        std::fs::remove_file(&part).ok();
        bail!(
            "downloaded {url}: md5 {actual} does not match the expected {expected_md5}; the partial file was removed, run again to retry"
        );
    }
    std::fs::rename(&part, dest).with_context(|| format!("moving {} to {}", part.display(), dest.display()))?;
    Ok(dest.to_path_buf())
}

pub fn file_md5(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
