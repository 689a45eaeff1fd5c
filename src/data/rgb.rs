//! The decoded-image type the readers share: packed 8-bit RGB.

use anyhow::{Result, bail};

/// Packed 8-bit RGB, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl RgbImage {
    /// None unless `pixels` holds exactly `width * height * 3` bytes.
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Option<Self> {
        (pixels.len() == width as usize * height as usize * 3).then_some(RgbImage { width, height, pixels })
    }
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }
    pub fn as_raw(&self) -> &[u8] {
        &self.pixels
    }
    pub fn into_raw(self) -> Vec<u8> {
        self.pixels
    }
    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Refuses a canvas larger than `max_side` a side, naming both.
pub fn check_side(width: u32, height: u32, max_side: u32) -> Result<()> {
    if width > max_side || height > max_side {
        bail!("the image is {width}x{height}, over the limit of {max_side} pixels a side (`max_side`)");
    }
    Ok(())
}
