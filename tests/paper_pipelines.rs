//! The four paper pipelines as shipped (pipelines/cifar10.toml, cifar10-uncond.toml,
//! imagenet64.toml, afhq64.toml), run end to end through the real CLI on generated stand-ins of
//! the files they name: EDM-format snapshots of tiny networks of the same family, CIFAR-10
//! binary files of a few records, reference statistics of the right shape. The pipeline file is
//! copied unchanged; the work is made small with `--set`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::pickle_writer::edm_snapshot;
use dmdpipe::eval::fid::FidStats;
use dmdpipe::nn::{Denoiser, NetworkConfig};
use tch::{Device, Tensor};

struct Paper {
    file: &'static str,
    weights: &'static str,
    /// A tiny network of the teacher's family and shape of data.
    network: serde_json::Value,
    /// Reference statistics the pipeline reads instead of a dataset.
    stats: Option<&'static str>,
    cifar: bool,
    /// Reads the ILSVRC class folders (a stand-in of real JPEGs is written).
    imagenet: bool,
}

fn papers() -> Vec<Paper> {
    let song = |extra: serde_json::Value| {
        let mut v =
            serde_json::json!({"arch": "ddpmpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    vec![
        Paper {
            file: "cifar10.toml",
            weights: "models/edm-cifar10-32x32-cond-vp.pkl",
            network: song(serde_json::json!({})),
            stats: None,
            cifar: true,
            imagenet: false,
        },
        Paper {
            file: "cifar10-uncond.toml",
            weights: "models/edm-cifar10-32x32-uncond-vp.pkl",
            network: song(serde_json::json!({"label_dim": 0})),
            stats: None,
            cifar: true,
            imagenet: false,
        },
        Paper {
            file: "imagenet64.toml",
            weights: "models/edm-imagenet-64x64-cond-adm.pkl",
            network: serde_json::json!({"arch": "adm", "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [32]}),
            stats: Some("models/imagenet-64x64.npz"),
            cifar: false,
            imagenet: false,
        },
        Paper {
            file: "imagenet64-dmd2.toml",
            weights: "models/edm-imagenet-64x64-cond-adm.pkl",
            network: serde_json::json!({"arch": "adm", "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [32]}),
            stats: Some("models/imagenet-64x64.npz"),
            cifar: false,
            imagenet: true,
        },
        Paper {
            file: "afhq64.toml",
            weights: "models/edm-afhqv2-64x64-uncond-vp.pkl",
            network: song(serde_json::json!({"img_resolution": 64, "label_dim": 0, "attn_resolutions": [32]})),
            stats: Some("models/afhqv2-64x64.npz"),
            cifar: false,
            imagenet: false,
        },
    ]
}

/// EDM's constructor kwargs for one of our configs, as its persistence records them.
fn edm_kwargs(config: &NetworkConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap();
    let o = v.as_object_mut().unwrap();
    let model_type = if o.remove("arch").unwrap() == "adm" {
        "DhariwalUNet"
    } else {
        "SongUNet"
    };
    o.remove("bf16_group_norm");
    o.insert("model_type".into(), model_type.into());
    o.insert("use_fp16".into(), false.into());
    v
}

/// An EDM-format snapshot of a randomly initialised `config`.
fn write_snapshot(path: &Path, config: &NetworkConfig) {
    let net = Denoiser::new(config, Device::Cpu);
    let vars: BTreeMap<String, Tensor> = net.vs.variables().into_iter().collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, edm_snapshot(&vars, &edm_kwargs(config))).unwrap();
}

/// CIFAR-10 binary files of `n` records each (label byte + 3072 pixel bytes).
fn write_cifar(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let files = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (f, name) in files.iter().enumerate() {
        let mut bytes = Vec::with_capacity(n * 3073);
        for i in 0..n {
            bytes.push((i % 10) as u8);
            bytes.extend((0..3072).map(|j| ((i * 31 + j * 7 + f * 13) % 256) as u8));
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Statistics of the right shape (2048 features).
/// A stand-in for one downsampled ImageNet 64x64 batch: `data` [N, 3*64*64] uint8 (planar),
/// `labels` 1..=1000.
/// ILSVRC-style class folders holding the Pillow-written JPEGs and PNGs of the EDM fixture.
fn write_ilsvrc(dir: &Path, repo: &Path) {
    let fixture = repo.join("tests/fixtures/edm_dataset/source");
    for class in std::fs::read_dir(&fixture).unwrap() {
        let class = class.unwrap().path();
        let to = dir.join(class.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

fn write_stats(path: &Path) {
    let dim = 2048;
    let mut sigma = vec![0.0; dim * dim];
    for i in 0..dim {
        sigma[i * dim + i] = 0.01;
    }
    let stats = FidStats {
        mu: vec![0.1; dim],
        sigma,
        dim,
        count: 50_000,
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    stats.save_npz(path).unwrap();
}

/// A JSON value as a TOML inline value (for `--set`).
fn toml_inline(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(o) => {
            let items: Vec<String> = o.iter().map(|(k, v)| format!("{k} = {}", toml_inline(v))).collect();
            format!("{{ {} }}", items.join(", "))
        }
        serde_json::Value::Array(a) => format!("[{}]", a.iter().map(toml_inline).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

fn dmdpipe(root: &Path, args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(args)
        .current_dir(root)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dmdpipe {}:\n{text}", args.join(" "));
    text
}

/// Overrides that keep every stage but make its work tiny.
fn small_work(p: &Paper, names: &[String]) -> Vec<String> {
    let mut sets = vec![format!("stages.teacher.network={}", toml_inline(&p.network))];
    let has = |s: &str| names.iter().any(|n| n == s);
    sets.extend(
        [
            "stages.teacher.grid.columns=2",
            "stages.teacher.grid.sampler.steps=2",
            "stages.dmd.train.iterations=2",
            "stages.dmd.train.batch=8",
            "stages.dmd.train.micro_batch=4",
            "stages.dmd.train.warmup_steps=1",
            "stages.dmd.train.log_every=1",
            "stages.dmd.train.checkpoint_every=1",
        ]
        .map(String::from),
    );
    if has("pairs") {
        sets.extend(["stages.pairs.count=8", "stages.pairs.batch=4", "stages.pairs.sampler.steps=2"].map(String::from));
    }
    for fid in ["teacher_fid", "student_fid"].into_iter().filter(|s| has(s)) {
        sets.push(format!("stages.{fid}.num_samples=6"));
        sets.push(format!("stages.{fid}.batch=6"));
        if fid == "teacher_fid" {
            sets.push(format!("stages.{fid}.sampler.steps=2"));
        }
    }
    if p.cifar {
        sets.push("stages.dataset.verify_md5=false".into());
        sets.push("stages.testset.verify_md5=false".into());
    }
    sets.into_iter().flat_map(|s| ["--set".to_string(), s]).collect()
}

fn stage_names(file: &Path) -> Vec<String> {
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    table["stages"].as_table().unwrap().keys().cloned().collect()
}

fn run_paper(p: &Paper) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = root.join("pipelines").join(p.file);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::copy(repo.join("pipelines").join(p.file), &file).unwrap();
    let config: NetworkConfig = serde_json::from_value(p.network.clone()).unwrap();
    write_snapshot(&root.join(p.weights), &config);
    if p.cifar {
        write_cifar(&root.join("data/cifar-10-batches-bin"), 8);
    }
    if p.imagenet {
        write_ilsvrc(&root.join("data/ILSVRC/Data/CLS-LOC/train"), &repo);
    }
    if let Some(s) = p.stats {
        write_stats(&root.join(s));
    }
    // LPIPS stand-ins: a reduced-width VGG16 and heads that real torch wrote (the loader reads
    // any width), under the names the pipelines expect.
    std::fs::create_dir_all(root.join("models")).unwrap();
    let lpips = repo.join("tests/fixtures/lpips");
    std::fs::copy(lpips.join("vgg_tiny.pth"), root.join("models/vgg16-397923af.pth")).unwrap();
    std::fs::copy(lpips.join("heads_legacy.pth"), root.join("models/lpips-vgg-v0.1.pth")).unwrap();
    let inception = common::shared_file("models/inception-2015-12-05.safetensors");
    if let Some(i) = &inception {
        std::fs::create_dir_all(root.join("models")).unwrap();
        std::fs::copy(i, root.join("models/inception-2015-12-05.safetensors")).unwrap();
    }
    let names = stage_names(&file);
    let mut args: Vec<String> = vec!["run".into(), file.to_string_lossy().into_owned(), "--device".into(), "cpu".into()];
    args.extend(small_work(p, &names));
    // The dry run names each stage's work and prices it.
    let mut dry = args.clone();
    dry.push("--dry-run".into());
    // Without ../shared the Inception is missing: the plan is still printed.
    dry.push("--allow-missing".into());
    let plan = dmdpipe(root, &dry);
    assert!(plan.contains("estimated cost on 1 H200"), "{}: {plan}", p.file);
    assert!(plan.contains("2 iterations x global batch 8"), "{}: {plan}", p.file);
    // Without the FID Inception, everything up to the student's grid.
    if inception.is_none() {
        args.extend(["--until".into(), "student_grid".into()]);
    }
    let log = dmdpipe(root, &args);
    eprintln!("{}:\n{log}", p.file);
    // `dmdpipe path` with the same overrides (they are part of the key).
    let output_dir = |stage: &str| {
        let args = [
            vec!["path".into(), file.to_string_lossy().into_owned(), stage.into()],
            small_work(p, &names),
        ]
        .concat();
        PathBuf::from(dmdpipe(root, &args).trim())
    };
    let grid = output_dir("student_grid");
    assert!(
        std::fs::read_dir(&grid)
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "png")),
        "{}: no grid picture in {}\n{log}",
        p.file,
        grid.display()
    );
    if inception.is_some() {
        let metrics: serde_json::Value = serde_json::from_slice(
            &std::fs::read(output_dir("student_fid").join("metrics.json")).unwrap_or_else(|e| panic!("{}: {e}\n{log}", p.file)),
        )
        .unwrap();
        assert_eq!(metrics["fid_repeats"].as_array().map(Vec::len), Some(3), "{}: {metrics}", p.file);
        assert!(metrics["fid"].as_f64().is_some_and(f64::is_finite), "{}: {metrics}", p.file);
    }
}

#[test]
fn cifar10_conditional_runs_as_shipped() {
    run_paper(&papers()[0]);
}

#[test]
fn cifar10_unconditional_runs_as_shipped() {
    run_paper(&papers()[1]);
}

#[test]
fn imagenet64_runs_as_shipped() {
    run_paper(&papers()[2]);
}

#[test]
fn afhq64_runs_as_shipped() {
    run_paper(&papers()[4]);
}

/// DMD2's ImageNet-64 setting: no pairs, 5 fake updates per generator update, the GAN head on
/// the ADM fake score's bottleneck, real images from the dataset stage.
#[test]
fn imagenet64_dmd2_runs_as_shipped() {
    run_paper(&papers()[3]);
}
