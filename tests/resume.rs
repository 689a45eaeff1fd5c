//! A stage stopped after a checkpoint and resumed ends bit-identical to an uninterrupted run
//! (CPU): the checkpoint holds every state the remaining steps read, and each step's random
//! numbers come from (seed, step). Alone in its test binary: libtorch's generator is global.

mod common;

use std::sync::Mutex;

use common::fixtures::{pairs_and_real, tiny_images, tiny_unet};
use dmdpipe::nn::Denoiser;
use dmdpipe::train::device_data::DeviceImages;
use dmdpipe::train::dmd::{DmdData, DmdNets, DmdOptions, NoHooks, train_dmd};
use dmdpipe::train::teacher::{TrainOptions, train};
use tch::{Device, Tensor};

/// The two tests share libtorch's global generator.
static RNG: Mutex<()> = Mutex::new(());

/// Every variable (parameters and buffers), in name order.
fn flat(n: &Denoiser) -> Tensor {
    let vars: std::collections::BTreeMap<String, Tensor> = n.vs.variables().into_iter().collect();
    Tensor::cat(&vars.values().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)
}

fn assert_identical(a: &Tensor, b: &Tensor, what: &str) {
    let d = (a - b).abs().max().double_value(&[]);
    assert_eq!(d, 0.0, "{what}: resumed differs from uninterrupted by {d}");
}

#[test]
fn dmd_resumed_after_a_checkpoint_is_bit_identical() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let teacher = Denoiser::new(&tiny_unet(), Device::Cpu);
    let (pairs, real) = pairs_and_real();
    // Every state on: regression, two fake updates, the GAN head, an EMA.
    let opts = |iterations: u64| DmdOptions {
        batch: 4,
        iterations,
        log_every: 1,
        checkpoint_every: 2,
        bf16: false,
        lr: 1e-3,
        warmup_steps: 3,
        regression_weight: 0.5,
        fake_updates_per_g: 2,
        gan_generator_weight: 3e-3,
        ema_halflife_images: Some(8.0),
        ..Default::default()
    };
    // Runs `segments` (each a run to that iteration) in one work dir, as a stage killed after
    // each but the last and started again would.
    let run = |segments: &[u64]| {
        let (g, f, e) = (
            teacher.duplicate().unwrap(),
            teacher.duplicate().unwrap(),
            teacher.duplicate().unwrap(),
        );
        let work = tempfile::tempdir().unwrap();
        let mut last = None;
        for &n in segments {
            last = Some(
                train_dmd(
                    DmdNets {
                        real: &teacher,
                        generator: &g,
                        fake: &f,
                        ema: Some(&e),
                    },
                    DmdData {
                        pairs: Some(&pairs),
                        lpips: None,
                        real_images: Some(&real),
                    },
                    &opts(n),
                    work.path(),
                    &mut NoHooks,
                )
                .unwrap(),
            );
        }
        (last.unwrap(), flat(&g), flat(&f), flat(&e))
    };
    let (whole, g, f, e) = run(&[6]);
    assert!(whole.resumed_from == 0 && whole.log.len() == 6);
    for kill in [2, 4] {
        let (resumed, g2, f2, e2) = run(&[kill, 6]);
        assert_eq!(resumed.resumed_from, kill);
        assert_identical(&g, &g2, &format!("generator, stopped at {kill}"));
        assert_identical(&f, &f2, &format!("fake score, stopped at {kill}"));
        assert_identical(&e, &e2, &format!("EMA, stopped at {kill}"));
        assert_eq!(resumed.log.len(), 6, "the log before the stop is restored");
        for (a, b) in whole.log.iter().zip(&resumed.log) {
            assert_eq!(
                (a.iteration, a.loss_dm, a.loss_reg, a.loss_fake, a.loss_gan_d),
                (b.iteration, b.loss_dm, b.loss_reg, b.loss_fake, b.loss_gan_d),
                "stopped at {kill}"
            );
        }
    }
}

#[test]
fn teacher_resumed_after_a_checkpoint_is_bit_identical() {
    let _g = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let ds = tiny_images();
    let data = DeviceImages::new(&ds, Device::Cpu);
    tch::manual_seed(5);
    let init = Denoiser::new(&tiny_unet(), Device::Cpu);
    let opts = |steps: u64| TrainOptions {
        batch: 4,
        images: 4 * steps,
        lr: 1e-3,
        lr_warmup_images: 8,
        ema_halflife_images: 8.0,
        bf16: false,
        log_every: 1,
        checkpoint_every: 2,
        ..Default::default()
    };
    let run = |segments: &[u64]| {
        let (net, ema) = (init.duplicate().unwrap(), init.duplicate().unwrap());
        let work = tempfile::tempdir().unwrap();
        let mut last = None;
        for &n in segments {
            last = Some(train(&net, &ema, &data, &opts(n), work.path(), |_, _, _, _| {}).unwrap());
        }
        (last.unwrap(), flat(&net), flat(&ema))
    };
    let (whole, n, e) = run(&[6]);
    for kill in [2, 4] {
        let (resumed, n2, e2) = run(&[kill, 6]);
        assert_eq!(resumed.resumed_from_step, kill);
        assert_identical(&n, &n2, &format!("network, stopped at {kill}"));
        assert_identical(&e, &e2, &format!("EMA, stopped at {kill}"));
        assert_eq!(whole.loss_curve, resumed.loss_curve, "stopped at {kill}");
    }
}
