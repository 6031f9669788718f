//! `--target`: what the emitted graph may contain, decided here and nowhere else. Today it
//! decides the form of block-wise int4/int8 weights (`--int4`, `--int8`, and `-O compress`'s
//! planner); the GPU emission work (fused ONNX Runtime ops, TensorRT's patterns, fp16) extends it.

use wcc_passes::weight_int::IntForm;

/// Where the emitted model will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Any ONNX runtime: standard ops, and ONNX Runtime's MatMulNBits for int4 only below opset
    /// 21 (where standard ONNX has no int4 `DequantizeLinear` with `block_size`).
    #[default]
    Portable,
    /// ONNX Runtime on CPU: its contrib ops (MatMulNBits, GatherBlockQuantized).
    OrtCpu,
    /// ONNX Runtime with the CUDA provider: its contrib ops, whose 4-bit MatMulNBits has fused
    /// CUDA kernels.
    OrtCuda,
    /// TensorRT: standard ONNX only; int4 as symmetric block-wise `DequantizeLinear` (opset 21).
    #[serde(rename = "tensorrt")]
    TensorRt,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "portable" => Ok(Target::Portable),
            "ort-cpu" => Ok(Target::OrtCpu),
            "ort-cuda" => Ok(Target::OrtCuda),
            "tensorrt" => Ok(Target::TensorRt),
            _ => Err(format!(
                "unknown target '{s}' (portable, ort-cpu, ort-cuda or tensorrt)"
            )),
        }
    }
}

impl Target {
    /// Its name on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Target::Portable => "portable",
            Target::OrtCpu => "ort-cpu",
            Target::OrtCuda => "ort-cuda",
            Target::TensorRt => "tensorrt",
        }
    }

    /// The int4/int8 form for this target: the user's (`--int4-form`) unless `auto`, which
    /// becomes the target's; an error for a form the target cannot run.
    pub fn int_form(self, asked: IntForm) -> Result<IntForm, String> {
        match (self, asked) {
            (Target::TensorRt, IntForm::MatMulNBits) => Err(
                "--target tensorrt takes standard ONNX only, and MatMulNBits is ONNX Runtime's: \
                 give --int4-form dq (or auto)"
                    .into(),
            ),
            (_, IntForm::MatMulNBits | IntForm::DequantizeLinear) => Ok(asked),
            (Target::Portable, IntForm::Auto) => Ok(IntForm::Auto),
            (Target::OrtCpu | Target::OrtCuda, IntForm::Auto) => Ok(IntForm::MatMulNBits),
            (Target::TensorRt, IntForm::Auto) => Ok(IntForm::DequantizeLinear),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_decides_the_int_form_the_user_left_to_it() {
        use IntForm::*;
        assert_eq!(Target::Portable.int_form(Auto), Ok(Auto));
        assert_eq!(Target::OrtCpu.int_form(Auto), Ok(MatMulNBits));
        assert_eq!(Target::OrtCuda.int_form(Auto), Ok(MatMulNBits));
        assert_eq!(Target::TensorRt.int_form(Auto), Ok(DequantizeLinear));
        // An explicit form stands, unless the target cannot run it.
        assert_eq!(
            Target::OrtCuda.int_form(DequantizeLinear),
            Ok(DequantizeLinear)
        );
        assert!(Target::TensorRt.int_form(MatMulNBits).is_err());
        assert_eq!("ort-cuda".parse(), Ok(Target::OrtCuda));
        assert!("cuda".parse::<Target>().is_err());
    }
}
