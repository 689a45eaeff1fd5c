//! Decides which stages are stale, runs them in dependency order and commits their outputs.
//! The runner never knows what a stage computes; stages never touch the cache.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};

use super::cache::{Cache, Entry, LockMode, PipelineRecord};
use super::config::{Pipeline, StageDecl};
use super::hash::StatCache;
use crate::stages::StageContext;

use super::key::{Artifact, manifest_for};
pub use super::key::{KEY_FORMAT, canonical_json, diff_manifests};

/// Where a user learns how to get a missing dataset or model.
pub const MISSING_HELP: &str = "the README's sections on each pipeline say how to get its data and models";

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Re-run these stages even when fresh.
    pub force: Vec<String>,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    /// Say what would run and why; run nothing.
    pub dry_run: bool,
    /// Overrides the pipeline's cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Overrides the pipeline's device.
    pub device: Option<String>,
    /// Overrides the pipeline's data-parallel GPU list.
    pub devices: Option<super::config::Devices>,
    /// Show progress bars (when stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Fresh: the cached outputs were used.
    Cached,
    Ran,
    /// Dry run / status: would run.
    Stale,
    /// Dry run / status: would run, and has never run.
    NeverRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub outcome: Outcome,
    /// Why it ran (or would run).
    pub reasons: Vec<String>,
    pub key: Option<String>,
    pub seconds: f64,
    pub metrics: Value,
    pub output_dir: Option<PathBuf>,
    /// Inputs it reads that are missing or unreadable.
    pub missing_inputs: Vec<PathBuf>,
    /// The run that made its output (a cached stage's may be another pipeline's, earlier).
    pub made: Option<Made>,
}

/// The progress bars of a run, and whether a stage prints progress lines when stderr is no
/// terminal.
struct Bars {
    multi: MultiProgress,
    lines: bool,
}

impl Bars {
    fn new(progress: bool) -> Self {
        let target = if progress {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            lines: progress,
        }
    }
}

/// Where an accepted output came from.
#[derive(Debug, Clone, Serialize)]
pub struct Made {
    pub pipeline: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub seconds: f64,
}

impl Made {
    fn of(e: &Entry) -> Self {
        Made {
            pipeline: e.pipeline.clone(),
            created: e.created.clone(),
            seconds: e.duration_s,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub seconds: f64,
    pub bytes_hashed: u64,
}

impl RunReport {
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }
    pub fn all_fresh(&self) -> bool {
        self.stages.iter().all(|s| s.outcome == Outcome::Cached)
    }
}

enum Mode {
    Run,
    DryRun,
}

/// `dmdpipe run`.
pub fn run(p: &Pipeline, opts: &RunOptions) -> Result<RunReport> {
    execute(p, opts, if opts.dry_run { Mode::DryRun } else { Mode::Run })
}

/// `dmdpipe status`: what `run` would do, under a shared lock.
pub fn status(p: &Pipeline, cache_dir: Option<PathBuf>) -> Result<RunReport> {
    execute(
        p,
        &RunOptions {
            dry_run: true,
            cache_dir,
            ..Default::default()
        },
        Mode::DryRun,
    )
}

fn check_names(p: &Pipeline, names: impl IntoIterator<Item = String>) -> Result<()> {
    for n in names {
        if p.stage(&n).is_none() {
            let all: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            bail!("{} has no stage named `{n}` (stages: {})", p.file.display(), all.join(", "));
        }
    }
    Ok(())
}

fn execute(p: &Pipeline, opts: &RunOptions, mode: Mode) -> Result<RunReport> {
    check_names(p, opts.force.iter().cloned().chain(opts.until.clone()))?;
    let started = Instant::now();
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| p.cache_dir());
    super::cache::check_root(&cache_dir)?;
    let lock = if matches!(mode, Mode::Run) {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    let cache = Cache::open(&cache_dir, lock)?;
    if matches!(mode, Mode::Run) {
        cache.clean_tmp()?;
    }
    let mut stat = cache.stat_cache();
    let mut record = cache.read_record(&p.name);
    let order = selected_order(p, opts);
    let bars = Bars::new(opts.progress);
    let multi = &bars.multi;
    let overall = overall_bar(&multi, order.len(), &p.name);
    let device = opts.device.clone().or(p.settings.device.clone()).unwrap_or_else(|| "auto".into());
    let devices: Vec<usize> = match opts.devices.as_ref().or(p.settings.devices.as_ref()) {
        Some(d) => d.resolve(crate::stages::cuda_device_count()),
        None => Vec::new(),
    };
    let mut trees: HashMap<String, Artifact> = HashMap::new();
    let mut reports = Vec::new();
    let mut failure = None;
    for i in order {
        if matches!(mode, Mode::Run) && crate::dist::preempt::requested() {
            failure = Some(crate::dist::preempt::Preempted { at: None }.into());
            break;
        }
        let stage = &p.stages[i];
        overall.set_message(stage.name.clone());
        let mut missing = Vec::new();
        let (manifest, key) = manifest_for(p, stage, &trees, &mut stat, &mut missing)?;
        let (missing, missing_paths): (Vec<String>, Vec<PathBuf>) = missing.into_iter().unzip();
        if !missing.is_empty() && matches!(mode, Mode::Run) {
            bail!("stage `{}`: {} ({MISSING_HELP})", stage.name, missing.join("; "));
        }
        let previous = record.stages.get(&stage.name).and_then(|k| cache.read_entry(k));
        let mut report = StageReport {
            name: stage.name.clone(),
            kind: stage.spec.kind().to_string(),
            outcome: Outcome::Stale,
            reasons: Vec::new(),
            key: key.clone(),
            seconds: 0.0,
            metrics: Value::Null,
            output_dir: None,
            missing_inputs: missing_paths,
            made: None,
        };
        let forced = opts.force.contains(&stage.name);
        let mut corrupted = None;
        if let (Some(key), false) = (&key, forced)
            && let Some(entry) = cache.read_entry(key)
        {
            match cache.verify(&entry, &mut stat) {
                Ok(()) => {
                    tracing::info!(stage = %stage.name, key = %key, "cached");
                    report.outcome = Outcome::Cached;
                    report.made = Some(Made::of(&entry));
                    report.metrics = entry.metrics.clone();
                    report.output_dir = Some(cache.object_dir(&entry.tree));
                    trees.insert(stage.name.clone(), Artifact::of(&entry));
                    if !matches!(mode, Mode::DryRun) {
                        record.stages.insert(stage.name.clone(), key.clone());
                    }
                    reports.push(report);
                    overall.inc(1);
                    continue;
                }
                Err(problem) => {
                    tracing::warn!(stage = %stage.name, "cached artifact is corrupted: {problem}; re-running");
                    corrupted = Some(problem);
                }
            }
        }
        let seen_before = record.stages.contains_key(&stage.name);
        (report.reasons, report.outcome) = why_stale(&missing, forced, corrupted, previous.as_ref(), seen_before, &manifest);
        if matches!(mode, Mode::DryRun) {
            reports.push(report);
            overall.inc(1);
            continue;
        }
        let key = key.ok_or_else(|| anyhow!("internal: stage `{}` has no key although its upstream ran", stage.name))?;
        match run_stage(&cache, p, stage, &key, manifest, &trees, &mut stat, &bars, &device, &devices) {
            Ok(entry) => {
                report.outcome = Outcome::Ran;
                report.made = Some(Made::of(&entry));
                report.seconds = entry.duration_s;
                report.metrics = entry.metrics.clone();
                report.output_dir = Some(cache.object_dir(&entry.tree));
                trees.insert(stage.name.clone(), Artifact::of(&entry));
                record.stages.insert(stage.name.clone(), key);
                cache.write_record(&p.name, &record)?;
                reports.push(report);
                overall.inc(1);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    overall.finish_and_clear();
    let report = RunReport {
        pipeline: p.name.clone(),
        stages: reports,
        seconds: started.elapsed().as_secs_f64(),
        bytes_hashed: stat.bytes_hashed,
    };
    save_run(&cache, p, mode, stat, &record, &report, failure.is_none())?;
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The selected stages (all, or `--until`'s ancestors) in dependency order.
fn selected_order(p: &Pipeline, opts: &RunOptions) -> Vec<usize> {
    let graph = p.graph();
    let selected: BTreeSet<String> = match &opts.until {
        Some(u) => graph.ancestors_and_self(u),
        None => p.stages.iter().map(|s| s.name.clone()).collect(),
    };
    graph
        .topo_order()
        .into_iter()
        .filter(|&i| selected.contains(&p.stages[i].name))
        .collect()
}

fn overall_bar(multi: &MultiProgress, stages: usize, pipeline: &str) -> ProgressBar {
    let overall = multi.add(ProgressBar::new(stages as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {bar:30} {pos}/{len} stages {msg}").expect("valid template"),
    );
    overall.set_prefix(pipeline.to_string());
    overall
}

/// Why a stage that is not served from the cache must run, and whether it ever ran.
fn why_stale(
    missing: &[String],
    forced: bool,
    corrupted: Option<String>,
    previous: Option<&Entry>,
    seen_before: bool,
    manifest: &Value,
) -> (Vec<String>, Outcome) {
    if !missing.is_empty() {
        return (missing.to_vec(), Outcome::Stale);
    }
    let reasons = if forced {
        vec!["forced with --force".into()]
    } else if let Some(problem) = corrupted {
        vec![format!("cached output is corrupted ({problem})")]
    } else {
        match previous {
            Some(prev) => {
                let d = diff_manifests(&prev.manifest, manifest);
                if d.is_empty() {
                    vec!["the last accepted output is gone (gc or deleted)".into()]
                } else {
                    d
                }
            }
            None if seen_before => vec!["the last accepted entry is gone (gc or deleted)".into()],
            None => return (vec!["never run".into()], Outcome::NeverRun),
        }
    };
    (reasons, Outcome::Stale)
}

/// Saves the stat cache, and after a run the pipeline's record and a line of its history.
fn save_run(
    cache: &Cache,
    p: &Pipeline,
    mode: Mode,
    mut stat: StatCache,
    record: &PipelineRecord,
    report: &RunReport,
    ok: bool,
) -> Result<()> {
    match mode {
        Mode::Run => stat.save()?,
        // The stat cache only saves re-reading: a reader of a read-only cache goes without.
        _ => {
            if let Err(e) = stat.save() {
                tracing::debug!("stat cache not saved: {e:#}");
            }
        }
    }
    if matches!(mode, Mode::Run) {
        cache.write_record(&p.name, record)?;
        let stages: Vec<Value> = report
            .stages
            .iter()
            .map(|s| json!({"stage": s.name, "outcome": s.outcome, "key": s.key, "seconds": s.seconds, "metrics": s.metrics}))
            .collect();
        let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        cache.append_history(
            &p.name,
            &json!({"time": time, "ok": ok, "seconds": report.seconds, "stages": stages}),
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    cache: &Cache,
    p: &Pipeline,
    stage: &StageDecl,
    key: &str,
    manifest: Value,
    trees: &HashMap<String, Artifact>,
    stat: &mut StatCache,
    bars: &Bars,
    device: &str,
    devices: &[usize],
) -> Result<Entry> {
    let multi = &bars.multi;
    let s = stage.spec.stage();
    let tmp = cache.new_tmp_dir(&stage.name)?;
    let out_dir = tmp.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let work_dir = cache.work_dir(key);
    std::fs::create_dir_all(&work_dir)?;
    let upstream = s
        .upstream()
        .into_iter()
        .map(|u| (u.role.to_string(), cache.object_dir(&trees[&u.stage].tree)))
        .collect();
    let inputs = s
        .input_paths()
        .into_iter()
        .map(|i| (i.role.to_string(), p.resolve(&i.path)))
        .collect();
    let bar = multi.add(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} {spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}").expect("valid template"),
    );
    bar.set_prefix(stage.name.clone());
    let _ticker = if bars.lines {
        super::progress::Ticker::start(&stage.name, &bar)
    } else {
        None
    };
    let mut ctx = StageContext {
        stage_name: stage.name.clone(),
        out_dir: out_dir.clone(),
        work_dir: work_dir.clone(),
        downloads_dir: cache.downloads_dir(),
        upstream,
        inputs,
        progress: bar.clone(),
        device: device.to_string(),
        devices: devices.to_vec(),
    };
    let span = tracing::info_span!("stage", name = %stage.name, kind = stage.spec.kind());
    let _guard = span.enter();
    tracing::info!(key = %key, "running");
    let started = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_data_parallel(&stage.spec, &mut ctx)));
    bar.finish_and_clear();
    multi.remove(&bar);
    let seconds = started.elapsed().as_secs_f64();
    let metrics = match result {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = super::fsutil::remove_tree(&tmp);
            // Into the log file only: the command prints the error itself.
            tracing::error!(target: "log_file", "failed after {seconds:.2}s: {e:#}");
            return Err(e.context(format!("stage `{}` (kind `{}`) failed", stage.name, stage.spec.kind())));
        }
        Err(panic) => {
            let _ = super::fsutil::remove_tree(&tmp);
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!(target: "log_file", "panicked after {seconds:.2}s: {msg}");
            bail!("stage `{}` (kind `{}`) panicked: {msg}", stage.name, stage.spec.kind());
        }
    };
    let metrics = if metrics.is_object() {
        metrics
    } else {
        json!({ "value": metrics })
    };
    write_metrics(&out_dir, &metrics)?;
    let entry = cache.commit(key, manifest, &out_dir, metrics, (&stage.name, &p.name, seconds), stat)?;
    let _ = super::fsutil::remove_tree(&tmp);
    let _ = super::fsutil::remove_tree(&work_dir);
    tracing::info!(tree = %entry.tree, "done in {seconds:.2}s");
    Ok(entry)
}

/// Durations and rates, which differ between two runs that compute the same thing.
fn is_measurement(key: &str) -> bool {
    key == "seconds" || key.ends_with("_seconds") || key.ends_with("per_second")
}

/// `metrics.json` holds what the stage computed; its durations and rates go to
/// `measurements/timings.json`, outside what downstream keys see (the cache entry and the report
/// keep both).
fn write_metrics(out_dir: &Path, metrics: &Value) -> Result<()> {
    let (mut results, mut timings) = (serde_json::Map::new(), serde_json::Map::new());
    for (k, v) in metrics.as_object().into_iter().flatten() {
        if is_measurement(k) { &mut timings } else { &mut results }.insert(k.clone(), v.clone());
    }
    std::fs::write(out_dir.join("metrics.json"), serde_json::to_vec_pretty(&results)?)?;
    if !timings.is_empty() {
        let dir = out_dir.join(crate::stages::MEASUREMENTS_DIR);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("timings.json"), serde_json::to_vec_pretty(&timings)?)?;
    }
    Ok(())
}

/// What `run` would do for `stage_name` and its ancestors (a dry run under a shared lock).
fn plan_stage(p: &Pipeline, stage_name: &str, cache_dir: Option<PathBuf>) -> Result<StageReport> {
    check_names(p, [stage_name.to_string()])?;
    let opts = RunOptions {
        dry_run: true,
        until: Some(stage_name.to_string()),
        cache_dir,
        ..Default::default()
    };
    let report = execute(p, &opts, Mode::DryRun)?;
    report.stage(stage_name).cloned().ok_or_else(|| anyhow!("no stage `{stage_name}`"))
}

/// `dmdpipe why`: what in the key of `stage` differs from its last accepted run.
pub fn why(p: &Pipeline, stage_name: &str, cache_dir: Option<PathBuf>) -> Result<Vec<String>> {
    let r = plan_stage(p, stage_name, cache_dir)?;
    let key = r.key.as_deref().unwrap_or("?");
    Ok(match (r.outcome, &r.made) {
        (Outcome::Cached, Some(m)) if m.pipeline != p.name => vec![format!(
            "`{stage_name}` is fresh: an identical stage (same key {key}) was computed by pipeline `{}` on {}",
            m.pipeline, m.created
        )],
        (Outcome::Cached, Some(m)) => vec![format!(
            "`{stage_name}` is fresh: nothing in its key changed since its run on {} (key {key})",
            m.created
        )],
        (Outcome::Cached, None) => vec![format!("`{stage_name}` is fresh (key {key})")],
        _ => r.reasons,
    })
}

/// A stage's artifact directory in the cache, when it is fresh.
pub fn output_dir(p: &Pipeline, stage_name: &str, cache_dir: Option<PathBuf>) -> Result<PathBuf> {
    plan_stage(p, stage_name, cache_dir)?
        .output_dir
        .ok_or_else(|| anyhow!("stage `{stage_name}` is not fresh; run the pipeline first"))
}

/// Record of the last accepted runs (for tests and tooling).
pub fn record(cache_dir: &std::path::Path, pipeline: &str) -> Result<PipelineRecord> {
    Ok(Cache::open(cache_dir, LockMode::Shared)?.read_record(pipeline))
}
/// Runs a stage, on every GPU of `ctx.devices` when its kind can run data-parallel: this
/// process is rank 0, the others are `dmdpipe stage-worker` processes that must all succeed.
fn run_data_parallel(spec: &crate::stages::StageSpec, ctx: &mut StageContext) -> Result<serde_json::Value> {
    let group = super::workers::StageGroup::start(ctx, spec)?;
    let metrics = spec.run(ctx)?;
    if let Some(g) = group {
        g.finish()?;
    }
    Ok(metrics)
}
