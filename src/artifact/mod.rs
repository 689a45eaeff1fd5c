//! Artifact formats at the bottom of the stack: the files stages exchange (denoiser weights,
//! teacher pairs, FID statistics, checkpoints: their file names and layouts live only here) and
//! the files users bring (Python pickles, PyTorch checkpoints, EDM snapshots). Nothing here knows
//! about networks or stages.

pub mod checkpoint;
pub mod denoiser;
pub mod fid_stats;
pub mod pairs;
pub mod pickle;
pub mod tensors;
pub mod torch_pickle;
