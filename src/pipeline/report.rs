//! The run report: one HTML page per pipeline with every stage's outcome, the run that made its
//! output, metrics and pictures (sample grids, loss curves, scatter plots). The folder is
//! self-contained: pictures are copied beside the page and linked relatively, so it can be
//! copied or served as it is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::Value;

use crate::pipeline::runner::{Outcome, RunReport, StageReport};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A number as people read it: integers whole, others to 4 significant digits.
pub fn human_number(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x.fract() == 0.0 && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    let digits = 4 - (x.abs().log10().floor() as i32 + 1);
    if x.abs() >= 1e6 || x.abs() < 1e-4 {
        return format!("{x:.3e}");
    }
    format!("{:.*}", digits.max(0) as usize, x)
}

/// A metric value as people read it (numbers rounded, short arrays of numbers inline).
pub fn human_value(v: &Value) -> String {
    match v {
        Value::Number(n) => n.as_f64().map(human_number).unwrap_or_else(|| n.to_string()),
        Value::Array(a) if a.iter().all(Value::is_number) && a.len() <= 8 => {
            format!("[{}]", a.iter().map(human_value).collect::<Vec<_>>().join(", "))
        }
        Value::Array(a) => format!("[{} values]", a.len()),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn outcome_text(s: &StageReport) -> String {
    match (s.outcome, &s.made) {
        (Outcome::Ran, _) => format!("ran in {} s", human_number(s.seconds)),
        (Outcome::Cached, Some(m)) => format!(
            "cached: made {} by pipeline {} in {} s",
            m.created,
            m.pipeline,
            human_number(m.seconds)
        ),
        (Outcome::Cached, None) => "cached".into(),
        (Outcome::Stale, _) => "stale".into(),
        (Outcome::NeverRun, _) => "never run".into(),
    }
}

/// Copies a stage's pictures into `dir/<stage>/` and returns their names relative to `dir`.
fn copy_pictures(dir: &Path, s: &StageReport) -> Result<Vec<String>> {
    let Some(out) = &s.output_dir else { return Ok(Vec::new()) };
    let mut pngs: Vec<PathBuf> = walkdir::WalkDir::new(out)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    pngs.sort();
    let mut names = Vec::new();
    for p in pngs {
        let rel = p.strip_prefix(out).unwrap_or(&p);
        let name = format!("{}/{}", s.name, rel.display());
        let dest = dir.join(&name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&p, &dest)?;
        names.push(name);
    }
    Ok(names)
}

fn stage_html(html: &mut String, dir: &Path, s: &StageReport) -> Result<()> {
    let _ = write!(
        html,
        "<h2>{} <small>({}, {})</small></h2>",
        escape(&s.name),
        escape(&s.kind),
        escape(&outcome_text(s))
    );
    if let Some(obj) = s.metrics.as_object() {
        html.push_str("<table>");
        for (k, v) in obj {
            let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(&human_value(v)));
        }
        html.push_str("</table>");
    }
    for name in copy_pictures(dir, s)? {
        let _ = write!(
            html,
            "<figure style=display:inline-block><img src=\"{0}\"><figcaption>{0}</figcaption></figure>",
            escape(&name)
        );
    }
    Ok(())
}

/// Writes `<cache>/reports/<pipeline>/index.html` (and its pictures) and returns its path.
pub fn write_report(cache_dir: &Path, report: &RunReport) -> Result<PathBuf> {
    let dir = cache_dir.join("reports").join(&report.pipeline);
    if dir.exists() {
        crate::pipeline::fsutil::remove_tree(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let ran = report.stages.iter().filter(|s| s.outcome == Outcome::Ran).count();
    let cached = report.stages.iter().filter(|s| s.outcome == Outcome::Cached).count();
    let made: f64 = report.stages.iter().filter_map(|s| s.made.as_ref()).map(|m| m.seconds).sum();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><meta charset=utf-8><title>{0}</title><style>body{{font-family:sans-serif;margin:2em}}img{{max-width:640px;margin:4px;border:1px solid #ccc}}td,th{{padding:2px 8px;text-align:left}}</style><h1>{0}</h1><p>{1} stages: {2} ran in this run ({3} s), {4} cached; the stages took {5} s when they ran</p>",
        escape(&report.pipeline),
        report.stages.len(),
        ran,
        human_number(report.seconds),
        cached,
        human_number(made)
    );
    for s in &report.stages {
        stage_html(&mut html, &dir, s)?;
    }
    let path = dir.join("index.html");
    crate::pipeline::fsutil::atomic_write(&path, html.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_rounded_for_people() {
        assert_eq!(human_number(0.06808304585621827), "0.06808");
        assert_eq!(human_number(5000.0), "5000");
        assert_eq!(human_number(2.66), "2.660");
        assert_eq!(human_number(123.456), "123.5");
        assert_eq!(human_number(1.5e-7), "1.500e-7");
        assert_eq!(human_value(&serde_json::json!([5000.0])), "[5000]");
    }
}
