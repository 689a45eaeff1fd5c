//! Decoding user image files (PNG, JPEG) to 8-bit RGB with bounded memory: a small file that
//! declares a huge canvas is refused from its header, before any pixel is decoded. JPEGs go
//! through libjpeg-turbo's decoder (`super::jpeg`), PNGs through the `png` crate with the
//! conversions Pillow's `convert("RGB")` makes (palette expanded, 16-bit to its high byte, grey
//! repeated, alpha dropped); and PNG writing for pictures.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result, bail};

pub use super::rgb::{RgbImage, check_side};

/// Decoders may allocate at most this much.
const MAX_DECODER_BYTES: usize = 1 << 30;

/// 8-bit samples of `channels` per pixel to RGB (grey repeated, alpha dropped).
fn to_rgb(samples: &[u8], channels: usize) -> Vec<u8> {
    match channels {
        3 => samples.to_vec(),
        4 => samples.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        _ => samples.chunks_exact(channels).flat_map(|p| [p[0], p[0], p[0]]).collect(),
    }
}

fn decode_png(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    let limits = png::Limits { bytes: MAX_DECODER_BYTES };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().context("not a readable PNG")?;
    let (width, height) = (reader.info().width, reader.info().height);
    check_side(width, height, max_side)?;
    let size = reader
        .output_buffer_size()
        .context("the PNG's canvas exceeds the decoder's memory limit")?;
    if size > MAX_DECODER_BYTES {
        bail!("the PNG's canvas needs {size} bytes, over the decoder's memory limit of 1 GiB");
    }
    let mut buffer = vec![0; size];
    let frame = reader.next_frame(&mut buffer).context("not a readable PNG")?;
    let channels = frame.color_type.samples();
    let samples = &buffer[..frame.width as usize * frame.height as usize * channels];
    RgbImage::from_raw(width, height, to_rgb(samples, channels)).context("the PNG's frame does not match its header")
}

/// Decodes image bytes (PNG or JPEG, told apart by their signature) to 8-bit RGB.
pub fn decode_rgb_bytes(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    if super::jpeg::is_jpeg(bytes) {
        return super::jpeg::decode_rgb(bytes, max_side);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return decode_png(bytes, max_side);
    }
    bail!("neither a PNG nor a JPEG file")
}

/// Decodes the regular file at `path` to 8-bit RGB.
pub fn decode_rgb(path: &Path, max_side: u32) -> Result<RgbImage> {
    super::file::check_regular(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb_bytes(&bytes, max_side).with_context(|| format!("cannot decode image {}", path.display()))
}

/// The largest centred square of `img`, cut where EDM's dataset tool cuts it.
pub fn center_square(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.dimensions().0 as usize, img.dimensions().1 as usize);
    let s = w.min(h);
    let (x0, y0) = ((w - s) / 2, (h - s) / 2);
    let mut pixels = Vec::with_capacity(s * s * 3);
    for row in img.as_raw().chunks_exact(w * 3).skip(y0).take(s) {
        pixels.extend_from_slice(&row[x0 * 3..(x0 + s) * 3]);
    }
    RgbImage::from_raw(s as u32, s as u32, pixels).expect("a square of the image's own rows")
}

/// Writes packed RGB as an 8-bit PNG.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().with_context(|| format!("writing {}", path.display()))?;
    writer
        .write_image_data(rgb)
        .with_context(|| format!("writing {}", path.display()))?;
    writer.finish().with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(depth);
        e.write_header().unwrap().write_image_data(data).unwrap();
        out
    }

    #[test]
    fn decodes_within_limits_and_refuses_larger_canvases() {
        let rgb: Vec<u8> = (0..30).flat_map(|y| (0..40).flat_map(move |x| [x as u8, y as u8, 7])).collect();
        let bytes = png_bytes(40, 30, png::ColorType::Rgb, png::BitDepth::Eight, &rgb);
        let img = decode_rgb_bytes(&bytes, 64).unwrap();
        assert_eq!(img.dimensions(), (40, 30));
        assert_eq!(img.pixel(5, 9), [5, 9, 7]);
        let e = decode_rgb_bytes(&bytes, 32).unwrap_err();
        assert!(format!("{e:#}").contains("40x30"), "{e:#}");
    }

    #[test]
    fn grey_alpha_and_sixteen_bit_become_rgb_as_pillow_converts_them() {
        let grey = decode_rgb_bytes(&png_bytes(2, 1, png::ColorType::Grayscale, png::BitDepth::Eight, &[9, 200]), 8).unwrap();
        assert_eq!(grey.as_raw(), [9, 9, 9, 200, 200, 200]);
        let rgba = decode_rgb_bytes(&png_bytes(1, 1, png::ColorType::Rgba, png::BitDepth::Eight, &[1, 2, 3, 4]), 8).unwrap();
        assert_eq!(rgba.as_raw(), [1, 2, 3]);
        // 16-bit samples keep their high byte (Pillow's RGB;16B raw mode).
        let deep = decode_rgb_bytes(
            &png_bytes(1, 1, png::ColorType::Rgb, png::BitDepth::Sixteen, &[0x12, 0xff, 0xab, 0x01, 0, 0]),
            8,
        )
        .unwrap();
        assert_eq!(deep.as_raw(), [0x12, 0xab, 0]);
        assert!(decode_rgb_bytes(b"GIF89a", 8).is_err());
    }

    #[test]
    fn center_square_keeps_the_middle() {
        let rgb: Vec<u8> = (0..4).flat_map(|y| (0..10).flat_map(move |x| [x as u8, y as u8, 0])).collect();
        let sq = center_square(&RgbImage::from_raw(10, 4, rgb).unwrap());
        assert_eq!(sq.dimensions(), (4, 4));
        assert_eq!(sq.pixel(0, 0), [3, 0, 0]);
        assert_eq!(sq.pixel(3, 3), [6, 3, 0]);
    }
}
