//! LPIPS with VGG16 (Zhang et al. 2018), for DMD's regression loss: images in [-1, 1] are
//! upsampled to 224x224 (bilinear), shifted and scaled by LPIPS's constants, passed through
//! VGG16's conv layers; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the features are
//! unit-normalised over channels, their squared difference is weighted per channel by the
//! (non-negative) linear heads, averaged over space and summed over the five layers.
//!
//! Weights come from the files users have: torchvision's VGG16 checkpoint
//! (`vgg16-397923af.pth`: `features.{0,2,5,...,28}.{weight,bias}`) and the `lpips` package's
//! v0.1 linear heads (`weights/v0.1/vgg.pth`: `lin{0..4}.model.1.weight`, [1, C, 1, 1]), in
//! either `torch.save` format; or one safetensors file holding `vgg.features.*` and
//! `lin{0..4}.weight`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

const SHIFT: [f64; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f64; 3] = [0.458, 0.448, 0.450];
/// VGG16 conv layers: (torchvision index, in channels, out channels).
pub const CONVS: [(usize, i64, i64); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];
/// Index into CONVS after which a feature tap is taken.
const TAPS: [usize; 5] = [1, 3, 6, 9, 12];
pub const CHANNELS: [i64; 5] = [64, 128, 256, 512, 512];

pub struct Lpips {
    convs: Vec<(Tensor, Tensor)>,
    lins: Vec<Tensor>,
    /// Resize inputs to this square size first (224 in the paper; None keeps the input size).
    pub resize: Option<i64>,
}

impl Lpips {
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let (t, _) = crate::artifact::tensors::read_safetensors(path).with_context(|| format!("LPIPS weights {}", path.display()))?;
        let get = |k: String| {
            t.get(&k)
                .map(|x| x.to_kind(Kind::Float).to_device(device).set_requires_grad(false))
                .with_context(|| format!("{}: missing `{k}`", path.display()))
        };
        let convs = CONVS
            .iter()
            .map(|(i, _, _)| Ok((get(format!("vgg.features.{i}.weight"))?, get(format!("vgg.features.{i}.bias"))?)))
            .collect::<Result<_>>()?;
        let lins = (0..5).map(|k| get(format!("lin{k}.weight"))).collect::<Result<_>>()?;
        Ok(Lpips {
            convs,
            lins,
            resize: Some(224),
        })
    }

    /// From torchvision's VGG16 checkpoint and the `lpips` package's linear heads (either
    /// `torch.save` format).
    pub fn from_torch(backbone: &Path, heads: &Path, device: Device) -> Result<Self> {
        use crate::artifact::torch_pickle::read_torch_checkpoint;
        let vgg = read_torch_checkpoint(backbone).with_context(|| format!("LPIPS backbone {}", backbone.display()))?;
        let lin = read_torch_checkpoint(heads).with_context(|| format!("LPIPS heads {}", heads.display()))?;
        let take = |t: &std::collections::HashMap<String, Tensor>, names: &[String], file: &Path| {
            names
                .iter()
                .find_map(|n| t.get(n))
                .map(|x| x.to_kind(Kind::Float).to_device(device).set_requires_grad(false))
                .with_context(|| format!("{}: no `{}`", file.display(), names[0]))
        };
        let conv = |i: usize, what: &str| {
            take(
                &vgg,
                &[format!("features.{i}.{what}"), format!("vgg.features.{i}.{what}")],
                backbone,
            )
        };
        let convs = CONVS
            .iter()
            .map(|(i, _, _)| Ok((conv(*i, "weight")?, conv(*i, "bias")?)))
            .collect::<Result<Vec<_>>>()?;
        let lins = (0..5)
            .map(|k| take(&lin, &[format!("lin{k}.model.1.weight"), format!("lin{k}.weight")], heads))
            .collect::<Result<Vec<_>>>()?;
        for (k, (l, tap)) in lins.iter().zip(TAPS).enumerate() {
            let channels = convs[tap].0.size()[0];
            if l.size() != [1, channels, 1, 1] {
                bail!(
                    "{}: lin{k} has shape {:?}, the backbone's layer has {channels} channels",
                    heads.display(),
                    l.size()
                );
            }
        }
        Ok(Lpips {
            convs,
            lins,
            resize: Some(224),
        })
    }

    /// Random weights of the right shapes (for tests).
    pub fn random(device: Device) -> Self {
        let opts = (Kind::Float, device);
        let convs = CONVS
            .iter()
            .map(|(_, i, o)| {
                (
                    Tensor::randn([*o, *i, 3, 3], opts) * (2.0 / (9 * i) as f64).sqrt(),
                    Tensor::randn([*o], opts) * 0.01,
                )
            })
            .collect();
        let lins = CHANNELS.iter().map(|&c| Tensor::rand([1, c, 1, 1], opts) / c as f64).collect();
        Lpips {
            convs,
            lins,
            resize: Some(224),
        }
    }

    /// The five tapped feature maps of images in [-1, 1].
    pub fn features(&self, x: &Tensor) -> Vec<Tensor> {
        let dev = x.device();
        let shift = Tensor::from_slice(&SHIFT).to_kind(Kind::Float).to_device(dev).reshape([1, 3, 1, 1]);
        let scale = Tensor::from_slice(&SCALE).to_kind(Kind::Float).to_device(dev).reshape([1, 3, 1, 1]);
        let mut h = x.to_kind(Kind::Float);
        if let Some(s) = self.resize {
            h = h.upsample_bilinear2d([s, s], false, None, None);
        }
        h = (h - shift) / scale;
        let mut taps = Vec::new();
        for (i, (w, b)) in self.convs.iter().enumerate() {
            if i > 0 && TAPS.contains(&(i - 1)) {
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            h = h.conv2d(w, Some(b), [1, 1], [1, 1], [1, 1], 1).relu();
            if TAPS.contains(&i) {
                taps.push(h.shallow_clone());
            }
        }
        taps
    }

    /// Per-image LPIPS distance [N].
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let (fa, fb) = (self.features(a), self.features(b));
        let mut total: Option<Tensor> = None;
        for ((x, y), lin) in fa.iter().zip(&fb).zip(&self.lins) {
            let nx = x / (x.square().sum_dim_intlist([1i64].as_slice(), true, Kind::Float).sqrt() + 1e-10);
            let ny = y / (y.square().sum_dim_intlist([1i64].as_slice(), true, Kind::Float).sqrt() + 1e-10);
            let d = ((nx - ny).square() * lin)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                .mean_dim([1i64, 2].as_slice(), false, Kind::Float);
            total = Some(match total {
                None => d,
                Some(t) => t + d,
            });
        }
        total.expect("five layers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_elementwise_reference_and_is_a_distance() {
        tch::manual_seed(0);
        let mut net = Lpips::random(Device::Cpu);
        net.resize = Some(32);
        let a = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let b = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let d = Vec::<f64>::try_from(net.distance(&a, &b).to_kind(Kind::Double)).unwrap();
        // Reference: loops in f64 over the tapped features.
        let (fa, fb) = (net.features(&a), net.features(&b));
        for n in 0..2usize {
            let mut total = 0.0f64;
            for (k, (x, y)) in fa.iter().zip(&fb).enumerate() {
                let x = Vec::<f64>::try_from(x.get(n as i64).to_kind(Kind::Double).flatten(0, -1)).unwrap();
                let y = Vec::<f64>::try_from(y.get(n as i64).to_kind(Kind::Double).flatten(0, -1)).unwrap();
                let w = Vec::<f64>::try_from(net.lins[k].to_kind(Kind::Double).flatten(0, -1)).unwrap();
                let c = CHANNELS[k] as usize;
                let hw = x.len() / c;
                let mut layer = 0.0;
                for p in 0..hw {
                    let nx: f64 = (0..c).map(|ch| x[ch * hw + p].powi(2)).sum::<f64>().sqrt() + 1e-10;
                    let ny: f64 = (0..c).map(|ch| y[ch * hw + p].powi(2)).sum::<f64>().sqrt() + 1e-10;
                    layer += (0..c)
                        .map(|ch| w[ch] * (x[ch * hw + p] / nx - y[ch * hw + p] / ny).powi(2))
                        .sum::<f64>();
                }
                total += layer / hw as f64;
            }
            assert!((d[n] - total).abs() < 1e-5 * total.max(1e-3), "{} vs {total}", d[n]);
        }
        let same = net.distance(&a, &a).abs().max().double_value(&[]);
        assert!(same < 1e-6);
        let ba = Vec::<f64>::try_from(net.distance(&b, &a).to_kind(Kind::Double)).unwrap();
        assert!((ba[0] - d[0]).abs() < 1e-6 && d.iter().all(|v| *v > 0.0));
    }
}
