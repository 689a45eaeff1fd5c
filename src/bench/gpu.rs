//! `bench gpu`: the full EDM CIFAR-10 network (55.7M parameters) and the small speedrun network
//! (8.8M): teacher training img/s (batch 512) and one-step sampling img/s (batch 1024) in bf16
//! and TF32 (eagerly and as CUDA-graph replays), DMD it/s, Inception features img/s. Figures
//! whose key has `_fused` are the networks with `fused_kernels` (channels-last activations,
//! dmdpipe's fused GroupNorm kernels); the others run the eager libtorch ops in NCHW.

use anyhow::Result;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::figures::{FigureSink, Figures};
use super::{add_tflops, bench_dmd, ddpmpp, matmul_peak_tflops, timed};
use crate::nn::Denoiser;
use crate::sample::one_hot;
use crate::torch_shim::{self, AutocastBf16};
use crate::train::optim::{AdamW, ema_update};
use crate::train::teacher::edm_loss;

/// What `bench gpu` measures.
#[derive(Debug, Clone, Default)]
pub struct GpuBenchOptions {
    /// Tiny batches and few steps (a smoke test).
    pub quick: bool,
    /// Also bf16 with channels-last weights and activations on the eager-ops networks.
    pub channels_last: bool,
    /// Inception weights for the feature-throughput figures (skipped when absent).
    pub inception: Option<std::path::PathBuf>,
    /// Only the networks' bf16 figures (no TF32, Inception or eager DMD).
    pub networks_only: bool,
    /// With `networks_only`: the captured DMD iterations too.
    pub dmd: bool,
    /// Only the networks with dmdpipe's fused kernels (the fastest path; the eager-ops networks
    /// are the reference): about half the time, for short device budgets.
    pub fused_only: bool,
}

/// Runs the bench; each figure goes to `sink` as soon as it is measured.
pub fn bench_gpu(device_name: &str, opts: &GpuBenchOptions, sink: Option<FigureSink>) -> Result<Value> {
    let GpuBenchOptions {
        quick,
        channels_last,
        networks_only,
        dmd,
        fused_only,
        ..
    } = *opts;
    let device = torch_shim::device(device_name)?;
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    let mut out = Figures::new(sink);
    out.insert("device", format!("{device:?}"));
    // The networks' own setting (`bf16_group_norm`, on by default) unless an override is set.
    let saved_override = crate::torch_shim::group_norm_override();
    let default_norm = saved_override.unwrap_or(ddpmpp(128, 4).bf16_group_norm());
    out.insert("bf16_group_norm_native_by_default", default_norm);
    let peak = matmul_peak_tflops(device, if quick { 256 } else { 8192 })?;
    out.insert("bf16_matmul_peak_tflops", peak);
    let (train_b, sample_b, steps) = if quick { (8, 8, 2) } else { (512, 1024, 20) };
    let nets = [(false, "edm55m"), (false, "speedrun9m"), (true, "edm55m"), (true, "speedrun9m")];
    for (fused, tag) in nets.into_iter().filter(|&(fused, _)| fused || !fused_only) {
        let cfg = bench_config(tag, fused);
        let sfx = if fused { "_fused" } else { "" };
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        let mut ema = Denoiser::new(&cfg, device);
        ema.copy_from(&net)?;
        out.insert(format!("{tag}_parameters"), net.num_params());
        let opt = AdamW::new(&net, (0.9, 0.999), 1e-8, 0.0);
        // Channels-last (`--channels-last`) comes last: it re-lays out the weights for good.
        // Measured slower on an H200 (0.75x training, 0.77x sampling), so off by default.
        // `bf16_edm_attention`: attention as EDM writes it instead of the fused kernel.
        // `bf16_native_norm` / `bf16_autocast_norm` (whichever is not the default): GroupNorm and
        // the SiLU after it on bf16 activations kept in bf16, or run in fp32 as autocast does.
        let other_norm = if default_norm { "bf16_autocast_norm" } else { "bf16_native_norm" };
        let variants = [
            ("bf16", true, false, true, default_norm),
            ("tf32", false, false, true, default_norm),
            ("bf16_edm_attention", true, false, false, default_norm),
            (other_norm, true, false, true, !default_norm),
            ("bf16_channels_last", true, true, true, default_norm),
        ];
        // With `networks_only`: the bf16 default and the other GroupNorm mode (and their graphs).
        // With `fused_kernels`: the bf16 default only (the network is channels-last already).
        let wanted = |prec: &str, cl: bool| {
            (channels_last || !cl) && (!networks_only || prec == "bf16" || prec == other_norm) && (!fused || (prec == "bf16" && !cl))
        };
        for &(prec, bf16, cl, fused_attention, native_norm) in variants.iter().filter(|v| wanted(v.0, v.2)) {
            crate::nn::unet_block::set_fused_attention(fused_attention);
            crate::torch_shim::set_group_norm_override(Some(native_norm));
            if cl {
                let all = |d: &Denoiser| d.vs.variables().into_values().collect::<Vec<_>>();
                torch_shim::to_channels_last(&all(&net))?;
                torch_shim::to_channels_last(&all(&ema))?;
                torch_shim::to_channels_last(&opt.exp_avg)?;
                torch_shim::to_channels_last(&opt.exp_avg_sq)?;
            }
            let layout = |t: Tensor| if cl { torch_shim::channels_last(&t) } else { Ok(t) };
            let per_step = timed(device, 5.min(steps), steps, || {
                opt.zero_grad();
                let y = layout(Tensor::rand([train_b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0)?;
                let labels = Tensor::randint(10, [train_b], (Kind::Int64, device))
                    .one_hot(10)
                    .to_kind(Kind::Float);
                let (loss, _) = {
                    let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                    edm_loss(&net, &y, Some(&labels), -1.2, 1.2, true)
                };
                loss.backward();
                opt.step(1e-4, 0.0)?;
                ema_update(&ema, &net, 0.999)
            })?;
            out.insert(format!("{tag}_train_{prec}{sfx}_img_s"), train_b as f64 / per_step);
            let z = layout(Tensor::randn([sample_b, 3, 32, 32], (Kind::Float, device)) * 80.0)?;
            let labels = one_hot(&(0..sample_b).map(|i| i % 10).collect::<Vec<_>>(), 10, device);
            let sigma = Tensor::from(80.0f32).to_device(device);
            let per_call = timed(device, 3.min(steps), 10.min(steps), || {
                let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                let _ = tch::no_grad(|| ema.denoise(&z, &sigma, Some(&labels), false));
                Ok(())
            })?;
            out.insert(format!("{tag}_onestep_{prec}{sfx}_img_s"), sample_b as f64 / per_call);
            // DMDPIPE_BENCH_NO_GRAPH=1 skips the graph variants (their capture failed once on an
            // H200 in cuDNN's engine search, then reported as `*_graph_error`; docs/RESULTS.md).
            let graphs = std::env::var("DMDPIPE_BENCH_NO_GRAPH").map_or(true, |v| v != "1");
            let graph_tag = (prec == "bf16" || prec == other_norm).then(|| format!("{prec}{sfx}_graph"));
            if let (Some(gt), true, true, true) = (graph_tag, graphs, device.is_cuda(), crate::cuda_graph::available()) {
                match bench_graphed(&net, &opt, device, train_b, &z, &labels, steps) {
                    Ok((train, sample)) => {
                        out.insert(format!("{tag}_train_{gt}_img_s"), train);
                        out.insert(format!("{tag}_onestep_{gt}_img_s"), sample);
                    }
                    // Reported, not fatal: the eager figures and the DMD benches still run.
                    Err(e) => {
                        out.insert(format!("{tag}_{gt}_error"), format!("{e:#}"));
                    }
                }
            }
        }
    }
    crate::nn::unet_block::set_fused_attention(true);
    crate::torch_shim::set_group_norm_override(saved_override);
    if networks_only {
        if dmd {
            bench_dmd_rows(&mut out, device, quick, false, fused_only)?;
        }
        add_tflops(out.map_mut(), peak);
        return Ok(out.into_value());
    }
    if let Some(w) = opts.inception.as_deref().filter(|w| w.exists()) {
        bench_inception_layouts(&mut out, w, device, quick)?;
    }
    bench_dmd_rows(&mut out, device, quick, true, fused_only)?;
    add_tflops(out.map_mut(), peak);
    Ok(out.into_value())
}

/// Inception feature throughput in each precision and layout.
fn bench_inception_layouts(out: &mut Figures, w: &std::path::Path, device: tch::Device, quick: bool) -> Result<()> {
    use crate::eval::inception::Layout;
    let mut net = crate::eval::inception::Inception::load(w, device)?;
    let n = if quick { 8 } else { 250 };
    let imgs = (Tensor::rand([n, 32, 32, 3], (Kind::Float, device)) * 255.0).to_kind(Kind::Uint8);
    // bf16 (autocast) is a throughput figure only: FID is defined with fp32 features.
    for (prec, tf32, bf16) in [("tf32", true, false), ("fp32", false, false), ("bf16", true, true)] {
        torch_shim::set_tf32(tf32);
        // The unsuffixed figure is the layout the FID stages use for this precision.
        for (lay, layout) in [
            ("", Layout::fastest_for(prec == "fp32")),
            ("_nchw", Layout::Nchw),
            ("_nhwc", Layout::Nhwc),
        ] {
            net.layout = layout;
            // Features to the host in f64, as the FID stages (and the PyTorch script) take them.
            let per = timed(device, 2, if quick { 1 } else { 20 }, || {
                let _ac = AutocastBf16::new(bf16 && device.is_cuda())?;
                let _ = net.features(&imgs).to_kind(Kind::Double).to_device(tch::Device::Cpu);
                Ok(())
            })?;
            out.insert(format!("inception_{prec}{lay}_img_s"), n as f64 / per);
        }
    }
    torch_shim::set_tf32(true);
    Ok(())
}

/// The bench network `tag` (edm55m or speedrun9m) with or without `fused_kernels`.
fn bench_config(tag: &str, fused: bool) -> crate::nn::NetworkConfig {
    let mut cfg = if tag == "edm55m" { ddpmpp(128, 4) } else { ddpmpp(64, 2) };
    cfg.set_fused_kernels(fused);
    cfg
}

/// DMD iterations per second (captured, and eager when `eager`) of both networks at batches 56
/// and 128, with the fused kernels and (unless `fused_only`) without.
fn bench_dmd_rows(out: &mut Figures, device: tch::Device, quick: bool, eager: bool, fused_only: bool) -> Result<()> {
    if !quick {
        for fused in [false, true].into_iter().filter(|&f| f || !fused_only) {
            let sfx = if fused { "_fused" } else { "" };
            for tag in ["edm55m", "speedrun9m"] {
                let cfg = bench_config(tag, fused);
                for batch in [56usize, 128] {
                    let ips = bench_dmd(&cfg, device, batch, 40, true)?;
                    out.insert(format!("{tag}_dmd_b{batch}{sfx}_it_s"), ips);
                    if eager {
                        let ips = bench_dmd(&cfg, device, batch, 20, false)?;
                        out.insert(format!("{tag}_dmd_b{batch}{sfx}_eager_it_s"), ips);
                    }
                }
            }
        }
    } else {
        out.insert("speedrun9m_dmd_b4_it_s", bench_dmd(&ddpmpp(64, 2), device, 4, 2, true)?);
    }
    Ok(())
}

/// The bf16 training step (without the EMA) and the one-step sampling call, each captured as a
/// CUDA graph and replayed: (train img/s, sampling img/s).
fn bench_graphed(
    net: &Denoiser,
    opt: &AdamW,
    device: tch::Device,
    train_b: i64,
    z: &Tensor,
    labels: &Tensor,
    steps: usize,
) -> Result<(f64, f64)> {
    use crate::cuda_graph::{CudaGraph, SideStream};
    let _side = SideStream::enter()?;
    let lr = Tensor::from(1e-4f32).to_device(device);
    let eye = Tensor::eye(10, (Kind::Float, device));
    let step = || -> Result<Tensor> {
        opt.zero_grad();
        let y = Tensor::rand([train_b, 3, 32, 32], (Kind::Float, device)) * 2.0 - 1.0;
        let l = eye.index_select(0, &Tensor::randint(10, [train_b], (Kind::Int64, device)));
        let (loss, _) = {
            let _ac = AutocastBf16::new(true)?;
            edm_loss(net, &y, Some(&l), -1.2, 1.2, true)
        };
        loss.backward();
        opt.step(&lr, 0.0)?;
        Ok(loss.detach())
    };
    for _ in 0..3 {
        let _ = step()?;
    }
    let (g, _) = CudaGraph::capture(step)?;
    let per_step = timed(device, 2, steps, || g.replay())?;
    let sigma = Tensor::from(80.0f32).to_device(device);
    let sample = || -> Result<Tensor> {
        let _ac = AutocastBf16::new(true)?;
        Ok(tch::no_grad(|| net.denoise(z, &sigma, Some(labels), false)))
    };
    for _ in 0..2 {
        let _ = sample()?;
    }
    let (g, _) = CudaGraph::capture(sample)?;
    let per_call = timed(device, 2, 10.min(steps), || g.replay())?;
    Ok((train_b as f64 / per_step, z.size()[0] as f64 / per_call))
}
