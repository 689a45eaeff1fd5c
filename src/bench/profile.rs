//! `bench profile` and `bench trace-summary`: where the GPU time of a training step or a
//! one-step sampling call goes. Traces come from libtorch's Kineto profiler (the one behind
//! torch.profiler, so a PyTorch trace of the baseline reads the same way); the summary adds the
//! kernel times up by kernel and by kind of work (convolution, GroupNorm, casts, ...).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

use super::{ddpmpp, random_train_step, sync};
use crate::nn::Denoiser;
use crate::sample::one_hot;
use crate::torch_shim::{self, AutocastBf16, Profiler};
use crate::train::optim::AdamW;

/// One kernel (or copy / memset) of a trace, summed over its launches.
#[derive(Debug, Clone, Serialize)]
pub struct KernelStat {
    pub name: String,
    pub category: &'static str,
    pub total_us: f64,
    pub launches: u64,
}

/// The GPU side of a trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    /// Kernels by total time, longest first.
    pub kernels: Vec<KernelStat>,
    /// (category, total microseconds, launches), longest first.
    pub categories: Vec<(String, f64, u64)>,
    /// Sum of all kernel/copy durations.
    pub busy_us: f64,
    /// From the first GPU event's start to the last one's end: busy / span is how much of the
    /// profiled time the GPU worked (the rest is launch gaps and host waits).
    pub span_us: f64,
}

/// The kind of work a CUDA kernel does, from its (mangled-looking) name. Order matters: a
/// GroupNorm kernel's name mentions element-wise helpers, an attention kernel's a softmax.
pub fn kernel_category(name: &str, trace_category: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| n.contains(k));
    match trace_category {
        "gpu_memcpy" => return "memcpy",
        "gpu_memset" => return "memset",
        _ => {}
    }
    // dmdpipe's own fused kernels (src/shim/kernels) have plain C names.
    if n.starts_with("gn_") {
        return "group_norm";
    }
    if n.starts_with("skip_sum") {
        return "residual_sum";
    }
    if n.starts_with("channel_cat") {
        return "concat";
    }
    if has(&["flash", "fmha", "attention", "softmax", "sdpa"]) {
        "attention"
    } else if has(&["depthwise"]) {
        // The up/down-sampling filters run as depthwise convolutions.
        "resample_depthwise"
    } else if has(&[
        "groupnorm",
        "group_norm",
        "rowwisemoments",
        "computefusedparams",
        "computeinternalgradients",
        "welford",
    ]) {
        "group_norm"
    } else if has(&["nchwtonhwc", "nhwctonchw", "transpose"]) {
        "layout_transform"
    } else if has(&["conv", "cudnn", "xmma", "fprop", "dgrad", "wgrad", "implicit_convolve"]) {
        "convolution"
    } else if has(&["gemm", "cutlass", "nvjet", "cublas", "matmul"]) {
        "matmul"
    } else if has(&["silu"]) {
        "silu"
    } else if has(&["catarraybatchedcopy", "cat_"]) {
        "concat"
    } else if has(&["copy_kernel", "direct_copy", "copy_device_to_device"]) {
        "copy_or_cast"
    } else if has(&["adam", "foreach", "lerp"]) {
        "optimizer_or_ema"
    } else if has(&["reduce_kernel", "reduction"]) {
        "reduction"
    } else if has(&["dropout", "masked_scale", "philox", "random", "normal_", "uniform"]) {
        "random"
    } else if has(&["functor", "elementwise", "unrolled", "binary"]) {
        "elementwise_arithmetic"
    } else {
        "other"
    }
}

/// Reads a Chrome trace written by Kineto (`Profiler::finish`, or torch.profiler's
/// `export_chrome_trace`) and sums its GPU events.
pub fn summarize_trace(path: &Path) -> Result<TraceSummary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the trace {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing the trace {}", path.display()))?;
    let events = v
        .get("traceEvents")
        .and_then(|e| e.as_array())
        .with_context(|| format!("{}: no traceEvents array (not a Chrome trace)", path.display()))?;
    let mut by_name: HashMap<(String, &'static str), (f64, u64)> = HashMap::new();
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    for e in events {
        let cat = e.get("cat").and_then(|c| c.as_str()).unwrap_or("");
        if !matches!(cat, "kernel" | "gpu_memcpy" | "gpu_memset") || e.get("ph").and_then(|p| p.as_str()) != Some("X") {
            continue;
        }
        let name = e.get("name").and_then(|n| n.as_str()).unwrap_or("?").to_string();
        let ts = e.get("ts").and_then(number).unwrap_or(0.0);
        let dur = e.get("dur").and_then(number).unwrap_or(0.0);
        first = first.min(ts);
        last = last.max(ts + dur);
        let category = kernel_category(&name, cat);
        let s = by_name.entry((name, category)).or_default();
        s.0 += dur;
        s.1 += 1;
    }
    let mut kernels: Vec<KernelStat> = by_name
        .into_iter()
        .map(|((name, category), (total_us, launches))| KernelStat {
            name,
            category,
            total_us,
            launches,
        })
        .collect();
    kernels.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
    let mut cats: HashMap<&'static str, (f64, u64)> = HashMap::new();
    for k in &kernels {
        let c = cats.entry(k.category).or_default();
        c.0 += k.total_us;
        c.1 += k.launches;
    }
    let mut categories: Vec<(String, f64, u64)> = cats.into_iter().map(|(c, (t, n))| (c.to_string(), t, n)).collect();
    categories.sort_by(|a, b| b.1.total_cmp(&a.1));
    let busy_us = kernels.iter().map(|k| k.total_us).sum();
    let span_us = if last > first { last - first } else { 0.0 };
    Ok(TraceSummary {
        kernels,
        categories,
        busy_us,
        span_us,
    })
}

/// Kineto writes `ts` as a number, some versions as a string with a decimal point.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The summary as JSON, every time divided by `per` (the profiled calls), the kernel list cut
/// to the `top` longest.
pub fn summary_json(s: &TraceSummary, per: usize, top: usize) -> Value {
    let per = per.max(1) as f64;
    let ms = |us: f64| us / per / 1000.0;
    let short = |name: &str| name.chars().take(160).collect::<String>();
    json!({
        "gpu_busy_ms_per_call": ms(s.busy_us),
        "gpu_span_ms_per_call": ms(s.span_us),
        "gpu_busy_fraction": if s.span_us > 0.0 { s.busy_us / s.span_us } else { 0.0 },
        "launches_per_call": s.kernels.iter().map(|k| k.launches).sum::<u64>() as f64 / per,
        "categories_ms_per_call": s.categories.iter().map(|(c, t, n)| json!({
            "category": c, "ms": ms(*t), "launches": *n as f64 / per,
            "share": if s.busy_us > 0.0 { t / s.busy_us } else { 0.0 },
        })).collect::<Vec<_>>(),
        "top_kernels_ms_per_call": s.kernels.iter().take(top).map(|k| json!({
            "name": short(&k.name), "category": k.category, "ms": ms(k.total_us), "launches": k.launches as f64 / per,
        })).collect::<Vec<_>>(),
    })
}

/// What `bench profile` records (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ProfileSpec {
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// `edm55m` (the full EDM CIFAR-10 network) or `speedrun9m`.
    #[arg(long, default_value = "edm55m")]
    pub network: String,
    /// Profiled calls per workload (after three unprofiled warm-up calls).
    #[arg(long, default_value_t = 3)]
    pub calls: usize,
    #[arg(long, default_value_t = 512)]
    pub train_batch: i64,
    #[arg(long, default_value_t = 1024)]
    pub sample_batch: i64,
    /// Folder for the traces.
    #[arg(long, default_value = "profile")]
    pub out_dir: PathBuf,
}

/// Profiles the bf16 one-step sampling call and the bf16 training step of one network, with the
/// fused kernels (`fused`, the default) and with eager libtorch ops (`eager_ops`, the reference
/// path), writing `<out_dir>/dmdpipe_<workload>_<path>.json` (Chrome traces) and returning their
/// summaries.
pub fn bench_profile(spec: &ProfileSpec) -> Result<Value> {
    let device = torch_shim::device(&spec.device)?;
    tch::Cuda::cudnn_set_benchmark(true);
    torch_shim::set_tf32(true);
    std::fs::create_dir_all(&spec.out_dir).with_context(|| format!("creating {}", spec.out_dir.display()))?;
    let base = match spec.network.as_str() {
        "edm55m" => ddpmpp(128, 4),
        "speedrun9m" => ddpmpp(64, 2),
        other => anyhow::bail!("unknown network `{other}` (edm55m or speedrun9m)"),
    };
    let mut out = Map::new();
    out.insert("device".into(), format!("{device:?}").into());
    out.insert("network".into(), spec.network.clone().into());
    for (path_tag, fused) in [("fused", true), ("eager_ops", false)] {
        let mut cfg = base.clone();
        cfg.set_fused_kernels(fused);
        tch::manual_seed(0);
        let net = Denoiser::new(&cfg, device);
        if fused {
            out.insert("parameters".into(), net.num_params().into());
        }
        profile_network(spec, &net, device, path_tag, &mut out)?;
    }
    Ok(Value::Object(out))
}

/// Both workloads of one network: three warm-up calls, then `spec.calls` profiled ones.
fn profile_network(spec: &ProfileSpec, net: &Denoiser, device: tch::Device, path_tag: &str, out: &mut Map<String, Value>) -> Result<()> {
    let opt = AdamW::new(net, (0.9, 0.999), 1e-8, 0.0);
    let bf16 = device.is_cuda();
    let z = Tensor::randn([spec.sample_batch, 3, 32, 32], (Kind::Float, device)) * 80.0;
    let labels = one_hot(&(0..spec.sample_batch).map(|i| i % 10).collect::<Vec<_>>(), 10, device);
    let sigma = Tensor::from(80.0f32).to_device(device);
    let onestep = || -> Result<()> {
        let _ac = AutocastBf16::new(bf16)?;
        let _ = tch::no_grad(|| net.denoise(&z, &sigma, Some(&labels), false));
        Ok(())
    };
    let train = || random_train_step(net, &opt, spec.train_batch, bf16);
    let workloads: [(&str, &dyn Fn() -> Result<()>); 2] = [("onestep", &onestep), ("train", &train)];
    for (work, f) in workloads {
        for _ in 0..3 {
            f()?;
        }
        sync(device);
        let profiler = Profiler::start(device.is_cuda())?;
        let t = std::time::Instant::now();
        for _ in 0..spec.calls {
            f()?;
        }
        sync(device);
        let wall = t.elapsed().as_secs_f64() / spec.calls as f64;
        let trace = spec.out_dir.join(format!("dmdpipe_{work}_{path_tag}.json"));
        profiler.finish(&trace)?;
        let mut s = summary_json(&summarize_trace(&trace)?, spec.calls, 25);
        s["wall_ms_per_call_profiled"] = (wall * 1000.0).into();
        out.insert(format!("{work}_{path_tag}"), s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_fall_into_their_kind_of_work() {
        let k = |n| kernel_category(n, "kernel");
        assert_eq!(k("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw"), "convolution");
        assert_eq!(
            k("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>(long, float, float const*, float*, float*)"),
            "group_norm"
        );
        assert_eq!(
            k("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)::{lambda()#1}>"),
            "silu"
        );
        assert_eq!(
            k("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>"),
            "copy_or_cast"
        );
        assert_eq!(
            k("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>"),
            "attention"
        );
        assert_eq!(k("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN"), "matmul");
        assert_eq!(
            k("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>"),
            "elementwise_arithmetic"
        );
        assert_eq!(kernel_category("Memcpy DtoD (Device -> Device)", "gpu_memcpy"), "memcpy");
        assert_eq!(
            k("void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<c10::BFloat16>(long)"),
            "group_norm"
        );
        assert_eq!(
            k("void at::native::vectorized_elementwise_kernel<8, at::native::masked_scale_kernel<bool, c10::BFloat16, float>>"),
            "random"
        );
        assert_eq!(k("gn_backward_dx"), "group_norm");
        assert_eq!(k("gn_apply"), "group_norm");
        assert_eq!(k("skip_sum"), "residual_sum");
        assert_eq!(k("channel_cat"), "concat");
        assert_eq!(
            k("void at::native::(anonymous namespace)::conv_depthwise2d_forward_kernel<1, c10::BFloat16, int>"),
            "resample_depthwise"
        );
        assert_eq!(k("mystery"), "other");
    }

    #[test]
    fn a_trace_sums_gpu_events_by_kernel_and_category_and_ignores_host_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let trace = json!({"traceEvents": [
            {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 1000},
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_fprop_a", "ts": 100, "dur": 40},
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_fprop_a", "ts": 150, "dur": 40},
            {"ph": "X", "cat": "kernel", "name": "RowwiseMomentsCUDAKernel", "ts": 200, "dur": 10},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": "250.5", "dur": 2},
            {"ph": "i", "cat": "kernel", "name": "instant", "ts": 300},
        ]});
        std::fs::write(&path, trace.to_string()).unwrap();
        let s = summarize_trace(&path).unwrap();
        assert_eq!(s.kernels.len(), 3);
        assert_eq!(s.kernels[0].name, "sm90_xmma_fprop_a");
        assert_eq!(s.kernels[0].launches, 2);
        assert!((s.busy_us - 92.0).abs() < 1e-9);
        assert!((s.span_us - 152.5).abs() < 1e-9, "{}", s.span_us);
        assert_eq!(s.categories[0], ("convolution".to_string(), 80.0, 2));
        let j = summary_json(&s, 2, 1);
        assert!((j["gpu_busy_ms_per_call"].as_f64().unwrap() - 0.046).abs() < 1e-12);
        assert_eq!(j["top_kernels_ms_per_call"].as_array().unwrap().len(), 1);
        assert!((j["categories_ms_per_call"][0]["share"].as_f64().unwrap() - 80.0 / 92.0).abs() < 1e-12);
    }

    #[test]
    fn a_file_that_is_not_a_trace_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-trace.json");
        std::fs::write(&path, "{\"a\": 1}").unwrap();
        let e = format!("{:#}", summarize_trace(&path).unwrap_err());
        assert!(e.contains("not-a-trace.json") && e.contains("traceEvents"), "{e}");
        let missing = format!("{:#}", summarize_trace(&dir.path().join("absent.json")).unwrap_err());
        assert!(missing.contains("absent.json"), "{missing}");
    }

    #[test]
    fn the_profiler_writes_a_trace_of_cpu_operators() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu.json");
        let p = Profiler::start(false).unwrap();
        let a = Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a).sum(Kind::Float);
        p.finish(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let names: Vec<&str> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.contains(&"aten::matmul"), "{:?}", &names[..names.len().min(20)]);
        // No GPU here: the GPU summary is empty, not an error.
        assert_eq!(summarize_trace(&path).unwrap().busy_us, 0.0);
    }
}
