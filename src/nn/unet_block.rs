//! EDM's UNetBlock: GroupNorm-SiLU-Conv residual block with an embedding-conditioned scale or
//! shift, optional up/down-sampling and optional self-attention.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::layers::{Conv2d, ConvSpec, GroupNorm, Init, Linear, NormMode};

pub struct BlockConfig<'a> {
    pub emb_channels: i64,
    /// Fixed number of attention heads (DDPM++: 1), or None to use `channels_per_head`.
    pub num_heads: Option<i64>,
    pub channels_per_head: i64,
    pub dropout: f64,
    pub skip_scale: f64,
    pub eps: f64,
    /// How the GroupNorms run (the network config's `bf16_group_norm` and `fused_kernels`).
    pub norm: NormMode,
    pub resample_filter: &'a [f64],
    pub resample_proj: bool,
    pub adaptive_scale: bool,
    pub init: Init,
    pub init_zero: Init,
    pub init_attn: Init,
}

pub struct UNetBlock {
    pub in_channels: i64,
    pub out_channels: i64,
    norm0: GroupNorm,
    conv0: Conv2d,
    affine: Linear,
    norm1: GroupNorm,
    conv1: Conv2d,
    skip: Option<Conv2d>,
    attn: Option<(GroupNorm, Conv2d, Conv2d)>,
    num_heads: i64,
    dropout: f64,
    skip_scale: f64,
    adaptive_scale: bool,
    /// The residual sums in the fused kernel (the config's `fused_kernels`).
    fused: bool,
}

impl UNetBlock {
    pub fn new(p: &Path, in_channels: i64, out_channels: i64, up: bool, down: bool, attention: bool, c: &BlockConfig) -> Self {
        let num_heads = if !attention {
            0
        } else {
            c.num_heads.unwrap_or(out_channels / c.channels_per_head)
        };
        let resample = |kernel| ConvSpec {
            kernel,
            up,
            down,
            resample_filter: c.resample_filter,
            ..Default::default()
        };
        let norm0 = GroupNorm::new(&(p / "norm0"), in_channels, c.eps, c.norm);
        let conv0 = Conv2d::new(&(p / "conv0"), in_channels, out_channels, resample(3), c.init);
        let affine = Linear::new(
            &(p / "affine"),
            c.emb_channels,
            out_channels * if c.adaptive_scale { 2 } else { 1 },
            true,
            c.init,
        );
        let norm1 = GroupNorm::new(&(p / "norm1"), out_channels, c.eps, c.norm);
        let conv1 = Conv2d::new(&(p / "conv1"), out_channels, out_channels, ConvSpec::default(), c.init_zero);
        let skip = (out_channels != in_channels || up || down).then(|| {
            let kernel = if c.resample_proj || out_channels != in_channels { 1 } else { 0 };
            Conv2d::new(&(p / "skip"), in_channels, out_channels, resample(kernel), c.init)
        });
        let attn = (num_heads > 0).then(|| {
            let one = |_| ConvSpec {
                kernel: 1,
                ..Default::default()
            };
            (
                GroupNorm::new(&(p / "norm2"), out_channels, c.eps, c.norm),
                Conv2d::new(&(p / "qkv"), out_channels, out_channels * 3, one(()), c.init_attn),
                Conv2d::new(&(p / "proj"), out_channels, out_channels, one(()), c.init_zero),
            )
        });
        UNetBlock {
            in_channels,
            out_channels,
            norm0,
            conv0,
            affine,
            norm1,
            conv1,
            skip,
            attn,
            num_heads,
            dropout: c.dropout,
            skip_scale: c.skip_scale,
            adaptive_scale: c.adaptive_scale,
            fused: c.norm.fused,
        }
    }

    /// The decoder's join of this block's input with an encoder skip along the channels: the
    /// fused kernel where it applies, else `Tensor::cat` (the same values either way).
    pub fn join_skip(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        if self.fused
            && let Some(y) = crate::fused_kernels::channel_cat(x, skip).expect("the channel join in the fused kernel")
        {
            return y;
        }
        Tensor::cat(&[x, skip], 1)
    }

    // Every element-wise pass over a full activation costs as much memory traffic as a
    // GroupNorm, so the convolution biases ride along with passes that happen anyway: conv0's
    // with the embedding add, conv1's and proj's with the skip scaling, conv1's with the skip
    // convolution's bias when there is one.
    pub fn forward(&self, x: &Tensor, emb: &Tensor, train: bool) -> Tensor {
        let orig = x;
        let mut x = self.conv0.forward_without_bias(&self.norm0.forward_act(x, None, true));
        let params = self.affine.forward(emb).unsqueeze(2).unsqueeze(3).to_kind(x.kind());
        let bias0 = self.conv0.bias_for(&x);
        x = if self.adaptive_scale {
            let chunks = params.chunk(2, 1);
            self.norm1.forward_modulated(&x, bias0.as_ref(), &chunks[0], &chunks[1])
        } else {
            let shift = match bias0 {
                Some(b) => params + b,
                None => params,
            };
            self.norm1.forward_act(&x, Some(&shift), true)
        };
        x = self.conv1.forward_without_bias(&x.dropout(self.dropout, train));
        // The skip path; the sum carries conv1's bias and the skip convolution's, if any.
        let skip_out = self.skip.as_ref().map(|s| s.forward_without_bias(orig));
        let skip_bias = self.skip.as_ref().and_then(|s| s.bias.as_ref());
        let skip = skip_out.as_ref().unwrap_or(orig);
        x = residual_sum(&x, skip, self.conv1.bias.as_ref(), skip_bias, self.skip_scale, self.fused);
        if let Some((norm2, qkv, proj)) = &self.attn {
            let (n, c, h, w) = x.size4().expect("NCHW");
            let fused_sdpa = x.device().is_cuda() && FUSED_ATTENTION.load(Ordering::Relaxed);
            let xn = norm2.forward(&x);
            crate::nn::flops::add(2 * (n * c * h * w * h * w) as u64); // q.k and weights.v
            let a = if fused_sdpa && self.fused && is_channels_last(&xn) {
                attention_nhwc(qkv, &xn, self.num_heads)
            } else {
                let (q, k, v) = split_heads(&qkv.forward(&xn), self.num_heads, fused_sdpa);
                merge_heads(&attention(&q, &k, &v, fused_sdpa), n, h, w, is_channels_last(&x))
            };
            let y = proj.forward_without_bias(&a);
            x = residual_sum(&y, &x, proj.bias.as_ref(), None, self.skip_scale, self.fused);
        }
        x
    }
}

/// Whether a 4-D tensor is laid out NHWC (channels-last), read from its strides.
fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && size[1] > 1 && stride[1] == 1 && stride[3] == size[1] && stride[2] == size[1] * size[3]
}

/// The qkv convolution's output [N, 3C, H, W] (EDM's channel order: head, channel, q/k/v) as
/// q, k, v of shape [N * heads, 1, L, C / heads]. Splitting dimensions is a view in any layout,
/// so the one copy is the `contiguous` that the fused kernels need (channel stride 1; otherwise
/// CUDA falls back to the math path, in fp32).
fn split_heads(qkv: &Tensor, heads: i64, contiguous: bool) -> (Tensor, Tensor, Tensor) {
    let c3 = qkv.size()[1];
    let parts = qkv.unflatten(1, [heads, c3 / 3 / heads, 3]).flatten(4, 5);
    // [N, heads, C/heads, 3, L] -> [N, heads, 3, L, C/heads]
    let parts = parts.permute([0, 1, 3, 4, 2]);
    let parts = if contiguous { parts.contiguous() } else { parts };
    let parts = parts.flatten(0, 1);
    let part = |i: i64| parts.select(1, i).unsqueeze(1);
    (part(0), part(1), part(2))
}

/// Self-attention of an NHWC activation `xn` (after norm2) with the fused kernels, without the
/// layout copies of `split_heads`: the 1x1 qkv convolution runs as one matrix product with its
/// bias in the epilogue and its output channels reordered from EDM's (head, channel, q/k/v) to
/// (q/k/v, head, channel), so that q, k and v are strided views with channel stride 1 that the
/// fused attention reads as they are. Their gradients come back stacked (unbind's backward)
/// straight into the NHWC layout the convolutions and GroupNorms want; with `select` and a
/// copy they came back through zero-filled buffers and two layout transforms.
fn attention_nhwc(qkv: &Conv2d, xn: &Tensor, heads: i64) -> Tensor {
    let (n, c, h, w) = xn.size4().expect("NCHW");
    let (l, ch) = (h * w, c / heads);
    let weight = qkv.weight.as_ref().expect("a 1x1 qkv convolution");
    if crate::nn::flops::counting() {
        crate::nn::flops::add((n * l) as u64 * weight.numel() as u64);
    }
    let reorder = |t: &Tensor| t.reshape([heads, ch, 3, -1]).permute([2, 0, 1, 3]).reshape([3 * c, -1]);
    let wt = reorder(weight).tr(); // [C, 3C]
    let x2d = xn.permute([0, 2, 3, 1]).reshape([n * l, c]);
    let y = match &qkv.bias {
        Some(b) => reorder(b).reshape([-1]).addmm(&x2d, &wt),
        None => x2d.matmul(&wt),
    };
    let heads_first = |t: &Tensor| t.permute([0, 2, 1, 3]); // [N, L, heads, ch] -> [N, heads, L, ch]
    let parts = y.view([n, l, 3, heads, ch]).unbind(2);
    let (q, k, v) = (heads_first(&parts[0]), heads_first(&parts[1]), heads_first(&parts[2]));
    let a = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
    heads_first(&a).reshape([n, h, w, c]).permute([0, 3, 1, 2])
}

/// Attention's output [N * heads, 1, L, C / heads] as [N, C, H, W]: NHWC when `channels_last`
/// (else, with several heads, the projection and every layer after it would fall back to NCHW),
/// one copy; otherwise EDM's reshape (a view with one head, a copy with several).
fn merge_heads(a: &Tensor, n: i64, h: i64, w: i64, channels_last: bool) -> Tensor {
    let a = a.squeeze_dim(1); // [N * heads, L, C/heads]
    let c = a.size()[0] / n * a.size()[2];
    if channels_last {
        let a = a.unflatten(0, [n, -1]); // [N, heads, L, C/heads]
        a.permute([0, 2, 1, 3]).contiguous().reshape([n, h, w, c]).permute([0, 3, 1, 2])
    } else {
        a.transpose(1, 2).reshape([n, c, h, w])
    }
}

/// (a + b + bias_a + bias_b) * scale, the biases [C]: one pass in the fused kernel where it
/// applies, else the eager ops with the biases folded into the scaling pass.
fn residual_sum(a: &Tensor, b: &Tensor, bias_a: Option<&Tensor>, bias_b: Option<&Tensor>, scale: f64, fused: bool) -> Tensor {
    if fused && let Some(y) = crate::fused_kernels::skip_sum(a, b, bias_a, bias_b, scale).expect("the residual sum in the fused kernel") {
        return y;
    }
    // In the activation dtype, so bf16 activations stay bf16 under autocast.
    let as_act = |t: &Tensor| t.to_kind(a.kind()).reshape([1, -1, 1, 1]);
    let bias = match (bias_a.map(as_act), bias_b.map(as_act)) {
        (Some(x), Some(y)) => Some(sum_of_biases(&x, &y)),
        (x, y) => x.or(y),
    };
    scaled_sum(&(a + b), bias.as_ref(), scale)
}

/// a + b for two [1, C, 1, 1] biases of different parameters. Added with equal shapes, autograd
/// would hand both parameters the same gradient tensor (their `.grad`s would alias), and any
/// in-place update of one gradient (accumulation over micro-batches, clipping) would hit the
/// other too. With one side as [C, 1, 1] the backward reduces into a fresh tensor for it.
fn sum_of_biases(a: &Tensor, b: &Tensor) -> Tensor {
    a + b.reshape([-1, 1, 1])
}

/// (t + bias) * scale in one pass: bias * scale + scale * t.
fn scaled_sum(t: &Tensor, bias: Option<&Tensor>, scale: f64) -> Tensor {
    match bias {
        Some(b) => crate::torch_shim::add_alpha(&(b * scale), t, scale).expect("add_alpha"),
        None => t * scale,
    }
}

/// Whether CUDA runs attention as one fused scaled-dot-product kernel (the default) or as EDM
/// writes it (two matrix products around an fp32 softmax); `bench gpu` times both.
static FUSED_ATTENTION: AtomicBool = AtomicBool::new(true);

pub fn set_fused_attention(on: bool) {
    FUSED_ATTENTION.store(on, Ordering::Relaxed);
}

/// Attention over the L positions of q, k, v [B, 1, L, C]: softmax(q k^T / sqrt(C)) v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, fused: bool) -> Tensor {
    if fused {
        return Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false);
    }
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let w = q
        .to_kind(Kind::Float)
        .matmul(&(k.to_kind(Kind::Float) * scale).transpose(-1, -2))
        .softmax(-1, Kind::Float);
    w.matmul(&v.to_kind(Kind::Float)).to_kind(v.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::{Init, InitMode};
    use tch::Device;

    fn block(vs: &tch::nn::VarStore, cin: i64, cout: i64, attention: bool) -> UNetBlock {
        block_with_heads(vs, cin, cout, attention, Some(1))
    }

    fn block_with_heads(vs: &tch::nn::VarStore, cin: i64, cout: i64, attention: bool, num_heads: Option<i64>) -> UNetBlock {
        let init = Init::new(InitMode::XavierUniform, 1.0, 0.0);
        let c = BlockConfig {
            emb_channels: 16,
            num_heads,
            channels_per_head: 64,
            dropout: 0.0,
            skip_scale: 0.5f64.sqrt(),
            eps: 1e-6,
            norm: NormMode::EAGER_BF16,
            resample_filter: &[1.0, 1.0],
            resample_proj: true,
            adaptive_scale: false,
            init,
            init_zero: init,
            init_attn: init,
        };
        let b = UNetBlock::new(&vs.root(), cin, cout, false, false, attention, &c);
        // EDM initialises biases to zero, which would hide a bias folded in the wrong place.
        tch::no_grad(|| {
            for (_, v) in vs.variables() {
                v.shallow_clone()
                    .copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.3));
            }
        });
        b
    }

    /// The block as EDM writes it: every convolution adds its own bias.
    fn reference(b: &UNetBlock, x: &Tensor, emb: &Tensor) -> Tensor {
        let mut h = b.conv0.forward(&b.norm0.forward(x).silu());
        h = b.norm1.forward(&(h + b.affine.forward(emb).unsqueeze(2).unsqueeze(3))).silu();
        h = b.conv1.forward(&h);
        let skip = b.skip.as_ref().map_or_else(|| x.shallow_clone(), |s| s.forward(x));
        let mut out = (h + skip) * b.skip_scale;
        if let Some((norm2, qkv, proj)) = &b.attn {
            let (n, c, hh, w) = out.size4().unwrap();
            let qkv = qkv.forward(&norm2.forward(&out)).reshape([n, c, 3, hh * w]);
            let (q, k, v) = (qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2));
            let wts = q.transpose(1, 2).matmul(&(k / (c as f64).sqrt())).softmax(-1, Kind::Float);
            let a = v.matmul(&wts.transpose(1, 2)).reshape([n, c, hh, w]);
            out = (proj.forward(&a) + out) * b.skip_scale;
        }
        out
    }

    #[test]
    fn folded_biases_give_edms_block_and_separate_gradients() {
        tch::manual_seed(1);
        for (cin, cout, attention) in [(8, 16, true), (16, 16, false)] {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let b = block(&vs, cin, cout, attention);
            let x = Tensor::randn([2, cin, 8, 8], (Kind::Float, Device::Cpu));
            let emb = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
            let y = b.forward(&x, &emb, false);
            let r = reference(&b, &x, &emb);
            let err = (&y - &r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]);
            assert!(err < 1e-5, "{cin}->{cout}: relative error {err}");
            // Every parameter gets a gradient of its own: none shares memory with another's,
            // so in-place accumulation or clipping of one cannot change another.
            (y * Tensor::randn([2, cout, 8, 8], (Kind::Float, Device::Cpu)))
                .sum(Kind::Float)
                .backward();
            let mut spans: Vec<(usize, usize, String)> = vs
                .variables()
                .into_iter()
                .map(|(n, v)| {
                    let g = v.grad();
                    assert!(g.defined(), "{n} has no gradient");
                    let start = g.data_ptr() as usize;
                    (start, start + g.numel() * 4, n)
                })
                .collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "gradients of {} and {} overlap", w[0].2, w[1].2);
            }
        }
    }

    #[test]
    fn heads_split_and_merge_as_edm_reshapes_them_in_either_layout() {
        tch::manual_seed(4);
        let (n, c, h, w, heads) = (2i64, 8i64, 3i64, 4i64, 2i64);
        let nchw = Tensor::randn([n, 3 * c, h, w], (Kind::Float, Device::Cpu));
        let nhwc = crate::torch_shim::channels_last(&nchw).unwrap();
        assert!(is_channels_last(&nhwc) && !is_channels_last(&nchw));
        // EDM: reshape(N * heads, C / heads, 3, L).unbind(2), each [B, C/heads, L].
        let edm = nchw.reshape([n * heads, c / heads, 3, h * w]);
        for (qkv, contiguous) in [(&nchw, false), (&nhwc, false), (&nhwc, true)] {
            let (q, k, v) = split_heads(qkv, heads, contiguous);
            for (i, t) in [q, k, v].iter().enumerate() {
                assert_eq!(t.size(), [n * heads, 1, h * w, c / heads]);
                assert!(t.squeeze_dim(1).transpose(1, 2).equal(&edm.select(2, i as i64)), "part {i}");
                if contiguous {
                    assert_eq!(t.stride()[3], 1, "the fused kernels need channel stride 1");
                }
            }
        }
        // EDM: a [B, C/heads, L] reshaped to x's shape.
        let a = Tensor::randn([n * heads, 1, h * w, c / heads], (Kind::Float, Device::Cpu));
        let edm = a.squeeze_dim(1).transpose(1, 2).reshape([n, c, h, w]);
        let (cl, plain) = (merge_heads(&a, n, h, w, true), merge_heads(&a, n, h, w, false));
        assert!(cl.equal(&edm) && plain.equal(&edm));
        assert!(is_channels_last(&cl), "the block keeps the network's NHWC layout");
        assert!(plain.is_contiguous());
    }

    #[test]
    fn nhwc_attention_matches_edms_split_and_keeps_gradients_nhwc() {
        tch::manual_seed(8);
        for heads in [1i64, 2] {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let b = block_with_heads(&vs, 8, 16, true, Some(heads));
            let (_, qkv, _) = b.attn.as_ref().unwrap();
            let x = Tensor::randn([2, 16, 3, 5], (Kind::Float, Device::Cpu));
            let xn = crate::torch_shim::channels_last(&x).unwrap().set_requires_grad(true);
            let probe = Tensor::randn([2, 16, 3, 5], (Kind::Float, Device::Cpu));
            let grads = |a: &Tensor| {
                (a * &probe).sum(Kind::Float).backward();
                let (w, bias) = (qkv.weight.as_ref().unwrap(), qkv.bias.as_ref().unwrap());
                let g = [xn.grad().copy(), w.grad().copy(), bias.grad().copy()];
                for t in [&xn, w, bias] {
                    let _ = t.grad().zero_();
                }
                g
            };
            let ours = attention_nhwc(qkv, &xn, heads);
            assert!(is_channels_last(&ours), "strides {:?}", ours.stride());
            let g_ours = grads(&ours);
            assert!(is_channels_last(&g_ours[0]), "input gradient strides {:?}", g_ours[0].stride());
            // EDM's order of operations: the convolution, the reshape into heads, explicit attention.
            let (q, k, v) = split_heads(&qkv.forward(&xn), heads, false);
            let edm = merge_heads(&attention(&q, &k, &v, false), 2, 3, 5, false);
            let err = (&ours - &edm).abs().max().double_value(&[]) / edm.abs().max().double_value(&[]);
            assert!(err < 1e-5, "{heads} heads: output, relative error {err}");
            for (what, a, e) in ["input", "qkv weight", "qkv bias"]
                .iter()
                .zip(&g_ours)
                .zip(grads(&edm))
                .map(|((w, a), e)| (w, a, e))
            {
                let err = (a - &e).abs().max().double_value(&[]) / e.abs().max().double_value(&[]);
                assert!(err < 1e-5, "{heads} heads: {what} gradient, relative error {err}");
            }
        }
    }

    #[test]
    fn a_block_with_several_attention_heads_keeps_an_nhwc_input_nhwc() {
        tch::manual_seed(6);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let b = block_with_heads(&vs, 8, 16, true, Some(4));
        let x = Tensor::randn([2, 8, 6, 6], (Kind::Float, Device::Cpu));
        let emb = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        let plain = b.forward(&x, &emb, false);
        let nhwc = b.forward(&crate::torch_shim::channels_last(&x).unwrap(), &emb, false);
        assert!(is_channels_last(&nhwc), "strides {:?}", nhwc.stride());
        let err = (&nhwc - &plain).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn fused_and_explicit_attention_agree() {
        tch::manual_seed(0);
        let r = || Tensor::randn([3, 1, 16, 8], (Kind::Float, tch::Device::Cpu));
        let (q, k, v) = (r(), r(), r());
        let d = (attention(&q, &k, &v, true) - attention(&q, &k, &v, false))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "{d}");
        // Not a trivial agreement: attention mixes positions.
        assert!((attention(&q, &k, &v, false) - &v).abs().max().double_value(&[]) > 0.1);
    }
}
