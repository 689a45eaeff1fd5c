//! PyTorch's pickle-based files, read into tensors without running Python: torch zip
//! checkpoints (`torch.save` since 1.6: `data.pkl` + `data/<key>` storages), pickled modules
//! (EDM/StyleGAN persistence objects or plain `nn.Module`s, whose storages are embedded legacy
//! `torch.save` streams) and EDM's training snapshots (`network-snapshot-*.pkl`,
//! `edm-*.pkl`: a dict whose `ema` is the network).
//!
//! The generic reader (`pickle`) records every call; this module interprets the handful that
//! describe tensors and modules, and nothing else.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use tch::{Kind, Tensor};

use super::pickle::{self, Node, NodeId, Pickle, Value};

/// One storage: element kind and raw little-endian bytes.
pub struct Storage {
    pub kind: Kind,
    pub bytes: Vec<u8>,
}

/// Resolves a persistent id (a zip checkpoint's `('storage', type, key, location, numel)`).
type ResolvePersistent<'a> = dyn FnMut(&Pickle, &Value) -> Result<Rc<Storage>> + 'a;

/// Interprets tensors, parameters and modules of one loaded pickle.
pub struct TorchPickle<'a> {
    pub pickle: Pickle,
    resolve: RefCell<Box<ResolvePersistent<'a>>>,
    storages: RefCell<HashMap<NodeId, Rc<Storage>>>,
}

/// Module trees deeper than this are refused (real networks are a few tens of levels).
const MAX_MODULE_DEPTH: usize = 256;

fn no_persistent_ids(_: &Pickle, pid: &Value) -> Result<Rc<Storage>> {
    bail!("unexpected persistent id {pid:?}: this pickle should embed its storages")
}

impl<'a> TorchPickle<'a> {
    /// A pickle whose storages are embedded (EDM snapshots, pickled modules).
    pub fn embedded(data: &[u8]) -> Result<TorchPickle<'static>> {
        let pickle = pickle::load_all(data).map_err(|e| anyhow!("not a readable pickle: {e}"))?;
        Ok(TorchPickle {
            pickle,
            resolve: RefCell::new(Box::new(no_persistent_ids)),
            storages: RefCell::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Value {
        self.pickle.root.as_ref().expect("a loaded pickle has a root")
    }

    fn node(&self, v: &Value) -> Option<&Node> {
        self.pickle.node(v)
    }

    /// `module.name` of a call's callable.
    pub fn call_name(&self, v: &Value) -> Option<String> {
        match self.node(v) {
            Some(Node::Call { callable, .. }) => pickle::global_name(&self.pickle, callable),
            _ => None,
        }
    }

    /// Looks `key` up in a dict (or a dict subclass's items).
    pub fn get(&self, dict: &Value, key: &str) -> Option<Value> {
        self.items(dict)
            .into_iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s.as_ref() == key))
            .map(|(_, v)| v)
    }

    /// A dict's items (also an object that is a dict subclass, e.g. EDM's `EasyDict`).
    pub fn items(&self, dict: &Value) -> Vec<(Value, Value)> {
        match self.node(dict) {
            Some(Node::Dict(d)) => d.clone(),
            Some(Node::Call { dict_items, .. }) => dict_items.clone(),
            _ => Vec::new(),
        }
    }

    fn seq(&self, v: &Value) -> Option<Vec<Value>> {
        match self.node(v) {
            Some(Node::List(l) | Node::Tuple(l)) => Some(l.clone()),
            _ => None,
        }
    }

    fn ints(&self, v: &Value, what: &str) -> Result<Vec<i64>> {
        let items = self.seq(v).ok_or_else(|| anyhow!("tensor {what} is not a sequence"))?;
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => bail!("tensor {what} holds {other:?}"),
            })
            .collect()
    }

    /// The tensor a value describes: `_rebuild_tensor_v2` and its relatives, parameters
    /// wrapping them. `None` when the value is not a tensor at all.
    pub fn tensor(&self, v: &Value) -> Result<Option<Tensor>> {
        let Some(Node::Call { callable, args, .. }) = self.node(v) else {
            return Ok(None);
        };
        let name = pickle::global_name(&self.pickle, callable).unwrap_or_default();
        self.rebuild(&name, args, 0)
    }

    /// Interprets `name(*args)` when `name` is one of torch's tensor rebuild functions.
    fn rebuild(&self, name: &str, args: &[Value], depth: usize) -> Result<Option<Tensor>> {
        if depth > 4 {
            bail!("tensor wrapped too deeply");
        }
        match name {
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                if args.len() < 4 {
                    bail!("{name} with {} arguments", args.len());
                }
                let storage = self.storage(&args[0])?;
                let offset = match &args[1] {
                    Value::Int(i) => *i,
                    other => bail!("tensor offset {other:?}"),
                };
                let size = self.ints(&args[2], "size")?;
                let stride = self.ints(&args[3], "stride")?;
                Ok(Some(strided_tensor(&storage, offset, &size, &stride)?))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                let inner = args.first().ok_or_else(|| anyhow!("{name} without a tensor"))?;
                match self.tensor(inner)? {
                    Some(t) => Ok(Some(t)),
                    None => bail!("{name} of something that is not a tensor"),
                }
            }
            "torch._tensor._rebuild_from_type_v2" => {
                // (func, type, args, state): func(*args) is the tensor.
                let (Some(func), Some(inner_args)) = (args.first(), args.get(2)) else {
                    bail!("{name} with {} arguments", args.len())
                };
                let func = pickle::global_name(&self.pickle, func).unwrap_or_default();
                let inner_args = self.seq(inner_args).ok_or_else(|| anyhow!("{name}: arguments are not a tuple"))?;
                self.rebuild(&func, &inner_args, depth + 1)
            }
            n if n.starts_with("torch._utils._rebuild_") => {
                bail!("unsupported tensor kind `{n}` (sparse, quantised or meta tensors)")
            }
            _ => Ok(None),
        }
    }

    fn storage(&self, v: &Value) -> Result<Rc<Storage>> {
        let Value::Ref(id) = v else { bail!("tensor storage is {v:?}") };
        if let Some(s) = self.storages.borrow().get(id) {
            return Ok(s.clone());
        }
        let storage = match self.node(v) {
            Some(Node::Persistent(pid)) => (self.resolve.borrow_mut())(&self.pickle, pid)?,
            Some(Node::Call { callable, args, .. })
                if pickle::global_name(&self.pickle, callable).as_deref() == Some("torch.storage._load_from_bytes") =>
            {
                match args.first() {
                    Some(Value::Bytes(b)) => Rc::new(load_legacy_storage(b)?),
                    _ => bail!("_load_from_bytes without bytes"),
                }
            }
            _ => bail!("tensor storage is not a storage: {}", pickle::to_json(&self.pickle, v)),
        };
        self.storages.borrow_mut().insert(*id, storage.clone());
        Ok(storage)
    }

    /// The `__dict__` of a module object: EDM persistence's `meta['state']`, or BUILD's state.
    fn module_dict(&self, v: &Value) -> Option<Value> {
        let Some(Node::Call { callable, args, state, .. }) = self.node(v) else {
            return None;
        };
        let state = if pickle::global_name(&self.pickle, callable).as_deref() == Some("torch_utils.persistence._reconstruct_persistent_obj")
        {
            self.get(args.first()?, "state")
        } else {
            state.clone()
        }?;
        // BUILD's state may be (dict, slots).
        match self.node(&state) {
            Some(Node::Tuple(t)) if t.len() == 2 => Some(t[0].clone()),
            _ => Some(state),
        }
    }

    /// The class name of an object: EDM persistence's `class_name`, or the callable's name.
    pub fn class_name(&self, v: &Value) -> Option<String> {
        let Some(Node::Call { callable, args, .. }) = self.node(v) else {
            return None;
        };
        let full = pickle::global_name(&self.pickle, callable)?;
        if full == "torch_utils.persistence._reconstruct_persistent_obj" {
            return match self.get(args.first()?, "class_name") {
                Some(Value::Str(s)) => Some(s.to_string()),
                _ => None,
            };
        }
        Some(full.rsplit('.').next().unwrap_or(&full).to_string())
    }

    /// A module's `state_dict()`: parameters and persistent buffers under dotted names.
    pub fn state_dict(&self, module: &Value) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut seen = HashSet::new();
        self.collect(module, "", 0, &mut seen, &mut out)?;
        Ok(out)
    }

    fn collect(
        &self,
        module: &Value,
        prefix: &str,
        depth: usize,
        seen: &mut HashSet<NodeId>,
        out: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        if depth > MAX_MODULE_DEPTH {
            bail!("module tree deeper than {MAX_MODULE_DEPTH} levels at `{prefix}`");
        }
        if let Value::Ref(id) = module
            && !seen.insert(*id)
        {
            return Ok(()); // a shared submodule: state_dict() lists it under its first name
        }
        let Some(dict) = self.module_dict(module) else { return Ok(()) };
        let non_persistent: HashSet<String> = match self.get(&dict, "_non_persistent_buffers_set").and_then(|s| self.node(&s).cloned()) {
            Some(Node::Set(items) | Node::FrozenSet(items) | Node::List(items)) => items
                .iter()
                .filter_map(|v| if let Value::Str(s) = v { Some(s.to_string()) } else { None })
                .collect(),
            _ => HashSet::new(),
        };
        for key in ["_parameters", "_buffers"] {
            let Some(entries) = self.get(&dict, key) else { continue };
            for (k, v) in self.items(&entries) {
                let Value::Str(name) = &k else { continue };
                if key == "_buffers" && non_persistent.contains(name.as_ref()) {
                    continue;
                }
                let full = format!("{prefix}{name}");
                if let Some(t) = self.tensor(&v).with_context(|| format!("tensor `{full}`"))? {
                    out.insert(full, t);
                }
            }
        }
        if let Some(children) = self.get(&dict, "_modules") {
            for (k, child) in self.items(&children) {
                if let Value::Str(name) = &k {
                    self.collect(&child, &format!("{prefix}{name}."), depth + 1, seen, out)?;
                }
            }
        }
        Ok(())
    }

    /// The constructor keyword arguments EDM's persistence recorded (`_init_kwargs`), as JSON.
    pub fn init_kwargs(&self, module: &Value) -> Option<serde_json::Value> {
        let dict = self.module_dict(module)?;
        let kw = self.get(&dict, "_init_kwargs")?;
        let json = pickle::to_json(&self.pickle, &kw);
        match json {
            // An EasyDict is a dict subclass: its items are the kwargs.
            serde_json::Value::Object(ref o) if o.contains_key("__call__") => o.get("items").cloned(),
            other => Some(other),
        }
    }
}

fn storage_kind(type_name: &str) -> Result<Kind> {
    Ok(match type_name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type `{other}`"),
    })
}

/// A persistent id `('storage', <type>, key, location, numel, ...)` -> (element kind, key).
fn storage_pid(p: &Pickle, pid: &Value) -> Result<(Kind, String)> {
    let items = match p.node(pid) {
        Some(Node::Tuple(t)) => t.clone(),
        _ => bail!("persistent id is not a tuple: {}", pickle::to_json(p, pid)),
    };
    if items.first().and_then(key_text).as_deref() != Some("storage") || items.len() < 3 {
        bail!("persistent id is not a storage: {}", pickle::to_json(p, pid));
    }
    let kind = match p.node(&items[1]) {
        Some(Node::Global { name, .. }) => storage_kind(name)?,
        _ => bail!("storage type is not a class"),
    };
    let key = key_text(&items[2]).ok_or_else(|| anyhow!("storage key {:?}", items[2]))?;
    Ok((kind, key))
}

/// A storage key as text: a str, an int, or (files Python 2 wrote) a byte string.
fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// The element count a storage persistent id records (its fifth item), when it does.
fn storage_numel(p: &Pickle, pid: &Value) -> Option<u64> {
    match p.node(pid) {
        Some(Node::Tuple(t)) => match t.get(4) {
            Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
            _ => None,
        },
        _ => None,
    }
}

/// A legacy (pre-zip) `torch.save` stream's pickles: magic number, protocol 1001, system info,
/// the object (storages as persistent ids) and the storage keys; returns the object, the keys
/// and where the storages' data starts (per key an int64 element count, then the raw data).
fn legacy_header(bytes: &[u8]) -> Result<(Pickle, Vec<String>, usize)> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Pickle> {
        let rest = bytes.get(pos..).ok_or_else(|| anyhow!("truncated before the {what}"))?;
        let (p, used) = pickle::load(rest).map_err(|e| anyhow!("{what}: {e}"))?;
        pos += used;
        Ok(p)
    };
    let magic = next("magic number")?;
    if !matches!(magic.root, Some(Value::BigInt(ref s)) if s.as_ref() == "119547037146038801333356") {
        bail!("bad magic number (neither a torch zip nor a legacy torch file)");
    }
    let protocol = next("protocol")?;
    if protocol.root != Some(Value::Int(1001)) {
        bail!("legacy torch protocol {:?}, expected 1001", protocol.root);
    }
    next("system info")?;
    let object = next("object")?;
    let keys = next("storage keys")?;
    let keys = match keys.root.as_ref().and_then(|r| keys.node(r)) {
        Some(Node::List(l)) => l.iter().map(|k| key_text(k).unwrap_or_else(|| format!("{k:?}"))).collect(),
        _ => bail!("the storage keys are not a list"),
    };
    Ok((object, keys, pos))
}

/// The storages of a legacy stream, from `pos` on, in the order of `keys`; `kinds` gives each
/// key's element type (from the object's persistent ids). Sizes are checked against the file.
fn legacy_storages(bytes: &[u8], mut pos: usize, keys: Vec<String>, kinds: &HashMap<String, Kind>) -> Result<HashMap<String, Storage>> {
    let mut storages = HashMap::new();
    for key in keys {
        let kind = *kinds
            .get(&key)
            .ok_or_else(|| anyhow!("storage `{key}` is not referenced by the object"))?;
        let count = bytes.get(pos..pos + 8).ok_or_else(|| anyhow!("storage `{key}`: size truncated"))?;
        let numel = u64::from_le_bytes(count.try_into().expect("8 bytes"));
        pos += 8;
        let elem = kind.elt_size_in_bytes() as u64;
        let len = numel
            .checked_mul(elem)
            .filter(|&n| n <= (bytes.len() - pos) as u64)
            .ok_or_else(|| anyhow!("storage `{key}`: {numel} elements of {elem} bytes run past the file"))? as usize;
        storages.insert(
            key,
            Storage {
                kind,
                bytes: bytes[pos..pos + len].to_vec(),
            },
        );
        pos += len;
    }
    Ok(storages)
}

/// A legacy stream of one storage, as pickled modules embed them (`_load_from_bytes`).
pub fn load_legacy_storage(bytes: &[u8]) -> Result<Storage> {
    let (obj, keys, pos) = legacy_header(bytes).map_err(|e| anyhow!("legacy storage: {e:#}"))?;
    let (kind, key) = match obj.root.as_ref().and_then(|r| obj.node(r)) {
        Some(Node::Persistent(pid)) => storage_pid(&obj, pid)?,
        _ => bail!("the legacy stream holds something other than one storage"),
    };
    let mut storages = legacy_storages(bytes, pos, keys, &HashMap::from([(key.clone(), kind)]))?;
    storages
        .remove(&key)
        .ok_or_else(|| anyhow!("legacy storage stream lacks storage `{key}`"))
}

const MAX_VIEW_REPEAT: i64 = 4096;

/// A contiguous CPU tensor from a storage view, bounds-checked (hostile sizes are errors).
/// Half, bfloat16 and double tensors come back as float32.
pub fn strided_tensor(storage: &Storage, offset: i64, size: &[i64], stride: &[i64]) -> Result<Tensor> {
    let elem = storage.kind.elt_size_in_bytes();
    let numel_storage = (storage.bytes.len() / elem) as i64;
    if size.len() != stride.len() {
        bail!("tensor size {size:?} and stride {stride:?} differ in rank");
    }
    if offset < 0 || size.iter().any(|&s| s < 0) || stride.iter().any(|&s| s < 0) {
        bail!("negative tensor offset, size or stride");
    }
    let mut numel: i64 = 1;
    let mut last: i64 = offset;
    for (&n, &s) in size.iter().zip(stride) {
        numel = numel.checked_mul(n).ok_or_else(|| anyhow!("tensor size {size:?} overflows"))?;
        if n > 0 {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|d| last.checked_add(d))
                .ok_or_else(|| anyhow!("tensor stride overflows"))?;
        }
    }
    if numel > 0 && last >= numel_storage {
        bail!("tensor view (offset {offset}, size {size:?}, stride {stride:?}) reaches past its storage of {numel_storage} elements");
    }
    // A zero stride repeats elements: a few bytes of storage could declare terabytes.
    if numel > numel_storage.max(1).saturating_mul(MAX_VIEW_REPEAT) {
        bail!("tensor view of {numel} elements repeats its storage of {numel_storage} elements more than {MAX_VIEW_REPEAT} times");
    }
    if numel == 0 {
        return Ok(Tensor::zeros(size, (loaded_kind(storage.kind), tch::Device::Cpu)));
    }
    let contiguous = size
        .iter()
        .zip(stride)
        .rev()
        .try_fold(1i64, |expect, (&n, &s)| (n <= 1 || s == expect).then_some(expect * n.max(1)))
        .is_some();
    let mut out = Vec::new();
    out.try_reserve_exact(numel as usize * elem)
        .map_err(|_| anyhow!("tensor of {numel} elements does not fit in memory"))?;
    if contiguous {
        let start = offset as usize * elem;
        out.extend_from_slice(&storage.bytes[start..start + numel as usize * elem]);
    } else if numel > 0 {
        let mut index = vec![0i64; size.len()];
        loop {
            let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<i64>();
            let at = at as usize * elem;
            out.extend_from_slice(&storage.bytes[at..at + elem]);
            // Odometer over the index, last dimension fastest.
            let mut d = size.len();
            loop {
                if d == 0 {
                    break;
                }
                d -= 1;
                index[d] += 1;
                if index[d] < size[d] {
                    break;
                }
                index[d] = 0;
            }
            if d == 0 && index.iter().all(|&i| i == 0) {
                break;
            }
        }
    }
    Ok(Tensor::f_from_data_size(&out, size, storage.kind)?.f_to_kind(loaded_kind(storage.kind))?)
}

/// Half, bfloat16 and double weights are loaded as float32; other kinds as they are.
fn loaded_kind(kind: Kind) -> Kind {
    if matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Double) {
        Kind::Float
    } else {
        kind
    }
}

/// What an EDM training snapshot holds.
pub struct EdmSnapshot {
    /// The `ema` network's state dict.
    pub tensors: HashMap<String, Tensor>,
    /// Its recorded constructor kwargs (EDMPrecond's), when it is a persistence object.
    pub init_kwargs: Option<serde_json::Value>,
    /// The network's class name (e.g. `EDMPrecond`).
    pub class_name: Option<String>,
    /// The snapshot's other entries (`loss_fn`, `augment_pipe`, `dataset_kwargs`, ...): name and
    /// a short description. Read, never used or executed.
    pub others: Vec<(String, String)>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads EDM's `.pkl` snapshot: the `ema` network and what else it holds.
pub fn read_edm_snapshot(path: &Path) -> Result<EdmSnapshot> {
    edm_snapshot_from_bytes(&read_file(path)?, path)
}

/// [`read_edm_snapshot`] on bytes in memory (`path` names them in messages).
pub fn edm_snapshot_from_bytes(bytes: &[u8], path: &Path) -> Result<EdmSnapshot> {
    let tp = TorchPickle::embedded(bytes).with_context(|| format!("{}", path.display()))?;
    let root = tp.root().clone();
    let ema = tp.get(&root, "ema").ok_or_else(|| {
        anyhow!(
            "{}: the pickle has no `ema` entry (not an EDM training snapshot?); its top level is {}",
            path.display(),
            describe(&tp, &root)
        )
    })?;
    let tensors = tp
        .state_dict(&ema)
        .with_context(|| format!("{}: the `ema` network", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: the `ema` network holds no tensors", path.display());
    }
    let others = tp
        .items(&root)
        .into_iter()
        .filter_map(|(k, v)| match k {
            Value::Str(s) if s.as_ref() != "ema" => Some((s.to_string(), describe(&tp, &v))),
            _ => None,
        })
        .collect();
    Ok(EdmSnapshot {
        init_kwargs: tp.init_kwargs(&ema),
        class_name: tp.class_name(&ema),
        tensors,
        others,
    })
}

/// A one-line description of a value (its class, or its JSON for plain data).
fn describe(tp: &TorchPickle, v: &Value) -> String {
    if let Some(c) = tp.class_name(v) {
        return format!("{c} object");
    }
    let json = pickle::to_json(&tp.pickle, v).to_string();
    if json.len() > 200 {
        format!("{}...", &json[..json.floor_char_boundary(200)])
    } else {
        json
    }
}

/// Reads a pickled network object (EDM/StyleGAN3 persistence or a plain pickled `nn.Module`,
/// e.g. NVIDIA's `inception-2015-12-05.pkl` detector): its state dict.
pub fn read_module_pickle(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = read_file(path)?;
    let tp = TorchPickle::embedded(&bytes).with_context(|| format!("{}", path.display()))?;
    let root = tp.root().clone();
    let tensors = tp.state_dict(&root).with_context(|| format!("{}", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: the pickled object holds no tensors (not a network?)", path.display());
    }
    Ok(tensors)
}

/// Reads a torch zip checkpoint (`torch.save` since 1.6): a state dict, or a dict holding one
/// under `state_dict` / `model` / `ema` / `net`; returns tensors by name.
pub fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a torch zip checkpoint", path.display()))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let pickle = pickle::load_all(&pkl).map_err(|e| anyhow!("{}: data.pkl: {e}", path.display()))?;
    let file_len = std::fs::metadata(path)?.len();
    let resolve = move |p: &Pickle, pid: &Value| -> Result<Rc<Storage>> {
        let (kind, key) = storage_pid(p, pid)?;
        let name = format!("{prefix}data/{key}");
        let entry = zip.by_name(&name).with_context(|| format!("missing storage {name}"))?;
        // The size the archive declares is checked against what the pickle says the storage
        // holds and, for stored (uncompressed) entries as torch writes them, against the file:
        // a forged header cannot make the reader allocate or inflate more.
        let declared = entry.size();
        let expected = storage_numel(p, pid).map(|n| n.saturating_mul(kind.elt_size_in_bytes() as u64));
        if expected.is_some_and(|e| e != declared) {
            bail!(
                "storage {name}: the archive declares {declared} bytes, the checkpoint {} bytes",
                expected.unwrap_or(0)
            );
        }
        if entry.compression() == zip::CompressionMethod::Stored && declared > file_len {
            bail!("storage {name}: {declared} bytes declared in a file of {file_len}");
        }
        let mut bytes = Vec::new();
        entry.take(declared).read_to_end(&mut bytes)?;
        if bytes.len() as u64 != declared {
            bail!("storage {name}: {} of {declared} bytes", bytes.len());
        }
        Ok(Rc::new(Storage { kind, bytes }))
    };
    let tp = TorchPickle {
        pickle,
        resolve: RefCell::new(Box::new(resolve)),
        storages: RefCell::new(HashMap::new()),
    };
    checkpoint_tensors(&tp, path)
}

/// The tensors of a checkpoint's state dict: the root, or a dict under `state_dict` / `model` /
/// `ema` / `net`.
fn checkpoint_tensors(tp: &TorchPickle, path: &Path) -> Result<HashMap<String, Tensor>> {
    let root = tp.root().clone();
    let dict = ["state_dict", "model", "ema", "net"]
        .iter()
        .find_map(|k| tp.get(&root, k).filter(|v| !tp.items(v).is_empty()))
        .unwrap_or(root);
    let mut out = HashMap::new();
    for (k, v) in tp.items(&dict) {
        if let Some(name) = key_text(&k)
            && let Some(t) = tp.tensor(&v).with_context(|| format!("{}: tensor {name}", path.display()))?
        {
            out.insert(name, t);
        }
    }
    if out.is_empty() {
        bail!("{}: no tensors found in the checkpoint", path.display());
    }
    Ok(out)
}

/// Reads a checkpoint of either `torch.save` format: zip (torch >= 1.6) or the legacy stream
/// (e.g. torchvision's `vgg16-397923af.pth`, the `lpips` package's heads).
pub fn read_torch_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))
        .and_then(|mut f| Ok(std::io::Read::read(&mut f, &mut magic)?))?;
    if n == 4 && magic == *b"PK\x03\x04" {
        read_torch_zip(path)
    } else {
        read_legacy_torch(path)
    }
}

/// A legacy `torch.save` stream: pickles of the magic number, the protocol (1001), system info,
/// the object (storages as persistent ids) and the storage keys, then per key an int64 element
/// count and the raw little-endian data.
pub fn read_legacy_torch(path: &Path) -> Result<HashMap<String, Tensor>> {
    crate::data::file::check_regular(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    legacy_torch_from_bytes(&bytes).with_context(|| format!("{}: not a torch checkpoint", path.display()))
}

pub fn legacy_torch_from_bytes(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let (object, keys, pos) = legacy_header(bytes)?;
    let kinds: HashMap<String, Kind> = object
        .nodes
        .iter()
        .filter_map(|n| match n {
            Node::Persistent(pid) => storage_pid(&object, pid).ok().map(|(kind, key)| (key, kind)),
            _ => None,
        })
        .collect();
    let storages: HashMap<String, Rc<Storage>> = legacy_storages(bytes, pos, keys, &kinds)?
        .into_iter()
        .map(|(k, v)| (k, Rc::new(v)))
        .collect();
    // Tensors sharing a storage share one copy of its bytes.
    let resolve = move |p: &Pickle, pid: &Value| -> Result<Rc<Storage>> {
        let (_, key) = storage_pid(p, pid)?;
        storages
            .get(&key)
            .cloned()
            .ok_or_else(|| anyhow!("storage `{key}` is not in the file"))
    };
    let tp = TorchPickle {
        pickle: object,
        resolve: RefCell::new(Box::new(resolve)),
        storages: RefCell::new(HashMap::new()),
    };
    checkpoint_tensors(&tp, Path::new("legacy torch file"))
}
