//! IR → ONNX. Writes through a temporary file in the target folder and renames it, never over an
//! input. Tensors go into an external data file with `external_data` set, or automatically when the
//! model would pass protobuf's 2 GB limit; bytes are streamed from their source (mmap or memory).
//! A one-file output is started while the passes run (`WriteAhead`), so its graph lists the
//! input's large initializers first, under a fixed-width length (`wire::Skeleton::lead`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::{
    tensor_proto::DataLocation, tensor_shape_proto, type_proto, GraphProto, Message, ModelProto,
    NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

use crate::error::{IrError, Result};
use crate::model::{Dim, Graph, Model, Node, ValueInfo, ValueType};
use crate::tensor::Tensor;

/// Above this many bytes of tensor data a model cannot be one protobuf (2 GiB less a margin).
pub const AUTO_EXTERNAL_BYTES: u64 = (2u64 << 30) - (64 << 20);
/// Tensors below this size stay inline even when writing external data.
pub const EXTERNAL_MIN_BYTES: u64 = 1024;
const EXTERNAL_ALIGN: u64 = 4096;

/// Outputs are created like any new file (0666 less the umask), not private like temporaries.
fn output_mode() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o666)
}

#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Force tensors ≥ `EXTERNAL_MIN_BYTES` into `<output>.data`.
    pub external_data: bool,
    /// A retired scratch file (`spill::retire`) to adopt as the external data file, so that the
    /// tensors passes wrote into it are not copied (see `adopt`).
    pub scratch: Option<crate::spill::Scratch>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SaveSummary {
    pub model_bytes: u64,
    pub external_file: Option<PathBuf>,
    pub external_bytes: u64,
    /// Bytes of the external data that passes had already written, left in place (the scratch
    /// file became the data file).
    pub in_place_bytes: u64,
}

/// Total bytes of tensor data in the model (all graphs).
pub fn tensor_bytes(model: &Model) -> u64 {
    fn g(graph: &Graph) -> u64 {
        graph
            .initializers
            .iter()
            .map(|t| t.byte_size())
            .sum::<u64>()
            + graph
                .nodes
                .iter()
                .flat_map(|n| &n.attributes)
                .flat_map(|a| &a.graphs)
                .map(g)
                .sum::<u64>()
    }
    g(&model.graph)
}

/// The whole model as one in-memory protobuf with all data embedded (for small models and tests).
pub fn to_proto(model: &Model) -> Result<ModelProto> {
    model_proto(model, &mut Sink::Embed)
}

/// Tensors of the main graph at least this large are streamed into the output from where they
/// live (the input's mmap, or memory) instead of being copied into the protobuf message first.
const STREAM_MIN_BYTES: u64 = 4096;

/// Initializers at least this large with bytes in the input's files are written first in the
/// output, and a `WriteAhead` starts copying them before the passes run.
const LEAD_MIN_BYTES: u64 = 64 << 10;

/// One piece of an output to write (`wire::Piece`, owning its bytes and its tensor).
enum Out {
    Bytes(Vec<u8>),
    /// The graph's field header with a fixed-width length (`wire::graph_head`).
    GraphHead(u64),
    /// A tensor's raw bytes.
    Data(Box<Tensor>),
}

impl Out {
    fn len(&self) -> u64 {
        match self {
            Out::Bytes(b) => b.len() as u64,
            Out::GraphHead(_) => 1 + crate::wire::GRAPH_LEN_WIDTH as u64,
            Out::Data(t) => t.byte_size(),
        }
    }

    /// Whether `self` and `other` write the same bytes, a graph head aside: it is written in
    /// place once the graph's length is known (`stage_with`). Data is the same when it is the
    /// same range of the same open file.
    fn same(&self, other: &Out) -> bool {
        match (self, other) {
            (Out::Bytes(a), Out::Bytes(b)) => a == b,
            (Out::GraphHead(_), Out::GraphHead(_)) => true,
            (Out::Data(a), Out::Data(b)) => match (a.file_range(), b.file_range()) {
                (Some((f, x, n)), Some((g, y, m))) => std::ptr::eq(f, g) && x == y && n == m,
                _ => false,
            },
            _ => false,
        }
    }
}

/// The whole model, all data embedded, as pieces to write: the message is serialized with a
/// placeholder for each large tensor of the main graph, whose bytes are then streamed in place
/// (`wire::Skeleton`), so no second copy of the weights is ever made. Initializers `lead` (indices)
/// come first in the graph; also returns the index of the first piece after theirs.
/// `restore_strings` gives escaped non-UTF-8 string fields their bytes back (see `rawstr`).
fn plan(model: &Model, lead: &[usize], restore_strings: bool) -> Result<(Vec<Out>, usize)> {
    let mut holes = vec![];
    let proto = model_proto(model, &mut Sink::Holes(&mut holes))?;
    let mut skeleton = proto
        .write_to_bytes()
        .map_err(|e| IrError::Other(format!("serializing: {e}")))?;
    if restore_strings {
        skeleton = crate::rawstr::unescape(&skeleton)
            .ok_or_else(|| IrError::Other("restoring non-UTF-8 strings failed".into()))?;
    }
    let sk = crate::wire::Skeleton {
        bytes: &skeleton,
        holes: &holes,
        lead,
    };
    let (pieces, lead_end) = sk.pieces().ok_or_else(|| {
        IrError::Other("internal: the serialized model does not match its placeholders".into())
    })?;
    let inits = &model.graph.initializers;
    let out = pieces
        .into_iter()
        .map(|p| match p {
            crate::wire::Piece::Bytes(b) => Out::Bytes(b.to_vec()),
            crate::wire::Piece::Owned(b) => Out::Bytes(b),
            crate::wire::Piece::Data(k) => Out::Data(Box::new(inits[k].clone())),
            crate::wire::Piece::GraphHead(n) => Out::GraphHead(n),
        })
        .collect();
    Ok((out, lead_end))
}

/// Writes `pieces` in order to `out`, starting each only while `go(its index)`; returns how many
/// it wrote. When `out` writes to `file` (at its position), bytes already in a file are copied by
/// the kernel (`write_data`).
fn write_pieces(
    pieces: &[Out],
    out: &mut dyn Write,
    file: Option<&File>,
    go: &dyn Fn(usize) -> bool,
) -> std::io::Result<usize> {
    for (i, p) in pieces.iter().enumerate() {
        if !go(i) {
            out.flush()?;
            return Ok(i);
        }
        match p {
            Out::Bytes(b) => out.write_all(b)?,
            Out::GraphHead(n) => out.write_all(&crate::wire::graph_head(*n))?,
            Out::Data(t) => {
                write_data(t, out, file)?;
            }
        }
    }
    out.flush()?;
    Ok(pieces.len())
}

/// Writes the whole model, all data embedded, to `out` (see `plan` and `write_pieces`).
fn write_embedded(
    model: &Model,
    out: &mut dyn Write,
    file: Option<&File>,
    restore_strings: bool,
) -> Result<()> {
    let (pieces, _) = plan(model, &[], restore_strings)?;
    write_pieces(&pieces, out, file, &|_| true)
        .map(|_| ())
        .map_err(|e| IrError::Other(format!("writing the model: {e}")))
}

/// Whether a tensor is held packed (bits per element known), so its raw bytes are its data.
fn packed(t: &Tensor) -> bool {
    t.dtype().is_ok_and(|d| d.bits().is_some())
}

/// The address of the open file `t`'s bytes are in (tensors of one file share it).
fn file_id(t: &Tensor) -> Option<usize> {
    t.file_range().map(|(f, ..)| f as *const File as usize)
}

/// The main-graph initializers that lead the output (`WriteAhead`): of `LEAD_MIN_BYTES` or more,
/// held packed, with bytes in one of `files` (addresses, see `file_id`); by file (in that order),
/// then offset. A function of the model and `files` alone, so the output's layout does not
/// depend on how far a `WriteAhead` got.
fn lead(model: &Model, files: &[usize]) -> Vec<usize> {
    let mut v: Vec<(usize, u64, usize)> = model
        .graph
        .initializers
        .iter()
        .enumerate()
        .filter(|(_, t)| t.byte_size() >= LEAD_MIN_BYTES && packed(t))
        .filter_map(|(k, t)| {
            let (_, at, _) = t.file_range()?;
            let fi = files.iter().position(|&a| Some(a) == file_id(t))?;
            Some((fi, at, k))
        })
        .collect();
    v.sort_unstable();
    v.into_iter().map(|x| x.2).collect()
}

/// The start of a model's output, written while the passes run. Most of a model's bytes are
/// weights the passes leave as they are, and copying them into the output is most of a run that
/// changes little (the kernel's copy of MiniLM's 90 MB takes longer than all -O1's passes): so,
/// once the input is read, a thread starts the output in its temporary file, the input's large
/// initializers first (`lead`, with the graph's length left to fill in: `wire::Skeleton`).
///
/// `stage_with` then serializes the result the same way, keeps what was written ahead up to the
/// first piece that differs (a tensor a pass replaced or removed, a renamed one), and writes the
/// rest. Only speed depends on the guess: the output's bytes are the same whether the thread
/// finished, stopped early or never ran.
pub struct WriteAhead {
    path: PathBuf,
    tmp: Option<tempfile::NamedTempFile>,
    /// The input's files whose tensors lead (`lead`).
    files: Vec<usize>,
    planned: std::sync::Arc<Vec<Out>>,
    /// How many of `planned` the thread may start (lowered to stop it).
    limit: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    writer: Option<std::thread::JoinHandle<std::io::Result<usize>>>,
}

impl WriteAhead {
    /// Starts writing `model`'s output for `path`; None when there is nothing worth writing
    /// ahead (no large initializer in a file) or the output will not be one file
    /// (`external_data`, or over protobuf's limit).
    pub fn start(model: &Model, path: &Path, external_data: bool) -> Option<WriteAhead> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        if external_data || model.escaped_strings || tensor_bytes(model) > AUTO_EXTERNAL_BYTES {
            return None;
        }
        let mut files = vec![];
        for t in &model.graph.initializers {
            if let Some(a) = file_id(t) {
                if !files.contains(&a) {
                    files.push(a);
                }
            }
        }
        let lead = lead(model, &files);
        if lead.is_empty() {
            return None;
        }
        let (mut pieces, lead_end) = plan(model, &lead, false).ok()?;
        pieces.truncate(lead_end);
        let tmp = new_temp(path).ok()?;
        let file = tmp.as_file().try_clone().ok()?;
        let planned = Arc::new(pieces);
        let limit = Arc::new(AtomicUsize::new(usize::MAX));
        let (p, l) = (planned.clone(), limit.clone());
        let writer = std::thread::Builder::new()
            .name("wcc-write-ahead".into())
            .spawn(move || {
                let mut w = BufWriter::with_capacity(1 << 20, &file);
                write_pieces(&p, &mut w, Some(&file), &|i| i < l.load(Ordering::Acquire))
            })
            .ok()?;
        Some(WriteAhead {
            path: path.to_path_buf(),
            tmp: Some(tmp),
            files,
            planned,
            limit,
            writer: Some(writer),
        })
    }

    /// Stops the thread after the pieces it wrote that `pieces` (the output) begins with, and
    /// returns the temporary file cut after them, positioned there, and how many they are.
    fn finish(mut self, pieces: &[Out]) -> std::io::Result<(tempfile::NamedTempFile, usize)> {
        use std::io::{Seek, SeekFrom};
        use std::sync::atomic::Ordering;
        let keep = self
            .planned
            .iter()
            .zip(pieces)
            .take_while(|(a, b)| a.same(b))
            .count();
        self.limit.store(keep, Ordering::Release);
        // A thread that failed (a full disk, say) leaves nothing to keep: the rest of the
        // output is written from the start, and fails the same way if it must.
        let written = match self.writer.take().map(|h| h.join()) {
            Some(Ok(Ok(n))) => n.min(keep),
            _ => 0,
        };
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| std::io::Error::other("write-ahead finished twice"))?;
        let at: u64 = pieces[..written].iter().map(Out::len).sum();
        let mut f = tmp.as_file();
        f.set_len(at)?;
        f.seek(SeekFrom::Start(at))?;
        Ok((tmp, written))
    }
}

impl Drop for WriteAhead {
    /// Stops and waits for the thread; the temporary file is deleted.
    fn drop(&mut self) {
        self.limit.store(0, std::sync::atomic::Ordering::Release);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new temporary file in `path`'s folder, with the mode of a new output file.
fn new_temp(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".wcc-")
        .permissions(output_mode())
        .tempfile_in(folder(path))
}

/// The external-data location of the tensors `to_bytes_with_refs` leaves out.
pub const REFS_LOCATION: &str = "wcc-tensors";

/// The model serialized in memory without its large tensors, for a backend that takes their
/// bytes from wcc instead of parsing them out of the message (tract: `wcc_runtime` parses them
/// as typed graph inputs, then reads each into the tensor tract keeps, finding it by name): every
/// main-graph tensor of `min_bytes` or more held packed is an external-data reference to location
/// `REFS_LOCATION`, with offset = its index in the returned list (which shares the tensors'
/// storage: nothing is copied) and length = its size in bytes.
pub fn to_bytes_with_refs(model: &Model, min_bytes: u64) -> Result<(Vec<u8>, Vec<Tensor>)> {
    let mut refs = vec![];
    let proto = model_proto(model, &mut Sink::Refs(min_bytes, &mut refs))?;
    let bytes = proto
        .write_to_bytes()
        .map_err(|e| IrError::Other(format!("serializing: {e}")))?;
    Ok((bytes, refs))
}

/// The model serialized in memory, for backends and tests. String fields that were not UTF-8 in
/// the file stay escaped here (every protobuf parser accepts the result, and names still match
/// between models); `save` writes their original bytes.
pub fn to_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let want = usize::try_from(tensor_bytes(model))
        .ok()
        .and_then(|n| n.checked_add(1 << 20));
    if want.is_none_or(|n| out.try_reserve_exact(n).is_err()) {
        return Err(IrError::Other(format!(
            "cannot hold the model in memory ({} bytes of tensors)",
            tensor_bytes(model)
        )));
    }
    write_embedded(model, &mut out, None, false)?;
    Ok(out)
}

/// Writes the model to `path` atomically. Refuses to write over any file the model was read from.
pub fn save(model: &Model, path: &Path, opts: &SaveOptions) -> Result<SaveSummary> {
    stage_with(model, path, opts, None)?.commit()
}

/// A model written to temporary files in its destination's folder, not yet in place: `commit`
/// renames them into place; dropped, they are deleted (nothing is left behind).
pub struct Staged {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
    data: Option<(tempfile::NamedTempFile, PathBuf)>,
    model_bytes: u64,
    external_bytes: u64,
    in_place_bytes: u64,
}

impl Staged {
    /// Renames the files into place (the external data first, so the model never points at
    /// data that is not there).
    pub fn commit(self) -> Result<SaveSummary> {
        let werr = |detail: String| IrError::Write {
            path: self.path.clone(),
            detail,
        };
        let external_file = match self.data {
            Some((d, data_path)) => {
                d.persist(&data_path)
                    .map_err(|e| werr(format!("renaming into {}: {e}", data_path.display())))?;
                Some(data_path)
            }
            None => None,
        };
        self.tmp
            .persist(&self.path)
            .map_err(|e| werr(format!("renaming: {e}")))?;
        Ok(SaveSummary {
            model_bytes: self.model_bytes,
            external_file,
            external_bytes: self.external_bytes,
            in_place_bytes: self.in_place_bytes,
        })
    }
}

/// Writes the model beside `path` (see `Staged`), checking first that `path` and its data file
/// are none of the files the model was read from.
pub fn stage(model: &Model, path: &Path, opts: &SaveOptions) -> Result<Staged> {
    stage_with(model, path, opts, None)
}

/// `stage`, going on from what `ahead` wrote when the output is one file (see `WriteAhead`).
pub fn stage_with(
    model: &Model,
    path: &Path,
    opts: &SaveOptions,
    ahead: Option<WriteAhead>,
) -> Result<Staged> {
    let werr = |detail: String| IrError::Write {
        path: path.into(),
        detail,
    };
    let dir = folder(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| werr("not a file path".into()))?
        .to_string_lossy()
        .to_string();
    let data_name = format!("{file_name}.data");
    let data_path = dir.join(&data_name);
    let cdir = dir
        .canonicalize()
        .map_err(|e| werr(format!("folder: {e}")))?;
    for target in [cdir.join(&file_name), cdir.join(&data_name)] {
        if model.sources.contains(&target) {
            return Err(werr(format!(
                "{} is one of the input's files: refusing to overwrite it",
                target.display()
            )));
        }
    }
    let external = opts.external_data || tensor_bytes(model) > AUTO_EXTERNAL_BYTES;
    let ahead = ahead.filter(|a| !external && !model.escaped_strings && a.path == path);
    let mut tmp_data = None;
    let mut external_bytes = 0;
    let mut in_place_bytes = 0;
    let tmp;
    if external {
        tmp = new_temp(path).map_err(|e| werr(format!("temporary file: {e}")))?;
        let adopted = opts
            .scratch
            .as_ref()
            .and_then(|sc| adopt(sc, model, &dir, tmp.as_file()));
        let (f, scratch) = match adopted {
            Some((f, sc)) => (f, Some(sc)),
            None => (
                new_temp(path).map_err(|e| werr(format!("temporary file: {e}")))?,
                None,
            ),
        };
        let mut file = f.reopen().map_err(|e| werr(e.to_string()))?;
        let start = scratch.as_ref().map_or(0, |s| s.end);
        {
            use std::io::{Seek, SeekFrom};
            file.seek(SeekFrom::Start(start))
                .map_err(|e| werr(e.to_string()))?;
        }
        let shared = file.try_clone().map_err(|e| werr(e.to_string()))?;
        tmp_data = Some(f);
        let mut sink = ExternalSink {
            location: data_name.clone(),
            out: BufWriter::with_capacity(1 << 20, file),
            file: shared,
            offset: start,
            scratch,
        };
        let proto = model_proto(model, &mut Sink::External(&mut sink))?;
        sink.out
            .flush()
            .map_err(|e| werr(format!("writing {}: {e}", data_path.display())))?;
        if let Some(sc) = &mut sink.scratch {
            in_place_bytes = sc.clear_dead(&sink.file).map_err(|e| {
                werr(format!(
                    "clearing unused scratch data in {}: {e}",
                    data_path.display()
                ))
            })?;
        }
        external_bytes = sink.offset;
        let mut bytes = proto
            .write_to_bytes()
            .map_err(|e| werr(format!("serializing: {e}")))?;
        if model.escaped_strings {
            // Escaped non-UTF-8 string fields get their bytes back (see `rawstr`).
            bytes = crate::rawstr::unescape(&bytes)
                .ok_or_else(|| werr("restoring non-UTF-8 strings failed".into()))?;
        }
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&bytes).map_err(|e| werr(e.to_string()))?;
        w.flush().map_err(|e| werr(e.to_string()))?;
    } else {
        let files = ahead.as_ref().map_or(&[][..], |a| &a.files[..]);
        let (pieces, _) = plan(model, &lead(model, files), model.escaped_strings)?;
        let from;
        (tmp, from) = match ahead {
            Some(a) => a.finish(&pieces),
            None => new_temp(path).map(|t| (t, 0)),
        }
        .map_err(|e| werr(format!("temporary file: {e}")))?;
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write_pieces(&pieces[from..], &mut w, Some(tmp.as_file()), &|_| true)
            .map_err(|e| werr(e.to_string()))?;
        drop(w);
        // A graph head written ahead holds the input's graph length: the output's goes there.
        if let Some(g) = pieces[..from]
            .iter()
            .position(|p| matches!(p, Out::GraphHead(_)))
        {
            use std::os::unix::fs::FileExt;
            let at: u64 = pieces[..g].iter().map(Out::len).sum();
            if let Out::GraphHead(n) = pieces[g] {
                tmp.as_file()
                    .write_all_at(&crate::wire::graph_head(n), at)
                    .map_err(|e| werr(e.to_string()))?;
            }
        }
    }
    let model_bytes = tmp.as_file().metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Staged {
        path: path.to_path_buf(),
        tmp,
        data: tmp_data.map(|d| (d, data_path)),
        model_bytes,
        external_bytes,
        in_place_bytes,
    })
}

/// A scratch file taken over as the output's data file: the tensors in it stay where they are.
struct Adopted {
    /// The scratch file's descriptor (tensors in it are recognized by it).
    fd: std::os::fd::RawFd,
    /// Bytes of the scratch file before the appended tensors.
    end: u64,
    /// (offset, length) of the scratch tensors the output refers to.
    live: Vec<(u64, u64)>,
}

impl Adopted {
    /// Zeroes (punches out) what no tensor of the output refers to: intermediates and folded
    /// weights that were replaced, so no stale data reaches the output. Returns the live bytes.
    fn clear_dead(&mut self, file: &File) -> std::io::Result<u64> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        self.live.sort_unstable();
        let mut at = 0u64;
        let mut live = 0u64;
        let mut gaps = vec![];
        for &(off, len) in &self.live {
            if off > at {
                gaps.push((at, off - at));
            }
            live += (off + len).saturating_sub(at.max(off));
            at = at.max(off + len);
        }
        if self.end > at {
            gaps.push((at, self.end - at));
        }
        for (off, len) in gaps {
            // SAFETY: a plain syscall on an open descriptor; offsets are within the file.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r != 0 {
                // A filesystem without holes: write the zeros.
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    file.write_all_at(&zeros[..n as usize], off + done)?;
                    done += n;
                }
            }
        }
        Ok(live)
    }
}

/// Takes `scratch` over as the output's data file when the output refers to at least three
/// quarters of what it holds (so the file is at most a third larger than its data; the rest are
/// holes): links it into `dir` under a temporary name (the file was created unlinked, with
/// O_TMPFILE) with the mode of `like`, a new output file. None (copy everything, as without a
/// scratch file) when it holds less, or the filesystem cannot link it there (another
/// filesystem, no O_TMPFILE, no /proc).
///
/// Only ranges no output tensor refers to are punched out later (`Adopted::clear_dead`): what
/// the rewritten model still reads (verification runs while the output is written) is untouched.
fn adopt(
    scratch: &crate::spill::Scratch,
    model: &Model,
    dir: &Path,
    like: &File,
) -> Option<(tempfile::NamedTempFile, Adopted)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let fd = scratch.file.as_raw_fd();
    let mut referenced = 0u64;
    model.graph.for_each_graph(&mut |g: &Graph| {
        for t in &g.initializers {
            if let Some((f, _, len)) = t.file_range() {
                if f.as_raw_fd() == fd {
                    referenced += len as u64;
                }
            }
        }
    });
    if referenced == 0 || referenced < scratch.end / 4 * 3 {
        return None;
    }
    let from = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    // The mode of a new output file (`like`, created with `output_mode` under the umask).
    let mode = like.metadata().ok()?.permissions();
    scratch.file.set_permissions(mode).ok()?;
    let mut file = Some(scratch.file.try_clone().ok()?);
    // A fresh temporary name in `dir` (tempfile retries taken ones), deleted with the handle.
    let linked = tempfile::Builder::new()
        .prefix(".wcc-")
        .make_in(dir, |path| {
            let to = std::ffi::CString::new(path.as_os_str().as_bytes())?;
            // SAFETY: two NUL-terminated paths; linkat does not keep them.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            file.take()
                .ok_or_else(|| std::io::Error::other("linked twice"))
        })
        .ok()?;
    Some((
        linked,
        Adopted {
            fd,
            end: scratch.end,
            live: vec![],
        },
    ))
}

struct ExternalSink {
    location: String,
    out: BufWriter<File>,
    /// `out`'s file, sharing its position (for `copy_range`).
    file: File,
    offset: u64,
    /// The scratch file `out` writes after, when it was adopted.
    scratch: Option<Adopted>,
}

impl ExternalSink {
    fn put(&mut self, t: &Tensor) -> Result<TensorProto> {
        use std::os::fd::AsRawFd;
        let werr = |e: std::io::Error| IrError::Other(format!("writing external data: {e}"));
        if let (Some(sc), Some((f, at, len))) = (&mut self.scratch, t.file_range()) {
            if f.as_raw_fd() == sc.fd {
                sc.live.push((at, len as u64));
                return Ok(external_header(t, &self.location, at, len as u64));
            }
        }
        let pad = (EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        self.out.write_all(&vec![0u8; pad as usize]).map_err(werr)?;
        self.offset += pad;
        let len = write_data(t, &mut self.out, Some(&self.file)).map_err(werr)?;
        let p = external_header(t, &self.location, self.offset, len as u64);
        self.offset += len as u64;
        Ok(p)
    }
}

/// `t`'s metadata pointing at `length` bytes at `offset` of the external file `location`.
fn external_header(t: &Tensor, location: &str, offset: u64, length: u64) -> TensorProto {
    let mut p = t.header_proto();
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
        ..Default::default()
    };
    p.external_data = vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", length.to_string()),
    ];
    p.data_location = DataLocation::EXTERNAL.into();
    p
}

/// Writes `t`'s data to `w` and returns its length. When `w` writes to `file` (at its position)
/// and the data is already in a file, `w` is flushed and the kernel copies the bytes
/// (`copy_range`), page cache to page cache; otherwise they are streamed in chunks.
fn write_data(t: &Tensor, w: &mut dyn Write, file: Option<&File>) -> std::io::Result<usize> {
    match (file, t.file_range()) {
        (Some(dst), Some((src, at, len))) => {
            w.flush()?;
            copy_range(src, at, dst, len)?;
            Ok(len)
        }
        _ => {
            let mut len = 0usize;
            t.for_each_chunk(&mut |c| {
                len += c.len();
                w.write_all(c)
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(len)
        }
    }
}

/// Appends `len` bytes of `src` from offset `at` to `dst` (at its current position), with
/// `copy_file_range` (no copy through wcc's memory); with reads and writes where the kernel or
/// the filesystems cannot.
fn copy_range(src: &File, at: u64, mut dst: &File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut off = i64::try_from(at).map_err(std::io::Error::other)?;
    let mut left = len;
    while left > 0 {
        // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
        // pointer; a null output offset means dst's own position, which the call advances.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off,
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                left,
                0,
            )
        };
        if n > 0 {
            left -= n as usize;
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source ended early",
            ));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM) => {
                break
            }
            _ => return Err(e),
        }
    }
    // Fallback for what the kernel would not copy.
    let mut buf = vec![0u8; left.min(4 << 20)];
    while left > 0 {
        let n = left.min(buf.len());
        src.read_exact_at(&mut buf[..n], off as u64)?;
        dst.write_all(&buf[..n])?;
        off += n as i64;
        left -= n;
    }
    Ok(())
}

/// Where tensor data goes while the message is built.
enum Sink<'a> {
    /// Into the message (`raw_data` or the typed fields the tensor was read with).
    Embed,
    /// Large main-graph tensors with bytes in memory or in a file get a one-byte placeholder
    /// `raw_data`, listed as (index, length) for `wire::Skeleton`; everything else is embedded.
    Holes(&'a mut Vec<(usize, u64)>),
    /// Tensors of `EXTERNAL_MIN_BYTES` or more go to the external data file.
    External(&'a mut ExternalSink),
    /// Large main-graph tensors are listed instead of written (see `to_bytes_with_refs`).
    Refs(u64, &'a mut Vec<Tensor>),
}

fn model_proto(model: &Model, sink: &mut Sink) -> Result<ModelProto> {
    let mut p = model.rest.clone();
    p.ir_version = model.ir_version;
    p.opset_import = model
        .opset_imports
        .iter()
        .map(|(d, v)| OperatorSetIdProto {
            domain: d.clone(),
            version: *v,
            ..Default::default()
        })
        .collect();
    p.graph = protobuf::MessageField::some(graph_proto(&model.graph, sink)?);
    p.functions = model.functions.clone();
    Ok(p)
}

fn graph_proto(g: &Graph, sink: &mut Sink) -> Result<GraphProto> {
    let mut p = g.rest.clone();
    p.name = g.name.clone();
    // Subgraphs embed their tensors (or send them to the external file): only the main graph's
    // initializers are streamed into place.
    let mut inner = match sink {
        Sink::Holes(_) | Sink::Embed | Sink::Refs(..) => Sink::Embed,
        Sink::External(s) => Sink::External(s),
    };
    p.node = g
        .nodes
        .iter()
        .map(|n| node_proto(n, &mut inner))
        .collect::<Result<_>>()?;
    p.initializer = g
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| match sink {
            Sink::External(s) if t.byte_size() >= EXTERNAL_MIN_BYTES && packed(t) => s.put(t),
            Sink::Holes(holes)
                if t.byte_size() >= STREAM_MIN_BYTES && packed(t) && t.has_raw_storage() =>
            {
                let mut h = t.header_proto();
                h.raw_data = vec![0];
                holes.push((i, t.byte_size()));
                Ok(h)
            }
            Sink::Refs(min, refs) if t.byte_size() >= *min && packed(t) && t.has_raw_storage() => {
                let h = external_header(t, REFS_LOCATION, refs.len() as u64, t.byte_size());
                refs.push(t.clone());
                Ok(h)
            }
            _ => t.to_embedded_proto(),
        })
        .collect::<Result<_>>()?;
    p.input = g.inputs.iter().map(value_info_proto).collect();
    p.output = g.outputs.iter().map(value_info_proto).collect();
    p.value_info = g.value_info.iter().map(value_info_proto).collect();
    Ok(p)
}

fn node_proto(n: &Node, sink: &mut Sink) -> Result<NodeProto> {
    let mut p = n.rest.clone();
    p.name = n.name.clone();
    p.op_type = n.op_type.clone();
    p.domain = n.domain.clone();
    p.input = n.inputs.clone();
    p.output = n.outputs.clone();
    p.attribute = n
        .attributes
        .iter()
        .map(|a| {
            let mut ap = a.proto.clone();
            use onnx_protobuf::attribute_proto::AttributeType;
            match a.proto.type_.enum_value() {
                Ok(AttributeType::GRAPH) if !a.graphs.is_empty() => {
                    ap.g = protobuf::MessageField::some(graph_proto(&a.graphs[0], sink)?)
                }
                Ok(AttributeType::GRAPHS) => {
                    ap.graphs = a
                        .graphs
                        .iter()
                        .map(|g| graph_proto(g, sink))
                        .collect::<Result<_>>()?
                }
                _ => {}
            }
            Ok(ap)
        })
        .collect::<Result<_>>()?;
    Ok(p)
}

pub fn value_info_proto(v: &ValueInfo) -> ValueInfoProto {
    let mut p = v.rest.clone();
    p.name = v.name.clone();
    if let Some(tp) = crate::import::original_type(v) {
        p.type_ = protobuf::MessageField::some(tp.clone());
        return p;
    }
    p.type_ = match &v.ty {
        ValueType::Missing => protobuf::MessageField::none(),
        ValueType::Other(tp) => protobuf::MessageField::some(tp.clone()),
        ValueType::Tensor(t) => {
            let shape = t.shape.as_ref().map(|dims| TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| tensor_shape_proto::Dimension {
                        value: match d {
                            Dim::Known(v) => {
                                Some(tensor_shape_proto::dimension::Value::DimValue(*v))
                            }
                            Dim::Sym(s) => {
                                Some(tensor_shape_proto::dimension::Value::DimParam(s.clone()))
                            }
                            Dim::Unknown => None,
                        },
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            protobuf::MessageField::some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: t.dtype.map(|d| d.code()).unwrap_or(0),
                    shape: shape.into(),
                    ..Default::default()
                })),
                ..Default::default()
            })
        }
    };
    p
}

#[cfg(test)]
mod tests {
    use crate::{DataType, Tensor};

    /// A model with one 4 MiB u8 initializer `w` feeding an Identity.
    fn model(w: Tensor) -> crate::Model {
        use onnx_protobuf::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
        let proto = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                version: 17,
                ..Default::default()
            }],
            graph: protobuf::MessageField::some(GraphProto {
                name: "g".into(),
                node: vec![NodeProto {
                    op_type: "Identity".into(),
                    input: vec!["w".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                output: vec![crate::export::value_info_proto(&crate::ValueInfo::tensor(
                    "y",
                    crate::TensorType::known(DataType::U8, &[4 << 20]),
                ))],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = crate::import::from_proto(proto, None, std::path::Path::new("m")).unwrap();
        m.graph.initializers.push(w);
        m
    }

    #[test]
    fn an_adopted_scratch_file_keeps_live_tensors_in_place_and_zeroes_the_rest() {
        let _turn = crate::spill::tests::TURN
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        crate::spill::enable(dir.path()).unwrap();
        // 4 MiB live, 1 MiB dead: at least three quarters live, so the file is adopted.
        let n = 4usize << 20;
        let dead = Tensor::from_raw("d", DataType::U8, &[1 << 20], vec![250; 1 << 20]).unwrap();
        let live: Vec<u8> = (0..n).map(|i| (i % 249) as u8).collect();
        let w = Tensor::from_raw("w", DataType::U8, &[n as i64], live.clone()).unwrap();
        let scratch = crate::spill::retire().unwrap();
        crate::spill::disable();
        assert!(dead.is_mapped() && w.is_mapped());
        let m = model(w);
        let out = dir.path().join("o.onnx");
        let opts = super::SaveOptions {
            external_data: true,
            scratch: Some(scratch),
        };
        let s = super::save(&m, &out, &opts).unwrap();
        assert_eq!(s.in_place_bytes, n as u64, "the live tensor is not copied");
        let data = std::fs::read(dir.path().join("o.onnx.data")).unwrap();
        assert!(
            !data.contains(&250),
            "the dead tensor's bytes are cleared out"
        );
        let back = crate::import::load(&out).unwrap();
        assert_eq!(&*back.graph.initializers[0].raw_bytes().unwrap(), &live[..]);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(
            left.len(),
            2,
            "the model and its data, nothing else: {left:?}"
        );
        drop(dead);
    }

    /// A model file `in.onnx` in `dir` with u8 initializers w0..w3 of 320 KiB each (distinct
    /// contents), each through an Identity to an output, loaded (the tensors are views of it: the
    /// file is over `import`'s 1 MiB for mapping).
    fn weights_file(dir: &std::path::Path) -> crate::Model {
        use onnx_protobuf::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
        use protobuf::Message;
        let n = 320usize << 10;
        let proto = ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            opset_import: vec![OperatorSetIdProto {
                version: 17,
                ..Default::default()
            }],
            graph: protobuf::MessageField::some(GraphProto {
                name: "g".into(),
                node: (0..4)
                    .map(|i| NodeProto {
                        op_type: "Identity".into(),
                        input: vec![format!("w{i}")],
                        output: vec![format!("y{i}")],
                        ..Default::default()
                    })
                    .collect(),
                initializer: (0..4)
                    .map(|i| TensorProto {
                        name: format!("w{i}"),
                        data_type: DataType::U8.code(),
                        dims: vec![n as i64],
                        raw_data: (0..n).map(|k| ((k * (i + 3)) % 251) as u8).collect(),
                        ..Default::default()
                    })
                    .collect(),
                output: (0..4)
                    .map(|i| {
                        crate::export::value_info_proto(&crate::ValueInfo::tensor(
                            &format!("y{i}"),
                            crate::TensorType::known(DataType::U8, &[n as i64]),
                        ))
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let path = dir.join("in.onnx");
        std::fs::write(&path, proto.write_to_bytes().unwrap()).unwrap();
        let m = crate::import::load(&path).unwrap();
        assert!(m
            .graph
            .initializers
            .iter()
            .all(|t| t.file_range().is_some()));
        m
    }

    type Change = fn(&mut crate::Model);

    #[test]
    fn an_output_written_ahead_is_the_planned_bytes_whatever_the_passes_changed() {
        use super::*;
        use protobuf::Message;
        // Not while another test has the scratch file on (new tensors would go there).
        let _turn = crate::spill::tests::TURN
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let input = weights_file(dir.path());
        let n = 320usize << 10;
        let changes: [(&str, Change); 5] = [
            ("nothing", |_| {}),
            ("w1 replaced", |m| {
                m.graph.initializers[1] =
                    Tensor::from_raw("w1", DataType::U8, &[320 << 10], vec![7; 320 << 10]).unwrap()
            }),
            ("w0 removed", |m| {
                m.graph.initializers.remove(0);
            }),
            ("w2 renamed", |m| {
                m.graph.initializers[2].proto.name = "z".into()
            }),
            ("one added in front", |m| {
                let t = Tensor::from_raw("v", DataType::U8, &[320 << 10], vec![9; 320 << 10]);
                m.graph.initializers.insert(0, t.unwrap())
            }),
        ];
        for (what, change) in changes {
            // The thread stopped wherever it is, and finished: the same bytes either way.
            let mut outputs = vec![];
            for wait in [false, true] {
                let out = dir.path().join("out.onnx");
                let ahead = WriteAhead::start(&input, &out, false).expect("tensors to lead");
                while wait && !ahead.writer.as_ref().is_some_and(|h| h.is_finished()) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let files = ahead.files.clone();
                let mut m = input.clone();
                change(&mut m);
                stage_with(&m, &out, &SaveOptions::default(), Some(ahead))
                    .unwrap()
                    .commit()
                    .unwrap();
                let got = std::fs::read(&out).unwrap();
                // The file is the model's plan, whatever the thread had written.
                let lead = lead(&m, &files);
                let (pieces, _) = plan(&m, &lead, false).unwrap();
                let mut want = vec![];
                write_pieces(&pieces, &mut want, None, &|_| true).unwrap();
                assert!(got == want, "{what}: the output is not its plan");
                // Parsed, it is the model with the lead initializers first.
                let mut reordered = m.clone();
                let mut rest: Vec<Tensor> = vec![];
                let mut first: Vec<Option<Tensor>> = vec![None; lead.len()];
                for (k, t) in m.graph.initializers.iter().enumerate() {
                    match lead.iter().position(|&l| l == k) {
                        Some(i) => first[i] = Some(t.clone()),
                        None => rest.push(t.clone()),
                    }
                }
                reordered.graph.initializers = first.into_iter().flatten().chain(rest).collect();
                let parsed = onnx_protobuf::ModelProto::parse_from_bytes(&got).unwrap();
                assert!(parsed == to_proto(&reordered).unwrap(), "{what}");
                // The input's tensors lead, in the input's order; w3 is in every case.
                let inits = &m.graph.initializers;
                let at: Vec<u64> = lead
                    .iter()
                    .map(|&k| inits[k].file_range().unwrap().1)
                    .collect();
                assert!(at.windows(2).all(|p| p[0] < p[1]), "{what}: {at:?}");
                assert!(lead.iter().any(|&k| inits[k].name() == "w3"), "{what}");
                assert!(got.len() > 3 * n, "{what}");
                outputs.push(got);
            }
            assert!(
                outputs[0] == outputs[1],
                "{what}: depends on the thread's progress"
            );
        }
        // Forced to external data: what was written ahead is dropped, nothing is left behind.
        let out = dir.path().join("ext.onnx");
        let ahead = WriteAhead::start(&input, &out, false).unwrap();
        let opts = SaveOptions {
            external_data: true,
            ..Default::default()
        };
        stage_with(&input, &out, &opts, Some(ahead))
            .unwrap()
            .commit()
            .unwrap();
        assert!(std::fs::metadata(&out).unwrap().len() < 4096);
        // Started and dropped (a pass failed): its temporary file goes with it.
        drop(WriteAhead::start(&input, &dir.path().join("never.onnx"), false).unwrap());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["ext.onnx", "ext.onnx.data", "in.onnx", "out.onnx"]);
        // Nothing large in a file, or external output asked for: no thread.
        assert!(WriteAhead::start(&input, &out, true).is_none());
        assert!(WriteAhead::start(
            &model(Tensor::from_raw("w", DataType::U8, &[4 << 20], vec![1; 4 << 20]).unwrap()),
            &out,
            false
        )
        .is_none());
    }
}
