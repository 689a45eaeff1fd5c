//! The stage graph: dependency order, cycles, selections and drawings.

use std::collections::{BTreeSet, HashMap};

use super::config::Pipeline;

/// Upstream stage names of each stage, by index.
fn deps(p: &Pipeline) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = p.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    p.stages
        .iter()
        .map(|s| {
            s.spec
                .stage()
                .upstream()
                .iter()
                .filter_map(|u| index.get(u.stage.as_str()).copied())
                .collect()
        })
        .collect()
}

/// A dependency cycle as stage names, each depending on the next, if there is one.
pub fn find_cycle(p: &Pipeline) -> Option<Vec<String>> {
    let d = deps(p);
    let mut state = vec![0u8; d.len()]; // 0 new, 1 on stack, 2 done
    let mut stack = Vec::new();
    fn visit(i: usize, d: &[Vec<usize>], state: &mut [u8], stack: &mut Vec<usize>) -> Option<Vec<usize>> {
        state[i] = 1;
        stack.push(i);
        for &j in &d[i] {
            if state[j] == 1 {
                let start = stack.iter().position(|&k| k == j).expect("on stack");
                return Some(stack[start..].to_vec());
            }
            if state[j] == 0
                && let Some(c) = visit(j, d, state, stack)
            {
                return Some(c);
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    for i in 0..d.len() {
        if state[i] == 0
            && let Some(c) = visit(i, &d, &mut state, &mut stack)
        {
            return Some(c.into_iter().map(|k| p.stages[k].name.clone()).collect());
        }
    }
    None
}

/// Stage indices in dependency order; ties keep file order. The pipeline has no cycle.
pub fn topo_order(p: &Pipeline) -> Vec<usize> {
    let d = deps(p);
    let mut done = vec![false; d.len()];
    let mut order = Vec::new();
    while order.len() < d.len() {
        let next = (0..d.len())
            .find(|&i| !done[i] && d[i].iter().all(|&j| done[j]))
            .expect("validated: no cycle");
        done[next] = true;
        order.push(next);
    }
    order
}

/// `name` and every stage it depends on, directly or not.
pub fn ancestors_and_self(p: &Pipeline, name: &str) -> BTreeSet<String> {
    let d = deps(p);
    let mut out = BTreeSet::new();
    let mut todo: Vec<usize> = p.stages.iter().position(|s| s.name == name).into_iter().collect();
    while let Some(i) = todo.pop() {
        if out.insert(p.stages[i].name.clone()) {
            todo.extend(&d[i]);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

pub fn render(p: &Pipeline, format: DagFormat) -> String {
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            for i in topo_order(p) {
                let s = &p.stages[i];
                let ups: Vec<String> = s
                    .spec
                    .stage()
                    .upstream()
                    .iter()
                    .map(|u| format!("{} <- {}", u.role, u.stage))
                    .collect();
                if ups.is_empty() {
                    out.push_str(&format!("{} ({})\n", s.name, s.spec.kind()));
                } else {
                    out.push_str(&format!("{} ({})  [{}]\n", s.name, s.spec.kind(), ups.join(", ")));
                }
            }
        }
        DagFormat::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n", p.name));
            for s in &p.stages {
                out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", s.name, s.name, s.spec.kind()));
            }
            for s in &p.stages {
                for u in s.spec.stage().upstream() {
                    out.push_str(&format!("  \"{}\" -> \"{}\" [label=\"{}\"];\n", u.stage, s.name, u.role));
                }
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for s in &p.stages {
                out.push_str(&format!("  {}[\"{} ({})\"]\n", mermaid_id(&s.name), s.name, s.spec.kind()));
            }
            for s in &p.stages {
                for u in s.spec.stage().upstream() {
                    out.push_str(&format!("  {} -->|{}| {}\n", mermaid_id(&u.stage), u.role, mermaid_id(&s.name)));
                }
            }
        }
    }
    out
}

fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "_"))
}
