//! `bench inception`: the 60,000 CIFAR-10 images through the FID network.

use std::time::Instant;

use anyhow::Result;
use serde_json::{Map, Value};
use tch::Tensor;

use super::sync;
use crate::torch_shim;

/// Inception features for the 60,000 CIFAR-10 images in TF32 and strict fp32: throughput and
/// FID(train, test), the workload of `bench/pytorch_inception.py`.
pub fn bench_inception(device_name: &str, weights: &std::path::Path, cifar_dir: &std::path::Path, limit: Option<usize>) -> Result<Value> {
    use crate::eval::fid::{StatsAccumulator, frechet_distance};
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(device.is_cuda());
    let net = crate::eval::inception::Inception::load(weights, device)?;
    let none = |_: &str| None;
    let mut train = crate::data::cifar10::read_files(cifar_dir, &crate::data::cifar10::TRAIN_FILES, &none)?;
    let mut test = crate::data::cifar10::read_files(cifar_dir, &crate::data::cifar10::TEST_FILES, &none)?;
    if let Some(n) = limit {
        for ds in [&mut train, &mut test] {
            let n = n.min(ds.len());
            ds.images.truncate(n * 3072);
            ds.labels.truncate(n);
        }
    }
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
    for (prec, tf32) in [("tf32", true), ("fp32", false)] {
        torch_shim::set_tf32(device.is_cuda() && tf32);
        let feats = |ds: &crate::data::artifact::ImageDataset| -> Result<crate::eval::fid::FidStats> {
            let mut acc = StatsAccumulator::new();
            for start in (0..ds.len()).step_by(250) {
                let n = 250.min(ds.len() - start);
                let b = Tensor::from_slice(&ds.images[start * 3072..(start + n) * 3072]).reshape([n as i64, 32, 32, 3]);
                acc.add(&net.features(&b));
            }
            acc.finish()
        };
        let _ = feats(&crate::data::artifact::ImageDataset {
            images: train.images[..3072 * 500.min(train.len())].to_vec(),
            labels: train.labels[..500.min(train.len())].to_vec(),
            ..train.clone()
        })?;
        sync(device);
        let t = Instant::now();
        let s_train = feats(&train)?;
        let s_test = feats(&test)?;
        sync(device);
        let secs = t.elapsed().as_secs_f64();
        let n = (train.len() + test.len()) as f64;
        out.insert(format!("{prec}_seconds"), secs.into());
        out.insert(format!("{prec}_images_per_second"), (n / secs).into());
        out.insert(format!("{prec}_fid_train_test"), frechet_distance(&s_test, &s_train)?.into());
    }
    Ok(Value::Object(out))
}
