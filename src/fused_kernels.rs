//! Fused CUDA kernels of our own, compiled at run time by NVRTC (src/shim/fused_kernels.cpp):
//! GroupNorm with the shift before it and the SiLU after it in two passes over memory, a UNet
//! block's residual sum with its biases and scaling in one, and the decoder's join of a block's
//! input with its skip, on channels-last bf16 or fp32
//! activations, forward and backward, under autograd. Every other
//! case (the CPU, NCHW tensors, other dtypes) runs the eager libtorch ops, which stay the
//! reference the kernels are tested against (`tests/fused_kernels.rs`, on a GPU).

use anyhow::{Result, bail};
use tch::Tensor;

use std::sync::OnceLock;

use crate::cuda_graph::{ErrFn, shim_symbol};

/// The kernels' CUDA source (one NVRTC program), handed to the shim when it is loaded.
const SOURCE: &str = concat!(
    include_str!("shim/kernels/group_norm.cu"),
    include_str!("shim/kernels/skip_sum.cu"),
    include_str!("shim/kernels/channel_cat.cu")
);

type CTensor = *mut torch_sys::C_tensor;

type GroupNormFn = unsafe extern "C" fn(CTensor, CTensor, CTensor, CTensor, i64, f64, libc::c_int, CTensor) -> libc::c_int;

type SkipSumFn = unsafe extern "C" fn(CTensor, CTensor, CTensor, CTensor, f64, CTensor) -> libc::c_int;

type ChannelCatFn = unsafe extern "C" fn(CTensor, CTensor, CTensor) -> libc::c_int;

struct Api {
    group_norm: GroupNormFn,
    skip_sum: SkipSumFn,
    channel_cat: ChannelCatFn,
    last_error: ErrFn,
}

/// The shim's entry points, with the kernel source handed over once; None without the shim.
fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| {
        let (set_source, last_error) = match shim_symbol("dmdc_set_kernel_source") {
            Ok(s) => s,
            Err(e) => {
                // Only a binary built without CUDA headers gets here on a CUDA device.
                tracing::warn!("fused kernels unavailable ({e:#}); running the eager ops");
                return None;
            }
        };
        let (group_norm, _) = shim_symbol("dmdc_group_norm").ok()?;
        let (skip_sum, _) = shim_symbol("dmdc_skip_sum").ok()?;
        let (channel_cat, _) = shim_symbol("dmdc_channel_cat").ok()?;
        let source = std::ffi::CString::new(SOURCE).expect("no NUL in the kernel source");
        unsafe {
            let set: unsafe extern "C" fn(*const libc::c_char) = std::mem::transmute(set_source);
            set(source.as_ptr());
            Some(Api {
                group_norm: std::mem::transmute::<*mut libc::c_void, GroupNormFn>(group_norm),
                skip_sum: std::mem::transmute::<*mut libc::c_void, SkipSumFn>(skip_sum),
                channel_cat: std::mem::transmute::<*mut libc::c_void, ChannelCatFn>(channel_cat),
                last_error,
            })
        }
    })
    .as_ref()
}

/// `act(group_norm(x + shift) * weight + bias)`, act = SiLU or identity, in the fused kernels;
/// `None` where they do not apply (not a channels-last CUDA tensor in bf16 or fp32, or no CUDA
/// shim in this binary). `shift` is [N, C, 1, 1] or [1, C, 1, 1]; weight and bias are [C], or
/// [N, C] when each sample has its own (ADM's adaptive scale).
pub fn group_norm_act(
    x: &Tensor,
    shift: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    shim_call(x, |api, out| unsafe {
        (api.group_norm)(
            x.as_ptr() as CTensor,
            optional(shift),
            weight.as_ptr() as CTensor,
            bias.as_ptr() as CTensor,
            groups,
            eps,
            silu as libc::c_int,
            out,
        )
    })
}

/// `(a + b + bias_a + bias_b) * scale` (a UNet block's residual sum) in one fused pass; `None`
/// where the kernel does not apply (a and b not both channels-last CUDA tensors of one shape in
/// bf16 or fp32). The biases are [C] parameters; each gets a gradient of its own.
pub fn skip_sum(a: &Tensor, b: &Tensor, bias_a: Option<&Tensor>, bias_b: Option<&Tensor>, scale: f64) -> Result<Option<Tensor>> {
    shim_call(a, |api, out| unsafe {
        (api.skip_sum)(
            a.as_ptr() as CTensor,
            b.as_ptr() as CTensor,
            optional(bias_a),
            optional(bias_b),
            scale,
            out,
        )
    })
}

/// `[a, b]` along the channels (the UNet decoder joining its input with a skip) in one pass of
/// whole vectors; `None` where the kernel does not apply (not two channels-last CUDA tensors of
/// one batch, size and dtype, bf16 or fp32). As with `Tensor::cat`, each input's gradient is its
/// slice of the output's.
pub fn channel_cat(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    shim_call(a, |api, out| unsafe {
        (api.channel_cat)(a.as_ptr() as CTensor, b.as_ptr() as CTensor, out)
    })
}

/// One kernel call through the shim for an input on `x`'s device: `None` off CUDA or without the
/// shim; else `call` gets the API and the tensor handle the shim writes its output into.
fn shim_call(x: &Tensor, call: impl FnOnce(&Api, CTensor) -> libc::c_int) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() {
        return Ok(None);
    }
    let Some(api) = api() else {
        return Ok(None);
    };
    let out = Tensor::zeros([0], (tch::Kind::Float, tch::Device::Cpu));
    let rc = call(api, out.as_ptr() as CTensor);
    answer(api, rc, out)
}

/// An optional tensor as the shim takes it: null when absent.
fn optional(t: Option<&Tensor>) -> CTensor {
    t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as CTensor)
}

/// The shim's return code as a result: 0 the output, 2 not applicable, else its error.
fn answer(api: &Api, rc: libc::c_int, out: Tensor) -> Result<Option<Tensor>> {
    match rc {
        0 => Ok(Some(out)),
        2 => Ok(None),
        _ => {
            let msg = unsafe { std::ffi::CStr::from_ptr((api.last_error)()).to_string_lossy().into_owned() };
            bail!("{msg}")
        }
    }
}
