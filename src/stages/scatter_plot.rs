//! `scatter-plot`: a PNG of one or two 2-D point sets (data in blue, the other in orange).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ArtifactType, FieldIssue, Stage, StageContext, Upstream};
use crate::data::artifact::PointsDataset;
use crate::render::Canvas;

fn default_size() -> u32 {
    512
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScatterPlotParams {
    /// The stage whose points are drawn (blue).
    pub points: String,
    /// An optional second point set drawn over the first (orange).
    pub compare: Option<String>,
    /// Image side in pixels.
    #[serde(default = "default_size")]
    pub size: u32,
    /// Draw at most this many points of each set.
    pub max_points: Option<usize>,
}

impl Stage for ScatterPlotParams {
    fn version(&self) -> u32 {
        1
    }
    fn output_type(&self) -> ArtifactType {
        ArtifactType::Report
    }
    fn upstream(&self) -> Vec<Upstream> {
        super::references(&[
            ("points", Some(&self.points), &[ArtifactType::Points2d]),
            ("compare", self.compare.as_ref(), &[ArtifactType::Points2d]),
        ])
    }
    fn validate(&self) -> Result<(), FieldIssue> {
        if !(64..=4096).contains(&self.size) {
            return Err(FieldIssue::new("size", "size must be in 64..=4096"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<serde_json::Value> {
        let mut sets = vec![PointsDataset::read(ctx.upstream_dir("points")?)?];
        if self.compare.is_some() {
            sets.push(PointsDataset::read(ctx.upstream_dir("compare")?)?);
        }
        let limit = self.max_points.unwrap_or(usize::MAX);
        let all = sets.iter().flat_map(|s| s.points.iter().take(limit));
        let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
        for p in all {
            for d in 0..2 {
                if p[d].is_finite() {
                    lo[d] = lo[d].min(p[d]);
                    hi[d] = hi[d].max(p[d]);
                }
            }
        }
        let mut canvas = Canvas::new(self.size, self.size, [255, 255, 255]);
        let colors = [[31, 119, 180], [255, 127, 14]];
        for (set, color) in sets.iter().zip(colors) {
            for p in set.points.iter().take(limit) {
                canvas.dot(p[0], p[1], lo, hi, color);
            }
        }
        canvas.frame([0, 0, 0]);
        canvas.save_png(&ctx.out_dir.join("scatter.png"))?;
        Ok(
            serde_json::json!({ "points": sets.iter().map(|s| s.points.len().min(limit)).collect::<Vec<_>>(), "x_range": [lo[0], hi[0]], "y_range": [lo[1], hi[1]] }),
        )
    }
}
