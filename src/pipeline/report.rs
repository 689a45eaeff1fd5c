//! The run report: one HTML page per pipeline with every stage's outcome, time, metrics and
//! pictures (sample grids, loss curves, scatter plots), linked from the content store.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::pipeline::runner::{Outcome, RunReport};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Writes `<cache>/reports/<pipeline>/index.html` and returns its path.
pub fn write_report(cache_dir: &Path, report: &RunReport) -> Result<PathBuf> {
    let dir = cache_dir.join("reports").join(&report.pipeline);
    std::fs::create_dir_all(&dir)?;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><meta charset=utf-8><title>{0}</title><style>body{{font-family:sans-serif;margin:2em}}img{{max-width:640px;margin:4px;border:1px solid #ccc}}td,th{{padding:2px 8px;text-align:left}}</style><h1>{0}</h1><p>{1} stages, {2:.1} s</p>",
        escape(&report.pipeline),
        report.stages.len(),
        report.seconds
    );
    for s in &report.stages {
        let outcome = match s.outcome {
            Outcome::Ran => format!("ran in {:.2} s", s.seconds),
            Outcome::Cached => "cached".into(),
            Outcome::Stale => "stale".into(),
            Outcome::NeverRun => "never run".into(),
        };
        let _ = write!(
            html,
            "<h2>{} <small>({}, {})</small></h2>",
            escape(&s.name),
            escape(&s.kind),
            outcome
        );
        if let Some(obj) = s.metrics.as_object() {
            html.push_str("<table>");
            for (k, v) in obj {
                let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(&v.to_string()));
            }
            html.push_str("</table>");
        }
        if let Some(out) = &s.output_dir {
            let mut pngs: Vec<PathBuf> = walkdir::WalkDir::new(out)
                .sort_by_file_name()
                .into_iter()
                .filter_map(Result::ok)
                .map(|e| e.into_path())
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect();
            pngs.sort();
            for p in pngs {
                let abs = std::path::absolute(&p).unwrap_or(p.clone());
                let _ = write!(
                    html,
                    "<figure style=display:inline-block><img src=\"file://{}\"><figcaption>{}</figcaption></figure>",
                    escape(&abs.display().to_string()),
                    escape(&p.strip_prefix(out).unwrap_or(&p).display().to_string())
                );
            }
        }
    }
    let path = dir.join("index.html");
    crate::pipeline::fsutil::atomic_write(&path, html.as_bytes())?;
    Ok(path)
}
