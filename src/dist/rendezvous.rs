//! Rank discovery in the torchrun convention (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT) and the exchange of NCCL's unique id over TCP: rank 0 listens, every other rank
//! connects (retrying until rank 0 is up), sends its rank and receives the id.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::nccl::UNIQUE_ID_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master: String,
}

impl Env {
    /// Reads the torchrun variables through `get`; None when WORLD_SIZE is absent or 1.
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
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(None);
        }
        let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT")?.context("WORLD_SIZE is set but MASTER_PORT is not")?;
        Ok(Some(Env {
            rank,
            world,
            local_rank,
            master: format!("{addr}:{port}"),
        }))
    }

    pub fn from_process() -> Result<Option<Env>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

/// Rank 0 sends `id` to every other rank; the others receive it. Returns the id on every rank.
pub fn exchange_id(env: &Env, id: Option<[u8; UNIQUE_ID_BYTES]>, timeout: Duration) -> Result<[u8; UNIQUE_ID_BYTES]> {
    if env.rank == 0 {
        let id = id.context("rank 0 must provide the id")?;
        let listener = TcpListener::bind(&env.master).with_context(|| format!("rank 0 listening on {}", env.master))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut seen = vec![false; env.world];
        seen[0] = true;
        while seen.iter().any(|s| !s) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    let mut r = [0u8; 4];
                    s.read_exact(&mut r)?;
                    let r = u32::from_le_bytes(r) as usize;
                    if r == 0 || r >= env.world || seen[r] {
                        bail!("rendezvous: unexpected or duplicate rank {r}");
                    }
                    seen[r] = true;
                    s.write_all(&id)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = (0..env.world).filter(|&r| !seen[r]).collect();
                        bail!("rendezvous timed out on {}: ranks {missing:?} never connected", env.master);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(id)
    } else {
        let deadline = Instant::now() + timeout;
        let addr = env
            .master
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("cannot resolve {}", env.master))?;
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => bail!("rank {} cannot reach rank 0 at {}: {e}", env.rank, env.master),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.write_all(&(env.rank as u32).to_le_bytes())?;
        let mut id = [0u8; UNIQUE_ID_BYTES];
        s.read_exact(&mut id).context("reading the NCCL id from rank 0")?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
                    };
                    exchange_id(&env, (rank == 0).then_some(id), Duration::from_secs(20)).unwrap()
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
        };
        let err = exchange_id(&env, Some([0; UNIQUE_ID_BYTES]), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("ranks [1]"), "{err}");
    }
}
