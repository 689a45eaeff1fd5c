//! The networks of a `dmd` stage, all from its teacher stage.

use anyhow::Result;
use tch::Device;

use super::DmdParams;
use crate::nn::{Denoiser, NetworkConfig};
use crate::stages::StageContext;

/// The teacher (frozen), and the generator, fake score and EMA initialised from it.
pub struct Networks {
    pub teacher: Denoiser,
    pub generator: Denoiser,
    pub fake: Denoiser,
    pub ema: Option<Denoiser>,
}

pub fn networks(p: &DmdParams, ctx: &StageContext, device: Device) -> Result<Networks> {
    let teacher = crate::nn::load_denoiser_dir(ctx.upstream_dir("teacher")?, device)?;
    for (_, v) in teacher.vs.variables() {
        let _ = v.set_requires_grad(false);
    }
    let mut config = teacher.config.clone();
    config.set_dropout(0.0);
    let init = |c: &NetworkConfig| -> Result<Denoiser> {
        let mut d = Denoiser::new(c, device);
        d.copy_from(&teacher)?;
        Ok(d)
    };
    let generator = init(&config)?;
    let fake = init(&config)?;
    let ema = p.train.ema_halflife_images.map(|_| init(&config)).transpose()?;
    Ok(Networks {
        teacher,
        generator,
        fake,
        ema,
    })
}
