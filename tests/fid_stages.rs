//! fid-ref, fid and sample-grid stages end to end on CPU with tiny fixtures and the real
//! Inception weights.

mod common;

use common::*;
use dmdpipe::pipeline::runner::{self, RunOptions};

const NET: &str = "{ arch = \"ddpmpp\", img_resolution = 8, label_dim = 2, augment_dim = 0, model_channels = 16, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [], dropout = 0.0 }";

fn inception() -> String {
    format!("{}/../shared/models/inception-2015-12-05.safetensors", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn fid_of_a_dataset_against_itself_is_zero_and_generator_fid_is_positive() {
    if common::shared_file("models/inception-2015-12-05.safetensors").is_none() {
        return;
    }
    let p = Project::new();
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30 + i * 7) as u8, (y * 30) as u8, (c * 200) as u8]));
            img.save(p.path().join("imgs").join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let inc = inception();
    p.write(
        "p.toml",
        &format!(
            r#"
[stages.data]
kind = "image-folder"
source = "imgs"
resolution = 8

[stages.ref]
kind = "fid-ref"
dataset = "data"
inception = "{inc}"
batch = 3
keep_features = true

[stages.self_fid]
kind = "fid"
reference = "ref"
images = "data"
inception = "{inc}"
kid_pr = true

[stages.teacher]
kind = "teacher"
mode = "train"
dataset = "data"
network = {NET}
grid = {{ columns = 2, sampler = {{ steps = 2 }} }}
train = {{ batch = 4, images = 8, log_every = 1 }}

[stages.gen_fid]
kind = "fid"
reference = "ref"
generator = "teacher"
sampler = {{ solver = "onestep" }}
num_samples = 6
repeats = 2
seed = 100
batch = 4
inception = "{inc}"
kid_pr = true

[stages.grid]
kind = "sample-grid"
generator = "teacher"
classes_from = "data"
sampler = {{ solver = "euler", steps = 3 }}
columns = 4
"#
        ),
    );
    let r = runner::run(
        &p.load("p.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let self_fid = r.stage("self_fid").unwrap().metrics["fid"].as_f64().unwrap();
    assert!(self_fid.abs() < 1e-3, "FID of a set with itself: {self_fid}");
    // KID and precision/recall from the kept features: a set covers itself exactly.
    let sm = &r.stage("self_fid").unwrap().metrics;
    assert_eq!((sm["precision"].as_f64().unwrap(), sm["recall"].as_f64().unwrap()), (1.0, 1.0));
    assert!(sm["kid"].as_f64().unwrap().is_finite());
    let gm = &r.stage("gen_fid").unwrap().metrics;
    for k in ["precision", "recall"] {
        let v = gm[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} {v}");
    }
    assert!(
        gm["kid"].as_f64().unwrap() > sm["kid"].as_f64().unwrap(),
        "generated images are further than the set itself"
    );
    let g = &r.stage("gen_fid").unwrap().metrics;
    let reps: Vec<f64> = g["fid_repeats"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(reps.len(), 2);
    assert!(reps.iter().all(|f| f.is_finite() && *f > 1.0), "{reps:?}");
    assert_ne!(reps[0], reps[1], "different seed sets");
    assert_eq!(g["fid"].as_f64().unwrap(), reps[0].min(reps[1]));
    assert_eq!(g["sampler_calls"], 1);
    let grid = image::open(r.stage("grid").unwrap().output_dir.as_ref().unwrap().join("grid.png")).unwrap();
    assert_eq!(grid.height(), 2 * 10 + 2, "two labelled rows");
    // Same seeds, same grid: a re-run of the grid stage alone reproduces it byte for byte.
    let before = std::fs::read(r.stage("grid").unwrap().output_dir.as_ref().unwrap().join("grid.png")).unwrap();
    let again = runner::run(
        &p.load("p.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            force: vec!["grid".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let after = std::fs::read(again.stage("grid").unwrap().output_dir.as_ref().unwrap().join("grid.png")).unwrap();
    assert_eq!(before, after);
}
