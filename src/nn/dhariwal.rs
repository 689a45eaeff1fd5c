//! ADM (EDM's DhariwalUNet, the ImageNet-64 model), with EDM's parameter names.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::DhariwalUNetConfig;
use super::layers::{Conv2d, ConvSpec, GroupNorm, Init, InitMode, Linear, network_layout, positional_embedding};
use super::unet_block::{BlockConfig, UNetBlock};

enum Layer {
    Conv(Conv2d),
    Block(UNetBlock),
}

pub struct DhariwalUNet {
    model_channels: i64,
    map_augment: Option<Linear>,
    map_layer0: Linear,
    map_layer1: Linear,
    map_label: Option<Linear>,
    enc: Vec<Layer>,
    dec: Vec<UNetBlock>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    label_dropout: f64,
    /// Activations channels-last on CUDA (the config's `fused_kernels`).
    channels_last: bool,
}

impl DhariwalUNet {
    pub fn new(p: &Path, c: &DhariwalUNetConfig) -> Self {
        let emb_channels = c.model_channels * c.channel_mult_emb;
        let third = (1.0f64 / 3.0).sqrt();
        let init = Init::new(InitMode::KaimingUniform, third, third);
        let init_zero = Init::new(InitMode::KaimingUniform, 0.0, 0.0);
        let bk = BlockConfig {
            emb_channels,
            num_heads: None,
            channels_per_head: 64,
            dropout: c.dropout,
            skip_scale: 1.0,
            eps: 1e-5,
            norm: c.norm_mode(),
            resample_filter: &[1.0, 1.0],
            resample_proj: false,
            adaptive_scale: true,
            init,
            init_zero,
            init_attn: init,
        };
        let map_augment = (c.augment_dim > 0).then(|| Linear::new(&(p / "map_augment"), c.augment_dim, c.model_channels, false, init_zero));
        let map_layer0 = Linear::new(&(p / "map_layer0"), c.model_channels, emb_channels, true, init);
        let map_layer1 = Linear::new(&(p / "map_layer1"), emb_channels, emb_channels, true, init);
        let map_label = (c.label_dim > 0).then(|| {
            Linear::new(
                &(p / "map_label"),
                c.label_dim,
                emb_channels,
                false,
                Init::new(InitMode::KaimingNormal, (c.label_dim as f64).sqrt(), 0.0),
            )
        });
        let (enc, skips, cout) = Self::encoder(&(p / "enc"), c, &bk, init);
        let (dec, cout) = Self::decoder(&(p / "dec"), c, &bk, skips, cout);
        let out_norm = GroupNorm::new(&(p / "out_norm"), cout, 1e-5, c.norm_mode());
        let out_conv = Conv2d::new(&(p / "out_conv"), cout, c.img_channels, ConvSpec::default(), init_zero);
        DhariwalUNet {
            model_channels: c.model_channels,
            map_augment,
            map_layer0,
            map_layer1,
            map_label,
            enc,
            dec,
            out_norm,
            out_conv,
            label_dropout: c.label_dropout,
            channels_last: c.fused_kernels,
        }
    }

    /// The encoder: its layers, the channels of each skip connection, and its output channels.
    fn encoder(pe: &Path, c: &DhariwalUNetConfig, bk: &BlockConfig, init: Init) -> (Vec<Layer>, Vec<i64>, i64) {
        let mut enc = Vec::new();
        let mut skips = Vec::new();
        let mut cout = c.img_channels;
        for (level, &mult) in c.channel_mult.iter().enumerate() {
            let res = c.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = c.model_channels * mult;
                enc.push(Layer::Conv(Conv2d::new(
                    &(pe / format!("{res}x{res}_conv")),
                    cin,
                    cout,
                    ConvSpec::default(),
                    init,
                )));
            } else {
                enc.push(Layer::Block(UNetBlock::new(
                    &(pe / format!("{res}x{res}_down")),
                    cout,
                    cout,
                    false,
                    true,
                    false,
                    bk,
                )));
            }
            skips.push(cout);
            for idx in 0..c.num_blocks {
                let cin = cout;
                cout = c.model_channels * mult;
                let attn = c.attn_resolutions.contains(&res);
                enc.push(Layer::Block(UNetBlock::new(
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

    /// The decoder, consuming the encoder's skips, and its output channels.
    fn decoder(pd: &Path, c: &DhariwalUNetConfig, bk: &BlockConfig, mut skips: Vec<i64>, mut cout: i64) -> (Vec<UNetBlock>, i64) {
        let mut dec = Vec::new();
        let levels = c.channel_mult.len();
        for (level, &mult) in c.channel_mult.iter().enumerate().rev() {
            let res = c.img_resolution >> level;
            if level == levels - 1 {
                dec.push(UNetBlock::new(
                    &(pd / format!("{res}x{res}_in0")),
                    cout,
                    cout,
                    false,
                    false,
                    true,
                    bk,
                ));
                dec.push(UNetBlock::new(
                    &(pd / format!("{res}x{res}_in1")),
                    cout,
                    cout,
                    false,
                    false,
                    false,
                    bk,
                ));
            } else {
                dec.push(UNetBlock::new(
                    &(pd / format!("{res}x{res}_up")),
                    cout,
                    cout,
                    true,
                    false,
                    false,
                    bk,
                ));
            }
            for idx in 0..=c.num_blocks {
                let cin = cout + skips.pop().expect("one skip per encoder layer");
                cout = c.model_channels * mult;
                let attn = c.attn_resolutions.contains(&res);
                dec.push(UNetBlock::new(
                    &(pd / format!("{res}x{res}_block{idx}")),
                    cin,
                    cout,
                    false,
                    false,
                    attn,
                    bk,
                ));
            }
        }
        (dec, cout)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        noise_labels: &Tensor,
        class_labels: Option<&Tensor>,
        augment_labels: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (emb, mut x, mut skips) = self.encode(x, noise_labels, class_labels, augment_labels, train);
        for b in &self.dec {
            if x.size()[1] != b.in_channels {
                x = b.join_skip(&x, &skips.pop().expect("skip available"));
            }
            x = b.forward(&x, &emb, train);
        }
        // Callers get the usual contiguous NCHW tensor back (a pass over 3 channels).
        self.out_conv.forward(&self.out_norm.forward_act(&x, None, true)).contiguous()
    }

    /// The encoder's last feature map (ImageNet-64's ADM: 768 channels at 8x8), where DMD2
    /// attaches its GAN classifier.
    pub fn bottleneck(&self, x: &Tensor, noise_labels: &Tensor, class_labels: Option<&Tensor>, train: bool) -> Tensor {
        self.encode(x, noise_labels, class_labels, None, train).1
    }

    /// Channels of [`Self::bottleneck`].
    pub fn bottleneck_channels(&self) -> i64 {
        self.enc
            .iter()
            .rev()
            .map(|l| match l {
                Layer::Conv(c) => c.out_channels,
                Layer::Block(b) => b.out_channels,
            })
            .next()
            .unwrap_or(self.model_channels)
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
        let mut emb = positional_embedding(noise_labels, self.model_channels, 10000.0, false);
        if let (Some(m), Some(a)) = (&self.map_augment, augment_labels) {
            emb = emb + m.forward(a);
        }
        emb = self.map_layer1.forward(&self.map_layer0.forward(&emb).silu());
        if let (Some(m), Some(labels)) = (&self.map_label, class_labels) {
            let mut labels = labels.shallow_clone();
            if train && self.label_dropout > 0.0 {
                let n = labels.size()[0];
                let keep = Tensor::rand([n, 1], (Kind::Float, labels.device()))
                    .ge(self.label_dropout)
                    .to_kind(labels.kind());
                labels = labels * keep;
            }
            emb = emb + m.forward(&labels);
        }
        let emb = emb.silu();
        let mut skips = Vec::new();
        let mut x = network_layout(x, self.channels_last);
        for layer in &self.enc {
            x = match layer {
                Layer::Conv(c) => c.forward(&x),
                Layer::Block(b) => b.forward(&x, &emb, train),
            };
            skips.push(x.shallow_clone());
        }
        (emb, x, skips)
    }
}
