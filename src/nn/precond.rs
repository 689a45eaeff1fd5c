//! EDM preconditioning around a U-Net: D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y).

use anyhow::Result;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::config::NetworkConfig;
use super::dhariwal::DhariwalUNet;
use super::songunet::SongUNet;

enum UNet {
    Song(SongUNet),
    Dhariwal(DhariwalUNet),
    Mlp(Mlp),
}

/// x ++ noise embedding ++ labels -> hidden layers (SiLU) -> output.
struct Mlp {
    layers: Vec<super::layers::Linear>,
    noise_channels: i64,
}

impl Mlp {
    fn new(p: &tch::nn::Path, c: &super::config::MlpConfig) -> Self {
        use super::layers::{Init, InitMode, Linear};
        let init = Init::new(InitMode::KaimingUniform, 1.0, 0.0);
        let mut layers = Vec::new();
        let mut width = c.dim + c.noise_channels + c.label_dim;
        for i in 0..c.layers {
            layers.push(Linear::new(&(p / format!("layer{i}")), width, c.hidden, true, init));
            width = c.hidden;
        }
        layers.push(Linear::new(
            &(p / "out"),
            width,
            c.dim,
            true,
            Init::new(InitMode::KaimingUniform, 0.1, 0.0),
        ));
        Mlp {
            layers,
            noise_channels: c.noise_channels,
        }
    }
    fn forward(&self, x: &Tensor, c_noise: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let emb = super::layers::positional_embedding(c_noise, self.noise_channels, 100.0, true);
        let mut parts = vec![x.shallow_clone(), emb];
        if let Some(l) = labels {
            parts.push(l.shallow_clone());
        }
        let mut h = Tensor::cat(&parts, 1);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = h.silu();
            }
        }
        h
    }
}

/// The tensors of EDM's preconditioning for one call.
struct Precond {
    x: Tensor,
    c_skip: Tensor,
    c_out: Tensor,
    c_in: Tensor,
    c_noise: Tensor,
    labels: Option<Tensor>,
}

/// A denoiser with its own parameters (a VarStore whose names are EDM's state-dict names).
pub struct Denoiser {
    pub vs: VarStore,
    pub config: NetworkConfig,
    net: UNet,
}

impl Denoiser {
    /// Builds the network on `device` with EDM's random initialisation (seeded by the caller
    /// through `tch::manual_seed`).
    pub fn new(config: &NetworkConfig, device: Device) -> Self {
        let vs = VarStore::new(device);
        let root = vs.root() / "model";
        let net = match config {
            NetworkConfig::Ddpmpp(c) => UNet::Song(SongUNet::new(&root, c)),
            NetworkConfig::Adm(c) => UNet::Dhariwal(DhariwalUNet::new(&root, c)),
            NetworkConfig::Mlp(c) => UNet::Mlp(Mlp::new(&root, c)),
        };
        Denoiser {
            vs,
            config: config.clone(),
            net,
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn num_params(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// The raw U-Net output F(x_in; c_noise, y).
    pub fn raw(
        &self,
        x_in: &Tensor,
        c_noise: &Tensor,
        class_labels: Option<&Tensor>,
        augment_labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        match &self.net {
            UNet::Song(n) => n.forward(x_in, c_noise, class_labels, augment_labels, train),
            UNet::Dhariwal(n) => n.forward(x_in, c_noise, class_labels, augment_labels, train),
            UNet::Mlp(n) => n.forward(x_in, c_noise, class_labels),
        }
    }

    /// D(x; sigma, y) in f32 (the network itself may run under autocast). `sigma` has one value
    /// per image or a single value; `class_labels` are one-hot [N, label_dim].
    pub fn denoise(&self, x: &Tensor, sigma: &Tensor, class_labels: Option<&Tensor>, train: bool) -> Tensor {
        self.denoise_aug(x, sigma, class_labels, None, train)
    }

    pub fn denoise_aug(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        class_labels: Option<&Tensor>,
        augment_labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let p = self.precondition(x, sigma, class_labels);
        let f = self.raw(&(&p.c_in * &p.x), &p.c_noise, p.labels.as_ref(), augment_labels, train);
        p.c_skip * &p.x + p.c_out * f.to_kind(Kind::Float)
    }

    /// EDM's preconditioning of (x, sigma, labels): the network's input scaling, noise label
    /// and label tensor, and the output mixing coefficients.
    fn precondition(&self, x: &Tensor, sigma: &Tensor, class_labels: Option<&Tensor>) -> Precond {
        let x = x.to_kind(Kind::Float);
        let n = x.size()[0];
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, x.dim() - 1));
        let sigma = sigma.to_kind(Kind::Float).reshape(shape.as_slice());
        let sd = self.config.sigma_data();
        let s2 = sigma.square() + sd * sd;
        let c_skip = s2.reciprocal() * (sd * sd);
        let c_out = &sigma * sd / s2.sqrt();
        let c_in = s2.sqrt().reciprocal();
        let c_noise = (sigma.log() / 4.0).flatten(0, -1);
        let c_noise = if c_noise.size()[0] == 1 && n > 1 {
            c_noise.expand([n], false)
        } else {
            c_noise
        };
        let labels = match (self.config.label_dim(), class_labels) {
            (0, _) => None,
            (d, None) => Some(Tensor::zeros([1, d], (Kind::Float, x.device()))),
            (d, Some(l)) => Some(l.to_kind(Kind::Float).reshape([-1, d])),
        };
        Precond {
            x,
            c_skip,
            c_out,
            c_in,
            c_noise,
            labels,
        }
    }

    /// The encoder's bottleneck features for input x at noise level sigma (EDM's input scaling),
    /// for the U-Nets (DDPM++/NCSN++ and ADM); None for the MLP.
    pub fn bottleneck(&self, x: &Tensor, sigma: &Tensor, class_labels: Option<&Tensor>, train: bool) -> Option<Tensor> {
        let p = self.precondition(x, sigma, class_labels);
        let x_in = &p.c_in * &p.x;
        match &self.net {
            UNet::Song(net) => Some(net.bottleneck(&x_in, &p.c_noise, p.labels.as_ref(), train)),
            UNet::Dhariwal(net) => Some(net.bottleneck(&x_in, &p.c_noise, p.labels.as_ref(), train)),
            UNet::Mlp(_) => None,
        }
    }

    /// Channels of [`Self::bottleneck`], for networks that have one.
    pub fn bottleneck_channels(&self) -> Option<i64> {
        match &self.net {
            UNet::Song(n) => Some(n.bottleneck_channels()),
            UNet::Dhariwal(n) => Some(n.bottleneck_channels()),
            UNet::Mlp(_) => None,
        }
    }

    /// A trainable copy (same config, same weights) on the same device.
    pub fn duplicate(&self) -> Result<Denoiser> {
        let mut d = Denoiser::new(&self.config, self.device());
        d.copy_from(self)?;
        Ok(d)
    }

    /// Copies every parameter from `other` (same config).
    pub fn copy_from(&mut self, other: &Denoiser) -> Result<()> {
        self.vs.copy(&other.vs)?;
        Ok(())
    }
}
