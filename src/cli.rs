//! The command line: run, status, why, dag, gc, schema, verify.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::pipeline::cache::{Cache, LockMode};
use crate::pipeline::config::{self, Pipeline};
use crate::pipeline::config_error::ConfigError;
use crate::pipeline::graph::DagFormat;
use crate::pipeline::runner::{self, Outcome, RunOptions, RunReport};
use crate::pipeline::schema;

/// The pipeline `dmdpipe run` uses when given no file and `pipelines/toy2d.toml` is absent.
pub const BUILTIN_PIPELINE: &str = include_str!("../pipelines/toy2d.toml");
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
    Run {
        /// Pipeline file (default: pipelines/toy2d.toml, else the built-in toy pipeline).
        pipeline: Option<PathBuf>,
        /// Re-run this stage even if it is fresh (repeatable).
        #[arg(long)]
        force: Vec<String>,
        /// Run only this stage and the stages it depends on.
        #[arg(long)]
        until: Option<String>,
        /// Print what would run and why; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compute device override: auto, cpu, cuda, cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Data-parallel GPUs for teacher and dmd stages: `all` or e.g. `0,1` (overrides the
        /// pipeline's `devices`; results and cache keys do not depend on it).
        #[arg(long, value_parser = crate::pipeline::config::Devices::parse)]
        devices: Option<crate::pipeline::config::Devices>,
    },
    /// Fresh / stale / never run, per stage.
    Status {
        pipeline: Option<PathBuf>,
        /// Exit with code 1 when any stage is not fresh.
        #[arg(long)]
        exit_code: bool,
    },
    /// Why a stage is stale: what in its key changed since its last accepted run.
    Why { pipeline: PathBuf, stage: String },
    /// Print the stage graph.
    Dag {
        pipeline: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Remove cached artifacts that no pipeline's last accepted run references.
    Gc {
        /// Pipeline whose cache to collect (its cache_dir); or give --cache.
        pipeline: Option<PathBuf>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the JSON schema of pipeline files.
    Schema {
        #[arg(long, default_value = schema::SCHEMA_PATH)]
        out: PathBuf,
    },
    /// Check that every cache entry's outputs are present and unchanged.
    Verify { pipeline: Option<PathBuf> },
    /// Benchmarks: `hash` (input hashing throughput, cold and through the stat cache).
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
    Path { pipeline: PathBuf, stage: String },
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

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// sha256 throughput over a file or directory (default: 256 MB of generated data).
    Hash { path: Option<PathBuf> },
    /// Inception feature throughput and FID(train, test) on the 60,000 CIFAR-10 images.
    Inception {
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value = "models/inception-2015-12-05.safetensors")]
        weights: PathBuf,
        #[arg(long, default_value = "data/cifar-10-batches-bin")]
        data: PathBuf,
        /// Use only the first N images of each split (a smoke test).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Data-parallel scaling: `bench data-parallel` on 1 GPU, then on N GPUs through `launch`;
    /// speed-ups, efficiencies and the loss curves of both at the same global batch.
    Scaling {
        /// GPU counts to compare with one GPU, e.g. `2` or `2,4,8`.
        #[arg(long, value_delimiter = ',', default_value = "2")]
        gpus: Vec<usize>,
        /// Teacher-training images per GPU.
        #[arg(long, default_value_t = 256)]
        per_gpu_batch: usize,
        #[arg(long)]
        quick: bool,
        /// Only the teacher-training figures, eager and as CUDA-graph replays (a short call).
        #[arg(long)]
        train_only: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One rank of `bench scaling` (joins the group given by the environment, if any).
    DataParallel {
        #[arg(long, default_value_t = 256)]
        per_gpu_batch: usize,
        /// Also a short DMD run at this global batch (micro-batches of 56 per GPU, accumulated).
        #[arg(long, default_value_t = 0)]
        dmd_global_batch: usize,
        #[arg(long)]
        quick: bool,
        /// Only the teacher-training figures (eager and CUDA graph).
        #[arg(long)]
        train_only: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Kernel-level profile (libtorch's Kineto, as torch.profiler) of the bf16 one-step sampling
    /// call and training step, in both GroupNorm modes: Chrome traces and where the time goes.
    Profile {
        #[command(flatten)]
        spec: crate::bench::ProfileSpec,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Where the GPU time of Chrome traces goes (e.g. one from torch.profiler, to compare with
    /// `bench profile`): by kernel and by kind of work, per call.
    TraceSummary {
        traces: Vec<PathBuf>,
        /// Calls the trace covers (times are divided by it).
        #[arg(long, default_value_t = 1)]
        per: usize,
        #[arg(long, default_value_t = 25)]
        top: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Network throughput (teacher training, one-step sampling) on a device.
    Gpu {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Tiny batches and few steps (a smoke test, e.g. on CPU).
        #[arg(long)]
        quick: bool,
        /// Also time bf16 with channels-last (NHWC) weights and activations.
        #[arg(long)]
        channels_last: bool,
        /// Only the two networks' bf16 training and sampling figures, with and without the
        /// default GroupNorm mode (no TF32, no Inception, no DMD): a short call.
        #[arg(long)]
        networks_only: bool,
        /// Inception weights for the feature-throughput figure (skipped when absent).
        #[arg(long, default_value = "models/inception-2015-12-05.safetensors")]
        inception: PathBuf,
        /// Also write the numbers to this JSON file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("DMDPIPE_BF16_GROUP_NORM").is_some() {
        // It used to override every network's GroupNorm mode outside the cache key.
        eprintln!("warning: DMDPIPE_BF16_GROUP_NORM is no longer read: set `bf16_group_norm` in the network config");
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
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
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(EnvFilter::try_from_env("DMDPIPE_LOG").unwrap_or_else(|_| EnvFilter::new(level)));
    let file_layer = log_file.and_then(|path| std::fs::File::create(path).ok()).map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .with_filter(EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::registry().with(stderr_layer).with(file_layer).try_init();
}

/// Prints a benchmark's numbers and, when asked, writes them to a file too.
fn print_json(v: &serde_json::Value, out: Option<&std::path::Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    println!("{text}");
    if let Some(o) = out {
        std::fs::write(o, text).with_context(|| format!("writing {}", o.display()))?;
    }
    Ok(())
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            force,
            until,
            dry_run,
            device,
            devices,
        } => {
            let p = load(pipeline.as_deref(), &cli.set)?;
            let cache_dir = cli.cache.clone().unwrap_or_else(|| p.cache_dir());
            let log = (!dry_run).then(|| {
                let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .replace(':', "");
                // The pid too: two runs started in the same second must not share a log.
                cache_dir
                    .join("logs")
                    .join(format!("{}-{stamp}-{}.log", p.name, std::process::id()))
            });
            if let Some(l) = &log {
                // Nothing is created in a folder that is not a dmdpipe cache.
                crate::pipeline::cache::claim(&cache_dir)?;
                std::fs::create_dir_all(l.parent().expect("log has a parent")).ok();
            }
            init_logging(cli.verbose, log.as_deref());
            let opts = RunOptions {
                force,
                until,
                dry_run,
                cache_dir: cli.cache,
                device,
                devices,
                progress: true,
            };
            let report = runner::run(&p, &opts)?;
            print_report(&report, dry_run);
            if dry_run {
                let gpus = estimate_gpu_count(opts.devices.as_ref().or(p.settings.devices.as_ref()));
                print_estimates(&p, &report, gpus);
            }
            if !dry_run {
                let html = crate::pipeline::report::write_report(&cache_dir, &report)?;
                println!("report: {}", html.display());
            }
            if let Some(l) = log {
                println!("log: {}", l.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { pipeline, exit_code } => {
            init_logging(cli.verbose, None);
            let p = load(pipeline.as_deref(), &cli.set)?;
            let report = runner::status(&p, cli.cache)?;
            for s in &report.stages {
                let state = match s.outcome {
                    Outcome::Cached => "fresh".to_string(),
                    Outcome::NeverRun => "never run".to_string(),
                    _ => format!("stale ({})", s.reasons.join("; ")),
                };
                println!("{:<20} {:<13} {state}", s.name, s.kind);
            }
            Ok(if exit_code && !report.all_fresh() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Why { pipeline, stage } => {
            init_logging(cli.verbose, None);
            let p = load(Some(&pipeline), &cli.set)?;
            for line in runner::why(&p, &stage, cli.cache)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { pipeline, format } => {
            let p = load(pipeline.as_deref(), &cli.set)?;
            print!("{}", p.graph().render(format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { pipeline, dry_run } => {
            init_logging(cli.verbose, None);
            let root = match (&cli.cache, &pipeline) {
                (Some(c), _) => c.clone(),
                (None, p) => load(p.as_deref(), &cli.set)?.cache_dir(),
            };
            let cache = Cache::open(&root, LockMode::Exclusive)?;
            let r = cache.gc(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for k in &r.removed_entries {
                println!("{verb} entry {k}");
            }
            for t in &r.removed_objects {
                println!("{verb} artifact {t}");
            }
            for o in &r.removed_other {
                println!("{verb} {}", o.display());
            }
            println!(
                "{verb} {} entries, {} artifacts, {} temp/work dirs ({:.1} MB); kept {} entries",
                r.removed_entries.len(),
                r.removed_objects.len(),
                r.removed_other.len(),
                r.bytes as f64 / 1e6,
                r.kept_entries
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&out, schema::pipeline_schema()).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { pipeline } => {
            let root = match &cli.cache {
                Some(c) => c.clone(),
                None => load(pipeline.as_deref(), &cli.set)?.cache_dir(),
            };
            let problems = Cache::open(&root, LockMode::Shared)?.check_integrity()?;
            for p in &problems {
                println!("{p}");
            }
            println!("{} problems", problems.len());
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bench {
            what: BenchCommand::Hash { path },
        } => {
            crate::pipeline::hash::bench(path.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Gpu {
                    device,
                    quick,
                    channels_last,
                    networks_only,
                    inception,
                    out,
                },
        } => {
            init_logging(cli.verbose, None);
            let v = crate::bench::bench_gpu(&device, quick, channels_last, Some(&inception), networks_only)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchCommand::Profile { spec, out },
        } => {
            init_logging(cli.verbose, None);
            let v = crate::bench::bench_profile(&spec)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchCommand::TraceSummary { traces, per, top, out },
        } => {
            let mut all = serde_json::Map::new();
            for t in &traces {
                let s = crate::bench::summarize_trace(t)?;
                all.insert(t.display().to_string(), crate::bench::summary_json(&s, per, top));
            }
            print_json(&serde_json::Value::Object(all), out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Inception {
                    device,
                    weights,
                    data,
                    limit,
                    out,
                },
        } => {
            init_logging(cli.verbose, None);
            let v = crate::bench::bench_inception(&device, &weights, &data, limit)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::StageWorker { job } => {
            init_logging(cli.verbose, None);
            crate::pipeline::workers::run_worker(&job)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DistCheck { dir } => {
            let env = crate::dist::rendezvous::Env::from_process()?.context("no WORLD_SIZE > 1 in the environment")?;
            let id: Option<[u8; crate::dist::nccl::UNIQUE_ID_BYTES]> = (env.rank == 0).then(|| {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                std::array::from_fn(|i| (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u128 * 1442695040888963407) >> 64) as u8)
            });
            let got = crate::dist::rendezvous::exchange_id(&env, id, std::time::Duration::from_secs(60))?;
            std::fs::write(
                dir.join(format!("rank{}.txt", env.rank)),
                format!("{} {} {}", env.world, env.local_rank, hex::encode(&got[..16])),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch {
            nproc,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            args,
        } => {
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
        Command::Bench {
            what:
                BenchCommand::DataParallel {
                    per_gpu_batch,
                    dmd_global_batch,
                    quick,
                    train_only,
                    out,
                },
        } => {
            init_logging(cli.verbose, None);
            let v = crate::bench::bench_data_parallel(per_gpu_batch, dmd_global_batch, quick, train_only)?;
            if !v.is_null() {
                print_json(&v, out.as_deref())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Scaling {
                    gpus,
                    per_gpu_batch,
                    quick,
                    train_only,
                    out,
                },
        } => {
            init_logging(cli.verbose, None);
            let v = crate::bench::bench_scaling(&gpus, per_gpu_batch, quick, train_only)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ImportWeights { input, out, inception } => {
            let out = out.unwrap_or_else(|| input.with_extension("safetensors"));
            let what = if inception {
                crate::eval::inception_import::import_inception(&input, &out)?
            } else {
                crate::nn::import::import_to_safetensors(&input, &out)?
            };
            println!("wrote {} ({what})", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Path { pipeline, stage } => {
            let p = load(Some(&pipeline), &cli.set)?;
            println!("{}", runner::output_dir(&p, &stage, cli.cache)?.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn brief(metrics: &serde_json::Value) -> String {
    let Some(map) = metrics.as_object() else { return String::new() };
    let mut parts = Vec::new();
    for (k, v) in map {
        let text = match v {
            serde_json::Value::Number(n) => n
                .as_f64()
                .map(|f| if f.fract() == 0.0 { format!("{f}") } else { format!("{f:.4}") })
                .unwrap_or_default(),
            serde_json::Value::Array(a) if a.len() <= 4 && a.iter().all(|x| x.is_number()) => {
                format!(
                    "[{}]",
                    a.iter()
                        .map(|x| format!("{:.4}", x.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            serde_json::Value::String(s) if s.len() < 40 => s.clone(),
            _ => continue,
        };
        parts.push(format!("{k}={text}"));
    }
    parts.join(" ")
}

/// GPUs a run would use: the devices asked for, else the CUDA devices present, else one.
fn estimate_gpu_count(devices: Option<&crate::pipeline::config::Devices>) -> usize {
    use crate::pipeline::config::Devices;
    match devices {
        Some(Devices::List(l)) => l.len().max(1),
        // libtorch_cuda first: asked before it is loaded, libtorch settles on "no CUDA".
        _ if crate::torch_shim::init_cuda() => (tch::Cuda::device_count() as usize).max(1),
        _ => 1,
    }
}

/// The dry run's cost table: work and estimated H200 time of each stage that would run.
fn print_estimates(p: &Pipeline, report: &RunReport, gpus: usize) {
    use crate::stages::estimate::{estimate, human_duration};
    let pending: Vec<(String, crate::stages::StageSpec)> = p
        .stages
        .iter()
        .filter(|s| report.stage(&s.name).is_some_and(|r| r.outcome != Outcome::Cached))
        .map(|s| (s.name.clone(), s.spec.clone()))
        .collect();
    if pending.is_empty() {
        return;
    }
    let estimates = estimate(&pending, gpus, &|path| p.resolve(path));
    println!("\nestimated cost on {gpus} H200 (dmdpipe's measured H200 throughput for EDM's 55.7M network, scaled by FLOPs):");
    let width = estimates.iter().map(|(_, e)| e.work.len()).max().unwrap_or(0);
    let (mut wall, mut gpu_hours, mut unknown) = (0.0, 0.0, Vec::new());
    for (name, e) in &estimates {
        let time = match e.seconds {
            Some(s) => {
                wall += s;
                gpu_hours += e.gpu_hours().unwrap_or(0.0);
                format!("{} on {} GPU{}", human_duration(s), e.gpus, if e.gpus > 1 { "s" } else { "" })
            }
            None => {
                unknown.push(name.as_str());
                "unknown (the teacher's network is not known before the run: give its `network`)".into()
            }
        };
        println!("  {name:<20} {:<width$}  {time}", e.work);
    }
    println!("  total: {} wall-clock, {gpu_hours:.1} GPU-hours", human_duration(wall));
    if !unknown.is_empty() {
        println!("  (not counted: {})", unknown.join(", "));
    }
}

fn print_report(report: &RunReport, dry_run: bool) {
    let mut ran = 0;
    let mut cached = 0;
    for s in &report.stages {
        let what = match s.outcome {
            Outcome::Cached => {
                cached += 1;
                "cached".to_string()
            }
            Outcome::Ran => {
                ran += 1;
                format!("ran in {:.2}s", s.seconds)
            }
            Outcome::Stale | Outcome::NeverRun if dry_run => format!("would run: {}", s.reasons.join("; ")),
            _ => format!("stale: {}", s.reasons.join("; ")),
        };
        println!("{:<20} {:<13} {what}", s.name, s.kind);
        if s.outcome == Outcome::Ran {
            for r in &s.reasons {
                println!("{:<20}   because {r}", "");
            }
        }
        let b = brief(&s.metrics);
        if !b.is_empty() && !dry_run {
            println!("{:<20}   {}", "", b);
        }
    }
    if !dry_run {
        println!("{}: {ran} ran, {cached} cached, {:.2}s", report.pipeline, report.seconds);
    }
}
