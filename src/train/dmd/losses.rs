//! DMD's losses: the distribution-matching gradient and loss, the regression loss on ODE pairs,
//! and the fake score's denoising loss.

use tch::{Kind, Tensor};

use super::RegressionLoss;
use crate::nn::Denoiser;

/// The distribution-matching gradient g = (fake - real) / mean_{non-batch}|x - real|.
pub fn dm_gradient(x: &Tensor, real: &Tensor, fake: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    let w = (x - real).abs().mean_dim(dims.as_slice(), true, Kind::Float);
    (fake - real) / w.clamp_min(1e-12)
}

/// 0.5 mean((x - sg(x - g))^2): its gradient in x is g / numel.
pub fn dm_loss(x: &Tensor, g: &Tensor) -> Tensor {
    let target = (x.detach() - g).detach();
    (x - target).square().mean(Kind::Float) * 0.5
}

pub fn regression_loss(pred: &Tensor, target: &Tensor, kind: RegressionLoss, lpips: Option<&crate::nn::lpips::Lpips>) -> Tensor {
    match kind {
        RegressionLoss::Lpips => lpips
            .expect("LPIPS weights are loaded when regression_loss = \"lpips\"")
            .distance(pred, target)
            .mean(Kind::Float),
        RegressionLoss::L2 => (pred - target).square().mean(Kind::Float),
        RegressionLoss::PseudoHuber => {
            let c = 0.03;
            let dims: Vec<i64> = (1..pred.dim() as i64).collect();
            let mse = (pred - target).square().mean_dim(dims.as_slice(), false, Kind::Float);
            ((mse + c * c).sqrt() - c).mean(Kind::Float)
        }
    }
}

/// EDM-weighted denoising loss of the fake score on generator samples (detached).
pub fn fake_score_loss(fake: &Denoiser, x: &Tensor, labels: Option<&Tensor>, sigma: &Tensor, eps: &Tensor) -> Tensor {
    let sd = fake.config.sigma_data();
    let noisy = x + eps * sigma;
    let pred = fake.denoise(&noisy, sigma, labels, true);
    let lambda = (sigma.square() + sd * sd) / (sigma * sd).square();
    (lambda * (pred - x).square()).mean(Kind::Float)
}
