//! The house rules of docs/ARCHITECTURE.md, read from `src/`: every import looks down the layer
//! table (or sideways within a layer, without cycles), no stage file imports another, the
//! pipeline layer names no tensor library, and no function is longer than 120 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules and their layer, top (highest) to bottom; the same table as
/// docs/ARCHITECTURE.md.
const LAYERS: &[(&str, u32)] = &[
    ("main", 8),
    ("lib", 8),
    ("cli", 8),
    ("pipeline", 7),
    ("stages", 6),
    ("bench", 6),
    ("train", 5),
    ("eval", 5),
    ("sample", 5),
    ("dist", 4),
    ("nn", 3),
    ("artifact", 2),
    ("data", 2),
    ("render", 2),
    ("torch_shim", 1),
    ("cuda_graph", 1),
    ("fused_kernels", 1),
];

/// Files in `src/stages` that are no stage kind: the registry and the registry's estimates.
const STAGE_REGISTRY_FILES: &[&str] = &["mod", "estimate"];

const MAX_FUNCTION_LINES: usize = 120;

struct SourceFile {
    /// Module path, e.g. ["stages", "dmd"] (mod.rs files end in "mod").
    module: Vec<String>,
    /// The file's text before its `#[cfg(test)]` module.
    code: String,
}

fn src_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn source_files() -> Vec<SourceFile> {
    let root = src_dir();
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&root).sort_by_file_name() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&root).unwrap().with_extension("");
        let module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        let text = std::fs::read_to_string(path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap().to_string();
        out.push(SourceFile { module, code });
    }
    out
}

fn layer(top: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == top)
        .unwrap_or_else(|| panic!("module `{top}` is not in the layer table (tests/architecture.rs, docs/ARCHITECTURE.md)"))
        .1
}

/// Every `prefix::a::b...` path in `code`, as its segments.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let segs: Vec<String> = rest
            .split("::")
            .map(|s| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
            .take_while(|s| !s.is_empty())
            .collect();
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The source file a path names, if it is one (`crate::stages::teacher::X` -> stages/teacher).
fn resolve(files: &BTreeSet<Vec<String>>, segs: &[String]) -> Option<Vec<String>> {
    for n in (1..=segs.len()).rev() {
        let m = segs[..n].to_vec();
        if files.contains(&m) {
            return Some(m);
        }
        let mut with_mod = m.clone();
        with_mod.push("mod".into());
        if files.contains(&with_mod) {
            return Some(with_mod);
        }
    }
    None
}

/// The directory a file's `super::` refers to (its parent module's path).
fn super_of(module: &[String]) -> Vec<String> {
    let mut m = module.to_vec();
    if m.last().is_some_and(|l| l == "mod") {
        m.pop();
    }
    m.pop();
    m
}

/// File-level imports: `crate::...` and `super::...` paths resolved to files.
fn file_edges(files: &[SourceFile]) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let names: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges = BTreeMap::new();
    for f in files {
        let mut to = BTreeSet::new();
        for segs in paths_after(&f.code, "crate::") {
            to.extend(resolve(&names, &segs));
        }
        let parent = super_of(&f.module);
        for segs in paths_after(&f.code, "super::") {
            let mut full = parent.clone();
            full.extend(segs);
            to.extend(resolve(&names, &full));
        }
        to.remove(&f.module);
        edges.insert(f.module.clone(), to);
    }
    edges
}

/// A module's own `mod.rs` and its children re-export and use each other by design.
fn is_parent_child(a: &[String], b: &[String]) -> bool {
    let dir = |m: &[String]| super_of(m);
    let is_mod_of =
        |parent: &[String], child: &[String]| parent.last().is_some_and(|l| l == "mod") && parent[..parent.len() - 1] == dir(child)[..];
    is_mod_of(a, b) || is_mod_of(b, a)
}

#[test]
fn imports_look_down_the_layer_table() {
    let files = source_files();
    let mut wrong = Vec::new();
    for (from, tos) in file_edges(&files) {
        for to in tos {
            if layer(&to[0]) > layer(&from[0]) {
                wrong.push(format!(
                    "{} (layer {}) imports {} (layer {})",
                    from.join("/"),
                    layer(&from[0]),
                    to.join("/"),
                    layer(&to[0])
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that run up a layer:\n{}", wrong.join("\n"));
}

#[test]
fn no_cycles_between_files_or_top_level_modules() {
    let files = source_files();
    let edges = file_edges(&files);
    let mut cycles = Vec::new();
    for (a, tos) in &edges {
        for b in tos {
            if !is_parent_child(a, b) && reaches(&edges, b, a) {
                cycles.push(format!("{} -> {} -> ... -> {}", a.join("/"), b.join("/"), a.join("/")));
            }
        }
    }
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, tos) in &edges {
        for b in tos.iter().filter(|b| b[0] != a[0]) {
            top.entry(a[0].clone()).or_default().insert(b[0].clone());
        }
    }
    for (a, tos) in &top {
        for b in tos {
            if top.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("module {a} <-> module {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

fn reaches(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, from: &Vec<String>, to: &Vec<String>) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.clone()];
    while let Some(m) = todo.pop() {
        if &m == to {
            return true;
        }
        if seen.insert(m.clone()) {
            for next in edges.get(&m).into_iter().flatten() {
                // A hop through a parent's mod.rs is a re-export, not a dependency cycle.
                if !is_parent_child(&m, next) {
                    todo.push(next.clone());
                }
            }
        }
    }
    false
}

#[test]
fn no_stage_file_imports_another_stage() {
    let files = source_files();
    let edges = file_edges(&files);
    let is_stage_file = |m: &[String]| m.len() == 2 && m[0] == "stages" && !STAGE_REGISTRY_FILES.contains(&m[1].as_str());
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        if is_stage_file(from) {
            wrong.extend(
                tos.iter()
                    .filter(|t| is_stage_file(t))
                    .map(|t| format!("{} imports {}", from.join("/"), t.join("/"))),
            );
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_pipeline_layer_names_no_tensor_library() {
    let mut wrong = Vec::new();
    for f in source_files().iter().filter(|f| f.module[0] == "pipeline") {
        let code: String = f
            .code
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for needle in ["tch::", "torch_sys", "torch_shim", "cuda_graph"] {
            if code.contains(needle) {
                wrong.push(format!("{} uses {needle}", f.module.join("/")));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// (file, first line, name, lines) of every `fn` item, by brace matching on code lines.
fn functions(path: &Path) -> Vec<(usize, String, usize)> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        let Some(sig) = t.strip_prefix("fn ") else { continue };
        let name: String = sig.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            let code = l.split("//").next().unwrap_or("");
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !opened && code.trim_end().ends_with(';') {
                break;
            }
            if opened && depth == 0 {
                out.push((i + 1, name.clone(), j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_120_lines() {
    let mut long = Vec::new();
    for entry in walkdir::WalkDir::new(src_dir()) {
        let entry = entry.unwrap();
        if entry.path().extension().is_some_and(|e| e == "rs") {
            for (line, name, n) in functions(entry.path()) {
                if n > MAX_FUNCTION_LINES {
                    long.push(format!("{}:{line} `{name}`: {n} lines", entry.path().display()));
                }
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FUNCTION_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn the_layer_table_is_the_documented_one() {
    let doc = std::fs::read_to_string(src_dir().join("../docs/ARCHITECTURE.md")).unwrap();
    for (module, layer) in LAYERS {
        let row = format!("| {layer} | `{module}` |");
        assert!(doc.contains(&row), "docs/ARCHITECTURE.md lacks the row `{row}`");
    }
}
