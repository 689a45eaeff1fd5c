//! The Inception-v3 feature network against references from the original TF graph
//! (../shared/golden/inception), on the first CIFAR-10 training images.

mod common;

use std::io::Read;
use std::path::PathBuf;

use dmdpipe::data::cifar10::decode_batch;
use dmdpipe::data::npy::read_npy;
use dmdpipe::eval::inception::Inception;
use tch::{Device, Kind, Tensor};

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

/// The first `n` training images, uint8 NHWC, from the shared xz file.
fn first_train_images(n: usize) -> Tensor {
    let mut xz = Vec::new();
    std::fs::File::open(shared("data/cifar10/data_batch_1.bin.xz"))
        .unwrap()
        .read_to_end(&mut xz)
        .unwrap();
    let mut raw = Vec::new();
    lzma_rs::xz_decompress(&mut xz.as_slice(), &mut raw).unwrap();
    let (images, _) = decode_batch(&shared("data_batch_1.bin"), &raw[..n * 3073]).unwrap();
    Tensor::from_slice(&images).reshape([n as i64, 32, 32, 3])
}

fn to_tensor(path: &str) -> Tensor {
    let a = read_npy(&shared(path)).unwrap();
    let shape: Vec<i64> = a.shape.iter().map(|&s| s as i64).collect();
    Tensor::from_slice(&a.to_f64()).reshape(shape)
}

#[test]
fn resize_and_features_match_the_reference() {
    if common::shared_file("golden/inception").is_none()
        || common::shared_file("models/inception-2015-12-05.safetensors").is_none()
        || common::shared_file("data/cifar10/data_batch_1.bin.xz").is_none()
    {
        return;
    }
    let net = Inception::load(&shared("models/inception-2015-12-05.safetensors"), Device::Cpu).unwrap();
    let images = first_train_images(4);
    let resized = net.resize(&images).to_kind(Kind::Double);
    let golden = to_tensor("golden/inception/golden_train4_resized299.npy");
    let max_abs = (&resized - &golden).abs().max().double_value(&[]);
    assert!(max_abs < 1e-3, "resize max abs error {max_abs:e}");
    let feats = net.features(&images).to_kind(Kind::Double);
    let golden = to_tensor("golden/inception/golden_train16_feats.npy").narrow(0, 0, 4);
    let rel = (&feats - &golden).norm().double_value(&[]) / golden.norm().double_value(&[]);
    assert!(rel < 1e-4, "features relative error {rel:e}");
    let worst_row = (0..4).map(|i| {
        let (a, b) = (feats.get(i), golden.get(i));
        (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
    });
    assert!(worst_row.fold(0.0, f64::max) < 1e-4);
    // Forced memory layouts (a speed choice) give the same features.
    let mut net = net;
    for layout in [dmdpipe::eval::inception::Layout::Nchw, dmdpipe::eval::inception::Layout::Nhwc] {
        net.layout = layout;
        let f = net.features(&images.narrow(0, 0, 2)).to_kind(Kind::Double);
        let rel = (&f - feats.narrow(0, 0, 2)).norm().double_value(&[]) / f.norm().double_value(&[]);
        assert!(rel < 1e-5, "{layout:?}: features differ by {rel:e}");
    }
}
