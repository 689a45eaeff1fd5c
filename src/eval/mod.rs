//! Evaluation: the TF Inception-v3 feature network, FID statistics, KID and precision/recall.

pub mod energy;
pub mod fid;
pub mod inception;
pub mod inception_import;
pub mod kid_pr;
pub mod stats;
