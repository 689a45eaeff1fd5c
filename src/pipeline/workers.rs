//! Data parallelism for a pipeline stage (the runner's, for any stage whose kind says it can run
//! data-parallel), in one of two ways. Launched: `dmdpipe run` started by torchrun, srun or
//! `dmdpipe launch` on every rank; rank 0 runs the pipeline and hands each data-parallel stage to
//! the other ranks through the group's store ([`serve_jobs`] is their loop). Local: `run
//! --devices` in one process; the runner's process is rank 0; it writes a job file
//! (the stage's kind and params, its upstream and input paths) and starts one `dmdpipe
//! stage-worker JOB` per further GPU. Every rank runs the same stage code (resuming from rank 0's
//! checkpoint when there is one); only rank 0 writes checkpoints, metrics and outputs into the
//! cache (the workers' outputs go to scratch dirs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::dist::rendezvous::{Env, Launcher};
use crate::dist::store::Store;
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
    /// The job number, when the stage went to launched ranks.
    launched_job: Option<u64>,
}

/// Jobs rank 0 has handed to launched ranks so far.
static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

fn job_key(seq: u64) -> String {
    format!("job/{seq}")
}

impl StageGroup {
    /// Starts data parallelism for `spec` when `ctx.devices` names several GPUs and the stage
    /// runs on CUDA. None: a single process (inside a worker, too: it joined at start-up).
    pub fn start(ctx: &StageContext, spec: &StageSpec) -> Result<Option<StageGroup>> {
        if !spec.stage().data_parallel() {
            return Ok(None);
        }
        if let Some(g) = crate::dist::group() {
            if g.launched && g.rank == 0 {
                return Ok(Some(Self::dispatch(&g, ctx, spec)?));
            }
            return Ok(None); // a worker: joined at start-up
        }
        if ctx.devices.len() <= 1 {
            return Ok(None);
        }
        if !crate::stages::device_is_cuda(&ctx.device)? {
            tracing::warn!(devices = ?ctx.devices, "data parallelism needs CUDA; training in one process");
            return Ok(None);
        }
        let job = Job::of(ctx, spec);
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
        let mut guard = StageGroup {
            children,
            ok: false,
            launched_job: None,
        };
        let env = Env {
            rank: 0,
            world,
            local_rank: ctx.devices[0],
            master: format!("127.0.0.1:{port}"),
            agent_store: false,
            attempt: 0,
            launcher: Launcher::Torchrun,
        };
        crate::dist::join(&env, false)?;
        guard.ok = true;
        Ok(Some(guard))
    }

    /// Hands the stage to the launched ranks waiting in [`serve_jobs`].
    fn dispatch(g: &crate::dist::Group, ctx: &StageContext, spec: &StageSpec) -> Result<StageGroup> {
        let seq = JobQueue(&g.store).push(&Job::of(ctx, spec))?;
        Ok(StageGroup {
            children: Vec::new(),
            ok: true,
            launched_job: Some(seq),
        })
    }

    /// Waits for every worker to finish; an error names the first that failed.
    pub fn finish(mut self) -> Result<()> {
        if let Some(seq) = self.launched_job {
            let g = crate::dist::group().context("the launched group is gone")?;
            return JobQueue(&g.store).wait_done(seq, g.world - 1);
        }
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
        if self.launched_job.is_some() {
            return; // the group outlives the stage
        }
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

impl Job {
    fn of(ctx: &StageContext, spec: &StageSpec) -> Job {
        Job {
            kind: spec.kind().to_string(),
            params: spec.params_json(),
            stage_name: ctx.stage_name.clone(),
            upstream: ctx.upstream.clone(),
            inputs: ctx.inputs.clone(),
            device: ctx.device.clone(),
            devices: ctx.devices.clone(),
            work_dir: ctx.work_dir.clone(),
        }
    }

    /// Runs the job's stage on this rank with scratch output directories (rank 0 writes the
    /// real outputs).
    fn run(self) -> Result<()> {
        let spec = StageSpec::parse(&self.kind, self.params.clone()).with_context(|| format!("unknown stage kind `{}`", self.kind))??;
        let scratch = tempfile::tempdir()?;
        let mut ctx = StageContext {
            stage_name: self.stage_name,
            out_dir: scratch.path().join("out"),
            work_dir: self.work_dir,
            downloads_dir: scratch.path().join("downloads"),
            upstream: self.upstream,
            inputs: self.inputs,
            progress: indicatif::ProgressBar::hidden(),
            device: self.device,
            devices: self.devices,
        };
        for d in [&ctx.out_dir, &ctx.downloads_dir] {
            std::fs::create_dir_all(d)?;
        }
        spec.run(&mut ctx)?;
        Ok(())
    }
}

/// `dmdpipe stage-worker JOB`: joins the group from the environment and runs the job's stage.
pub fn run_worker(job_path: &Path) -> Result<()> {
    let job: Job = serde_json::from_slice(&std::fs::read(job_path).with_context(|| format!("reading {}", job_path.display()))?)?;
    crate::dist::init_from_env()?.context("stage-worker runs under a data-parallel environment (RANK, WORLD_SIZE, ...)")?;
    let result = job.run();
    crate::dist::leave();
    result
}

/// The jobs rank 0 hands to launched ranks, in the group's store: `job/N` holds job N (or
/// `exit`), `job/N/done` counts the ranks that finished it, `job/N/failures` those that failed.
pub struct JobQueue<'a>(pub &'a Store);

impl JobQueue<'_> {
    /// Publishes the next job; returns its number.
    pub fn push(&self, job: &Job) -> Result<u64> {
        let seq = NEXT_JOB.fetch_add(1, Ordering::Relaxed);
        self.0.set(&job_key(seq), &serde_json::to_vec(job)?)?;
        Ok(seq)
    }

    /// Tells the ranks there are no more jobs.
    pub fn close(&self) -> Result<()> {
        self.0.set(&job_key(NEXT_JOB.load(Ordering::Relaxed)), b"exit")
    }

    /// Job `seq` for a serving rank (None: no more jobs), waiting as long as the store allows.
    pub fn take(&self, seq: u64) -> Result<Option<Job>> {
        let msg = self.0.get(&job_key(seq))?;
        if msg == b"exit" {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&msg).context("a job from rank 0")?))
    }

    /// A serving rank's report on job `seq`.
    pub fn report(&self, seq: u64, ok: bool) -> Result<()> {
        if !ok {
            self.0.add(&format!("{}/failures", job_key(seq)), 1)?;
        }
        self.0.add(&format!("{}/done", job_key(seq)), 1)?;
        Ok(())
    }

    /// Waits until `workers` ranks reported job `seq`; an error when any failed.
    pub fn wait_done(&self, seq: u64, workers: usize) -> Result<()> {
        let done = format!("{}/done", job_key(seq));
        while (self.0.add(&done, 0)? as usize) < workers {
            if crate::dist::preempt::requested() {
                return Err(crate::dist::preempt::Preempted { at: None }.into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.0.add(&format!("{}/failures", job_key(seq)), 0)? {
            0 => Ok(()),
            n => bail!("{n} launched rank(s) failed the stage (their own logs say why)"),
        }
    }
}

/// A launched rank other than 0 under `dmdpipe run`: runs each data-parallel stage rank 0 hands
/// it, until rank 0 says the pipeline is done.
pub fn serve_jobs() -> Result<()> {
    let g = crate::dist::group().context("serve_jobs needs the launched group")?;
    // The next job may come after hours of stages that run on rank 0 alone.
    g.store.set_timeout(Duration::from_secs(30 * 24 * 3600))?;
    let queue = JobQueue(&g.store);
    for seq in 0.. {
        let Some(job) = queue.take(seq)? else { return Ok(()) };
        tracing::info!(rank = g.rank, stage = %job.stage_name, "data-parallel job");
        let result = job.run();
        if let Err(e) = &result {
            tracing::error!(rank = g.rank, "{e:#}");
        }
        queue.report(seq, result.is_ok())?;
        result?;
    }
    Ok(())
}

/// Rank 0 of a launched `run`: tells the waiting ranks there are no more jobs.
pub fn release_workers() -> Result<()> {
    match crate::dist::group().filter(|g| g.launched && g.rank == 0) {
        Some(g) => JobQueue(&g.store).close(),
        None => Ok(()),
    }
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
    fn launched_ranks_take_each_job_report_it_and_stop_at_exit() {
        let server = Store::open("127.0.0.1", 0, true, "q/", std::time::Duration::from_secs(20)).unwrap();
        let port = server.port();
        let job = |name: &str| Job {
            kind: "dmd".into(),
            params: serde_json::json!({ "teacher": "t" }),
            stage_name: name.into(),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            device: "cuda".into(),
            devices: vec![],
            work_dir: PathBuf::from("/w"),
        };
        let serving: Vec<_> = (1..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let store = Store::open("127.0.0.1", port, false, "q/", std::time::Duration::from_secs(20)).unwrap();
                    let q = JobQueue(&store);
                    let mut seen = Vec::new();
                    let mut seq = 0;
                    while let Some(j) = q.take(seq).unwrap() {
                        seen.push(j.stage_name.clone());
                        // Rank 2 fails the second job.
                        q.report(seq, !(rank == 2 && seq == 1)).unwrap();
                        seq += 1;
                    }
                    seen
                })
            })
            .collect();
        let q = JobQueue(&server);
        let first = q.push(&job("teacher")).unwrap();
        q.wait_done(first, 2).unwrap();
        let second = q.push(&job("dmd")).unwrap();
        let e = q.wait_done(second, 2).unwrap_err();
        assert!(e.to_string().contains("1 launched rank(s) failed"), "{e}");
        q.close().unwrap();
        for h in serving {
            assert_eq!(h.join().unwrap(), vec!["teacher".to_string(), "dmd".to_string()]);
        }
    }

    #[test]
    fn workers_get_torchrun_variables_with_their_own_gpu() {
        let env: BTreeMap<String, String> = worker_env(2, 4, 5, 1234).into_iter().collect();
        let parsed = Env::from_vars(|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((parsed.rank, parsed.world, parsed.local_rank), (2, 4, 5));
        assert_eq!(parsed.master, "127.0.0.1:1234");
    }
}
