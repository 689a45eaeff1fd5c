//! Readers for PyTorch's pickle-based formats, in Rust: EDM's `.pkl` snapshots (a pickle whose
//! network objects are rebuilt by EDM's persistence helper, each tensor a small legacy
//! `torch.save` blob) and torch zip checkpoints (`data.pkl` + `data/<key>` storages).
//!
//! The unpickler implements the opcodes these files use (protocols 2-5) and builds a generic
//! value tree; nothing is executed: known globals are interpreted, others become inert objects.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use tch::{Kind, Tensor};

use super::NetworkConfig;
use super::import::Imported;

#[derive(Debug)]
pub struct Object {
    pub module: String,
    pub name: String,
    pub args: Vec<Value>,
    pub state: Option<Value>,
}

#[derive(Debug)]
pub struct TensorRef {
    pub storage: Value,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<Vec<u8>>),
    List(Rc<RefCell<Vec<Value>>>),
    Tuple(Rc<Vec<Value>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    Object(Rc<RefCell<Object>>),
    /// A storage's element type and raw little-endian bytes.
    Storage(Rc<(Kind, Vec<u8>)>),
    Tensor(Rc<TensorRef>),
    Mark,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// Looks `key` up in a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()),
            _ => None,
        }
    }
    fn items(&self) -> Vec<(Value, Value)> {
        match self {
            Value::Dict(d) => d.borrow().clone(),
            _ => Vec::new(),
        }
    }
    fn seq(&self) -> Vec<Value> {
        match self {
            Value::Tuple(t) => t.as_ref().clone(),
            Value::List(l) => l.borrow().clone(),
            _ => Vec::new(),
        }
    }
    /// Plain data (numbers, strings, lists, dicts) as JSON; other values as null.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::None => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) if f.is_finite() => (*f).into(),
            Value::Float(f) => (if *f > 0.0 {
                "inf"
            } else if *f < 0.0 {
                "-inf"
            } else {
                "nan"
            })
            .into(),
            Value::Str(s) => s.as_ref().into(),
            Value::List(_) | Value::Tuple(_) => self.seq().iter().map(Value::to_json).collect::<Vec<_>>().into(),
            Value::Dict(d) => serde_json::Value::Object(
                d.borrow()
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.to_json())))
                    .collect(),
            ),
            _ => serde_json::Value::Null,
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
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type `{other}`"),
    })
}

/// Resolves a persistent id (BINPERSID) into a value: the storage it names.
pub type PersistentLoad<'a> = dyn FnMut(&Value) -> Result<Value> + 'a;

pub struct Unpickler<'a, 'p> {
    data: &'a [u8],
    pub pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    persistent: &'p mut PersistentLoad<'p>,
}

impl<'a, 'p> Unpickler<'a, 'p> {
    pub fn new(data: &'a [u8], persistent: &'p mut PersistentLoad<'p>) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            persistent,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or_else(|| anyhow!("pickle truncated at byte {}", self.pos))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("unterminated line in pickle"))?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pickle stack underflow at byte {}", self.pos))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| anyhow!("pickle MARK not found"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&self) -> Result<Value> {
        self.stack.last().cloned().ok_or_else(|| anyhow!("pickle stack empty"))
    }

    /// Runs until STOP and returns the result.
    pub fn load(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let bytes = self.take(n)?;
                    self.stack.push(long_value(bytes));
                }
                b'I' => {
                    let l = self.line()?;
                    self.stack.push(match l.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().context("INT opcode")?),
                    });
                }
                b'L' => {
                    let l = self.line()?;
                    self.stack.push(Value::Int(l.trim_end_matches('L').parse().context("LONG opcode")?));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'F' => {
                    let l = self.line()?;
                    self.stack.push(Value::Float(l.trim().parse().context("FLOAT opcode")?));
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as usize,
                        b'X' => self.u32()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s.into()));
                }
                b'U' | b'T' => {
                    let n = if op == b'U' { self.u8()? as usize } else { self.u32()? as usize };
                    let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.stack.push(Value::Str(s.into()));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.u8()? as usize,
                        b'B' => self.u32()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(Rc::new(b)));
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' => self.stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = items
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).ok_or_else(|| anyhow!("pickle stack underflow"))?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        other => bail!("SETITEM on {other:?}"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Dict(d) => d
                            .borrow_mut()
                            .extend(items.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone()))),
                        other => bail!("SETITEMS on {other:?}"),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => bail!("APPEND on {other:?}"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => bail!("APPENDS on {other:?}"),
                    }
                }
                0x94 => {
                    let v = self.top()?;
                    let k = self.memo.len() as u32;
                    self.memo.insert(k, v);
                }
                b'q' | b'r' => {
                    let k = if op == b'q' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.top()?;
                    self.memo.insert(k, v);
                }
                b'p' => {
                    let k: u32 = self.line()?.trim().parse().context("PUT")?;
                    let v = self.top()?;
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&k).cloned().ok_or_else(|| anyhow!("pickle memo {k} missing"))?;
                    self.stack.push(v);
                }
                b'g' => {
                    let k: u32 = self.line()?.trim().parse().context("GET")?;
                    let v = self.memo.get(&k).cloned().ok_or_else(|| anyhow!("pickle memo {k} missing"))?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        bail!("STACK_GLOBAL needs two strings")
                    };
                    self.stack.push(Value::Global(Rc::new((m.to_string(), n.to_string()))));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args.seq())?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args.seq())?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args.seq())?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object(o) => o.borrow_mut().state = Some(state),
                        Value::Dict(d) => d.borrow_mut().extend(state.items()),
                        _ => {}
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = (self.persistent)(&pid)?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.stack.push(v);
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
            }
        }
    }

    /// REDUCE / NEWOBJ: interpret the globals these files use, keep the rest as objects.
    fn reduce(&mut self, func: Value, args: Vec<Value>) -> Result<Value> {
        let Value::Global(g) = &func else {
            return Ok(Value::Object(Rc::new(RefCell::new(Object {
                module: String::new(),
                name: "<call>".into(),
                args,
                state: None,
            }))));
        };
        let (module, name) = (g.0.as_str(), g.1.as_str());
        Ok(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let seq = |v: &Value| v.seq().iter().map(|x| x.as_int().unwrap_or(0)).collect::<Vec<_>>();
                let offset = args.get(1).and_then(Value::as_int).unwrap_or(0);
                Value::Tensor(Rc::new(TensorRef {
                    storage: args[0].clone(),
                    offset,
                    size: seq(&args[2]),
                    stride: seq(&args[3]),
                }))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                args.first().cloned().unwrap_or(Value::None)
            }
            ("torch.storage", "_load_from_bytes") => match args.first() {
                Some(Value::Bytes(b)) => load_legacy_storage(b)?,
                _ => bail!("_load_from_bytes without bytes"),
            },
            ("collections", "OrderedDict") => {
                let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                if let Some(items) = args.first() {
                    for pair in items.seq() {
                        let p = pair.seq();
                        if p.len() == 2
                            && let Value::Dict(dd) = &d
                        {
                            dd.borrow_mut().push((p[0].clone(), p[1].clone()));
                        }
                    }
                }
                d
            }
            ("numpy.core.multiarray", "scalar") | ("numpy._core.multiarray", "scalar") => match args.get(1) {
                Some(Value::Bytes(b)) if b.len() == 8 => Value::Float(f64::from_le_bytes(b[..].try_into().unwrap())),
                Some(Value::Bytes(b)) if b.len() == 4 => Value::Float(f32::from_le_bytes(b[..].try_into().unwrap()) as f64),
                _ => Value::None,
            },
            ("builtins", "set") | ("builtins", "frozenset") | ("__builtin__", "set") => {
                Value::List(Rc::new(RefCell::new(args.first().map(|a| a.seq()).unwrap_or_default())))
            }
            _ => Value::Object(Rc::new(RefCell::new(Object {
                module: module.to_string(),
                name: name.to_string(),
                args,
                state: None,
            }))),
        })
    }
}

/// Python's LONG1/LONG4 little-endian two's complement.
fn long_value(bytes: &[u8]) -> Value {
    if bytes.len() <= 8 {
        let mut buf = [0u8; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        if bytes.last().is_some_and(|b| b & 0x80 != 0) {
            for b in buf.iter_mut().skip(bytes.len()) {
                *b = 0xff;
            }
        }
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::Bytes(Rc::new(bytes.to_vec()))
    }
}

/// A pid ('storage', <type global>, key, location, numel, ...) -> (element kind, key).
fn storage_pid(pid: &Value) -> Result<(Kind, String)> {
    let t = pid.seq();
    if t.first().and_then(Value::as_str) != Some("storage") || t.len() < 3 {
        bail!("unexpected persistent id {pid:?}");
    }
    let kind = match &t[1] {
        Value::Global(g) => storage_kind(&g.1)?,
        other => bail!("storage type is not a class: {other:?}"),
    };
    let key = match &t[2] {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => bail!("storage key {other:?}"),
    };
    Ok((kind, key))
}

/// A legacy (pre-zip) `torch.save` stream of one storage, as EDM's pickles embed them.
pub fn load_legacy_storage(bytes: &[u8]) -> Result<Value> {
    let mut pending: Option<(Kind, String)> = None;
    let mut persistent = |pid: &Value| -> Result<Value> {
        pending = Some(storage_pid(pid)?);
        Ok(Value::None)
    };
    let mut u = Unpickler::new(bytes, &mut persistent);
    let magic = u.load()?;
    if !matches!(magic, Value::Bytes(_) | Value::Int(_)) {
        bail!("not a legacy torch storage (bad magic)");
    }
    let protocol = u.load()?;
    if protocol.as_int() != Some(1001) {
        bail!("legacy torch protocol {protocol:?}, expected 1001");
    }
    let _sys_info = u.load()?;
    let _obj = u.load()?;
    let keys = u.load()?;
    let mut pos = u.pos;
    drop(u);
    let (kind, key) = pending.ok_or_else(|| anyhow!("legacy storage blob names no storage"))?;
    let keys: Vec<String> = keys.seq().iter().filter_map(|k| k.as_str().map(str::to_string)).collect();
    let elem = kind.elt_size_in_bytes();
    for k in keys {
        let numel = u64::from_le_bytes(
            bytes
                .get(pos..pos + 8)
                .ok_or_else(|| anyhow!("storage size truncated"))?
                .try_into()
                .unwrap(),
        ) as usize;
        pos += 8;
        let data = bytes
            .get(pos..pos + numel * elem)
            .ok_or_else(|| anyhow!("storage data truncated: {numel} elements of {elem} bytes"))?;
        pos += numel * elem;
        if k == key {
            return Ok(Value::Storage(Rc::new((kind, data.to_vec()))));
        }
    }
    bail!("legacy storage blob lacks storage `{key}`")
}

/// A tensor value as a contiguous f32 (or its own integer kind) CPU tensor.
pub fn to_tensor(v: &Value) -> Result<Tensor> {
    let Value::Tensor(t) = v else { bail!("not a tensor: {v:?}") };
    let Value::Storage(s) = &t.storage else {
        bail!("tensor without a loaded storage")
    };
    let (kind, bytes) = (s.0, &s.1);
    let numel = bytes.len() / kind.elt_size_in_bytes();
    let flat = Tensor::from_data_size(bytes, &[numel as i64], kind);
    let view = flat.as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset).contiguous();
    Ok(if matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Double) {
        view.to_kind(Kind::Float)
    } else {
        view
    })
}

/// Walks an nn.Module (EDM persistent object or plain module) and collects its parameters and
/// buffers under PyTorch's dotted state-dict names.
fn collect_state(obj: &Value, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let Value::Object(o) = obj else { return Ok(()) };
    let o = o.borrow();
    // EDM's persistence: REDUCE(_reconstruct_persistent_obj, (meta,)) with meta['state'].
    let state = if o.name == "_reconstruct_persistent_obj" {
        o.args.first().and_then(|m| m.get("state")).unwrap_or(Value::None)
    } else {
        o.state.clone().unwrap_or(Value::None)
    };
    for key in ["_parameters", "_buffers"] {
        for (k, v) in state.get(key).map(|d| d.items()).unwrap_or_default() {
            if let (Some(name), Value::Tensor(_)) = (k.as_str(), &v) {
                out.insert(
                    format!("{prefix}{name}"),
                    to_tensor(&v).with_context(|| format!("tensor {prefix}{name}"))?,
                );
            }
        }
    }
    for (k, v) in state.get("_modules").map(|d| d.items()).unwrap_or_default() {
        if let Some(name) = k.as_str() {
            collect_state(&v, &format!("{prefix}{name}."), out)?;
        }
    }
    Ok(())
}

/// The constructor kwargs EDM's persistence recorded for a network object.
fn init_kwargs(obj: &Value) -> Option<serde_json::Value> {
    let Value::Object(o) = obj else { return None };
    let o = o.borrow();
    let state = o.args.first()?.get("state")?;
    Some(state.get("_init_kwargs")?.to_json())
}

/// Reads EDM's `.pkl` snapshot: the `ema` network's weights and config.
pub fn read_edm_pickle(path: &Path) -> Result<Imported> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut no_persistent = |pid: &Value| -> Result<Value> { bail!("unexpected persistent id {pid:?} in an EDM pickle") };
    let top = Unpickler::new(&bytes, &mut no_persistent)
        .load()
        .with_context(|| format!("{}: not a readable pickle", path.display()))?;
    let ema = top
        .get("ema")
        .ok_or_else(|| anyhow!("{}: the pickle has no `ema` entry (not an EDM snapshot?)", path.display()))?;
    let mut tensors = HashMap::new();
    collect_state(&ema, "", &mut tensors).with_context(|| format!("{}", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: the `ema` network holds no tensors", path.display());
    }
    let config = match init_kwargs(&ema) {
        Some(kw) => Some(NetworkConfig::from_edm_kwargs(&kw).with_context(|| format!("{}: network config {kw}", path.display()))?),
        None => None,
    };
    Ok(Imported { tensors, config })
}

/// Reads a pickled network object (EDM/StyleGAN3 persistence or plain `torch.nn.Module`
/// pickles, e.g. NVIDIA's `inception-2015-12-05.pkl` feature detector): its state dict by the
/// module path names PyTorch would give (`layers.mixed_6.conv.weight`).
pub fn read_module_pickle(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut no_persistent = |pid: &Value| -> Result<Value> { bail!("unexpected persistent id {pid:?} in a module pickle") };
    let top = Unpickler::new(&bytes, &mut no_persistent)
        .load()
        .with_context(|| format!("{}: not a readable pickle", path.display()))?;
    let mut tensors = HashMap::new();
    collect_state(&top, "", &mut tensors).with_context(|| format!("{}", path.display()))?;
    if tensors.is_empty() {
        bail!("{}: the pickled object holds no tensors (not a network?)", path.display());
    }
    Ok(tensors)
}

/// Reads a torch zip checkpoint (`torch.save` since 1.6): a state dict, or a dict holding one
/// under `state_dict` / `model` / `ema`; returns tensors by name.
pub fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a torch zip checkpoint", path.display()))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().and_then(|f| f.name().ok().map(|n| n.to_string())))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let zip = RefCell::new(zip);
    let mut persistent = |pid: &Value| -> Result<Value> {
        let (kind, key) = storage_pid(pid)?;
        let mut data = Vec::new();
        let name = format!("{prefix}data/{key}");
        zip.borrow_mut()
            .by_name(&name)
            .with_context(|| format!("missing storage {name}"))?
            .read_to_end(&mut data)?;
        Ok(Value::Storage(Rc::new((kind, data))))
    };
    let top = Unpickler::new(&pkl, &mut persistent)
        .load()
        .with_context(|| format!("{}: data.pkl", path.display()))?;
    let dict = ["state_dict", "model", "ema", "net"]
        .iter()
        .find_map(|k| top.get(k).filter(|v| matches!(v, Value::Dict(_))))
        .unwrap_or(top);
    let mut out = HashMap::new();
    for (k, v) in dict.items() {
        if let (Some(name), Value::Tensor(_)) = (k.as_str(), &v) {
            out.insert(
                name.to_string(),
                to_tensor(&v).with_context(|| format!("{}: tensor {name}", path.display()))?,
            );
        }
    }
    if out.is_empty() {
        bail!("{}: no tensors found in the checkpoint", path.display());
    }
    Ok(out)
}
