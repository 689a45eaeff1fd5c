//! NumPy `.npy` arrays and `.npz` archives (a zip of `.npy` files), for the dtypes we meet.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    U8(Vec<u8>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            NpyData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F64(v) => v.clone(),
        }
    }
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        Ok(match &self.data {
            NpyData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            NpyData::I64(v) => v.clone(),
            _ => bail!("expected an integer array"),
        })
    }
}

/// Parses a `.npy` file's bytes (C order only).
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (bad magic)");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("truncated .npy header");
            }
            (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
        }
        v => bail!("unsupported .npy version {v}"),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + header_len)
            .ok_or_else(|| anyhow!("truncated .npy header"))?,
    )?;
    let descr = dict_value(header, "descr").ok_or_else(|| anyhow!("no descr in .npy header"))?;
    let quote = descr
        .chars()
        .next()
        .filter(|c| *c == '\'' || *c == '"')
        .ok_or_else(|| anyhow!("bad descr in .npy header"))?;
    let descr = descr[1..].split(quote).next().unwrap_or("");
    if dict_value(header, "fortran_order").map(|v| v.starts_with("True")).unwrap_or(false) {
        bail!("Fortran-order .npy arrays are not supported");
    }
    let shape_str = dict_value(header, "shape").ok_or_else(|| anyhow!("no shape in .npy header"))?;
    let shape: Vec<usize> = shape_str
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| anyhow!("bad shape `{shape_str}`: {e}")))
        .collect::<Result<_>>()?;
    let numel: usize = shape.iter().product();
    let body = &bytes[start + header_len..];
    let need = |size: usize| -> Result<&[u8]> {
        body.get(..numel * size)
            .ok_or_else(|| anyhow!(".npy data truncated: {} bytes for {numel} elements of {size} bytes", body.len()))
    };
    let data = match descr {
        "|u1" | "u1" | "<u1" => NpyData::U8(need(1)?.to_vec()),
        "<i8" => NpyData::I64(
            need(8)?
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i4" => NpyData::I64(
            need(4)?
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        "<f4" => NpyData::F32(
            need(4)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<f8" => NpyData::F64(
            need(8)?
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        other => bail!("unsupported .npy dtype `{other}`"),
    };
    Ok(NpyArray { shape, data })
}

fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'"))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Serializes an array as `.npy` version 1.0.
pub fn to_bytes(array: &NpyArray) -> Vec<u8> {
    let (descr, body): (&str, Vec<u8>) = match &array.data {
        NpyData::U8(v) => ("|u1", v.clone()),
        NpyData::I64(v) => ("<i8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        NpyData::F32(v) => ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        NpyData::F64(v) => ("<f8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    let shape = match array.shape.len() {
        1 => format!("({},)", array.shape[0]),
        _ => format!("({})", array.shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(body);
    out
}

pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = super::file::read_regular(path, 1 << 40)?;
    parse(&bytes).with_context(|| format!("{}", path.display()))
}

/// Reads the named arrays of an `.npz` archive (names without `.npy`).
/// Largest array an `.npz` entry may inflate to (EDM's ImageNet-64 statistics are 32 MiB; a
/// downsampled ImageNet batch about 1 GiB).
const MAX_NPZ_ENTRY: u64 = 16 << 30;

pub fn read_npz(path: &Path, names: &[&str]) -> Result<Vec<NpyArray>> {
    let file_len = super::file::check_regular(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a valid .npz (zip) archive", path.display()))?;
    names
        .iter()
        .map(|name| {
            let entry = zip
                .by_name(&format!("{name}.npy"))
                .with_context(|| format!("{}: no array `{name}`", path.display()))?;
            // A header's claim is checked before anything is allocated: a stored entry cannot be
            // larger than the file, an inflated one not larger than the cap.
            let declared = entry.size();
            let stored = entry.compression() == zip::CompressionMethod::Stored;
            if declared > MAX_NPZ_ENTRY || (stored && declared > file_len) {
                anyhow::bail!("{}: array `{name}` claims {declared} bytes in a file of {file_len}", path.display());
            }
            let mut bytes = Vec::with_capacity(declared as usize);
            entry
                .take(declared)
                .read_to_end(&mut bytes)
                .with_context(|| format!("{}: reading `{name}`", path.display()))?;
            parse(&bytes).with_context(|| format!("{}: array `{name}`", path.display()))
        })
        .collect()
}

pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, array) in arrays {
        zip.start_file(format!("{name}.npy"), opts)?;
        zip.write_all(&to_bytes(array))?;
    }
    zip.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_all_dtypes() {
        for data in [
            NpyData::U8(vec![1, 2, 3, 4, 5, 6]),
            NpyData::I64(vec![-1, 2, 3, 4, 5, 6]),
            NpyData::F32(vec![0.5, 2.0, 3.0, 4.0, 5.0, -6.0]),
            NpyData::F64(vec![0.25, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ] {
            let a = NpyArray { shape: vec![2, 3], data };
            let bytes = to_bytes(&a);
            assert_eq!(
                (bytes.len()
                    - a.numel()
                        * match a.data {
                            NpyData::U8(_) => 1,
                            NpyData::F32(_) => 4,
                            _ => 8,
                        })
                    % 64,
                0
            );
            assert_eq!(parse(&bytes).unwrap(), a);
        }
        let v = NpyArray {
            shape: vec![3],
            data: NpyData::I64(vec![1, 2, 3]),
        };
        assert_eq!(parse(&to_bytes(&v)).unwrap(), v);
    }

    #[test]
    fn truncated_npy_is_an_error() {
        let a = NpyArray {
            shape: vec![100],
            data: NpyData::F32(vec![1.0; 100]),
        };
        let bytes = to_bytes(&a);
        assert!(parse(&bytes[..bytes.len() - 4]).unwrap_err().to_string().contains("truncated"));
    }
}
