//! EDM's augmentation pipeline (`train::augment`) against EDM's own `AugmentPipe` run in float64
//! (tests/fixtures/edm_augment, made by its `make.py` from EDM's repository with every random
//! number recorded), and the statistics of the draws the training loop makes.

use std::path::Path;

use dmdpipe::artifact::tensors::read_safetensors;
use dmdpipe::train::augment::{AugmentDraws, AugmentOptions, augment};
use tch::{Device, Kind, Tensor};

fn edm_case(case: &str, kind: Kind) -> (Tensor, AugmentDraws, Tensor, Tensor) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm_augment/edm_augment.safetensors");
    let (mut t, _) = read_safetensors(&path).unwrap();
    let mut take = |name: &str| t.remove(&format!("{case}.{name}")).unwrap().to_kind(kind);
    let images = take("images");
    let draws = AugmentDraws {
        bit_xflip: take("bit_xflip"),
        u_xflip: take("u_xflip"),
        bit_yflip: take("bit_yflip"),
        u_yflip: take("u_yflip"),
        z_scale: take("z_scale"),
        u_scale: take("u_scale"),
        u_rotate_angle: take("u_rotate_angle"),
        u_rotate: take("u_rotate"),
        z_aniso: take("z_aniso"),
        u_aniso_angle: take("u_aniso_angle"),
        u_aniso: take("u_aniso"),
        u_aniso_frame: take("u_aniso_frame"),
        z_translate: take("z_translate"),
        u_translate: take("u_translate"),
    };
    (images, draws, take("augmented"), take("labels"))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn geometric_transforms_match_edms_pipeline_in_f64_and_f32() {
    for (case, p) in [("half", 0.5), ("all", 1.0)] {
        let opts = AugmentOptions {
            p,
            ..AugmentOptions::default()
        };
        assert_eq!(opts.label_dim(), 9);
        let (images, draws, want, want_labels) = edm_case(case, Kind::Double);
        let (got, labels) = augment(&images, &opts, &draws);
        let (err, err_labels) = (max_abs(&got, &want), max_abs(&labels, &want_labels));
        println!("{case}: f64 max abs {err:.2e}, labels {err_labels:.2e}");
        assert!(err < 1e-12 && err_labels < 1e-6, "{case}: images {err}, labels {err_labels}");
        // The transform changed the images (the comparison is not of two identities).
        assert!(max_abs(&want, &images) > 0.1);
        let (images32, draws32, ..) = edm_case(case, Kind::Float);
        let (got32, labels32) = augment(&images32, &opts, &draws32);
        let err32 = max_abs(&got32, &want);
        println!("{case}: f32 against EDM's f64: max abs {err32:.2e}");
        assert!(err32 < 1e-5, "{case}: f32 {err32}");
        assert!(max_abs(&labels32, &want_labels) < 1e-5);
    }
}

#[test]
fn labels_and_probabilities_by_statistics() {
    tch::manual_seed(12);
    let n = 20_000;
    let opts = AugmentOptions::default();
    let draws = AugmentDraws::draw(n, Device::Cpu);
    let images = Tensor::zeros([n, 1, 8, 8], (Kind::Float, Device::Cpu));
    let (out, labels) = augment(&images, &opts, &draws);
    assert_eq!(labels.size(), [n, 9]);
    assert_eq!(out.size(), [n, 1, 8, 8]);
    let applied = |col: i64| f64::try_from(labels.select(1, col).ne(0.0).to_kind(Kind::Double).mean(Kind::Double)).unwrap();
    let near = |got: f64, want: f64| {
        let sd = (want * (1.0 - want) / n as f64).sqrt();
        assert!((got - want).abs() < 5.0 * sd, "fraction {got}, expected {want}");
    };
    // x-flip: EDM's multiplier 1e8 makes it always eligible; half the images are flipped.
    near(applied(0), 0.5);
    // y-flip: eligible with p = 0.12, then flipped half the time.
    near(applied(1), 0.06);
    for col in [2, 4, 5, 7] {
        near(applied(col), 0.12);
    }
    // The scale label is a standard normal where applied.
    let scale = labels.select(1, 2);
    let on = scale.masked_select(&scale.ne(0.0));
    let (mean, std) = (on.mean(Kind::Double).double_value(&[]), on.std(true).double_value(&[]));
    assert!(mean.abs() < 0.05 && (std - 1.0).abs() < 0.05, "scale label mean {mean}, std {std}");
    // Rotation labels: cos - 1 in [-2, 0] and (cos, sin) on the unit circle.
    let (c, s) = (labels.select(1, 3) + 1.0, labels.select(1, 4));
    assert!(max_abs(&(c.square() + s.square()), &Tensor::ones([n], (Kind::Float, Device::Cpu))) < 1e-5);
}

#[test]
fn the_same_seed_gives_the_same_augmentation() {
    let opts = AugmentOptions::default();
    let images = Tensor::rand([8, 3, 16, 16], (Kind::Float, Device::Cpu));
    let run = || {
        tch::manual_seed(5);
        augment(&images, &opts, &AugmentDraws::draw(8, Device::Cpu))
    };
    let ((a, la), (b, lb)) = (run(), run());
    assert_eq!(max_abs(&a, &b), 0.0);
    assert_eq!(max_abs(&la, &lb), 0.0);
}

#[test]
fn options_out_of_range_are_named() {
    let bad = AugmentOptions {
        p: 1.5,
        ..AugmentOptions::default()
    };
    assert!(bad.check().unwrap_err().contains("augment.p"));
    let bad = AugmentOptions {
        aniso_std: -1.0,
        ..AugmentOptions::default()
    };
    assert!(bad.check().unwrap_err().contains("aniso_std"));
    let fewer = AugmentOptions {
        aniso: 0.0,
        yflip: 0.0,
        ..AugmentOptions::default()
    };
    assert_eq!(fewer.label_dim(), 6);
}
