//! Bounded fuzzing of the readers of user files (pipeline configs, safetensors weights, npz/npy
//! arrays, CIFAR-10 batches, PNG and JPEG images): random mutations of real examples must give errors, never a panic
//! or an abort. Pickles and torch snapshots have their own (tests/pickle_reader.rs,
//! tests/torch_pickles.rs).

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A copy of `data` with a few bytes changed, cut short, or a slice repeated.
fn mutate(rng: &mut ChaCha8Rng, data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    match rng.random_range(0..4) {
        0 => {
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..d.len());
                d[i] = rng.random();
            }
        }
        1 => d.truncate(rng.random_range(0..d.len())),
        2 => {
            let a = rng.random_range(0..d.len());
            let b = (a + rng.random_range(1..64)).min(d.len());
            let slice = d[a..b].to_vec();
            d.splice(a..a, slice);
        }
        _ => {
            let i = rng.random_range(0..d.len());
            d[i] = *[b'0', b'9', b'-', b'"', b'[', b'{', b'=', b'\n', 0xff]
                .get(rng.random_range(0..9))
                .unwrap();
        }
    }
    d
}

#[track_caller]
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what}: the reader panicked"))
}

#[test]
fn pipeline_configs() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for name in ["toy2d", "cifar10", "cifar10-uncond", "imagenet64", "afhq64", "cifar10-speedrun"] {
        let text = std::fs::read(repo(&format!("pipelines/{name}.toml"))).unwrap();
        for _ in 0..2000 {
            let m = mutate(&mut rng, &text);
            let Ok(src) = String::from_utf8(m) else { continue };
            no_panic(name, || dmdpipe::pipeline::config::parse(Path::new("fuzz.toml"), &src).is_ok());
        }
    }
}

#[test]
fn safetensors_weights() {
    let original = std::fs::read(repo("tests/fixtures/torch/songunet_tiny_state.safetensors")).unwrap();
    let config: dmdpipe::nn::NetworkConfig = serde_json::from_value(serde_json::json!({
        "arch": "ddpmpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]
    }))
    .unwrap();
    let net = dmdpipe::nn::Denoiser::new(&config, tch::Device::Cpu);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut loaded = 0;
    for _ in 0..2000 {
        std::fs::write(&path, mutate(&mut rng, &original)).unwrap();
        no_panic("safetensors", || {
            if let Ok((tensors, _)) = dmdpipe::artifact::tensors::read_safetensors(&path) {
                loaded += dmdpipe::nn::weights::load_into(&net, &tensors, "fuzz").is_ok() as usize;
            }
        });
    }
    // Mutations inside the data bytes still load: the fuzzer is not rejecting everything.
    assert!(loaded > 0);
}

#[test]
fn npz_and_npy_arrays() {
    use dmdpipe::data::npy::{NpyArray, NpyData, parse, read_npz, write_npz};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.npz");
    let mu = NpyArray {
        shape: vec![3, 2],
        data: NpyData::F64(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    };
    let labels = NpyArray {
        shape: vec![4],
        data: NpyData::I64(vec![0, 1, 2, 3]),
    };
    write_npz(&path, &[("mu", &mu), ("labels", &labels)]).unwrap();
    let original = std::fs::read(&path).unwrap();
    let npy = {
        let mut z = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut z.by_name("mu.npy").unwrap(), &mut b).unwrap();
        b
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..2000 {
        std::fs::write(&path, mutate(&mut rng, &original)).unwrap();
        no_panic("npz", || read_npz(&path, &["mu", "labels"]).is_ok());
        let m = mutate(&mut rng, &npy);
        no_panic("npy", || parse(&m).is_ok());
    }
}

#[test]
fn cifar10_batches() {
    let mut original = Vec::new();
    for i in 0..4u8 {
        original.push(i);
        original.extend((0..3072).map(|j| (j % 251) as u8 ^ i));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..2000 {
        let m = mutate(&mut rng, &original);
        no_panic("cifar10", || {
            dmdpipe::data::cifar10::decode_batch(Path::new("fuzz.bin"), &m).is_ok()
        });
    }
}

#[test]
fn torch_zip_checkpoints() {
    let original = std::fs::read(repo("tests/fixtures/torch/songunet_tiny_state.pt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.pt");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..1000 {
        std::fs::write(&path, mutate(&mut rng, &original)).unwrap();
        no_panic("torch zip", || dmdpipe::artifact::torch_pickle::read_torch_zip(&path).is_ok());
    }
}

/// CRC-32 (IEEE) as PNG chunks carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 17, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
    out
}

#[test]
fn png_and_jpeg_images() {
    use dmdpipe::data::image::decode_rgb_bytes;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // The JPEG (libjpeg-turbo's decoder, errors unwound out of C) is a Pillow-written 4:2:0 file.
    let jpeg = std::fs::read(repo("tests/fixtures/edm_dataset/source/n01443537/d_grey.JPEG")).unwrap();
    for (format, original) in [("png", encoded(image::ImageFormat::Png)), ("jpeg", jpeg)] {
        assert!(decode_rgb_bytes(&original, 64).is_ok());
        let mut decoded = 0;
        for _ in 0..1500 {
            let m = mutate(&mut rng, &original);
            decoded += no_panic("image", || decode_rgb_bytes(&m, 64).is_ok()) as usize;
        }
        assert!(decoded > 0, "{format}: no mutant decoded; the fuzzer rejects everything");
    }
}

#[test]
fn a_png_declaring_a_huge_canvas_is_refused_from_its_header() {
    let mut png = encoded(image::ImageFormat::Png);
    // IHDR follows the 8-byte signature: length (4), "IHDR" (4), width (4), height (4), ...
    png[16..20].copy_from_slice(&22_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&22_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let t = std::time::Instant::now();
    let e = dmdpipe::data::image::decode_rgb_bytes(&png, 8192).unwrap_err();
    assert!(format!("{e:#}").to_lowercase().contains("limit"), "{e:#}");
    assert!(t.elapsed().as_secs() < 5);
    // Under a larger `max_side` the decoder's memory limit still refuses it.
    assert!(dmdpipe::data::image::decode_rgb_bytes(&png, 30_000).is_err());
}

#[test]
fn legacy_torch_streams() {
    let original = std::fs::read(repo("tests/fixtures/lpips/heads_legacy.pth")).unwrap();
    assert!(dmdpipe::artifact::torch_pickle::legacy_torch_from_bytes(&original).is_ok());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..1000 {
        let m = mutate(&mut rng, &original);
        no_panic("legacy torch", || {
            dmdpipe::artifact::torch_pickle::legacy_torch_from_bytes(&m).is_ok()
        });
    }
}

#[test]
fn edm_dataset_archives() {
    use dmdpipe::data::edm_archive::read_edm_dataset;
    let original = std::fs::read(repo("tests/fixtures/edm_dataset/edm-scale-32.zip")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.zip");
    std::fs::write(&path, &original).unwrap();
    assert_eq!(read_edm_dataset(&path, None, 64, &|| {}).unwrap().len(), 3);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..500 {
        std::fs::write(&path, mutate(&mut rng, &original)).unwrap();
        no_panic("EDM dataset archive", || read_edm_dataset(&path, None, 64, &|| {}).is_ok());
    }
}
