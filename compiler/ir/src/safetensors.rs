//! A reader for `.safetensors` files (adapters, calibration data): an 8-byte little-endian header
//! length, a JSON header `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the data.
//! Values are returned as f32 (from F32, F16, BF16, F64), which is what merging works in.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{IrError, Result};

/// Reads every tensor of the file as f32, by name.
pub fn read_f32(path: &Path) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let bytes = std::fs::read(path).map_err(|e| IrError::Io {
        path: path.into(),
        source: e,
    })?;
    let bad = |d: String| IrError::Parse {
        path: path.into(),
        detail: d,
    };
    if bytes.len() < 8 {
        return Err(bad("shorter than the 8-byte header length".into()));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| bad(format!("header length {n} runs past the end")))?;
    let data = &bytes[8 + n..];
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"]
            .as_str()
            .ok_or_else(|| bad(format!("'{name}' has no dtype")))?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("'{name}' has no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("'{name}' has a bad shape")))?;
        let offs = v["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("'{name}' has no data_offsets")))?;
        let (b, e) = (
            offs[0].as_u64().unwrap_or(u64::MAX) as usize,
            offs[1].as_u64().unwrap_or(0) as usize,
        );
        let raw = data
            .get(b..e)
            .filter(|_| b <= e)
            .ok_or_else(|| bad(format!("'{name}': data offsets {b}..{e} out of range")))?;
        let vals: Vec<f32> = match dtype {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "F64" => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "F16" => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(format!(
                    "'{name}' has dtype {other}; adapters must be F32, F16, BF16 or F64"
                )))
            }
        };
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), vals)
            .map_err(|_| bad(format!("'{name}': data does not fit shape {shape:?}")))?;
        out.insert(name.clone(), arr);
    }
    Ok(out)
}
