//! The pipeline half of dmdpipe: config, graph, hashing, cache, runner and report. It knows no
//! tensor library: whatever touches devices or tensors is asked of `stages`.

pub mod cache;
pub mod config;
pub mod config_error;
pub mod fsutil;
pub mod graph;
pub mod hash;
pub mod key;
pub mod overrides;
pub mod progress;
pub mod report;
pub mod runner;
pub mod schema;
pub mod workers;
