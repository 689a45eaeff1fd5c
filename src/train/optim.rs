//! Adam(W) over a network's trainable variables through torch's fused kernel, and an
//! exponential moving average of weights with a half-life in images (EDM's convention).

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::nn::Denoiser;
use crate::torch_shim;

/// Variables of a network in a fixed (name-sorted) order.
pub fn named_trainables(net: &Denoiser) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = net.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub struct AdamW {
    pub names: Vec<String>,
    pub params: Vec<Tensor>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    pub steps: Vec<Tensor>,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(net: &Denoiser, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        Self::from_varstore(&net.vs, betas, eps, weight_decay)
    }

    /// Over the trainable variables of any variable store, in name order.
    pub fn from_varstore(vs: &tch::nn::VarStore, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, params): (Vec<String>, Vec<Tensor>) = vars.into_iter().unzip();
        let zeros = |p: &Tensor| Tensor::zeros_like(p).set_requires_grad(false);
        let exp_avg = params.iter().map(zeros).collect();
        let exp_avg_sq = params.iter().map(zeros).collect();
        let steps = params.iter().map(|p| Tensor::zeros([], (Kind::Float, p.device()))).collect();
        AdamW {
            names,
            params,
            exp_avg,
            exp_avg_sq,
            steps,
            betas,
            eps,
            weight_decay,
        }
    }

    pub fn zero_grad(&self) {
        torch_shim::clear_grads(&self.params);
    }

    /// Gradients that exist (parameters unused in this step have none).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect()
    }

    /// Sanitises and clips the gradients (`max_norm` <= 0: no clipping), then takes one step.
    /// Returns the gradient norm before clipping (a device scalar) when clipping.
    pub fn step<'a>(&self, lr: impl Into<torch_shim::Lr<'a>>, max_norm: f64) -> Result<Option<Tensor>> {
        let idx: Vec<usize> = (0..self.params.len()).filter(|&i| self.params[i].grad().defined()).collect();
        let pick = |v: &Vec<Tensor>| idx.iter().map(|&i| v[i].shallow_clone()).collect::<Vec<_>>();
        let grads: Vec<Tensor> = idx.iter().map(|&i| self.params[i].grad()).collect();
        // Data parallel: average the gradients over the ranks first (no-op in one process).
        crate::dist::all_reduce_mean(&grads)?;
        let norm = torch_shim::sanitize_and_clip(&grads, max_norm)?;
        let (p, m, v, s) = (pick(&self.params), pick(&self.exp_avg), pick(&self.exp_avg_sq), pick(&self.steps));
        torch_shim::fused_adamw(&p, &grads, &m, &v, &s, lr, self.betas, self.weight_decay, self.eps)?;
        Ok(norm)
    }
}

/// EDM's EMA: half-life `halflife_images`, ramped up to `rampup` * images seen when given.
pub fn ema_beta(batch: usize, images_seen: u64, halflife_images: f64, rampup: Option<f64>) -> f64 {
    let mut h = halflife_images;
    if let Some(r) = rampup {
        h = h.min(images_seen as f64 * r);
    }
    0.5f64.powf(batch as f64 / h.max(1e-8))
}

/// ema <- beta * ema + (1 - beta) * net, over every variable (buffers included).
pub fn ema_update(ema: &Denoiser, net: &Denoiser, beta: f64) -> Result<()> {
    let (e, n) = paired(ema, net);
    torch_shim::foreach_lerp(&e, &n, 1.0 - beta)
}

fn paired(a: &Denoiser, b: &Denoiser) -> (Vec<Tensor>, Vec<Tensor>) {
    let av = a.vs.variables();
    let bv = b.vs.variables();
    let mut names: Vec<&String> = av.keys().collect();
    names.sort();
    names
        .iter()
        .filter(|n| av[**n].is_floating_point())
        .map(|n| (av[*n].shallow_clone(), bv[*n].shallow_clone()))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_half_life_halves_in_half_life_images() {
        let b = ema_beta(500, 10_000_000, 500_000.0, None);
        assert!(
            (b.powf(1000.0) - 0.5).abs() < 1e-9,
            "after 1000 batches of 500 (0.5M images) half remains"
        );
        let ramped = ema_beta(500, 1000, 500_000.0, Some(0.05));
        assert!((ramped - 0.5f64.powf(500.0 / 50.0)).abs() < 1e-12);
    }
}
