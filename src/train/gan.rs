//! DMD2's GAN head (arXiv 2405.14867): a small classifier on the fake denoiser's bottleneck
//! features of a noisy image, telling generated images from real ones. The fake denoiser's
//! encoder is the discriminator's trunk; this head is the rest.

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::nn::layers::{Conv2d, ConvSpec, GroupNorm, Init, InitMode, Linear, NormMode};

pub struct GanHead {
    pub vs: VarStore,
    conv: Conv2d,
    norm: GroupNorm,
    out: Linear,
}

impl GanHead {
    /// conv 3x3 -> GroupNorm -> SiLU -> global average pool -> linear to one logit.
    pub fn new(channels: i64, device: Device) -> Self {
        let vs = VarStore::new(device);
        let p = vs.root() / "gan_head";
        let init = Init::new(InitMode::KaimingUniform, 1.0, 0.0);
        let conv = Conv2d::new(&(&p / "conv"), channels, channels, ConvSpec::default(), init);
        let norm = GroupNorm::new(&(&p / "norm"), channels, 1e-6, NormMode::EAGER_BF16);
        let out = Linear::new(&(&p / "out"), channels, 1, true, Init::new(InitMode::XavierUniform, 1.0, 0.0));
        GanHead { vs, conv, norm, out }
    }

    /// One logit per image from bottleneck features [N, C, H, W].
    pub fn forward(&self, features: &Tensor) -> Tensor {
        let h = self.norm.forward(&self.conv.forward(features)).silu();
        let pooled = h.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        self.out.forward(&pooled).reshape([-1])
    }
}

/// Non-saturating generator loss: mean softplus(-D(fake)).
pub fn generator_loss(logits_fake: &Tensor) -> Tensor {
    (-logits_fake).softplus().mean(Kind::Float)
}

/// Discriminator loss: mean softplus(D(fake)) + mean softplus(-D(real)).
pub fn discriminator_loss(logits_fake: &Tensor, logits_real: &Tensor) -> Tensor {
    logits_fake.softplus().mean(Kind::Float) + (-logits_real).softplus().mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_follow_the_softplus_formulas() {
        let f = Tensor::from_slice(&[0.0f32, 2.0]);
        let r = Tensor::from_slice(&[-1.0f32]);
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let g = generator_loss(&f).double_value(&[]);
        assert!((g - (sp(0.0) + sp(-2.0)) / 2.0).abs() < 1e-6);
        let d = discriminator_loss(&f, &r).double_value(&[]);
        assert!((d - ((sp(0.0) + sp(2.0)) / 2.0 + sp(1.0))).abs() < 1e-6);
    }

    #[test]
    fn the_head_learns_to_separate_two_feature_distributions() {
        tch::manual_seed(0);
        let head = GanHead::new(8, Device::Cpu);
        let opt = crate::train::optim::AdamW::from_varstore(&head.vs, (0.9, 0.999), 1e-8, 0.0);
        let batch = |shift: f64| Tensor::randn([16, 8, 4, 4], (Kind::Float, Device::Cpu)) + shift;
        let eval = || discriminator_loss(&head.forward(&batch(1.0)), &head.forward(&batch(-1.0))).double_value(&[]);
        let before = eval();
        for _ in 0..100 {
            opt.zero_grad();
            discriminator_loss(&head.forward(&batch(1.0)), &head.forward(&batch(-1.0))).backward();
            opt.step(1e-2, 0.0).unwrap();
        }
        let after = eval();
        assert!(before > 1.0 && after < 0.2, "loss {before} -> {after}");
    }
}
