//! EDM-format snapshots written by real torch 2.11 / CPython 3.12 (tests/fixtures/torch, made
//! on the GPU machine by bench/edm_snapshot.py from its own module tree: protocols 2, 4 and 5,
//! EDM's persistence reduction with embedded source, numpy scalars, a non-persistent buffer,
//! `loss_fn`, `augment_pipe` and an `EasyDict` of dataset kwargs beside `ema`). The reference is
//! the module's `state_dict()`, written by that script as safetensors without dmdpipe, and as a
//! torch zip by `torch.save`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dmdpipe::artifact::tensors::read_safetensors;
use dmdpipe::artifact::torch_pickle::{edm_snapshot_from_bytes, read_edm_snapshot, read_torch_zip};
use dmdpipe::nn::import::{load_denoiser, read_edm_pickle};
use rand::{Rng, SeedableRng};
use tch::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch").join(name)
}

fn reference() -> HashMap<String, Tensor> {
    read_safetensors(&fixture("songunet_tiny_state.safetensors")).unwrap().0
}

fn assert_same(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
    let mut g: Vec<_> = got.keys().collect();
    let mut w: Vec<_> = want.keys().collect();
    g.sort();
    w.sort();
    assert_eq!(g, w, "{what}: tensor names differ from state_dict()");
    for (k, t) in want {
        assert!(got[k].equal(t), "{what}: `{k}` differs from state_dict()");
    }
}

#[test]
fn torch_written_edm_snapshots_import_to_the_state_dict_at_every_protocol() {
    let want = reference();
    assert_eq!(want.len(), 149);
    for p in [2, 4, 5] {
        let path = fixture(&format!("songunet_tiny_p{p}.pkl"));
        let snap = read_edm_snapshot(&path).unwrap();
        assert_same(&snap.tensors, &want, &format!("protocol {p}"));
        assert!(
            !snap.tensors.contains_key("scratch"),
            "a non-persistent buffer is not in state_dict()"
        );
        assert_eq!(snap.class_name.as_deref(), Some("EDMPrecond"));
        let others: HashMap<_, _> = snap.others.iter().cloned().collect();
        assert_eq!(others["loss_fn"], "EDMLoss object");
        assert_eq!(others["augment_pipe"], "AugmentPipe object");
        assert_eq!(others["dataset_kwargs"], "EasyDict object");
        let kw = snap.init_kwargs.unwrap();
        assert_eq!(kw["model_type"], "SongUNet");
        assert_eq!(kw["model_channels"], 8);
        // The config the network is built from, and a strict load of every tensor into it.
        let imported = read_edm_pickle(&path).unwrap();
        let config = imported.config.expect("EDM's recorded kwargs give the config");
        assert_eq!(config.sample_shape(), [3, 32, 32]);
        load_denoiser(&path, None, Device::Cpu).unwrap();
    }
}

#[test]
fn torch_save_zip_of_the_same_state_dict_reads_the_same() {
    assert_same(
        &read_torch_zip(&fixture("songunet_tiny_state.pt")).unwrap(),
        &reference(),
        "torch.save zip",
    );
}

#[test]
fn damaged_torch_snapshots_give_errors_not_panics() {
    let data = std::fs::read(fixture("songunet_tiny_p4.pkl")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let read = |bytes: &[u8]| {
        std::panic::catch_unwind(|| edm_snapshot_from_bytes(bytes, Path::new("fuzz.pkl")).is_ok())
            .unwrap_or_else(|_| panic!("the reader panicked on {} bytes", bytes.len()))
    };
    for _ in 0..300 {
        let n = rng.random_range(0..data.len());
        assert!(!read(&data[..n]), "a truncation to {n} bytes was accepted");
    }
    for _ in 0..300 {
        let mut d = data.clone();
        for _ in 0..rng.random_range(1..5) {
            let i = rng.random_range(0..d.len());
            d[i] = rng.random();
        }
        read(&d);
    }
}

/// A torch zip whose storage entry inflates to far more than the checkpoint says it holds (a
/// zip bomb) is refused before it is inflated.
#[test]
fn a_storage_larger_than_its_tensor_is_refused_unread() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let honest = fixture("songunet_tiny_state.pt");
    let bomb = dir.path().join("bomb.pt");
    let mut src = zip::ZipArchive::new(std::fs::File::open(&honest).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(&bomb).unwrap());
    let deflate = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let mut replaced = false;
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        out.start_file(name.as_str(), deflate).unwrap();
        if !replaced && name.contains("/data/") && !name.ends_with(".pkl") {
            out.write_all(&vec![0u8; 64 << 20]).unwrap(); // 64 MiB of zeros, ~64 KiB deflated
            replaced = true;
        } else {
            out.write_all(&bytes).unwrap();
        }
    }
    out.finish().unwrap();
    assert!(replaced);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    let e = read_torch_zip(&bomb).err().expect("a bomb is refused");
    assert!(format!("{e:#}").contains("the archive declares 67108864 bytes"), "{e:#}");
}
