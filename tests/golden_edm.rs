//! EDM networks against reference outputs of NVIDIA's implementation (../shared/golden/edm).

use std::path::PathBuf;

use dmdpipe::nn::weights::{load_into, read_safetensors};
use dmdpipe::nn::{Denoiser, NetworkConfig};
use tch::{Device, Kind, Tensor};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden/edm").join(name)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

fn load(weights: &str) -> Denoiser {
    let (tensors, meta) = read_safetensors(&golden(weights)).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&meta["config"].replace("Infinity", "\"inf\"")).unwrap();
    let config = NetworkConfig::from_edm_kwargs(&cfg).unwrap();
    let net = Denoiser::new(&config, Device::Cpu);
    load_into(&net, &tensors, weights).unwrap();
    net
}

fn check(weights: &str, io: &str) -> (Denoiser, std::collections::HashMap<String, Tensor>) {
    let net = load(weights);
    let (io, _) = read_safetensors(&golden(io)).unwrap();
    let (x, sigma, labels) = (&io["x"], &io["sigma"], &io["class_labels"]);
    let d = tch::no_grad(|| net.denoise(x, sigma, Some(labels), false));
    let e = rel_err(&d, &io["denoised"]);
    assert!(e < 1e-4, "{weights}: denoised relative error {e:e}");
    let s = sigma.reshape([-1, 1, 1, 1]);
    let c_in = (s.square() + 0.25).sqrt().reciprocal();
    let f = tch::no_grad(|| net.raw(&(&c_in * x), &(sigma.log() / 4.0), Some(labels), None, false));
    let e = rel_err(&f, &io["raw_F"]);
    assert!(e < 1e-4, "{weights}: raw_F relative error {e:e}");
    (net, io)
}

#[test]
fn songunet_matches_edm() {
    check("songunet_small_weights.safetensors", "songunet_small_io.safetensors");
}

#[test]
fn dhariwal_unet_matches_edm() {
    check("adm_small_weights.safetensors", "adm_small_io.safetensors");
}
