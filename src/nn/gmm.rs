//! The exact denoiser of a mixture of isotropic Gaussians: for x = y + sigma n with y from the
//! mixture, D(x; sigma) = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)), with
//! responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I).

use tch::{Device, Kind, Tensor};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One component of a 2-D isotropic Gaussian mixture (a `gmm2d` stage's config entry).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gmm2dComponent {
    /// Mixture weight (normalised over all components).
    pub weight: f64,
    pub mean: [f64; 2],
    /// Standard deviation of the isotropic Gaussian.
    pub std: f64,
}

pub struct GmmDenoiser {
    weights: Vec<f64>,
    means: Tensor,
    stds: Vec<f64>,
}

impl GmmDenoiser {
    pub fn new(components: &[Gmm2dComponent], device: Device) -> Self {
        let total: f64 = components.iter().map(|c| c.weight).sum();
        let means: Vec<f32> = components.iter().flat_map(|c| [c.mean[0] as f32, c.mean[1] as f32]).collect();
        GmmDenoiser {
            weights: components.iter().map(|c| c.weight / total).collect(),
            means: Tensor::from_slice(&means).reshape([components.len() as i64, 2]).to_device(device),
            stds: components.iter().map(|c| c.std).collect(),
        }
    }

    /// D(x; sigma) for x [N, 2] and sigma [N] or a scalar.
    pub fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Double);
        let n = x.size()[0];
        let sigma = sigma.to_kind(Kind::Double).reshape([-1, 1]).expand([n, 1], false);
        let k = self.weights.len() as i64;
        let dev = x.device();
        let s2 = Tensor::from_slice(&self.stds.iter().map(|s| s * s).collect::<Vec<_>>())
            .to_device(dev)
            .reshape([1, k]);
        let logw = Tensor::from_slice(&self.weights.iter().map(|w| w.ln()).collect::<Vec<_>>())
            .to_device(dev)
            .reshape([1, k]);
        let var = &s2 + sigma.square(); // [N, K]
        let mu = self.means.to_kind(Kind::Double); // [K, 2]
        let diff = x.unsqueeze(1) - mu.unsqueeze(0); // [N, K, 2]
        let d2 = diff.square().sum_dim_intlist([2i64].as_slice(), false, Kind::Double); // [N, K]
        let logp = logw - d2 / (&var * 2.0) - var.log(); // 2-D Gaussian: -log(2 pi var) + const
        let r = logp.softmax(1, Kind::Double); // [N, K]
        let shrink = (&s2 / &var).unsqueeze(2); // [N, K, 1]
        let post = mu.unsqueeze(0) + shrink * diff; // [N, K, 2]
        (r.unsqueeze(2) * post)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
            .to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_gaussian_denoiser_is_linear_shrinkage() {
        let g = GmmDenoiser::new(
            &[Gmm2dComponent {
                weight: 1.0,
                mean: [1.0, -1.0],
                std: 0.5,
            }],
            Device::Cpu,
        );
        let x = Tensor::from_slice(&[3.0f32, 1.0]).reshape([1, 2]);
        let d = g.denoise(&x, &Tensor::from(1.0f32));
        let v = Vec::<f32>::try_from(d.flatten(0, -1)).unwrap();
        // mu + 0.25 / 1.25 (x - mu) = (1, -1) + 0.2 (2, 2)
        assert!((v[0] - 1.4).abs() < 1e-6 && (v[1] + 0.6).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn matches_the_posterior_mean_by_monte_carlo() {
        // E[y | x] by importance weights over many mixture samples.
        let comps = [
            Gmm2dComponent {
                weight: 1.0,
                mean: [2.0, 0.0],
                std: 0.3,
            },
            Gmm2dComponent {
                weight: 3.0,
                mean: [-1.0, 1.0],
                std: 0.6,
            },
        ];
        let g = GmmDenoiser::new(&comps, Device::Cpu);
        // Monte-Carlo reference from samples of the mixture (drawn here: nn knows no stages).
        let ys = {
            use rand::{Rng, SeedableRng};
            use rand_distr::{Distribution, StandardNormal};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let total: f64 = comps.iter().map(|c| c.weight).sum();
            (0..400_000)
                .map(|_| {
                    let mut u = rng.random::<f64>() * total;
                    let c = comps.iter().find(|c| {
                        u -= c.weight;
                        u <= 0.0
                    });
                    let c = c.unwrap_or(&comps[comps.len() - 1]);
                    let (a, b): (f64, f64) = (StandardNormal.sample(&mut rng), StandardNormal.sample(&mut rng));
                    [(c.mean[0] + c.std * a) as f32, (c.mean[1] + c.std * b) as f32]
                })
                .collect::<Vec<[f32; 2]>>()
        };
        let sigma = 0.8f64;
        let x0 = [0.5f64, 0.4];
        let (mut num, mut den) = ([0.0f64; 2], 0.0f64);
        for p in &ys {
            let d2 = (x0[0] - p[0] as f64).powi(2) + (x0[1] - p[1] as f64).powi(2);
            let w = (-d2 / (2.0 * sigma * sigma)).exp();
            num[0] += w * p[0] as f64;
            num[1] += w * p[1] as f64;
            den += w;
        }
        let mc = [num[0] / den, num[1] / den];
        let d = g.denoise(
            &Tensor::from_slice(&[x0[0] as f32, x0[1] as f32]).reshape([1, 2]),
            &Tensor::from(sigma as f32),
        );
        let v = Vec::<f32>::try_from(d.flatten(0, -1)).unwrap();
        assert!(
            (v[0] as f64 - mc[0]).abs() < 0.01 && (v[1] as f64 - mc[1]).abs() < 0.01,
            "{v:?} vs {mc:?}"
        );
    }
}
