//! The DMD stages end to end on CPU: the toy pipeline, and a tiny DDPM++ teacher distilled with
//! ODE pairs (resume after a crash, NaN stop).

mod common;

use common::*;
use dmdpipe::pipeline::runner::{self, RunOptions};

#[test]
fn toy2d_pipeline_distils_onto_the_mixture() {
    let p = Project::new();
    let toy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/toy2d.toml"))
        .unwrap()
        .replace("root = \"..\"", "root = \".\"");
    p.write("toy2d.toml", &toy);
    let r = p.run("toy2d.toml");
    let m = &r.stage("dmd").unwrap().metrics;
    let student = m["energy_distance_student"].as_f64().unwrap();
    let teacher = m["energy_distance_teacher"].as_f64().unwrap();
    assert!(
        student < 0.1,
        "student energy distance {student} (the one-step teacher starts near 0.8)"
    );
    assert!(teacher < 0.02, "teacher energy distance {teacher}");
    let dir = r.stage("dmd").unwrap().output_dir.clone().unwrap();
    for f in ["scatter.png", "losses.png", "measurements/dmd_log.csv", "denoiser.safetensors"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    assert_eq!(r.stage("pairs").unwrap().metrics["count"], 4000);
    assert!(p.run("toy2d.toml").all_fresh());
    // The GPU count is not in any key: other `devices` (pipeline or command line) reuse it all
    // (on a CPU-only machine the stages also train in one process).
    p.write("toy2d.toml", &toy.replace("[pipeline]\n", "[pipeline]\ndevices = [0, 1]\n"));
    assert!(p.load("toy2d.toml").settings.devices.is_some());
    assert!(p.run("toy2d.toml").all_fresh());
    let opts = RunOptions {
        devices: Some(dmdpipe::pipeline::config::Devices::parse("all").unwrap()),
        ..Default::default()
    };
    assert!(p.run_with("toy2d.toml", opts).all_fresh());
}

#[test]
fn devices_parse_from_the_command_line_form() {
    use dmdpipe::pipeline::config::Devices;
    assert_eq!(Devices::parse("0,2").unwrap(), Devices::List(vec![0, 2]));
    assert_eq!(Devices::parse("all").unwrap().resolve(4), vec![0, 1, 2, 3]);
    assert_eq!(Devices::List(vec![3]).resolve(8), vec![3]);
    assert!(Devices::parse("0,x").unwrap_err().contains("`x`"));
}

const NET: &str = "{ arch = \"ddpmpp\", img_resolution = 8, label_dim = 2, augment_dim = 0, model_channels = 16, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [], dropout = 0.1 }";

fn image_project(dmd_train: &str) -> Project {
    let p = Project::new();
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        for i in 0..4u32 {
            image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30 + i) as u8, (y * 30) as u8, (c * 200) as u8]))
                .save(p.path().join("imgs").join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    p.write(
        "p.toml",
        &format!(
            "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\n\n[stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\nnetwork = {NET}\ngrid = {{ columns = 2, sampler = {{ steps = 2 }} }}\ntrain = {{ batch = 4, images = 16, log_every = 2 }}\n\n[stages.pairs]\nkind = \"ode-pairs\"\nteacher = \"teacher\"\nsampler = {{ steps = 3 }}\ncount = 10\nshard_size = 4\nbatch = 3\n\n[stages.dmd]\nkind = \"dmd\"\nteacher = \"teacher\"\npairs = \"pairs\"\ndataset = \"data\"\ngrid_columns = 3\ngrid_every = 3\n[stages.dmd.train]\n{dmd_train}\n"
        ),
    );
    p
}

#[test]
fn image_dmd_with_pairs_writes_a_generator_grid_and_log() {
    let p = image_project("batch = 4\niterations = 6\nlog_every = 2\nbf16 = false\nema_halflife_images = 100\nfake_updates_per_g = 2");
    let r = runner::run(
        &p.load("p.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let pairs = &r.stage("pairs").unwrap().metrics;
    assert_eq!((pairs["count"].as_i64(), pairs["shards"].as_i64()), (Some(10), Some(3)));
    let d = r.stage("dmd").unwrap();
    assert_eq!(d.metrics["iterations"], 6);
    assert!(d.metrics["final_loss_reg"].as_f64().unwrap() > 0.0);
    let dir = d.output_dir.clone().unwrap();
    let grid = image::open(dir.join("grid.png")).unwrap();
    assert_eq!(grid.height(), 2 * 10 + 2, "one labelled row per class");
    assert!(dir.join("generator_ema.safetensors").exists());
    for it in [3, 6] {
        assert!(
            dir.join(format!("progress/grid-iter{it:07}.png")).exists(),
            "grid during DMD at iteration {it}"
        );
    }
    let csv = std::fs::read_to_string(dir.join("measurements/dmd_log.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3, "a row per log step");
    assert!(csv.starts_with("iteration,loss_dm,loss_reg,loss_fake,grad_norm_g,grad_norm_fake,loss_gan_g,loss_gan_d,lr"));
    // The generator is a one-step denoiser artifact: load it and sample.
    let g = dmdpipe::nn::load_denoiser_dir(&dir, tch::Device::Cpu).unwrap();
    assert_eq!(g.config.label_dim(), 2);
}

#[test]
fn dmd_resumes_from_its_checkpoint() {
    use dmdpipe::nn::gmm::GmmDenoiser;
    use dmdpipe::nn::{Denoiser, NetworkConfig};
    use dmdpipe::stages::Gmm2dComponent;
    use dmdpipe::train::dmd::{DmdOptions, dmd_train};
    let config: NetworkConfig = serde_json::from_value(serde_json::json!({"arch": "mlp", "hidden": 32, "layers": 2})).unwrap();
    let real = GmmDenoiser::new(
        &[Gmm2dComponent {
            weight: 1.0,
            mean: [1.0, 0.0],
            std: 0.2,
        }],
        tch::Device::Cpu,
    );
    let teacher = Denoiser::new(&config, tch::Device::Cpu);
    let (g, f) = (teacher.duplicate().unwrap(), teacher.duplicate().unwrap());
    let work = tempfile::tempdir().unwrap();
    let opts = DmdOptions {
        batch: 16,
        iterations: 4,
        log_every: 2,
        checkpoint_every: 2,
        bf16: false,
        regression_weight: 0.0,
        ..Default::default()
    };
    let first = dmd_train(&real, &g, &f, None, None, &opts, work.path(), |_| {}).unwrap();
    assert_eq!((first.iterations, first.resumed_from), (4, 0));
    // A new process: fresh networks, same work dir -> continues at iteration 4 with the saved weights.
    let (g2, f2) = (teacher.duplicate().unwrap(), teacher.duplicate().unwrap());
    let more = DmdOptions { iterations: 6, ..opts };
    let second = dmd_train(&real, &g2, &f2, None, None, &more, work.path(), |_| {}).unwrap();
    assert_eq!((second.iterations, second.resumed_from), (6, 4));
    // The log before the stop comes back with the checkpoint (the stage's CSV is whole).
    assert_eq!(second.log.len(), 3, "two restored rows and the new one");
    assert_eq!(second.log[1].loss_dm, first.log[1].loss_dm);
}

#[test]
fn dmd_with_an_lpips_regression_loss_from_a_weights_file() {
    // Random VGG/LPIPS weights in the documented layout stand in for the real ones.
    let mut t = Vec::new();
    for (i, cin, cout) in dmdpipe::nn::lpips::CONVS {
        t.push((
            format!("vgg.features.{i}.weight"),
            tch::Tensor::randn([cout, cin, 3, 3], (tch::Kind::Float, tch::Device::Cpu)) * 0.05,
        ));
        t.push((
            format!("vgg.features.{i}.bias"),
            tch::Tensor::zeros([cout], (tch::Kind::Float, tch::Device::Cpu)),
        ));
    }
    for (k, c) in dmdpipe::nn::lpips::CHANNELS.iter().enumerate() {
        t.push((
            format!("lin{k}.weight"),
            tch::Tensor::rand([1, *c, 1, 1], (tch::Kind::Float, tch::Device::Cpu)),
        ));
    }
    let p = image_project("batch = 2\niterations = 1\nlog_every = 1\nbf16 = false\nregression_loss = \"lpips\"");
    dmdpipe::artifact::checkpoint::save(&p.path().join("lpips.safetensors"), &t, Default::default()).unwrap();
    let text = std::fs::read_to_string(p.path().join("p.toml"))
        .unwrap()
        .replace("grid_every = 3\n", "grid_every = 3\nlpips_weights = \"lpips.safetensors\"\n");
    p.write("p.toml", &text);
    let r = runner::run(
        &p.load("p.toml"),
        &RunOptions {
            device: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let reg = r.stage("dmd").unwrap().metrics["final_loss_reg"].as_f64().unwrap();
    assert!(reg > 0.0 && reg.is_finite(), "LPIPS regression loss {reg}");
    // Without the weights file the config is refused at load time, naming the field.
    p.write("q.toml", &text.replace("lpips_weights = \"lpips.safetensors\"\n", ""));
    let e = dmdpipe::pipeline::config::load(&p.path().join("q.toml")).unwrap_err();
    assert!(e.message.contains("lpips_weights") && e.key == "stages.dmd.train", "{e}");
}
