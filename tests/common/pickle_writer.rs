//! Writes pickles shaped like the files dmdpipe imports: EDM's `.pkl` snapshots (persistent
//! objects, legacy storage blobs) and torch zip checkpoints. Test-only.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;

use tch::Tensor;

pub struct Pickler {
    pub out: Vec<u8>,
}

impl Pickler {
    pub fn new(protocol: u8) -> Self {
        Pickler { out: vec![0x80, protocol] }
    }
    fn memoize(&mut self) {
        self.out.push(0x94);
    }
    pub fn str(&mut self, s: &str) {
        if s.len() < 256 {
            self.out.push(0x8c);
            self.out.push(s.len() as u8);
        } else {
            self.out.push(b'X');
            self.out.extend((s.len() as u32).to_le_bytes());
        }
        self.out.extend(s.as_bytes());
        self.memoize();
    }
    pub fn int(&mut self, i: i64) {
        if (0..256).contains(&i) {
            self.out.extend([b'K', i as u8]);
        } else if (0..65536).contains(&i) {
            self.out.push(b'M');
            self.out.extend((i as u16).to_le_bytes());
        } else if i32::try_from(i).is_ok() {
            self.out.push(b'J');
            self.out.extend((i as i32).to_le_bytes());
        } else {
            self.out.extend([0x8a, 8]);
            self.out.extend(i.to_le_bytes());
        }
    }
    pub fn long_bytes(&mut self, le: &[u8]) {
        self.out.extend([0x8a, le.len() as u8]);
        self.out.extend(le);
    }
    pub fn float(&mut self, f: f64) {
        self.out.push(b'G');
        self.out.extend(f.to_be_bytes());
    }
    pub fn none(&mut self) {
        self.out.push(b'N');
    }
    pub fn bool(&mut self, b: bool) {
        self.out.push(if b { 0x88 } else { 0x89 });
    }
    pub fn bytes(&mut self, b: &[u8]) {
        if b.len() < 256 {
            self.out.extend([b'C', b.len() as u8]);
        } else {
            self.out.push(b'B');
            self.out.extend((b.len() as u32).to_le_bytes());
        }
        self.out.extend(b);
        self.memoize();
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.str(module);
        self.str(name);
        self.out.push(0x93);
        self.memoize();
    }
    pub fn mark(&mut self) {
        self.out.push(b'(');
    }
    pub fn tuple(&mut self) {
        self.out.push(b't');
        self.memoize();
    }
    pub fn empty_tuple(&mut self) {
        self.out.push(b')');
    }
    pub fn empty_dict(&mut self) {
        self.out.push(b'}');
        self.memoize();
    }
    pub fn empty_list(&mut self) {
        self.out.push(b']');
        self.memoize();
    }
    pub fn setitems(&mut self) {
        self.out.push(b'u');
    }
    pub fn appends(&mut self) {
        self.out.push(b'e');
    }
    pub fn reduce(&mut self) {
        self.out.push(b'R');
        self.memoize();
    }
    pub fn newobj(&mut self) {
        self.out.push(0x81);
        self.memoize();
    }
    pub fn build(&mut self) {
        self.out.push(b'b');
    }
    pub fn persid(&mut self) {
        self.out.push(b'Q');
    }
    pub fn stop(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }
    /// collections.OrderedDict() followed by SETITEMS of `items`.
    pub fn ordered_dict(&mut self, items: impl FnOnce(&mut Self)) {
        self.global("collections", "OrderedDict");
        self.empty_tuple();
        self.reduce();
        self.mark();
        items(self);
        self.setitems();
    }
    pub fn dict(&mut self, items: impl FnOnce(&mut Self)) {
        self.empty_dict();
        self.mark();
        items(self);
        self.setitems();
    }
}

pub fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(tch::Kind::Float).contiguous();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.copy_data(&mut v, n);
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A legacy torch.save stream of one FloatStorage (what torch.storage._load_from_bytes reads).
pub fn legacy_storage_blob(t: &Tensor) -> Vec<u8> {
    let data = f32_bytes(t);
    let numel = t.numel() as u64;
    let mut out = Vec::new();
    let magic: u128 = 0x1950a86a20f9469cfc6c;
    let mut p = Pickler::new(2);
    p.long_bytes(&magic.to_le_bytes()[..10]);
    out.extend(p.stop());
    let mut p = Pickler::new(2);
    p.int(1001);
    out.extend(p.stop());
    let mut p = Pickler::new(2);
    p.dict(|p| {
        p.str("protocol_version");
        p.int(1001);
        p.str("little_endian");
        p.bool(true);
    });
    out.extend(p.stop());
    let mut p = Pickler::new(2);
    p.mark();
    p.str("storage");
    p.global("torch", "FloatStorage");
    p.str("0");
    p.str("cpu");
    p.int(numel as i64);
    p.none();
    p.tuple();
    p.persid();
    out.extend(p.stop());
    let mut p = Pickler::new(2);
    p.empty_list();
    p.mark();
    p.str("0");
    p.appends();
    out.extend(p.stop());
    out.extend(numel.to_le_bytes());
    out.extend(data);
    out
}

/// A parameter as EDM's pickles store it.
fn parameter(p: &mut Pickler, t: &Tensor) {
    p.global("torch._utils", "_rebuild_parameter");
    p.mark();
    buffer(p, t);
    p.bool(true);
    p.ordered_dict(|_| {});
    p.tuple();
    p.reduce();
}

fn tensor_v2(p: &mut Pickler, t: &Tensor, storage: impl FnOnce(&mut Pickler, &Tensor)) {
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    storage(p, t);
    p.int(0);
    let size = t.size();
    p.mark();
    for s in &size {
        p.int(*s);
    }
    p.tuple();
    let mut stride = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * size[i + 1];
    }
    p.mark();
    for s in &stride {
        p.int(*s);
    }
    p.tuple();
    p.bool(false);
    p.ordered_dict(|_| {});
    p.tuple();
    p.reduce();
}

/// A tensor as EDM's pickles store it (a buffer as is; a parameter wraps it).
fn buffer(p: &mut Pickler, t: &Tensor) {
    tensor_v2(p, t, |p, t| {
        p.global("torch.storage", "_load_from_bytes");
        p.mark();
        p.bytes(&legacy_storage_blob(t));
        p.tuple();
        p.reduce();
    });
}

/// Dotted state-dict names as a module tree.
fn module_tree(tensors: &BTreeMap<String, Tensor>) -> Node {
    let mut root = Node::default();
    for (name, t) in tensors {
        let parts: Vec<&str> = name.split('.').collect();
        let mut node = &mut root;
        for part in &parts[..parts.len() - 1] {
            node = node.children.entry(part.to_string()).or_default();
        }
        node.tensors.insert(parts[parts.len() - 1].to_string(), t.shallow_clone());
    }
    root
}

#[derive(Default)]
struct Node {
    tensors: BTreeMap<String, Tensor>,
    children: BTreeMap<String, Node>,
}

fn class_of(name: &str, is_dict: bool) -> &'static str {
    if is_dict {
        "ModuleDict"
    } else if name.contains("norm") {
        "GroupNorm"
    } else if name.starts_with("map_") {
        "Linear"
    } else {
        "Conv2d"
    }
}

/// A plain torch container (`ModuleDict`, `Sequential`): NEWOBJ, then BUILD with its state.
fn container(p: &mut Pickler, class: &str, state: impl FnOnce(&mut Pickler)) {
    p.global("torch.nn.modules.container", class);
    p.empty_tuple();
    p.newobj();
    state(p);
    p.build();
}

/// An object of EDM's persistence helper: REDUCE(_reconstruct_persistent_obj, (meta,)).
fn persistent(p: &mut Pickler, class: &str, module_src: &str, state: impl FnOnce(&mut Pickler)) {
    p.global("torch_utils.persistence", "_reconstruct_persistent_obj");
    p.mark();
    p.dict(|p| {
        p.str("type");
        p.str("class");
        p.str("version");
        p.int(6);
        p.str("module_src");
        p.str(module_src);
        p.str("class_name");
        p.str(class);
        p.str("state");
        state(p);
    });
    p.tuple();
    p.reduce();
}

fn module(p: &mut Pickler, node: &Node, class: &str, init_kwargs: Option<&serde_json::Value>) {
    if class == "ModuleDict" {
        return container(p, class, |p| state(p, node, None));
    }
    let src = "# the whole defining module's source text would be here\n".repeat(8);
    persistent(p, class, &src, |p| state(p, node, init_kwargs));
}

fn json_value(p: &mut Pickler, v: &serde_json::Value) {
    match v {
        serde_json::Value::Null => p.none(),
        serde_json::Value::Bool(b) => p.bool(*b),
        serde_json::Value::Number(n) if n.is_i64() => p.int(n.as_i64().unwrap()),
        serde_json::Value::Number(n) => p.float(n.as_f64().unwrap()),
        serde_json::Value::String(s) => p.str(s),
        serde_json::Value::Array(a) => {
            p.empty_list();
            p.mark();
            for x in a {
                json_value(p, x);
            }
            p.appends();
        }
        serde_json::Value::Object(o) => p.dict(|p| {
            for (k, x) in o {
                p.str(k);
                json_value(p, x);
            }
        }),
    }
}

/// The entries every torch module's state dict starts with: `training`, `_parameters` (the
/// tensors `is_parameter` picks), `_buffers` (the others) and `_modules` (each child written by
/// `child`).
fn module_entries(p: &mut Pickler, node: &Node, is_parameter: impl Fn(&str) -> bool, mut child: impl FnMut(&mut Pickler, &str, &Node)) {
    p.str("training");
    p.bool(false);
    p.str("_parameters");
    p.ordered_dict(|p| {
        for (k, t) in node.tensors.iter().filter(|(k, _)| is_parameter(k)) {
            p.str(k);
            parameter(p, t);
        }
    });
    p.str("_buffers");
    p.ordered_dict(|p| {
        for (k, t) in node.tensors.iter().filter(|(k, _)| !is_parameter(k)) {
            p.str(k);
            buffer(p, t);
        }
    });
    p.str("_modules");
    p.ordered_dict(|p| {
        for (k, c) in &node.children {
            p.str(k);
            child(p, k, c);
        }
    });
}

fn state(p: &mut Pickler, node: &Node, init_kwargs: Option<&serde_json::Value>) {
    p.dict(|p| {
        module_entries(
            p,
            node,
            |k| !k.ends_with("resample_filter"),
            |p, k, child| {
                let is_dict = k == "enc" || k == "dec";
                let class = if k == "model" { "SongUNet" } else { class_of(k, is_dict) };
                module(p, child, class, None);
            },
        );
        if let Some(kw) = init_kwargs {
            p.str("_init_args");
            p.empty_tuple();
            p.str("_init_kwargs");
            json_value(p, kw);
            p.str("skip_scale");
            p.global("numpy._core.multiarray", "scalar");
            p.mark();
            p.global("numpy", "dtype");
            p.mark();
            p.str("f8");
            p.bool(false);
            p.bool(true);
            p.tuple();
            p.reduce();
            p.bytes(&0.5f64.sqrt().to_le_bytes());
            p.tuple();
            p.reduce();
        }
    });
}

/// An EDM-style snapshot `{ema: EDMPrecond(...), loss_fn: None, augment_pipe: None, ...}` holding
/// `tensors` (EDM state-dict names) with `init_kwargs` as the network config.
pub fn edm_snapshot(tensors: &BTreeMap<String, Tensor>, init_kwargs: &serde_json::Value) -> Vec<u8> {
    let root = module_tree(tensors);
    let mut p = Pickler::new(4);
    p.dict(|p| {
        p.str("ema");
        module(p, &root, "EDMPrecond", Some(init_kwargs));
        p.str("loss_fn");
        p.none();
        p.str("augment_pipe");
        p.none();
        p.str("dataset_kwargs");
        p.dict(|p| {
            p.str("class_name");
            p.str("training.dataset.ImageFolderDataset");
        });
    });
    p.stop()
}

/// A torch zip checkpoint (`archive/data.pkl` + `archive/data/<key>`) of a plain state dict.
pub fn torch_zip(tensors: &BTreeMap<String, Tensor>, path: &std::path::Path) {
    let mut p = Pickler::new(2);
    let mut storages = Vec::new();
    p.ordered_dict(|p| {
        for (i, (name, t)) in tensors.iter().enumerate() {
            p.str(name);
            tensor_v2(p, t, |p, t| {
                p.mark();
                p.str("storage");
                p.global("torch", "FloatStorage");
                p.str(&i.to_string());
                p.str("cpu");
                p.int(t.numel() as i64);
                p.tuple();
                p.persid();
            });
            storages.push(f32_bytes(t));
        }
    });
    let pkl = p.stop();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    for (i, s) in storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        zip.write_all(s).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// A module tree the way NVIDIA's `inception-2015-12-05.pkl` detector pickles: persistence
/// objects (`_reconstruct_persistent_obj`) for the network and its blocks, `Sequential`
/// containers as plain objects (NEWOBJ + BUILD), conv weights as parameters and the batch-norm
/// `beta`/`mean`/`var` as buffers, plus plain attributes the reader must skip.
pub fn nvidia_detector(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let root = module_tree(tensors);
    fn detector_state(p: &mut Pickler, node: &Node) {
        p.dict(|p| {
            module_entries(p, node, |k| k == "weight", |p, k, child| detector_module(p, child, k));
            if !node.tensors.is_empty() {
                p.str("stride");
                p.int(1);
                p.str("padding");
                p.empty_list();
            }
        });
    }
    fn detector_module(p: &mut Pickler, node: &Node, name: &str) {
        if name == "layers" || name.starts_with("tower") && !node.children.is_empty() {
            return container(p, "Sequential", |p| detector_state(p, node));
        }
        let class = if node.tensors.is_empty() { "InceptionBlock" } else { "Conv2dLayer" };
        persistent(p, class, "# the detector's source text would be here\n", |p| {
            detector_state(p, node)
        });
    }
    let mut p = Pickler::new(4);
    detector_module(&mut p, &root, "InceptionV3");
    p.stop()
}
