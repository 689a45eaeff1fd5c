//! Lanczos resizing of 8-bit RGB images, bit for bit as Pillow's `Image.resize(..., LANCZOS)`
//! computes it, because EDM's dataset tool (and so every EDM/DMD ImageNet-64 and AFHQ number)
//! prepares its images that way.
//!
//! The method, re-implemented from Pillow's documented behaviour: a separable filter, horizontal
//! pass first into an 8-bit intermediate, then vertical. Each output sample `i` is centred at
//! `(i + 0.5) * scale` in input coordinates, the Lanczos-3 kernel is stretched by `max(scale, 1)`
//! (antialiasing when shrinking), the weights of each output sample are normalised to sum to one
//! in f64 and then rounded half away from zero to fixed point with 22 fractional bits; sums start
//! at one half and are clamped to 0..=255 after an arithmetic shift.

use std::f64::consts::PI;

const SUPPORT: f64 = 3.0;
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

/// The input taps of one output sample: the first input index and one fixed-point weight per tap.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    // Truncation toward zero after adding +-0.5: rounding half away from zero.
    if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 }
}

/// The taps of every output sample when `in_size` samples become `out_size`.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let inv_filter_scale = 1.0 / filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..end)
                .map(|x| lanczos((x as f64 - center + 0.5) * inv_filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw.iter().map(|w| to_fixed(if total != 0.0 { w / total } else { *w })).collect();
            Taps { first, weights }
        })
        .collect()
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One filtered output value from `len` samples `stride` bytes apart starting at `base`.
fn filtered(src: &[u8], base: usize, stride: usize, t: &Taps) -> u8 {
    let mut sum = 1i32 << (PRECISION_BITS - 1);
    for (k, w) in t.weights.iter().enumerate() {
        sum += i32::from(src[base + (t.first + k) * stride]) * w;
    }
    clip8(sum)
}

fn resize_rows(src: &[u8], width: usize, height: usize, out_width: usize) -> Vec<u8> {
    let taps = taps(width, out_width);
    let mut out = Vec::with_capacity(out_width * height * 3);
    for y in 0..height {
        for t in &taps {
            for c in 0..3 {
                out.push(filtered(src, y * width * 3 + c, 3, t));
            }
        }
    }
    out
}

fn resize_columns(src: &[u8], width: usize, height: usize, out_height: usize) -> Vec<u8> {
    let taps = taps(height, out_height);
    let mut out = Vec::with_capacity(width * out_height * 3);
    for t in &taps {
        for x in 0..width {
            for c in 0..3 {
                out.push(filtered(src, x * 3 + c, width * 3, t));
            }
        }
    }
    out
}

/// Resizes packed RGB (`width * height * 3` bytes, rows top to bottom) to `out_width x
/// out_height` with Pillow's Lanczos filter; an unchanged size returns the input.
pub fn lanczos_rgb(src: &[u8], width: usize, height: usize, out_width: usize, out_height: usize) -> Vec<u8> {
    assert_eq!(src.len(), width * height * 3, "packed RGB of the stated size");
    let rows = if out_width != width {
        resize_rows(src, width, height, out_width)
    } else {
        src.to_vec()
    };
    if out_height != height {
        resize_columns(&rows, out_width, height, out_height)
    } else {
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_output_sum_to_about_one() {
        for (n, m) in [(100, 64), (64, 64), (20, 64), (7, 3)] {
            for t in taps(n, m) {
                let s: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64, "{n}->{m}: {s}");
                assert!(t.first + t.weights.len() <= n);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_same_size_is_identity() {
        let flat = vec![77u8; 50 * 30 * 3];
        assert!(lanczos_rgb(&flat, 50, 30, 16, 16).iter().all(|&v| v == 77));
        let ramp: Vec<u8> = (0..8 * 8 * 3).map(|i| (i % 251) as u8).collect();
        assert_eq!(lanczos_rgb(&ramp, 8, 8, 8, 8), ramp);
    }
}
