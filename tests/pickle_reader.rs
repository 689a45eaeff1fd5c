//! The pickle reader against pickles CPython's own pickler wrote (tests/fixtures/pickle, made
//! by make_cpython_fixtures.py there), and fuzzed: truncations, flipped bytes and random bytes
//! must give errors, never panics.

use std::path::PathBuf;

use dmdpipe::artifact::pickle::{self, load_all};
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickle").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn expected(protocol: u8) -> serde_json::Value {
    serde_json::from_slice(&read(&format!("cpython_p{protocol}.json"))).unwrap()
}

/// The first path at which two JSON values differ, for a readable failure.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let (Some(u), Some(v)) = (x.get(k), y.get(k)) else {
                    return Some(format!("{path}.{k}: present on one side only"));
                };
                if let Some(d) = first_difference(u, v, &format!("{path}.{k}")) {
                    return Some(d);
                }
            }
            None
        }
        (J::Array(x), J::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} != {b}")),
    }
}

#[test]
fn every_protocol_cpython_writes_reads_back_to_the_same_value() {
    for protocol in 0..=5u8 {
        let data = read(&format!("cpython_p{protocol}.pkl"));
        let p = load_all(&data).unwrap_or_else(|e| panic!("protocol {protocol}: {e}"));
        let got = pickle::to_json(&p, p.root.as_ref().unwrap());
        let want = &expected(protocol)["value"];
        if let Some(d) = first_difference(&got, want, "value") {
            panic!("protocol {protocol}: {d}");
        }
    }
}

#[test]
fn the_fixtures_exercise_every_opcode_cpython_writes() {
    let mut used = std::collections::BTreeSet::new();
    for protocol in 0..=5u8 {
        for op in expected(protocol)["opcodes"].as_array().unwrap() {
            used.insert(op.as_str().unwrap().to_string());
        }
    }
    // Every opcode of pickletools.opcodes (protocols 0-5) except those CPython 3 never writes
    // or writes only beyond 4 GiB; pickle.rs's unit tests feed those by hand.
    let by_hand = [
        "BINBYTES8",
        "BINSTRING",
        "BINUNICODE8",
        "DUP",
        "EXT1",
        "EXT2",
        "EXT4",
        "INST",
        "NEXT_BUFFER",
        "OBJ",
        "READONLY_BUFFER",
        "SHORT_BINSTRING",
        "STRING",
    ];
    let all = [
        "ADDITEMS",
        "APPEND",
        "APPENDS",
        "BINBYTES",
        "BINFLOAT",
        "BINGET",
        "BININT",
        "BININT1",
        "BININT2",
        "BINPERSID",
        "BINPUT",
        "BINUNICODE",
        "BUILD",
        "BYTEARRAY8",
        "DICT",
        "EMPTY_DICT",
        "EMPTY_LIST",
        "EMPTY_SET",
        "EMPTY_TUPLE",
        "FLOAT",
        "FRAME",
        "FROZENSET",
        "GET",
        "GLOBAL",
        "INT",
        "LIST",
        "LONG",
        "LONG1",
        "LONG4",
        "LONG_BINGET",
        "LONG_BINPUT",
        "MARK",
        "MEMOIZE",
        "NEWFALSE",
        "NEWOBJ",
        "NEWOBJ_EX",
        "NEWTRUE",
        "NONE",
        "PERSID",
        "POP",
        "POP_MARK",
        "PROTO",
        "PUT",
        "REDUCE",
        "SETITEM",
        "SETITEMS",
        "SHORT_BINBYTES",
        "SHORT_BINUNICODE",
        "STACK_GLOBAL",
        "STOP",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "UNICODE",
    ];
    let missing: Vec<_> = all.iter().filter(|o| !used.contains(**o)).collect();
    assert!(missing.is_empty(), "opcodes no fixture exercises: {missing:?}");
    assert_eq!(all.len() + by_hand.len(), 68, "pickletools lists 68 opcodes for protocols 0-5");
}

#[test]
fn out_of_band_buffers_and_extension_codes_are_refused_clearly() {
    let e = load_all(&read("cpython_oob.pkl")).unwrap_err();
    assert!(e.to_string().contains("out-of-band buffers"), "{e}");
    let e = load_all(&read("cpython_ext.pkl")).unwrap_err();
    assert!(e.to_string().contains("extension code 240"), "{e}");
}

/// Loads `data` in a way that turns a panic into a test failure naming the input.
fn must_not_panic(data: &[u8], what: &str) -> bool {
    match std::panic::catch_unwind(|| load_all(data).is_ok()) {
        Ok(ok) => ok,
        Err(_) => panic!(
            "{what}: the reader panicked on {} bytes: {:02x?}",
            data.len(),
            &data[..data.len().min(64)]
        ),
    }
}

#[test]
fn fuzz_truncations_flips_and_random_bytes_give_errors_not_panics() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    let mut inputs: Vec<Vec<u8>> = (0..=5).map(|p| read(&format!("cpython_p{p}.pkl"))).collect();
    inputs.push(read("cpython_oob.pkl"));
    let mut accepted = 0;
    for data in &inputs {
        // Every truncation of a pickle is an error (its STOP is the last byte).
        for n in 0..data.len() {
            assert!(!must_not_panic(&data[..n], "truncation"), "a truncation to {n} bytes was accepted");
        }
        for _ in 0..1000 {
            let mut d = data.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..d.len());
                d[i] = rng.random();
            }
            accepted += must_not_panic(&d, "flipped bytes") as usize;
        }
    }
    for _ in 0..20_000 {
        let n = rng.random_range(0..64);
        let mut d: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        if rng.random_bool(0.5) {
            d.insert(0, 0x80);
        }
        must_not_panic(&d, "random bytes");
    }
    // Some mutations only change a value: the reader is not rejecting everything.
    assert!(accepted > 0);
}

/// The hostile pickles of the reliability issue: each is an error or a bounded value, never a
/// stack overflow, an abort or a panic.
mod hostile {
    use std::path::Path;

    use dmdpipe::artifact::pickle::{self, load_all};
    use dmdpipe::artifact::torch_pickle::{Storage, TorchPickle, edm_snapshot_from_bytes, strided_tensor};

    /// `{'ema': _reconstruct_persistent_obj({'state': STATE})}` at protocol 2, STATE's pickle
    /// given as opcodes that leave one dict on the stack.
    fn edm_like(state: &[u8]) -> Vec<u8> {
        let mut b = b"\x80\x02}X\x03\x00\x00\x00ema".to_vec();
        b.extend(b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n");
        b.extend(b"}X\x05\x00\x00\x00state");
        b.extend(state);
        b.extend(b"s\x85Rs.");
        b
    }

    fn key(name: &str) -> Vec<u8> {
        let mut b = vec![b'X'];
        b.extend((name.len() as u32).to_le_bytes());
        b.extend(name.as_bytes());
        b
    }

    #[test]
    fn a_list_that_contains_itself() {
        let e = load_all(b"\x80\x02]q\x00h\x00aK\x01K\x02s.").unwrap_err();
        assert!(e.message.contains("cannot add items to a list"), "{e}");
    }

    #[test]
    fn a_million_nested_lists() {
        let depth = 1_000_000;
        let mut b = b"\x80\x02".to_vec();
        b.extend(std::iter::repeat_n(b']', depth));
        b.extend(std::iter::repeat_n(b'a', depth - 1));
        b.push(b'.');
        let p = load_all(&b).unwrap();
        assert!(pickle::to_json(&p, p.root.as_ref().unwrap()).to_string().contains("too deep"));
        let e = edm_snapshot_from_bytes(&b, Path::new("deep.pkl")).err().unwrap();
        assert!(format!("{e:#}").contains("no `ema` entry"), "{e:#}");
    }

    #[test]
    fn cyclic_init_kwargs() {
        let mut state = b"}".to_vec();
        state.extend(key("_init_kwargs"));
        state.extend(b"]q\x00h\x00as");
        let b = edm_like(&state);
        let tp = TorchPickle::embedded(&b).unwrap();
        let ema = tp.get(tp.root(), "ema").unwrap();
        let kwargs = tp.init_kwargs(&ema).unwrap();
        assert!(kwargs.to_string().contains("too deep"), "{kwargs}");
        let e = edm_snapshot_from_bytes(&b, Path::new("cyclic.pkl")).err().unwrap();
        assert!(format!("{e:#}").contains("holds no tensors"), "{e:#}");
    }

    #[test]
    fn rebuild_tensor_without_arguments() {
        let mut state = b"}".to_vec();
        state.extend(key("_parameters"));
        state.extend(b"}");
        state.extend(key("weight"));
        state.extend(b"ctorch._utils\n_rebuild_tensor_v2\n)Rss");
        let e = edm_snapshot_from_bytes(&edm_like(&state), Path::new("args.pkl")).err().unwrap();
        assert!(format!("{e:#}").contains("_rebuild_tensor_v2 with 0 arguments"), "{e:#}");
    }

    #[test]
    fn views_outside_their_storage() {
        let s = Storage {
            kind: tch::Kind::Float,
            bytes: vec![0; 4 * 6],
        };
        assert!(strided_tensor(&s, 0, &[2, 3], &[3, 1]).is_ok());
        assert!(format!("{:#}", strided_tensor(&s, 1, &[2, 3], &[3, 1]).unwrap_err()).contains("reaches past"));
        assert!(format!("{:#}", strided_tensor(&s, 0, &[2, 3], &[-3, 1]).unwrap_err()).contains("negative"));
        assert!(format!("{:#}", strided_tensor(&s, 0, &[i64::MAX, 3], &[3, 1]).unwrap_err()).contains("overflow"));
        assert!(strided_tensor(&s, 0, &[2, 3], &[3]).is_err());
    }

    #[test]
    fn broadcast_and_empty_views() {
        let s = Storage {
            kind: tch::Kind::Float,
            bytes: [1f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        // An expanded (stride 0) view of a small storage is read element by element.
        let t = strided_tensor(&s, 1, &[3, 2], &[0, 0]).unwrap();
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), vec![2.0; 6]);
        // Eight bytes declaring a trillion elements are refused before any allocation.
        let e = strided_tensor(&s, 0, &[1 << 40], &[0]).unwrap_err();
        assert!(format!("{e:#}").contains("repeats its storage"), "{e:#}");
        // An empty view may start anywhere, even past the storage's end.
        let t = strided_tensor(&s, 1_000_000, &[0, 4], &[4, 1]).unwrap();
        assert_eq!(t.size(), vec![0, 4]);
    }
}

/// LPIPS from checkpoints real torch wrote (a reduced-width VGG16 in torchvision's names, zip
/// format; heads in the lpips package's names, legacy format) against float64 reference
/// distances torch computed from the definition.
#[test]
fn lpips_from_torch_checkpoints_matches_the_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lpips");
    let mut net =
        dmdpipe::nn::lpips::Lpips::from_torch(&dir.join("vgg_tiny.pth"), &dir.join("heads_legacy.pth"), tch::Device::Cpu).unwrap();
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    net.resize = reference["resize"].as_i64();
    let load = |name: &str| {
        let a = dmdpipe::data::npy::read_npy(&dir.join(name)).unwrap();
        let dmdpipe::data::npy::NpyData::F32(v) = a.data else {
            panic!("f32 images")
        };
        tch::Tensor::from_slice(&v).reshape([2, 3, 16, 16])
    };
    let d = Vec::<f64>::try_from(net.distance(&load("a.npy"), &load("b.npy")).to_kind(tch::Kind::Double)).unwrap();
    for (got, want) in d.iter().zip(reference["distances"].as_array().unwrap()) {
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() < 1e-5 * want.abs().max(1e-3), "{got} vs {want}");
    }
    // The heads file is a legacy stream: a truncated copy is an error naming the storage.
    let bytes = std::fs::read(dir.join("heads_legacy.pth")).unwrap();
    let e = dmdpipe::artifact::torch_pickle::legacy_torch_from_bytes(&bytes[..bytes.len() - 10]).unwrap_err();
    assert!(format!("{e:#}").contains("run past the file"), "{e:#}");
}
