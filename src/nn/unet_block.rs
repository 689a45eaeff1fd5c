//! EDM's UNetBlock: GroupNorm-SiLU-Conv residual block with an embedding-conditioned scale or
//! shift, optional up/down-sampling and optional self-attention.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::layers::{Conv2d, ConvSpec, GroupNorm, Init, Linear};

pub struct BlockConfig<'a> {
    pub emb_channels: i64,
    /// Fixed number of attention heads (DDPM++: 1), or None to use `channels_per_head`.
    pub num_heads: Option<i64>,
    pub channels_per_head: i64,
    pub dropout: f64,
    pub skip_scale: f64,
    pub eps: f64,
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
        let norm0 = GroupNorm::new(&(p / "norm0"), in_channels, c.eps);
        let conv0 = Conv2d::new(&(p / "conv0"), in_channels, out_channels, resample(3), c.init);
        let affine = Linear::new(
            &(p / "affine"),
            c.emb_channels,
            out_channels * if c.adaptive_scale { 2 } else { 1 },
            true,
            c.init,
        );
        let norm1 = GroupNorm::new(&(p / "norm1"), out_channels, c.eps);
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
                GroupNorm::new(&(p / "norm2"), out_channels, c.eps),
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
        }
    }

    pub fn forward(&self, x: &Tensor, emb: &Tensor, train: bool) -> Tensor {
        let orig = x;
        let mut x = self.conv0.forward(&self.norm0.forward(x).silu());
        let params = self.affine.forward(emb).unsqueeze(2).unsqueeze(3).to_kind(x.kind());
        x = if self.adaptive_scale {
            let chunks = params.chunk(2, 1);
            let (scale, shift) = (&chunks[0], &chunks[1]);
            (shift + self.norm1.forward(&x) * (scale + 1.0)).silu()
        } else {
            self.norm1.forward(&(x + params)).silu()
        };
        x = self.conv1.forward(&x.dropout(self.dropout, train));
        let skip = match &self.skip {
            Some(s) => s.forward(orig),
            None => orig.shallow_clone(),
        };
        x = (x + skip) * self.skip_scale;
        if let Some((norm2, qkv, proj)) = &self.attn {
            let (n, c, h, w) = x.size4().expect("NCHW");
            let heads = self.num_heads;
            let qkv = qkv.forward(&norm2.forward(&x)).reshape([n * heads, c / heads, 3, h * w]);
            // [B, C, L] -> [B, 1, L, C] for scaled dot-product attention over the L positions.
            let part = |i: i64| qkv.select(2, i).transpose(1, 2).unsqueeze(1);
            let (q, k, v) = (part(0), part(1), part(2));
            crate::nn::flops::add(2 * (n * c * h * w * h * w) as u64); // q.k and weights.v
            let fused = x.device().is_cuda() && FUSED_ATTENTION.load(Ordering::Relaxed);
            let a = attention(&q, &k, &v, fused);
            let a = a.squeeze_dim(1).transpose(1, 2).reshape([n, c, h, w]);
            x = (proj.forward(&a) + x) * self.skip_scale;
        }
        x
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
