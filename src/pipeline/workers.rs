//! Data parallelism for a pipeline stage (the runner's, for any stage whose kind says it can run
//! data-parallel): the runner's process is rank 0; it writes a job file
//! (the stage's kind and params, its upstream and input paths) and starts one `dmdpipe
//! stage-worker JOB` per further GPU. Every rank runs the same stage code (resuming from rank 0's
//! checkpoint when there is one); only rank 0 writes checkpoints, metrics and outputs into the
//! cache (the workers' outputs go to scratch dirs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::dist::rendezvous::Env;
use crate::stages::{StageContext, StageSpec};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub kind: String,
    pub params: serde_json::Value,
    pub stage_name: String,
    pub upstream: BTreeMap<String, PathBuf>,
    pub inputs: BTreeMap<String, PathBuf>,
    pub device: String,
    pub devices: Vec<usize>,
    /// Rank 0's work directory: workers resume from the same checkpoint (they never write it).
    pub work_dir: PathBuf,
}

/// While alive, this process belongs to the stage's data-parallel group; on drop it leaves the
/// group and waits for (or, after a failure, stops) the workers it started.
pub struct StageGroup {
    children: Vec<(usize, Child)>,
    ok: bool,
}

impl StageGroup {
    /// Starts data parallelism for `spec` when `ctx.devices` names several GPUs and the stage
    /// runs on CUDA. None: a single process (inside a worker, too: it joined at start-up).
    pub fn start(ctx: &StageContext, spec: &StageSpec) -> Result<Option<StageGroup>> {
        if !spec.stage().data_parallel() || crate::dist::group().is_some() {
            return Ok(None); // a worker: joined at start-up
        }
        if ctx.devices.len() <= 1 {
            return Ok(None);
        }
        if !crate::stages::device_is_cuda(&ctx.device)? {
            tracing::warn!(devices = ?ctx.devices, "data parallelism needs CUDA; training in one process");
            return Ok(None);
        }
        let job = Job {
            kind: spec.kind().to_string(),
            params: spec.params_json(),
            stage_name: ctx.stage_name.clone(),
            upstream: ctx.upstream.clone(),
            inputs: ctx.inputs.clone(),
            device: ctx.device.clone(),
            devices: ctx.devices.clone(),
            work_dir: ctx.work_dir.clone(),
        };
        let job_path = ctx.work_dir.join("data-parallel-job.json");
        std::fs::write(&job_path, serde_json::to_vec_pretty(&job)?)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let world = ctx.devices.len();
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for (rank, &dev) in ctx.devices.iter().enumerate().skip(1) {
            let child = Command::new(&exe)
                .arg("stage-worker")
                .arg(&job_path)
                .envs(worker_env(rank, world, dev, port))
                .spawn()
                .with_context(|| format!("starting data-parallel rank {rank}"))?;
            children.push((rank, child));
        }
        let mut guard = StageGroup { children, ok: false };
        let env = Env {
            rank: 0,
            world,
            local_rank: ctx.devices[0],
            master: format!("127.0.0.1:{port}"),
        };
        crate::dist::join(&env)?;
        guard.ok = true;
        Ok(Some(guard))
    }

    /// Waits for every worker to finish; an error names the first that failed.
    pub fn finish(mut self) -> Result<()> {
        crate::dist::leave();
        let mut first_err = None;
        for (rank, mut c) in std::mem::take(&mut self.children) {
            let status = c.wait()?;
            if !status.success() && first_err.is_none() {
                first_err = Some(format!("data-parallel rank {rank} exited with {status}"));
            }
        }
        match first_err {
            Some(e) => bail!(e),
            None => Ok(()),
        }
    }
}

impl Drop for StageGroup {
    fn drop(&mut self) {
        crate::dist::leave();
        for (_, c) in self.children.iter_mut() {
            if !self.ok || std::thread::panicking() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// torchrun's variables for worker `rank` on CUDA device `device`, plus multicast off.
pub fn worker_env(rank: usize, world: usize, device: usize, port: u16) -> Vec<(String, String)> {
    vec![
        ("RANK".into(), rank.to_string()),
        ("WORLD_SIZE".into(), world.to_string()),
        ("LOCAL_RANK".into(), device.to_string()),
        ("MASTER_ADDR".into(), "127.0.0.1".into()),
        ("MASTER_PORT".into(), port.to_string()),
        (
            "NCCL_NVLS_ENABLE".into(),
            std::env::var("NCCL_NVLS_ENABLE").unwrap_or_else(|_| "0".into()),
        ),
    ]
}

/// `dmdpipe stage-worker JOB`: joins the group from the environment and runs the job's stage
/// with scratch output directories.
pub fn run_worker(job_path: &Path) -> Result<()> {
    let job: Job = serde_json::from_slice(&std::fs::read(job_path).with_context(|| format!("reading {}", job_path.display()))?)?;
    let spec = StageSpec::parse(&job.kind, job.params.clone()).with_context(|| format!("unknown stage kind `{}`", job.kind))??;
    crate::dist::init_from_env()?.context("stage-worker runs under a data-parallel environment (RANK, WORLD_SIZE, ...)")?;
    let scratch = tempfile::tempdir()?;
    let mut ctx = StageContext {
        stage_name: job.stage_name.clone(),
        out_dir: scratch.path().join("out"),
        work_dir: job.work_dir.clone(),
        downloads_dir: scratch.path().join("downloads"),
        upstream: job.upstream,
        inputs: job.inputs,
        progress: indicatif::ProgressBar::hidden(),
        device: job.device,
        devices: job.devices,
    };
    for d in [&ctx.out_dir, &ctx.downloads_dir] {
        std::fs::create_dir_all(d)?;
    }
    spec.run(&mut ctx)?;
    crate::dist::leave();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_and_rebuilds_the_same_stage() {
        let params = serde_json::json!({ "teacher": "t", "pairs": "p", "train": { "batch": 112, "lr": 1e-4 } });
        let job = Job {
            kind: "dmd".into(),
            params: params.clone(),
            stage_name: "dmd".into(),
            upstream: BTreeMap::from([("teacher".to_string(), PathBuf::from("/c/objects/abc"))]),
            inputs: BTreeMap::new(),
            device: "cuda".into(),
            devices: vec![0, 1],
            work_dir: PathBuf::from("/c/work/key"),
        };
        let back: Job = serde_json::from_slice(&serde_json::to_vec(&job).unwrap()).unwrap();
        assert_eq!(back, job);
        let spec = StageSpec::parse(&back.kind, back.params.clone()).unwrap().unwrap();
        assert_eq!(spec.kind(), "dmd");
        assert_eq!(spec.params_json()["train"]["batch"], 112);
    }

    #[test]
    fn workers_get_torchrun_variables_with_their_own_gpu() {
        let env: BTreeMap<String, String> = worker_env(2, 4, 5, 1234).into_iter().collect();
        let parsed = Env::from_vars(|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((parsed.rank, parsed.world, parsed.local_rank), (2, 4, 5));
        assert_eq!(parsed.master, "127.0.0.1:1234");
    }
}
