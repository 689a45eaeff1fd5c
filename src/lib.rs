//! dmdpipe: a pipeline runner for Distribution Matching Distillation of diffusion models.

pub mod bench;
pub mod cli;
pub mod cuda_graph;
pub mod data;
pub mod dist;
pub mod eval;
pub mod nn;
pub mod pipeline;
pub mod render;
pub mod report;
pub mod sample;
pub mod stages;
pub mod torch_shim;
pub mod train;
