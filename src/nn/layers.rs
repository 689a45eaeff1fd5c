//! EDM's building blocks: Linear, Conv2d with a resampling filter, GroupNorm, noise embeddings,
//! and EDM's weight initialisations. Parameter names follow EDM's state dict.

use tch::nn::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitMode {
    XavierUniform,
    XavierNormal,
    KaimingUniform,
    KaimingNormal,
}

/// How a layer's weight and bias are drawn (EDM's `init_mode`, `init_weight`, `init_bias`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub mode: InitMode,
    pub weight: f64,
    pub bias: f64,
}

impl Init {
    pub const fn new(mode: InitMode, weight: f64, bias: f64) -> Self {
        Init { mode, weight, bias }
    }
}

fn draw(shape: &[i64], mode: InitMode, fan_in: f64, fan_out: f64, p: &Path) -> Tensor {
    let opts = (Kind::Float, p.device());
    let uniform = || Tensor::rand(shape, opts) * 2.0 - 1.0;
    match mode {
        InitMode::XavierUniform => uniform() * (6.0 / (fan_in + fan_out)).sqrt(),
        InitMode::XavierNormal => Tensor::randn(shape, opts) * (2.0 / (fan_in + fan_out)).sqrt(),
        InitMode::KaimingUniform => uniform() * (3.0 / fan_in).sqrt(),
        InitMode::KaimingNormal => Tensor::randn(shape, opts) * (1.0 / fan_in).sqrt(),
    }
}

/// A non-trainable tensor registered under `name` (a buffer in PyTorch's terms).
pub fn buffer(p: &Path, name: &str, value: &Tensor) -> Tensor {
    let b = p.zeros_no_train(name, &value.size());
    tch::no_grad(|| b.shallow_clone().copy_(&value.to_device(p.device())));
    b
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_features: i64,
}

impl Linear {
    pub fn new(p: &Path, in_features: i64, out_features: i64, bias: bool, init: Init) -> Self {
        let (fi, fo) = (in_features as f64, out_features as f64);
        let weight = p.var_copy("weight", &(draw(&[out_features, in_features], init.mode, fi, fo, p) * init.weight));
        let bias = bias.then(|| p.var_copy("bias", &(draw(&[out_features], init.mode, fi, fo, p) * init.bias)));
        Linear { weight, bias, in_features }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if super::flops::counting() {
            let rows = (x.numel() as i64 / self.in_features.max(1)) as u64;
            super::flops::add(rows * self.weight.numel() as u64);
        }
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// EDM's Conv2d: an optional kernel, optional 2x up/down-sampling with a separable FIR filter,
/// optionally fused with the convolution.
pub struct Conv2d {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub filter: Option<Tensor>,
    pub in_channels: i64,
    pub out_channels: i64,
    up: bool,
    down: bool,
    fused: bool,
}

pub struct ConvSpec<'a> {
    pub kernel: i64,
    pub bias: bool,
    pub up: bool,
    pub down: bool,
    pub resample_filter: &'a [f64],
    pub fused_resample: bool,
}

impl Default for ConvSpec<'_> {
    fn default() -> Self {
        ConvSpec {
            kernel: 3,
            bias: true,
            up: false,
            down: false,
            resample_filter: &[1.0, 1.0],
            fused_resample: false,
        }
    }
}

impl Conv2d {
    pub fn new(p: &Path, in_channels: i64, out_channels: i64, spec: ConvSpec, init: Init) -> Self {
        let k = spec.kernel;
        let (fi, fo) = ((in_channels * k * k) as f64, (out_channels * k * k) as f64);
        let weight = (k > 0).then(|| {
            p.var_copy(
                "weight",
                &(draw(&[out_channels, in_channels, k, k], init.mode, fi, fo, p) * init.weight),
            )
        });
        let bias = (k > 0 && spec.bias).then(|| p.var_copy("bias", &(draw(&[out_channels], init.mode, fi, fo, p) * init.bias)));
        let filter = (spec.up || spec.down).then(|| {
            let f = Tensor::from_slice(spec.resample_filter).to_kind(Kind::Float);
            let n = spec.resample_filter.len() as i64;
            let s: f64 = spec.resample_filter.iter().sum();
            let f2 = f.outer(&f).reshape([1, 1, n, n]) / (s * s);
            buffer(p, "resample_filter", &f2)
        });
        Conv2d {
            weight,
            bias,
            filter,
            in_channels,
            out_channels,
            up: spec.up,
            down: spec.down,
            fused: spec.fused_resample,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.forward_without_bias(x);
        match self.bias_for(&y) {
            Some(b) => y + b,
            None => y,
        }
    }

    /// The bias as [1, C, 1, 1] in `y`'s dtype, for callers that fold it into a later
    /// element-wise pass (a full-tensor bias add is as costly as the GroupNorm that follows).
    pub fn bias_for(&self, y: &Tensor) -> Option<Tensor> {
        // In the activation dtype, so bf16 activations stay bf16 under autocast.
        self.bias.as_ref().map(|b| b.to_kind(y.kind()).reshape([1, -1, 1, 1]))
    }

    /// The resampling and the convolution, without adding the bias.
    pub fn forward_without_bias(&self, x: &Tensor) -> Tensor {
        let w_pad = self.weight.as_ref().map(|w| w.size()[3] / 2).unwrap_or(0);
        let f_pad = self.filter.as_ref().map(|f| (f.size()[3] - 1) / 2).unwrap_or(0);
        if let (true, Some(w)) = (super::flops::counting(), &self.weight) {
            // The main convolution runs at the input resolution when fused with a downsample,
            // else at the output resolution.
            let (n, _, h, wd) = x.size4().expect("NCHW");
            let (h, wd) = match (self.up, self.down && self.fused) {
                (true, _) => (h * 2, wd * 2),
                (false, true) => (h, wd),
                (false, false) if self.down => (h / 2, wd / 2),
                _ => (h, wd),
            };
            super::flops::add((n * h * wd) as u64 * w.numel() as u64);
        }
        let mut x = x.shallow_clone();
        let f = self.filter.as_ref().map(|f| f.to_kind(x.kind()));
        let w = self.weight.as_ref();
        let up_filter = |f: &Tensor, c: i64| (f * 4.0).tile([c, 1, 1, 1]);
        match (self.fused, self.up, self.down, w, &f) {
            (true, true, _, Some(w), Some(f)) => {
                let c = self.in_channels;
                x = x.conv_transpose2d(
                    &up_filter(f, c),
                    None::<Tensor>,
                    [2, 2],
                    [(f_pad - w_pad).max(0); 2],
                    [0, 0],
                    c,
                    [1, 1],
                );
                x = x.conv2d(w, None::<Tensor>, [1, 1], [(w_pad - f_pad).max(0); 2], [1, 1], 1);
            }
            (true, _, true, Some(w), Some(f)) => {
                let c = self.out_channels;
                x = x.conv2d(w, None::<Tensor>, [1, 1], [w_pad + f_pad; 2], [1, 1], 1);
                x = x.conv2d(&f.tile([c, 1, 1, 1]), None::<Tensor>, [2, 2], [0, 0], [1, 1], c);
            }
            _ => {
                if let (true, Some(f)) = (self.up, &f) {
                    let c = self.in_channels;
                    x = x.conv_transpose2d(&up_filter(f, c), None::<Tensor>, [2, 2], [f_pad; 2], [0, 0], c, [1, 1]);
                }
                if let (true, Some(f)) = (self.down, &f) {
                    let c = self.in_channels;
                    x = x.conv2d(&f.tile([c, 1, 1, 1]), None::<Tensor>, [2, 2], [f_pad; 2], [1, 1], c);
                }
                if let Some(w) = w {
                    x = x.conv2d(w, None::<Tensor>, [1, 1], [w_pad; 2], [1, 1], 1);
                }
            }
        }
        x
    }
}

/// How a GroupNorm runs on CUDA (both in the network config, so in the cache key).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormMode {
    /// On bf16 activations: the native kernel in bf16 instead of autocast's fp32 (the network
    /// config's `bf16_group_norm`).
    pub bf16_native: bool,
    /// On channels-last CUDA activations: dmdpipe's fused kernels, with the shift before the norm
    /// and the SiLU after it in the same passes (the network config's `fused_kernels`).
    pub fused: bool,
}

impl NormMode {
    pub const EAGER_BF16: NormMode = NormMode {
        bf16_native: true,
        fused: false,
    };
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    groups: i64,
    eps: f64,
    mode: NormMode,
}

impl GroupNorm {
    /// EDM's rule: min(32, channels / 4) groups.
    pub fn new(p: &Path, channels: i64, eps: f64, mode: NormMode) -> Self {
        let groups = 32.min(channels / 4).max(1);
        let weight = p.var_copy("weight", &Tensor::ones([channels], (Kind::Float, p.device())));
        let bias = p.var_copy("bias", &Tensor::zeros([channels], (Kind::Float, p.device())));
        GroupNorm {
            weight,
            bias,
            groups,
            eps,
            mode,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, None, false)
    }

    /// `act(norm(x + shift))`: act is SiLU when `silu`, else the identity; `shift` is [N, C, 1, 1]
    /// or [1, C, 1, 1]. One read of x for the statistics and one for the output in the fused
    /// kernels, where eager ops make a pass each for the shift, the norm's two and the SiLU.
    pub fn forward_act(&self, x: &Tensor, shift: Option<&Tensor>, silu: bool) -> Tensor {
        if self.mode.fused
            && let Some(y) = crate::fused_kernels::group_norm_act(x, shift, &self.weight, &self.bias, self.groups, self.eps, silu)
                .expect("GroupNorm in the fused kernels")
        {
            return y;
        }
        let shifted;
        let x = match shift {
            Some(s) => {
                shifted = x + s;
                &shifted
            }
            None => x,
        };
        let y = self.eager(x);
        if silu { y.silu() } else { y }
    }

    /// ADM's adaptive scale: `silu(shift + group_norm(x + pre_shift) * (scale + 1))`, scale and
    /// shift [N, C, 1, 1] from the embedding, pre_shift (conv0's bias) [1, C, 1, 1]. In the fused
    /// kernels the per-sample scale and shift fold into a per-sample weight and bias, so the
    /// whole expression is the norm's two passes.
    pub fn forward_modulated(&self, x: &Tensor, pre_shift: Option<&Tensor>, scale: &Tensor, shift: &Tensor) -> Tensor {
        if self.mode.fused && x.device().is_cuda() {
            let n = x.size()[0];
            let gain = scale.to_kind(Kind::Float).reshape([n, -1]) + 1.0;
            let weight = self.weight.unsqueeze(0) * &gain;
            let bias = self.bias.unsqueeze(0) * &gain + shift.to_kind(Kind::Float).reshape([n, -1]);
            if let Some(y) = crate::fused_kernels::group_norm_act(x, pre_shift, &weight, &bias, self.groups, self.eps, true)
                .expect("GroupNorm in the fused kernels")
            {
                return y;
            }
        }
        let x = match pre_shift {
            Some(b) => x + b,
            None => x.shallow_clone(),
        };
        (shift + self.forward(&x) * (scale + 1.0)).silu()
    }

    fn eager(&self, x: &Tensor) -> Tensor {
        let native = crate::torch_shim::group_norm_override().unwrap_or(self.mode.bf16_native);
        if x.kind() == Kind::BFloat16 && native {
            return crate::torch_shim::group_norm_native(x, &self.weight, &self.bias, self.groups, self.eps)
                .expect("group_norm on bf16 activations");
        }
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// The layout a network runs in: with `channels_last` on a CUDA device the input is re-laid out
/// once as NHWC, and every convolution keeps that layout (cuDNN answers in its input's layout),
/// so no layer pays NCHW <-> NHWC transforms around cuDNN's NHWC kernels.
pub fn network_layout(x: &Tensor, channels_last: bool) -> Tensor {
    if channels_last && x.device().is_cuda() && x.dim() == 4 {
        crate::torch_shim::channels_last(x).expect("a 4-D tensor")
    } else {
        x.shallow_clone()
    }
}

/// Sinusoidal embedding of a noise level (EDM's PositionalEmbedding).
pub fn positional_embedding(x: &Tensor, channels: i64, max_positions: f64, endpoint: bool) -> Tensor {
    let half = channels / 2;
    let freqs = Tensor::arange(half, (Kind::Float, x.device())) / ((half - endpoint as i64) as f64);
    let freqs = freqs.multiply_scalar(-(max_positions.ln())).exp();
    let arg = x.to_kind(Kind::Float).outer(&freqs);
    Tensor::cat(&[arg.cos(), arg.sin()], 1)
}

/// Random Fourier features of a noise level (EDM's FourierEmbedding); `freqs` is a buffer.
pub fn fourier_embedding(x: &Tensor, freqs: &Tensor) -> Tensor {
    let arg = x.to_kind(Kind::Float).outer(&(freqs * (2.0 * std::f64::consts::PI)));
    Tensor::cat(&[arg.cos(), arg.sin()], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_group_norm_matches_fp32_and_passes_gradients_to_fp32_weights() {
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let norm = GroupNorm::new(&vs.root(), 16, 1e-6, NormMode::EAGER_BF16);
        tch::no_grad(|| {
            norm.weight
                .shallow_clone()
                .copy_(&(Tensor::rand([16], (Kind::Float, tch::Device::Cpu)) + 0.5));
            norm.bias
                .shallow_clone()
                .copy_(&Tensor::randn([16], (Kind::Float, tch::Device::Cpu)));
        });
        let x32 = Tensor::randn([3, 16, 5, 5], (Kind::Float, tch::Device::Cpu)) * 3.0 + 1.0;
        let x16 = x32.to_kind(Kind::BFloat16);
        let reference = x16
            .to_kind(Kind::Float)
            .group_norm(norm.groups, Some(&norm.weight), Some(&norm.bias), norm.eps, true);
        let ref_grad = {
            let g = tch::nn::VarStore::new(tch::Device::Cpu);
            let w = g.root().var_copy("w", &norm.weight);
            let y = x16
                .to_kind(Kind::Float)
                .group_norm(norm.groups, Some(&w), Some(&norm.bias), norm.eps, true);
            (y * &x32).sum(Kind::Float).backward();
            w.grad()
        };
        let y = norm.forward(&x16);
        assert_eq!(y.kind(), Kind::BFloat16, "stays in bf16");
        // The process-wide override wins over the layer's own setting (and is the only test
        // here that sets it, so parallel tests do not see it).
        // On the CPU the plain path also takes bf16 input but keeps the weights in fp32, so the
        // two paths differ by the weights' rounding.
        crate::torch_shim::set_group_norm_override(Some(false));
        let forced = tch::no_grad(|| norm.forward(&x16));
        crate::torch_shim::set_group_norm_override(None);
        let plain = tch::no_grad(|| x16.group_norm(norm.groups, Some(&norm.weight), Some(&norm.bias), norm.eps, true));
        assert!(forced.equal(&plain), "override off: the plain path");
        assert!(!forced.equal(&y.detach()), "override off: not the native path");
        let err = (y.to_kind(Kind::Float) - &reference).abs().max().double_value(&[]);
        // bf16 keeps 8 bits of mantissa: |y| up to ~4 gives steps of ~0.016.
        assert!(err < 0.05, "max error {err}");
        assert!(err > 0.0, "the bf16 path must differ by rounding, else it was not taken");
        (y.to_kind(Kind::Float) * &x32).sum(Kind::Float).backward();
        let g = norm.weight.grad();
        assert!(g.defined(), "gradient reaches the fp32 weight");
        let rel = ((&g - &ref_grad).norm().double_value(&[])) / ref_grad.norm().double_value(&[]);
        assert!(rel < 2e-2, "weight gradient relative error {rel}");
    }
}
