//! DDPM++ / NCSN++ (EDM's SongUNet), with EDM's module and parameter names.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::{DecoderType, Embedding, EncoderType, SongUNetConfig};
use super::layers::{Conv2d, ConvSpec, GroupNorm, Init, InitMode, Linear, buffer, fourier_embedding, network_layout, positional_embedding};
use super::unet_block::{BlockConfig, UNetBlock};

enum Enc {
    Conv(Conv2d),
    Block(UNetBlock),
    AuxDown(Conv2d),
    AuxSkip(Conv2d),
    AuxResidual(Conv2d),
}

enum Dec {
    Block(UNetBlock),
    AuxUp(Conv2d),
    AuxNorm(GroupNorm),
    AuxConv(Conv2d),
}

pub struct SongUNet {
    embedding: Embedding,
    noise_channels: i64,
    fourier_freqs: Option<Tensor>,
    map_label: Option<Linear>,
    map_augment: Option<Linear>,
    map_layer0: Linear,
    map_layer1: Linear,
    enc: Vec<Enc>,
    dec: Vec<Dec>,
    label_dropout: f64,
    /// Activations channels-last on CUDA (the config's `fused_kernels`).
    channels_last: bool,
}

impl SongUNet {
    pub fn new(p: &Path, c: &SongUNetConfig) -> Self {
        let emb_channels = c.model_channels * c.channel_mult_emb;
        let noise_channels = c.model_channels * c.channel_mult_noise;
        let init = Init::new(InitMode::XavierUniform, 1.0, 0.0);
        let init_zero = Init::new(InitMode::XavierUniform, 1e-5, 0.0);
        let init_attn = Init::new(InitMode::XavierUniform, 0.2f64.sqrt(), 0.0);
        let bk = BlockConfig {
            emb_channels,
            num_heads: Some(1),
            channels_per_head: 64,
            dropout: c.dropout,
            skip_scale: 0.5f64.sqrt(),
            eps: 1e-6,
            norm: c.norm_mode(),
            resample_filter: &c.resample_filter,
            resample_proj: true,
            adaptive_scale: false,
            init,
            init_zero,
            init_attn,
        };
        let fourier_freqs = (c.embedding_type == Embedding::Fourier).then(|| {
            buffer(
                &(p / "map_noise"),
                "freqs",
                &(Tensor::randn([noise_channels / 2], (Kind::Float, p.device())) * 16.0),
            )
        });
        let map_label = (c.label_dim > 0).then(|| Linear::new(&(p / "map_label"), c.label_dim, noise_channels, true, init));
        let map_augment = (c.augment_dim > 0).then(|| Linear::new(&(p / "map_augment"), c.augment_dim, noise_channels, false, init));
        let map_layer0 = Linear::new(&(p / "map_layer0"), noise_channels, emb_channels, true, init);
        let map_layer1 = Linear::new(&(p / "map_layer1"), emb_channels, emb_channels, true, init);

        let (enc, skips, cout) = Self::encoder(&(p / "enc"), c, &bk);
        let dec = Self::decoder(&(p / "dec"), c, &bk, skips, cout);
        SongUNet {
            embedding: c.embedding_type,
            noise_channels,
            fourier_freqs,
            map_label,
            map_augment,
            map_layer0,
            map_layer1,
            enc,
            dec,
            label_dropout: c.label_dropout,
            channels_last: c.fused_kernels,
        }
    }

    /// The encoder: its layers, the channels of each skip connection, and its output channels.
    fn encoder(pe: &Path, c: &SongUNetConfig, bk: &BlockConfig) -> (Vec<Enc>, Vec<i64>, i64) {
        let init = Init::new(InitMode::XavierUniform, 1.0, 0.0);
        let mut enc = Vec::new();
        let mut skips = Vec::new();
        let mut cout = c.img_channels;
        let mut caux = c.img_channels;
        for (level, &mult) in c.channel_mult.iter().enumerate() {
            let res = c.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = c.model_channels;
                enc.push(Enc::Conv(Conv2d::new(
                    &(pe / format!("{res}x{res}_conv")),
                    cin,
                    cout,
                    ConvSpec::default(),
                    init,
                )));
                skips.push(cout);
            } else {
                enc.push(Enc::Block(UNetBlock::new(
                    &(pe / format!("{res}x{res}_down")),
                    cout,
                    cout,
                    false,
                    true,
                    false,
                    bk,
                )));
                skips.push(cout);
                caux = Self::encoder_aux(pe, c, res, caux, cout, &mut enc);
            }
            for idx in 0..c.num_blocks {
                let cin = cout;
                cout = c.model_channels * mult;
                let attn = c.attn_resolutions.contains(&res);
                enc.push(Enc::Block(UNetBlock::new(
                    &(pe / format!("{res}x{res}_block{idx}")),
                    cin,
                    cout,
                    false,
                    false,
                    attn,
                    bk,
                )));
                skips.push(cout);
            }
        }
        (enc, skips, cout)
    }

    /// The encoder's auxiliary path into level `res` (`encoder_type` skip or residual); returns
    /// the auxiliary path's channels after it.
    fn encoder_aux(pe: &Path, c: &SongUNetConfig, res: i64, caux: i64, cout: i64, enc: &mut Vec<Enc>) -> i64 {
        let init = Init::new(InitMode::XavierUniform, 1.0, 0.0);
        let filt = &c.resample_filter;
        let mut caux = caux;
        match c.encoder_type {
            EncoderType::Skip => {
                let down = ConvSpec {
                    kernel: 0,
                    down: true,
                    resample_filter: filt,
                    ..Default::default()
                };
                enc.push(Enc::AuxDown(Conv2d::new(
                    &(pe / format!("{res}x{res}_aux_down")),
                    caux,
                    caux,
                    down,
                    init,
                )));
                let one = ConvSpec {
                    kernel: 1,
                    ..Default::default()
                };
                enc.push(Enc::AuxSkip(Conv2d::new(
                    &(pe / format!("{res}x{res}_aux_skip")),
                    caux,
                    cout,
                    one,
                    init,
                )));
            }
            EncoderType::Residual => {
                let spec = ConvSpec {
                    kernel: 3,
                    down: true,
                    resample_filter: filt,
                    fused_resample: true,
                    ..Default::default()
                };
                enc.push(Enc::AuxResidual(Conv2d::new(
                    &(pe / format!("{res}x{res}_aux_residual")),
                    caux,
                    cout,
                    spec,
                    init,
                )));
                caux = cout;
            }
            EncoderType::Standard => {}
        }
        caux
    }

    /// The decoder, consuming the encoder's skips.
    fn decoder(pd: &Path, c: &SongUNetConfig, bk: &BlockConfig, mut skips: Vec<i64>, mut cout: i64) -> Vec<Dec> {
        let init = Init::new(InitMode::XavierUniform, 1.0, 0.0);
        let init_zero = Init::new(InitMode::XavierUniform, 1e-5, 0.0);
        let filt = &c.resample_filter;
        let mut dec = Vec::new();
        let levels = c.channel_mult.len();
        for (level, &mult) in c.channel_mult.iter().enumerate().rev() {
            let res = c.img_resolution >> level;
            if level == levels - 1 {
                dec.push(Dec::Block(UNetBlock::new(
                    &(pd / format!("{res}x{res}_in0")),
                    cout,
                    cout,
                    false,
                    false,
                    true,
                    bk,
                )));
                dec.push(Dec::Block(UNetBlock::new(
                    &(pd / format!("{res}x{res}_in1")),
                    cout,
                    cout,
                    false,
                    false,
                    false,
                    bk,
                )));
            } else {
                dec.push(Dec::Block(UNetBlock::new(
                    &(pd / format!("{res}x{res}_up")),
                    cout,
                    cout,
                    true,
                    false,
                    false,
                    bk,
                )));
            }
            for idx in 0..=c.num_blocks {
                let cin = cout + skips.pop().expect("one skip per encoder layer");
                cout = c.model_channels * mult;
                let attn = idx == c.num_blocks && c.attn_resolutions.contains(&res);
                dec.push(Dec::Block(UNetBlock::new(
                    &(pd / format!("{res}x{res}_block{idx}")),
                    cin,
                    cout,
                    false,
                    false,
                    attn,
                    bk,
                )));
            }
            if c.decoder_type == DecoderType::Skip || level == 0 {
                if c.decoder_type == DecoderType::Skip && level < levels - 1 {
                    let up = ConvSpec {
                        kernel: 0,
                        up: true,
                        resample_filter: filt,
                        ..Default::default()
                    };
                    dec.push(Dec::AuxUp(Conv2d::new(
                        &(pd / format!("{res}x{res}_aux_up")),
                        c.img_channels,
                        c.img_channels,
                        up,
                        init,
                    )));
                }
                dec.push(Dec::AuxNorm(GroupNorm::new(
                    &(pd / format!("{res}x{res}_aux_norm")),
                    cout,
                    1e-6,
                    c.norm_mode(),
                )));
                dec.push(Dec::AuxConv(Conv2d::new(
                    &(pd / format!("{res}x{res}_aux_conv")),
                    cout,
                    c.img_channels,
                    ConvSpec::default(),
                    init_zero,
                )));
            }
        }
        dec
    }

    pub fn forward(
        &self,
        x: &Tensor,
        noise_labels: &Tensor,
        class_labels: Option<&Tensor>,
        augment_labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (emb, x, skips) = self.encode(x, noise_labels, class_labels, augment_labels, train);
        // Callers get the usual contiguous NCHW tensor back (a pass over 3 channels).
        self.decode(&emb, x, skips, train).contiguous()
    }

    /// The encoder's last feature map (the lowest resolution): DMD2's GAN head reads it.
    pub fn bottleneck(&self, x: &Tensor, noise_labels: &Tensor, class_labels: Option<&Tensor>, train: bool) -> Tensor {
        self.encode(x, noise_labels, class_labels, None, train).1
    }

    /// Channels of [`Self::bottleneck`].
    pub fn bottleneck_channels(&self) -> i64 {
        self.enc
            .iter()
            .rev()
            .find_map(|l| match l {
                Enc::Block(b) => Some(b.out_channels),
                Enc::Conv(c) => Some(c.out_channels),
                _ => None,
            })
            .expect("the encoder has blocks")
    }

    /// Embedding, then the encoder: (embedding, last feature map, skip connections).
    fn encode(
        &self,
        x: &Tensor,
        noise_labels: &Tensor,
        class_labels: Option<&Tensor>,
        augment_labels: Option<&Tensor>,
        train: bool,
    ) -> (Tensor, Tensor, Vec<Tensor>) {
        let emb = match (&self.embedding, &self.fourier_freqs) {
            (Embedding::Fourier, Some(f)) => fourier_embedding(noise_labels, f),
            _ => positional_embedding(noise_labels, self.noise_channels, 10000.0, true),
        };
        // EDM swaps the sin and cos halves.
        let n = emb.size()[0];
        let mut emb = emb.reshape([n, 2, -1]).flip([1]).reshape([n, -1]);
        if let (Some(map_label), Some(labels)) = (&self.map_label, class_labels) {
            let mut labels = labels.shallow_clone();
            if train && self.label_dropout > 0.0 {
                let keep = Tensor::rand([n, 1], (Kind::Float, labels.device()))
                    .ge(self.label_dropout)
                    .to_kind(labels.kind());
                labels = labels * keep;
            }
            emb = emb + map_label.forward(&(labels * (map_label.in_features as f64).sqrt()));
        }
        if let (Some(map_augment), Some(aug)) = (&self.map_augment, augment_labels) {
            emb = emb + map_augment.forward(aug);
        }
        let emb = self.map_layer1.forward(&self.map_layer0.forward(&emb).silu()).silu();

        let mut skips: Vec<Tensor> = Vec::new();
        let mut x = network_layout(x, self.channels_last);
        let mut aux = x.shallow_clone();
        for layer in &self.enc {
            match layer {
                Enc::AuxDown(c) => aux = c.forward(&aux),
                Enc::AuxSkip(c) => {
                    x = &x + c.forward(&aux);
                    *skips.last_mut().expect("a skip exists") = x.shallow_clone();
                }
                Enc::AuxResidual(c) => {
                    x = (&x + c.forward(&aux)) / 2f64.sqrt();
                    aux = x.shallow_clone();
                    *skips.last_mut().expect("a skip exists") = x.shallow_clone();
                }
                Enc::Conv(c) => {
                    x = c.forward(&x);
                    skips.push(x.shallow_clone());
                }
                Enc::Block(b) => {
                    x = b.forward(&x, &emb, train);
                    skips.push(x.shallow_clone());
                }
            }
        }
        (emb, x, skips)
    }

    fn decode(&self, emb: &Tensor, x: Tensor, mut skips: Vec<Tensor>, train: bool) -> Tensor {
        let mut x = x;
        let mut out: Option<Tensor> = None;
        let mut tmp: Option<Tensor> = None;
        for layer in &self.dec {
            match layer {
                Dec::AuxUp(c) => out = out.map(|a| c.forward(&a)),
                Dec::AuxNorm(nrm) => tmp = Some(nrm.forward_act(&x, None, true)),
                Dec::AuxConv(c) => {
                    let t = c.forward(&tmp.take().expect("aux_norm precedes aux_conv"));
                    out = Some(match out {
                        None => t,
                        Some(a) => t + a,
                    });
                }
                Dec::Block(b) => {
                    if x.size()[1] != b.in_channels {
                        x = b.join_skip(&x, &skips.pop().expect("skip available"));
                    }
                    x = b.forward(&x, emb, train);
                }
            }
        }
        out.expect("the decoder ends with an aux_conv")
    }
}
