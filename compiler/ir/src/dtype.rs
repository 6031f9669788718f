//! ONNX element types: codes, names, storage widths.

use crate::error::{IrError, Result};

/// An ONNX `TensorProto.DataType` that wcc understands. Codes follow onnx.proto (up to ONNX 1.19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    String,
    Bool,
    F16,
    F64,
    U32,
    U64,
    Complex64,
    Complex128,
    BF16,
    F8E4M3FN,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    U4,
    I4,
    F4E2M1,
    F8E8M0,
    U2,
    I2,
}

use DataType::*;

const ALL: [DataType; 26] = [
    F32, U8, I8, U16, I16, I32, I64, String, Bool, F16, F64, U32, U64, Complex64, Complex128, BF16,
    F8E4M3FN, F8E4M3FNUZ, F8E5M2, F8E5M2FNUZ, U4, I4, F4E2M1, F8E8M0, U2, I2,
];

impl DataType {
    /// The ONNX code (`TensorProto.DataType`).
    pub fn code(self) -> i32 {
        ALL.iter().position(|d| *d == self).unwrap() as i32 + 1
    }

    /// Decodes an ONNX code; `context` names the tensor or value for the error.
    pub fn from_code(code: i32, context: &str) -> Result<Self> {
        if (1..=ALL.len() as i32).contains(&code) {
            Ok(ALL[(code - 1) as usize])
        } else {
            Err(IrError::tensor(
                context,
                format!(
                    "unknown element type code {code} (known: 1..={})",
                    ALL.len()
                ),
            ))
        }
    }

    /// Short lowercase name used by `wcc print` and reports.
    pub fn name(self) -> &'static str {
        match self {
            F32 => "f32",
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            String => "string",
            Bool => "bool",
            F16 => "f16",
            F64 => "f64",
            U32 => "u32",
            U64 => "u64",
            Complex64 => "c64",
            Complex128 => "c128",
            BF16 => "bf16",
            F8E4M3FN => "f8e4m3fn",
            F8E4M3FNUZ => "f8e4m3fnuz",
            F8E5M2 => "f8e5m2",
            F8E5M2FNUZ => "f8e5m2fnuz",
            U4 => "u4",
            I4 => "i4",
            F4E2M1 => "f4e2m1",
            F8E8M0 => "f8e8m0",
            U2 => "u2",
            I2 => "i2",
        }
    }

    /// Bits one element takes in `raw_data` (None for strings).
    pub fn bits(self) -> Option<u64> {
        Some(match self {
            String => return None,
            Bool | U8 | I8 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F8E8M0 => 8,
            U16 | I16 | F16 | BF16 => 16,
            F32 | I32 | U32 => 32,
            F64 | I64 | U64 | Complex64 => 64,
            Complex128 => 128,
            U4 | I4 | F4E2M1 => 4,
            U2 | I2 => 2,
        })
    }

    /// Bytes `n` elements take in `raw_data` (sub-byte types are packed, rounded up).
    pub fn storage_bytes(self, n: u64) -> Option<u64> {
        self.bits()
            .and_then(|b| n.checked_mul(b))
            .map(|bits| bits.div_ceil(8))
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            F32 | F16 | F64 | BF16 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F4E2M1 | F8E8M0
        )
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            U8 | I8 | U16 | I16 | I32 | I64 | U32 | U64 | U4 | I4 | U2 | I2
        )
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_onnx() {
        for d in ALL {
            assert_eq!(DataType::from_code(d.code(), "t").unwrap(), d);
        }
        assert_eq!(F32.code(), 1);
        assert_eq!(I64.code(), 7);
        assert_eq!(BF16.code(), 16);
        assert_eq!(I4.code(), 22);
        assert!(DataType::from_code(0, "t").is_err());
        assert!(DataType::from_code(99, "x")
            .unwrap_err()
            .to_string()
            .contains("'x'"));
    }

    #[test]
    fn packed_sizes() {
        assert_eq!(I4.storage_bytes(3), Some(2));
        assert_eq!(F16.storage_bytes(3), Some(6));
        assert_eq!(String.storage_bytes(3), None);
    }
}
