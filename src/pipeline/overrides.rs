//! `--set KEY=VALUE`: changes a pipeline's value from the command line without editing the file
//! (`stages.dmd.train.iterations=1000`, `stages.teacher.weights="models/x.pkl"`,
//! `pipeline.device=cpu`). VALUE is TOML (a bare word that is not TOML is taken as a string).
//! An overridden value is part of the stage's params, so it enters the cache key like any other.

use std::path::Path;

use serde::Deserialize;

use super::config::{Pipeline, PipelineSettings, revalidate};
use super::config_error::ConfigError;
use crate::stages::StageSpec;

/// One parsed `KEY=VALUE`.
#[derive(Debug, Clone)]
pub struct Override {
    pub path: Vec<String>,
    pub value: serde_json::Value,
    pub text: String,
}

pub fn parse(text: &str) -> Result<Override, String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected KEY=VALUE, e.g. stages.dmd.train.iterations=1000"))?;
    let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    if path.iter().any(String::is_empty) || path.len() < 2 {
        return Err(format!(
            "`{key}`: expected a dotted key such as stages.NAME.FIELD or pipeline.FIELD"
        ));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => {
            let v = t.remove("v").expect("parsed `v`");
            if !finite(&v) {
                return Err(format!(
                    "`{key}`: a pipeline value must be a finite number (inf and nan are not accepted)"
                ));
            }
            serde_json::to_value(v).map_err(|e| e.to_string())?
        }
        Err(_) => serde_json::Value::String(value.to_string()),
    };
    Ok(Override {
        path,
        value,
        text: text.to_string(),
    })
}

fn finite(v: &toml::Value) -> bool {
    match v {
        toml::Value::Float(f) => f.is_finite(),
        toml::Value::Array(a) => a.iter().all(finite),
        toml::Value::Table(t) => t.values().all(finite),
        _ => true,
    }
}

/// Applies the overrides in order, then validates the pipeline again.
pub fn apply(p: &mut Pipeline, overrides: &[Override]) -> Result<(), ConfigError> {
    for o in overrides {
        apply_one(p, o)?;
    }
    if !overrides.is_empty() {
        revalidate(p)?;
    }
    Ok(())
}

fn error(file: &Path, o: &Override, message: impl Into<String>) -> ConfigError {
    ConfigError::whole_file(file, format!("--set {}: {}", o.text, message.into()))
}

fn apply_one(p: &mut Pipeline, o: &Override) -> Result<(), ConfigError> {
    match o.path[0].as_str() {
        "pipeline" => {
            let mut json = serde_json::to_value(&p.settings).map_err(|e| error(&p.file, o, e.to_string()))?;
            set(&mut json, &o.path[1..], o.value.clone());
            p.settings = PipelineSettings::deserialize(&json).map_err(|e| error(&p.file, o, e.to_string()))?;
            Ok(())
        }
        "stages" if o.path.len() >= 3 => {
            let file = p.file.clone();
            let names: Vec<String> = p.stages.iter().map(|s| s.name.clone()).collect();
            let Some(stage) = p.stages.iter_mut().find(|s| s.name == o.path[1]) else {
                return Err(error(&file, o, format!("no stage `{}` (stages: {})", o.path[1], names.join(", "))));
            };
            if o.path[2] == "kind" {
                return Err(error(&file, o, "a stage's kind cannot be overridden"));
            }
            let mut json = stage.spec.params_json();
            set(&mut json, &o.path[2..], o.value.clone());
            json.as_object_mut().expect("params are an object").retain(|_, v| !v.is_null());
            stage.spec = match StageSpec::parse(stage.spec.kind(), &json) {
                Some(Ok(spec)) => spec,
                Some(Err(e)) => return Err(error(&file, o, format!("stage `{}`: {e}", stage.name))),
                None => unreachable!("the stage's own kind is known"),
            };
            Ok(())
        }
        _ => Err(error(&p.file, o, "the key must start with `pipeline.` or `stages.NAME.`")),
    }
}

/// Sets `value` at `path` inside `json`, creating tables on the way.
fn set(json: &mut serde_json::Value, path: &[String], value: serde_json::Value) {
    let mut at = json;
    for k in &path[..path.len() - 1] {
        if !at.get(k).is_some_and(serde_json::Value::is_object) {
            at[k.as_str()] = serde_json::json!({});
        }
        at = &mut at[k.as_str()];
    }
    at[path[path.len() - 1].as_str()] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_toml_and_bare_words_are_strings() {
        assert_eq!(parse("stages.a.count=1_000").unwrap().value, serde_json::json!(1000));
        assert_eq!(parse("stages.a.x=[1, 2]").unwrap().value, serde_json::json!([1, 2]));
        assert_eq!(parse("stages.a.w=models/x.pkl").unwrap().value, serde_json::json!("models/x.pkl"));
        assert_eq!(parse("stages.a.s={ solver = \"onestep\" }").unwrap().value["solver"], "onestep");
        assert!(parse("stages.a.count").is_err());
        assert!(parse("count=3").is_err());
        assert!(parse("stages.a.max_seconds=-inf").is_err());
        assert!(parse("stages.a.x=[1.0, nan]").is_err());
    }
}
