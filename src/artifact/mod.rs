//! Artifact formats at the bottom of the stack: files users bring (Python pickles, PyTorch
//! checkpoints, EDM snapshots). Nothing here knows about networks or stages.

pub mod pickle;
pub mod torch_pickle;
