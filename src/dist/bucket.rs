//! Gradient buckets: consecutive gradients packed into flat buffers of at most `cap` bytes, so
//! that an all-reduce moves a few large messages instead of hundreds of small ones.

use std::ops::Range;

use anyhow::Result;
use tch::{Kind, Tensor};

/// PyTorch DDP's default bucket size.
pub const DEFAULT_CAP_BYTES: usize = 25 << 20;

/// Splits tensors of `numels` (4-byte elements) into consecutive ranges of at most `cap_bytes`
/// (a tensor larger than the cap gets a bucket of its own).
pub fn plan(numels: &[usize], cap_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &n) in numels.iter().enumerate() {
        let b = n * 4;
        if i > start && bytes + b > cap_bytes {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < numels.len() {
        out.push(start..numels.len());
    }
    out
}

/// Packs each bucket of `grads` into one f32 buffer, applies `reduce` to it in place, and
/// copies the result back into the gradients.
pub fn reduce_in_buckets(grads: &[Tensor], cap_bytes: usize, mut reduce: impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
    let numels: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
    for r in plan(&numels, cap_bytes) {
        let views: Vec<Tensor> = grads[r.clone()].iter().map(|g| g.to_kind(Kind::Float).reshape([-1])).collect();
        let flat = Tensor::cat(&views, 0);
        reduce(&flat)?;
        let sizes: Vec<i64> = numels[r.clone()].iter().map(|&n| n as i64).collect();
        let parts: Vec<Tensor> = grads[r.clone()]
            .iter()
            .zip(flat.split_with_sizes(sizes.as_slice(), 0))
            .map(|(g, part)| part.view_as(g))
            .collect();
        // One foreach launch, not a copy kernel per tensor (hundreds per optimiser step, each a
        // node of the captured DMD graph); the tensors may be parameters, as in a broadcast.
        crate::torch_shim::foreach_copy(&grads[r], &parts)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_the_cap_and_cover_everything_in_order() {
        assert_eq!(plan(&[10, 10, 10], 80), vec![0..2, 2..3]);
        assert_eq!(plan(&[100, 1, 1], 80), vec![0..1, 1..3], "an oversized tensor is alone");
        assert_eq!(plan(&[], 80), Vec::<Range<usize>>::new());
        let sizes: Vec<usize> = (1..200).map(|i| (i * 37) % 1000 + 1).collect();
        let p = plan(&sizes, 4000);
        assert_eq!(p.first().unwrap().start, 0);
        assert_eq!(p.last().unwrap().end, sizes.len());
        for w in p.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in &p {
            let bytes: usize = sizes[r.clone()].iter().sum::<usize>() * 4;
            assert!(bytes <= 4000 || r.len() == 1);
        }
    }

    #[test]
    fn parameters_that_require_grad_can_be_written_back() {
        let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        reduce_in_buckets(&[p.shallow_clone()], DEFAULT_CAP_BYTES, |flat| {
            let _ = flat.shallow_clone().fill_(2.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(&p.detach()).unwrap(), vec![2.0; 3]);
    }

    #[test]
    fn reducing_in_buckets_reaches_every_gradient_once() {
        let grads: Vec<Tensor> = [vec![3, 4], vec![5], vec![2, 2, 2]]
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, tch::Device::Cpu)))
            .collect();
        let before: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect();
        let mut calls = 0;
        // A stand-in for an all-reduce with mean over two identical ranks plus a visible change.
        reduce_in_buckets(&grads, 40, |flat| {
            calls += 1;
            let _ = flat.shallow_clone().g_mul_scalar_(3.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 3, "12, 5 and 8 floats with a 40-byte cap: three buckets");
        for (g, b) in grads.iter().zip(&before) {
            assert!((g - b * 3.0).abs().max().double_value(&[]) < 1e-6);
        }
    }
}
