//! Evaluation: the TF Inception-v3 feature network, FID statistics, KID and precision/recall.

pub mod fid;
pub mod inception;
pub mod kid_pr;
