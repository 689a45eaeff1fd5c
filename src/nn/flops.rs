//! Counting the multiply-accumulates of a forward pass (convolutions, linear layers, attention),
//! for achieved TFLOP/s in `bench gpu`. Thread-local: a count sees only its own thread's layers.

use std::cell::Cell;

thread_local! {
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Adds `macs` when counting is on in this thread.
pub fn add(macs: u64) {
    MACS.with(|m| {
        if let Some(v) = m.get() {
            m.set(Some(v + macs));
        }
    });
}

/// Whether counting is on in this thread (layers skip computing their count otherwise).
pub fn counting() -> bool {
    MACS.with(|m| m.get().is_some())
}

/// Runs `f` with counting on and returns the multiply-accumulates it performed.
pub fn count_macs(f: impl FnOnce()) -> u64 {
    MACS.with(|m| m.set(Some(0)));
    f();
    MACS.with(|m| m.replace(None)).unwrap_or(0)
}

/// FLOPs (2 per multiply-accumulate) of one forward pass of `config` for one image.
pub fn forward_flops(config: &super::NetworkConfig) -> f64 {
    let net = super::Denoiser::new(config, tch::Device::Cpu);
    let mut shape = vec![1i64];
    shape.extend(config.sample_shape());
    let x = tch::Tensor::randn(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu));
    let sigma = tch::Tensor::from(1.0f32);
    let labels = (config.label_dim() > 0).then(|| tch::Tensor::zeros([1, config.label_dim()], (tch::Kind::Float, tch::Device::Cpu)));
    2.0 * count_macs(|| {
        let _ = tch::no_grad(|| net.denoise(&x, &sigma, labels.as_ref(), false));
    }) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::{Conv2d, ConvSpec, Init, InitMode, Linear};
    use tch::{Device, Kind, Tensor, nn::VarStore};

    #[test]
    fn convolutions_and_linear_layers_count_their_multiply_accumulates() {
        let vs = VarStore::new(Device::Cpu);
        let init = Init::new(InitMode::KaimingNormal, 1.0, 0.0);
        let conv = Conv2d::new(&(vs.root() / "c"), 4, 8, ConvSpec::default(), init);
        let lin = Linear::new(&(vs.root() / "l"), 6, 3, true, init);
        let x = Tensor::randn([2, 4, 5, 5], (Kind::Float, Device::Cpu));
        assert_eq!(count_macs(|| drop(conv.forward(&x))), 2 * 8 * 25 * 4 * 9);
        let y = Tensor::randn([7, 6], (Kind::Float, Device::Cpu));
        assert_eq!(count_macs(|| drop(lin.forward(&y))), 7 * 6 * 3);
        assert_eq!(count_macs(|| ()), 0);
        assert!(!counting());
        add(5); // not counting: ignored
        assert_eq!(count_macs(|| add(5)), 5);
    }

    #[test]
    fn the_edm_cifar10_network_costs_what_its_layers_say() {
        let cfg: crate::nn::NetworkConfig = serde_json::from_value(serde_json::json!({ "arch": "ddpmpp" })).unwrap();
        let f = forward_flops(&cfg);
        // By hand, the 32x32 level alone: 8 encoder 3x3 256->256 convolutions and 5 decoder
        // blocks of (512->256, 256->256) = 23 such convolutions x 1024 px x 590k MACs = 13.9G
        // MACs; 16x16 and 8x8 add a third, resampling blocks and attention a little: ~40 GFLOPs.
        eprintln!("forward GFLOPs {}", f / 1e9);
        assert!(f > 35e9 && f < 50e9, "{f}");
    }
}
