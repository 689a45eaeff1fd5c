//! Small training fixtures shared by the CPU training tests.

use dmdpipe::data::artifact::ImageDataset;
use dmdpipe::nn::NetworkConfig;
use dmdpipe::train::dmd::{Pairs, RealImages};
use tch::{Device, Kind, Tensor};

/// A DDPM++ of 8x8 images, 2 classes, no dropout (so that runs can be compared exactly).
pub fn tiny_unet() -> NetworkConfig {
    let mut c: NetworkConfig = serde_json::from_value(serde_json::json!({
        "arch": "ddpmpp", "img_resolution": 8, "label_dim": 2, "augment_dim": 0, "model_channels": 8,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []
    }))
    .unwrap();
    c.set_dropout(0.0);
    c
}

/// 16 deterministic 8x8 images of 2 classes.
pub fn tiny_images() -> ImageDataset {
    ImageDataset {
        images: (0..16 * 8 * 8 * 3).map(|i| ((i * 37) % 256) as u8).collect(),
        height: 8,
        width: 8,
        channels: 3,
        labels: (0..16).map(|i| i % 2).collect(),
        classes: vec!["a".into(), "b".into()],
    }
}

/// 16 random ODE pairs and 16 random real images of `tiny_unet`'s shape, from the global
/// generator (seed it first).
pub fn pairs_and_real() -> (Pairs, RealImages) {
    let eye = Tensor::eye(2, (Kind::Float, Device::Cpu));
    let pairs = Pairs {
        z: Tensor::randn([16, 3, 8, 8], (Kind::Float, Device::Cpu)),
        labels: Some(eye.index_select(0, &Tensor::randint(2, [16], (Kind::Int64, Device::Cpu)))),
        x: Tensor::randn([16, 3, 8, 8], (Kind::Float, Device::Cpu)) * 0.5,
    };
    let real = RealImages {
        images: (Tensor::rand([16, 3, 8, 8], (Kind::Float, Device::Cpu)) * 255.0).to_kind(Kind::Uint8),
        labels: Some(eye.index_select(0, &Tensor::randint(2, [16], (Kind::Int64, Device::Cpu)))),
    };
    (pairs, real)
}
