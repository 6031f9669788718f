//! Tensors (initializers and constants). The `TensorProto` itself is the storage for embedded data,
//! so whatever the file held (raw or typed fields, doc strings, metadata) survives a round trip.
//! Data in external files is a slice of a shared read-only mmap: never copied unless a pass edits it.

use std::borrow::Cow;
use std::sync::Arc;

use memmap2::Mmap;
use onnx_protobuf::{tensor_proto::DataLocation, TensorProto};
use protobuf::EnumOrUnknown;

use crate::dtype::DataType;
use crate::error::{IrError, Result};

/// Chunk size for scans of external data.
const CHUNK: usize = 4 << 20;

/// Largest element count wcc accepts for one tensor (2^40): anything above is a corrupt header.
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// Bytes of a tensor that live in an mmapped file: an external-data file, or the model file
/// itself (a large `raw_data`, see `wire`). Whole-tensor scans (hashing, writing) read through
/// `file` instead of the map, so they go through the page cache without making the pages part of
/// wcc's resident memory.
#[derive(Clone)]
pub struct ExternalSlice {
    pub map: Arc<Mmap>,
    pub file: Arc<std::fs::File>,
    pub offset: usize,
    pub len: usize,
    /// The bytes are the tensor's own `raw_data` in the model file (embedded data, only read
    /// without copying), not external data.
    pub embedded: bool,
}

impl ExternalSlice {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
}

#[derive(Clone)]
pub struct Tensor {
    /// Name, dims, type, doc string and (for typed-field data) the values. `raw_data` is always
    /// empty here: raw bytes live in `shared` (so cloning a model does not copy its weights) and
    /// external bytes in `external`; `external_data` entries are dropped.
    pub proto: TensorProto,
    shared: Option<Arc<Vec<u8>>>,
    external: Option<ExternalSlice>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({} {:?} {:?})",
            self.proto.name,
            self.dtype().ok(),
            self.proto.dims
        )
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.proto.name == other.proto.name
            && self.proto.data_type == other.proto.data_type
            && self.proto.dims == other.proto.dims
            && match (self.raw_bytes(), other.raw_bytes()) {
                (Ok(a), Ok(b)) => a == b,
                _ => self.proto.string_data == other.proto.string_data,
            }
    }
}

/// Element count of `dims`, rejecting negative dims, overflow and absurd sizes.
pub fn element_count(dims: &[i64], context: &str) -> Result<u64> {
    let mut n: u64 = 1;
    for &d in dims {
        if d < 0 {
            return Err(IrError::tensor(
                context,
                format!("negative dimension {d} in {dims:?}"),
            ));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|n| *n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                IrError::tensor(
                    context,
                    format!(
                        "dims {dims:?} give more than 2^40 elements: refusing an absurd tensor"
                    ),
                )
            })?;
    }
    Ok(n)
}

impl Tensor {
    /// Wraps an embedded tensor proto after checking that its data matches its dims and type.
    pub fn from_proto(mut proto: TensorProto) -> Result<Self> {
        let raw = std::mem::take(&mut proto.raw_data);
        let t = Tensor {
            proto,
            shared: (!raw.is_empty()).then(|| Arc::new(raw)),
            external: None,
        };
        t.check_embedded()?;
        Ok(t)
    }

    /// A tensor whose bytes live in a mapped file (already bounds-checked by the caller).
    pub fn with_external(mut proto: TensorProto, slice: ExternalSlice) -> Result<Self> {
        proto.external_data.clear();
        proto.data_location = EnumOrUnknown::new(DataLocation::DEFAULT);
        let dtype = DataType::from_code(proto.data_type, &proto.name)?;
        let n = element_count(&proto.dims, &proto.name)?;
        let want = dtype.storage_bytes(n).ok_or_else(|| {
            IrError::tensor(&proto.name, "string tensors cannot live in external data")
        })?;
        if want != slice.len as u64 && slice.embedded {
            return Err(IrError::tensor(
                &proto.name,
                format!(
                    "holds {} bytes of data but dims {:?} of {dtype} need {want}",
                    slice.len, proto.dims
                ),
            ));
        }
        if want != slice.len as u64 {
            return Err(IrError::ExternalData {
                tensor: proto.name.clone(),
                detail: format!(
                    "has length {} but dims {:?} of {dtype} need {want} bytes",
                    slice.len, proto.dims
                ),
            });
        }
        Ok(Tensor {
            proto,
            shared: None,
            external: Some(slice),
        })
    }

    /// A new tensor from little-endian raw bytes. Large ones go to the scratch file when one is
    /// on (see `spill`): the bytes are written there and dropped from memory.
    pub fn from_raw(name: &str, dtype: DataType, dims: &[i64], raw: Vec<u8>) -> Result<Self> {
        if let Some(slice) = crate::spill::spill(&raw) {
            let proto = TensorProto {
                name: name.to_string(),
                data_type: dtype.code(),
                dims: dims.to_vec(),
                ..Default::default()
            };
            return Tensor::with_external(proto, slice);
        }
        let proto = TensorProto {
            name: name.to_string(),
            data_type: dtype.code(),
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        };
        Tensor::from_proto(proto)
    }

    pub fn name(&self) -> &str {
        &self.proto.name
    }

    pub fn dtype(&self) -> Result<DataType> {
        DataType::from_code(self.proto.data_type, &self.proto.name)
    }

    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    pub fn numel(&self) -> u64 {
        // Checked at construction.
        element_count(&self.proto.dims, "").unwrap_or(0)
    }

    /// Whether the data lives in an external-data file (not in the model file).
    pub fn is_external(&self) -> bool {
        self.external.as_ref().is_some_and(|e| !e.embedded)
    }

    /// Whether the data is read from a file (external data, or a large `raw_data` of the model
    /// file read in place) rather than held in memory.
    pub fn is_mapped(&self) -> bool {
        self.external.is_some()
    }

    /// Bytes the data takes (packed storage size; strings by their lengths).
    pub fn byte_size(&self) -> u64 {
        match self.dtype() {
            Ok(DataType::String) => self.proto.string_data.iter().map(|s| s.len() as u64).sum(),
            Ok(d) => d.storage_bytes(self.numel()).unwrap_or(0),
            Err(_) => 0,
        }
    }

    fn check_embedded(&self) -> Result<()> {
        let p = &self.proto;
        let dtype = DataType::from_code(p.data_type, &p.name)?;
        let n = element_count(&p.dims, &p.name)?;
        if p.data_location.enum_value() == Ok(DataLocation::EXTERNAL) || !p.external_data.is_empty()
        {
            return Err(IrError::tensor(&p.name, "external data was not resolved"));
        }
        if dtype == DataType::String {
            if p.string_data.len() as u64 != n {
                return Err(IrError::tensor(
                    &p.name,
                    format!("has {} strings but dims {:?}", p.string_data.len(), p.dims),
                ));
            }
            return Ok(());
        }
        let want = dtype.storage_bytes(n).unwrap_or(0);
        let have = self.raw_bytes()?.len() as u64;
        if have != want {
            return Err(IrError::tensor(
                &p.name,
                format!(
                    "holds {have} bytes of data but dims {:?} of {dtype} need {want}",
                    p.dims
                ),
            ));
        }
        Ok(())
    }

    /// The data as little-endian packed bytes, whatever field holds it. Borrowed when possible.
    pub fn raw_bytes(&self) -> Result<Cow<'_, [u8]>> {
        if let Some(ext) = &self.external {
            return Ok(Cow::Borrowed(ext.bytes()));
        }
        if let Some(raw) = &self.shared {
            return Ok(Cow::Borrowed(raw.as_slice()));
        }
        let p = &self.proto;
        let dtype = DataType::from_code(p.data_type, &p.name)?;
        let bytes: Vec<u8> = match dtype {
            DataType::String => {
                return Err(IrError::tensor(&p.name, "string tensors have no raw bytes"))
            }
            DataType::F32 | DataType::Complex64 => {
                p.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DataType::F64 | DataType::Complex128 => {
                p.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DataType::I64 => p.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::U64 => p.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::U32 => p
                .uint64_data
                .iter()
                .flat_map(|v| (*v as u32).to_le_bytes())
                .collect(),
            DataType::I32 => p.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::I16 | DataType::U16 | DataType::F16 | DataType::BF16 => p
                .int32_data
                .iter()
                .flat_map(|v| (*v as u16).to_le_bytes())
                .collect(),
            // 8-bit types hold one element per int32; packed 4/2-bit types one byte per int32.
            _ => p.int32_data.iter().map(|v| *v as u8).collect(),
        };
        Ok(Cow::Owned(bytes))
    }

    /// Whether the two tensors are known to hold the same data without reading it: same name,
    /// dtype and dims, and the same bytes in memory or the same range of the same mapped file (as
    /// a clone of a model shares with its original until a pass edits the tensor).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        self.proto.name == other.proto.name
            && self.proto.data_type == other.proto.data_type
            && self.proto.dims == other.proto.dims
            && match (&self.shared, &other.shared, &self.external, &other.external) {
                (Some(a), Some(b), _, _) => Arc::ptr_eq(a, b),
                (None, None, Some(a), Some(b)) => {
                    Arc::ptr_eq(&a.map, &b.map) && a.offset == b.offset && a.len == b.len
                }
                _ => false,
            }
    }

    /// Whether the bytes are held packed (in memory or in a mapped file), as `raw_data` writes
    /// them, rather than in the proto's typed fields.
    pub fn has_raw_storage(&self) -> bool {
        self.external.is_some() || self.shared.is_some()
    }

    /// A copy with the data embedded as `raw_data` (typed fields and external references dropped).
    pub fn to_embedded_proto(&self) -> Result<TensorProto> {
        let mut p = self.proto.clone();
        if self.external.is_some() || self.shared.is_some() {
            p.raw_data = self.raw_bytes()?.into_owned();
        }
        Ok(p)
    }

    /// The tensor's metadata only (no data fields), for writing as external data.
    pub fn header_proto(&self) -> TensorProto {
        let mut p = self.proto.clone();
        p.raw_data.clear();
        p.float_data.clear();
        p.int32_data.clear();
        p.int64_data.clear();
        p.double_data.clear();
        p.uint64_data.clear();
        p
    }

    /// Calls `f` with the data in order, in chunks. External data is read with positioned reads
    /// (not through the mmap), so scanning a large model does not grow resident memory.
    pub fn for_each_chunk(&self, f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> Result<()> {
        let werr = |e: std::io::Error| IrError::tensor(self.name(), format!("reading data: {e}"));
        match &self.external {
            Some(ext) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; CHUNK.min(ext.len.max(1))];
                let mut done = 0usize;
                while done < ext.len {
                    let n = CHUNK.min(ext.len - done);
                    ext.file
                        .read_exact_at(&mut buf[..n], (ext.offset + done) as u64)
                        .map_err(werr)?;
                    f(&buf[..n]).map_err(werr)?;
                    done += n;
                }
                Ok(())
            }
            None => f(&self.raw_bytes()?).map_err(werr),
        }
    }

    /// Bytes `at..at + len` of the data (an error past the end), read like `for_each_chunk`.
    pub fn read_range(&self, at: usize, len: usize) -> Result<Vec<u8>> {
        let total = usize::try_from(self.byte_size()).unwrap_or(usize::MAX);
        if at.checked_add(len).is_none_or(|e| e > total) {
            return Err(IrError::tensor(
                self.name(),
                format!("bytes {at}..+{len} are past its {total}"),
            ));
        }
        match &self.external {
            Some(ext) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                ext.file
                    .read_exact_at(&mut buf, (ext.offset + at) as u64)
                    .map_err(|e| IrError::tensor(self.name(), format!("reading data: {e}")))?;
                Ok(buf)
            }
            None => Ok(self.raw_bytes()?[at..at + len].to_vec()),
        }
    }

    /// Reads the whole data into `dst` (exactly `byte_size` bytes, possibly uninitialized: a
    /// backend's own tensor buffer), once: from the file with positioned reads when it lives in
    /// one (page cache to `dst`, not through the mmap), else copied from memory.
    pub fn read_into(&self, dst: &mut [std::mem::MaybeUninit<u8>]) -> Result<()> {
        let werr = |e: std::io::Error| IrError::tensor(self.name(), format!("reading data: {e}"));
        if dst.len() as u64 != self.byte_size() {
            return Err(IrError::tensor(
                self.name(),
                format!("{} bytes, read into {}", self.byte_size(), dst.len()),
            ));
        }
        match &self.external {
            Some(ext) => {
                use std::os::fd::AsRawFd;
                let mut done = 0;
                while done < dst.len() {
                    let at = libc::off_t::try_from(ext.offset + done)
                        .map_err(|_| werr(std::io::Error::other("offset out of range")))?;
                    let left = &mut dst[done..];
                    // SAFETY: pread writes at most `left.len()` bytes into `left`, which it
                    // borrows for the call; MaybeUninit bytes may be written freely.
                    let n = unsafe {
                        libc::pread(
                            ext.file.as_raw_fd(),
                            left.as_mut_ptr().cast(),
                            left.len(),
                            at,
                        )
                    };
                    match n {
                        0 => return Err(werr(std::io::ErrorKind::UnexpectedEof.into())),
                        n if n < 0 => {
                            let e = std::io::Error::last_os_error();
                            if e.kind() != std::io::ErrorKind::Interrupted {
                                return Err(werr(e));
                            }
                        }
                        n => done += n as usize,
                    }
                }
            }
            None => {
                let bytes = self.raw_bytes()?;
                for (d, b) in dst.iter_mut().zip(bytes.iter()) {
                    d.write(*b);
                }
            }
        }
        Ok(())
    }

    /// The file and byte range holding the data, when it lives in a file (external data, data
    /// left in the model file, or the scratch file).
    pub fn file_range(&self) -> Option<(&std::fs::File, u64, usize)> {
        self.external
            .as_ref()
            .map(|e| (&*e.file, e.offset as u64, e.len))
    }

    /// Up to `len` bytes at `at` (clamped), read without touching the mmap for external data.
    fn sample(&self, at: usize, len: usize) -> Vec<u8> {
        let total = usize::try_from(self.byte_size()).unwrap_or(usize::MAX);
        let at = at.min(total);
        self.read_range(at, len.min(total - at)).unwrap_or_default()
    }

    /// A cheap fingerprint: dtype, dims and three 4 KiB samples of the data (start, middle, end).
    /// Tensors with different fingerprints differ; equal ones may still differ (see `same_data`).
    /// Hashed with FxHash (8 bytes a step, where FNV takes one): for comparisons within one run,
    /// not stable across versions (`content_hash` is).
    pub fn fingerprint(&self) -> u64 {
        use std::hash::Hasher;
        let mut h = rustc_hash::FxHasher::default();
        h.write(&self.proto.data_type.to_le_bytes());
        for d in &self.proto.dims {
            h.write(&d.to_le_bytes());
        }
        let n = self.byte_size() as usize;
        for at in [0, n / 2, n.saturating_sub(4096)] {
            h.write(&self.sample(at, 4096));
        }
        for s in &self.proto.string_data {
            h.write(&(s.len() as u64).to_le_bytes());
            h.write(s);
        }
        h.finish()
    }

    /// Whether the two tensors hold the same dtype, dims and bytes (chunked comparison).
    pub fn same_data(&self, other: &Tensor) -> bool {
        if self.proto.data_type != other.proto.data_type || self.proto.dims != other.proto.dims {
            return false;
        }
        if self.dtype().ok() == Some(DataType::String) {
            return self.proto.string_data == other.proto.string_data;
        }
        if self.byte_size() != other.byte_size() {
            return false;
        }
        let mut pos = 0usize;
        let mut equal = true;
        let r = self.for_each_chunk(&mut |chunk| {
            if equal && other.sample(pos, chunk.len()) != chunk {
                equal = false;
            }
            pos += chunk.len();
            Ok(())
        });
        r.is_ok() && equal
    }

    /// 64-bit FNV-1a of dtype, dims and data: stable across runs and platforms.
    pub fn content_hash(&self) -> u64 {
        let mut h = Fnv64::new();
        h.write(&self.proto.data_type.to_le_bytes());
        for d in &self.proto.dims {
            h.write(&d.to_le_bytes());
        }
        if self.dtype().ok() == Some(DataType::String) {
            for s in &self.proto.string_data {
                h.write(&(s.len() as u64).to_le_bytes());
                h.write(s);
            }
        } else {
            let _ = self.for_each_chunk(&mut |c| {
                h.write(c);
                Ok(())
            });
        }
        h.finish()
    }

    /// Element values as f64 (for small tensors: printing, shape arithmetic, scalars).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let dtype = self.dtype()?;
        let b = self.raw_bytes()?;
        let vals: Vec<f64> = match dtype {
            DataType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DataType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DataType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DataType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::U32 => b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::U64 => b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DataType::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            DataType::U16 => b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            DataType::I8 => b.iter().map(|v| *v as i8 as f64).collect(),
            DataType::U8 | DataType::Bool => b.iter().map(|v| *v as f64).collect(),
            other => {
                return Err(IrError::tensor(
                    self.name(),
                    format!("cannot read {other} values"),
                ))
            }
        };
        Ok(vals)
    }

    /// Integer element values (for shape tensors: i64/i32 only).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let b = self.raw_bytes().ok()?;
        match self.dtype().ok()? {
            DataType::I64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DataType::I32 => Some(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// FNV-1a, 64 bit.
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    pub fn new() -> Self {
        Fnv64(0xcbf29ce484222325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_into_gives_the_bytes_from_a_file_or_memory_and_checks_the_length() {
        let _turn = crate::spill::tests::TURN
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 241) as u8).collect();
        crate::spill::enable(dir.path()).unwrap();
        let mapped = Tensor::from_raw("f", DataType::U8, &[big.len() as i64], big.clone()).unwrap();
        crate::spill::disable();
        let memory = Tensor::from_raw("m", DataType::U8, &[big.len() as i64], big.clone()).unwrap();
        assert!(mapped.file_range().is_some() && memory.file_range().is_none());
        for t in [&mapped, &memory] {
            let mut dst = vec![std::mem::MaybeUninit::<u8>::uninit(); big.len()];
            t.read_into(&mut dst).unwrap();
            // SAFETY: read_into wrote every byte.
            let got: Vec<u8> = dst.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(got, big, "{}", t.name());
            let mut short = vec![std::mem::MaybeUninit::<u8>::uninit(); big.len() - 1];
            assert!(t.read_into(&mut short).is_err(), "{}", t.name());
        }
    }

    #[test]
    fn typed_and_raw_fields_give_the_same_bytes() {
        let raw = Tensor::from_raw(
            "a",
            DataType::F32,
            &[2],
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
        let typed = Tensor::from_proto(TensorProto {
            name: "a".into(),
            data_type: 1,
            dims: vec![2],
            float_data: vec![1.5, -2.0],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(raw.raw_bytes().unwrap(), typed.raw_bytes().unwrap());
        assert_eq!(raw.content_hash(), typed.content_hash());
        assert_eq!(typed.to_f64_vec().unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn size_mismatch_and_absurd_dims_are_errors() {
        let e = Tensor::from_raw("w", DataType::F32, &[3], vec![0; 8])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'w'") && e.contains("need 12"), "{e}");
        let e = Tensor::from_raw("big", DataType::F32, &[1 << 31, 1 << 31], vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("absurd"), "{e}");
        let e = Tensor::from_raw("neg", DataType::F32, &[-1], vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative"), "{e}");
    }
}
