//! Weights as safetensors, by EDM state-dict name, loaded strictly (every name, every shape).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Result, bail};
use tch::Tensor;

use super::precond::Denoiser;

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
    let (tensors, _) = crate::artifact::tensors::read_safetensors(path)?;
    load_into(net, &tensors, &path.display().to_string())
}

/// Writes the network's variables (f32) with the config in the metadata.
pub fn save_safetensors(net: &Denoiser, path: &Path) -> Result<()> {
    let tensors = net.vs.variables().into_iter().collect();
    crate::artifact::denoiser::write(path, tensors, serde_json::to_string(&net.config)?)
}

/// Loads the denoiser artifact in `dir` (what `teacher` and `dmd` write).
pub fn load_denoiser_dir(dir: &Path, device: tch::Device) -> Result<Denoiser> {
    super::import::load_denoiser(&crate::artifact::denoiser::weights_path(dir), None, device)
}
