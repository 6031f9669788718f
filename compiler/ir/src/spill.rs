//! Where large tensors that passes make live: a scratch file instead of memory.
//!
//! Memory model of wcc (what is resident when):
//! - Reading: the model's structure and its small tensors are in memory; every tensor of 4 KiB or
//!   more in the main graph, and all external data, stay in their files (mmapped, read with
//!   positioned reads where a whole tensor is scanned). See `import`.
//! - Rewriting: a pass that computes a tensor holds it (and the inputs it reads, in their own
//!   dtype) while it computes it; a new tensor of `SPILL_MIN_BYTES` or more is then written here
//!   and read back through an mmap, like external data. So a pass that rewrites every weight holds
//!   about one weight at a time, not all of them. An elementwise fold of a large weight (a scale,
//!   a bias, a Cast) holds less: it is computed piece by piece (a piece per thread at a time)
//!   straight into a `Writer`'s range here. An original that nothing reads any more is dropped
//!   with the graph's last reference to it (its bytes were never loaded).
//! - Writing: the output is streamed, tensor by tensor, from wherever each tensor lives (see
//!   `export`): bytes already in a file (the input's) are copied by the kernel into the output's
//!   external data, never through memory. The tensors passes wrote here are not copied at all
//!   when the output has external data: the driver `retire`s this file after the passes, and
//!   `export` links it into the output's folder as the output's data file, leaves those tensors
//!   where they are and appends the others (ranges nothing refers to any more are punched out;
//!   when those are more than a quarter of the file, it is copied from as before).
//!
//! The driver turns the store on (`enable`) for the folder it will write into, so the scratch
//! file is on the output's filesystem; it is unlinked at once and vanishes with the process.
//! Without a store (library use, tests), new tensors stay in memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use memmap2::Mmap;

use crate::tensor::ExternalSlice;

/// New tensors at least this large go to the scratch file.
pub const SPILL_MIN_BYTES: usize = 1 << 20;

/// Offsets in the scratch file are aligned like this (pages).
const ALIGN: u64 = 4096;

struct Store {
    file: Arc<File>,
    end: u64,
    dir: std::path::PathBuf,
}

/// A scratch file no new tensor goes to any more (see `retire`), for `export` to adopt.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub(crate) file: Arc<File>,
    /// Bytes written or reserved so far.
    pub(crate) end: u64,
}

/// Takes the scratch file as it stands, for the output to adopt (see the module doc); new
/// tensors go to a fresh scratch file in the same folder from now on (or memory, if none can be
/// made there). None when no store is on.
pub fn retire() -> Option<Scratch> {
    let mut guard = STORE.lock().ok()?;
    let old = guard.take()?;
    if let Ok(file) = tempfile::tempfile_in(&old.dir) {
        *guard = Some(Store {
            file: Arc::new(file),
            end: 0,
            dir: old.dir,
        });
    }
    Some(Scratch {
        file: old.file,
        end: old.end,
    })
}

static STORE: Mutex<Option<Store>> = Mutex::new(None);

/// Sends new large tensors to an (unlinked) scratch file in `dir` from now on.
pub fn enable(dir: &Path) -> std::io::Result<()> {
    let file = tempfile::tempfile_in(dir)?;
    let mut s = STORE.lock().unwrap_or_else(|e| e.into_inner());
    *s = Some(Store {
        file: Arc::new(file),
        end: 0,
        dir: dir.to_path_buf(),
    });
    Ok(())
}

/// Keeps new tensors in memory again (tensors already spilled keep their file).
pub fn disable() {
    *STORE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Whether a store is on.
pub fn enabled() -> bool {
    STORE.lock().map(|s| s.is_some()).unwrap_or(false)
}

/// Writes `bytes` to the scratch file and gives them back as a mapped slice; None (keep them in
/// memory) when they are small, no store is on, or the file cannot take them.
pub(crate) fn spill(bytes: &[u8]) -> Option<ExternalSlice> {
    if bytes.len() < SPILL_MIN_BYTES {
        return None;
    }
    let mut guard = STORE.lock().ok()?;
    let store = guard.as_mut()?;
    let offset = store.end.div_ceil(ALIGN) * ALIGN;
    store.file.write_all_at(bytes, offset).ok()?;
    store.end = offset + bytes.len() as u64;
    // SAFETY: the scratch file is private to this process (unlinked at creation) and its written
    // ranges are never written again.
    let map = unsafe { Mmap::map(&*store.file) }.ok()?;
    Some(ExternalSlice {
        map: Arc::new(map),
        file: store.file.clone(),
        offset: usize::try_from(offset).ok()?,
        len: bytes.len(),
        embedded: true,
    })
}

/// A new tensor written piece by piece (a folded weight computed chunk by chunk): its bytes go
/// straight to a reserved range of the scratch file when a store is on and the tensor is large,
/// else to memory. Nothing of it is resident but the pieces being written. Pieces are written at
/// their place, in any order and from several threads at once.
pub struct Writer {
    dest: Dest,
    len: usize,
    /// Bytes written so far (pieces never overlap: the caller's pieces tile the tensor).
    done: std::sync::atomic::AtomicUsize,
}

enum Dest {
    File { file: Arc<File>, offset: u64 },
    Memory(std::sync::Mutex<Vec<u8>>),
}

impl Writer {
    /// A writer for exactly `len` bytes; None when they cannot be held in memory.
    pub fn new(len: usize) -> Option<Writer> {
        let reserved = (len >= SPILL_MIN_BYTES)
            .then(|| {
                let mut guard = STORE.lock().ok()?;
                let store = guard.as_mut()?;
                let offset = store.end.div_ceil(ALIGN) * ALIGN;
                store.end = offset.checked_add(len as u64)?;
                Some(Dest::File {
                    file: store.file.clone(),
                    offset,
                })
            })
            .flatten();
        let dest = match reserved {
            Some(d) => d,
            None => {
                let mut v = Vec::new();
                v.try_reserve_exact(len).ok()?;
                v.resize(len, 0);
                Dest::Memory(std::sync::Mutex::new(v))
            }
        };
        Some(Writer {
            dest,
            len,
            done: 0.into(),
        })
    }

    /// Writes `bytes` at byte `at` of the tensor; refuses bytes past the length the writer was
    /// made for.
    pub fn write_at(&self, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        if at.checked_add(bytes.len()).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other("bytes past the reserved length"));
        }
        match &self.dest {
            Dest::File { file, offset } => file.write_all_at(bytes, *offset + at as u64)?,
            Dest::Memory(v) => {
                let mut v = v.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                v[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        self.done
            .fetch_add(bytes.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The finished tensor (all reserved bytes must have been written).
    pub fn finish(
        self,
        name: &str,
        dtype: crate::DataType,
        dims: &[i64],
    ) -> crate::Result<crate::Tensor> {
        use crate::error::IrError;
        let done = self.done.into_inner();
        if done != self.len {
            return Err(IrError::tensor(
                name,
                format!("{done} of {} bytes written", self.len),
            ));
        }
        let proto = onnx_protobuf::TensorProto {
            name: name.to_string(),
            data_type: dtype.code(),
            dims: dims.to_vec(),
            ..Default::default()
        };
        match self.dest {
            Dest::Memory(raw) => crate::Tensor::from_proto(onnx_protobuf::TensorProto {
                raw_data: raw
                    .into_inner()
                    .map_err(|_| IrError::tensor(name, "poisoned"))?,
                ..proto
            }),
            Dest::File { file, offset } => {
                // SAFETY: as in `spill`: a private scratch file whose written ranges never change.
                let map = unsafe { Mmap::map(&*file) }
                    .map_err(|e| IrError::tensor(name, format!("mapping scratch data: {e}")))?;
                let slice = ExternalSlice {
                    map: Arc::new(map),
                    file,
                    offset: usize::try_from(offset)
                        .map_err(|_| IrError::tensor(name, "scratch offset"))?,
                    len: self.len,
                    embedded: true,
                };
                crate::Tensor::with_external(proto, slice)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::{DataType, Tensor};

    /// The store is global: tests that turn it on take turns.
    pub(crate) static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn large_new_tensors_go_to_the_scratch_file_and_read_back_the_same() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        super::enable(dir.path()).unwrap();
        let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
        let t = Tensor::from_raw("w", DataType::U8, &[big.len() as i64], big.clone()).unwrap();
        let small = Tensor::from_raw("s", DataType::U8, &[16], vec![3; 16]).unwrap();
        let t2 = Tensor::from_raw("w2", DataType::U8, &[big.len() as i64], big.clone()).unwrap();
        super::disable();
        assert!(t.is_mapped() && t2.is_mapped(), "large tensors are spilled");
        assert!(!t.is_external(), "spilled tensors are not external data");
        assert!(!small.is_mapped(), "small tensors stay in memory");
        assert_eq!(&*t.raw_bytes().unwrap(), &big[..]);
        assert_eq!(&*t2.raw_bytes().unwrap(), &big[..]);
        assert_eq!(t.content_hash(), t2.content_hash());
        let kept = Tensor::from_raw("m", DataType::U8, &[big.len() as i64], big).unwrap();
        assert!(!kept.is_mapped(), "without a store, memory");
    }

    #[test]
    fn a_writer_takes_pieces_in_any_order_from_several_threads() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8).collect();
        // Pieces written backwards, odd and even ones by two threads.
        let write = |w: &super::Writer| {
            let pieces: Vec<(usize, &[u8])> = big.chunks(1 << 19).enumerate().rev().collect();
            std::thread::scope(|s| {
                for parity in 0..2 {
                    let pieces = &pieces;
                    s.spawn(move || {
                        for (k, p) in pieces.iter().filter(|(k, _)| k % 2 == parity) {
                            w.write_at(k << 19, p).unwrap();
                        }
                    });
                }
            });
        };
        super::enable(dir.path()).unwrap();
        let w = super::Writer::new(big.len()).unwrap();
        // Another spill between the reservation and the writes must not land in the range.
        let other = Tensor::from_raw("o", DataType::U8, &[2 << 20], vec![7; 2 << 20]).unwrap();
        write(&w);
        assert!(
            w.write_at(big.len(), &[1]).is_err(),
            "no more than reserved"
        );
        assert!(w.write_at(usize::MAX, &[1]).is_err(), "no overflow");
        let t = w.finish("w", DataType::U8, &[big.len() as i64]).unwrap();
        super::disable();
        assert!(t.is_mapped());
        assert_eq!(&*t.raw_bytes().unwrap(), &big[..]);
        assert!(other.raw_bytes().unwrap().iter().all(|b| *b == 7));
        let m = super::Writer::new(big.len()).unwrap();
        write(&m);
        let t = m.finish("m", DataType::U8, &[big.len() as i64]).unwrap();
        assert!(!t.is_mapped(), "without a store, memory");
        assert_eq!(&*t.raw_bytes().unwrap(), &big[..]);
        let short = super::Writer::new(4).unwrap();
        assert!(short.finish("s", DataType::U8, &[4]).is_err(), "unfinished");
    }
}
