//! Hostile data files: devices, FIFOs, forged archive headers and oversized images are refused
//! with a message, before anything large is allocated or read.

mod common;

use std::path::Path;

use dmdpipe::data::cifar10::read_files;
use dmdpipe::data::npy::{NpyArray, NpyData, read_npz, write_npz};

#[test]
fn a_cifar_batch_that_is_a_device_or_a_fifo_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("data_batch_1.bin")).unwrap();
    let e = read_files(dir.path(), &["data_batch_1.bin"], &|_| None).err().unwrap();
    assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
    let fifo = std::ffi::CString::new(dir.path().join("test_batch.bin").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let e = read_files(dir.path(), &["test_batch.bin"], &|_| None).err().unwrap();
    assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
}

/// Overwrites every little-endian `from` u32 after a zip record signature at `field`.
fn patch_zip_sizes(bytes: &mut [u8], signature: u32, field: usize, value: u32) -> usize {
    let sig = signature.to_le_bytes();
    let mut n = 0;
    for i in 0..bytes.len().saturating_sub(field + 4) {
        if bytes[i..i + 4] == sig {
            bytes[i + field..i + field + 4].copy_from_slice(&value.to_le_bytes());
            n += 1;
        }
    }
    n
}

#[test]
fn an_npz_whose_header_claims_more_than_the_file_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.npz");
    let a = NpyArray {
        shape: vec![4],
        data: NpyData::F64(vec![1.0, 2.0, 3.0, 4.0]),
    };
    write_npz(&path, &[("mu", &a)]).unwrap();
    assert!(read_npz(&path, &["mu"]).is_ok());
    let mut bytes = std::fs::read(&path).unwrap();
    // Uncompressed and compressed size in the central directory (offsets 24, 20) and the local
    // header (22, 18): 2 GiB claimed by a file of a few hundred bytes.
    let big = 0x7fff_ffff;
    assert_eq!(patch_zip_sizes(&mut bytes, 0x0201_4b50, 24, big), 1);
    patch_zip_sizes(&mut bytes, 0x0201_4b50, 20, big);
    patch_zip_sizes(&mut bytes, 0x0403_4b50, 22, big);
    patch_zip_sizes(&mut bytes, 0x0403_4b50, 18, big);
    std::fs::write(&path, &bytes).unwrap();
    let e = read_npz(&path, &["mu"]).err().expect("a forged size is refused");
    assert!(format!("{e:#}").contains("claims 2147483647 bytes"), "{e:#}");
}

#[test]
fn images_larger_than_max_side_are_refused_before_decoding() {
    let p = common::Project::new();
    let d = p.path().join("imgs/a");
    std::fs::create_dir_all(&d).unwrap();
    image::RgbImage::new(100, 40).save(d.join("wide.png")).unwrap();
    p.write(
        "p.toml",
        "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\nmax_side = 64\n",
    );
    let e = dmdpipe::pipeline::runner::run(&p.load("p.toml"), &Default::default())
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("wide.png") && e.contains("100x40") && e.contains("limit of 64 pixels a side"),
        "{e}"
    );
    assert!(Path::new(&d.join("wide.png")).exists());
}
