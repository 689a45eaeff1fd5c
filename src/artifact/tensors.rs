//! Named tensors as safetensors files: every artifact that holds tensors (weights, checkpoints,
//! pairs, features) is read and written through here.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

/// A tensor's f32 little-endian bytes and its shape (any kind, any device).
pub fn f32_bytes(t: &Tensor) -> (Vec<u8>, Vec<usize>) {
    let t = t.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0f32; numel];
    t.copy_data(&mut buf, numel);
    (
        buf.iter().flat_map(|v| v.to_le_bytes()).collect(),
        t.size().iter().map(|&s| s as usize).collect(),
    )
}

/// A tensor to write: f32 (any float kind is converted) or int64 as it is.
fn encode(t: &Tensor) -> (Dtype, Vec<u8>, Vec<usize>) {
    if t.kind() == Kind::Int64 {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let v = Vec::<i64>::try_from(t.flatten(0, -1)).unwrap_or_default();
        let shape = t.size().iter().map(|&s| s as usize).collect();
        return (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect(), shape);
    }
    let (b, s) = f32_bytes(t);
    (Dtype::F32, b, s)
}

/// Writes `tensors` and `meta` to `path` through a temp file, synced, then renamed.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> Result<()> {
    let data: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (d, b, s) = encode(t);
            (n.clone(), d, b, s)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, d, b, s)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads all tensors of a safetensors file as CPU tensors (floats as f32), plus its metadata.
pub fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    crate::data::file::check_regular(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        let t = match view.dtype() {
            Dtype::F32 => Tensor::from_data_size(view.data(), &shape, Kind::Float),
            Dtype::F64 => Tensor::from_data_size(view.data(), &shape, Kind::Double),
            Dtype::F16 => Tensor::from_data_size(view.data(), &shape, Kind::Half).to_kind(Kind::Float),
            Dtype::BF16 => Tensor::from_data_size(view.data(), &shape, Kind::BFloat16).to_kind(Kind::Float),
            Dtype::I64 => Tensor::from_data_size(view.data(), &shape, Kind::Int64),
            Dtype::U8 => Tensor::from_data_size(view.data(), &shape, Kind::Uint8),
            other => bail!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display()),
        };
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Removes tensor `name` from a file's tensors, or says which file lacks it.
pub fn take(tensors: &mut HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    tensors
        .remove(name)
        .with_context(|| format!("{} has no `{name}` tensor", path.display()))
}
