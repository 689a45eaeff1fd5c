//! Evaluation: the TF Inception-v3 feature network and FID statistics.

pub mod fid;
pub mod inception;
