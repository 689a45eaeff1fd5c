//! EDM networks against reference outputs of NVIDIA's implementation (../shared/golden/edm).

mod common;

use std::path::PathBuf;

use dmdpipe::artifact::tensors::read_safetensors;
use dmdpipe::nn::weights::load_into;
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
    if common::shared_file("golden/edm").is_none() {
        return;
    }
    check("songunet_small_weights.safetensors", "songunet_small_io.safetensors");
}

#[test]
fn dhariwal_unet_matches_edm() {
    if common::shared_file("golden/edm").is_none() {
        return;
    }
    check("adm_small_weights.safetensors", "adm_small_io.safetensors");
}

#[test]
fn heun_sampler_matches_edm() {
    if common::shared_file("golden/edm").is_none() {
        return;
    }
    let net = load("songunet_small_weights.safetensors");
    let (io, _) = read_safetensors(&golden("songunet_small_io.safetensors")).unwrap();
    let cfg = dmdpipe::sample::SamplerConfig::default();
    assert_eq!(cfg.network_calls(), 35);
    let out = dmdpipe::sample::sample(&net, &io["heun_latents"], Some(&io["class_labels"]), &cfg);
    let e = rel_err(&out, &io["heun_out"]);
    assert!(e < 1e-3, "heun relative error {e:e}");
}

fn manifest(name: &str) -> (NetworkConfig, Vec<(String, Vec<i64>)>) {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap();
    let config = NetworkConfig::from_edm_kwargs(&m["config"]).unwrap();
    let mut tensors: Vec<(String, Vec<i64>)> = m["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect();
    tensors.sort();
    (config, tensors)
}

fn check_manifest(name: &str, params: i64) {
    let (config, expected) = manifest(name);
    let net = Denoiser::new(&config, Device::Cpu);
    let mut ours: Vec<(String, Vec<i64>)> = net.vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect();
    ours.sort();
    let missing: Vec<_> = expected.iter().filter(|e| !ours.contains(e)).collect();
    let extra: Vec<_> = ours.iter().filter(|o| !expected.contains(o)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    assert_eq!(net.num_params(), params);
}

#[test]
fn cifar10_model_has_edm_names_and_shapes() {
    if common::shared_file("golden/edm").is_none() {
        return;
    }
    check_manifest("songunet_cifar10_cond_manifest.json", 55_735_299);
}

#[test]
fn imagenet64_model_has_edm_names_and_shapes() {
    if common::shared_file("golden/edm").is_none() {
        return;
    }
    check_manifest("adm_imagenet64_cond_manifest.json", 295_899_267);
}
