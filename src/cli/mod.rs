//! The command line: the argument types and the dispatch; the commands live in one file per
//! group (pipeline, bench, data-parallel).

mod bench_cmds;
mod dist_cmds;
mod pipeline_cmds;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::pipeline::config::{self, Pipeline};
use crate::pipeline::config_error::ConfigError;
use crate::pipeline::graph::DagFormat;
use crate::pipeline::schema;
use bench_cmds::BenchCommand;

/// The pipeline `dmdpipe run` uses when given no file and `pipelines/toy2d.toml` is absent.
pub const BUILTIN_PIPELINE: &str = include_str!("../../pipelines/toy2d.toml");
const DEFAULT_PIPELINE: &str = "pipelines/toy2d.toml";

#[derive(Parser, Debug)]
#[command(
    name = "dmdpipe",
    version,
    about = "Distribution Matching Distillation pipelines: cached, resumable, reproducible"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Cache directory (default: the pipeline's `cache_dir`, else `cache` beside its root).
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    /// Override a pipeline value without editing the file (repeatable), e.g.
    /// `--set stages.dmd.train.iterations=1000`; the value is TOML and enters the cache key.
    #[arg(long = "set", value_name = "KEY=VALUE", global = true, value_parser = crate::pipeline::overrides::parse)]
    set: Vec<crate::pipeline::overrides::Override>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the stale stages of a pipeline in dependency order.
    Run(pipeline_cmds::RunArgs),
    /// Fresh / stale / never run, per stage.
    Status {
        /// Pipeline file (default: pipelines/toy2d.toml, else the built-in toy pipeline).
        pipeline: Option<PathBuf>,
        /// Exit with code 1 when any stage is not fresh.
        #[arg(long)]
        exit_code: bool,
    },
    /// Why a stage is stale: what in its key changed since its last accepted run.
    Why {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Stage name.
        stage: String,
    },
    /// Print the stage graph.
    Dag {
        /// Pipeline file (default: pipelines/toy2d.toml, else the built-in toy pipeline).
        pipeline: Option<PathBuf>,
        /// text, dot (Graphviz) or mermaid.
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Remove cached artifacts that no pipeline's last accepted run references.
    Gc {
        /// Pipeline whose cache to collect (its cache_dir); or give --cache.
        pipeline: Option<PathBuf>,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the JSON schema of pipeline files.
    Schema {
        #[arg(long, default_value = schema::SCHEMA_PATH)]
        out: PathBuf,
    },
    /// Check that every cache entry's outputs are present and unchanged.
    Verify {
        /// Pipeline file (default: pipelines/toy2d.toml, else the built-in toy pipeline).
        pipeline: Option<PathBuf>,
    },
    /// Benchmarks: networks and DMD on a GPU, Inception, all-reduce, scaling over GPUs, kernel
    /// profiles, trace summaries, input hashing (`dmdpipe bench --help`).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Convert weights to safetensors in Rust: EDM's `.pkl` snapshots (network + config), torch
    /// zip checkpoints, or (with --inception) pytorch-fid's pt_inception-2015-12-05 `.pth` or NVIDIA's
    /// inception-2015-12-05.pkl detector.
    ImportWeights {
        input: PathBuf,
        /// Output file (default: the input with the extension .safetensors).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        inception: bool,
    },
    /// Print the output directory of a fresh stage.
    Path {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Stage name.
        stage: String,
    },
    /// One data-parallel rank of a teacher or dmd stage (started by `run` with several devices,
    /// or by hand on another host with torchrun's variables and the job file).
    StageWorker { job: PathBuf },
    /// Check the launch path without GPUs: parse the rank variables and exchange an id with
    /// rank 0 over TCP (NCCL's rendezvous); each rank writes `rank<R>.txt` into DIR.
    DistCheck { dir: PathBuf },
    /// Run a dmdpipe command in one process per GPU, data parallel through NCCL (torchrun's
    /// RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT). Several hosts: run it on each with
    /// the same --nnodes, --master-addr and --master-port and its own --node-rank.
    Launch {
        /// Processes (GPUs) on this host.
        #[arg(long)]
        nproc: usize,
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        #[arg(long)]
        master_port: Option<u16>,
        /// The dmdpipe command to run, after `--`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("DMDPIPE_BF16_GROUP_NORM").is_some() {
        // It used to override every network's GroupNorm mode outside the cache key.
        eprintln!("warning: DMDPIPE_BF16_GROUP_NORM is no longer read: set `bf16_group_norm` in the network config");
    }
    if matches!(cli.command, Command::Run(_) | Command::StageWorker { .. }) {
        crate::dist::preempt::install();
    }
    if matches!(cli.command, Command::Run(_) | Command::StageWorker { .. } | Command::Bench { .. }) {
        crate::torch_shim::configure_cpu_threads();
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(p) = e.downcast_ref::<crate::dist::preempt::Preempted>() {
                eprintln!("{p}");
                return ExitCode::from(crate::dist::preempt::EXIT_CODE);
            }
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                eprint!("{ce}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn load(path: Option<&Path>, overrides: &[crate::pipeline::overrides::Override]) -> Result<Pipeline> {
    let mut pipeline = match path {
        Some(p) => config::load(p)?,
        None if Path::new(DEFAULT_PIPELINE).exists() => config::load(Path::new(DEFAULT_PIPELINE))?,
        None => {
            let mut p = config::parse(Path::new("<built-in toy2d>"), BUILTIN_PIPELINE)?;
            p.root = PathBuf::from(".");
            p
        }
    };
    crate::pipeline::overrides::apply(&mut pipeline, overrides)?;
    Ok(pipeline)
}

fn init_logging(verbose: u8, log_file: Option<&Path>) {
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    // DMDPIPE_LOG takes `level` or `target=level,...` (e.g. `dmdpipe::train=debug`).
    let stderr_filter = std::env::var("DMDPIPE_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(level))
        // Failures the command prints as `error:` go to the log file only.
        .with_target("log_file", LevelFilter::OFF);
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(stderr_filter);
    let file_layer = log_file.and_then(|path| std::fs::File::create(path).ok()).map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .with_filter(LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry().with(stderr_layer).with(file_layer).try_init();
}

/// Prints a benchmark's numbers and, when asked, writes them to a file too.
fn print_json(v: &serde_json::Value, out: Option<&std::path::Path>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    write_json_atomically(v, out)
}

/// `v` to `out` (when given), whole or not at all: a bench that rewrites it as figures come in
/// never leaves half a file.
fn write_json_atomically(v: &impl serde::Serialize, out: Option<&std::path::Path>) -> Result<()> {
    let Some(out) = out else { return Ok(()) };
    // `--out x.json` has the empty path as its parent.
    let path = if out.parent().is_some_and(|p| p.as_os_str().is_empty()) {
        std::path::Path::new(".").join(out)
    } else {
        out.to_path_buf()
    };
    crate::pipeline::fsutil::atomic_write(&path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// The options every command shares.
pub struct Globals {
    pub verbose: u8,
    pub cache: Option<PathBuf>,
    pub set: Vec<crate::pipeline::overrides::Override>,
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let g = Globals {
        verbose: cli.verbose,
        cache: cli.cache,
        set: cli.set,
    };
    match cli.command {
        Command::Run(args) => pipeline_cmds::run(g, args),
        Command::Status { pipeline, exit_code } => pipeline_cmds::status(g, pipeline, exit_code),
        Command::Why { pipeline, stage } => pipeline_cmds::why(g, pipeline, stage),
        Command::Dag { pipeline, format } => pipeline_cmds::dag(g, pipeline, format),
        Command::Gc { pipeline, dry_run } => pipeline_cmds::gc(g, pipeline, dry_run),
        Command::Schema { out } => pipeline_cmds::write_schema(out),
        Command::Verify { pipeline } => pipeline_cmds::verify(g, pipeline),
        Command::Path { pipeline, stage } => pipeline_cmds::path(g, pipeline, stage),
        Command::Bench { what } => bench_cmds::bench(g, what),
        Command::ImportWeights { input, out, inception } => import_weights(&input, out, inception),
        Command::StageWorker { job } => dist_cmds::stage_worker(g, &job),
        Command::DistCheck { dir } => dist_cmds::dist_check(&dir),
        Command::Launch {
            nproc,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            args,
        } => dist_cmds::launch(nproc, nnodes, node_rank, master_addr, master_port, args),
    }
}

fn import_weights(input: &Path, out: Option<PathBuf>, inception: bool) -> Result<ExitCode> {
    let out = out.unwrap_or_else(|| input.with_extension("safetensors"));
    let what = if inception {
        crate::eval::inception_import::import_inception(input, &out)?
    } else {
        crate::nn::import::import_to_safetensors(input, &out)?
    };
    println!("wrote {} ({what})", out.display());
    Ok(ExitCode::SUCCESS)
}
