//! Distribution Matching Distillation (Yin et al., CVPR 2024) in EDM's parameterisation.
//!
//! Generator: x = G(z, y) = D_G(sigma_max z; sigma_max, y). Per iteration:
//! - distribution matching: t uniform in [t_min, t_max) of a 1000-level Karras schedule,
//!   x_t = x + sigma_t eps, real = D_real(x_t), fake = D_fake(x_t) (no gradient),
//!   w = mean_{CHW} |x - real|, g = (fake - real) / w, loss_DM = 0.5 mean((x - sg(x - g))^2);
//! - regression on ODE pairs: loss_reg = d(G(z_ref), y_ref), weighted (0.25 in the paper);
//! - fake-score update on x detached: sigma over all levels, EDM-weighted denoising loss.
//!
//! DMD2 options: several fake updates per generator update, no regression.

mod losses;
mod options;
mod run;
mod trainer;

use tch::Tensor;

pub use crate::artifact::pairs::Pairs;
use crate::nn::Denoiser;
use crate::nn::gmm::GmmDenoiser;
pub use losses::{dm_gradient, dm_loss, fake_score_loss, regression_loss};
pub use options::{DmdOptions, RegressionLoss};
pub use run::{CHECKPOINT_FILE, DmdHooks, DmdLogRow, DmdSummary, NoHooks, dmd_train, train_dmd};
pub use trainer::{DmdData, DmdNets, DmdTrainer, RealImages};

/// The frozen "real" score: a teacher network, or a closed-form denoiser in tests.
pub trait RealScore {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, labels: Option<&Tensor>) -> Tensor;
}

impl RealScore for Denoiser {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, labels: Option<&Tensor>) -> Tensor {
        self.denoise(x, sigma, labels, false)
    }
}

impl RealScore for GmmDenoiser {
    fn real_denoise(&self, x: &Tensor, sigma: &Tensor, _labels: Option<&Tensor>) -> Tensor {
        self.denoise(x, sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::trainer::pair_batch;
    use super::*;
    use tch::Kind;

    #[test]
    fn dm_gradient_follows_the_formula_and_the_loss_gradient_is_g_over_numel() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5])
            .reshape([2, 2])
            .set_requires_grad(true);
        let real = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0]).reshape([2, 2]);
        let fake = Tensor::from_slice(&[0.5f32, 0.0, 1.0, 1.0]).reshape([2, 2]);
        let g = dm_gradient(&x.detach(), &real, &fake);
        // sample 0: w = (|1-0| + |2-1|)/2 = 1; sample 1: w = (1 + 0.5)/2 = 0.75
        let expect = [0.5f32, -1.0, 1.0 / 0.75, 1.0 / 0.75];
        let got = Vec::<f32>::try_from(g.flatten(0, -1)).unwrap();
        for (a, b) in got.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        let loss = dm_loss(&x, &g);
        loss.backward();
        let grad = Vec::<f32>::try_from(x.grad().flatten(0, -1)).unwrap();
        for (a, b) in grad.iter().zip(expect) {
            assert!((a - b / 4.0).abs() < 1e-6, "{grad:?}");
        }
    }

    #[test]
    fn ranks_slices_of_a_global_pair_batch_make_up_the_one_gpu_batch() {
        let pairs = Pairs {
            z: Tensor::arange(100, (Kind::Float, tch::Device::Cpu)).reshape([100, 1]),
            labels: None,
            x: Tensor::arange(100, (Kind::Float, tch::Device::Cpu)).reshape([100, 1]) * 2.0,
        };
        tch::manual_seed(7);
        let (whole, _, xw) = pair_batch(&pairs, 8, (0, 8));
        // Two ranks, each from the same seed, each keeping its half.
        let halves: Vec<Tensor> = (0..2)
            .map(|r| {
                tch::manual_seed(7);
                pair_batch(&pairs, 8, (r * 4, 4)).0
            })
            .collect();
        assert!(Tensor::cat(&halves, 0).equal(&whole));
        assert!(xw.equal(&(&whole * 2.0)), "z and x rows stay paired");
        assert!(whole.unique_dim(0, false, false, false).0.size()[0] > 1, "a real random batch");
    }

    #[test]
    fn pseudo_huber_is_small_quadratic_and_large_linear() {
        let a = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
        let small = regression_loss(&(&a + 0.001), &a, RegressionLoss::PseudoHuber, None).double_value(&[]);
        assert!((small - ((1e-6f64 + 0.0009).sqrt() - 0.03)).abs() < 1e-7, "{small}");
        let big = regression_loss(&(&a + 10.0), &a, RegressionLoss::PseudoHuber, None).double_value(&[]);
        assert!((big - ((100.0f64 + 0.0009).sqrt() - 0.03)).abs() < 1e-6);
    }
}
