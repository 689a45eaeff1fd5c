//! A key-value store shared by the ranks of a group: libtorch's c10d TCPStore (through the C++
//! shim), so that dmdpipe speaks the protocol of the store torchrun's agent serves, and serves
//! the same one itself when nothing else does.

use std::ffi::{CStr, CString, c_char, c_int, c_long, c_uchar, c_void};
use std::time::Duration;

use anyhow::{Result, bail};

unsafe extern "C" {
    fn dmd_store_last_error() -> *const c_char;
    fn dmd_store_open(host: *const c_char, port: c_int, is_server: c_int, prefix: *const c_char, timeout_ms: c_long) -> *mut c_void;
    fn dmd_store_close(handle: *mut c_void);
    fn dmd_store_port(handle: *mut c_void) -> c_int;
    fn dmd_store_set(handle: *mut c_void, key: *const c_char, data: *const c_uchar, len: c_long) -> c_int;
    fn dmd_store_get(handle: *mut c_void, key: *const c_char, buf: *mut c_uchar, cap: c_long, len: *mut c_long) -> c_int;
    fn dmd_store_set_timeout(handle: *mut c_void, timeout_ms: c_long) -> c_int;
    fn dmd_store_add(handle: *mut c_void, key: *const c_char, delta: c_long, value: *mut c_long) -> c_int;
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(dmd_store_last_error()) }.to_string_lossy().into_owned()
}

fn c_string(s: &str) -> Result<CString> {
    Ok(CString::new(s).map_err(|_| anyhow::anyhow!("store key or address `{s}` contains a NUL byte"))?)
}

/// An open store (client, or server and client at once); closed on drop.
pub struct Store {
    handle: *mut c_void,
    what: String,
}

// The c10d store is thread-safe; the handle is only an owning pointer to it.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Opens the store at `host:port` as its server (`serve`) or as a client (retrying until the
    /// server is up, for at most `timeout`, which also bounds every `get`). Keys are prefixed
    /// with `prefix`.
    pub fn open(host: &str, port: u16, serve: bool, prefix: &str, timeout: Duration) -> Result<Store> {
        let (h, p) = (c_string(host)?, c_string(prefix)?);
        let ms = timeout.as_millis().min(c_long::MAX as u128) as c_long;
        let handle = unsafe { dmd_store_open(h.as_ptr(), port as c_int, serve as c_int, p.as_ptr(), ms) };
        let what = format!("{} store at {host}:{port}", if serve { "serving the" } else { "the" });
        if handle.is_null() {
            bail!("{what}: {}", last_error());
        }
        Ok(Store { handle, what })
    }

    /// The port the store listens on (a server opened on port 0 chose one).
    pub fn port(&self) -> u16 {
        unsafe { dmd_store_port(self.handle) }.max(0) as u16
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = c_string(key)?;
        if unsafe { dmd_store_set(self.handle, k.as_ptr(), value.as_ptr(), value.len() as c_long) } != 0 {
            bail!("{}: set `{key}`: {}", self.what, last_error());
        }
        Ok(())
    }

    /// The value of `key`, waiting for another rank to set it (up to the store's timeout).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = c_string(key)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let mut len: c_long = 0;
            let rc = unsafe { dmd_store_get(self.handle, k.as_ptr(), buf.as_mut_ptr(), buf.len() as c_long, &mut len) };
            if rc != 0 {
                bail!("{}: get `{key}`: {}", self.what, last_error());
            }
            if len as usize <= buf.len() {
                buf.truncate(len as usize);
                return Ok(buf);
            }
            buf.resize(len as usize, 0);
        }
    }

    /// How long a `get` waits from now on.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        let ms = timeout.as_millis().min(c_long::MAX as u128) as c_long;
        if unsafe { dmd_store_set_timeout(self.handle, ms) } != 0 {
            bail!("{}: {}", self.what, last_error());
        }
        Ok(())
    }

    /// Adds `delta` to the counter `key` and returns its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = c_string(key)?;
        let mut value: c_long = 0;
        if unsafe { dmd_store_add(self.handle, k.as_ptr(), delta as c_long, &mut value) } != 0 {
            bail!("{}: add `{key}`: {}", self.what, last_error());
        }
        Ok(value as i64)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { dmd_store_close(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_and_its_clients_share_keys_and_counters() {
        let server = Store::open("127.0.0.1", 0, true, "t/", Duration::from_secs(10)).unwrap();
        let port = server.port();
        assert!(port > 0);
        let client = Store::open("127.0.0.1", port, false, "t/", Duration::from_secs(10)).unwrap();
        let waiter = std::thread::spawn(move || {
            let c = Store::open("127.0.0.1", port, false, "t/", Duration::from_secs(10)).unwrap();
            c.get("late").unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        client.set("late", &[7u8; 5000]).unwrap();
        assert_eq!(waiter.join().unwrap(), vec![7u8; 5000]);
        assert_eq!(server.add("n", 2).unwrap(), 2);
        assert_eq!(client.add("n", 3).unwrap(), 5);
        // Another prefix is another namespace.
        let other = Store::open("127.0.0.1", port, false, "u/", Duration::from_millis(300)).unwrap();
        assert_eq!(other.add("n", 1).unwrap(), 1);
        let e = other.get("late").unwrap_err();
        assert!(format!("{e:#}").contains("late"), "{e:#}");
    }
}
