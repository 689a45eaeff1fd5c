//! `dmdpipe launch`: starts one process per local GPU with torchrun's environment variables,
//! waits for all of them, and stops the others as soon as one fails.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Processes (GPUs) on this host.
    pub nproc: usize,
    /// Hosts in all, and this host's index.
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// None: a free port (single host only).
    pub master_port: Option<u16>,
}

/// The environment of local process `local` (torchrun's names).
pub fn env_for(spec: &LaunchSpec, local: usize, port: u16) -> Vec<(String, String)> {
    let world = spec.nproc * spec.nnodes;
    let rank = spec.node_rank * spec.nproc + local;
    vec![
        ("RANK".into(), rank.to_string()),
        ("LOCAL_RANK".into(), local.to_string()),
        ("WORLD_SIZE".into(), world.to_string()),
        ("LOCAL_WORLD_SIZE".into(), spec.nproc.to_string()),
        ("MASTER_ADDR".into(), spec.master_addr.clone()),
        ("MASTER_PORT".into(), port.to_string()),
    ]
}

/// Runs `args` (a dmdpipe command line) in `spec.nproc` copies of this executable.
pub fn launch(spec: &LaunchSpec, args: &[String]) -> Result<()> {
    if spec.nproc == 0 || spec.node_rank >= spec.nnodes {
        bail!("launch: need nproc >= 1 and node_rank < nnodes");
    }
    let port = match spec.master_port {
        Some(p) => p,
        None if spec.nnodes == 1 => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        None => bail!("launch: --master-port is required with several hosts"),
    };
    let exe = std::env::current_exe().context("locating the dmdpipe executable")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..spec.nproc {
        let child = Command::new(&exe)
            .args(args)
            .envs(env_for(spec, local, port))
            // NVLink multicast stays off unless the user says otherwise: on shared hosts a
            // program using it can take the GPUs out of service.
            .env("NCCL_NVLS_ENABLE", std::env::var("NCCL_NVLS_ENABLE").unwrap_or_else(|_| "0".into()))
            .spawn()
            .with_context(|| format!("starting local rank {local}"))?;
        children.push((local, child));
    }
    let mut failed: Option<String> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            if let Some(status) = children[i].1.try_wait()? {
                let (local, _) = children.remove(i);
                if !status.success() && failed.is_none() {
                    failed = Some(format!("local rank {local} exited with {status}"));
                    for (_, c) in children.iter_mut() {
                        let _ = c.kill();
                    }
                }
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        Some(f) => bail!("launch: {f}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_numbered_across_hosts() {
        let spec = LaunchSpec {
            nproc: 4,
            nnodes: 2,
            node_rank: 1,
            master_addr: "node0".into(),
            master_port: Some(29500),
        };
        let env: std::collections::HashMap<String, String> = env_for(&spec, 2, 29500).into_iter().collect();
        assert_eq!(env["RANK"], "6");
        assert_eq!(env["LOCAL_RANK"], "2");
        assert_eq!(env["WORLD_SIZE"], "8");
        assert_eq!(env["MASTER_ADDR"], "node0");
        let parsed = super::super::rendezvous::Env::from_vars(|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((parsed.rank, parsed.world, parsed.local_rank), (6, 8, 2));
    }
}
