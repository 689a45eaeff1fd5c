//! Loading a denoiser from the files users have: our safetensors (config in the metadata),
//! EDM's `.pkl` snapshots and torch zip checkpoints (`.pt`/`.pth`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Tensor};

use super::{Denoiser, NetworkConfig, weights};
use crate::artifact::torch_pickle;

/// Tensors by EDM state-dict name plus the network config, if the file records one.
pub struct Imported {
    pub tensors: HashMap<String, Tensor>,
    pub config: Option<NetworkConfig>,
}

pub fn read_weights(path: &Path) -> Result<Imported> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "safetensors" => {
            let (tensors, meta) = crate::artifact::tensors::read_safetensors(path)?;
            let config = match meta.get("config") {
                None => None,
                Some(text) => Some(parse_config(text).with_context(|| format!("{}: the `config` metadata", path.display()))?),
            };
            Ok(Imported { tensors, config })
        }
        "pkl" => read_edm_pickle(path),
        "pt" | "pth" | "zip" => Ok(Imported {
            tensors: torch_pickle::read_torch_zip(path)?,
            config: None,
        }),
        _ => bail!(
            "{}: unknown weights format (expected .safetensors, .pkl, .pt or .pth)",
            path.display()
        ),
    }
}

/// EDM's `.pkl` training snapshot: the `ema` network's weights and its recorded config.
pub fn read_edm_pickle(path: &Path) -> Result<Imported> {
    let snap = torch_pickle::read_edm_snapshot(path)?;
    for (name, what) in &snap.others {
        tracing::info!("{}: `{name}` ({what}) is not used", path.display());
    }
    let config = match &snap.init_kwargs {
        Some(kw) => {
            Some(NetworkConfig::from_edm_kwargs(kw).with_context(|| format!("{}: the network's recorded config {kw}", path.display()))?)
        }
        None => None,
    };
    Ok(Imported {
        tensors: snap.tensors,
        config,
    })
}

/// Our own JSON (with `arch`) or EDM's constructor kwargs (with `model_type`).
pub fn parse_config(text: &str) -> Result<NetworkConfig> {
    let text = text.replace("Infinity", "\"inf\"");
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if v.get("arch").is_some() {
        Ok(serde_json::from_value(v)?)
    } else {
        NetworkConfig::from_edm_kwargs(&v)
    }
}

/// Builds the network the file describes (or `expected`) and loads its weights strictly.
pub fn load_denoiser(path: &Path, expected: Option<&NetworkConfig>, device: Device) -> Result<Denoiser> {
    let imported = read_weights(path)?;
    let config = match (&imported.config, expected) {
        (Some(file), Some(exp)) if !same_arch(file, exp) => {
            bail!(
                "{}: the file's network config differs from the pipeline's `network`:\n  file:     {}\n  pipeline: {}",
                path.display(),
                serde_json::to_string(file)?,
                serde_json::to_string(exp)?
            )
        }
        (Some(file), _) => file.clone(),
        (None, Some(exp)) => exp.clone(),
        (None, None) => bail!(
            "{}: the file records no network config; give `network` in the pipeline",
            path.display()
        ),
    };
    config
        .check()
        .map_err(|e| anyhow::anyhow!("{}: the recorded network config is invalid: {e}", path.display()))?;
    let net = Denoiser::new(&config, device);
    weights::load_into(&net, &imported.tensors, &path.display().to_string())?;
    Ok(net)
}

/// Configs equal up to dropout (a training-time setting).
fn same_arch(a: &NetworkConfig, b: &NetworkConfig) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.set_dropout(0.0);
    b.set_dropout(0.0);
    a == b
}

/// `dmdpipe import-weights`: converts a denoiser checkpoint to safetensors (config in the metadata).
pub fn import_to_safetensors(input: &Path, output: &Path) -> Result<String> {
    let imported = read_weights(input)?;
    let config = imported
        .config
        .clone()
        .with_context(|| format!("{}: no network config recorded; only EDM pickles carry one", input.display()))?;
    config
        .check()
        .map_err(|e| anyhow::anyhow!("{}: the recorded network config is invalid: {e}", input.display()))?;
    let net = Denoiser::new(&config, Device::Cpu);
    weights::load_into(&net, &imported.tensors, &input.display().to_string())?;
    weights::save_safetensors(&net, output)?;
    Ok(format!(
        "{} parameters, config {}",
        net.num_params(),
        serde_json::to_string(&config)?
    ))
}
