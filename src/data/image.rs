//! Decoding user image files (PNG, JPEG) with bounded memory: a small file that declares a huge
//! canvas is refused from its header, before any pixel is decoded. JPEGs go through
//! libjpeg-turbo's decoder (`super::jpeg`), everything else through the `image` crate.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;

/// Decoder limits: at most `max_side` pixels a side, at most 1 GiB of decoder memory.
fn limits(max_side: u32) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(1 << 30);
    limits
}

/// Decodes image bytes (format guessed from the content) to 8-bit RGB.
pub fn decode_rgb_bytes(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    if super::jpeg::is_jpeg(bytes) {
        return super::jpeg::decode_rgb(bytes, max_side);
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    reader.limits(limits(max_side));
    Ok(reader.decode()?.to_rgb8())
}

/// Decodes the regular file at `path` to 8-bit RGB.
pub fn decode_rgb(path: &Path, max_side: u32) -> Result<RgbImage> {
    super::file::check_regular(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb_bytes(&bytes, max_side).with_context(|| {
        format!(
            "cannot decode image {} (at most {max_side} pixels a side: `max_side`)",
            path.display()
        )
    })
}

/// The largest centred square of `img`.
pub fn center_square(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    image::imageops::crop_imm(img, (w - s) / 2, (h - s) / 2, s, s).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_within_limits_and_refuses_larger_canvases() {
        let bytes = png(40, 30);
        let img = decode_rgb_bytes(&bytes, 64).unwrap();
        assert_eq!(img.dimensions(), (40, 30));
        assert_eq!(img.get_pixel(5, 9).0, [5, 9, 7]);
        assert!(decode_rgb_bytes(&bytes, 32).is_err());
    }

    #[test]
    fn center_square_keeps_the_middle() {
        let img = RgbImage::from_fn(10, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let sq = center_square(&img);
        assert_eq!(sq.dimensions(), (4, 4));
        assert_eq!(sq.get_pixel(0, 0).0, [3, 0, 0]);
    }
}
