//! Networks: EDM's DDPM++ (SongUNet) and ADM (DhariwalUNet) with EDM preconditioning, and
//! weight import/export.

pub mod config;
pub mod dhariwal;
pub mod flops;
pub mod gmm;
pub mod import;
pub mod layers;
pub mod lpips;
pub mod precond;
pub mod songunet;
pub mod unet_block;
pub mod weights;

pub use config::NetworkConfig;
pub use precond::Denoiser;
pub use weights::load_denoiser_dir;
