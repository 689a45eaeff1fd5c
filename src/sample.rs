//! EDM's deterministic samplers: Heun (2nd order) and Euler on the probability-flow ODE with the
//! Karras et al. noise schedule. The ODE state is kept in f64; the network runs in f32 or bf16.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::nn::Denoiser;

fn d_steps() -> usize {
    18
}
fn d_smin() -> f64 {
    0.002
}
fn d_smax() -> f64 {
    80.0
}
fn d_rho() -> f64 {
    7.0
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// 2nd order: 2 * steps - 1 network calls (35 for 18 steps).
    #[default]
    Heun,
    /// 1st order: `steps` network calls.
    Euler,
    /// One denoiser call at sigma_max: x = D(sigma_max z; sigma_max) (a DMD generator, or a
    /// teacher used as a one-step generator).
    OneStep,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    #[serde(default)]
    pub solver: Solver,
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_smin")]
    pub sigma_min: f64,
    #[serde(default = "d_smax")]
    pub sigma_max: f64,
    #[serde(default = "d_rho")]
    pub rho: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            solver: Solver::Heun,
            steps: 18,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
        }
    }
}

impl SamplerConfig {
    /// Checks the schedule before any sampling (`steps = 0` gave all-zero samples).
    pub fn check(&self) -> Result<(), String> {
        if self.solver != Solver::OneStep && !(1..=100_000).contains(&self.steps) {
            return Err(format!("sampler.steps must be in 1..=100000 (got {})", self.steps));
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min) {
            return Err(format!(
                "sampler needs 0 < sigma_min < sigma_max (got {} and {})",
                self.sigma_min, self.sigma_max
            ));
        }
        if !(self.rho > 0.0) {
            return Err(format!("sampler.rho must be positive (got {})", self.rho));
        }
        Ok(())
    }

    pub fn network_calls(&self) -> usize {
        match self.solver {
            Solver::Heun => 2 * self.steps - 1,
            Solver::Euler => self.steps,
            Solver::OneStep => 1,
        }
    }
}

/// The Karras schedule: `n` levels from sigma_max down to sigma_min, then 0.
pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    let mut s: Vec<f64> = (0..n).map(|i| (a + i as f64 / (n.max(2) - 1) as f64 * (b - a)).powf(rho)).collect();
    if n == 1 {
        s[0] = sigma_max;
    }
    s.push(0.0);
    s
}

/// Runs the sampler from `latents` (standard normal, [N, C, H, W]); returns f32 images in about
/// [-1, 1]. `class_labels` are one-hot [N, label_dim] or None.
pub fn sample(net: &Denoiser, latents: &Tensor, class_labels: Option<&Tensor>, cfg: &SamplerConfig) -> Tensor {
    if cfg.solver == Solver::OneStep {
        return tch::no_grad(|| {
            let s = Tensor::from(cfg.sigma_max as f32).to_device(latents.device());
            net.denoise(&(latents * cfg.sigma_max), &s, class_labels, false)
        });
    }
    tch::no_grad(|| {
        let t = karras_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho);
        let dev = latents.device();
        let den = |x: &Tensor, s: f64| {
            net.denoise(x, &Tensor::from(s).to_device(dev), class_labels, false)
                .to_kind(Kind::Double)
        };
        let mut x = latents.to_kind(Kind::Double) * t[0];
        for i in 0..cfg.steps {
            let (t_cur, t_next) = (t[i], t[i + 1]);
            let d_cur = (&x - den(&x, t_cur)) / t_cur;
            let x_next = &x + &d_cur * (t_next - t_cur);
            x = if cfg.solver == Solver::Heun && i < cfg.steps - 1 {
                let d_prime = (&x_next - den(&x_next, t_next)) / t_next;
                &x + (d_cur * 0.5 + d_prime * 0.5) * (t_next - t_cur)
            } else {
                x_next
            };
        }
        x.to_kind(Kind::Float)
    })
}

/// Standard-normal latents for image `i` from `seed + i`: any single image can be regenerated.
pub fn seeded_latents(seeds: &[u64], shape: [i64; 3], device: tch::Device) -> Tensor {
    let per = (shape[0] * shape[1] * shape[2]) as usize;
    let mut data = vec![0f32; per * seeds.len()];
    // Each image's stream depends on its seed alone, so the images are filled in parallel
    // (a 50k-sample FID draws 154M normals: ~12 s on one core).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len().max(1));
    let per_thread = seeds.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (out, seeds) in data.chunks_mut(per * per_thread).zip(seeds.chunks(per_thread)) {
            scope.spawn(move || {
                for (img, &s) in out.chunks_mut(per).zip(seeds) {
                    fill_seeded_normal(img, s);
                }
            });
        }
    });
    Tensor::from_slice(&data)
        .reshape([seeds.len() as i64, shape[0], shape[1], shape[2]])
        .to_device(device)
}

fn fill_seeded_normal(out: &mut [f32], seed: u64) {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for v in out {
        *v = rand_distr::StandardNormal.sample(&mut rng);
    }
}

/// One-hot labels [N, dim] on `device`.
pub fn one_hot(labels: &[i64], dim: i64, device: tch::Device) -> Tensor {
    Tensor::from_slice(labels).one_hot(dim).to_kind(Kind::Float).to_device(device)
}

/// f32 images in [-1, 1] (NCHW) to uint8 NHWC bytes: clamp, then round((x + 1) * 127.5).
pub fn to_uint8_nhwc(x: &Tensor) -> Vec<u8> {
    let u = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu);
    let n = u.numel();
    let mut out = vec![0u8; n];
    u.copy_data(&mut out, n);
    out
}

/// A grid of samples: one row per class (labelled) for a conditional network, `columns`
/// images per row, latents from seeds `seed + row * columns + col`, so the same grid can be
/// compared across runs. `generate` maps (latents, one-hot labels) to images in [-1, 1].
pub fn class_grid(
    res: i64,
    channels: i64,
    label_dim: i64,
    class_names: &[String],
    columns: usize,
    seed: u64,
    device: tch::Device,
    generate: impl Fn(&Tensor, Option<&Tensor>) -> Tensor,
) -> crate::render::Canvas {
    let rows = if class_names.is_empty() { columns } else { class_names.len() };
    let n = rows * columns;
    let seeds: Vec<u64> = (0..n as u64).map(|i| seed + i).collect();
    let mut bytes = Vec::with_capacity(n * (res * res * channels) as usize);
    for chunk in seeds.chunks(256) {
        let z = seeded_latents(chunk, [channels, res, res], device);
        let labels = (label_dim > 0).then(|| {
            let l: Vec<i64> = chunk.iter().map(|s| ((s - seed) as usize / columns) as i64).collect();
            one_hot(&l, label_dim, device)
        });
        bytes.extend(to_uint8_nhwc(&tch::no_grad(|| generate(&z, labels.as_ref()))));
    }
    let labels = (!class_names.is_empty()).then_some(class_names);
    crate::render::image_grid(&bytes, res as usize, res as usize, rows, columns, labels)
}

/// Standard-normal latents of any sample shape, one seed per sample.
pub fn latents(seeds: &[u64], shape: &[i64], device: Device) -> Tensor {
    let flat: i64 = shape.iter().product();
    let z = seeded_latents(seeds, [1, 1, flat], device);
    let mut full = vec![seeds.len() as i64];
    full.extend(shape);
    z.reshape(full.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_schedule_endpoints_and_monotone() {
        let s = karras_sigmas(18, 0.002, 80.0, 7.0);
        assert_eq!(s.len(), 19);
        assert!((s[0] - 80.0).abs() < 1e-9 && (s[17] - 0.002).abs() < 1e-12 && s[18] == 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn seeded_latents_depend_only_on_the_seed() {
        let a = seeded_latents(&[5, 6], [3, 4, 4], tch::Device::Cpu);
        let b = seeded_latents(&[6], [3, 4, 4], tch::Device::Cpu);
        assert!(a.get(1).equal(&b.get(0)));
        assert!(!a.get(0).equal(&b.get(0)));
    }

    #[test]
    fn parallel_latents_equal_one_seed_at_a_time() {
        // 41 seeds: more than the threads of most machines and not a multiple of them.
        let seeds: Vec<u64> = (100..141).collect();
        let all = seeded_latents(&seeds, [2, 3, 3], tch::Device::Cpu);
        for (i, &s) in seeds.iter().enumerate() {
            let mut expect = vec![0f32; 18];
            fill_seeded_normal(&mut expect, s);
            let got = Vec::<f32>::try_from(all.get(i as i64).flatten(0, -1)).unwrap();
            assert_eq!(got, expect, "seed {s}");
        }
    }
}
