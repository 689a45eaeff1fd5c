//! The Rust side of the C++ shim (src/shim/shim.cpp), and loading libtorch_cuda at start-up.

use std::ffi::CStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Result, bail};
use tch::{Device, Tensor};

type CTensor = *mut torch_sys::C_tensor;

unsafe extern "C" {
    fn dmd_last_error() -> *const libc::c_char;
    fn dmd_autocast_bf16(enabled: libc::c_int) -> libc::c_int;
    fn dmd_autocast_enabled() -> libc::c_int;
    fn dmd_set_tf32(enabled: libc::c_int);
    fn dmd_tf32_enabled() -> libc::c_int;
    fn dmd_fused_adamw(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        steps: *const CTensor,
        n: libc::c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> libc::c_int;
}

unsafe extern "C" {
    fn dmd_fused_adamw_tensor_lr(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        steps: *const CTensor,
        n: libc::c_int,
        lr: CTensor,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> libc::c_int;
    fn dmd_foreach_lerp(ema: *const CTensor, params: *const CTensor, n: libc::c_int, weight: f64) -> libc::c_int;
    fn dmd_foreach_copy(dst: *const CTensor, src: *const CTensor, n: libc::c_int) -> libc::c_int;
    fn dmd_sanitize_and_clip(grads: *const CTensor, n: libc::c_int, max_norm: f64, norm_out: CTensor) -> libc::c_int;
    fn dmd_clear_grads(params: *const CTensor, n: libc::c_int);
    fn dmd_to_channels_last(ts: *const CTensor, n: libc::c_int) -> libc::c_int;
    fn dmd_channels_last_copy(t: CTensor, out: CTensor) -> libc::c_int;
    fn dmd_group_norm_native(x: CTensor, weight: CTensor, bias: CTensor, groups: i64, eps: f64, out: CTensor) -> libc::c_int;
    fn dmd_add_alpha(a: CTensor, b: CTensor, alpha: f64, out: CTensor) -> libc::c_int;
    fn dmd_profiler_start(cuda: libc::c_int) -> libc::c_int;
    fn dmd_profiler_stop(path: *const libc::c_char) -> libc::c_int;
}

/// libtorch's Kineto profiler (what torch.profiler drives): records operators and, on CUDA,
/// every kernel. `finish` writes a Chrome trace; dropping an unfinished one discards it.
pub struct Profiler {
    running: bool,
}

impl Profiler {
    pub fn start(cuda: bool) -> Result<Self> {
        if unsafe { dmd_profiler_start(cuda as libc::c_int) } != 0 {
            bail!("starting the profiler: {}", last_error());
        }
        Ok(Profiler { running: true })
    }

    pub fn finish(mut self, trace: &std::path::Path) -> Result<()> {
        self.running = false;
        let path = std::ffi::CString::new(trace.to_string_lossy().as_bytes())?;
        if unsafe { dmd_profiler_stop(path.as_ptr()) } != 0 {
            bail!("writing the profile {}: {}", trace.display(), last_error());
        }
        Ok(())
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            let dir = std::env::temp_dir().join(format!("dmdpipe-discarded-profile-{}.json", std::process::id()));
            let path = std::ffi::CString::new(dir.to_string_lossy().as_bytes()).expect("no NUL in a temp path");
            unsafe { dmd_profiler_stop(path.as_ptr()) };
            let _ = std::fs::remove_file(dir);
        }
    }
}

/// Re-lays out the 4-D tensors among `ts` (conv weights) as channels-last, in place.
pub fn to_channels_last(ts: &[Tensor]) -> Result<()> {
    let p = ptrs(ts);
    if unsafe { dmd_to_channels_last(p.as_ptr(), p.len() as libc::c_int) } != 0 {
        bail!("to_channels_last: {}", last_error());
    }
    Ok(())
}

/// A channels-last (NHWC in memory) copy of a 4-D tensor; same shape and values.
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    let out = Tensor::zeros([0], (tch::Kind::Float, Device::Cpu));
    if unsafe { dmd_channels_last_copy(t.as_ptr() as CTensor, out.as_ptr() as CTensor) } != 0 {
        bail!("channels_last: {}", last_error());
    }
    Ok(out)
}

/// a + alpha * b in one element-wise pass (`a` may broadcast against `b`).
pub fn add_alpha(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let out = Tensor::zeros([0], (tch::Kind::Float, Device::Cpu));
    if unsafe { dmd_add_alpha(a.as_ptr() as CTensor, b.as_ptr() as CTensor, alpha, out.as_ptr() as CTensor) } != 0 {
        bail!("add_alpha: {}", last_error());
    }
    Ok(out)
}

/// `group_norm` in `x`'s dtype, bypassing CUDA autocast's fp32 rule for this call (weight and
/// bias are cast to `x`'s dtype, with gradients flowing back to them).
pub fn group_norm_native(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: i64, eps: f64) -> Result<Tensor> {
    let out = Tensor::zeros([0], (tch::Kind::Float, Device::Cpu));
    let ok = unsafe {
        dmd_group_norm_native(
            x.as_ptr() as CTensor,
            weight.as_ptr() as CTensor,
            bias.as_ptr() as CTensor,
            groups,
            eps,
            out.as_ptr() as CTensor,
        )
    };
    if ok != 0 {
        bail!("group_norm: {}", last_error());
    }
    Ok(out)
}

fn ptrs(ts: &[Tensor]) -> Vec<CTensor> {
    ts.iter().map(|t| t.as_ptr() as CTensor).collect()
}

/// dst[i] <- src[i] for all pairs at once (without autograd: dst may be parameters).
pub fn foreach_copy(dst: &[Tensor], src: &[Tensor]) -> Result<()> {
    if dst.len() != src.len() {
        bail!("foreach_copy: lists of different lengths");
    }
    let (d, s) = (ptrs(dst), ptrs(src));
    if unsafe { dmd_foreach_copy(d.as_ptr(), s.as_ptr(), d.len() as libc::c_int) } != 0 {
        bail!("foreach_copy: {}", last_error());
    }
    Ok(())
}

/// ema <- ema + weight * (param - ema), for all pairs at once.
pub fn foreach_lerp(ema: &[Tensor], params: &[Tensor], weight: f64) -> Result<()> {
    if ema.len() != params.len() {
        bail!("foreach_lerp: lists of different lengths");
    }
    let (e, p) = (ptrs(ema), ptrs(params));
    if unsafe { dmd_foreach_lerp(e.as_ptr(), p.as_ptr(), e.len() as libc::c_int, weight) } != 0 {
        bail!("foreach_lerp: {}", last_error());
    }
    Ok(())
}

/// Replaces NaN/Inf in `grads` and, when `max_norm` > 0, clips their global L2 norm to it and
/// returns the norm before clipping as a 0-dim device tensor (reading it is the only sync).
pub fn sanitize_and_clip(grads: &[Tensor], max_norm: f64) -> Result<Option<Tensor>> {
    let g = ptrs(grads);
    let norm = Tensor::zeros([], (tch::Kind::Float, grads.first().map(|t| t.device()).unwrap_or(Device::Cpu)));
    if unsafe { dmd_sanitize_and_clip(g.as_ptr(), g.len() as libc::c_int, max_norm, norm.as_ptr() as CTensor) } != 0 {
        bail!("sanitize_and_clip: {}", last_error());
    }
    Ok((max_norm > 0.0).then_some(norm))
}

/// Drops the gradients of `params` (set to none, as PyTorch's `zero_grad(set_to_none=True)`).
pub fn clear_grads(params: &[Tensor]) {
    let p = ptrs(params);
    unsafe { dmd_clear_grads(p.as_ptr(), p.len() as libc::c_int) }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(dmd_last_error()).to_string_lossy().into_owned() }
}

/// Loads libtorch_cuda once. rustc links with `--as-needed`, which drops it because no symbol
/// of it is referenced; without it libtorch sees no CUDA. Returns whether CUDA is usable.
pub fn init_cuda() -> bool {
    static CUDA: OnceLock<bool> = OnceLock::new();
    *CUDA.get_or_init(|| {
        let name = c"libtorch_cuda.so";
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            let err = unsafe { CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned() };
            tracing::info!("libtorch_cuda not loaded ({err}); running on the CPU");
            return false;
        }
        tch::Cuda::is_available()
    })
}

/// Parses a device name: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    let cuda = init_cuda();
    match name {
        "auto" => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" if cuda => Ok(Device::Cuda(0)),
        n if n.starts_with("cuda:") && cuda => Ok(Device::Cuda(n[5..].parse()?)),
        n if n.starts_with("cuda") => bail!("device `{n}` requested but CUDA is not available (no libtorch_cuda or no GPU)"),
        n => bail!("unknown device `{n}` (use auto, cpu, cuda or cuda:N)"),
    }
}

/// bf16 autocast on CUDA for the guard's lifetime (tch's own guard is f16-only).
pub struct AutocastBf16 {
    active: bool,
}

impl AutocastBf16 {
    pub fn new(enabled: bool) -> Result<Self> {
        if enabled && unsafe { dmd_autocast_bf16(1) } != 0 {
            bail!("entering bf16 autocast: {}", last_error());
        }
        Ok(AutocastBf16 { active: enabled })
    }
    pub fn is_enabled() -> bool {
        unsafe { dmd_autocast_enabled() != 0 }
    }
}

impl Drop for AutocastBf16 {
    fn drop(&mut self) {
        if self.active {
            unsafe { dmd_autocast_bf16(0) };
        }
    }
}

/// TF32 for cuBLAS matmuls and cuDNN convolutions.
pub fn set_tf32(enabled: bool) {
    unsafe { dmd_set_tf32(enabled as libc::c_int) }
}

pub fn tf32_enabled() -> bool {
    unsafe { dmd_tf32_enabled() != 0 }
}

/// libtorch's CPU threads: as many as the cores this process may use (scheduler affinity and
/// cgroup quota) that other work is not using right now (measured over 100 ms from /proc/stat),
/// unless OMP_NUM_THREADS or MKL_NUM_THREADS says otherwise; one inter-op thread (dmdpipe runs no
/// parallel ops). On a loaded machine libtorch's default (every core) spins against the other
/// work. Returns the count.
pub fn configure_cpu_threads() -> usize {
    if std::env::var_os("OMP_NUM_THREADS").is_some() || std::env::var_os("MKL_NUM_THREADS").is_some() {
        return tch::get_num_threads().max(1) as usize;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cpu_threads_for(cores, busy_cores().unwrap_or(0.0));
    tch::set_num_threads(threads as i32);
    // Inter-op threads can only be set once, before any parallel work.
    let _ = std::panic::catch_unwind(|| tch::set_num_interop_threads(1));
    threads
}

/// (idle, total) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((idle, fields.iter().take(8).sum()))
}

/// How many cores other processes keep busy now.
fn busy_cores() -> Option<f64> {
    let (idle0, total0) = cpu_jiffies()?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (idle1, total1) = cpu_jiffies()?;
    let (idle, total) = (idle1.saturating_sub(idle0) as f64, total1.saturating_sub(total0) as f64);
    let all = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    (total > 0.0).then(|| (1.0 - idle / total) * all as f64)
}

/// The intra-op thread count for `cores` usable cores with `load` of them busy.
pub fn cpu_threads_for(cores: usize, load: f64) -> usize {
    let idle = cores as f64 - load.max(0.0);
    (idle.round() as usize).clamp(1, cores.max(1))
}

/// A process-wide override of every GroupNorm's mode on bf16 activations (0: each network's
/// own setting, 1: native bf16, 2: fp32 as autocast runs it): `bench gpu` times both modes,
/// a `NumericsScope` resets it. Never set while a cached stage runs: a
/// network's own `bf16_group_norm` (in its config, so in the key) decides there.
static GROUP_NORM_OVERRIDE: AtomicU8 = AtomicU8::new(0);

pub fn set_group_norm_override(mode: Option<bool>) {
    let v = match mode {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    GROUP_NORM_OVERRIDE.store(v, Ordering::Relaxed);
}

pub fn group_norm_override() -> Option<bool> {
    match GROUP_NORM_OVERRIDE.load(Ordering::Relaxed) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

/// The process-global numerics switches a result can depend on: TF32 and the GroupNorm override. A scope starts from the defaults (strict fp32, no override) and puts back
/// what it found when it ends, so nothing leaks from one stage into the next.
pub struct NumericsScope {
    tf32: bool,
    group_norm: Option<bool>,
}

impl NumericsScope {
    pub fn defaults() -> Self {
        let saved = NumericsScope {
            tf32: tf32_enabled(),
            group_norm: group_norm_override(),
        };
        set_tf32(false);
        set_group_norm_override(None);
        saved
    }
}

impl Drop for NumericsScope {
    fn drop(&mut self) {
        set_tf32(self.tf32);
        set_group_norm_override(self.group_norm);
    }
}

/// A learning rate given as a number, or as a 0-dim tensor on the parameters' device (read by
/// the kernel, so a captured CUDA graph sees its current value).
#[derive(Clone, Copy)]
pub enum Lr<'a> {
    Value(f64),
    Tensor(&'a Tensor),
}

/// One fused AdamW step (torch's `_fused_adamw_`) over all parameters at once.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw<'a>(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    lr: impl Into<Lr<'a>>,
    betas: (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
        .iter()
        .any(|&l| l != n)
    {
        bail!("fused_adamw: lists of different lengths");
    }
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    let (pp, gp, mp, vp, sp, nn) = (p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), s.as_ptr(), n as libc::c_int);
    let rc = match lr.into() {
        Lr::Value(lr) => unsafe { dmd_fused_adamw(pp, gp, mp, vp, sp, nn, lr, betas.0, betas.1, weight_decay, eps) },
        Lr::Tensor(lr) => unsafe {
            dmd_fused_adamw_tensor_lr(pp, gp, mp, vp, sp, nn, lr.as_ptr() as CTensor, betas.0, betas.1, weight_decay, eps)
        },
    };
    if rc != 0 {
        bail!("fused AdamW: {}", last_error());
    }
    Ok(())
}

impl From<f64> for Lr<'_> {
    fn from(v: f64) -> Self {
        Lr::Value(v)
    }
}

impl<'a> From<&'a Tensor> for Lr<'a> {
    fn from(t: &'a Tensor) -> Self {
        Lr::Tensor(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_threads_leave_busy_cores_alone() {
        assert_eq!(cpu_threads_for(8, 0.0), 8);
        assert_eq!(cpu_threads_for(8, 3.2), 5);
        assert_eq!(cpu_threads_for(2, 2.0), 1, "a fully loaded machine still gets one thread");
        assert_eq!(cpu_threads_for(2, 9.0), 1);
        assert_eq!(cpu_threads_for(4, -1.0), 4);
    }
    use tch::Kind;

    #[test]
    fn tensor_learning_rate_gives_the_same_step_as_a_number() {
        tch::manual_seed(1);
        let p0 = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let mut out = Vec::new();
        for use_tensor in [false, true] {
            let p = p0.copy();
            let (m, v) = (p.zeros_like(), p.zeros_like());
            let s = Tensor::zeros([], (Kind::Float, Device::Cpu));
            let lr_t = Tensor::from(0.03f32);
            for _ in 0..2 {
                let lr: Lr = if use_tensor { (&lr_t).into() } else { 0.03.into() };
                let one = |t: &Tensor| [t.shallow_clone()];
                fused_adamw(&one(&p), &one(&g), &one(&m), &one(&v), &one(&s), lr, (0.9, 0.99), 0.01, 1e-8).unwrap();
            }
            out.push(p);
        }
        let diff = (&out[0] - &out[1]).abs().max().double_value(&[]);
        assert!(diff < 1e-7, "tensor lr differs by {diff}");
        assert!(
            (&out[0] - &p0).abs().max().double_value(&[]) > 1e-3,
            "the step moved the parameters"
        );
    }

    #[test]
    fn fused_adamw_matches_the_textbook_update() {
        tch::manual_seed(0);
        let p0 = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let p = p0.copy();
        let m = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
        let v = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
        let s = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let (lr, b1, b2, wd, eps) = (0.01, 0.9, 0.999, 0.1, 1e-8);
        let mut pr = p0.to_kind(Kind::Double);
        let mut mr = pr.zeros_like();
        let mut vr = pr.zeros_like();
        for step in 1..=3 {
            let g = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
            fused_adamw(
                &[p.shallow_clone()],
                &[g.shallow_clone()],
                &[m.shallow_clone()],
                &[v.shallow_clone()],
                &[s.shallow_clone()],
                lr,
                (b1, b2),
                wd,
                eps,
            )
            .unwrap();
            let gd = g.to_kind(Kind::Double);
            pr = &pr * (1.0 - lr * wd);
            mr = &mr * b1 + &gd * (1.0 - b1);
            vr = &vr * b2 + &gd * &gd * (1.0 - b2);
            let mhat = &mr / (1.0 - b1.powi(step));
            let vhat = &vr / (1.0 - b2.powi(step));
            pr = &pr - mhat / (vhat.sqrt() + eps) * lr;
        }
        let err = (p.to_kind(Kind::Double) - &pr).abs().max().double_value(&[]);
        assert!(err < 1e-6, "max error {err}");
        assert_eq!(s.double_value(&[]), 3.0);
    }

    #[test]
    fn foreach_lerp_and_clip() {
        let a = Tensor::from_slice(&[0.0f32, 0.0]);
        let b = Tensor::from_slice(&[1.0f32, 2.0]);
        foreach_lerp(&[a.shallow_clone()], &[b.shallow_clone()], 0.25).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![0.25, 0.5]);
        let g1 = Tensor::from_slice(&[3.0f32, f32::NAN]);
        let g2 = Tensor::from_slice(&[4.0f32]);
        let norm = sanitize_and_clip(&[g1.shallow_clone(), g2.shallow_clone()], 1.0).unwrap().unwrap();
        assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
        let v1 = Vec::<f32>::try_from(&g1).unwrap();
        assert!((v1[0] - 0.6).abs() < 1e-5 && v1[1] == 0.0);
        assert!((Vec::<f32>::try_from(&g2).unwrap()[0] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let t = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let c = channels_last(&t).unwrap();
        assert_eq!(c.stride(), vec![60, 1, 15, 3]);
        assert_eq!((&c - &t).abs().max().double_value(&[]), 0.0);
        let w = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let w0 = w.copy();
        to_channels_last(&[w.shallow_clone()]).unwrap();
        assert_eq!(w.stride(), vec![60, 1, 15, 3]);
        assert_eq!((&w - &w0).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn tf32_switch_round_trips() {
        set_tf32(true);
        assert!(tf32_enabled());
        set_tf32(false);
        assert!(!tf32_enabled());
    }

    #[test]
    fn autocast_guard_sets_and_restores() {
        assert!(!AutocastBf16::is_enabled());
        {
            let _g = AutocastBf16::new(true).unwrap();
            assert!(AutocastBf16::is_enabled());
        }
        assert!(!AutocastBf16::is_enabled());
    }
}
