//! Teacher training in micro-batches against one batch. Alone in its test binary: the check is
//! exact only if no other test draws from libtorch's global generator at the same time.

mod common;

use common::fixtures::{tiny_images, tiny_unet};
use dmdpipe::nn::Denoiser;
use dmdpipe::train::device_data::DeviceImages;
use dmdpipe::train::teacher::{TrainOptions, train};
use tch::{Device, Tensor};

#[test]
fn micro_batches_compute_the_update_of_one_batch() {
    let config = tiny_unet();
    let ds = tiny_images();
    let data = DeviceImages::new(&ds, Device::Cpu);
    tch::manual_seed(5);
    let init = Denoiser::new(&config, Device::Cpu);
    let run = |micro_batch: Option<usize>| {
        let (net, ema) = (init.duplicate().unwrap(), init.duplicate().unwrap());
        let opts = TrainOptions {
            batch: 8,
            micro_batch,
            images: 8 * 3,
            lr: 1e-3,
            lr_warmup_images: 8,
            bf16: false,
            log_every: 1,
            ..Default::default()
        };
        let work = tempfile::tempdir().unwrap();
        let s = train(&net, &ema, &data, &opts, work.path(), |_, _, _, _| {}).unwrap();
        let flat = |n: &Denoiser| Tensor::cat(&n.vs.trainable_variables().iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        (s, flat(&net))
    };
    let (one, p1) = run(None);
    assert!(
        (&p1 - run(None).1).abs().max().double_value(&[]) == 0.0,
        "the same seed gives the same run"
    );
    let start = Tensor::cat(
        &init.vs.trainable_variables().iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(),
        0,
    );
    assert!((&p1 - start).abs().max().double_value(&[]) > 1e-4, "training moved the weights");
    // A cap of 4 gives two micro-batches of 4, of 3 four of 2 (8 does not split into 3s), of 1 eight.
    for cap in [4, 3, 1] {
        let (s, p) = run(Some(cap));
        let d = (&p - &p1).abs().max().double_value(&[]);
        assert!(d < 1e-5, "micro_batch {cap}: parameters differ by {d}");
        for ((_, a), (_, b)) in one.loss_curve.iter().zip(&s.loss_curve) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "micro_batch {cap}: loss {a} vs {b}");
        }
    }
}
