//! Pictures: a small RGB canvas for scatter plots and image grids, saved as PNG.

use std::path::Path;

use anyhow::Context;

pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: u32, height: u32, background: [u8; 3]) -> Self {
        let pixels = background.iter().copied().cycle().take((width * height * 3) as usize).collect();
        Canvas { width, height, pixels }
    }

    pub fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < self.width && (y as u32) < self.height {
            let i = ((y as u32 * self.width + x as u32) * 3) as usize;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// A 3x3 dot at data coordinates (x, y) mapped from the box [lo, hi] with a 5% margin.
    pub fn dot(&mut self, x: f32, y: f32, lo: [f32; 2], hi: [f32; 2], color: [u8; 3]) {
        if !(x.is_finite() && y.is_finite()) {
            return;
        }
        let span = |d: usize| (hi[d] - lo[d]).max(1e-6) * 1.1;
        let fx = (x - lo[0] + 0.05 * span(0) / 1.1) / span(0);
        let fy = (y - lo[1] + 0.05 * span(1) / 1.1) / span(1);
        let px = (fx * (self.width - 1) as f32).round() as i64;
        let py = ((1.0 - fy) * (self.height - 1) as f32).round() as i64;
        for dy in -1..=1 {
            for dx in -1..=1 {
                self.set(px + dx, py + dy, color);
            }
        }
    }

    pub fn frame(&mut self, color: [u8; 3]) {
        let (w, h) = (self.width as i64, self.height as i64);
        for x in 0..w {
            self.set(x, 0, color);
            self.set(x, h - 1, color);
        }
        for y in 0..h {
            self.set(0, y, color);
            self.set(w - 1, y, color);
        }
    }

    /// Copies an RGB image of `w` x `h` with its top-left corner at (x, y).
    pub fn blit(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: &[u8]) {
        for row in 0..h {
            for col in 0..w {
                let s = ((row * w + col) * 3) as usize;
                self.set((x + col) as i64, (y + row) as i64, [rgb[s], rgb[s + 1], rgb[s + 2]]);
            }
        }
    }

    pub fn save_png(&self, path: &Path) -> anyhow::Result<()> {
        image::save_buffer(path, &self.pixels, self.width, self.height, image::ColorType::Rgb8)
            .with_context(|| format!("writing {}", path.display()))
    }
}
