//! `gmm2d`: samples of a 2-D mixture of isotropic Gaussians, from a seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, Stage, StageContext};
use crate::data::artifact::PointsDataset;
pub use crate::nn::gmm::Gmm2dComponent;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gmm2dParams {
    pub seed: u64,
    /// Number of samples.
    pub count: usize,
    pub components: Vec<Gmm2dComponent>,
}

impl Gmm2dParams {
    pub fn sample(&self) -> PointsDataset {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let total: f64 = self.components.iter().map(|c| c.weight).sum();
        let mut points = Vec::with_capacity(self.count);
        let mut labels = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            let mut u: f64 = rng.random::<f64>() * total;
            let mut k = self.components.len() - 1;
            for (i, c) in self.components.iter().enumerate() {
                if u < c.weight {
                    k = i;
                    break;
                }
                u -= c.weight;
            }
            let c = &self.components[k];
            let e0: f64 = StandardNormal.sample(&mut rng);
            let e1: f64 = StandardNormal.sample(&mut rng);
            points.push([(c.mean[0] + c.std * e0) as f32, (c.mean[1] + c.std * e1) as f32]);
            labels.push(k as i64);
        }
        let classes = (0..self.components.len()).map(|i| format!("component{i}")).collect();
        PointsDataset { points, labels, classes }
    }
}

impl Stage for Gmm2dParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Points2d
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if self.components.is_empty() {
            return Err(FieldIssue::new("components", "a mixture needs at least one component")
                .help("add components = [{ weight = 1.0, mean = [0.0, 0.0], std = 0.1 }]"));
        }
        // Points are held in memory: 100M of them are 1.6 GB.
        super::count_in_range("count", self.count as u64, 100_000_000)?;
        for (i, c) in self.components.iter().enumerate() {
            if !(c.weight > 0.0 && c.weight.is_finite()) {
                return Err(FieldIssue::new(
                    "components",
                    format!("component {i}: weight {} must be positive", c.weight),
                ));
            }
            if !(c.std > 0.0 && c.std.is_finite()) {
                return Err(FieldIssue::new(
                    "components",
                    format!("component {i}: std {} must be positive", c.std),
                ));
            }
            if !c.mean.iter().all(|m| m.is_finite()) {
                return Err(FieldIssue::new("components", format!("component {i}: mean must be finite")));
            }
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        ctx.progress.set_length(self.count as u64);
        let ds = self.sample();
        ctx.progress.set_position(self.count as u64);
        ds.write(&ctx.out_dir)?;
        let mut counts = vec![0usize; self.components.len()];
        for &l in &ds.labels {
            counts[l as usize] += 1;
        }
        let fractions: Vec<f64> = counts.iter().map(|&c| c as f64 / self.count as f64).collect();
        let n = ds.points.len() as f64;
        let mean = [0, 1].map(|d| ds.points.iter().map(|p| p[d] as f64).sum::<f64>() / n);
        Ok(serde_json::json!({ "count": self.count, "component_fractions": fractions, "mean": mean }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_mixture_weights_and_means() {
        let p = Gmm2dParams {
            seed: 3,
            count: 20000,
            components: vec![
                Gmm2dComponent {
                    weight: 3.0,
                    mean: [2.0, 0.0],
                    std: 0.1,
                },
                Gmm2dComponent {
                    weight: 1.0,
                    mean: [-2.0, 1.0],
                    std: 0.2,
                },
            ],
        };
        let ds = p.sample();
        let frac0 = ds.labels.iter().filter(|&&l| l == 0).count() as f64 / 20000.0;
        assert!((frac0 - 0.75).abs() < 0.015, "{frac0}");
        let pts1: Vec<_> = ds
            .points
            .iter()
            .zip(&ds.labels)
            .filter(|(_, l)| **l == 1)
            .map(|(p, _)| *p)
            .collect();
        let mx = pts1.iter().map(|p| p[0] as f64).sum::<f64>() / pts1.len() as f64;
        let var = pts1.iter().map(|p| (p[1] as f64 - 1.0).powi(2)).sum::<f64>() / pts1.len() as f64;
        assert!((mx + 2.0).abs() < 0.02 && (var.sqrt() - 0.2).abs() < 0.01);
        assert_eq!(p.sample(), ds, "same seed, same samples");
    }
}
