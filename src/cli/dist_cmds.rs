//! The data-parallel commands: stage-worker, dist-check, launch.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::{Globals, init_logging};

pub fn stage_worker(g: Globals, job: &Path) -> Result<ExitCode> {
    init_logging(g.verbose, None);
    crate::pipeline::workers::run_worker(job)?;
    Ok(ExitCode::SUCCESS)
}

pub fn dist_check(dir: &Path) -> Result<ExitCode> {
    let env = crate::dist::rendezvous::Env::from_process()?
        .context("no launcher environment: WORLD_SIZE > 1 (torchrun) or SLURM_NTASKS > 1 (srun)")?;
    let id: Option<[u8; crate::dist::nccl::UNIQUE_ID_BYTES]> = (env.rank == 0).then(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        std::array::from_fn(|i| (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u128 * 1442695040888963407) >> 64) as u8)
    });
    let timeout = std::time::Duration::from_secs(60);
    let store = crate::dist::rendezvous::open_store(&env, 0, timeout)?;
    let got = crate::dist::rendezvous::exchange_id(&store, &env, id, timeout)?;
    std::fs::write(
        dir.join(format!("rank{}.txt", env.rank)),
        format!("{} {} {}", env.world, env.local_rank, hex::encode(&got[..16])),
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn launch(
    nproc: usize,
    nnodes: usize,
    node_rank: usize,
    master_addr: String,
    master_port: Option<u16>,
    args: Vec<String>,
) -> Result<ExitCode> {
    let spec = crate::dist::launch::LaunchSpec {
        nproc,
        nnodes,
        node_rank,
        master_addr,
        master_port,
    };
    crate::dist::launch::launch(&spec, &args)?;
    Ok(ExitCode::SUCCESS)
}
