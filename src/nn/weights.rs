//! Weights as safetensors, by EDM state-dict name, loaded strictly (every name, every shape).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

use super::precond::Denoiser;

/// Reads all tensors of a safetensors file as f32 CPU tensors, plus its metadata.
pub fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
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

/// Copies `tensors` into the network's parameters and buffers. Every variable must be present
/// with its exact shape; names in the file that the network lacks are an error too.
pub fn load_into(net: &Denoiser, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
    let vars = net.vs.variables();
    let mut missing = Vec::new();
    for (name, var) in &vars {
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.size() != var.size() => bail!("{source}: `{name}` has shape {:?}, the network expects {:?}", t.size(), var.size()),
            Some(t) => tch::no_grad(|| var.shallow_clone().copy_(&t.to_kind(var.kind()).to_device(var.device()))),
        }
    }
    let known: BTreeSet<&String> = vars.keys().collect();
    let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        missing.sort();
        bail!(
            "{source}: weights do not match the network config: {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            extra.len(),
            extra.iter().take(3).collect::<Vec<_>>()
        );
    }
    Ok(())
}

pub fn load_safetensors(net: &Denoiser, path: &Path) -> Result<()> {
    let (tensors, _) = read_safetensors(path)?;
    load_into(net, &tensors, &path.display().to_string())
}

/// Writes the network's variables (f32) with the config in the metadata.
pub fn save_safetensors(net: &Denoiser, path: &Path) -> Result<()> {
    let vars = net.vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let t = vars[*n].to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
            let numel = t.numel();
            let mut buf = vec![0f32; numel];
            t.copy_data(&mut buf, numel);
            let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
            ((*n).clone(), bytes, t.size().iter().map(|&s| s as usize).collect())
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("config".to_string(), serde_json::to_string(&net.config)?);
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))
}
