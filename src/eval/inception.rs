//! The TF Inception-v3 of 2015-12-05 that FID is defined with: 2048-d pool features of uint8
//! images resized to 299x299 (bilinear, align_corners = false, no antialiasing), mapped to
//! (x - 128) / 128. Each conv is conv (no bias) -> batch norm (eps 1e-3, no scale) -> ReLU; the
//! batch norm is folded into the convolution when the weights are loaded.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [self.stride; 2], self.padding, [1, 1], 1)
            .relu()
    }
}

/// Memory layout of the activations (the values are the same in every layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Whatever the input's strides give (uint8 NHWC images permuted: channels-last in memory).
    AsInput,
    Nchw,
    Nhwc,
}

impl Layout {
    /// The faster layout for a precision, as `bench gpu` measured it on an H200 (session 4):
    /// strict fp32 convolutions run faster on NCHW (2,390 vs 2,009 img/s), TF32 and bf16 on
    /// channels-last (5,946 vs 5,308; 7,295 vs 6,594).
    pub fn fastest_for(strict_fp32: bool) -> Layout {
        if strict_fp32 { Layout::Nchw } else { Layout::Nhwc }
    }
}

pub struct Inception {
    convs: HashMap<String, ConvBn>,
    pub device: Device,
    pub layout: Layout,
}

fn avg_pool(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

fn max_pool(x: &Tensor, stride: i64, pad: i64) -> Tensor {
    x.max_pool2d([3, 3], [stride, stride], [pad, pad], [1, 1], false)
}

impl Inception {
    /// Loads `net.layers.<module>.{weight,beta,mean,var}` tensors (the layout of
    /// inception-2015-12-05.safetensors) onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let (t, _) = crate::artifact::tensors::read_safetensors(path)
            .with_context(|| format!("loading the Inception weights {}", path.display()))?;
        Self::from_tensors(&t, device).with_context(|| format!("{}", path.display()))
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>, device: Device) -> Result<Self> {
        let mut convs = HashMap::new();
        for (name, stride, pad) in layer_table() {
            let get = |what: &str| -> Result<Tensor> {
                let key = format!("net.layers.{name}.{what}");
                t.get(&key)
                    .map(|x| x.to_kind(Kind::Double))
                    .with_context(|| format!("missing tensor `{key}`"))
            };
            let (w, beta, mean, var) = (get("weight")?, get("beta")?, get("mean")?, get("var")?);
            let out = w.size().first().copied().unwrap_or(0);
            if w.dim() != 4 || [&beta, &mean, &var].iter().any(|x| x.size() != [out]) {
                bail!(
                    "layer `{name}`: weight {:?} with beta/mean/var {:?}/{:?}/{:?} (expected [out, in, kh, kw] and [out])",
                    w.size(),
                    beta.size(),
                    mean.size(),
                    var.size()
                );
            }
            let scale = (var + 1e-3).rsqrt();
            let weight = (&w * scale.reshape([-1, 1, 1, 1])).to_kind(Kind::Float).to_device(device);
            let bias = (beta - mean * &scale).to_kind(Kind::Float).to_device(device);
            convs.insert(
                name.clone(),
                ConvBn {
                    weight,
                    bias,
                    stride,
                    padding: pad,
                },
            );
        }
        if convs.len() != 94 {
            bail!("expected 94 conv layers, built {}", convs.len());
        }
        Ok(Inception {
            convs,
            device,
            layout: Layout::AsInput,
        })
    }

    fn c(&self, name: &str, x: &Tensor) -> Tensor {
        self.convs[name].forward(x)
    }

    fn chain(&self, prefix: &str, names: &[&str], x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for n in names {
            x = self.c(&format!("{prefix}.{n}"), &x);
        }
        x
    }

    /// uint8 NHWC images (any size) -> the resized float image in [0, 255] (NCHW, 299x299).
    pub fn resize(&self, images_nhwc_u8: &Tensor) -> Tensor {
        let x = images_nhwc_u8.to_device(self.device).permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let x = if x.size()[1] == 1 { x.repeat([1, 3, 1, 1]) } else { x };
        x.upsample_bilinear2d([299, 299], false, None, None)
    }

    /// 2048-d pool features [N, 2048] of uint8 NHWC images.
    pub fn features(&self, images_nhwc_u8: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let x = ((self.resize(images_nhwc_u8) - 128.0) / 128.0).clamp(-1.0, 0.9921875);
            let x = match self.layout {
                Layout::AsInput => x,
                Layout::Nchw => x.contiguous(),
                Layout::Nhwc => crate::torch_shim::channels_last(&x).expect("a 4-D float tensor"),
            };
            self.forward(&x)
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for n in ["conv", "conv_1", "conv_2"] {
            x = self.c(n, &x);
        }
        x = max_pool(&x, 2, 0);
        x = self.c("conv_4", &self.c("conv_3", &x));
        x = max_pool(&x, 2, 0);
        for m in ["mixed", "mixed_1", "mixed_2"] {
            x = Tensor::cat(
                &[
                    self.c(&format!("{m}.conv"), &x),
                    self.chain(&format!("{m}.tower"), &["conv", "conv_1"], &x),
                    self.chain(&format!("{m}.tower_1"), &["conv", "conv_1", "conv_2"], &x),
                    self.c(&format!("{m}.tower_2.conv"), &avg_pool(&x)),
                ],
                1,
            );
        }
        x = Tensor::cat(
            &[
                self.c("mixed_3.conv", &x),
                self.chain("mixed_3.tower", &["conv", "conv_1", "conv_2"], &x),
                max_pool(&x, 2, 0),
            ],
            1,
        );
        for m in ["mixed_4", "mixed_5", "mixed_6", "mixed_7"] {
            x = Tensor::cat(
                &[
                    self.c(&format!("{m}.conv"), &x),
                    self.chain(&format!("{m}.tower"), &["conv", "conv_1", "conv_2"], &x),
                    self.chain(&format!("{m}.tower_1"), &["conv", "conv_1", "conv_2", "conv_3", "conv_4"], &x),
                    self.c(&format!("{m}.tower_2.conv"), &avg_pool(&x)),
                ],
                1,
            );
        }
        x = Tensor::cat(
            &[
                self.chain("mixed_8.tower", &["conv", "conv_1"], &x),
                self.chain("mixed_8.tower_1", &["conv", "conv_1", "conv_2", "conv_3"], &x),
                max_pool(&x, 2, 0),
            ],
            1,
        );
        for (m, max) in [("mixed_9", false), ("mixed_10", true)] {
            let a = self.c(&format!("{m}.tower_conv"), &x);
            let b = self.c(&format!("{m}.tower_1_conv_1"), &self.c(&format!("{m}.tower_1_conv"), &x));
            let pooled = if max { max_pool(&x, 1, 1) } else { avg_pool(&x) };
            x = Tensor::cat(
                &[
                    self.c(&format!("{m}.conv"), &x),
                    self.c(&format!("{m}.tower_mixed_conv"), &a),
                    self.c(&format!("{m}.tower_mixed_conv_1"), &a),
                    self.c(&format!("{m}.tower_1_mixed_conv"), &b),
                    self.c(&format!("{m}.tower_1_mixed_conv_1"), &b),
                    self.c(&format!("{m}.tower_2_conv"), &pooled),
                ],
                1,
            );
        }
        x.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>).flatten(1, -1)
    }
}

/// (module name, stride, [pad_h, pad_w]) of every conv layer, as in architecture.json.
fn layer_table() -> Vec<(String, i64, [i64; 2])> {
    let mut v: Vec<(String, i64, [i64; 2])> = Vec::new();
    let mut add = |n: String, s: i64, p: [i64; 2]| v.push((n, s, p));
    add("conv".into(), 2, [0, 0]);
    add("conv_1".into(), 1, [0, 0]);
    add("conv_2".into(), 1, [1, 1]);
    add("conv_3".into(), 1, [0, 0]);
    add("conv_4".into(), 1, [0, 0]);
    for m in ["mixed", "mixed_1", "mixed_2"] {
        add(format!("{m}.conv"), 1, [0, 0]);
        add(format!("{m}.tower.conv"), 1, [0, 0]);
        add(format!("{m}.tower.conv_1"), 1, [2, 2]);
        add(format!("{m}.tower_1.conv"), 1, [0, 0]);
        add(format!("{m}.tower_1.conv_1"), 1, [1, 1]);
        add(format!("{m}.tower_1.conv_2"), 1, [1, 1]);
        add(format!("{m}.tower_2.conv"), 1, [0, 0]);
    }
    add("mixed_3.conv".into(), 2, [0, 0]);
    add("mixed_3.tower.conv".into(), 1, [0, 0]);
    add("mixed_3.tower.conv_1".into(), 1, [1, 1]);
    add("mixed_3.tower.conv_2".into(), 2, [0, 0]);
    let (row, col) = ([0, 3], [3, 0]);
    for m in ["mixed_4", "mixed_5", "mixed_6", "mixed_7"] {
        add(format!("{m}.conv"), 1, [0, 0]);
        add(format!("{m}.tower.conv"), 1, [0, 0]);
        add(format!("{m}.tower.conv_1"), 1, row);
        add(format!("{m}.tower.conv_2"), 1, col);
        add(format!("{m}.tower_1.conv"), 1, [0, 0]);
        add(format!("{m}.tower_1.conv_1"), 1, col);
        add(format!("{m}.tower_1.conv_2"), 1, row);
        add(format!("{m}.tower_1.conv_3"), 1, col);
        add(format!("{m}.tower_1.conv_4"), 1, row);
        add(format!("{m}.tower_2.conv"), 1, [0, 0]);
    }
    add("mixed_8.tower.conv".into(), 1, [0, 0]);
    add("mixed_8.tower.conv_1".into(), 2, [0, 0]);
    add("mixed_8.tower_1.conv".into(), 1, [0, 0]);
    add("mixed_8.tower_1.conv_1".into(), 1, row);
    add("mixed_8.tower_1.conv_2".into(), 1, col);
    add("mixed_8.tower_1.conv_3".into(), 2, [0, 0]);
    for m in ["mixed_9", "mixed_10"] {
        add(format!("{m}.conv"), 1, [0, 0]);
        add(format!("{m}.tower_conv"), 1, [0, 0]);
        add(format!("{m}.tower_mixed_conv"), 1, [0, 1]);
        add(format!("{m}.tower_mixed_conv_1"), 1, [1, 0]);
        add(format!("{m}.tower_1_conv"), 1, [0, 0]);
        add(format!("{m}.tower_1_conv_1"), 1, [1, 1]);
        add(format!("{m}.tower_1_mixed_conv"), 1, [0, 1]);
        add(format!("{m}.tower_1_mixed_conv_1"), 1, [1, 0]);
        add(format!("{m}.tower_2_conv"), 1, [0, 0]);
    }
    v
}
