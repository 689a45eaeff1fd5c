//! The stage graph: dependency order, cycles, selections and drawings.

use std::collections::{BTreeSet, HashMap};

/// One stage as the graph sees it.
pub struct Node {
    pub name: String,
    pub kind: String,
    /// (role, upstream stage name) for each reference to another stage.
    pub upstream: Vec<(String, String)>,
}

/// A pipeline's stages and the references between them (built by `Pipeline::graph`).
pub struct StageGraph {
    pub pipeline: String,
    pub stages: Vec<Node>,
    /// Indices of each stage's upstream stages (references to unknown names left out).
    deps: Vec<Vec<usize>>,
}

impl StageGraph {
    pub fn new(pipeline: String, stages: Vec<Node>) -> Self {
        let index: HashMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        let deps = stages
            .iter()
            .map(|s| s.upstream.iter().filter_map(|(_, u)| index.get(u.as_str()).copied()).collect())
            .collect();
        StageGraph { pipeline, stages, deps }
    }

    /// A dependency cycle as stage names, each depending on the next, if there is one.
    /// Depth-first with an explicit stack: a chain of 100k stages must not overflow the call stack.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        let d = &self.deps;
        let mut state = vec![0u8; d.len()]; // 0 new, 1 on the path, 2 done
        for root in 0..d.len() {
            if state[root] != 0 {
                continue;
            }
            // (stage, index of its next dependency to look at)
            let mut path: Vec<(usize, usize)> = vec![(root, 0)];
            state[root] = 1;
            while let Some(&mut (i, ref mut next)) = path.last_mut() {
                if let Some(&j) = d[i].get(*next) {
                    *next += 1;
                    match state[j] {
                        1 => {
                            let start = path.iter().position(|&(k, _)| k == j).expect("on the path");
                            return Some(path[start..].iter().map(|&(k, _)| self.stages[k].name.clone()).collect());
                        }
                        0 => {
                            state[j] = 1;
                            path.push((j, 0));
                        }
                        _ => {}
                    }
                } else {
                    state[i] = 2;
                    path.pop();
                }
            }
        }
        None
    }

    /// Stage indices in dependency order; ties keep file order (Kahn's algorithm over a min-heap of
    /// ready stages, O((stages + edges) log stages)). The pipeline has no cycle.
    pub fn topo_order(&self) -> Vec<usize> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let d = &self.deps;
        let mut waiting: Vec<usize> = d.iter().map(Vec::len).collect();
        let mut dependents = vec![Vec::new(); d.len()];
        for (i, ups) in d.iter().enumerate() {
            for &j in ups {
                dependents[j].push(i);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> = (0..d.len()).filter(|&i| waiting[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(d.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for &k in &dependents[i] {
                waiting[k] -= 1;
                if waiting[k] == 0 {
                    ready.push(Reverse(k));
                }
            }
        }
        assert_eq!(order.len(), d.len(), "validated: no cycle");
        order
    }

    /// `name` and every stage it depends on, directly or not.
    pub fn ancestors_and_self(&self, name: &str) -> BTreeSet<String> {
        let d = &self.deps;
        let mut out = BTreeSet::new();
        let mut todo: Vec<usize> = self.stages.iter().position(|s| s.name == name).into_iter().collect();
        while let Some(i) = todo.pop() {
            if out.insert(self.stages[i].name.clone()) {
                todo.extend(&d[i]);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

impl StageGraph {
    pub fn render(&self, format: DagFormat) -> String {
        let p = self;
        let mut out = String::new();
        match format {
            DagFormat::Text => {
                for i in self.topo_order() {
                    let s = &p.stages[i];
                    let ups: Vec<String> = s.upstream.iter().map(|(role, u)| format!("{role} <- {u}")).collect();
                    if ups.is_empty() {
                        out.push_str(&format!("{} ({})\n", s.name, s.kind));
                    } else {
                        out.push_str(&format!("{} ({})  [{}]\n", s.name, s.kind, ups.join(", ")));
                    }
                }
            }
            DagFormat::Dot => {
                out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n", p.pipeline));
                for s in &p.stages {
                    out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", s.name, s.name, s.kind));
                }
                for s in &p.stages {
                    for (role, u) in &s.upstream {
                        out.push_str(&format!("  \"{}\" -> \"{}\" [label=\"{}\"];\n", u, s.name, role));
                    }
                }
                out.push_str("}\n");
            }
            DagFormat::Mermaid => {
                out.push_str("flowchart LR\n");
                for s in &p.stages {
                    out.push_str(&format!("  {}[\"{} ({})\"]\n", mermaid_id(&s.name), s.name, s.kind));
                }
                for s in &p.stages {
                    for (role, u) in &s.upstream {
                        out.push_str(&format!("  {} -->|{}| {}\n", mermaid_id(u), role, mermaid_id(&s.name)));
                    }
                }
            }
        }
        out
    }
}

fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "_"))
}
