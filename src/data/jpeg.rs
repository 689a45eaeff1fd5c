//! JPEG decoding with libjpeg-turbo's decoder (the `mozjpeg` crate builds that decoder from
//! source, no toolkit needed) at its defaults, accurate integer IDCT and fancy chroma
//! upsampling: the decoder and settings Pillow uses, so pixels equal what EDM's dataset tool
//! read through PIL, bit for bit. The `image` crate's decoder (zune-jpeg) differs from it by up to
//! 13 levels on 4:2:0 files, which is why JPEGs do not go through it.

use std::panic::{AssertUnwindSafe, catch_unwind};

use anyhow::{Result, anyhow, bail};
use mozjpeg::{ColorSpace, Decompress};

use super::rgb::{RgbImage, check_side};
use mozjpeg_sys::{J_COLOR_SPACE, JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

/// Whether `bytes` start like a JPEG file (SOI followed by a marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn message(cinfo: &mut jpeg_common_struct) -> String {
    type FormatInto = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]);
    // SAFETY: libjpeg calls the error manager with `err` set to the manager it was given.
    let format = unsafe { (*cinfo.err).format_message };
    let mut buffer = [0u8; 80];
    if let Some(format) = format {
        // SAFETY: format_message writes at most 80 bytes (JMSG_LENGTH_MAX) into its buffer; the
        // binding declares that buffer shared, the C side writes it, hence the cast.
        let format: FormatInto = unsafe { std::mem::transmute(format) };
        unsafe { format(cinfo, &mut buffer) };
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

extern "C-unwind" fn fail(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(message(cinfo)));
}

/// Warnings are ignored as Pillow ignores them ("extraneous bytes before marker" is common in
/// real photo collections), except a premature end of data: Pillow refuses truncated files.
extern "C-unwind" fn warn(cinfo: &mut jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: as in `message`.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == JWRN_JPEG_EOF {
        std::panic::resume_unwind(Box::new("the file is truncated (premature end of JPEG data)".to_string()));
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of the zeroed struct.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(fail);
    err.emit_message = Some(warn);
    err
}

/// Pillow's CMYK to RGB conversion of an Adobe (inverted) CMYK JPEG, which is how
/// `Image.open(f).convert("RGB")` sees one.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mul_div_255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| 255 - i32::from(v));
        let nk = 255 - k;
        rgb.extend([c, m, y].map(|v| (nk - mul_div_255(v, nk)).clamp(0, 255) as u8));
    }
    rgb
}

fn decode_unchecked(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    let dec = Decompress::with_err(error_manager()).from_mem(bytes)?;
    let (w, h) = dec.size();
    check_side(w as u32, h as u32, max_side)?;
    let cmyk = matches!(dec.color_space(), J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK);
    let target: ColorSpace = if cmyk { J_COLOR_SPACE::JCS_CMYK } else { J_COLOR_SPACE::JCS_RGB };
    let mut started = dec.to_colorspace(target)?;
    let pixels = started.read_scanlines::<u8>()?;
    started.finish()?;
    let rgb = if cmyk { cmyk_to_rgb(&pixels) } else { pixels };
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| anyhow!("libjpeg returned fewer rows than the header declares"))
}

/// Decodes JPEG bytes to 8-bit RGB (grey repeated, CMYK converted as Pillow converts it),
/// refusing images larger than `max_side` a side from their header.
pub fn decode_rgb(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    match catch_unwind(AssertUnwindSafe(|| decode_unchecked(bytes, max_side))) {
        Ok(result) => result,
        Err(payload) => {
            let why = payload.downcast_ref::<String>().cloned().unwrap_or_else(|| "libjpeg failed".into());
            bail!("not a readable JPEG: {why}")
        }
    }
}
