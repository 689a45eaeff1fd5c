//! dmdpipe's fused GroupNorm kernels (NVRTC, src/shim/kernels/group_norm.cu) against float64
//! references and against the eager libtorch path, on a CUDA device. Without one every test
//! prints a notice and passes (CI has no GPU); `DMDPIPE_REQUIRE_CUDA=1` makes that a failure.
//! The errors are printed (run with `--nocapture`), for docs/RESULTS.md.

#![allow(clippy::assign_op_pattern)] // `a = a + b` on tensors: `+=` would be an in-place add

use dmdpipe::nn::layers::{GroupNorm, NormMode};
use dmdpipe::nn::{Denoiser, NetworkConfig};
use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if dmdpipe::torch_shim::init_cuda() {
        return Some(Device::Cuda(0));
    }
    assert!(
        std::env::var("DMDPIPE_REQUIRE_CUDA").map_or(true, |v| v != "1"),
        "DMDPIPE_REQUIRE_CUDA=1 but no CUDA device"
    );
    eprintln!("notice: no CUDA device; the fused-kernel tests ran nothing");
    None
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// ||a - b|| / ||b|| in float64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

struct Case {
    n: i64,
    c: i64,
    h: i64,
    kind: Kind,
    /// 0: no shift, 1: [N, C, 1, 1], 2: [1, C, 1, 1]
    shift: u8,
    silu: bool,
}

/// float64 reference of act(group_norm(x + shift)) and its gradients for upstream gradient g.
fn reference(x: &Tensor, shift: Option<&Tensor>, w: &Tensor, b: &Tensor, groups: i64, silu: bool, g: &Tensor) -> Vec<Tensor> {
    let x = x.to_kind(Kind::Double).detach().set_requires_grad(true);
    let s = shift.map(|s| s.to_kind(Kind::Double).detach().set_requires_grad(true));
    let w = w.to_kind(Kind::Double).detach().set_requires_grad(true);
    let b = b.to_kind(Kind::Double).detach().set_requires_grad(true);
    let u = match &s {
        Some(s) => &x + s,
        None => x.shallow_clone(),
    };
    let mut y = u.group_norm(groups, Some(&w), Some(&b), 1e-6, false);
    if silu {
        y = y.silu();
    }
    (&y * g.to_kind(Kind::Double)).sum(Kind::Double).backward();
    let ds = s
        .as_ref()
        .map_or_else(|| Tensor::zeros([1], (Kind::Double, x.device())), |s| s.grad());
    vec![y.detach(), x.grad(), ds, w.grad(), b.grad()]
}

/// The layer's output and gradients (x, shift, weight, bias) for upstream gradient g.
fn layer_run(norm: &GroupNorm, x: &Tensor, shift: Option<&Tensor>, silu: bool, g: &Tensor) -> Vec<Tensor> {
    let x = x.detach().set_requires_grad(true);
    let s = shift.map(|s| s.detach().set_requires_grad(true));
    for p in [&norm.weight, &norm.bias] {
        let mut grad = p.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
    let y = norm.forward_act(&x, s.as_ref(), silu);
    (&y.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
    let ds = s
        .as_ref()
        .map_or_else(|| Tensor::zeros([1], (Kind::Float, x.device())), |s| s.grad());
    vec![y.detach(), x.grad(), ds, norm.weight.grad().copy(), norm.bias.grad().copy()]
}

#[test]
fn fused_group_norm_matches_float64_and_is_no_worse_than_eager() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(0);
    let cases = [
        Case {
            n: 8,
            c: 256,
            h: 32,
            kind: Kind::BFloat16,
            shift: 1,
            silu: true,
        },
        Case {
            n: 8,
            c: 256,
            h: 32,
            kind: Kind::BFloat16,
            shift: 0,
            silu: true,
        },
        Case {
            n: 56,
            c: 256,
            h: 8,
            kind: Kind::BFloat16,
            shift: 1,
            silu: true,
        },
        Case {
            n: 5,
            c: 128,
            h: 16,
            kind: Kind::BFloat16,
            shift: 2,
            silu: false,
        },
        Case {
            n: 3,
            c: 192,
            h: 8,
            kind: Kind::BFloat16,
            shift: 1,
            silu: true,
        },
        Case {
            n: 2,
            c: 768,
            h: 4,
            kind: Kind::BFloat16,
            shift: 0,
            silu: true,
        },
        Case {
            n: 4,
            c: 64,
            h: 16,
            kind: Kind::Float,
            shift: 1,
            silu: true,
        },
        Case {
            n: 3,
            c: 96,
            h: 5,
            kind: Kind::Float,
            shift: 0,
            silu: false,
        },
    ];
    let names = ["y", "dx", "dshift", "dweight", "dbias"];
    for case in &cases {
        let vs = tch::nn::VarStore::new(dev);
        let fused = GroupNorm::new(
            &(vs.root() / "f"),
            case.c,
            1e-6,
            NormMode {
                bf16_native: true,
                fused: true,
            },
        );
        let eager = GroupNorm::new(&(vs.root() / "e"), case.c, 1e-6, NormMode::EAGER_BF16);
        tch::no_grad(|| {
            let w = Tensor::rand([case.c], (Kind::Float, dev)) + 0.5;
            let b = Tensor::randn([case.c], (Kind::Float, dev)) * 0.5;
            for n in [&fused, &eager] {
                n.weight.shallow_clone().copy_(&w);
                n.bias.shallow_clone().copy_(&b);
            }
        });
        let groups = 32.min(case.c / 4);
        // Offsets far from zero test the statistics' numerics as well as their arithmetic.
        let x = (Tensor::randn([case.n, case.c, case.h, case.h], (Kind::Float, dev)) * 2.0 + 3.0).to_kind(case.kind);
        let x = dmdpipe::torch_shim::channels_last(&x).unwrap();
        let shift = match case.shift {
            1 => Some(Tensor::randn([case.n, case.c, 1, 1], (Kind::Float, dev)).to_kind(case.kind)),
            2 => Some(Tensor::randn([1, case.c, 1, 1], (Kind::Float, dev)).to_kind(case.kind)),
            _ => None,
        };
        let g = Tensor::randn([case.n, case.c, case.h, case.h], (Kind::Float, dev)).to_kind(case.kind);
        let r = reference(&x, shift.as_ref(), &fused.weight, &fused.bias, groups, case.silu, &g);
        let f = layer_run(&fused, &x, shift.as_ref(), case.silu, &g);
        let e = layer_run(&eager, &x, shift.as_ref(), case.silu, &g);
        assert_eq!(f[0].stride()[1], 1, "the output stays channels-last");
        assert_eq!(f[0].kind(), case.kind);
        let label = format!(
            "N{} C{} {}x{} {:?} shift{} silu={}",
            case.n, case.c, case.h, case.h, case.kind, case.shift, case.silu
        );
        for (i, name) in names.iter().enumerate() {
            if name == &"dshift" && case.shift == 0 {
                continue;
            }
            let (fe, ee) = (rel(&f[i], &r[i]), rel(&e[i], &r[i]));
            let fmax = max_abs(&(f[i].to_kind(Kind::Double) - &r[i]));
            println!("{label}: {name}: fused rel {fe:.2e} (max abs {fmax:.2e}), eager rel {ee:.2e}");
            // bf16 keeps 8 bits: relative error per element up to 2^-9. fp32: the reference's
            // own float rounding. The fused path computes in fp32 and rounds once, so it must
            // not be worse than the eager one (which rounds between the norm and the SiLU).
            let bound = if case.kind == Kind::BFloat16 { 8e-3 } else { 2e-5 };
            assert!(fe < bound, "{label}: {name}: relative error {fe} >= {bound}");
            assert!(fe <= ee * 1.5 + 1e-6, "{label}: {name}: fused {fe} much worse than eager {ee}");
        }
        if case.kind == Kind::BFloat16 {
            // The forward output: every element within one bf16 rounding of the float64 value.
            let ulp = r[0].abs().clamp_min(1e-3) * 2f64.powi(-8);
            let over = (f[0].to_kind(Kind::Double) - &r[0])
                .abs()
                .gt_tensor(&ulp)
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(over, 0, "{label}: {over} outputs off by more than one bf16 step");
        }
    }
}

#[test]
fn fused_group_norm_is_deterministic_and_leaves_nchw_to_eager() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(1);
    let vs = tch::nn::VarStore::new(dev);
    let norm = GroupNorm::new(
        &vs.root(),
        256,
        1e-6,
        NormMode {
            bf16_native: true,
            fused: true,
        },
    );
    let x = dmdpipe::torch_shim::channels_last(&Tensor::randn([16, 256, 16, 16], (Kind::BFloat16, dev))).unwrap();
    let g = Tensor::randn([16, 256, 16, 16], (Kind::BFloat16, dev));
    let a = layer_run(&norm, &x, None, true, &g);
    let b = layer_run(&norm, &x, None, true, &g);
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!(p.equal(q), "output {i} differs between two identical calls");
    }
    // An NCHW tensor takes the eager path, which (rounding between norm and SiLU) differs.
    let y_nchw = tch::no_grad(|| norm.forward_act(&x.contiguous(), None, true));
    assert!(!y_nchw.equal(&a[0].contiguous()), "NCHW input should run the eager ops");
    let d = rel(&y_nchw, &a[0]);
    assert!(d < 1e-2, "eager and fused disagree by {d}");
}

/// ADM's adaptive scale, `silu(shift + group_norm(x + pre) * (scale + 1))`, through the layer
/// with the fused kernels (per-sample weight and bias) and with eager ops, against float64:
/// the output and the gradients of x, pre, scale, shift, gamma and beta.
#[test]
fn modulated_group_norm_matches_float64_and_is_no_worse_than_eager() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(7);
    let (n, c, h, groups) = (6i64, 192i64, 16i64, 32i64);
    let vs = tch::nn::VarStore::new(dev);
    let layer = |name: &str, fused: bool| GroupNorm::new(&(vs.root() / name), c, 1e-6, NormMode { bf16_native: true, fused });
    let (fused, eager) = (layer("fused", true), layer("eager", false));
    let gamma = Tensor::randn([c], (Kind::Float, dev)) * 0.5 + 1.0;
    let beta = Tensor::randn([c], (Kind::Float, dev)) * 0.5;
    tch::no_grad(|| {
        for norm in [&fused, &eager] {
            norm.weight.shallow_clone().copy_(&gamma);
            norm.bias.shallow_clone().copy_(&beta);
        }
    });
    let x = dmdpipe::torch_shim::channels_last(&(Tensor::randn([n, c, h, h], (Kind::Float, dev)) * 2.0 + 3.0)).unwrap();
    let x = x.to_kind(Kind::BFloat16);
    let small = |size: &[i64]| (Tensor::randn(size, (Kind::Float, dev)) * 0.3).to_kind(Kind::BFloat16);
    let (pre, scale, shift) = (small(&[1, c, 1, 1]), small(&[n, c, 1, 1]), small(&[n, c, 1, 1]));
    let g = Tensor::randn([n, c, h, h], (Kind::Float, dev));
    let leaf = |t: &Tensor, kind: Kind| t.to_kind(kind).detach().set_requires_grad(true);
    let reference = || {
        let d = Kind::Double;
        let (x, pre, scale, shift, w, b) = (
            leaf(&x, d),
            leaf(&pre, d),
            leaf(&scale, d),
            leaf(&shift, d),
            leaf(&gamma, d),
            leaf(&beta, d),
        );
        let y = (&shift + (&x + &pre).group_norm(groups, Some(&w), Some(&b), 1e-6, false) * (&scale + 1.0)).silu();
        (&y * g.to_kind(d)).sum(d).backward();
        vec![y.detach(), x.grad(), pre.grad(), scale.grad(), shift.grad(), w.grad(), b.grad()]
    };
    let run = |norm: &GroupNorm| {
        let bf = Kind::BFloat16;
        let (x, pre, scale, shift) = (leaf(&x, bf), leaf(&pre, bf), leaf(&scale, bf), leaf(&shift, bf));
        let y = norm.forward_modulated(&x, Some(&pre), &scale, &shift);
        (&y.to_kind(Kind::Float) * &g).sum(Kind::Float).backward();
        let (dw, db) = (norm.weight.grad().copy(), norm.bias.grad().copy());
        vec![y.detach(), x.grad(), pre.grad(), scale.grad(), shift.grad(), dw, db]
    };
    let (r, f, e) = (reference(), run(&fused), run(&eager));
    assert!(!f[0].equal(&e[0]), "the fused kernels did not run");
    let names = ["output", "dx", "dpre", "dscale", "dshift", "dgamma", "dbeta"];
    for (i, what) in names.iter().enumerate() {
        let (fe, ee) = (rel(&f[i], &r[i]), rel(&e[i], &r[i]));
        println!("modulated GroupNorm N{n} C{c} {h}x{h} bf16: {what}: fused rel {fe:.2e}, eager rel {ee:.2e}");
        assert!(fe <= ee * 1.5 + 1e-4 && fe < 2e-2, "{what}: fused {fe} vs eager {ee}");
    }
}

fn small_net(fused: bool) -> NetworkConfig {
    let v = serde_json::json!({"arch": "ddpmpp", "img_resolution": 16, "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
        "attn_resolutions": [8], "augment_dim": 0, "dropout": 0.0, "fused_kernels": fused});
    serde_json::from_value(v).unwrap()
}

/// A small ADM (ImageNet's network: adaptive scale, 64 channels per attention head, so two heads
/// at 8x8 and one at 16x16), 10 classes.
fn small_adm(fused: bool) -> NetworkConfig {
    let v = serde_json::json!({"arch": "adm", "img_resolution": 16, "label_dim": 10, "model_channels": 64, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [16, 8], "dropout": 0.0, "fused_kernels": fused});
    serde_json::from_value(v).unwrap()
}

/// All gradients of a network's trainable parameters as one float64 vector (sorted by name).
fn flat_grads(net: &Denoiser) -> Tensor {
    let mut vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let grad = |v: &Tensor| {
        let g = v.grad();
        if g.defined() {
            g.to_kind(Kind::Double).reshape([-1])
        } else {
            v.zeros_like().to_kind(Kind::Double).reshape([-1])
        }
    };
    Tensor::cat(&vars.iter().map(|(_, v)| grad(v)).collect::<Vec<_>>(), 0)
}

#[test]
fn a_network_with_fused_kernels_is_as_close_to_fp32_as_the_eager_one_and_captures_as_a_graph() {
    let Some(dev) = cuda() else { return };
    for (name, config) in [("DDPM++", small_net as fn(bool) -> NetworkConfig), ("ADM", small_adm)] {
        fused_network_against_fp32_and_eager(dev, name, config);
    }
}

fn fused_network_against_fp32_and_eager(dev: Device, name: &str, small_net: fn(bool) -> NetworkConfig) {
    tch::manual_seed(2);
    let fused = Denoiser::new(&small_net(true), dev);
    // EDM zero-initialises the output layers, which would hide the network behind the skip path.
    tch::no_grad(|| {
        for v in fused.vs.trainable_variables() {
            let _ = v.shallow_clone().g_add_(&(v.randn_like() * 0.05));
        }
    });
    let mut eager = Denoiser::new(&small_net(false), dev);
    eager.copy_from(&fused).unwrap();
    let mut fp32 = Denoiser::new(&small_net(false), dev);
    fp32.copy_from(&fused).unwrap();
    let x = Tensor::randn([6, 3, 16, 16], (Kind::Float, dev));
    let sigma = Tensor::from_slice(&[0.1f32, 0.5, 1.0, 2.0, 10.0, 80.0])
        .to_device(dev)
        .reshape([-1, 1, 1, 1]);
    let labels = Tensor::eye(10, (Kind::Float, dev)).narrow(0, 0, 6);
    let run = |net: &Denoiser, bf16: bool| {
        let _ac = dmdpipe::torch_shim::AutocastBf16::new(bf16).unwrap();
        let x = x.detach().set_requires_grad(true);
        let d = net.denoise(&x, &sigma, Some(&labels), true);
        (&d - &x).square().sum(Kind::Float).backward();
        (d.detach(), x.grad(), flat_grads(net))
    };
    let f = run(&fused, true);
    let e = run(&eager, true);
    let r = run(&fp32, false);
    assert!(f.0.is_contiguous(), "the denoiser returns NCHW");
    let errs = [
        (rel(&f.0, &r.0), rel(&e.0, &r.0)),
        (rel(&f.1, &r.1), rel(&e.1, &r.1)),
        (rel(&f.2, &r.2), rel(&e.2, &r.2)),
    ];
    for ((fe, ee), what) in errs.iter().zip(["denoised", "input gradient", "parameter gradients"]) {
        println!("small {name} bf16 against fp32: {what}: fused rel {fe:.2e}, eager rel {ee:.2e}");
        assert!(*fe <= ee * 1.5 + 1e-4, "{name}, {what}: fused {fe} vs eager {ee}");
    }
    // The fused path ran: the two bf16 networks differ by rounding.
    assert!(!f.0.equal(&e.0), "{name}: the fused network gave the eager network's exact output");
    // Captured and replayed, the fused kernels give what they give eagerly.
    use dmdpipe::cuda_graph::{CudaGraph, SideStream};
    let _side = SideStream::enter().unwrap();
    let sample = || -> anyhow::Result<Tensor> {
        let _ac = dmdpipe::torch_shim::AutocastBf16::new(true)?;
        Ok(tch::no_grad(|| fused.denoise(&x, &sigma, Some(&labels), false)))
    };
    let eager_out = sample().unwrap();
    let (graph, out) = CudaGraph::capture(sample).unwrap();
    graph.replay().unwrap();
    assert!(out.equal(&eager_out), "{name}: graph replay differs from the eager call");
}

#[test]
fn fused_residual_sum_matches_float64_with_separate_bias_gradients() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(3);
    for (kind, c, biases) in [
        (Kind::BFloat16, 256, 2),
        (Kind::BFloat16, 192, 1),
        (Kind::Float, 64, 0),
        (Kind::BFloat16, 6, 2),
    ] {
        let shape = [4, c, 8, 8];
        let mk = || dmdpipe::torch_shim::channels_last(&Tensor::randn(shape, (Kind::Float, dev)).to_kind(kind)).unwrap();
        let (a, b, g) = (mk().set_requires_grad(true), mk().set_requires_grad(true), mk());
        let ba = (biases >= 1).then(|| Tensor::randn([c], (Kind::Float, dev)).set_requires_grad(true));
        let bb = (biases >= 2).then(|| Tensor::randn([c], (Kind::Float, dev)).set_requires_grad(true));
        let scale = 0.5f64.sqrt();
        let y = dmdpipe::fused_kernels::skip_sum(&a, &b, ba.as_ref(), bb.as_ref(), scale)
            .unwrap()
            .expect("applies");
        (&y.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let mut reference = d(&a) + d(&b);
        for bias in [&ba, &bb].into_iter().flatten() {
            reference = reference + d(bias).reshape([1, -1, 1, 1]);
        }
        let reference = reference * scale;
        let label = format!("{kind:?} C{c} biases {biases}");
        let e = rel(&y, &reference);
        println!("residual sum {label}: rel {e:.2e}");
        assert!(e < if kind == Kind::Float { 1e-6 } else { 4e-3 }, "{label}: {e}");
        let gd = d(&g) * scale;
        assert!(rel(&a.grad(), &gd) < 4e-3 && rel(&b.grad(), &gd) < 4e-3, "{label}: input gradients");
        let bias_ref = gd.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double);
        for bias in [&ba, &bb].into_iter().flatten() {
            assert!(rel(&bias.grad(), &bias_ref) < 1e-5, "{label}: bias gradient");
        }
        if let (Some(x), Some(z)) = (&ba, &bb) {
            assert_ne!(
                x.grad().data_ptr(),
                z.grad().data_ptr(),
                "{label}: the two biases share one gradient tensor"
            );
        }
    }
}

/// The decoder's channel join is a copy: bit for bit `Tensor::cat`, NHWC out, each input's
/// gradient its slice of the output's; NCHW inputs are left to `Tensor::cat`.
#[test]
fn fused_channel_join_is_cat_bit_for_bit() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(9);
    for (kind, ca, cb, h, w) in [
        (Kind::BFloat16, 256, 256, 8, 8),
        (Kind::BFloat16, 256, 128, 5, 7),
        (Kind::Float, 6, 2, 4, 4),
        (Kind::BFloat16, 3, 5, 3, 3),
        (Kind::Float, 64, 192, 16, 16),
    ] {
        let mk = |c: i64| {
            dmdpipe::torch_shim::channels_last(&Tensor::randn([3, c, h, w], (Kind::Float, dev)).to_kind(kind))
                .unwrap()
                .set_requires_grad(true)
        };
        let (a, b) = (mk(ca), mk(cb));
        let label = format!("{kind:?} {ca}+{cb} {h}x{w}");
        let y = dmdpipe::fused_kernels::channel_cat(&a, &b).unwrap().expect("applies");
        assert!(y.equal(&Tensor::cat(&[&a, &b], 1)), "{label}: values");
        let st = y.stride();
        assert_eq!((st[1], st[3]), (1, ca + cb), "{label}: NHWC out");
        let g = Tensor::randn(y.size(), (Kind::Float, dev)).to_kind(kind);
        (&y.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
        assert!(
            a.grad().equal(&g.narrow(1, 0, ca)) && b.grad().equal(&g.narrow(1, ca, cb)),
            "{label}: gradients"
        );
        println!("channel join {label}: equal to cat, gradients equal to the slices");
    }
    let nchw = Tensor::randn([2, 8, 4, 4], (Kind::Float, dev));
    assert!(
        dmdpipe::fused_kernels::channel_cat(&nchw, &nchw).unwrap().is_none(),
        "NCHW goes to Tensor::cat"
    );
}

/// A whole DMD run as the speedrun runs it (bf16, every iteration one CUDA-graph replay, the
/// regression loss, two fake-score updates and DMD2's GAN head on the fake score's channels-last
/// bottleneck) with the fused kernels and with eager ops, from the same networks and seed: the
/// first iteration's losses agree to bf16 rounding, and every logged value stays finite.
#[test]
fn a_dmd_run_with_every_loss_term_behaves_like_the_eager_ops_under_cuda_graphs() {
    use dmdpipe::train::dmd::{DmdData, DmdNets, DmdOptions, NoHooks, Pairs, RealImages, train_dmd};
    let Some(dev) = cuda() else { return };
    tch::manual_seed(5);
    let teacher = Denoiser::new(&small_net(true), dev);
    tch::no_grad(|| {
        for v in teacher.vs.trainable_variables() {
            let _ = v.shallow_clone().g_add_(&(v.randn_like() * 0.05));
        }
    });
    let eye = Tensor::eye(10, (Kind::Float, Device::Cpu));
    let labels = || eye.index_select(0, &Tensor::randint(10, [32], (Kind::Int64, Device::Cpu)));
    let pairs = Pairs {
        z: Tensor::randn([32, 3, 16, 16], (Kind::Float, dev)),
        labels: Some(labels().to_device(dev)),
        x: Tensor::randn([32, 3, 16, 16], (Kind::Float, dev)) * 0.5,
    };
    let real_on = |d: Device| RealImages {
        images: (Tensor::rand([32, 3, 16, 16], (Kind::Float, Device::Cpu)) * 255.0)
            .to_kind(Kind::Uint8)
            .to_device(d),
        labels: Some(labels().to_device(d)),
    };
    let real = real_on(dev);
    let run_with = |fused: bool, pairs: &Pairs, real: &RealImages| {
        let net = || {
            let mut n = Denoiser::new(&small_net(fused), dev);
            n.copy_from(&teacher).unwrap();
            n
        };
        let (real_score, g, f) = (net(), net(), net());
        let opts = DmdOptions {
            batch: 16,
            iterations: 6,
            log_every: 1,
            warmup_steps: 1,
            lr: 1e-4,
            regression_weight: 0.5,
            fake_updates_per_g: 2,
            gan_generator_weight: 1e-2,
            gan_discriminator_weight: 1e-2,
            cuda_graph: true,
            ..Default::default()
        };
        let work = tempfile::tempdir().unwrap();
        let nets = DmdNets {
            real: &real_score,
            generator: &g,
            fake: &f,
            ema: None,
        };
        let data = DmdData {
            pairs: Some(pairs),
            lpips: None,
            real_images: Some(real),
        };
        train_dmd(nets, data, &opts, work.path(), &mut NoHooks)
    };
    let err = run_with(true, &pairs, &real_on(Device::Cpu))
        .err()
        .expect("real images on the CPU are refused");
    assert!(format!("{err:#}").contains("the real images are on Cpu"), "{err:#}");
    let run = |fused: bool| run_with(fused, &pairs, &real).unwrap();
    let (fused, eager) = (run(true), run(false));
    assert_eq!(fused.log.len(), 6);
    for row in fused.log.iter().chain(&eager.log) {
        let values = [
            row.loss_dm,
            row.loss_reg,
            row.loss_fake,
            row.grad_norm_g,
            row.grad_norm_fake,
            row.loss_gan_g,
            row.loss_gan_d,
        ];
        assert!(values.iter().all(|v| v.is_finite()), "iteration {}: {values:?}", row.iteration);
    }
    let (a, b) = (&fused.log[0], &eager.log[0]);
    for (what, x, y) in [
        ("distribution matching", a.loss_dm, b.loss_dm),
        ("regression", a.loss_reg, b.loss_reg),
        ("fake score", a.loss_fake, b.loss_fake),
        ("GAN generator", a.loss_gan_g, b.loss_gan_g),
        ("GAN discriminator", a.loss_gan_d, b.loss_gan_d),
    ] {
        let r = (x - y).abs() / y.abs().max(1e-6);
        println!("DMD iteration 1, {what}: fused {x:.6e}, eager {y:.6e} (rel {r:.1e})");
        // The distribution-matching loss starts near zero (the fake score is the teacher's copy).
        assert!(r < 3e-2 || (x - y).abs() < 1e-6, "{what}: fused {x} vs eager {y}");
    }
}
