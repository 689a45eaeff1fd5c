//! dmdpipe: a pipeline runner for Distribution Matching Distillation of diffusion models.
// `a += b` on tch tensors is an in-place `add_` (it would write into shared tensors and
// into autograd's saved values), so `a = a + b` is kept on purpose.
#![allow(clippy::assign_op_pattern)]

pub mod artifact;
pub mod bench;
pub mod cli;
pub mod cuda_graph;
pub mod data;
pub mod dist;
pub mod eval;
pub mod fused_kernels;
pub mod nn;
pub mod pipeline;
pub mod render;
pub mod sample;
pub mod stages;
pub mod torch_shim;
pub mod train;
