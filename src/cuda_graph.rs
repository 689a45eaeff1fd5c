//! CUDA-graph capture and replay of a whole training iteration.
//!
//! Small networks are bound by kernel launches, not arithmetic: a DMD iteration of the 8.8M
//! speedrun network issues thousands of kernels. Captured once into a CUDA graph, the iteration
//! is replayed with a single launch. The capture code (src/shim/cuda_graph.cpp) is a separate
//! shared library embedded in the binary and loaded only after libtorch_cuda, so CPU-only
//! machines never need it.

use std::ffi::CStr;
use std::sync::OnceLock;

use anyhow::{Result, bail};

pub type ErrFn = unsafe extern "C" fn() -> *const libc::c_char;
type StatusFn = unsafe extern "C" fn() -> libc::c_int;
type GraphFn = unsafe extern "C" fn(*mut libc::c_void) -> libc::c_int;

struct Api {
    last_error: ErrFn,
    enter_side_stream: StatusFn,
    exit_side_stream: StatusFn,
    graph_new: unsafe extern "C" fn() -> *mut libc::c_void,
    graph_free: unsafe extern "C" fn(*mut libc::c_void),
    capture_begin: GraphFn,
    capture_end: GraphFn,
    replay: GraphFn,
    current_stream: unsafe extern "C" fn() -> *mut libc::c_void,
    set_device: unsafe extern "C" fn(libc::c_int) -> libc::c_int,
    /// The dlopen handle, for [`shim_symbol`].
    handle: usize,
}

#[cfg(dmd_cuda_graph)]
static SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libdmdpipe_cuda.so"));
#[cfg(not(dmd_cuda_graph))]
static SHIM: &[u8] = &[];

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Whether whole-iteration capture can be used (a CUDA device and the shim loaded).
pub fn available() -> bool {
    crate::torch_shim::init_cuda() && api().is_ok()
}

/// Why capture is unavailable, for the log.
pub fn unavailable_reason() -> Option<String> {
    if !crate::torch_shim::init_cuda() {
        return Some("no CUDA".into());
    }
    api().err().map(|e| e.to_string())
}

fn load() -> Result<Api> {
    use sha2::Digest;
    if SHIM.is_empty() {
        bail!("this binary was built without CUDA headers, so without CUDA-graph capture");
    }
    if !crate::torch_shim::init_cuda() {
        bail!("libtorch_cuda is not loaded");
    }
    let digest = hex::encode(&sha2::Sha256::digest(SHIM)[..8]);
    let path = std::env::temp_dir().join(format!("dmdpipe-cuda-graph-{digest}.so"));
    if !path.exists() {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, SHIM)?;
        std::fs::rename(&tmp, &path)?;
    }
    let cpath = std::ffi::CString::new(path.to_string_lossy().as_bytes())?;
    let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        let err = unsafe { CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned() };
        bail!("loading {}: {err}", path.display());
    }
    macro_rules! sym {
        ($name:literal) => {{
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr() as *const libc::c_char) };
            if p.is_null() {
                bail!("{} lacks {}", path.display(), $name);
            }
            // The target is the field's function-pointer type, which the struct literal fixes.
            #[allow(clippy::missing_transmute_annotations)]
            unsafe {
                std::mem::transmute::<*mut libc::c_void, _>(p)
            }
        }};
    }
    Ok(Api {
        last_error: sym!("dmdc_last_error"),
        enter_side_stream: sym!("dmdc_enter_side_stream"),
        exit_side_stream: sym!("dmdc_exit_side_stream"),
        graph_new: sym!("dmdc_graph_new"),
        graph_free: sym!("dmdc_graph_free"),
        capture_begin: sym!("dmdc_capture_begin"),
        capture_end: sym!("dmdc_capture_end"),
        replay: sym!("dmdc_replay"),
        current_stream: sym!("dmdc_current_stream"),
        set_device: sym!("dmdc_set_device"),
        handle: handle as usize,
    })
}

/// A symbol of the loaded CUDA shim (src/shim/fused_kernels.cpp's, for the fused kernels), and
/// the shim's `dmdc_last_error`.
pub fn shim_symbol(name: &str) -> Result<(*mut libc::c_void, ErrFn)> {
    let api = api()?;
    let cname = std::ffi::CString::new(name)?;
    let p = unsafe { libc::dlsym(api.handle as *mut libc::c_void, cname.as_ptr()) };
    if p.is_null() {
        bail!("the CUDA shim lacks {name}");
    }
    Ok((p, api.last_error))
}

fn check(api: &Api, rc: libc::c_int, what: &str) -> Result<()> {
    if rc != 0 {
        let msg = unsafe { CStr::from_ptr((api.last_error)()).to_string_lossy().into_owned() };
        bail!("{what}: {msg}");
    }
    Ok(())
}

/// The current CUDA stream (a `cudaStream_t`), where NCCL collectives are enqueued.
pub fn current_stream() -> Result<*mut libc::c_void> {
    Ok(unsafe { (api()?.current_stream)() })
}

/// Makes `index` the current CUDA device (NCCL communicators bind to it).
pub fn set_device(index: usize) -> Result<()> {
    let api = api()?;
    check(api, unsafe { (api.set_device)(index as libc::c_int) }, "setting the CUDA device")
}

/// Runs the current thread's CUDA work on a fresh side stream while alive (capture needs a
/// non-default stream; warm-up, capture and replays share it so their order is kept).
pub struct SideStream {
    api: &'static Api,
}

impl SideStream {
    pub fn enter() -> Result<Self> {
        let api = api()?;
        check(api, unsafe { (api.enter_side_stream)() }, "switching to a side stream")?;
        Ok(SideStream { api })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        unsafe { (self.api.exit_side_stream)() };
    }
}

/// A captured CUDA graph. Tensors allocated during capture live in the graph's private memory
/// pool and are overwritten by every replay.
pub struct CudaGraph {
    api: &'static Api,
    ptr: *mut libc::c_void,
}

impl CudaGraph {
    /// Captures the CUDA work that `body` issues (nothing runs yet) and returns its result, whose
    /// tensors each replay refreshes. `body` must not synchronise with the host.
    pub fn capture<T>(body: impl FnOnce() -> Result<T>) -> Result<(CudaGraph, T)> {
        let api = api()?;
        let ptr = unsafe { (api.graph_new)() };
        if ptr.is_null() {
            check(api, 1, "creating a CUDA graph")?;
        }
        let graph = CudaGraph { api, ptr };
        check(api, unsafe { (api.capture_begin)(ptr) }, "beginning CUDA-graph capture")?;
        // A panic inside (tch panics on a failed kernel launch) must still end the capture, or
        // the stream stays in capture mode and every later CUDA call on it fails.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(anyhow::anyhow!("{}", msg.lines().next().unwrap_or_default()))
        });
        let end = check(api, unsafe { (api.capture_end)(ptr) }, "ending CUDA-graph capture");
        let out = out.map_err(|e| e.context("inside CUDA-graph capture (set cuda_graph = false to run eagerly)"))?;
        end?;
        Ok((graph, out))
    }

    pub fn replay(&self) -> Result<()> {
        check(self.api, unsafe { (self.api.replay)(self.ptr) }, "replaying a CUDA graph")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        unsafe { (self.api.graph_free)(self.ptr) };
    }
}

/// A training step run eagerly, or (when enabled: CUDA and the shim present) eagerly for its
/// first calls (cuDNN picks its algorithms, lazy state is created), then captured once and
/// replayed on every later call. The step returns a tensor, copied out of the graph's pool.
pub struct CapturedStep {
    enabled: bool,
    eager_left: u64,
    what: &'static str,
    graph: Option<(CudaGraph, tch::Tensor)>,
    _side: Option<SideStream>,
}

impl CapturedStep {
    /// `want`: the caller's option; capture happens only where it is also available. While
    /// alive, an enabled runner keeps the thread's CUDA work on a side stream.
    pub fn new(want: bool, cuda: bool, eager_calls: u64, what: &'static str) -> Result<Self> {
        let enabled = want && cuda && available();
        if want && cuda && !enabled {
            tracing::warn!(
                reason = unavailable_reason().unwrap_or_default(),
                "CUDA-graph capture unavailable; running {what} eagerly"
            );
        }
        let side = enabled.then(SideStream::enter).transpose()?;
        Ok(CapturedStep {
            enabled,
            eager_left: eager_calls,
            what,
            graph: None,
            _side: side,
        })
    }

    pub fn run(&mut self, step: &dyn Fn() -> Result<tch::Tensor>) -> Result<tch::Tensor> {
        if !self.enabled || self.eager_left > 0 {
            self.eager_left = self.eager_left.saturating_sub(1);
            return step();
        }
        if self.graph.is_none() {
            match CudaGraph::capture(step) {
                Ok(g) => {
                    self.graph = Some(g);
                    tracing::info!("captured the {} as a CUDA graph", self.what);
                }
                Err(e) => {
                    // Nothing recorded in a capture has run, so the step can simply run eagerly.
                    tracing::warn!("capturing the {} as a CUDA graph failed ({e:#}); running it eagerly", self.what);
                    self.enabled = false;
                    return step();
                }
            }
        }
        let (g, out) = self.graph.as_ref().expect("captured above");
        g.replay()?;
        Ok(out.copy())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_the_cpu_a_captured_step_runs_eagerly_every_time() {
        let calls = std::cell::Cell::new(0);
        let mut r = super::CapturedStep::new(true, false, 3, "test step").unwrap();
        for i in 1..=5 {
            let out = r
                .run(&|| {
                    calls.set(calls.get() + 1);
                    Ok(tch::Tensor::from(calls.get() as f32))
                })
                .unwrap();
            assert_eq!(out.double_value(&[]), i as f64);
        }
        assert_eq!(calls.get(), 5);
    }

    #[test]
    fn without_cuda_capture_is_unavailable_with_a_reason() {
        if !crate::torch_shim::init_cuda() {
            assert!(!super::available());
            assert!(super::unavailable_reason().unwrap().contains("CUDA"));
        }
    }
}
