//! Pipeline files: TOML parsed with spans, so every error names file, line and key.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::Deserialize;
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::config_error::{ConfigError, did_you_mean};
use super::graph;
use crate::stages::{KINDS, StageSpec};

/// The `[pipeline]` table.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name under which the last accepted run of each stage is recorded; defaults to the file stem.
    pub name: Option<String>,
    /// Free text shown by `dmdpipe dag`.
    pub description: Option<String>,
    /// Directory that relative paths in this file are resolved against, itself relative to the
    /// directory holding this file. Default: that directory.
    pub root: Option<PathBuf>,
    /// Cache directory, relative to `root`. Default: `cache`.
    pub cache_dir: Option<PathBuf>,
    /// Compute device for stages that use one: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`.
    pub device: Option<String>,
    /// GPUs for data-parallel training (`teacher` and `dmd` stages): `"all"` or a list of CUDA
    /// indices. Not part of any cache key: results are keyed by the global batch, not the GPU count.
    pub devices: Option<Devices>,
}

/// `"all"` or a list of CUDA device indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Devices {
    All(AllDevices),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AllDevices {
    All,
}

impl Devices {
    /// From the command line: `all`, or comma-separated indices (`0,1`).
    pub fn parse(s: &str) -> Result<Devices, String> {
        if s.trim() == "all" {
            return Ok(Devices::All(AllDevices::All));
        }
        s.split(',')
            .map(|p| {
                p.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("`{p}` is not a device index (use `all` or e.g. `0,1`)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Devices::List)
    }

    /// The CUDA indices, given how many devices there are.
    pub fn resolve(&self, available: usize) -> Vec<usize> {
        match self {
            Devices::All(_) => (0..available).collect(),
            Devices::List(l) => l.clone(),
        }
    }
}

/// The whole file, as the JSON schema describes it. Parsing goes through [`parse`], which
/// dispatches on each stage's `kind` itself to keep exact error positions.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineDocument {
    pub pipeline: Option<PipelineSettings>,
    /// Stages by name. Each is a table with `kind` and that kind's fields.
    pub stages: BTreeMap<String, StageSpec>,
}

/// Where a stage's fields sit in the file.
#[derive(Debug, Clone, Default)]
pub struct FieldSpans {
    pub table: Range<usize>,
    pub name: Range<usize>,
    pub fields: BTreeMap<String, Range<usize>>,
}

#[derive(Debug, Clone)]
pub struct StageDecl {
    pub name: String,
    pub spec: StageSpec,
    pub spans: FieldSpans,
}

/// A parsed, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub source: String,
    pub name: String,
    pub settings: PipelineSettings,
    /// Directory relative paths in the file resolve against.
    pub root: PathBuf,
    /// Stages in file order.
    pub stages: Vec<StageDecl>,
    /// Position of each stage in `stages`, by name (names are unique).
    index: HashMap<String, usize>,
}

impl Pipeline {
    /// The stage graph: names, kinds and references.
    pub fn graph(&self) -> graph::StageGraph {
        let nodes = self
            .stages
            .iter()
            .map(|s| graph::Node {
                name: s.name.clone(),
                kind: s.spec.kind().to_string(),
                upstream: s
                    .spec
                    .stage()
                    .upstream()
                    .into_iter()
                    .map(|u| (u.role.to_string(), u.stage))
                    .collect(),
            })
            .collect();
        graph::StageGraph::new(self.name.clone(), nodes)
    }
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.index.get(name).map(|&i| &self.stages[i])
    }

    pub fn cache_dir(&self) -> PathBuf {
        super::fsutil::clean_path(&self.root.join(self.settings.cache_dir.clone().unwrap_or_else(|| "cache".into())))
    }

    pub fn resolve(&self, path: &Path) -> PathBuf {
        super::fsutil::clean_path(&self.root.join(path))
    }

    /// An error located at a stage's field (or the stage's table when the field is absent).
    pub fn error_at_field(&self, stage: &StageDecl, field: &str, message: impl Into<String>) -> ConfigError {
        let span = stage.spans.fields.get(field).cloned().unwrap_or(stage.spans.name.clone());
        ConfigError::at(
            &self.file,
            &self.source,
            Some(span),
            format!("stages.{}.{field}", stage.name),
            message,
        )
    }
}

pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read pipeline file {}: {e}", path.display())))?;
    parse(path, &source)
}

pub fn parse(path: &Path, source: &str) -> Result<Pipeline, ConfigError> {
    let err = |span: Option<Range<usize>>, key: &str, msg: String| ConfigError::at(path, source, span, key, msg);
    let doc = DeTable::parse(source).map_err(|e| {
        err(e.span(), "", format!("invalid TOML: {}", e.message().trim_end())).with_help("see https://toml.io for the syntax")
    })?;
    if let Some((span, key)) = non_finite_in_table(doc.get_ref(), "") {
        return Err(err(
            Some(span),
            &key,
            "a pipeline value must be a finite number (inf and nan are not accepted)".into(),
        )
        .with_help("non-finite values would be indistinguishable from unset ones in the cache key"));
    }
    let mut settings = PipelineSettings::default();
    let mut name_span = None;
    let mut stages_table: Option<(Range<usize>, DeTable)> = None;
    for (key, value) in doc.into_inner() {
        let span = value.span();
        match key.get_ref().as_ref() {
            "pipeline" => {
                if let DeValue::Table(t) = value.get_ref() {
                    name_span = t
                        .iter()
                        .find(|(k, _)| k.get_ref() == "name")
                        .map(|(k, v)| k.span().start..v.span().end);
                }
                settings =
                    PipelineSettings::deserialize(ValueDeserializer::from(value)).map_err(|e| serde_error(path, source, "pipeline", e))?;
            }
            "stages" => match value.into_inner() {
                DeValue::Table(t) => stages_table = Some((span, t)),
                other => {
                    return Err(err(
                        Some(span),
                        "stages",
                        format!("`stages` must be a table, found {}", other.type_str()),
                    )
                    .with_help("declare each stage as [stages.NAME] with a `kind` field"));
                }
            },
            other => {
                let mut e = err(Some(key.span()), other, format!("unknown top-level key `{other}`"));
                e = e.with_help(match did_you_mean(other, ["pipeline", "stages"]) {
                    Some(s) => format!("did you mean `{s}`? Top-level keys are `pipeline` and `stages`"),
                    None => "top-level keys are `pipeline` and `stages`".into(),
                });
                return Err(e);
            }
        }
    }
    let Some((_, stages_table)) = stages_table else {
        return Err(ConfigError::whole_file(path, "the pipeline declares no stages")
            .with_help("add at least one [stages.NAME] table with a `kind` field"));
    };
    let mut stages = Vec::new();
    for (key, value) in stages_table {
        stages.push(parse_stage(path, source, key, value)?);
    }
    if stages.is_empty() {
        return Err(ConfigError::whole_file(path, "the pipeline declares no stages")
            .with_help("add at least one [stages.NAME] table with a `kind` field"));
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let root = match &settings.root {
        Some(r) if r.is_absolute() => r.clone(),
        Some(r) => dir.join(r),
        None => dir,
    };
    let name = settings.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())
    });
    if !valid_name(&name) {
        return Err(
            err(name_span, "pipeline.name", format!("invalid pipeline name `{name}`")).with_help("use letters, digits, `-` and `_`")
        );
    }
    let index = stages.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
    let pipeline = Pipeline {
        file: path.to_path_buf(),
        source: source.to_string(),
        name,
        settings,
        root,
        stages,
        index,
    };
    validate(&pipeline)?;
    Ok(pipeline)
}

/// The first `inf` / `nan` float in a table: its span and dotted key.
fn non_finite_in_table(t: &DeTable, prefix: &str) -> Option<(Range<usize>, String)> {
    t.iter().find_map(|(k, v)| {
        let key = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        non_finite_in_value(v, &key)
    })
}

fn non_finite_in_value(v: &Spanned<DeValue<'_>>, key: &str) -> Option<(Range<usize>, String)> {
    match v.get_ref() {
        DeValue::Float(f) if f.as_str().contains("inf") || f.as_str().contains("nan") => Some((v.span(), key.to_string())),
        DeValue::Table(t) => non_finite_in_table(t, key),
        DeValue::Array(a) => a.iter().find_map(|x| non_finite_in_value(x, key)),
        _ => None,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn parse_stage(
    path: &Path,
    source: &str,
    key: Spanned<std::borrow::Cow<'_, str>>,
    value: Spanned<DeValue<'_>>,
) -> Result<StageDecl, ConfigError> {
    let name = key.get_ref().to_string();
    let key_path = format!("stages.{name}");
    let err = |span: Range<usize>, key: &str, msg: String| ConfigError::at(path, source, Some(span), key, msg);
    if !valid_name(&name) {
        return Err(err(key.span(), &key_path, format!("invalid stage name `{name}`"))
            .with_help("stage names use letters, digits, `-` and `_` (at most 64)"));
    }
    let table_span = value.span();
    let table = match value.into_inner() {
        DeValue::Table(t) => t,
        DeValue::Array(_) => {
            return Err(err(table_span, &key_path, format!("stage `{name}` is an array of tables"))
                .with_help(format!("write [stages.{name}], not [[stages.{name}]]")));
        }
        other => {
            return Err(err(
                table_span,
                &key_path,
                format!("stage `{name}` must be a table, found {}", other.type_str()),
            )
            .with_help(format!("write [stages.{name}] followed by `kind = \"...\"` and its fields")));
        }
    };
    let mut spans = FieldSpans {
        table: table_span.clone(),
        name: key.span(),
        fields: BTreeMap::new(),
    };
    for (k, v) in table.iter() {
        spans.fields.insert(k.get_ref().to_string(), k.span().start..v.span().end);
    }
    let kind_entry = table.iter().find(|(k, _)| k.get_ref() == "kind");
    let kind = match kind_entry {
        None => {
            return Err(
                err(key.span(), &format!("{key_path}.kind"), format!("stage `{name}` has no `kind`"))
                    .with_help(format!("add `kind = \"...\"`; known kinds: {}", KINDS.join(", "))),
            );
        }
        Some((_, v)) => match v.get_ref().as_str() {
            Some(s) => (s.to_string(), v.span()),
            None => {
                return Err(err(
                    v.span(),
                    &format!("{key_path}.kind"),
                    format!("`kind` must be a string, found {}", v.get_ref().type_str()),
                )
                .with_help(format!("known kinds: {}", KINDS.join(", "))));
            }
        },
    };
    let located = table.clone();
    let rest: DeTable = table.into_iter().filter(|(k, _)| k.get_ref() != "kind").collect();
    let de = ValueDeserializer::from(Spanned::new(table_span.clone(), DeValue::Table(rest)));
    let spec = match StageSpec::parse(&kind.0, de) {
        None => {
            let mut e = err(kind.1, &format!("{key_path}.kind"), format!("unknown stage kind `{}`", kind.0));
            e = e.with_help(match did_you_mean(&kind.0, KINDS.iter().copied()) {
                Some(s) => format!("did you mean `{s}`? Known kinds: {}", KINDS.join(", ")),
                None => format!("known kinds: {}", KINDS.join(", ")),
            });
            return Err(e);
        }
        Some(Ok(spec)) => spec,
        Some(Err(e)) => {
            let sub = e.span().and_then(|s| locate_key(&located, &s)).unwrap_or_default();
            let key = if sub.is_empty() {
                key_path.clone()
            } else {
                format!("{key_path}.{}", sub.join("."))
            };
            let mut ce = err(
                e.span().unwrap_or(table_span.clone()),
                &key,
                format!("stage `{name}` (kind `{}`): {}", kind.0, e.message().trim_end()),
            );
            if let Some(help) = unknown_field_help(e.message()) {
                ce = ce.with_help(help);
            }
            return Err(ce);
        }
    };
    Ok(StageDecl { name, spec, spans })
}

fn serde_error(path: &Path, source: &str, prefix: &str, e: toml::de::Error) -> ConfigError {
    let mut ce = ConfigError::at(path, source, e.span(), prefix, e.message().trim_end().to_string());
    if let Some(help) = unknown_field_help(e.message()) {
        ce = ce.with_help(help);
    }
    ce
}

/// serde says "unknown field `x`, expected one of `a`, `b`": turn that into a did-you-mean.
fn unknown_field_help(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, tail) = rest.split_once('`')?;
    let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    match did_you_mean(field, expected.iter().copied()) {
        Some(s) => Some(format!("did you mean `{s}`?")),
        None if !expected.is_empty() => Some(format!("valid fields: {}", expected.join(", "))),
        None => Some("this kind takes no such field".into()),
    }
}

/// The key path inside `table` whose key or value contains `span`.
fn locate_key(table: &DeTable, span: &Range<usize>) -> Option<Vec<String>> {
    for (k, v) in table.iter() {
        let whole = k.span().start..v.span().end;
        if whole.start <= span.start && span.start < whole.end.max(whole.start + 1) {
            let mut path = vec![k.get_ref().to_string()];
            if let DeValue::Table(inner) = v.get_ref()
                && let Some(sub) = locate_key(inner, span)
            {
                path.extend(sub);
            }
            if let DeValue::Array(items) = v.get_ref() {
                for (i, item) in items.iter().enumerate() {
                    if item.span().start <= span.start && span.start < item.span().end {
                        path.push(i.to_string());
                        if let DeValue::Table(inner) = item.get_ref()
                            && let Some(sub) = locate_key(inner, span)
                        {
                            path.extend(sub);
                        }
                    }
                }
            }
            return Some(path);
        }
    }
    None
}

/// Checks that need the whole pipeline: per-stage semantics, references, artifact types, cycles.
/// Checks a pipeline changed after parsing (e.g. by `--set`) as a parsed one is checked.
pub fn revalidate(p: &Pipeline) -> Result<(), ConfigError> {
    validate(p)
}

/// No evaluation latent may be a training latent (see `stages::LatentSeeds`).
fn validate_seeds(p: &Pipeline) -> Result<(), ConfigError> {
    use crate::stages::SeedUse;
    let uses: Vec<_> = p
        .stages
        .iter()
        .flat_map(|s| s.spec.stage().latent_seeds().into_iter().map(move |l| (s, l)))
        .collect();
    for (eval_stage, e) in uses.iter().filter(|(_, l)| l.purpose == SeedUse::Evaluation) {
        for (train_stage, t) in uses.iter().filter(|(_, l)| l.purpose == SeedUse::Training) {
            if e.seeds.start < t.seeds.end && t.seeds.start < e.seeds.end {
                return Err(p
                    .error_at_field(
                        eval_stage,
                        e.field,
                        format!(
                            "evaluation seeds {}..{} overlap the training latents of `{}` (seeds {}..{})",
                            e.seeds.start, e.seeds.end, train_stage.name, t.seeds.start, t.seeds.end
                        ),
                    )
                    .with_help(format!(
                        "a metric on latents the student was regressed on is not a fair one: move `seed` of `{}` or of `{}`",
                        eval_stage.name, train_stage.name
                    )));
            }
        }
    }
    Ok(())
}

fn validate(p: &Pipeline) -> Result<(), ConfigError> {
    validate_seeds(p)?;
    for stage in &p.stages {
        if let Err(e) = stage.spec.stage().validate() {
            let mut ce = p.error_at_field(stage, &e.field, e.message);
            if let Some(h) = e.help {
                ce = ce.with_help(h);
            }
            return Err(ce);
        }
        for up in stage.spec.stage().upstream() {
            let Some(target) = p.stage(&up.stage) else {
                let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
                let help = match did_you_mean(&up.stage, names.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`? Stages here: {}", names.join(", ")),
                    None => format!("stages here: {}", names.join(", ")),
                };
                return Err(p
                    .error_at_field(
                        stage,
                        up.role,
                        format!("stage `{}` refers to a stage `{}` that does not exist", stage.name, up.stage),
                    )
                    .with_help(help));
            };
            let produced = target.spec.stage().output_type();
            if !up.accepts.contains(&produced) {
                let accepts: Vec<String> = up.accepts.iter().map(|a| format!("{a:?}")).collect();
                return Err(p
                    .error_at_field(
                        stage,
                        up.role,
                        format!(
                            "`{}` of stage `{}` needs a {} artifact, but stage `{}` (kind `{}`) produces {:?}",
                            up.role,
                            stage.name,
                            accepts.join(" or "),
                            target.name,
                            target.spec.kind(),
                            produced
                        ),
                    )
                    .with_help("point it at a stage of a kind that produces that artifact"));
            }
        }
    }
    if let Some(cycle) = p.graph().find_cycle() {
        let first = p.stage(&cycle[0]).expect("cycle names existing stages");
        let next = &cycle[1 % cycle.len()];
        let role = first
            .spec
            .stage()
            .upstream()
            .into_iter()
            .find(|u| &u.stage == next)
            .map(|u| u.role)
            .unwrap_or("kind");
        let mut shown = cycle.clone();
        shown.push(cycle[0].clone());
        return Err(p
            .error_at_field(first, role, format!("the stages form a cycle: {}", shown.join(" -> ")))
            .with_help("a stage cannot depend, directly or indirectly, on itself"));
    }
    Ok(())
}
