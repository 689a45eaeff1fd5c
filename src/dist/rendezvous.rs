//! Who the ranks are and how they find each other. Ranks come from torchrun's variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; `dmdpipe launch` sets the same) or from
//! Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST).
//! They meet at a c10d TCPStore on MASTER_ADDR:MASTER_PORT: torchrun's agent already serves one
//! there (it says so with TORCHELASTIC_USE_AGENT_STORE=True), otherwise rank 0 serves it. Rank 0
//! puts NCCL's unique id in the store and the others read it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::nccl::UNIQUE_ID_BYTES;
use super::store::Store;

/// Which launcher's variables a process was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, `dmdpipe launch`, or anything setting torchrun's variables.
    Torchrun,
    Slurm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// host:port of the store.
    pub master: String,
    /// torchrun's agent serves the store: every rank is its client.
    pub agent_store: bool,
    /// torchrun's restart count: an earlier attempt's keys are never read.
    pub attempt: u32,
    pub launcher: Launcher,
}

/// The MASTER_PORT of a Slurm job that sets none: fixed by the job id, so every task of the job
/// computes the same one, and jobs sharing a node rarely collide.
pub fn slurm_port(job_id: u64) -> u16 {
    (20_000 + job_id % 10_000) as u16
}

/// The first host of a Slurm hostlist (`node[03-05,9],gpu1` -> `node03`).
pub fn first_host(list: &str) -> Option<String> {
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = list[..end].trim();
    let Some(open) = first.find('[') else {
        return (!first.is_empty()).then(|| first.to_string());
    };
    let close = open + first[open..].find(']')?;
    let range = first[open + 1..close].split(',').next()?;
    let lo = range.split('-').next()?.trim();
    Some(format!("{}{lo}{}", &first[..open], &first[close + 1..]))
}

impl Env {
    /// Reads the launcher's variables through `get`: torchrun's when WORLD_SIZE is set, else
    /// Slurm's; None for a single process.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Env>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}={v} is not a non-negative integer"))
                })
                .transpose()
        };
        let (launcher, rank, world, local_rank) = if get("WORLD_SIZE").is_some() {
            let world = num("WORLD_SIZE")?.unwrap_or(1);
            let rank = if world > 1 {
                num("RANK")?.context("WORLD_SIZE is set but RANK is not")?
            } else {
                0
            };
            (Launcher::Torchrun, rank, world, num("LOCAL_RANK")?.unwrap_or(rank))
        } else if get("SLURM_NTASKS").is_some() && get("SLURM_PROCID").is_some() {
            let world = num("SLURM_NTASKS")?.unwrap_or(1);
            let rank = num("SLURM_PROCID")?.unwrap_or(0);
            (Launcher::Slurm, rank, world, num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(None);
        };
        if world <= 1 {
            return Ok(None);
        }
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let (addr, port) = match launcher {
            Launcher::Torchrun => (
                get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                num("MASTER_PORT")?.context("WORLD_SIZE is set but MASTER_PORT is not")?,
            ),
            Launcher::Slurm => {
                let nodes = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
                let addr = match get("MASTER_ADDR") {
                    Some(a) => a,
                    None => nodes
                        .as_deref()
                        .and_then(first_host)
                        .context("Slurm: no MASTER_ADDR and no SLURM_JOB_NODELIST")?,
                };
                let port = match num("MASTER_PORT")? {
                    Some(p) => p,
                    None => slurm_port(num("SLURM_JOB_ID")?.context("Slurm: no MASTER_PORT and no SLURM_JOB_ID")? as u64) as usize,
                };
                (addr, port)
            }
        };
        if port == 0 || port > u16::MAX as usize {
            bail!("MASTER_PORT={port} is not a port");
        }
        Ok(Some(Env {
            rank,
            world,
            local_rank,
            master: format!("{addr}:{port}"),
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            attempt: num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u32,
            launcher,
        }))
    }

    pub fn from_process() -> Result<Option<Env>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn host_port(&self) -> Result<(String, u16)> {
        let (host, port) = self
            .master
            .rsplit_once(':')
            .with_context(|| format!("`{}` is not host:port", self.master))?;
        Ok((host.trim_matches(|c| c == '[' || c == ']').to_string(), port.parse()?))
    }
}

/// Groups formed by this process so far: each gets its own keys in a shared store.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The number of the next group this process forms (every rank forms its groups in the same
/// order, so the numbers agree).
pub fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// The store of group number `generation`: the agent's, or rank 0's own (kept open while the
/// group lives).
pub fn open_store(env: &Env, generation: u64, timeout: Duration) -> Result<Store> {
    let (host, port) = env.host_port()?;
    let serve = env.rank == 0 && !env.agent_store;
    let prefix = format!("dmdpipe/attempt{}/group{generation}/", env.attempt);
    Store::open(&host, port, serve, &prefix, timeout).with_context(|| format!("rank {} of {}", env.rank, env.world))
}

/// Rank 0 puts `id` in the store, every rank reads it; each rank then checks in, and rank 0
/// waits until all have, so that a store it serves outlives everyone's read. Returns the id.
pub fn exchange_id(store: &Store, env: &Env, id: Option<[u8; UNIQUE_ID_BYTES]>, timeout: Duration) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let id = if env.rank == 0 {
        let id = id.context("rank 0 must provide the id")?;
        store.set("nccl_unique_id", &id)?;
        id
    } else {
        let got = store
            .get("nccl_unique_id")
            .with_context(|| format!("rank {} waiting for rank 0 at {}", env.rank, env.master))?;
        got.try_into()
            .map_err(|v: Vec<u8>| anyhow::anyhow!("rank 0 sent a {}-byte id", v.len()))?
    };
    store.add("joined", 1)?;
    if env.rank == 0 {
        let deadline = Instant::now() + timeout;
        loop {
            let joined = store.add("joined", 0)? as usize;
            if joined >= env.world {
                break;
            }
            if Instant::now() > deadline {
                bail!("rendezvous timed out on {}: {joined} of {} ranks joined", env.master, env.world);
            }
            if super::preempt::requested() {
                return Err(super::preempt::Preempted { at: None }.into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::TcpListener;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Option<Env>> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_are_parsed_and_checked() {
        assert_eq!(env_of(&[]).unwrap(), None);
        assert_eq!(env_of(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let e = env_of(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.master.as_str()), (3, 4, 1, "node0:29500"));
        assert!(env_of(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).is_err());
        assert!(env_of(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).is_err());
        assert!(env_of(&[("WORLD_SIZE", "two")]).unwrap_err().to_string().contains("WORLD_SIZE=two"));
        let t = env_of(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "3"),
        ])
        .unwrap()
        .unwrap();
        assert!(t.agent_store && t.attempt == 3 && t.launcher == Launcher::Torchrun);
    }

    #[test]
    fn slurm_variables_map_as_torch_users_map_them() {
        let e = env_of(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],login1"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.launcher), (5, 8, 1, Launcher::Slurm));
        assert_eq!(e.master, format!("gpu07:{}", slurm_port(123456)));
        assert!(!e.agent_store);
        // MASTER_ADDR / MASTER_PORT, when the batch script exports them, win.
        let e = env_of(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.master, "head:4000");
        // torchrun inside a Slurm allocation: torchrun's variables win.
        let e = env_of(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.launcher), (2, 4, Launcher::Torchrun));
        assert_eq!(env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(), None);
        assert!(
            env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).is_err(),
            "no address to meet at"
        );
    }

    #[test]
    fn slurm_hostlists_give_their_first_host() {
        assert_eq!(first_host("node[03-05,9],gpu1").as_deref(), Some("node03"));
        assert_eq!(first_host("a1,a2").as_deref(), Some("a1"));
        assert_eq!(first_host("rack[2-3]-ib").as_deref(), Some("rack2-ib"));
        assert_eq!(first_host("single").as_deref(), Some("single"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn ranks_meet_at_a_store_another_process_serves() {
        // A stand-in for torchrun's agent: a store served by someone else; every rank a client.
        let agent = super::super::store::Store::open("127.0.0.1", 0, true, "", Duration::from_secs(20)).unwrap();
        let port = agent.port();
        let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 3 % 256) as u8);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let vars: HashMap<String, String> = [
                        ("WORLD_SIZE", "3".to_string()),
                        ("RANK", rank.to_string()),
                        ("MASTER_ADDR", "127.0.0.1".to_string()),
                        ("MASTER_PORT", port.to_string()),
                        ("TORCHELASTIC_USE_AGENT_STORE", "True".to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                    let env = Env::from_vars(|k| vars.get(k).cloned()).unwrap().unwrap();
                    let store = open_store(&env, 0, Duration::from_secs(20)).unwrap();
                    exchange_id(&store, &env, (rank == 0).then_some(id), Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), id);
        }
    }

    #[test]
    fn every_rank_receives_rank_zeros_id() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let world = 4;
        let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 7 % 251) as u8);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = Env {
                        rank,
                        world,
                        local_rank: rank,
                        master: format!("127.0.0.1:{port}"),
                        agent_store: false,
                        attempt: 0,
                        launcher: Launcher::Torchrun,
                    };
                    let store = open_store(&env, 0, Duration::from_secs(20)).unwrap();
                    exchange_id(&store, &env, (rank == 0).then_some(id), Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = Env {
            rank: 0,
            world: 2,
            local_rank: 0,
            master: format!("127.0.0.1:{port}"),
            agent_store: false,
            attempt: 0,
            launcher: Launcher::Torchrun,
        };
        let store = open_store(&env, 0, Duration::from_secs(5)).unwrap();
        let err = exchange_id(&store, &env, Some([0; UNIQUE_ID_BYTES]), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("1 of 2 ranks joined"), "{err}");
    }
}
