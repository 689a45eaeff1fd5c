//! Reading the files users point at: regular files only (a device such as /dev/zero or a FIFO
//! would be read forever or block), within a size limit the caller states.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The whole of a regular file of at most `max_bytes` bytes.
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file (devices, FIFOs and sockets are not read)", path.display());
    }
    if meta.len() > max_bytes {
        bail!(
            "{} is {} bytes, more than the {max_bytes} this reader accepts",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .take(max_bytes)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// Checks that `path` is a regular file before a reader opens it.
pub fn check_regular(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file (devices, FIFOs and sockets are not read)", path.display());
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_oversized_files_are_refused() {
        assert!(format!("{:#}", read_regular(Path::new("/dev/zero"), 1 << 30).unwrap_err()).contains("not a regular file"));
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(format!("{:#}", read_regular(&fifo, 10).unwrap_err()).contains("not a regular file"));
        let f = dir.path().join("f");
        std::fs::write(&f, [0u8; 100]).unwrap();
        assert!(read_regular(&f, 99).is_err());
        assert_eq!(read_regular(&f, 100).unwrap().len(), 100);
    }
}
