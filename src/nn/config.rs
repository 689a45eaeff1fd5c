//! Network configurations as pipeline files write them. Defaults are EDM's: DDPM++ as in
//! `edm-cifar10-32x32-cond-vp`, ADM as in `edm-imagenet-64x64-cond-adm`.

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::layers::NormMode;

fn d_res32() -> i64 {
    32
}
fn d_res64() -> i64 {
    64
}
fn d_3() -> i64 {
    3
}
fn d_10() -> i64 {
    10
}
fn d_1000() -> i64 {
    1000
}
fn d_9() -> i64 {
    9
}
fn d_128() -> i64 {
    128
}
fn d_192() -> i64 {
    192
}
fn d_222() -> Vec<i64> {
    vec![2, 2, 2]
}
fn d_1234() -> Vec<i64> {
    vec![1, 2, 3, 4]
}
fn d_4() -> i64 {
    4
}
fn d_1() -> i64 {
    1
}
fn d_16() -> Vec<i64> {
    vec![16]
}
fn d_32_16_8() -> Vec<i64> {
    vec![32, 16, 8]
}
fn d_drop13() -> f64 {
    0.13
}
fn d_drop10() -> f64 {
    0.10
}
fn d_filter() -> Vec<f64> {
    vec![1.0, 1.0]
}
fn d_sigma_data() -> f64 {
    0.5
}
fn d_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Embedding {
    #[default]
    Positional,
    Fourier,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncoderType {
    #[default]
    Standard,
    Skip,
    Residual,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecoderType {
    #[default]
    Standard,
    Skip,
}

/// DDPM++ / NCSN++ (EDM's SongUNet).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SongUNetConfig {
    #[serde(default = "d_res32")]
    pub img_resolution: i64,
    #[serde(default = "d_3")]
    pub img_channels: i64,
    /// Number of classes; 0 for an unconditional model.
    #[serde(default = "d_10")]
    pub label_dim: i64,
    /// Augmentation-label dimension (EDM's CIFAR-10 models: 9); 0 for none.
    #[serde(default = "d_9")]
    pub augment_dim: i64,
    #[serde(default = "d_128")]
    pub model_channels: i64,
    #[serde(default = "d_222")]
    pub channel_mult: Vec<i64>,
    #[serde(default = "d_4")]
    pub channel_mult_emb: i64,
    #[serde(default = "d_4")]
    pub num_blocks: i64,
    #[serde(default = "d_16")]
    pub attn_resolutions: Vec<i64>,
    #[serde(default = "d_drop13")]
    pub dropout: f64,
    #[serde(default)]
    pub label_dropout: f64,
    #[serde(default)]
    pub embedding_type: Embedding,
    #[serde(default = "d_1")]
    pub channel_mult_noise: i64,
    #[serde(default)]
    pub encoder_type: EncoderType,
    #[serde(default)]
    pub decoder_type: DecoderType,
    #[serde(default = "d_filter")]
    pub resample_filter: Vec<f64>,
    #[serde(default = "d_sigma_data")]
    pub sigma_data: f64,
    /// Under bf16 autocast, run GroupNorm and the SiLU after it on the bf16 activations (the
    /// statistics still accumulate in fp32) instead of in fp32 as autocast casts them: 1.19x the
    /// training and sampling speed on an H200 (docs/RESULTS.md, session 5). No effect in fp32.
    #[serde(default = "d_true")]
    pub bf16_group_norm: bool,
    /// On CUDA: activations channels-last (NHWC) through the network and every GroupNorm, with
    /// the shift before it and the SiLU after it, in dmdpipe's fused kernels (compiled at run time
    /// by NVRTC; statistics and arithmetic in fp32, one rounding to the activation dtype).
    /// docs/RESULTS.md, session 9, has its speed; no effect on the CPU.
    #[serde(default = "d_true")]
    pub fused_kernels: bool,
}

impl SongUNetConfig {
    pub fn norm_mode(&self) -> NormMode {
        NormMode {
            bf16_native: self.bf16_group_norm,
            fused: self.fused_kernels,
        }
    }
}

/// ADM (EDM's DhariwalUNet, the ImageNet-64 architecture).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DhariwalUNetConfig {
    #[serde(default = "d_res64")]
    pub img_resolution: i64,
    #[serde(default = "d_3")]
    pub img_channels: i64,
    #[serde(default = "d_1000")]
    pub label_dim: i64,
    #[serde(default)]
    pub augment_dim: i64,
    #[serde(default = "d_192")]
    pub model_channels: i64,
    #[serde(default = "d_1234")]
    pub channel_mult: Vec<i64>,
    #[serde(default = "d_4")]
    pub channel_mult_emb: i64,
    #[serde(default = "d_3")]
    pub num_blocks: i64,
    #[serde(default = "d_32_16_8")]
    pub attn_resolutions: Vec<i64>,
    #[serde(default = "d_drop10")]
    pub dropout: f64,
    #[serde(default)]
    pub label_dropout: f64,
    #[serde(default = "d_sigma_data")]
    pub sigma_data: f64,
    /// Under bf16 autocast, run GroupNorm and the SiLU after it on the bf16 activations (the
    /// statistics still accumulate in fp32) instead of in fp32 as autocast casts them: 1.19x the
    /// training and sampling speed on an H200 (docs/RESULTS.md, session 5). No effect in fp32.
    #[serde(default = "d_true")]
    pub bf16_group_norm: bool,
    /// On CUDA: activations channels-last (NHWC) through the network and every GroupNorm, with
    /// the shift before it and the SiLU after it, in dmdpipe's fused kernels (compiled at run time
    /// by NVRTC; statistics and arithmetic in fp32, one rounding to the activation dtype).
    /// docs/RESULTS.md, session 9, has its speed; no effect on the CPU.
    #[serde(default = "d_true")]
    pub fused_kernels: bool,
}

impl DhariwalUNetConfig {
    pub fn norm_mode(&self) -> NormMode {
        NormMode {
            bf16_native: self.bf16_group_norm,
            fused: self.fused_kernels,
        }
    }
}

fn d_dim() -> i64 {
    2
}
fn d_hidden() -> i64 {
    128
}
fn d_mlp_layers() -> i64 {
    3
}
fn d_noise_ch() -> i64 {
    16
}

/// A small MLP denoiser for low-dimensional data (the 2-D toy pipeline).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Data dimension.
    #[serde(default = "d_dim")]
    pub dim: i64,
    #[serde(default = "d_hidden")]
    pub hidden: i64,
    /// Hidden layers.
    #[serde(default = "d_mlp_layers")]
    pub layers: i64,
    #[serde(default)]
    pub label_dim: i64,
    /// Width of the noise-level embedding.
    #[serde(default = "d_noise_ch")]
    pub noise_channels: i64,
    #[serde(default = "d_sigma_data")]
    pub sigma_data: f64,
}

/// A denoiser network with EDM preconditioning.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum NetworkConfig {
    /// DDPM++ (SongUNet): EDM's CIFAR-10, FFHQ and AFHQ models.
    Ddpmpp(SongUNetConfig),
    /// ADM (DhariwalUNet): EDM's ImageNet-64 model.
    Adm(DhariwalUNetConfig),
    /// A small MLP for low-dimensional data.
    Mlp(MlpConfig),
}

/// `Err` naming the first field outside its range.
fn positive(fields: &[(&str, i64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| *v < 1) {
        Some((name, v)) => Err(format!("network.{name} must be at least 1 (got {v})")),
        None => Ok(()),
    }
}

fn non_negative(fields: &[(&str, i64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| *v < 0) {
        Some((name, v)) => Err(format!("network.{name} must not be negative (got {v})")),
        None => Ok(()),
    }
}

fn unit_interval(fields: &[(&str, f64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| !(0.0..1.0).contains(v)) {
        Some((name, v)) => Err(format!("network.{name} must be in [0, 1) (got {v})")),
        None => Ok(()),
    }
}

impl NetworkConfig {
    /// Checks every size before it reaches libtorch (which aborts on negative widths).
    pub fn check(&self) -> Result<(), String> {
        let mults = |m: &[i64]| -> Result<(), String> {
            if m.is_empty() || m.iter().any(|&x| x < 1) {
                return Err(format!(
                    "network.channel_mult must be a non-empty list of positive factors (got {m:?})"
                ));
            }
            Ok(())
        };
        // The two U-Nets name their sizes alike.
        macro_rules! unet {
            ($c:expr) => {{
                let c = $c;
                positive(&[
                    ("img_resolution", c.img_resolution),
                    ("img_channels", c.img_channels),
                    ("model_channels", c.model_channels),
                    ("channel_mult_emb", c.channel_mult_emb),
                    ("num_blocks", c.num_blocks),
                ])?;
                non_negative(&[("label_dim", c.label_dim), ("augment_dim", c.augment_dim)])?;
                unit_interval(&[("dropout", c.dropout), ("label_dropout", c.label_dropout)])?;
                mults(&c.channel_mult)?;
            }};
        }
        match self {
            NetworkConfig::Ddpmpp(c) => {
                unet!(c);
                positive(&[("channel_mult_noise", c.channel_mult_noise)])?;
            }
            NetworkConfig::Adm(c) => unet!(c),
            NetworkConfig::Mlp(c) => {
                positive(&[
                    ("dim", c.dim),
                    ("hidden", c.hidden),
                    ("layers", c.layers),
                    ("noise_channels", c.noise_channels),
                ])?;
                non_negative(&[("label_dim", c.label_dim)])?;
            }
        }
        if !(self.sigma_data() > 0.0) {
            return Err(format!("network.sigma_data must be positive (got {})", self.sigma_data()));
        }
        Ok(())
    }

    /// Shape of one sample: [C, H, W] for images, [dim] for the MLP.
    pub fn sample_shape(&self) -> Vec<i64> {
        match self {
            NetworkConfig::Mlp(c) => vec![c.dim],
            _ => vec![self.img_channels(), self.img_resolution(), self.img_resolution()],
        }
    }

    pub fn label_dim(&self) -> i64 {
        match self {
            NetworkConfig::Ddpmpp(c) => c.label_dim,
            NetworkConfig::Adm(c) => c.label_dim,
            NetworkConfig::Mlp(c) => c.label_dim,
        }
    }
    pub fn img_resolution(&self) -> i64 {
        match self {
            NetworkConfig::Ddpmpp(c) => c.img_resolution,
            NetworkConfig::Adm(c) => c.img_resolution,
            NetworkConfig::Mlp(_) => 0,
        }
    }
    pub fn img_channels(&self) -> i64 {
        match self {
            NetworkConfig::Ddpmpp(c) => c.img_channels,
            NetworkConfig::Adm(c) => c.img_channels,
            NetworkConfig::Mlp(c) => c.dim,
        }
    }
    pub fn sigma_data(&self) -> f64 {
        match self {
            NetworkConfig::Ddpmpp(c) => c.sigma_data,
            NetworkConfig::Adm(c) => c.sigma_data,
            NetworkConfig::Mlp(c) => c.sigma_data,
        }
    }
    /// Whether GroupNorm runs on bf16 activations in bf16 (see `SongUNetConfig::bf16_group_norm`).
    pub fn bf16_group_norm(&self) -> bool {
        match self {
            NetworkConfig::Ddpmpp(c) => c.bf16_group_norm,
            NetworkConfig::Adm(c) => c.bf16_group_norm,
            NetworkConfig::Mlp(_) => false,
        }
    }
    /// Whether CUDA runs the network channels-last with the fused kernels (`fused_kernels`).
    pub fn fused_kernels(&self) -> bool {
        match self {
            NetworkConfig::Ddpmpp(c) => c.fused_kernels,
            NetworkConfig::Adm(c) => c.fused_kernels,
            NetworkConfig::Mlp(_) => false,
        }
    }
    pub fn set_fused_kernels(&mut self, on: bool) {
        match self {
            NetworkConfig::Ddpmpp(c) => c.fused_kernels = on,
            NetworkConfig::Adm(c) => c.fused_kernels = on,
            NetworkConfig::Mlp(_) => {}
        }
    }
    pub fn set_dropout(&mut self, p: f64) {
        match self {
            NetworkConfig::Ddpmpp(c) => c.dropout = p,
            NetworkConfig::Adm(c) => c.dropout = p,
            NetworkConfig::Mlp(_) => {}
        }
    }

    /// Reads EDM's constructor arguments (`model_type` plus network kwargs) as recorded in
    /// EDM's pickles and in the golden files' metadata.
    pub fn from_edm_kwargs(v: &serde_json::Value) -> Result<Self> {
        let mut obj = v.as_object().context("network config must be a JSON object")?.clone();
        let model_type = obj
            .remove("model_type")
            .and_then(|m| m.as_str().map(str::to_string))
            .unwrap_or_else(|| "SongUNet".into());
        if let Some(c) = obj.remove("img_channels") {
            obj.insert("img_channels".into(), c);
        }
        for k in [
            "use_fp16",
            "sigma_min",
            "sigma_max",
            "in_channels",
            "out_channels",
            "beta_d",
            "beta_min",
            "M",
            "epsilon_t",
            "C_1",
            "C_2",
        ] {
            obj.remove(k);
        }
        let v = serde_json::Value::Object(obj);
        Ok(match model_type.as_str() {
            "SongUNet" => NetworkConfig::Ddpmpp(serde_json::from_value(v).context("SongUNet config")?),
            "DhariwalUNet" => NetworkConfig::Adm(serde_json::from_value(v).context("DhariwalUNet config")?),
            other => bail!("unsupported EDM model_type `{other}`"),
        })
    }
}
