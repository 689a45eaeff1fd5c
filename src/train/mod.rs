//! Training: optimiser and EMA, the EDM teacher loop (DMD arrives beside it).

pub mod augment;
pub mod device_data;
pub mod dmd;
pub mod gan;
pub mod optim;
pub mod rng;
pub mod teacher;
