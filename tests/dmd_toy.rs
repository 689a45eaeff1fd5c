//! DMD on a 2-D mixture of Gaussians whose denoiser is known in closed form: the exact test of
//! the method. The real score is the closed-form denoiser; the generator and the fake score are
//! small MLPs initialised from an MLP teacher (as the paper initialises both from the teacher).

use dmdpipe::data::artifact::PointsDataset;
use dmdpipe::nn::gmm::GmmDenoiser;
use dmdpipe::nn::{Denoiser, NetworkConfig};
use dmdpipe::stages::dmd::energy_distance;
use dmdpipe::stages::{Gmm2dComponent, Gmm2dParams};
use dmdpipe::train::device_data::DevicePoints;
use dmdpipe::train::dmd::{DmdOptions, dmd_train};
use dmdpipe::train::teacher::{TrainOptions, train};
use tch::{Device, Kind, Tensor};

fn components() -> Vec<Gmm2dComponent> {
    vec![
        Gmm2dComponent {
            weight: 1.0,
            mean: [1.5, 0.0],
            std: 0.1,
        },
        Gmm2dComponent {
            weight: 1.0,
            mean: [-0.75, 1.3],
            std: 0.1,
        },
        Gmm2dComponent {
            weight: 2.0,
            mean: [-0.75, -1.3],
            std: 0.1,
        },
    ]
}

fn one_step(g: &Denoiser, n: i64, seed: i64) -> Vec<[f32; 2]> {
    tch::manual_seed(seed);
    let z = Tensor::randn([n, 2], (Kind::Float, Device::Cpu));
    let x = tch::no_grad(|| g.denoise(&(z * 80.0), &Tensor::from(80.0f32), None, false));
    Vec::<Vec<f32>>::try_from(x).unwrap().into_iter().map(|v| [v[0], v[1]]).collect()
}

/// Fraction of samples nearest to each mode, and the fraction far (> 0.5) from every mode.
fn mode_fractions(s: &[[f32; 2]]) -> (Vec<f64>, f64) {
    let c = components();
    let mut counts = vec![0usize; c.len()];
    let mut far = 0;
    for p in s {
        let d: Vec<f64> = c
            .iter()
            .map(|m| ((p[0] as f64 - m.mean[0]).powi(2) + (p[1] as f64 - m.mean[1]).powi(2)).sqrt())
            .collect();
        let (k, dk) = d.iter().enumerate().min_by(|a, b| a.1.partial_cmp(b.1).unwrap()).unwrap();
        counts[k] += 1;
        if *dk > 0.5 {
            far += 1;
        }
    }
    (
        counts.iter().map(|&k| k as f64 / s.len() as f64).collect(),
        far as f64 / s.len() as f64,
    )
}

#[test]
fn dmd_moves_the_generator_onto_every_mode_of_the_mixture() {
    let data = Gmm2dParams {
        seed: 0,
        count: 20_000,
        components: components(),
    }
    .sample();
    let truth: Vec<[f32; 2]> = Gmm2dParams {
        seed: 99,
        count: 1500,
        components: components(),
    }
    .sample()
    .points;
    let config: NetworkConfig = serde_json::from_value(serde_json::json!({"arch": "mlp", "hidden": 128, "layers": 3})).unwrap();
    tch::manual_seed(0);
    let teacher = Denoiser::new(&config, Device::Cpu);
    let ema = teacher.duplicate().unwrap();
    let work = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        batch: 256,
        images: 256 * 800,
        lr: 2e-3,
        lr_warmup_images: 256 * 50,
        ema_halflife_images: 20_000.0,
        ema_rampup: None,
        log_every: 100,
        checkpoint_every: 100_000,
        ..Default::default()
    };
    train(
        &teacher,
        &ema,
        &DevicePoints::new(
            &PointsDataset {
                points: data.points.clone(),
                labels: data.labels.clone(),
                classes: vec![],
            },
            Device::Cpu,
        ),
        &opts,
        work.path(),
        |_, _, _, _| {},
    )
    .unwrap();

    let generator = teacher.duplicate().unwrap();
    let fake = teacher.duplicate().unwrap();
    let before = one_step(&generator, 1500, 1);
    let ed_before = energy_distance(&before, &truth);
    let real = GmmDenoiser::new(&components(), Device::Cpu);
    let dmd = DmdOptions {
        batch: 256,
        iterations: 1500,
        lr: 1e-3,
        warmup_steps: 50,
        regression_weight: 0.0,
        fake_updates_per_g: 2,
        bf16: false,
        log_every: 50,
        checkpoint_every: 100_000,
        ..Default::default()
    };
    let summary = dmd_train(&real, &generator, &fake, None, None, &dmd, work.path(), |_| {}).unwrap();
    assert_eq!(summary.iterations, 1500);
    let after = one_step(&generator, 1500, 1);
    let ed_after = energy_distance(&after, &truth);
    let (fractions, far) = mode_fractions(&after);
    eprintln!("energy distance {ed_before:.4} -> {ed_after:.4}; mode fractions {fractions:?}; far {far:.3}");
    assert!(
        ed_before > 0.2,
        "the untrained one-step generator is far from the mixture: {ed_before}"
    );
    // A tenfold drop: where it ends within that depends on the CPU's kernels (0.054 from 0.87 on
    // an AVX-512 machine, under 0.044 on the earlier ones); a collapsed or unmoved generator
    // stays far above, and the fractions below check that every mode is covered.
    assert!(ed_after < 0.1 * ed_before, "{ed_before} -> {ed_after}");
    for (got, want) in fractions.iter().zip([0.25, 0.25, 0.5]) {
        assert!((got - want).abs() < 0.05, "mode fractions {fractions:?}");
    }
    // A continuous one-step map from a Gaussian must leave some mass on the bridges between
    // modes; most of it must sit on the modes.
    assert!(far < 0.2, "{far} of the samples lie between modes");
}
