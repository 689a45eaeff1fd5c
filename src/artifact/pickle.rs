//! A Python pickle reader (protocols 0-5) that never executes anything.
//!
//! The pickle is run on a stack machine as Python's `pickle.Unpickler` would, except that a
//! call the stream asks for (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ) is only recorded: the result
//! is a [`Node::Call`] holding the callable's name, its arguments and whatever BUILD, SETITEMS
//! or APPENDS later add to it. The few calls that merely build plain data (`set`, `frozenset`,
//! `bytearray`, `collections.OrderedDict`, `_codecs.encode` of protocol-2 bytes,
//! `copyreg._reconstructor`) are turned into that data. Everything else is interpreted by the
//! caller (see `torch_pickle`).
//!
//! Containers live in an arena and values refer to them by index, so shared and cyclic
//! structures (which pickles may hold through the memo) cost nothing to drop, and no
//! recursive walk is needed while loading. Malformed input of any kind is an error, never a
//! panic: every length is checked against the bytes that are left.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Index of a container in [`Pickle::nodes`].
pub type NodeId = usize;

/// A value on the stack or inside a container.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside i64, in decimal.
    BigInt(Rc<str>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// A container, global or call in the arena.
    Ref(NodeId),
}

/// Which opcode asked for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// REDUCE: `callable(*args)`.
    Reduce,
    /// NEWOBJ / NEWOBJ_EX / OBJ / INST / `copyreg._reconstructor`: `cls.__new__(cls, *args)`.
    New,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    ByteArray(Vec<u8>),
    /// A module attribute named by GLOBAL / STACK_GLOBAL / INST.
    Global {
        module: String,
        name: String,
    },
    /// A call the pickle asked for, not made.
    Call {
        callable: Value,
        kind: CallKind,
        args: Vec<Value>,
        kwargs: Vec<(Value, Value)>,
        /// BUILD's argument (an object's `__dict__`, or `(dict, slots)`).
        state: Option<Value>,
        /// Items SETITEM(S) added (dict subclasses).
        dict_items: Vec<(Value, Value)>,
        /// Items APPEND(S) added (list subclasses).
        list_items: Vec<Value>,
    },
    /// A persistent id (PERSID / BINPERSID), resolved by the caller.
    Persistent(Value),
}

/// Why a pickle could not be read. `at` is the byte offset of the opcode.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    pub at: usize,
    pub message: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.at)
    }
}

impl std::error::Error for PickleError {}

type Res<T> = std::result::Result<T, PickleError>;

/// A loaded pickle: the arena and the value STOP returned.
#[derive(Debug, Default)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Option<Value>,
}

/// Reads one pickle from the start of `data`; returns it and the offset just past its STOP
/// (legacy `torch.save` streams are several pickles back to back).
pub fn load(data: &[u8]) -> Res<(Pickle, usize)> {
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        pickle: Pickle::default(),
    };
    let root = m.run()?;
    m.pickle.root = Some(root);
    Ok((m.pickle, m.pos))
}

/// Reads a pickle that must fill `data` (trailing bytes are an error).
pub fn load_all(data: &[u8]) -> Res<Pickle> {
    let (p, end) = load(data)?;
    if end != data.len() {
        return Err(PickleError {
            at: end,
            message: format!("{} bytes after the pickle's STOP", data.len() - end),
        });
    }
    Ok(p)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    pickle: Pickle,
}

impl Pickle {
    pub fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Ref(id) => self.nodes.get(*id),
            _ => None,
        }
    }
}

impl<'a> Machine<'a> {
    fn err<T>(&self, message: impl Into<String>) -> Res<T> {
        Err(PickleError {
            at: self.op_at,
            message: message.into(),
        })
    }
    fn take(&mut self, n: u64) -> Res<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.err(format!("pickle truncated: needs {n} more bytes, {left} left"));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn fixed<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }
    fn u8(&mut self) -> Res<u8> {
        Ok(self.fixed::<1>()?[0])
    }
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }
    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }
    /// A text argument of protocol 0 (up to the newline, which is consumed).
    fn line(&mut self) -> Res<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("pickle truncated: unterminated text argument");
        };
        self.pos += end + 1;
        Ok(&rest[..end])
    }
    fn line_str(&mut self) -> Res<String> {
        let l = self.line()?;
        match std::str::from_utf8(l) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("text argument is not UTF-8"),
        }
    }
    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }
    fn alloc(&mut self, n: Node) -> Value {
        self.pickle.nodes.push(n);
        Value::Ref(self.pickle.nodes.len() - 1)
    }
    fn pop(&mut self) -> Res<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("stack underflow: pop reaches past a MARK");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }
    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(m))
    }
    fn top(&self) -> Res<Value> {
        match self.stack.last() {
            Some(v) if self.marks.last().is_none_or(|&m| m < self.stack.len()) => Ok(v.clone()),
            _ => self.err("stack empty"),
        }
    }
    fn memo_get(&mut self, k: u64) -> Res<()> {
        match self.memo.get(&k) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {k} is missing")),
        }
    }
    fn memo_put(&mut self, k: u64) -> Res<()> {
        let v = self.top()?;
        self.memo.insert(k, v);
        Ok(())
    }

    fn run(&mut self) -> Res<Value> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                let v = self.pop()?;
                if !self.stack.is_empty() || !self.marks.is_empty() {
                    return self.err("STOP with values left on the stack");
                }
                return Ok(v);
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Res<()> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return self.err(format!("pickle protocol {p} is newer than 5"));
                }
            }
            // FRAME: a length prefix for buffered reading; the opcodes inside run as usual.
            0x95 => {
                let n = self.u64()?;
                if n > (self.data.len() - self.pos) as u64 {
                    return self.err(format!("pickle truncated: frame of {n} bytes"));
                }
            }
            b'(' => self.marks.push(self.stack.len()),
            // POP discards the top item, which may be a MARK (protocol 0's recursive tuples).
            b'0' => {
                if self.marks.last() == Some(&self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'I' | b'L' | b'F' | b'G' | b'J' | b'K' | b'M' | 0x8a | 0x8b => self.number(op)?,
            b'S' | b'T' | b'U' | b'V' | b'X' | 0x8c | 0x8d => self.string(op)?,
            b'B' | b'C' | 0x8e | 0x96 => self.bytes(op)?,
            0x97 | 0x98 => {
                return self.err(
                    "the pickle refers to out-of-band buffers (protocol 5 NEXT_BUFFER / READONLY_BUFFER), \
                     which are not in the file: save it again without a buffer_callback",
                );
            }
            0x82..=0x84 => {
                let code = match op {
                    0x82 => self.u8()? as u32,
                    0x83 => u16::from_le_bytes(self.fixed()?) as u32,
                    _ => self.u32()?,
                };
                return self.err(format!(
                    "the pickle uses extension code {code} (copyreg.add_extension), which only the \
                     writing process could resolve"
                ));
            }
            b']' | b')' | b'}' | 0x8f | b'l' | b't' | b'd' | 0x85..=0x87 | 0x91 => self.container(op)?,
            b'a' | b'e' | b's' | b'u' | 0x90 => self.add_items(op)?,
            b'p' | b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'p' => self.decimal_line()?,
                    b'q' => self.u8()? as u64,
                    b'r' => self.u32()? as u64,
                    _ => self.memo.len() as u64,
                };
                self.memo_put(k)?;
            }
            b'g' | b'h' | b'j' => {
                let k = match op {
                    b'g' => self.decimal_line()?,
                    b'h' => self.u8()? as u64,
                    _ => self.u32()? as u64,
                };
                self.memo_get(k)?;
            }
            b'c' | 0x93 | b'i' | b'o' | b'R' | 0x81 | 0x92 | b'b' => self.object(op)?,
            b'P' => {
                let pid = self.line()?;
                let pid = Value::Str(String::from_utf8_lossy(pid).into());
                let v = self.alloc(Node::Persistent(pid));
                self.push(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.alloc(Node::Persistent(pid));
                self.push(v);
            }
            other => return self.err(format!("unknown pickle opcode 0x{other:02x}")),
        }
        Ok(())
    }

    fn decimal_line(&mut self) -> Res<u64> {
        let l = self.line_str()?;
        match l.trim().parse() {
            Ok(k) => Ok(k),
            Err(_) => self.err(format!("memo key `{l}` is not a number")),
        }
    }

    fn number(&mut self, op: u8) -> Res<()> {
        let v = match op {
            b'I' => {
                let l = self.line_str()?;
                match l.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => self.decimal(s.trim())?,
                }
            }
            b'L' => {
                let l = self.line_str()?;
                self.decimal(l.trim().trim_end_matches('L'))?
            }
            b'F' => {
                let l = self.line_str()?;
                match parse_py_float(l.trim()) {
                    Some(f) => Value::Float(f),
                    None => return self.err(format!("FLOAT `{l}` is not a number")),
                }
            }
            b'G' => Value::Float(f64::from_be_bytes(self.fixed()?)),
            b'J' => Value::Int(i32::from_le_bytes(self.fixed()?) as i64),
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => Value::Int(u16::from_le_bytes(self.fixed()?) as i64),
            _ => {
                let n = if op == 0x8a { self.u8()? as u64 } else { self.u32()? as u64 };
                let le = self.take(n)?;
                long_from_le(le)
            }
        };
        self.push(v);
        Ok(())
    }

    fn decimal(&self, s: &str) -> Res<Value> {
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Value::Int(i));
        }
        let digits = s.strip_prefix('-').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return self.err(format!("`{s}` is not an integer"));
        }
        Ok(Value::BigInt(s.into()))
    }

    fn string(&mut self, op: u8) -> Res<()> {
        let v = match op {
            // Protocol 0-1 byte strings (Python 2 `str`): quoted repr / length-prefixed bytes.
            b'S' => {
                let l = self.line()?;
                match unquote_py2_string(l) {
                    Some(b) => Value::Bytes(b.into()),
                    None => return self.err("malformed STRING argument"),
                }
            }
            b'T' | b'U' => {
                let n = if op == b'U' { self.u8()? as u64 } else { self.u32()? as u64 };
                Value::Bytes(self.take(n)?.into())
            }
            b'V' => {
                let l = self.line()?;
                Value::Str(unescape_raw_unicode(l).into())
            }
            _ => {
                let n = match op {
                    0x8c => self.u8()? as u64,
                    b'X' => self.u32()? as u64,
                    _ => self.u64()?,
                };
                let b = self.take(n)?;
                match std::str::from_utf8(b) {
                    Ok(s) => Value::Str(s.into()),
                    Err(_) => return self.err("string is not valid UTF-8"),
                }
            }
        };
        self.push(v);
        Ok(())
    }

    fn bytes(&mut self, op: u8) -> Res<()> {
        let n = match op {
            b'C' => self.u8()? as u64,
            b'B' => self.u32()? as u64,
            _ => self.u64()?,
        };
        let b = self.take(n)?;
        let v = if op == 0x96 {
            self.alloc(Node::ByteArray(b.to_vec()))
        } else {
            Value::Bytes(b.into())
        };
        self.push(v);
        Ok(())
    }

    fn container(&mut self, op: u8) -> Res<()> {
        let node = match op {
            b']' => Node::List(Vec::new()),
            b')' => Node::Tuple(Vec::new()),
            b'}' => Node::Dict(Vec::new()),
            0x8f => Node::Set(Vec::new()),
            b'l' => Node::List(self.pop_mark()?),
            b't' => Node::Tuple(self.pop_mark()?),
            0x91 => Node::FrozenSet(self.pop_mark()?),
            b'd' => {
                let items = self.pop_mark()?;
                Node::Dict(self.pairs(items)?)
            }
            _ => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                Node::Tuple(items)
            }
        };
        let v = self.alloc(node);
        self.push(v);
        Ok(())
    }

    fn pairs(&self, items: Vec<Value>) -> Res<Vec<(Value, Value)>> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for a dict");
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    /// APPEND(S), SETITEM(S), ADDITEMS on the container below the new items.
    fn add_items(&mut self, op: u8) -> Res<()> {
        let items = match op {
            b'a' => vec![self.pop()?],
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                vec![k, v]
            }
            _ => self.pop_mark()?,
        };
        let is_dict_op = matches!(op, b's' | b'u');
        let pairs = if is_dict_op { self.pairs(items.clone())? } else { Vec::new() };
        let target = self.top()?;
        let Value::Ref(id) = target else {
            return self.err(format!("cannot add items to {target:?}"));
        };
        match (&mut self.pickle.nodes[id], op) {
            (Node::List(l), b'a' | b'e') => l.extend(items),
            (Node::Dict(d), b's' | b'u') => d.extend(pairs),
            (Node::Set(s), 0x90) => s.extend(items),
            (Node::Call { list_items, .. }, b'a' | b'e') => list_items.extend(items),
            (Node::Call { dict_items, .. }, b's' | b'u') => dict_items.extend(pairs),
            (other, _) => {
                let what = node_kind(other);
                return self.err(format!("opcode 0x{op:02x} cannot add items to a {what}"));
            }
        }
        Ok(())
    }

    fn object(&mut self, op: u8) -> Res<()> {
        match op {
            b'c' => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let v = self.alloc(Node::Global { module, name });
                self.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                    return self.err("STACK_GLOBAL needs a module and a name string");
                };
                let v = self.alloc(Node::Global {
                    module: m.to_string(),
                    name: n.to_string(),
                });
                self.push(v);
            }
            b'i' => {
                let module = self.line_str()?;
                let name = self.line_str()?;
                let args = self.pop_mark()?;
                let cls = self.alloc(Node::Global { module, name });
                self.call(cls, CallKind::New, args, Vec::new())?;
            }
            b'o' => {
                let mut args = self.pop_mark()?;
                if args.is_empty() {
                    return self.err("OBJ without a class");
                }
                let cls = args.remove(0);
                self.call(cls, CallKind::New, args, Vec::new())?;
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let args = self.tuple_items(&args)?;
                let kind = if op == b'R' { CallKind::Reduce } else { CallKind::New };
                self.call(callable, kind, args, Vec::new())?;
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let args = self.tuple_items(&args)?;
                let kwargs = match self.pickle.node(&kwargs) {
                    Some(Node::Dict(d)) => d.clone(),
                    _ => return self.err("NEWOBJ_EX keyword arguments are not a dict"),
                };
                self.call(cls, CallKind::New, args, kwargs)?;
            }
            _ => {
                let state = self.pop()?;
                let target = self.top()?;
                let Value::Ref(id) = target else {
                    return self.err(format!("BUILD on {target:?}"));
                };
                match &mut self.pickle.nodes[id] {
                    Node::Call { state: s, .. } => *s = Some(state),
                    // An OrderedDict's or set's instance attributes (e.g. a state dict's
                    // `_metadata`): not items, so not kept.
                    Node::Dict(_) | Node::Set(_) | Node::List(_) => {}
                    other => {
                        let what = node_kind(other);
                        return self.err(format!("BUILD on a {what}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn tuple_items(&self, v: &Value) -> Res<Vec<Value>> {
        match self.pickle.node(v) {
            Some(Node::Tuple(t)) => Ok(t.clone()),
            _ => self.err(format!("call arguments are not a tuple: {v:?}")),
        }
    }

    /// Records a call, or builds the plain data the few data-only callables stand for.
    fn call(&mut self, callable: Value, kind: CallKind, args: Vec<Value>, kwargs: Vec<(Value, Value)>) -> Res<()> {
        let name = match self.pickle.node(&callable) {
            Some(Node::Global { module, name }) => Some((module.as_str(), name.as_str())),
            _ => None,
        };
        let data = match name {
            Some(("builtins" | "__builtin__", "set")) => Some(Node::Set(self.iterable(args.first())?)),
            Some(("builtins" | "__builtin__", "frozenset")) => Some(Node::FrozenSet(self.iterable(args.first())?)),
            Some(("builtins" | "__builtin__", "bytearray")) => Some(Node::ByteArray(self.bytearray_arg(&args)?)),
            Some(("collections", "OrderedDict")) if kind == CallKind::Reduce => {
                let items = self.iterable(args.first())?;
                let mut pairs = Vec::new();
                for item in items {
                    match self.pickle.node(&item) {
                        Some(Node::Tuple(p) | Node::List(p)) if p.len() == 2 => pairs.push((p[0].clone(), p[1].clone())),
                        _ => return self.err("OrderedDict item is not a pair"),
                    }
                }
                Some(Node::Dict(pairs))
            }
            // Protocol 0-2 `b""`.
            Some(("builtins" | "__builtin__", "bytes")) if args.is_empty() => {
                self.push(Value::Bytes(Vec::new().into()));
                return Ok(());
            }
            Some(("_codecs", "encode")) => {
                // Protocol 0-2 `bytes`: _codecs.encode(text, 'latin1').
                let (Some(Value::Str(s)), Some(Value::Str(enc))) = (args.first(), args.get(1)) else {
                    return self.err("_codecs.encode needs text and an encoding");
                };
                if enc.as_ref() != "latin1" && enc.as_ref() != "latin-1" {
                    return self.err(format!("_codecs.encode with encoding `{enc}`"));
                }
                let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                let Some(bytes) = bytes else {
                    return self.err("latin-1 text with a character above U+00FF");
                };
                self.push(Value::Bytes(bytes.into()));
                return Ok(());
            }
            Some(("copyreg" | "copy_reg", "_reconstructor")) => {
                // Protocol 0-1 objects: _reconstructor(cls, base, state) = base.__new__(cls).
                // A dict or list subclass passes its items as `state`.
                let cls = args.first().cloned().unwrap_or(Value::None);
                let (dict_items, list_items) = match args.get(2).and_then(|s| self.pickle.node(s)) {
                    Some(Node::Dict(d)) => (d.clone(), Vec::new()),
                    Some(Node::List(l)) => (Vec::new(), l.clone()),
                    _ => (Vec::new(), Vec::new()),
                };
                let v = self.alloc(Node::Call {
                    callable: cls,
                    kind: CallKind::New,
                    args: Vec::new(),
                    kwargs: Vec::new(),
                    state: None,
                    dict_items,
                    list_items,
                });
                self.push(v);
                return Ok(());
            }
            _ => None,
        };
        let node = data.unwrap_or(Node::Call {
            callable,
            kind,
            args,
            kwargs,
            state: None,
            dict_items: Vec::new(),
            list_items: Vec::new(),
        });
        let v = self.alloc(node);
        self.push(v);
        Ok(())
    }

    fn iterable(&self, v: Option<&Value>) -> Res<Vec<Value>> {
        match v.and_then(|v| self.pickle.node(v)) {
            None => Ok(Vec::new()),
            Some(Node::List(l) | Node::Tuple(l) | Node::Set(l) | Node::FrozenSet(l)) => Ok(l.clone()),
            Some(other) => self.err(format!("expected a sequence, found a {}", node_kind(other))),
        }
    }

    fn bytearray_arg(&self, args: &[Value]) -> Res<Vec<u8>> {
        match args.first() {
            None => Ok(Vec::new()),
            Some(Value::Bytes(b)) => Ok(b.to_vec()),
            // Protocol 0-2: bytearray(text, 'latin-1').
            Some(Value::Str(s)) => match s.chars().map(|c| u8::try_from(c as u32).ok()).collect() {
                Some(b) => Ok(b),
                None => self.err("bytearray text with a character above U+00FF"),
            },
            Some(other) => self.err(format!("bytearray of {other:?}")),
        }
    }
}

/// A node's kind, for messages.
pub fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::List(_) => "list",
        Node::Tuple(_) => "tuple",
        Node::Dict(_) => "dict",
        Node::Set(_) => "set",
        Node::FrozenSet(_) => "frozenset",
        Node::ByteArray(_) => "bytearray",
        Node::Global { .. } => "global",
        Node::Call { .. } => "object",
        Node::Persistent(_) => "persistent id",
    }
}

/// LONG1/LONG4: little-endian two's complement of any length.
fn long_from_le(le: &[u8]) -> Value {
    if le.is_empty() {
        return Value::Int(0);
    }
    let negative = le[le.len() - 1] & 0x80 != 0;
    if le.len() <= 8 {
        let fill = if negative { 0xff } else { 0 };
        let mut buf = [fill; 8];
        buf[..le.len()].copy_from_slice(le);
        return Value::Int(i64::from_le_bytes(buf));
    }
    // Magnitude in base 2^8, little-endian; negate two's complement for negative numbers.
    let mut mag: Vec<u8> = le.to_vec();
    if negative {
        let mut carry = 1u16;
        for b in mag.iter_mut() {
            let s = (!*b) as u16 + carry;
            *b = s as u8;
            carry = s >> 8;
        }
    }
    let mut digits = Vec::new();
    while mag.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in mag.iter_mut().rev() {
            let cur = (rem << 8) | *b as u32;
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
    }
    if negative {
        digits.push(b'-');
    }
    digits.reverse();
    let text = String::from_utf8_lossy(&digits);
    match text.parse::<i64>() {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(text.as_ref().into()),
    }
}

/// Python's float repr, including `inf`, `-inf` and `nan`.
fn parse_py_float(s: &str) -> Option<f64> {
    match s {
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        "nan" | "-nan" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// A Python 2 `repr()` of a byte string: quoted, with backslash escapes.
fn unquote_py2_string(l: &[u8]) -> Option<Vec<u8>> {
    let q = *l.first()?;
    if !(q == b'\'' || q == b'"') || l.len() < 2 || *l.last()? != q {
        return None;
    }
    let body = &l[1..l.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i)?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'\\' | b'\'' | b'"' => out.push(e),
            b'x' => {
                let hex = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut n = (e - b'0') as u32;
                for _ in 0..2 {
                    match body.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            n = n * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(n).ok()?);
            }
            _ => {
                out.push(b'\\');
                out.push(e);
            }
        }
    }
    Some(out)
}

/// UNICODE's argument: raw-unicode-escape (`\uXXXX`, `\UXXXXXXXX`; other bytes are Latin-1).
fn unescape_raw_unicode(l: &[u8]) -> String {
    let mut out = String::with_capacity(l.len());
    let mut i = 0;
    while i < l.len() {
        if l[i] == b'\\' && i + 1 < l.len() && (l[i + 1] == b'u' || l[i + 1] == b'U') {
            let n = if l[i + 1] == b'u' { 4 } else { 8 };
            let ch = l
                .get(i + 2..i + 2 + n)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32);
            if let Some(c) = ch {
                out.push(c);
                i += 2 + n;
                continue;
            }
        }
        out.push(l[i] as char);
        i += 1;
    }
    out
}

/// Plain data as JSON, for messages, configs and tests: containers by content (sets and tuples
/// as arrays, dict keys as strings), objects as `{"__call__": "module.name", "args": [...],
/// "state": ...}`. Depth is capped (pickles may be cyclic).
pub fn to_json(p: &Pickle, v: &Value) -> serde_json::Value {
    json_at(p, v, 0)
}

const JSON_DEPTH: usize = 64;

fn json_at(p: &Pickle, v: &Value, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if depth > JSON_DEPTH {
        return J::String("<too deep>".into());
    }
    let rec = |x: &Value| json_at(p, x, depth + 1);
    match v {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => (*i).into(),
        Value::BigInt(s) => J::String(s.to_string()),
        Value::Float(f) if f.is_finite() => (*f).into(),
        Value::Float(f) => J::String(
            if f.is_nan() {
                "nan"
            } else if *f > 0.0 {
                "inf"
            } else {
                "-inf"
            }
            .into(),
        ),
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => serde_json::json!({ "__bytes__": hex::encode(b) }),
        Value::Ref(_) => match p.node(v) {
            None => J::Null,
            Some(Node::List(l) | Node::Tuple(l) | Node::Set(l) | Node::FrozenSet(l)) => J::Array(l.iter().map(rec).collect()),
            Some(Node::Dict(d)) => J::Object(d.iter().map(|(k, v)| (key_string(p, k), rec(v))).collect()),
            Some(Node::ByteArray(b)) => serde_json::json!({ "__bytearray__": hex::encode(b) }),
            Some(Node::Global { module, name }) => serde_json::json!({ "__global__": format!("{module}.{name}") }),
            Some(Node::Persistent(pid)) => serde_json::json!({ "__persistent__": rec(pid) }),
            Some(Node::Call {
                callable,
                args,
                kwargs,
                state,
                dict_items,
                list_items,
                ..
            }) => {
                let mut o = serde_json::Map::new();
                o.insert("__call__".into(), global_name(p, callable).map(J::String).unwrap_or(J::Null));
                o.insert("args".into(), J::Array(args.iter().map(rec).collect()));
                if !kwargs.is_empty() {
                    o.insert(
                        "kwargs".into(),
                        J::Object(kwargs.iter().map(|(k, v)| (key_string(p, k), rec(v))).collect()),
                    );
                }
                if let Some(s) = state {
                    o.insert("state".into(), rec(s));
                }
                if !dict_items.is_empty() {
                    o.insert(
                        "items".into(),
                        J::Object(dict_items.iter().map(|(k, v)| (key_string(p, k), rec(v))).collect()),
                    );
                }
                if !list_items.is_empty() {
                    o.insert("list".into(), J::Array(list_items.iter().map(rec).collect()));
                }
                J::Object(o)
            }
        },
    }
}

fn key_string(p: &Pickle, k: &Value) -> String {
    match k {
        Value::Str(s) => s.to_string(),
        other => json_at(p, other, JSON_DEPTH).to_string(),
    }
}

/// `module.name` of a global.
pub fn global_name(p: &Pickle, v: &Value) -> Option<String> {
    match p.node(v) {
        Some(Node::Global { module, name }) => Some(format!("{module}.{name}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> serde_json::Value {
        let p = load_all(bytes).unwrap();
        to_json(&p, p.root.as_ref().unwrap())
    }

    #[test]
    fn long_integers_of_any_length() {
        assert_eq!(long_from_le(&[]), Value::Int(0));
        assert_eq!(long_from_le(&[0xff]), Value::Int(-1));
        assert_eq!(long_from_le(&[0x00, 0x80]), Value::Int(-32768));
        // 2**64 and -(2**64).
        assert_eq!(
            long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Value::BigInt("18446744073709551616".into())
        );
        assert_eq!(
            long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            Value::BigInt("-18446744073709551616".into())
        );
    }

    #[test]
    fn protocol_zero_text_forms() {
        // [1, 'a\u00e9', 2.5, True, b'x\n'] as protocol 0 writes it (with a PUT/GET pair).
        let p0 = b"(lp0\nI1\naVa\\u00e9\np1\naF2.5\naI01\nag1\na.";
        assert_eq!(json(p0), serde_json::json!([1, "a\u{e9}", 2.5, true, "a\u{e9}"]));
        assert_eq!(unquote_py2_string(b"'x\\n\\x00\\''"), Some(b"x\n\0'".to_vec()));
    }

    /// Opcodes CPython 3's pickler never writes (Python 2 forms, INST/OBJ, DUP) or writes only
    /// for objects over 4 GiB; the CPython fixtures of tests/pickle_reader.rs cover the rest.
    #[test]
    fn opcodes_cpython_does_not_write() {
        // Python 2 byte strings: STRING (quoted), BINSTRING, SHORT_BINSTRING.
        assert_eq!(
            json(b"(S'a\\x41\\n'\nT\x02\x00\x00\x00bcU\x01dl."),
            serde_json::json!([{"__bytes__": "61410a"}, {"__bytes__": "6263"}, {"__bytes__": "64"}])
        );
        // BINUNICODE8 and BINBYTES8 (8-byte lengths), DUP.
        let mut p = b"\x80\x04(\x8d\x02\x00\x00\x00\x00\x00\x00\x00hi\x8e\x01\x00\x00\x00\x00\x00\x00\x00\xffK\x052l.".to_vec();
        assert_eq!(json(&p), serde_json::json!(["hi", {"__bytes__": "ff"}, 5, 5]));
        p.truncate(12);
        assert!(load_all(&p).unwrap_err().message.contains("truncated"));
        // INST (module and class inline, arguments after a MARK) and OBJ (class first), then BUILD.
        assert_eq!(
            json(b"(K\x01imod\nCls\n}(X\x01\x00\x00\x00aK\x02ub."),
            serde_json::json!({"__call__": "mod.Cls", "args": [1], "state": {"a": 2}})
        );
        assert_eq!(
            json(b"(cmod\nCls\nK\x03o."),
            serde_json::json!({"__call__": "mod.Cls", "args": [3]})
        );
        // EXT2 / EXT4 are refused like EXT1.
        assert!(
            load_all(b"\x80\x02\x83\x01\x02.")
                .unwrap_err()
                .message
                .contains("extension code 513")
        );
        assert!(
            load_all(b"\x80\x02\x84\x01\x00\x00\x01.")
                .unwrap_err()
                .message
                .contains("extension code 16777217")
        );
        // READONLY_BUFFER on its own (only ever written after NEXT_BUFFER).
        assert!(load_all(b"\x80\x05C\x01a\x98.").unwrap_err().message.contains("out-of-band"));
    }

    #[test]
    fn refusals_are_clear_errors() {
        let e = load_all(b"\x80\x05\x97.").unwrap_err();
        assert!(e.message.contains("out-of-band"), "{e}");
        let e = load_all(b"\x80\x02\x82\x07.").unwrap_err();
        assert!(e.message.contains("extension code 7"), "{e}");
        let e = load_all(b"\x80\x06N.").unwrap_err();
        assert!(e.message.contains("protocol 6"), "{e}");
        let e = load_all(b"(N0.").unwrap_err();
        assert!(e.message.contains("MARK"), "{e}");
    }

    #[test]
    fn cycles_through_the_memo_load_and_print() {
        // l = []; l.append(l) at protocol 2.
        let p = load_all(b"\x80\x02]q\x00h\x00a.").unwrap();
        let root = p.root.clone().unwrap();
        assert_eq!(p.node(&root), Some(&Node::List(vec![root.clone()])));
        assert!(to_json(&p, &root).to_string().contains("too deep"));
    }
}
