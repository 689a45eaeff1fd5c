//! The pipeline commands: run, status, why, dag, gc, schema, verify, path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::{Globals, init_logging, load};
use crate::pipeline::cache::{Cache, LockMode};
use crate::pipeline::config::Pipeline;
use crate::pipeline::graph::DagFormat;
use crate::pipeline::runner::{self, Outcome, RunOptions, RunReport};
use crate::pipeline::schema;

/// `dmdpipe run`'s arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Pipeline file (default: pipelines/toy2d.toml, else the built-in toy pipeline).
    pub pipeline: Option<PathBuf>,
    /// Re-run this stage even if it is fresh (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// Run only this stage and the stages it depends on.
    #[arg(long)]
    pub until: Option<String>,
    /// Print what would run and why; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: exit 0 even when inputs are missing.
    #[arg(long, requires = "dry_run")]
    pub allow_missing: bool,
    /// Compute device override: auto, cpu, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Data-parallel GPUs for teacher and dmd stages: `all` or e.g. `0,1` (overrides the
    /// pipeline's `devices`; results and cache keys do not depend on it).
    #[arg(long, value_parser = crate::pipeline::config::Devices::parse)]
    pub devices: Option<crate::pipeline::config::Devices>,
}

/// `dmdpipe run`. Started by a launcher (torchrun, srun, `dmdpipe launch`), every rank joins the
/// group; rank 0 runs the pipeline and hands data-parallel stages to the others.
pub fn run(g: Globals, args: RunArgs) -> Result<ExitCode> {
    if !args.dry_run
        && let Some(group) = crate::dist::init_from_env()?
    {
        if group.rank != 0 {
            init_logging(g.verbose, None);
            crate::pipeline::workers::serve_jobs()?;
            return Ok(ExitCode::SUCCESS);
        }
        let result = run_pipeline(g, args);
        crate::pipeline::workers::release_workers()?;
        return result;
    }
    run_pipeline(g, args)
}

fn run_pipeline(g: Globals, args: RunArgs) -> Result<ExitCode> {
    let RunArgs {
        pipeline,
        force,
        until,
        dry_run,
        allow_missing,
        device,
        devices,
    } = args;
    let p = load(pipeline.as_deref(), &g.set)?;
    let cache_dir = g.cache.clone().unwrap_or_else(|| p.cache_dir());
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
    init_logging(g.verbose, log.as_deref());
    let opts = RunOptions {
        force,
        until,
        dry_run,
        cache_dir: g.cache.clone(),
        device,
        devices,
        progress: true,
    };
    let report = runner::run(&p, &opts)?;
    print_report(&report, dry_run);
    if dry_run {
        let gpus = estimate_gpu_count(opts.devices.as_ref().or(p.settings.devices.as_ref()));
        print_estimates(&p, &report, gpus);
        if print_missing(&report) && !allow_missing {
            return Ok(ExitCode::from(1));
        }
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

pub fn status(g: Globals, pipeline: Option<PathBuf>, exit_code: bool) -> Result<ExitCode> {
    init_logging(g.verbose, None);
    let p = load(pipeline.as_deref(), &g.set)?;
    let report = runner::status(&p, g.cache.clone())?;
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

pub fn why(g: Globals, pipeline: PathBuf, stage: String) -> Result<ExitCode> {
    init_logging(g.verbose, None);
    let p = load(Some(&pipeline), &g.set)?;
    for line in runner::why(&p, &stage, g.cache.clone())? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dag(g: Globals, pipeline: Option<PathBuf>, format: DagFormat) -> Result<ExitCode> {
    let p = load(pipeline.as_deref(), &g.set)?;
    print!("{}", p.graph().render(format));
    Ok(ExitCode::SUCCESS)
}

pub fn gc(g: Globals, pipeline: Option<PathBuf>, dry_run: bool) -> Result<ExitCode> {
    init_logging(g.verbose, None);
    let root = match (&g.cache, &pipeline) {
        (Some(c), _) => c.clone(),
        (None, p) => load(p.as_deref(), &g.set)?.cache_dir(),
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

pub fn write_schema(out: PathBuf) -> Result<ExitCode> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, schema::pipeline_schema()).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn verify(g: Globals, pipeline: Option<PathBuf>) -> Result<ExitCode> {
    let root = match &g.cache {
        Some(c) => c.clone(),
        None => load(pipeline.as_deref(), &g.set)?.cache_dir(),
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

pub fn path(g: Globals, pipeline: PathBuf, stage: String) -> Result<ExitCode> {
    let p = load(Some(&pipeline), &g.set)?;
    println!("{}", runner::output_dir(&p, &stage, g.cache.clone())?.display());
    Ok(ExitCode::SUCCESS)
}

fn brief(metrics: &serde_json::Value) -> String {
    use crate::pipeline::report::human_value;
    let Some(map) = metrics.as_object() else { return String::new() };
    let mut parts = Vec::new();
    for (k, v) in map {
        let shown = match v {
            serde_json::Value::Number(_) => true,
            serde_json::Value::Array(a) => a.len() <= 4 && a.iter().all(|x| x.is_number()),
            serde_json::Value::String(s) => s.len() < 40,
            _ => false,
        };
        if shown {
            parts.push(format!("{k}={}", human_value(v)));
        }
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

/// The inputs a dry run found missing, each once with the stages that need it; whether any.
fn print_missing(report: &RunReport) -> bool {
    let mut needed: std::collections::BTreeMap<&std::path::Path, Vec<&str>> = Default::default();
    for s in &report.stages {
        for path in &s.missing_inputs {
            needed.entry(path.as_path()).or_default().push(&s.name);
        }
    }
    if needed.is_empty() {
        return false;
    }
    println!("\nmissing inputs ({}):", runner::MISSING_HELP);
    for (path, stages) in &needed {
        println!("  {}  (needed by {})", path.display(), stages.join(", "));
    }
    println!("(exit code 1; --allow-missing to plan anyway)");
    true
}

fn print_report(report: &RunReport, dry_run: bool) {
    let mut ran = 0;
    let mut cached = 0;
    for s in &report.stages {
        let what = match s.outcome {
            Outcome::Cached => {
                cached += 1;
                match &s.made {
                    Some(m) => format!("cached (made {} by {})", m.created, m.pipeline),
                    None => "cached".to_string(),
                }
            }
            Outcome::Ran => {
                ran += 1;
                format!("ran in {:.2}s", s.seconds)
            }
            _ if dry_run && !s.missing_inputs.is_empty() => "would run, once its inputs exist (below)".to_string(),
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
