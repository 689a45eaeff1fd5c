//! NCCL through its C API, loaded at run time (libtorch_cuda already links libnccl.so.2, so it
//! is in the process whenever CUDA is). Only the calls data parallelism needs.

use std::ffi::CStr;
use std::sync::OnceLock;

use anyhow::{Result, bail};

pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; UNIQUE_ID_BYTES],
}

type Comm = *mut libc::c_void;
type Stream = *mut libc::c_void;

/// ncclDataType_t and ncclRedOp_t values (nccl.h).
pub const FLOAT32: libc::c_int = 7;
pub const SUM: libc::c_int = 0;
pub const MAX: libc::c_int = 2;
pub const MIN: libc::c_int = 3;
pub const AVG: libc::c_int = 4;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> libc::c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, libc::c_int, UniqueId, libc::c_int) -> libc::c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> libc::c_int,
    all_reduce: unsafe extern "C" fn(*const libc::c_void, *mut libc::c_void, usize, libc::c_int, libc::c_int, Comm, Stream) -> libc::c_int,
    broadcast: unsafe extern "C" fn(*const libc::c_void, *mut libc::c_void, usize, libc::c_int, libc::c_int, Comm, Stream) -> libc::c_int,
    error_string: unsafe extern "C" fn(libc::c_int) -> *const libc::c_char,
    version: unsafe extern "C" fn(*mut libc::c_int) -> libc::c_int,
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn load() -> Result<Api> {
    crate::torch_shim::init_cuda();
    let handle = unsafe { libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        let err = unsafe { CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned() };
        bail!("NCCL is not available (libnccl.so.2: {err})");
    }
    macro_rules! sym {
        ($name:literal) => {{
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr() as *const libc::c_char) };
            if p.is_null() {
                bail!("libnccl.so.2 lacks {}", $name);
            }
            // The target is the field's function-pointer type, which the struct literal fixes.
            #[allow(clippy::missing_transmute_annotations)]
            unsafe {
                std::mem::transmute::<*mut libc::c_void, _>(p)
            }
        }};
    }
    Ok(Api {
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank: sym!("ncclCommInitRank"),
        comm_destroy: sym!("ncclCommDestroy"),
        all_reduce: sym!("ncclAllReduce"),
        broadcast: sym!("ncclBroadcast"),
        error_string: sym!("ncclGetErrorString"),
        version: sym!("ncclGetVersion"),
    })
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc != 0 {
        let msg = api()
            .map(|a| unsafe { CStr::from_ptr((a.error_string)(rc)).to_string_lossy().into_owned() })
            .unwrap_or_default();
        bail!("NCCL {what} failed ({rc}): {msg}");
    }
    Ok(())
}

/// NCCL's version as an integer (e.g. 22805 for 2.28.5).
pub fn version() -> Result<i32> {
    let mut v = 0;
    check(unsafe { (api()?.version)(&mut v) }, "version")?;
    Ok(v)
}

pub fn unique_id() -> Result<UniqueId> {
    let mut id = UniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    check(unsafe { (api()?.get_unique_id)(&mut id) }, "get unique id")?;
    Ok(id)
}

/// A communicator of one rank, bound to the current CUDA device.
pub struct Communicator {
    comm: Comm,
}

// The communicator is used from the training thread only; NCCL handles are thread-agnostic.
unsafe impl Send for Communicator {}
unsafe impl Sync for Communicator {}

impl Communicator {
    pub fn new(world: usize, rank: usize, id: UniqueId) -> Result<Self> {
        let mut comm: Comm = std::ptr::null_mut();
        check(
            unsafe { (api()?.comm_init_rank)(&mut comm, world as libc::c_int, id, rank as libc::c_int) },
            "comm init",
        )?;
        Ok(Communicator { comm })
    }

    /// In-place all-reduce of `count` f32 values at `ptr` (device memory) on `stream`.
    ///
    /// # Safety
    /// `ptr` must point to at least `count` f32 values of device memory that stay alive until
    /// the operation on `stream` has completed.
    pub unsafe fn all_reduce_f32(&self, ptr: *mut libc::c_void, count: usize, op: libc::c_int, stream: Stream) -> Result<()> {
        check(
            unsafe { (api()?.all_reduce)(ptr, ptr, count, FLOAT32, op, self.comm, stream) },
            "all-reduce",
        )
    }

    /// In-place broadcast from `root` of `count` f32 values at `ptr` on `stream`.
    ///
    /// # Safety
    /// As for [`Communicator::all_reduce_f32`].
    pub unsafe fn broadcast_f32(&self, ptr: *mut libc::c_void, count: usize, root: usize, stream: Stream) -> Result<()> {
        check(
            unsafe { (api()?.broadcast)(ptr, ptr, count, FLOAT32, root as libc::c_int, self.comm, stream) },
            "broadcast",
        )
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            unsafe { (a.comm_destroy)(self.comm) };
        }
    }
}
