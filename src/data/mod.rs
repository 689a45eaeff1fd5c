//! Data formats: the artifacts stages exchange, and readers for the datasets users have.

pub mod artifact;
pub mod cifar10;
pub mod download;
pub mod edm_archive;
pub mod file;
pub mod image;
pub mod jpeg;
pub mod npy;
pub mod resample;
pub mod rgb;
