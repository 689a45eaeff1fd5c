//! The teacher stage on CPU with a tiny DDPM++: training, loss going down, resume, NaN stop,
//! weights round trip and the labelled grid.

mod common;

use common::*;
use dmdpipe::data::artifact::ImageDataset;
use dmdpipe::nn::{Denoiser, NetworkConfig};
use dmdpipe::pipeline::runner::{self, RunOptions};
use dmdpipe::train::device_data::DeviceImages;
use dmdpipe::train::teacher::{TrainOptions, train};
use tch::Device;

const NET: &str = "{ arch = \"ddpmpp\", img_resolution = 8, label_dim = 2, augment_dim = 0, model_channels = 16, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [4], dropout = 0.0 }";

fn tiny_config() -> NetworkConfig {
    let v: toml::Value = toml::from_str(&format!("n = {NET}")).unwrap();
    v["n"].clone().try_into().unwrap()
}

fn two_class_images(p: &Project) {
    for (c, (class, color)) in [("red", [220u8, 30, 30]), ("blue", [30, 30, 220])].iter().enumerate() {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                let v = ((x + y + i) % 3) as u8 * 10;
                image::Rgb([color[0] - v, color[1] + v, color[2] - v * c as u8])
            });
            img.save(p.path().join("imgs").join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

#[test]
fn teacher_stage_trains_and_writes_weights_grid_and_curve() {
    let p = Project::new();
    two_class_images(&p);
    p.write(
        "p.toml",
        &format!(
            "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\n\n[stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\nnetwork = {NET}\ngrid = {{ columns = 3, every_steps = 10, sampler = {{ steps = 4 }} }}\n[stages.teacher.train]\nbatch = 8\nimages = 160\nlr_warmup_images = 16\nlog_every = 5\ncheckpoint_every = 10\n"
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
    let t = r.stage("teacher").unwrap();
    assert_eq!(t.metrics["steps"], 20);
    assert_eq!(t.metrics["images_seen"], 160);
    assert!(t.metrics["final_loss"].as_f64().unwrap().is_finite());
    let dir = t.output_dir.clone().unwrap();
    let net = dmdpipe::nn::load_denoiser_dir(&dir, Device::Cpu).unwrap();
    assert_eq!(net.config, tiny_config());
    assert_eq!(t.metrics["parameters"].as_i64().unwrap(), net.num_params());
    let grid = image::open(dir.join("grid.png")).unwrap();
    assert_eq!(grid.height(), 2 * (8 + 2) + 2, "one row per class");
    assert!(dir.join("loss.png").exists() && dir.join("measurements/training.csv").exists());
    for step in [10, 20] {
        assert!(
            dir.join(format!("progress/grid-step{step:07}.png")).exists(),
            "grid during training at step {step}"
        );
    }
    assert!(
        std::fs::read_to_string(dir.join("measurements/training.csv"))
            .unwrap()
            .lines()
            .count()
            == 5
    );
    assert!(
        !p.cache().join("work").read_dir().unwrap().any(|_| true),
        "work dir removed after success"
    );
    // GroupNorm's bf16 mode is on by default and is part of the key: turning it off makes the
    // teacher stale, named by the parameter.
    assert!(net.config.bf16_group_norm());
    let off = std::fs::read_to_string(p.path().join("p.toml"))
        .unwrap()
        .replace("dropout = 0.0 }", "dropout = 0.0, bf16_group_norm = false }");
    p.write("p.toml", &off);
    let why = runner::why(&p.load("p.toml"), "teacher", None).unwrap();
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].contains("bf16_group_norm") && why[0].contains("true -> false"), "{why:?}");
}

fn dataset(p: &Project) -> ImageDataset {
    two_class_images(p);
    p.write(
        "d.toml",
        "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\n",
    );
    let r = p.run("d.toml");
    ImageDataset::read(r.stage("data").unwrap().output_dir.as_ref().unwrap()).unwrap()
}

#[test]
fn loss_goes_down_and_training_resumes_from_its_checkpoint() {
    let p = Project::new();
    let ds = dataset(&p);
    let data = DeviceImages::new(&ds, Device::Cpu);
    tch::manual_seed(0);
    let net = Denoiser::new(&tiny_config(), Device::Cpu);
    let mut ema = Denoiser::new(&tiny_config(), Device::Cpu);
    ema.copy_from(&net).unwrap();
    let work = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        batch: 16,
        images: 16 * 150,
        lr: 2e-3,
        lr_warmup_images: 160,
        log_every: 10,
        checkpoint_every: 10,
        ..Default::default()
    };
    let first = train(&net, &ema, &data, &opts, work.path(), |_, _, _, _| {}).unwrap();
    assert_eq!(first.steps, 150);
    let c = &first.loss_curve;
    let early = (c[0].1 + c[1].1 + c[2].1) / 3.0;
    let late = (c[c.len() - 1].1 + c[c.len() - 2].1 + c[c.len() - 3].1) / 3.0;
    assert!(late < 0.7 * early, "loss {early} -> {late}");
    // A new process (fresh networks) continues from the checkpoint instead of starting over.
    let net2 = Denoiser::new(&tiny_config(), Device::Cpu);
    let ema2 = Denoiser::new(&tiny_config(), Device::Cpu);
    let more = TrainOptions {
        images: 16 * 170,
        ..opts.clone()
    };
    let second = train(&net2, &ema2, &data, &more, work.path(), |_, _, _, _| {}).unwrap();
    assert_eq!(second.resumed_from_step, 150);
    assert_eq!(second.steps, 170);
    assert!(second.loss_curve.len() > first.loss_curve.len(), "the curve continues");
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint() {
    let p = Project::new();
    let ds = dataset(&p);
    let data = DeviceImages::new(&ds, Device::Cpu);
    tch::manual_seed(1);
    let net = Denoiser::new(&tiny_config(), Device::Cpu);
    let ema = Denoiser::new(&tiny_config(), Device::Cpu);
    let work = tempfile::tempdir().unwrap();
    let good = TrainOptions {
        batch: 4,
        images: 4 * 10,
        log_every: 5,
        checkpoint_every: 5,
        ..Default::default()
    };
    train(&net, &ema, &data, &good, work.path(), |_, _, _, _| {}).unwrap();
    let ckpt = work.path().join("checkpoint.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    let explode = TrainOptions {
        images: 4 * 400,
        lr: 1e30,
        lr_warmup_images: 1,
        ..good
    };
    let err = train(&net, &ema, &data, &explode, work.path(), |_, _, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite loss") && err.contains("at step"), "{err}");
    let step: u64 = err.split("at step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!(step > 10);
    let after = std::fs::read(&ckpt).unwrap();
    let meta = |b: &[u8]| safetensors::SafeTensors::read_metadata(b).unwrap().1.metadata().clone().unwrap()["step"].clone();
    let saved: u64 = meta(&after).parse().unwrap();
    assert!(saved < step, "checkpoint at step {saved} predates the bad step {step}");
    assert!(saved >= meta(&before).parse::<u64>().unwrap());
}

#[test]
fn augmented_training_feeds_the_labels_to_the_network() {
    let p = Project::new();
    let ds = dataset(&p);
    let data = DeviceImages::new(&ds, Device::Cpu);
    let mut config = tiny_config();
    if let NetworkConfig::Ddpmpp(c) = &mut config {
        c.augment_dim = 9;
    }
    let map_augment = |net: &Denoiser| {
        let vars = net.vs.variables();
        vars.iter()
            .find(|(k, _)| k.contains("map_augment"))
            .map(|(_, v)| v.copy())
            .expect("a map_augment layer")
    };
    let run = |augment: Option<dmdpipe::train::augment::AugmentOptions>| {
        tch::manual_seed(0);
        let net = Denoiser::new(&config, Device::Cpu);
        let mut ema = Denoiser::new(&config, Device::Cpu);
        ema.copy_from(&net).unwrap();
        let before = map_augment(&net);
        let opts = TrainOptions {
            batch: 8,
            images: 8 * 6,
            lr_warmup_images: 8,
            log_every: 3,
            checkpoint_every: 3,
            augment,
            ..Default::default()
        };
        let work = tempfile::tempdir().unwrap();
        let s = train(&net, &ema, &data, &opts, work.path(), |_, _, _, _| {}).unwrap();
        assert!(s.final_loss.is_finite());
        (before, map_augment(&net))
    };
    // Without augmentation the layer gets no gradient; with it, it learns.
    let (before, after) = run(None);
    assert_eq!(f64::try_from((&after - &before).abs().max()).unwrap(), 0.0);
    let options = dmdpipe::train::augment::AugmentOptions {
        p: 0.5,
        ..Default::default()
    };
    let (before, after) = run(Some(options));
    assert!(f64::try_from((&after - &before).abs().max()).unwrap() > 0.0);
}

#[test]
fn augment_needs_matching_augment_dim_and_eager_steps() {
    let p = Project::new();
    two_class_images(&p);
    let stage = |net: &str, extra: &str| {
        format!(
            "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\n\n[stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\nnetwork = {net}\n[stages.teacher.train]\nbatch = 8\nimages = 16\naugment = {{ p = 0.12 }}\n{extra}"
        )
    };
    p.write("p.toml", &stage(NET, ""));
    let e = format!("{:#}", dmdpipe::pipeline::config::load(&p.path().join("p.toml")).unwrap_err());
    assert!(
        e.contains("augment_dim is 0") && e.contains("augment_dim = 9") && e.contains("p.toml"),
        "{e}"
    );
    let with9 = NET.replace("augment_dim = 0", "augment_dim = 9");
    p.write("p.toml", &stage(&with9, "cuda_graph = true\n"));
    let e = format!("{:#}", dmdpipe::pipeline::config::load(&p.path().join("p.toml")).unwrap_err());
    assert!(e.contains("CUDA graph"), "{e}");
    p.write("p.toml", &stage(&with9, "").replace("p = 0.12", "p = 2.0"));
    let e = format!("{:#}", dmdpipe::pipeline::config::load(&p.path().join("p.toml")).unwrap_err());
    assert!(e.contains("augment.p = 2"), "{e}");
    p.write("p.toml", &stage(&with9, ""));
    let r = p.run_with(
        "p.toml",
        RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    );
    assert_eq!(r.stage("teacher").unwrap().metrics["images_seen"], 16);
}
