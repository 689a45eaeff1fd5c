//! Gradient accumulation in DMD against one large batch. Alone in its test binary: the check is
//! exact only if no other test draws from libtorch's global generator at the same time.

mod common;

#[test]
fn gradient_accumulation_computes_the_update_of_one_large_batch() {
    use common::fixtures::{pairs_and_real, tiny_unet};
    use dmdpipe::nn::Denoiser;
    use dmdpipe::train::dmd::{DmdData, DmdNets, DmdOptions, NoHooks, train_dmd};
    use tch::{Device, Tensor};
    let config = tiny_unet();
    tch::manual_seed(3);
    let teacher = Denoiser::new(&config, Device::Cpu);
    let (pairs, real) = pairs_and_real();
    // Every loss term on: distribution matching, regression, two fake updates, the GAN head.
    let run = |accum: usize, micro_batch: Option<usize>| {
        let (g, f) = (teacher.duplicate().unwrap(), teacher.duplicate().unwrap());
        let opts = DmdOptions {
            batch: 8,
            iterations: 3,
            log_every: 1,
            bf16: false,
            lr: 1e-3,
            warmup_steps: 1,
            regression_weight: 0.5,
            fake_updates_per_g: 2,
            gan_generator_weight: 3e-3,
            grad_accumulation: accum,
            micro_batch,
            ..Default::default()
        };
        let work = tempfile::tempdir().unwrap();
        let s = train_dmd(
            DmdNets {
                real: &teacher,
                generator: &g,
                fake: &f,
                ema: None,
            },
            DmdData {
                pairs: Some(&pairs),
                lpips: None,
                real_images: Some(&real),
            },
            &opts,
            work.path(),
            &mut NoHooks,
        )
        .unwrap();
        let params = |n: &Denoiser| Tensor::cat(&n.vs.trainable_variables().iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        (s, params(&g), params(&f))
    };
    let (one, g1, f1) = run(1, None);
    let moved = (&g1 - run(1, None).1).abs().max().double_value(&[]);
    assert_eq!(moved, 0.0, "the same seed gives the same run");
    // Two and four micro-batches by count, and two by a cap of 3 (8 splits evenly into 4 + 4).
    for (accum, micro_batch) in [(2, None), (4, None), (1, Some(3))] {
        let (s, g, f) = run(accum, micro_batch);
        for (a, b) in one.log.iter().zip(&s.log) {
            for (i, (x, y)) in [
                (a.loss_dm, b.loss_dm),
                (a.loss_reg, b.loss_reg),
                (a.loss_fake, b.loss_fake),
                (a.grad_norm_g, b.grad_norm_g),
                (a.loss_gan_d, b.loss_gan_d),
            ]
            .into_iter()
            .enumerate()
            {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                    "accumulation {accum}: {x} vs {y} (term {i}, iteration {})",
                    a.iteration
                );
            }
        }
        let dg = (&g - &g1).abs().max().double_value(&[]);
        let df = (&f - &f1).abs().max().double_value(&[]);
        // Within a tenth of one Adam step (lr 1e-3): summing micro-batches reorders float sums,
        // and Adam's normalisation turns that into up to 1.3e-5 on parameters whose gradients are
        // near zero on an AVX-512 CPU (under 1e-5 on the earlier machines). A wrong accumulation
        // moves them by whole steps.
        assert!(dg < 1e-4 && df < 1e-4, "accumulation {accum}: parameters differ by {dg} / {df}");
    }
    // The training moved the generator (the comparison above is not between untouched copies).
    let start = Tensor::cat(
        &teacher
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.flatten(0, -1))
            .collect::<Vec<_>>(),
        0,
    );
    assert!((&g1 - start).abs().max().double_value(&[]) > 1e-4);
    // A batch the micro-batches do not divide is refused with the numbers.
    let (g, f) = (teacher.duplicate().unwrap(), teacher.duplicate().unwrap());
    let bad = DmdOptions {
        batch: 6,
        grad_accumulation: 4,
        bf16: false,
        ..Default::default()
    };
    let e = train_dmd(
        DmdNets {
            real: &teacher,
            generator: &g,
            fake: &f,
            ema: None,
        },
        DmdData {
            pairs: None,
            lpips: None,
            real_images: None,
        },
        &bad,
        tempfile::tempdir().unwrap().path(),
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(e.to_string().contains("grad_accumulation = 4"), "{e}");
}
