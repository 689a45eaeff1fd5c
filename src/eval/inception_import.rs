//! Importing the FID Inception-v3 detector from the files users have: NVIDIA's pickled
//! `inception-2015-12-05.pkl` (TF graph names) and pytorch-fid's `pt_inception-*.pth`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Tensor};

use crate::artifact::torch_pickle;

/// pytorch-fid's Inception names (`Mixed_5b.branch5x5_1.conv.weight`, ...) -> the TF graph's
/// (`net.layers.mixed.tower.conv.weight`, ...), for `pt_inception-2015-12-05-*.pth`.
pub fn pytorch_fid_to_tf(name: &str) -> Option<String> {
    let (module, rest) = name.split_once('.')?;
    let (branch, tensor) = match rest.split_once('.') {
        Some((b, t)) if module.starts_with("Mixed") => (b, t),
        _ => ("", rest),
    };
    let tf_tensor = match tensor {
        "conv.weight" => "weight",
        "bn.bias" => "beta",
        "bn.running_mean" => "mean",
        "bn.running_var" => "var",
        _ => return None,
    };
    let stem = |m: &str| match m {
        "Conv2d_1a_3x3" => Some("conv"),
        "Conv2d_2a_3x3" => Some("conv_1"),
        "Conv2d_2b_3x3" => Some("conv_2"),
        "Conv2d_3b_1x1" => Some("conv_3"),
        "Conv2d_4a_3x3" => Some("conv_4"),
        _ => None,
    };
    if let Some(s) = stem(module) {
        return Some(format!("net.layers.{s}.{tf_tensor}"));
    }
    let (tf_module, kind) = match module {
        "Mixed_5b" => ("mixed", 'A'),
        "Mixed_5c" => ("mixed_1", 'A'),
        "Mixed_5d" => ("mixed_2", 'A'),
        "Mixed_6a" => ("mixed_3", 'B'),
        "Mixed_6b" => ("mixed_4", 'C'),
        "Mixed_6c" => ("mixed_5", 'C'),
        "Mixed_6d" => ("mixed_6", 'C'),
        "Mixed_6e" => ("mixed_7", 'C'),
        "Mixed_7a" => ("mixed_8", 'D'),
        "Mixed_7b" => ("mixed_9", 'E'),
        "Mixed_7c" => ("mixed_10", 'E'),
        _ => return None,
    };
    let tf_branch = match (kind, branch) {
        ('A' | 'C' | 'E', "branch1x1") | ('B', "branch3x3") => "conv",
        ('A', "branch5x5_1") | ('B', "branch3x3dbl_1") | ('C', "branch7x7_1") | ('D', "branch3x3_1") => "tower.conv",
        ('A', "branch5x5_2") | ('B', "branch3x3dbl_2") | ('C', "branch7x7_2") | ('D', "branch3x3_2") => "tower.conv_1",
        ('B', "branch3x3dbl_3") | ('C', "branch7x7_3") => "tower.conv_2",
        ('A', "branch3x3dbl_1") | ('C', "branch7x7dbl_1") | ('D', "branch7x7x3_1") => "tower_1.conv",
        ('A', "branch3x3dbl_2") | ('C', "branch7x7dbl_2") | ('D', "branch7x7x3_2") => "tower_1.conv_1",
        ('A', "branch3x3dbl_3") | ('C', "branch7x7dbl_3") | ('D', "branch7x7x3_3") => "tower_1.conv_2",
        ('C', "branch7x7dbl_4") | ('D', "branch7x7x3_4") => "tower_1.conv_3",
        ('C', "branch7x7dbl_5") => "tower_1.conv_4",
        ('A' | 'C', "branch_pool") => "tower_2.conv",
        ('E', "branch3x3_1") => "tower_conv",
        ('E', "branch3x3_2a") => "tower_mixed_conv",
        ('E', "branch3x3_2b") => "tower_mixed_conv_1",
        ('E', "branch3x3dbl_1") => "tower_1_conv",
        ('E', "branch3x3dbl_2") => "tower_1_conv_1",
        ('E', "branch3x3dbl_3a") => "tower_1_mixed_conv",
        ('E', "branch3x3dbl_3b") => "tower_1_mixed_conv_1",
        ('E', "branch_pool") => "tower_2_conv",
        _ => return None,
    };
    Some(format!("net.layers.{tf_module}.{tf_branch}.{tf_tensor}"))
}

/// Converts pytorch-fid's Inception state dict to the TF-named tensors `eval::inception`
/// loads. Its batch norms must have unit scale (the TF graph has none).
pub fn convert_pytorch_fid_inception(tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        if name.ends_with("bn.weight") {
            let dev = (t - 1.0).abs().max().double_value(&[]);
            if dev > 1e-6 {
                bail!("`{name}` is not all ones (max deviation {dev}): not the FID Inception");
            }
            continue;
        }
        if let Some(tf) = pytorch_fid_to_tf(name) {
            out.insert(tf, t.shallow_clone());
        }
    }
    if out.len() != 376 {
        bail!(
            "found {} of the 376 Inception tensors: not pytorch-fid's pt_inception checkpoint",
            out.len()
        );
    }
    Ok(out)
}

/// NVIDIA's `inception-2015-12-05.pkl` detector (EDM, StyleGAN3): its module tree already has
/// the TF graph's names under `layers.` (`layers.mixed_6.conv.weight`, batch norm `beta`, `mean`,
/// `var`); whatever wraps `layers` is dropped and `net.` put in front.
pub fn convert_nvidia_inception(tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let rest = match name.find("layers.") {
            Some(i) if i == 0 || name[..i].ends_with('.') => &name[i..],
            _ => continue,
        };
        let tensor = rest.rsplit('.').next().unwrap_or("");
        if !matches!(tensor, "weight" | "beta" | "mean" | "var") {
            continue;
        }
        if out.insert(format!("net.{rest}"), t.to_kind(tch::Kind::Float)).is_some() {
            bail!("two tensors map to net.{rest}");
        }
    }
    // Names and shapes are checked by building the network.
    super::inception::Inception::from_tensors(&out, Device::Cpu).context("not NVIDIA's Inception-v3 detector")?;
    if out.len() != 376 {
        bail!(
            "found {} of the 376 Inception tensors: not NVIDIA's inception-2015-12-05.pkl",
            out.len()
        );
    }
    Ok(out)
}

/// `dmdpipe import-weights --inception`: converts either detector to safetensors.
pub fn import_inception(input: &Path, output: &Path) -> Result<String> {
    // A zip is pytorch-fid's `.pth`; anything else NVIDIA's pickled detector.
    let mut magic = [0u8; 4];
    let is_zip = std::fs::File::open(input)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"PK\x03\x04";
    let tf = if is_zip {
        let tensors = torch_pickle::read_torch_zip(input)?;
        convert_pytorch_fid_inception(&tensors)
    } else {
        let tensors = torch_pickle::read_module_pickle(input)?;
        convert_nvidia_inception(&tensors)
    }
    .with_context(|| format!("{}", input.display()))?;
    let pairs: Vec<(String, Tensor)> = tf.into_iter().collect();
    crate::artifact::checkpoint::save(
        output,
        &pairs,
        HashMap::from([("format".to_string(), "inception-2015-12-05".to_string())]),
    )?;
    Ok(format!("{} Inception tensors", pairs.len()))
}
