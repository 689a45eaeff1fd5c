//! All-reduce bandwidth of dmdpipe's NCCL path, in nccl-tests' terms: algorithm bandwidth
//! (bytes / time) and bus bandwidth (x 2(n-1)/n, comparable across GPU counts). Run under a
//! launcher; `bench/nccl_bandwidth.py` measures `torch.distributed.all_reduce` the same way (same
//! default sizes, 5 untimed and 20 timed calls).

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};

/// Times `iters` all-reduces of each size (bytes) after `warmup` untimed ones; rank 0 returns
/// the table, other ranks Null.
pub fn bench_all_reduce(sizes: &[usize], warmup: usize, iters: usize) -> Result<Value> {
    let g = crate::dist::init_from_env()?.context("bench all-reduce runs under torchrun, srun or `dmdpipe launch`")?;
    let device = tch::Device::Cuda(g.local_rank);
    let n = g.world as f64;
    let mut rows = Vec::new();
    for &bytes in sizes {
        let t = Tensor::ones([(bytes / 4) as i64], (Kind::Float, device));
        for _ in 0..warmup {
            crate::dist::all_reduce_sum_flat(&t)?;
        }
        tch::Cuda::synchronize(g.local_rank as i64);
        let start = Instant::now();
        for _ in 0..iters {
            crate::dist::all_reduce_sum_flat(&t)?;
        }
        tch::Cuda::synchronize(g.local_rank as i64);
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        let alg = bytes as f64 / secs / 1e9;
        rows.push(json!({ "bytes": bytes, "us": secs * 1e6, "algbw_GBps": alg, "busbw_GBps": alg * 2.0 * (n - 1.0) / n }));
    }
    let mut out = Map::new();
    out.insert("ranks".into(), g.world.into());
    out.insert("nccl_version".into(), crate::dist::nccl::version().unwrap_or(0).into());
    out.insert("rows".into(), Value::Array(rows));
    crate::dist::leave();
    Ok(if g.rank == 0 { Value::Object(out) } else { Value::Null })
}
