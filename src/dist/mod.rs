//! Data-parallel training on several GPUs: one process per GPU, the same model on each,
//! gradients averaged through NCCL before every optimiser step.
//!
//! A process joins the group with [`init_from_env`] (torchrun's or Slurm's variables; `dmdpipe
//! launch` sets torchrun's for N local processes); the ranks meet at a c10d store
//! ([`rendezvous`]), which stays open while the group lives and carries the runner's jobs. The
//! group is process-global, like PyTorch's default process group: the training loops ask it for
//! the rank (seeds, batch share, who writes) and the optimiser all-reduces through it. Without a
//! group every call here is a no-op and training is single-process.

pub mod bucket;
pub mod launch;
pub mod nccl;
pub mod preempt;
pub mod rendezvous;
pub mod store;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};

pub struct Group {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Formed from the launcher's environment at start-up (torchrun, Slurm, `dmdpipe launch`),
    /// rather than by the runner for one stage.
    pub launched: bool,
    /// The rendezvous store (rank 0 may be serving it: it lives as long as the group).
    pub store: store::Store,
    comm: nccl::Communicator,
}

static GROUP: RwLock<Option<Arc<Group>>> = RwLock::new(None);

/// Joins the group described by the environment, if any. The process uses CUDA device
/// LOCAL_RANK.
pub fn init_from_env() -> Result<Option<Arc<Group>>> {
    if let Some(g) = group() {
        return Ok(Some(g));
    }
    match rendezvous::Env::from_process()? {
        Some(env) => join(&env, true).map(Some),
        None => Ok(None),
    }
}

/// Joins the group `env` describes (rendezvous with rank 0, then an NCCL communicator) and makes
/// it this process's group until [`leave`].
pub fn join(env: &rendezvous::Env, launched: bool) -> Result<Arc<Group>> {
    if !crate::torch_shim::init_cuda() {
        bail!("WORLD_SIZE={} asks for data parallelism, which needs CUDA and NCCL", env.world);
    }
    let visible = tch::Cuda::device_count() as usize;
    if env.local_rank >= visible {
        bail!(
            "rank {} has local rank {} but this host shows {visible} CUDA device(s): one GPU per rank on each host (nproc_per_node <= GPUs)",
            env.rank,
            env.local_rank
        );
    }
    crate::cuda_graph::set_device(env.local_rank)?;
    let id = if env.rank == 0 { Some(nccl::unique_id()?.internal) } else { None };
    let timeout = Duration::from_secs(300);
    let store = rendezvous::open_store(env, rendezvous::next_generation(), timeout)?;
    let id = rendezvous::exchange_id(&store, env, id, timeout)?;
    let comm = nccl::Communicator::new(env.world, env.rank, nccl::UniqueId { internal: id })
        .with_context(|| format!("rank {} of {}", env.rank, env.world))?;
    tracing::info!(
        rank = env.rank,
        world = env.world,
        nccl = nccl::version().unwrap_or(0),
        "joined the data-parallel group"
    );
    let g = Arc::new(Group {
        rank: env.rank,
        world: env.world,
        local_rank: env.local_rank,
        launched,
        store,
        comm,
    });
    *GROUP.write().expect("group lock") = Some(g.clone());
    Ok(g)
}

/// Leaves the current group (its communicator is destroyed when the last handle goes).
pub fn leave() {
    *GROUP.write().expect("group lock") = None;
}

pub fn group() -> Option<Arc<Group>> {
    GROUP.read().expect("group lock").clone()
}

pub fn rank() -> usize {
    group().map_or(0, |g| g.rank)
}

pub fn world() -> usize {
    group().map_or(1, |g| g.world)
}

/// Rank 0 (or no group): the process that writes checkpoints, metrics and pictures.
pub fn is_main() -> bool {
    rank() == 0
}

/// The CUDA device of this process (LOCAL_RANK in a group, else `default`).
pub fn local_device(default: tch::Device) -> tch::Device {
    match (group(), default) {
        (Some(g), tch::Device::Cuda(_)) => tch::Device::Cuda(g.local_rank),
        _ => default,
    }
}

/// The seed of this rank's data and noise streams: `seed` on rank 0, decorrelated on the others.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    // splitmix64 of (seed, rank)
    let mut z = seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 1
}

/// This rank's share of a global batch (the configured batch is global, so results and cache
/// keys do not depend on the GPU count).
pub fn batch_share(global: usize, world: usize) -> Result<usize> {
    if !global.is_multiple_of(world) {
        bail!("batch {global} does not split evenly over {world} GPUs");
    }
    Ok(global / world)
}

/// How many micro-batches a GPU's share `per_gpu` of the global batch is computed in: the
/// fewest whose size (dividing `per_gpu` evenly) is at most `micro_batch`; one without a cap.
pub fn micro_batches(per_gpu: usize, micro_batch: Option<usize>) -> Result<usize> {
    let Some(cap) = micro_batch else { return Ok(1) };
    if cap == 0 {
        bail!("micro_batch must be at least 1");
    }
    let fewest = per_gpu.div_ceil(cap).max(1);
    (fewest..=per_gpu.max(1))
        .find(|k| per_gpu.is_multiple_of(*k))
        .ok_or_else(|| anyhow::anyhow!("no micro-batch count splits {per_gpu} evenly"))
}

fn stream() -> Result<*mut libc::c_void> {
    crate::cuda_graph::current_stream()
}

/// Averages f32 CUDA tensors over the group in place (no-op without a group).
pub fn all_reduce_mean(ts: &[Tensor]) -> Result<()> {
    let Some(g) = group() else { return Ok(()) };
    let s = stream()?;
    bucket::reduce_in_buckets(ts, bucket::DEFAULT_CAP_BYTES, |flat| {
        // SAFETY: `flat` is a live contiguous f32 CUDA tensor of `numel` values; the caller's
        // stream orders the reduction before any later use of it.
        unsafe { g.comm.all_reduce_f32(flat.data_ptr(), flat.numel(), nccl::AVG, s) }
    })
}

/// Sums one contiguous f32 CUDA tensor over the group in place, as one NCCL call (no buckets:
/// what a bandwidth measurement wants).
pub fn all_reduce_sum_flat(t: &Tensor) -> Result<()> {
    let Some(g) = group() else { return Ok(()) };
    if !t.is_contiguous() || t.kind() != Kind::Float {
        bail!("all_reduce_sum_flat needs a contiguous f32 tensor");
    }
    // SAFETY: `t` is a live contiguous f32 CUDA tensor of `numel` values, used on this stream.
    unsafe { g.comm.all_reduce_f32(t.data_ptr(), t.numel(), nccl::SUM, stream()?) }
}

/// Copies rank 0's values of `ts` to every rank (no-op without a group).
pub fn broadcast_from_main(ts: &[Tensor]) -> Result<()> {
    let Some(g) = group() else { return Ok(()) };
    let s = stream()?;
    bucket::reduce_in_buckets(ts, bucket::DEFAULT_CAP_BYTES, |flat| {
        // SAFETY: as above.
        unsafe { g.comm.broadcast_f32(flat.data_ptr(), flat.numel(), 0, s) }
    })
}

/// Fails when the ranks' copies of `ts` differ (a checksum compared by min and max over ranks).
pub fn check_identical(ts: &[Tensor], what: &str) -> Result<()> {
    let Some(g) = group() else { return Ok(()) };
    let parts: Vec<Tensor> = ts
        .iter()
        .map(|t| {
            let d = t.to_kind(Kind::Double);
            Tensor::stack(&[d.sum(Kind::Double), d.square().sum(Kind::Double)], 0)
        })
        .collect();
    let sum = Tensor::stack(&parts, 0)
        .sum_dim_intlist([0i64].as_slice(), false, Kind::Double)
        .to_kind(Kind::Float);
    let (lo, hi) = (sum.copy(), sum.copy());
    let s = stream()?;
    // SAFETY: `lo` and `hi` are live 2-value f32 CUDA tensors, read back below on the same stream.
    unsafe {
        g.comm.all_reduce_f32(lo.data_ptr(), 2, nccl::MIN, s)?;
        g.comm.all_reduce_f32(hi.data_ptr(), 2, nccl::MAX, s)?;
    }
    let (lo, hi) = (Vec::<f32>::try_from(&lo)?, Vec::<f32>::try_from(&hi)?);
    if lo != hi {
        bail!("{what} differ across ranks (checksums {lo:?} vs {hi:?})");
    }
    Ok(())
}

/// Rank 0's answer to a yes/no question, on every rank (e.g. "stop now?": ranks that disagree
/// on it would wait for each other forever).
pub fn agree(answer: bool) -> Result<bool> {
    let Some(g) = group() else { return Ok(answer) };
    let dev = tch::Device::Cuda(g.local_rank);
    let t = Tensor::from(answer as i32 as f32).to_device(dev);
    // SAFETY: `t` is a live 1-value f32 CUDA tensor, read back below on the same stream.
    unsafe { g.comm.broadcast_f32(t.data_ptr(), 1, 0, stream()?)? };
    Ok(t.double_value(&[]) != 0.0)
}

/// With DMDPIPE_DIST_CHECK_EVERY=K (debug mode), the training loops compare a digest of the
/// parameters across ranks every K steps.
pub fn debug_check_every() -> u64 {
    std::env::var("DMDPIPE_DIST_CHECK_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The average of a tensor over ranks (e.g. a logged loss); a copy, the input is untouched.
pub fn mean_over_ranks(t: &Tensor) -> Result<Tensor> {
    let out = t.to_kind(Kind::Float).copy();
    all_reduce_mean(&[out.shallow_clone()])?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn micro_batches_are_the_fewest_even_split_under_the_cap() {
        use super::micro_batches;
        assert_eq!(micro_batches(392, None).unwrap(), 1);
        assert_eq!(micro_batches(392, Some(56)).unwrap(), 7);
        assert_eq!(micro_batches(392, Some(100)).unwrap(), 4); // 98 each
        assert_eq!(micro_batches(392, Some(400)).unwrap(), 1);
        assert_eq!(micro_batches(7, Some(2)).unwrap(), 7); // a prime: single images
        assert!(micro_batches(8, Some(0)).is_err());
    }

    use super::*;

    #[test]
    fn rank_seeds_are_distinct_and_rank_zero_keeps_the_run_seed() {
        assert_eq!(rank_seed(42, 0), 42);
        let seeds: std::collections::HashSet<u64> = (0..64).map(|r| rank_seed(42, r)).collect();
        assert_eq!(seeds.len(), 64);
        assert_ne!(rank_seed(42, 1), rank_seed(43, 1));
        assert!((0..64).all(|r| rank_seed(7, r) < (1 << 63)), "fits tch's i64 seed");
    }

    #[test]
    fn batch_shares_split_the_global_batch() {
        assert_eq!(batch_share(512, 1).unwrap(), 512);
        assert_eq!(batch_share(392, 7).unwrap(), 56);
        assert!(batch_share(100, 8).unwrap_err().to_string().contains("8 GPUs"));
    }

    #[test]
    fn without_a_group_collectives_are_no_ops() {
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        all_reduce_mean(&[t.shallow_clone()]).unwrap();
        broadcast_from_main(&[t.shallow_clone()]).unwrap();
        check_identical(&[t.shallow_clone()], "x").unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert!(is_main() && world() == 1);
    }
}
