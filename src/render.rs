//! Pictures: a small RGB canvas for scatter plots and image grids, saved as PNG.

use std::path::Path;

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
        crate::data::image::write_png(path, self.width, self.height, &self.pixels)
    }
}

/// A 5x7 bitmap font (rows top to bottom, bit 4 = leftmost column) for labels: lowercase
/// letters (uppercase is drawn as lowercase), digits and a little punctuation.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '-' => [0, 0, 0, 14, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        _ => [0; 7],
    }
}

impl Canvas {
    /// Draws `text` with its top-left corner at (x, y), each font pixel `scale` x `scale`.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (1 << (4 - col)) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(x + (i as i64 * 6 + col) * scale + dx, y + r as i64 * scale + dy, color);
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            self.set(x, y, color);
        }
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 6 * scale
}

/// A grid of uint8 RGB images (NHWC, `rows * cols` of them, row-major), each row optionally
/// labelled at its left.
pub fn image_grid(images: &[u8], h: usize, w: usize, rows: usize, cols: usize, labels: Option<&[String]>) -> Canvas {
    let pad = 2usize;
    let scale = if h >= 28 { 2 } else { 1 };
    let label_w = labels
        .map(|l| l.iter().map(|s| text_width(s, scale)).max().unwrap_or(0) as usize + 8)
        .unwrap_or(0);
    let width = label_w + cols * (w + pad) + pad;
    let height = rows * (h + pad) + pad;
    let mut canvas = Canvas::new(width as u32, height as u32, [255, 255, 255]);
    for r in 0..rows {
        let y = pad + r * (h + pad);
        if let Some(l) = labels.and_then(|l| l.get(r)) {
            canvas.text(4, (y + h / 2) as i64 - 3 * scale, l, scale, [0, 0, 0]);
        }
        for c in 0..cols {
            let i = r * cols + c;
            let x = label_w + pad + c * (w + pad);
            canvas.blit(x as u32, y as u32, w as u32, h as u32, &images[i * h * w * 3..(i + 1) * h * w * 3]);
        }
    }
    canvas
}

/// A line plot of one or more series (x, y), with a log-scaled y axis when `log_y`.
pub fn line_plot(title: &str, series: &[(&str, Vec<(f64, f64)>)], log_y: bool) -> Canvas {
    let (w, h, m) = (640i64, 400i64, 50i64);
    let mut c = Canvas::new(w as u32, h as u32, [255, 255, 255]);
    let ty = |v: f64| if log_y { v.max(1e-12).log10() } else { v };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|&(x, y)| (x, ty(y))))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xs, ys) = ((x1 - x0).max(1e-12), (y1 - y0).max(1e-12));
    let px = |x: f64| m + ((x - x0) / xs * (w - 2 * m) as f64) as i64;
    let py = |y: f64| h - m - ((y - y0) / ys * (h - 2 * m) as f64) as i64;
    c.line(m, h - m, w - m, h - m, [0, 0, 0]);
    c.line(m, m, m, h - m, [0, 0, 0]);
    c.text(m, 10, title, 2, [0, 0, 0]);
    let fmt = |v: f64| {
        if log_y {
            format!("{:.3}", 10f64.powf(v))
        } else {
            format!("{v:.3}")
        }
    };
    c.text(4, m - 12, &fmt(y1), 1, [0, 0, 0]);
    c.text(4, h - m + 4, &fmt(y0), 1, [0, 0, 0]);
    c.text(
        w - m - text_width(&format!("{x1:.0}"), 1),
        h - m + 6,
        &format!("{x1:.0}"),
        1,
        [0, 0, 0],
    );
    let colors = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]];
    for (i, (name, s)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in s {
            let y = ty(y);
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let p = (px(x), py(y));
            if let Some(q) = prev {
                c.line(q.0, q.1, p.0, p.1, color);
            }
            prev = Some(p);
        }
        c.text(w - m - 150, m + 14 * i as i64, name, 1, color);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_images_and_labels() {
        let img = vec![200u8; 4 * 4 * 3 * 4];
        let g = image_grid(&img, 4, 4, 2, 2, Some(&["ab".to_string(), "c".to_string()]));
        let label_w = text_width("ab", 1) as u32 + 8;
        assert_eq!(g.width, label_w + 2 * 6 + 2);
        let at = |x: u32, y: u32| g.pixels[((y * g.width + x) * 3) as usize];
        assert_eq!(at(label_w + 2, 2), 200, "first image's corner");
        assert_eq!(at(label_w, 2), 255, "padding stays white");
        let dark = (0..g.height)
            .flat_map(|y| (0..label_w).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y) == 0)
            .count();
        assert!(dark > 10, "labels are drawn");
    }
}
