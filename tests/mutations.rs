//! A seeded structural mutator over the fixtures: each run makes a few hundred broken or unusual
//! models (permutations, dims, element types, arities, attribute types and values, shape tensors,
//! external-data fields, cycles, op types) and runs `wcc print`, `wcc inspect` and
//! `wcc optimize -O1` on each. Every command must end with exit 0, 1 or 2, print no panic and no
//! internal error, finish within a time limit, and leave no output file when it fails.
//!
//! `WCC_MUTATIONS=N` sets the number of mutants (default 240), `WCC_MUTATION_SEED=S` the seed.
//! A failure prints the seed and the mutant's number; `WCC_MUTANT=I` replays only that one and
//! keeps the file as `target/mutant-I.onnx`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    StringStringEntryProto,
};
use protobuf::{Enum, Message};

/// xorshift64*: small, seeded, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
    /// An integer from a distribution that favours the values that break things.
    fn nasty_int(&mut self) -> i64 {
        const V: [i64; 16] = [
            0,
            -1,
            1,
            2,
            -2,
            3,
            7,
            64,
            -64,
            1 << 20,
            1 << 31,
            1 << 40,
            i64::MAX,
            i64::MIN,
            i32::MAX as i64,
            -(1 << 40),
        ];
        if self.below(4) == 0 {
            (self.next() % 16) as i64 - 8
        } else {
            V[self.below(V.len())]
        }
    }
}

const KINDS: [&str; 15] = [
    "perm",
    "input-dim",
    "initializer-dims",
    "dtype",
    "drop-input",
    "extra-input",
    "outputs",
    "attribute-type",
    "attribute-ints",
    "shape-tensor",
    "external-data",
    "cycle",
    "op-type",
    "duplicate-name",
    "opset",
];

fn nodes_with<'a>(g: &'a mut GraphProto, op: &str) -> Vec<&'a mut NodeProto> {
    g.node.iter_mut().filter(|n| n.op_type == op).collect()
}

/// Applies one mutation of kind `k`; returns a description (None when it found nothing to do).
fn mutate(m: &mut ModelProto, k: &str, r: &mut Rng) -> Option<String> {
    let g = m.graph.as_mut()?;
    let nn = g.node.len();
    match k {
        "perm" => {
            let mut ts = nodes_with(g, "Transpose");
            let len = ts.len();
            let t = ts.get_mut(r.below(len))?;
            let n = 1 + r.below(5);
            let perm: Vec<i64> = (0..n).map(|_| r.nasty_int().clamp(-3, 5)).collect();
            t.attribute.retain(|a| a.name != "perm");
            t.attribute.push(AttributeProto {
                name: "perm".into(),
                ints: perm.clone(),
                type_: AttributeType::INTS.into(),
                ..Default::default()
            });
            Some(format!("Transpose '{}' perm {perm:?}", t.name))
        }
        "input-dim" => {
            let i = r.below(g.input.len().max(1));
            let v = g.input.get_mut(i)?;
            let Some(type_proto::Value::TensorType(tt)) = &mut v.type_.as_mut()?.value else {
                return None;
            };
            let s = tt.shape.as_mut()?;
            let n = s.dim.len();
            let d = s.dim.get_mut(r.below(n))?;
            let val = r.nasty_int();
            d.value = Some(tensor_shape_proto::dimension::Value::DimValue(val));
            Some(format!("input '{}' dim = {val}", v.name))
        }
        "initializer-dims" => {
            let n = g.initializer.len();
            let t = g.initializer.get_mut(r.below(n))?;
            let k = t.dims.len();
            if k == 0 || r.below(3) == 0 {
                t.dims.push(r.nasty_int());
            } else {
                t.dims[r.below(k)] = r.nasty_int();
            }
            Some(format!("initializer '{}' dims {:?}", t.name, t.dims))
        }
        "dtype" => match r.below(3) {
            0 => {
                let n = g.initializer.len();
                let t = g.initializer.get_mut(r.below(n))?;
                t.data_type = r.below(26) as i32;
                Some(format!("initializer '{}' dtype {}", t.name, t.data_type))
            }
            1 => {
                let i = r.below(g.input.len().max(1));
                let v = g.input.get_mut(i)?;
                let Some(type_proto::Value::TensorType(tt)) = &mut v.type_.as_mut()?.value else {
                    return None;
                };
                tt.elem_type = r.below(26) as i32;
                Some(format!("input '{}' elem_type {}", v.name, tt.elem_type))
            }
            _ => {
                let mut cs = nodes_with(g, "Cast");
                let len = cs.len();
                let c = cs.get_mut(r.below(len))?;
                let to = r.nasty_int().clamp(-2, 30);
                for a in &mut c.attribute {
                    if a.name == "to" {
                        a.i = to;
                    }
                }
                Some(format!("Cast '{}' to {to}", c.name))
            }
        },
        "drop-input" => {
            let n = g.node.get_mut(r.below(nn))?;
            if n.input.is_empty() {
                return None;
            }
            let i = r.below(n.input.len());
            if r.below(2) == 0 {
                n.input.remove(i);
            } else {
                n.input[i].clear();
            }
            Some(format!("{} '{}' loses input #{i}", n.op_type, n.name))
        }
        "extra-input" => {
            let name = g.initializer.first().map(|t| t.name.clone())?;
            let n = g.node.get_mut(r.below(nn))?;
            n.input.push(name);
            Some(format!("{} '{}' gets an extra input", n.op_type, n.name))
        }
        "outputs" => {
            let n = g.node.get_mut(r.below(nn))?;
            if r.below(2) == 0 && !n.output.is_empty() {
                n.output.pop();
            } else {
                n.output.push(format!("extra_out_{}", r.below(1000)));
            }
            Some(format!(
                "{} '{}' has {} outputs",
                n.op_type,
                n.name,
                n.output.len()
            ))
        }
        "attribute-type" => {
            let idx: Vec<usize> = (0..nn)
                .filter(|i| !g.node[*i].attribute.is_empty())
                .collect();
            let n = &mut g.node[*r.pick(&idx)?];
            let k = n.attribute.len();
            let a = &mut n.attribute[r.below(k)];
            let types = [
                AttributeType::INT,
                AttributeType::INTS,
                AttributeType::FLOAT,
                AttributeType::STRING,
                AttributeType::TENSOR,
                AttributeType::UNDEFINED,
            ];
            let t = types[r.below(types.len())];
            a.type_ = t.into();
            Some(format!(
                "{} '{}' attribute '{}' typed {t:?}",
                n.op_type, n.name, a.name
            ))
        }
        "attribute-ints" => {
            let idx: Vec<usize> = (0..nn)
                .filter(|i| {
                    g.node[*i].attribute.iter().any(|a| {
                        !a.ints.is_empty() || a.type_.value() == AttributeType::INT.value()
                    })
                })
                .collect();
            let n = &mut g.node[*r.pick(&idx)?];
            let k = n.attribute.len();
            let a = &mut n.attribute[r.below(k)];
            if a.ints.is_empty() {
                a.i = r.nasty_int();
            } else {
                let len = if r.below(3) == 0 {
                    r.below(6)
                } else {
                    a.ints.len()
                };
                a.ints = (0..len).map(|_| r.nasty_int()).collect();
            }
            Some(format!(
                "{} '{}' attribute '{}' = {} / {:?}",
                n.op_type, n.name, a.name, a.i, a.ints
            ))
        }
        "shape-tensor" => {
            // A small int64 initializer (shape, axes, starts, indices) gets nasty values.
            let idx: Vec<usize> = (0..g.initializer.len())
                .filter(|i| {
                    let t = &g.initializer[*i];
                    t.data_type == 7 && t.dims.iter().product::<i64>() <= 8
                })
                .collect();
            let t = &mut g.initializer[*r.pick(&idx)?];
            let n = t.dims.iter().product::<i64>().max(0) as usize;
            let vals: Vec<i64> = (0..n).map(|_| r.nasty_int()).collect();
            t.raw_data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            t.int64_data.clear();
            Some(format!("int64 tensor '{}' = {vals:?}", t.name))
        }
        "external-data" => {
            let n = g.initializer.len();
            let t = g.initializer.get_mut(r.below(n))?;
            t.data_location = DataLocation::EXTERNAL.into();
            t.raw_data.clear();
            t.float_data.clear();
            let locs = [
                "../escape.bin",
                "/etc/passwd",
                "missing.bin",
                "",
                "fifo.bin",
                "data.bin",
                ".",
            ];
            let loc = locs[r.below(locs.len())];
            let mut kv = vec![("location", loc.to_string())];
            if r.below(2) == 0 {
                kv.push(("offset", r.nasty_int().to_string()));
            }
            if r.below(2) == 0 {
                kv.push(("length", r.nasty_int().to_string()));
            }
            t.external_data = kv
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                    ..Default::default()
                })
                .collect();
            Some(format!("initializer '{}' external {kv:?}", t.name))
        }
        "cycle" => {
            if nn < 2 {
                return None;
            }
            let (a, b) = (r.below(nn - 1), nn - 1 - r.below(nn / 2));
            let out = g.node[b.max(a + 1)].output.first()?.clone();
            let n = &mut g.node[a];
            if n.input.is_empty() {
                return None;
            }
            let i = r.below(n.input.len());
            n.input[i] = out.clone();
            Some(format!("node #{a} reads '{out}' from a later node"))
        }
        "op-type" => {
            let ops = [
                "Transpose",
                "Reshape",
                "Gather",
                "Slice",
                "Conv",
                "MaxPool",
                "Range",
                "Mod",
                "Div",
                "Concat",
                "Split",
                "Squeeze",
                "Unsqueeze",
                "Expand",
                "Tile",
                "MatMul",
                "LayerNormalization",
                "Softmax",
                "Where",
                "Cast",
                "ConstantOfShape",
                "If",
                "ReduceSum",
                "TopK",
                "Gemm",
            ];
            let n = g.node.get_mut(r.below(nn))?;
            let op = ops[r.below(ops.len())];
            let old = std::mem::replace(&mut n.op_type, op.to_string());
            Some(format!("node '{}' {old} → {op}", n.name))
        }
        "duplicate-name" => {
            if nn < 2 {
                return None;
            }
            let a = r.below(nn);
            let b = r.below(nn);
            let name = g.node[a].output.first()?.clone();
            let n = &mut g.node[b];
            let o = n.output.first_mut()?;
            *o = name.clone();
            Some(format!("node #{b} also produces '{name}'"))
        }
        "opset" => {
            let v = [1i64, 7, 9, 11, 13, 17, 21, 23, 99, -1][r.below(10)];
            for o in &mut m.opset_import {
                if o.domain.is_empty() {
                    o.version = v;
                }
            }
            Some(format!("default opset {v}"))
        }
        _ => None,
    }
}

#[derive(Debug)]
struct Failure {
    what: String,
}

/// Runs `wcc ARGS` with a time limit; checks the contract.
fn check(args: &[&std::ffi::OsStr], out: Option<&Path>, limit: Duration) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wcc"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("hang: still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let code = status.code();
    if !matches!(code, Some(0..=2)) {
        return Err(format!("exit {code:?} (signal or crash)\n{err}"));
    }
    if err.contains("panicked") || err.contains("internal error") {
        return Err(format!(
            "exit {code:?} with a panic or internal error\n{err}"
        ));
    }
    if code != Some(0) && err.trim().is_empty() {
        return Err(format!("exit {code:?} without a message"));
    }
    if let Some(o) = out {
        if code != Some(0) && o.exists() {
            return Err(format!("exit {code:?} but {} was written", o.display()));
        }
    }
    Ok(())
}

#[test]
fn mutated_fixtures_never_crash_hang_or_leave_output() {
    let count: usize = std::env::var("WCC_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240);
    let seed: u64 = std::env::var("WCC_MUTATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0007);
    let stems: Vec<String> = [
        "bert.legacy",
        "bert.dynamo",
        "gpt2.legacy",
        "llama.legacy",
        "llama.dynamo",
        "llama_kv.legacy",
        "vit.dynamo",
        "reparam.legacy",
        "bert.ortfused",
        "resnet.dynamo",
        "mobilenet.legacy",
    ]
    .iter()
    .map(|s| s.to_string())
    .filter(|s| fixture_path(s).is_file())
    .collect();
    let originals: Vec<(String, ModelProto)> = stems
        .iter()
        .map(|s| {
            let bytes = std::fs::read(fixture_path(s)).unwrap();
            (s.clone(), ModelProto::parse_from_bytes(&bytes).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // Neighbours for the external-data mutation: a real data file and a FIFO.
    std::fs::write(dir.path().join("data.bin"), vec![7u8; 4096]).unwrap();
    let fifo = dir.path().join("fifo.bin");
    let _ = Command::new("mkfifo").arg(&fifo).status();

    let limit = Duration::from_secs(120);
    let workers = 2;
    let failures = std::sync::Mutex::new(Vec::<Failure>::new());
    let executed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..workers {
            let (originals, failures, executed, dir) =
                (&originals, &failures, &executed, dir.path());
            s.spawn(move || {
                let only: Option<usize> = std::env::var("WCC_MUTANT")
                    .ok()
                    .and_then(|v| v.parse().ok());
                for i in (w..count).step_by(workers) {
                    if only.is_some_and(|o| o != i) {
                        continue;
                    }
                    let mut r = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    r.next();
                    let (stem, original) = &originals[r.below(originals.len())];
                    let mut m = original.clone();
                    let mut what = vec![];
                    for _ in 0..1 + r.below(3) {
                        let k = KINDS[r.below(KINDS.len())];
                        if let Some(d) = mutate(&mut m, k, &mut r) {
                            what.push(format!("{k}: {d}"));
                        }
                    }
                    if what.is_empty() {
                        continue;
                    }
                    let label = format!("mutant {i} of {stem} (seed {seed}): {}", what.join("; "));
                    let path: PathBuf = dir.join(format!("m{i}.onnx"));
                    std::fs::write(&path, m.write_to_bytes().unwrap()).unwrap();
                    if only.is_some() {
                        let keep = root().join(format!("target/mutant-{i}.onnx"));
                        std::fs::write(&keep, m.write_to_bytes().unwrap()).unwrap();
                    }
                    let out = dir.join(format!("m{i}.out.onnx"));
                    let runs: Vec<(Vec<&std::ffi::OsStr>, Option<&Path>)> = vec![
                        (vec!["print".as_ref(), path.as_os_str()], None),
                        (vec!["inspect".as_ref(), path.as_os_str()], None),
                        (
                            vec![
                                "optimize".as_ref(),
                                path.as_os_str(),
                                "-O1".as_ref(),
                                "-o".as_ref(),
                                out.as_os_str(),
                            ],
                            Some(out.as_path()),
                        ),
                    ];
                    for (args, o) in runs {
                        executed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Err(e) = check(&args, o, limit) {
                            let cmd = args[0].to_string_lossy().to_string();
                            failures.lock().unwrap().push(Failure {
                                what: format!("{label}\n  wcc {cmd}: {e}"),
                            });
                        }
                    }
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&out);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    let n = executed.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{n} commands on {count} mutants, {} failures",
        failures.len()
    );
    // No stray temporary files from failed writes.
    let stray: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !matches!(n.as_str(), "data.bin" | "fifo.bin"))
        .collect();
    assert!(stray.is_empty(), "files left behind: {stray:?}");
    let single = std::env::var("WCC_MUTANT").is_ok();
    assert!(single || n > count, "too few commands ran ({n})");
    assert!(
        failures.is_empty(),
        "{} contract violations:\n{}",
        failures.len(),
        failures
            .iter()
            .map(|f| f.what.clone())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
