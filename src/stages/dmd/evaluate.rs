//! The FID-vs-iteration curve of a DMD run: one-step FID of the generator (and of its EMA) on a
//! fixed set of seeds, every `eval.every` iterations, on rank 0.

use anyhow::Result;

use super::DmdEval;
use crate::eval::fid::{FidReference, FidStats};
use crate::eval::inception::Inception;
use crate::nn::Denoiser;
use crate::sample::SamplerConfig;

pub struct FidCurve<'a> {
    eval: Option<(&'a DmdEval, Inception, FidReference)>,
    one_step: SamplerConfig,
    bf16: bool,
    /// (iteration, FID) of the generator, and of its EMA.
    pub raw: Vec<(u64, f64)>,
    pub ema: Vec<(u64, f64)>,
}

impl<'a> FidCurve<'a> {
    /// No curve without `eval`; `reference` is the fid-ref stage's folder.
    pub fn new(
        eval: Option<(&'a DmdEval, &std::path::Path, &std::path::Path)>,
        one_step: SamplerConfig,
        bf16: bool,
        device: tch::Device,
    ) -> Result<Self> {
        let eval = match eval {
            Some((e, inception, reference)) => {
                let stats = FidStats::load_npz(&crate::artifact::fid_stats::stats_path(reference))?;
                Some((e, Inception::load(inception, device)?, FidReference::new(&stats)?))
            }
            None => None,
        };
        Ok(FidCurve {
            eval,
            one_step,
            bf16,
            raw: Vec::new(),
            ema: Vec::new(),
        })
    }

    /// Evaluate every this many iterations (0: never).
    pub fn every(&self) -> u64 {
        self.eval.as_ref().map_or(0, |(e, _, _)| e.every)
    }

    /// Adds the point of iteration `it` (once; on rank 0 only).
    pub fn evaluate(&mut self, it: u64, generator: &Denoiser, ema: Option<&Denoiser>) -> Result<()> {
        let Some((e, net, reference)) = &self.eval else { return Ok(()) };
        if !crate::dist::is_main() || self.raw.last().is_some_and(|l| l.0 == it) {
            return Ok(());
        }
        // The parts of an evaluation's cost, logged so that the curve's price is visible.
        let mut secs = [0.0f64; 3]; // sampling, Inception, distance
        let quiet = indicatif::ProgressBar::hidden();
        let mut fid_of = |g: &Denoiser| -> Result<f64> {
            let s = crate::eval::stats::generator_stats(net, g, &self.one_step, e.num_samples, e.seed, 500, self.bf16, &quiet, false)?;
            let t = std::time::Instant::now();
            let d = reference.distance(&s.stats)?;
            secs[0] += s.sampling_seconds;
            secs[1] += s.inception_seconds;
            secs[2] += t.elapsed().as_secs_f64();
            Ok(d)
        };
        let fid = fid_of(generator)?;
        let fid_ema = ema.map(&mut fid_of).transpose()?;
        self.raw.push((it, fid));
        if let Some(fe) = fid_ema {
            self.ema.push((it, fe));
        }
        let [sampling_s, inception_s, distance_s] = secs;
        tracing::info!(
            iteration = it,
            fid,
            fid_ema,
            samples = e.num_samples,
            sampling_s,
            inception_s,
            distance_s,
            "dmd fid"
        );
        Ok(())
    }
}
