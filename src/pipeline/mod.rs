//! The pipeline half of dmdpipe: config, graph, hashing, cache and runner.

pub mod cache;
pub mod config;
pub mod config_error;
pub mod fsutil;
pub mod graph;
pub mod hash;
pub mod overrides;
pub mod runner;
pub mod schema;
