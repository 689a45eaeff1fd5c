//! The ImageNet-64 and AFHQ-64 pipelines with a teacher trained on generated fixture data of the
//! same shape (the dataset kinds, the DMD stage's FID curve, DMD2's GAN head and the EMA export
//! end to end on CPU). tests/paper_pipelines.rs runs the shipped files unchanged.

mod common;

use common::*;
use dmdpipe::data::npy::{NpyArray, NpyData, write_npz};
use dmdpipe::pipeline::runner::{self, RunOptions};
use toml::{Table, Value};

fn inception() -> String {
    format!("{}/../shared/models/inception-2015-12-05.safetensors", env!("CARGO_MANIFEST_DIR"))
}

fn set(t: &mut Table, path: &[&str], v: Value) {
    let mut cur = t;
    for k in &path[..path.len() - 1] {
        cur = cur
            .entry(k.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap();
    }
    cur.insert(path[path.len() - 1].to_string(), v);
}

/// Shrinks a shipped pipeline: a tiny teacher trained on the fixture instead of the imported
/// checkpoint, a few pairs, a few DMD iterations, tiny FIDs.
fn shrink(name: &str, network: &str, dataset: &str) -> String {
    let text = std::fs::read_to_string(format!("{}/pipelines/{name}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut t: Table = toml::from_str(&text).unwrap();
    set(&mut t, &["pipeline", "root"], ".".into());
    let stages = t["stages"].as_table_mut().unwrap();
    // The shipped files read EDM's reference statistics; here they come from the fixture data.
    stages.insert("dataset".into(), toml::from_str::<Table>(dataset).unwrap().into());
    let fid_ref = stages["fid_ref"].as_table_mut().unwrap();
    fid_ref.remove("stats");
    fid_ref.insert("dataset".into(), "dataset".into());
    stages.remove("teacher_fid");
    let teacher = stages["teacher"].as_table_mut().unwrap();
    teacher.remove("weights");
    teacher.insert("mode".into(), "train".into());
    teacher.insert("dataset".into(), "dataset".into());
    let net: Table = toml::from_str(&format!("n = {network}")).unwrap();
    teacher.insert("network".into(), net["n"].clone());
    teacher.insert(
        "train".into(),
        toml::from_str::<Table>("batch = 2\nimages = 4\nlog_every = 1").unwrap().into(),
    );
    teacher.insert(
        "grid".into(),
        toml::from_str::<Table>("columns = 2\nsampler = { steps = 2 }").unwrap().into(),
    );
    set(stages, &["pairs", "count"], 4.into());
    set(stages, &["pairs", "batch"], 2.into());
    set(stages, &["pairs", "sampler", "steps"], 2.into());
    for (k, v) in [("batch", 2), ("iterations", 2), ("log_every", 1), ("warmup_steps", 1)] {
        set(stages, &["dmd", "train", k], v.into());
    }
    set(stages, &["dmd", "train", "bf16"], false.into());
    set(stages, &["dmd", "grid_columns"], 2.into());
    let eval: Table = toml::from_str(&format!(
        "reference = \"fid_ref\"\ninception = \"{}\"\nevery = 1\nnum_samples = 4",
        inception()
    ))
    .unwrap();
    set(stages, &["dmd", "eval"], eval.into());
    for s in ["fid_ref", "student_fid"] {
        set(stages, &[s, "inception"], inception().into());
    }
    for (k, v) in [("num_samples", 4), ("repeats", 1), ("batch", 2)] {
        set(stages, &["student_fid", k], v.into());
    }
    set(stages, &["student_grid", "columns"], 2.into());
    toml::to_string(&t).unwrap()
}

#[test]
fn imagenet64_pipeline_runs_on_a_fixture() {
    if common::shared_file("models/inception-2015-12-05.safetensors").is_none() {
        return;
    }
    let p = Project::new();
    common::lpips_standins(p.path());
    let dir = p.path().join("data/imagenet64");
    std::fs::create_dir_all(&dir).unwrap();
    for b in 1..=10 {
        let n = 1;
        let data: Vec<u8> = (0..n * 3 * 64 * 64).map(|i| ((i * 7 + b * 13) % 256) as u8).collect();
        let labels = vec![(b % 3 + 1) as i64];
        write_npz(
            &dir.join(format!("train_data_batch_{b}.npz")),
            &[
                (
                    "data",
                    &NpyArray {
                        shape: vec![n, 3 * 64 * 64],
                        data: NpyData::U8(data),
                    },
                ),
                (
                    "labels",
                    &NpyArray {
                        shape: vec![n],
                        data: NpyData::I64(labels),
                    },
                ),
            ],
        )
        .unwrap();
    }
    let net = "{ arch = \"adm\", img_resolution = 64, label_dim = 1000, model_channels = 8, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [32] }";
    p.write(
        "imagenet64.toml",
        &shrink("imagenet64", net, "kind = \"imagenet64\"\nsource = \"data/imagenet64\""),
    );
    let r = runner::run(
        &p.load("imagenet64.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.stage("dataset").unwrap().metrics["count"], 10);
    assert_eq!(r.stage("dmd").unwrap().metrics["iterations"], 2);
    assert!(r.stage("student_fid").unwrap().metrics["fid"].as_f64().unwrap().is_finite());
    assert_fid_curve(&r);
}

/// The DMD stage's FID-vs-iterations curve: before training, after each iteration (every = 1).
fn assert_fid_curve(r: &runner::RunReport) {
    let curve = r.stage("dmd").unwrap().metrics["fid_curve"].as_array().unwrap().clone();
    let iters: Vec<u64> = curve.iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(iters, vec![0, 1, 2]);
    assert!(curve.iter().all(|p| p[1].as_f64().unwrap().is_finite()));
}

#[test]
fn afhq64_pipeline_runs_on_a_fixture() {
    if common::shared_file("models/inception-2015-12-05.safetensors").is_none() {
        return;
    }
    let p = Project::new();
    common::lpips_standins(p.path());
    for (c, animal) in ["cat", "dog", "wild"].iter().enumerate() {
        let d = p.path().join("data/afhqv2").join(animal);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2u32 {
            image::RgbImage::from_fn(80, 72, |x, y| image::Rgb([(x * 3) as u8, (y * 3 + i) as u8, (c * 90) as u8]))
                .save(d.join(format!("{i}.png")))
                .unwrap();
        }
    }
    let net = "{ arch = \"ddpmpp\", img_resolution = 64, label_dim = 0, augment_dim = 0, model_channels = 8, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [] }";
    // With an EMA generator exported as the stage's output (the raw one saved beside it).
    let dataset = "kind = \"image-folder\"\nsource = \"data/afhqv2\"\nresolution = 64\nlabels = false";
    let mut t: Table = toml::from_str(&shrink("afhq64", net, dataset)).unwrap();
    let stages = t["stages"].as_table_mut().unwrap();
    set(stages, &["dmd", "train", "ema_halflife_images"], 4.0.into());
    set(stages, &["dmd", "export_ema"], true.into());
    set(stages, &["dmd", "train", "gan_generator_weight"], 3e-3.into());
    set(stages, &["dmd", "dataset"], "dataset".into());
    p.write("afhq64.toml", &toml::to_string(&t).unwrap());
    let r = runner::run(
        &p.load("afhq64.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.stage("dataset").unwrap().metrics["count"], 6);
    assert_eq!(r.stage("dataset").unwrap().metrics["num_classes"], 0, "unconditional");
    assert_eq!(r.stage("dmd").unwrap().metrics["iterations"], 2);
    assert!(r.stage("student_fid").unwrap().metrics["fid"].as_f64().unwrap().is_finite());
    assert_fid_curve(&r);
    let dmd = r.stage("dmd").unwrap();
    assert_eq!(dmd.metrics["exported"], "ema");
    // DMD2's GAN head ran: the discriminator loss is near 2 ln 2 at the start, never 0.
    let d = dmd.metrics["final_loss_gan_d"].as_f64().unwrap();
    assert!(d > 0.5 && d < 3.0, "discriminator loss {d}");
    assert_eq!(dmd.metrics["fid_curve_ema"].as_array().unwrap().len(), 3);
    let out = dmd.output_dir.as_ref().unwrap();
    let raw = dmdpipe::artifact::tensors::read_safetensors(&out.join("generator_raw.safetensors"))
        .unwrap()
        .0;
    let main = dmdpipe::artifact::tensors::read_safetensors(&out.join("denoiser.safetensors"))
        .unwrap()
        .0;
    let differs = raw
        .iter()
        .any(|(k, v)| main.get(k).is_some_and(|v2| (v - v2).abs().max().double_value(&[]) > 0.0));
    assert!(differs, "the exported EMA differs from the raw generator");
}
