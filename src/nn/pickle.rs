//! Readers for PyTorch's pickle-based formats (filled in below).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use tch::Tensor;

use super::import::Imported;

pub fn read_edm_pickle(path: &Path) -> Result<Imported> {
    bail!("{}: EDM pickle import is not implemented yet", path.display())
}

pub fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    bail!("{}: torch zip import is not implemented yet", path.display())
}
