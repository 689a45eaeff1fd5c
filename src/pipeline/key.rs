//! The cache key of a stage: the sha256 of a canonical JSON manifest. What enters it, and
//! what knowingly stays out:
//!
//! | part of the manifest | what it is | why |
//! | --- | --- | --- |
//! | `key_format` | [`KEY_FORMAT`] | a change of this layout invalidates every entry |
//! | `kind`, `kind_version` | the stage kind and its `Stage::version` | a kind bumps its version when its code changes what it writes |
//! | `params` | every parameter as the kind's typed struct serialises it, defaults filled in | a value left out of the file and the same value written out give one key; every value that can change a result is a field, so it is here (numerics too: `bf16`, `tf32`, a network's `bf16_group_norm` and `fused_kernels`, FID `precision`) |
//! | `upstream.<role>` | the upstream stage's output `content` digest | downstream re-runs only when an input's bytes change; files under `measurements/` (timings) are left out of `content`, so a re-run that reproduces its outputs bit for bit does not invalidate what follows |
//! | `inputs.<role>` | the digest of each file or folder a stage reads (content, not path or mtime) | moving a dataset does not re-run anything; editing one byte does |
//!
//! Knowingly left out:
//!
//! | left out | why |
//! | --- | --- |
//! | stage references and input paths inside `params` | their digests enter under `upstream` and `inputs` |
//! | fields a kind lists in `Stage::non_key_fields` (e.g. `cifar10.url`) | where a file is fetched from does not change it (its md5 is in the key) |
//! | optional values left unset (JSON `null`) | unset is the default; non-finite floats, which JSON would also write as `null`, are refused when the file is read |
//! | `device`, `devices` (the GPU count) | results do not depend on them (up to floating-point summation order): a run on 8 GPUs is served to a run on 1 (`micro_batch`, a memory cap, is a parameter and in the key) |
//! | the process's numerics switches | every stage runs inside `torch_shim::NumericsScope` (strict fp32 defaults, restored on exit), so nothing leaks from an earlier stage; no environment variable changes results |
//! | the dmdpipe version | only `kind_version` and `KEY_FORMAT` say when outputs change, so an upgrade keeps the cache |

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::path::PathBuf;

use anyhow::Result;
use serde_json::{Value, json};

use super::cache::Entry;
use super::config::{Pipeline, StageDecl};
use super::hash::{StatCache, sha256_bytes};

/// Version of the key manifest layout; bumping it invalidates every cache entry.
pub const KEY_FORMAT: u32 = 1;

/// Sorted-key JSON, so that a manifest hashes the same whatever order its maps were built in.
pub fn canonical_json(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            let items: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), canonical_json(v)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// An accepted output: where it lives (`tree`) and what downstream keys see of it (`content`,
/// which leaves out run-to-run measurements).
pub struct Artifact {
    pub tree: String,
    pub content: String,
}

impl Artifact {
    pub fn of(entry: &Entry) -> Self {
        Artifact {
            tree: entry.tree.clone(),
            content: entry.content.clone().unwrap_or_else(|| entry.tree.clone()),
        }
    }
}

/// The key manifest of a stage. Upstream outputs not known yet (they will re-run first) appear
/// as `null`; such a manifest has no key.
pub fn manifest_for(
    p: &Pipeline,
    stage: &StageDecl,
    trees: &HashMap<String, Artifact>,
    stat: &mut StatCache,
    missing: &mut Vec<(String, PathBuf)>,
) -> Result<(Value, Option<String>)> {
    let s = stage.spec.stage();
    let mut upstream = serde_json::Map::new();
    let mut complete = true;
    for up in s.upstream() {
        match trees.get(&up.stage) {
            Some(a) => upstream.insert(up.role.to_string(), json!(a.content)),
            None => {
                complete = false;
                upstream.insert(up.role.to_string(), Value::Null)
            }
        };
    }
    let mut inputs = serde_json::Map::new();
    for input in s.input_paths() {
        let path = p.resolve(&input.path);
        match stat.path_digest(&path) {
            Ok(digest) => {
                inputs.insert(input.role.to_string(), json!(digest));
            }
            Err(e) => {
                complete = false;
                let why = if path.exists() {
                    format!("cannot be read: {e:#}")
                } else {
                    "does not exist".to_string()
                };
                missing.push((format!("input `{}` {} {why}", input.role, path.display()), path.clone()));
                inputs.insert(input.role.to_string(), Value::Null);
            }
        }
    }
    let manifest = json!({
        "key_format": KEY_FORMAT,
        "kind": stage.spec.kind(),
        "kind_version": s.version(),
        "params": stage.spec.key_params(),
        "upstream": upstream,
        "inputs": inputs,
    });
    let key = complete.then(|| sha256_bytes(canonical_json(&manifest).as_bytes()));
    Ok((manifest, key))
}

/// Human-readable differences between an old and a new key manifest.
pub fn diff_manifests(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if old["key_format"] != new["key_format"] {
        out.push(format!("cache key format changed ({} -> {})", old["key_format"], new["key_format"]));
    }
    if old["kind"] != new["kind"] {
        out.push(format!("kind changed: {} -> {}", old["kind"], new["kind"]));
    } else if old["kind_version"] != new["kind_version"] {
        out.push(format!(
            "implementation of {} changed: version {} -> {}",
            new["kind"], old["kind_version"], new["kind_version"]
        ));
    }
    diff_values("param", "", &old["params"], &new["params"], &mut out);
    for (section, label) in [("upstream", "upstream"), ("inputs", "input")] {
        let empty = serde_json::Map::new();
        let o = old[section].as_object().unwrap_or(&empty);
        let n = new[section].as_object().unwrap_or(&empty);
        let roles: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
        for role in roles {
            match (o.get(role), n.get(role)) {
                (_, Some(Value::Null)) if section == "upstream" => out.push(format!("upstream `{role}` is stale and runs first")),
                (Some(a), Some(b)) if a != b => out.push(format!("{label} `{role}` changed: {} -> {}", short(a), short(b))),
                (None, Some(b)) => out.push(format!("{label} `{role}` added: {}", short(b))),
                (Some(_), None) => out.push(format!("{label} `{role}` removed")),
                _ => {}
            }
        }
    }
    out
}

fn short(v: &Value) -> String {
    v.as_str()
        .map(|s| s.chars().take(12).collect::<String>() + "…")
        .unwrap_or_else(|| v.to_string())
}

fn diff_values(label: &str, path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (o.get(k), n.get(k)) {
                    (Some(a), Some(b)) => diff_values(label, &p, a, b, out),
                    (None, Some(b)) => out.push(format!("{label} `{p}` added: {b}")),
                    (Some(a), None) => out.push(format!("{label} `{p}` removed (was {a})")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{label} `{path}`: {a} -> {b}")),
        _ => {}
    }
}
