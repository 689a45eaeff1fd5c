//! The official CIFAR-10 binary version (`cifar-10-batches-bin`): records of 1 label byte then
//! 1024 R, 1024 G, 1024 B bytes, rows top to bottom.

use std::path::Path;

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};

use super::artifact::ImageDataset;

pub const RECORD_BYTES: usize = 3073;
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILES: [&str; 1] = ["test_batch.bin"];
/// md5 of `cifar-10-binary.tar.gz` from the CIFAR-10 home page.
pub const ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const ARCHIVE_DIR: &str = "cifar-10-batches-bin";

/// md5 of each official file.
pub fn official_md5(file: &str) -> Option<&'static str> {
    Some(match file {
        "data_batch_1.bin" => "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin" => "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin" => "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin" => "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin" => "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin" => "803d5f7f4d78ea53de84dbe85f74fb6d",
        _ => return None,
    })
}

pub fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// Decodes one batch file's bytes into (NHWC images, labels).
pub fn decode_batch(path: &Path, bytes: &[u8]) -> Result<(Vec<u8>, Vec<i64>)> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        bail!(
            "{}: {} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records (truncated or not a CIFAR-10 batch file)",
            path.display(),
            bytes.len()
        );
    }
    let n = bytes.len() / RECORD_BYTES;
    let mut images = vec![0u8; n * 3072];
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = rec[0];
        if label as usize >= CLASSES.len() {
            bail!("{}: record {i} has label {label}, outside 0..10", path.display());
        }
        labels.push(label as i64);
        let planes = &rec[1..];
        let out = &mut images[i * 3072..(i + 1) * 3072];
        for p in 0..1024 {
            for c in 0..3 {
                out[p * 3 + c] = planes[c * 1024 + p];
            }
        }
    }
    Ok((images, labels))
}

/// Reads `files` from `dir`, checking each md5 against `expected_md5` when given.
pub fn read_files(dir: &Path, files: &[&str], expected_md5: &dyn Fn(&str) -> Option<String>) -> Result<ImageDataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for file in files {
        let path = dir.join(file);
        // A batch file is 30,730,000 bytes; a little room for variants.
        let bytes = super::file::read_regular(&path, 64 << 20).with_context(|| format!("cannot read CIFAR-10 file {}", path.display()))?;
        if let Some(expected) = expected_md5(file) {
            let actual = md5_hex(&bytes);
            if actual != expected {
                bail!(
                    "{}: md5 {actual} does not match the expected {expected} (corrupt or different file)",
                    path.display()
                );
            }
        }
        let (im, lb) = decode_batch(&path, &bytes)?;
        images.extend(im);
        labels.extend(lb);
    }
    Ok(ImageDataset {
        images,
        height: 32,
        width: 32,
        channels: 3,
        labels,
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
    })
}

/// Encodes images back into the binary format (tests build fixtures with it).
pub fn encode_batch(images: &[u8], labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (i, &l) in labels.iter().enumerate() {
        out.push(l);
        let im = &images[i * 3072..(i + 1) * 3072];
        for c in 0..3 {
            for p in 0..1024 {
                out.push(im[p * 3 + c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_inverts_encode_and_moves_planes_to_nhwc() {
        let mut images = vec![0u8; 2 * 3072];
        for (i, v) in images.iter_mut().enumerate() {
            *v = (i * 7 % 251) as u8;
        }
        let bytes = encode_batch(&images, &[3, 9]);
        assert_eq!(bytes[0], 3);
        // first record: R plane first, so byte 1 is pixel 0's red, byte 1025 its green
        assert_eq!(bytes[1], images[0]);
        assert_eq!(bytes[1025], images[1]);
        let (im, lb) = decode_batch(Path::new("x.bin"), &bytes).unwrap();
        assert_eq!(im, images);
        assert_eq!(lb, vec![3, 9]);
    }

    #[test]
    fn truncated_batch_names_the_file() {
        let err = decode_batch(Path::new("data_batch_9.bin"), &[0u8; 3000]).unwrap_err().to_string();
        assert!(err.contains("data_batch_9.bin") && err.contains("truncated"), "{err}");
    }
}
