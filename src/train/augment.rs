//! EDM's non-leaking augmentation for teachers trained from scratch (Karras et al. 2022,
//! Appendix F.2): the geometric part of the ADA pipeline (Karras et al. 2020, "Training GANs
//! with limited data"), each transform applied to an image with probability `p` times its
//! multiplier, and the network told what was done through 9 augmentation labels
//! (`augment_dim`), which are zero at sampling time so no augmentation leaks into samples.
//!
//! Order and parameterisation as EDM's pipeline: x-flip, y-flip (pixel blits), then one inverse
//! affine matrix per image composed of isotropic scaling (log2-normal), rotation (uniform
//! angle), anisotropic scaling (log2-normal, in a randomly rotated frame half the time) and
//! fractional translation (normal, relative to the size); executed once: reflect-pad by what the
//! transformed corners need, 2x upsample with the sym6 wavelet low-pass, bilinear resampling,
//! sym6 low-pass 2x downsample. Labels, in order: xflip, yflip, scale, cos(rot)-1, sin(rot),
//! aniso*cos, aniso*sin, tx, ty.

use std::f64::consts::PI;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// PyWavelets' sym6 decomposition low-pass filter (`pywt.Wavelet("sym6").dec_lo`); EDM filters
/// with it rounded to f32.
const SYM6_F64: [f64; 12] = [
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
];
const SYM6: [f32; 12] = {
    let mut taps = [0f32; 12];
    let mut i = 0;
    while i < 12 {
        taps[i] = SYM6_F64[i] as f32;
        i += 1;
    }
    taps
};
const SYM6_PAD: i64 = SYM6.len() as i64 / 4;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentOptions {
    /// Overall probability (EDM: 0.12 on CIFAR-10, 0.15 on AFHQ-64 and FFHQ-64).
    pub p: f64,
    /// Probability multipliers; 0 disables a transform (and its labels). EDM: x-flip 1e8
    /// (every image flipped with probability 1/2), the others 1.
    pub xflip: f64,
    pub yflip: f64,
    pub scale: f64,
    pub rotate_frac: f64,
    pub aniso: f64,
    pub translate_frac: f64,
    /// log2 standard deviation of isotropic scaling.
    pub scale_std: f64,
    /// Range of rotation, 1 = the full circle.
    pub rotate_frac_max: f64,
    /// log2 standard deviation of anisotropic scaling.
    pub aniso_std: f64,
    /// Probability that anisotropic scaling happens in a rotated frame.
    pub aniso_rotate_prob: f64,
    /// Standard deviation of translation, relative to the image size.
    pub translate_frac_std: f64,
}

impl Default for AugmentOptions {
    /// EDM's `train.py --augment=0.12` (its CIFAR-10 setting).
    fn default() -> Self {
        AugmentOptions {
            p: 0.12,
            xflip: 1e8,
            yflip: 1.0,
            scale: 1.0,
            rotate_frac: 1.0,
            aniso: 1.0,
            translate_frac: 1.0,
            scale_std: 0.2,
            rotate_frac_max: 1.0,
            aniso_std: 0.2,
            aniso_rotate_prob: 0.5,
            translate_frac_std: 0.125,
        }
    }
}

impl AugmentOptions {
    /// How many augmentation labels the enabled transforms produce (EDM's setting: 9); the
    /// network's `augment_dim` must equal it.
    pub fn label_dim(&self) -> i64 {
        [
            (self.xflip, 1),
            (self.yflip, 1),
            (self.scale, 1),
            (self.rotate_frac, 2),
            (self.aniso, 2),
            (self.translate_frac, 2),
        ]
        .iter()
        .filter(|(m, _)| *m > 0.0)
        .map(|(_, n)| n)
        .sum()
    }

    fn geometric(&self) -> bool {
        self.scale > 0.0 || self.rotate_frac > 0.0 || self.aniso > 0.0 || self.translate_frac > 0.0
    }

    /// A message naming the first out-of-range value.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.p) {
            return Err(format!("augment.p = {} is outside [0, 1]", self.p));
        }
        let non_negative = [
            ("xflip", self.xflip),
            ("yflip", self.yflip),
            ("scale", self.scale),
            ("rotate_frac", self.rotate_frac),
            ("aniso", self.aniso),
            ("translate_frac", self.translate_frac),
            ("scale_std", self.scale_std),
            ("rotate_frac_max", self.rotate_frac_max),
            ("aniso_std", self.aniso_std),
            ("aniso_rotate_prob", self.aniso_rotate_prob),
            ("translate_frac_std", self.translate_frac_std),
        ];
        match non_negative.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            Some((name, v)) => Err(format!("augment.{name} = {v} must be a finite number >= 0")),
            None => Ok(()),
        }
    }
}

/// The random numbers of one batch of `n` images, each [n] (translation: [2, n]), drawn in
/// EDM's order; `u_*` uniform in [0, 1), `z_*` standard normal, `bit_*` 0 or 1.
pub struct AugmentDraws {
    pub bit_xflip: Tensor,
    pub u_xflip: Tensor,
    pub bit_yflip: Tensor,
    pub u_yflip: Tensor,
    pub z_scale: Tensor,
    pub u_scale: Tensor,
    pub u_rotate_angle: Tensor,
    pub u_rotate: Tensor,
    pub z_aniso: Tensor,
    pub u_aniso_angle: Tensor,
    pub u_aniso: Tensor,
    pub u_aniso_frame: Tensor,
    pub z_translate: Tensor,
    pub u_translate: Tensor,
}

impl AugmentDraws {
    /// Draws from libtorch's generator of `device` (seeded per training step by the caller).
    pub fn draw(n: i64, device: Device) -> Self {
        let f = (Kind::Float, device);
        let u = || Tensor::rand([n], f);
        let z = || Tensor::randn([n], f);
        let bit = || Tensor::randint(2, [n], f);
        AugmentDraws {
            bit_xflip: bit(),
            u_xflip: u(),
            bit_yflip: bit(),
            u_yflip: u(),
            z_scale: z(),
            u_scale: u(),
            u_rotate_angle: u(),
            u_rotate: u(),
            z_aniso: z(),
            u_aniso_angle: u(),
            u_aniso: u(),
            u_aniso_frame: u(),
            z_translate: Tensor::randn([2, n], f),
            u_translate: u(),
        }
    }
}

/// 1 where `u < probability`, else 0 (f32).
fn chosen(u: &Tensor, probability: f64) -> Tensor {
    u.lt(probability).to_kind(Kind::Float)
}

/// [n, 3, 3] affine matrices [[a, b, c], [d, e, f], [0, 0, 1]] from six [n] entries.
fn affine(e: [&Tensor; 6]) -> Tensor {
    let n = e[0].size()[0];
    let (o, l) = (e[0].zeros_like(), e[0].ones_like());
    Tensor::stack(&[e[0], e[1], e[2], e[3], e[4], e[5], &o, &o, &l], 1).reshape([n, 3, 3])
}

fn rotation(theta: &Tensor) -> Tensor {
    let (c, s, o) = (theta.cos(), theta.sin(), theta.zeros_like());
    affine([&c, &(-&s), &o, &s, &c, &o])
}

fn scaling(sx: &Tensor, sy: &Tensor) -> Tensor {
    let o = sx.zeros_like();
    affine([sx, &o, &o, &o, sy, &o])
}

fn translation(tx: &Tensor, ty: &Tensor) -> Tensor {
    let (o, l) = (tx.zeros_like(), tx.ones_like());
    affine([&l, &o, tx, &o, &l, ty])
}

/// One constant 3x3 matrix for every image.
fn constant(n: i64, like: (Kind, Device), rows: [[f64; 3]; 3]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .to_kind(like.0)
        .to_device(like.1)
        .reshape([1, 3, 3])
        .expand([n, 3, 3], false)
}

/// Flips the images where `w` (one 0/1 per image) is 1 along `dim`.
fn flip_where(images: &Tensor, w: &Tensor, dim: i64) -> Tensor {
    let w4 = w.reshape([-1, 1, 1, 1]).eq(1.0);
    images.flip([dim]).where_self(&w4, images)
}

/// The inverse geometric transform of every image ([n, 3, 3], pixel units, origin at the
/// centre), pushing its labels.
fn inverse_transform(o: &AugmentOptions, d: &AugmentDraws, size: [i64; 3], like: (Kind, Device), labels: &mut Vec<Tensor>) -> Tensor {
    let [n, height, width] = size;
    let mut g = constant(n, like, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    if o.scale > 0.0 {
        let w = &d.z_scale * chosen(&d.u_scale, o.scale * o.p);
        let s = (&w * o.scale_std).exp2();
        g = g.matmul(&scaling(&s.reciprocal(), &s.reciprocal()));
        labels.push(w);
    }
    if o.rotate_frac > 0.0 {
        let w = (&d.u_rotate_angle * 2.0 - 1.0) * (PI * o.rotate_frac_max) * chosen(&d.u_rotate, o.rotate_frac * o.p);
        g = g.matmul(&rotation(&w));
        labels.push(w.cos() - 1.0);
        labels.push(w.sin());
    }
    if o.aniso > 0.0 {
        let w = &d.z_aniso * chosen(&d.u_aniso, o.aniso * o.p);
        let r = (&d.u_aniso_angle * 2.0 - 1.0) * PI * chosen(&d.u_aniso_frame, o.aniso_rotate_prob);
        let s = (&w * o.aniso_std).exp2();
        g = g
            .matmul(&rotation(&(-&r)))
            .matmul(&scaling(&s.reciprocal(), &s))
            .matmul(&rotation(&r));
        labels.push(&w * r.cos());
        labels.push(&w * r.sin());
    }
    if o.translate_frac > 0.0 {
        let w = &d.z_translate * chosen(&d.u_translate, o.translate_frac * o.p).unsqueeze(0);
        let (wx, wy) = (w.get(0), w.get(1));
        let tx = &wx * (width as f64 * o.translate_frac_std);
        let ty = &wy * (height as f64 * o.translate_frac_std);
        g = g.matmul(&translation(&(-tx), &(-ty)));
        labels.push(wx);
        labels.push(wy);
    }
    g
}

/// The reflect padding [left, right, top, bottom] that covers every transformed corner plus the
/// filter's reach (one host read per batch).
fn margins(g: &Tensor, height: i64, width: i64) -> [i64; 4] {
    let (cx, cy) = ((width - 1) as f64 / 2.0, (height - 1) as f64 / 2.0);
    let corners: Vec<f64> = [[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]]
        .iter()
        .flatten()
        .copied()
        .collect();
    let corners = Tensor::from_slice(&corners).to_kind(g.kind()).to_device(g.device()).reshape([4, 3]);
    let moved = g.matmul(&corners.tr()).narrow(1, 0, 2).permute([1, 0, 2]).flatten(1, -1);
    // Summed in the images' precision, as the transform itself.
    let pad = (2 * SYM6_PAD) as f64;
    let base = Tensor::from_slice(&[pad - cx, pad - cy, pad - cx, pad - cy])
        .to_kind(g.kind())
        .to_device(g.device());
    let reach = Tensor::cat(&[-&moved, moved], 0).amax([1], false) + base;
    let reach: Vec<f64> = reach.to_kind(Kind::Double).to_device(Device::Cpu).try_into().expect("four margins");
    let limit = [width - 1, height - 1, width - 1, height - 1];
    let m: Vec<i64> = (0..4).map(|i| reach[i].max(0.0).min(limit[i] as f64).ceil() as i64).collect();
    [m[0], m[2], m[1], m[3]]
}

/// Depthwise 1-D filtering with `taps` along width (`horizontal`) or height.
fn filter_1d(x: &Tensor, taps: &[f32], horizontal: bool, stride: i64, padding: i64) -> Tensor {
    let c = x.size()[1];
    let k = taps.len() as i64;
    let shape = if horizontal { [c, 1, 1, k] } else { [c, 1, k, 1] };
    let weight = Tensor::from_slice(taps)
        .to_device(x.device())
        .to_kind(x.kind())
        .reshape([1, 1, k])
        .repeat([c, 1, 1])
        .reshape(shape);
    let (stride, padding) = if horizontal {
        ([1, stride], [0, padding])
    } else {
        ([stride, 1], [padding, 0])
    };
    x.conv2d(&weight, None::<Tensor>, stride, padding, [1, 1], c)
}

/// Inserts a zero after every sample along `dim` (3: width, 2: height), dropping the last one.
fn interleave_zeros(x: &Tensor, dim: i64) -> Tensor {
    let z = Tensor::stack(&[x.shallow_clone(), x.zeros_like()], dim + 1).flatten(dim, dim + 1);
    let len = z.size()[dim as usize];
    z.narrow(dim, 0, len - 1)
}

/// Applies the inverse transforms `g` to the images: pad, 2x upsample, resample, 2x downsample.
fn resample(images: &Tensor, g: Tensor) -> Tensor {
    let (n, height, width) = (images.size()[0], images.size()[2], images.size()[3]);
    let like = (images.kind(), images.device());
    let [l, r, t, b] = margins(&g, height, width);
    let x = images.reflection_pad2d([l, r, t, b]);
    let g = translation(
        &Tensor::full([n], (l - r) as f64 / 2.0, like),
        &Tensor::full([n], (t - b) as f64 / 2.0, like),
    )
    .matmul(&g);
    let reversed: Vec<f32> = SYM6.iter().rev().copied().collect();
    let up_pad = (SYM6.len() as i64 + 1) / 2;
    let x = filter_1d(&interleave_zeros(&x, 3), &reversed, true, 1, up_pad);
    let x = filter_1d(&interleave_zeros(&x, 2), &reversed, false, 1, up_pad);
    let twice = constant(n, like, [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]);
    let half = constant(n, like, [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]);
    let shift = constant(n, like, [[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]]);
    let unshift = constant(n, like, [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]);
    let g = twice.matmul(&g).matmul(&half);
    let g = shift.matmul(&g).matmul(&unshift);
    let (out_h, out_w) = ((height + 2 * SYM6_PAD) * 2, (width + 2 * SYM6_PAD) * 2);
    let (in_h, in_w) = (x.size()[2] as f64, x.size()[3] as f64);
    let to_unit = constant(n, like, [[2.0 / in_w, 0.0, 0.0], [0.0, 2.0 / in_h, 0.0], [0.0, 0.0, 1.0]]);
    let from_unit = constant(
        n,
        like,
        [[out_w as f64 / 2.0, 0.0, 0.0], [0.0, out_h as f64 / 2.0, 0.0], [0.0, 0.0, 1.0]],
    );
    let g = to_unit.matmul(&g).matmul(&from_unit);
    let grid = Tensor::affine_grid_generator(&g.narrow(1, 0, 2), [n, images.size()[1], out_h, out_w], false);
    let x = x.grid_sampler(&grid, 0, 0, false);
    let down_pad = (SYM6.len() as i64 - 1) / 2;
    let x = filter_1d(&x, &SYM6, true, 2, down_pad);
    let x = x.narrow(3, SYM6_PAD, x.size()[3] - 2 * SYM6_PAD);
    let x = filter_1d(&x, &SYM6, false, 2, down_pad);
    x.narrow(2, SYM6_PAD, x.size()[2] - 2 * SYM6_PAD)
}

/// Augments a batch of images ([n, c, h, w], f32) with the given random numbers: the augmented
/// images and their labels [n, label_dim] (f32).
pub fn augment(images: &Tensor, o: &AugmentOptions, d: &AugmentDraws) -> (Tensor, Tensor) {
    let size = images.size();
    let (n, like) = (size[0], (images.kind(), images.device()));
    let mut labels = Vec::new();
    let mut x = images.shallow_clone();
    if o.xflip > 0.0 {
        let w = &d.bit_xflip * chosen(&d.u_xflip, o.xflip * o.p);
        x = flip_where(&x, &w, 3);
        labels.push(w);
    }
    if o.yflip > 0.0 {
        let w = &d.bit_yflip * chosen(&d.u_yflip, o.yflip * o.p);
        x = flip_where(&x, &w, 2);
        labels.push(w);
    }
    if o.geometric() {
        let g = inverse_transform(o, d, [n, size[2], size[3]], like, &mut labels);
        x = resample(&x, g);
    }
    let labels = if labels.is_empty() {
        Tensor::zeros([n, 0], like)
    } else {
        Tensor::stack(&labels, 1)
    };
    let labels = labels.to_kind(Kind::Float);
    (x, labels)
}
