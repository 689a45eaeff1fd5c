//! Weight import in Rust: EDM `.pkl` snapshots and torch zip checkpoints, built by the test in
//! the exact layout of the real files (see tests/common/pickle_writer.rs).

mod common;

use std::collections::BTreeMap;

use common::pickle_writer::{edm_snapshot, nvidia_detector, torch_zip};
use dmdpipe::nn::import::load_denoiser;
use dmdpipe::nn::{Denoiser, NetworkConfig};
use tch::{Device, Kind, Tensor};

fn tiny() -> NetworkConfig {
    serde_json::from_value(serde_json::json!({"arch": "ddpmpp", "img_resolution": 8, "label_dim": 3, "augment_dim": 2, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]})).unwrap()
}

/// EDM's constructor kwargs for `tiny()`, as its persistence records them.
fn edm_kwargs() -> serde_json::Value {
    let mut v = serde_json::to_value(tiny()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("arch");
    o.insert("model_type".into(), "SongUNet".into());
    o.insert("use_fp16".into(), false.into());
    o.insert("sigma_min".into(), 0.into());
    o.insert("sigma_max".into(), f64::INFINITY.to_string().into());
    v
}

fn random_net() -> (Denoiser, BTreeMap<String, Tensor>) {
    tch::manual_seed(7);
    let net = Denoiser::new(&tiny(), Device::Cpu);
    // EDM zero-initialises some layers: redraw everything so the check sees every tensor.
    let mut vars = BTreeMap::new();
    for (name, t) in net.vs.variables() {
        if !name.ends_with("resample_filter") {
            tch::no_grad(|| t.shallow_clone().copy_(&Tensor::randn_like(&t).multiply_scalar(0.1)));
        }
        vars.insert(name, t);
    }
    (net, vars)
}

/// D(x) on fixed inputs (no global RNG: tests in this binary run in parallel threads).
fn output(net: &Denoiser) -> Tensor {
    let x = (Tensor::arange(2 * 3 * 8 * 8, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .reshape([2, 3, 8, 8]);
    let sigma = Tensor::from_slice(&[0.5f32, 3.0]);
    let labels = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0]).reshape([2, 3]);
    tch::no_grad(|| net.denoise(&x, &sigma, Some(&labels), false))
}

#[test]
fn edm_pickle_round_trips_weights_and_config() {
    let (net, vars) = random_net();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("network-snapshot.pkl");
    std::fs::write(&path, edm_snapshot(&vars, &edm_kwargs())).unwrap();
    if let Ok(dump) = std::env::var("DMDPIPE_PICKLE_DUMP") {
        std::fs::copy(&path, dump).unwrap(); // for checking the opcodes with Python's pickletools
    }
    let imported = load_denoiser(&path, None, Device::Cpu).unwrap();
    assert_eq!(imported.config, tiny(), "config read from _init_kwargs");
    assert!(output(&imported).equal(&output(&net)), "identical weights give identical outputs");
    // A pipeline `network` that disagrees with the file is refused, naming both.
    let mut other = tiny();
    if let NetworkConfig::Ddpmpp(c) = &mut other {
        c.model_channels = 32;
    }
    let e = load_denoiser(&path, Some(&other), Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("differs") && e.contains("network-snapshot.pkl"), "{e}");
}

#[test]
fn edm_pickle_missing_tensor_is_named() {
    let (_, mut vars) = random_net();
    vars.remove("model.map_layer0.bias");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.pkl");
    std::fs::write(&path, edm_snapshot(&vars, &edm_kwargs())).unwrap();
    let e = load_denoiser(&path, None, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.map_layer0.bias") && e.contains("1 missing"), "{e}");
}

#[test]
fn truncated_pickle_is_a_clear_error() {
    let (_, vars) = random_net();
    let bytes = edm_snapshot(&vars, &edm_kwargs());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pkl");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", load_denoiser(&path, None, Device::Cpu).err().unwrap());
    assert!(e.contains("cut.pkl") && e.contains("truncated"), "{e}");
}

#[test]
fn torch_zip_checkpoint_loads_with_a_given_config() {
    let (net, vars) = random_net();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    torch_zip(&vars, &path);
    let e = load_denoiser(&path, None, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("no network config"), "{e}");
    let imported = load_denoiser(&path, Some(&tiny()), Device::Cpu).unwrap();
    assert!(output(&imported).equal(&output(&net)));
}

/// pytorch-fid's module and branch names, as its FIDInceptionA..E define them.
fn pytorch_fid_names() -> Vec<String> {
    let mut convs: Vec<String> = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = [
        "branch1x1",
        "branch5x5_1",
        "branch5x5_2",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3",
        "branch_pool",
    ];
    let b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"];
    let c = [
        "branch1x1",
        "branch7x7_1",
        "branch7x7_2",
        "branch7x7_3",
        "branch7x7dbl_1",
        "branch7x7dbl_2",
        "branch7x7dbl_3",
        "branch7x7dbl_4",
        "branch7x7dbl_5",
        "branch_pool",
    ];
    let d = [
        "branch3x3_1",
        "branch3x3_2",
        "branch7x7x3_1",
        "branch7x7x3_2",
        "branch7x7x3_3",
        "branch7x7x3_4",
    ];
    let e = [
        "branch1x1",
        "branch3x3_1",
        "branch3x3_2a",
        "branch3x3_2b",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3a",
        "branch3x3dbl_3b",
        "branch_pool",
    ];
    for (m, branches) in [
        ("Mixed_5b", &a[..]),
        ("Mixed_5c", &a),
        ("Mixed_5d", &a),
        ("Mixed_6a", &b),
        ("Mixed_6b", &c),
        ("Mixed_6c", &c),
        ("Mixed_6d", &c),
        ("Mixed_6e", &c),
        ("Mixed_7a", &d),
        ("Mixed_7b", &e),
        ("Mixed_7c", &e),
    ] {
        convs.extend(branches.iter().map(|br| format!("{m}.{br}")));
    }
    convs
}

/// `dmdpipe import-weights --inception FILE` writes exactly the TF-named tensors `tf`.
fn import_inception_matches(file: &std::path::Path, tf: &std::collections::HashMap<String, Tensor>) {
    let out = file.with_extension("converted.safetensors");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(["import-weights", "--inception"])
        .arg(file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let (back, _) = dmdpipe::artifact::tensors::read_safetensors(&out).unwrap();
    assert_eq!(back.len(), 376);
    for (k, v) in tf {
        assert!(back[k].equal(v), "{k} differs");
    }
    dmdpipe::eval::inception::Inception::load(&out, Device::Cpu).unwrap();
}

#[test]
fn pytorch_fid_inception_checkpoint_converts_to_the_tf_names() {
    if common::shared_file("models/inception-2015-12-05.safetensors").is_none() {
        return;
    }
    let real = format!("{}/../shared/models/inception-2015-12-05.safetensors", env!("CARGO_MANIFEST_DIR"));
    let (tf, _) = dmdpipe::artifact::tensors::read_safetensors(std::path::Path::new(&real)).unwrap();
    let mut fid_style = BTreeMap::new();
    for conv in pytorch_fid_names() {
        for (theirs, _) in [
            ("conv.weight", "weight"),
            ("bn.bias", "beta"),
            ("bn.running_mean", "mean"),
            ("bn.running_var", "var"),
        ] {
            let name = format!("{conv}.{theirs}");
            let ours = dmdpipe::eval::inception_import::pytorch_fid_to_tf(&name).unwrap_or_else(|| panic!("no mapping for {name}"));
            fid_style.insert(
                name,
                tf.get(&ours)
                    .unwrap_or_else(|| panic!("{ours} not in the TF weights"))
                    .shallow_clone(),
            );
        }
        let n = fid_style[&format!("{conv}.bn.bias")].size()[0];
        fid_style.insert(format!("{conv}.bn.weight"), Tensor::ones([n], (Kind::Float, Device::Cpu)));
    }
    fid_style.insert("fc.weight".into(), Tensor::zeros([4, 2048], (Kind::Float, Device::Cpu)));
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("pt_inception-2015-12-05-6726825d.pth");
    torch_zip(&fid_style, &pth);
    import_inception_matches(&pth, &tf);
}

#[test]
fn import_weights_cli_and_teacher_import_stage_read_edm_pickles() {
    let (net, vars) = random_net();
    let p = common::Project::new();
    let pkl = p.path().join("edm-snapshot.pkl");
    std::fs::write(&pkl, edm_snapshot(&vars, &edm_kwargs())).unwrap();
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .arg("import-weights")
        .arg(&pkl)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let converted = load_denoiser(&pkl.with_extension("safetensors"), None, Device::Cpu).unwrap();
    assert!(output(&converted).equal(&output(&net)));
    p.write("p.toml", "[stages.teacher]\nkind = \"teacher\"\nmode = \"import\"\nweights = \"edm-snapshot.pkl\"\ngrid = { columns = 2, sampler = { steps = 2 } }\n");
    let r = dmdpipe::pipeline::runner::run(
        &p.load("p.toml"),
        &dmdpipe::pipeline::runner::RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let t = r.stage("teacher").unwrap();
    assert_eq!(t.metrics["parameters"].as_i64().unwrap(), net.num_params());
    let imported = dmdpipe::nn::load_denoiser_dir(t.output_dir.as_ref().unwrap(), Device::Cpu).unwrap();
    assert!(output(&imported).equal(&output(&net)));
}

#[test]
fn nvidia_inception_detector_pickle_converts_to_the_tf_names() {
    if common::shared_file("models/inception-2015-12-05.safetensors").is_none() {
        return;
    }
    let real = format!("{}/../shared/models/inception-2015-12-05.safetensors", env!("CARGO_MANIFEST_DIR"));
    let (tf, _) = dmdpipe::artifact::tensors::read_safetensors(std::path::Path::new(&real)).unwrap();
    // The detector's own module paths: `layers.<module>.<tensor>` under the pickled network.
    let theirs: BTreeMap<String, Tensor> = tf
        .iter()
        .map(|(k, v)| (k.strip_prefix("net.").unwrap().to_string(), v.shallow_clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let pkl = dir.path().join("inception-2015-12-05.pkl");
    std::fs::write(&pkl, nvidia_detector(&theirs)).unwrap();
    import_inception_matches(&pkl, &tf);
    // A detector with a layer missing is refused, naming the tensor.
    let mut short = theirs;
    short.remove("layers.mixed_6.conv.var");
    let bad = dir.path().join("short.pkl");
    std::fs::write(&bad, nvidia_detector(&short)).unwrap();
    let e = dmdpipe::eval::inception_import::import_inception(&bad, &dir.path().join("x.safetensors")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("short.pkl") && msg.contains("net.layers.mixed_6.conv.var"), "{msg}");
}
