//! Verification region by region: the parts of the result that differ from the original, each
//! run beside the part of the original it replaces, on random values at its boundary.
//!
//! A node of the result is *matched* when the original has a node with the same op, attributes
//! and inputs, each of those inputs *known equal* in both graphs; its outputs may be named
//! otherwise (removing an Identity after it renames them: a 7B model's LM head, 0.24 GiB, is then
//! not loaded), and an original value that has such a name becomes one more anchor. A value is
//! known equal when it is a graph input of both, an initializer the result kept unchanged, an
//! output of a matched node, or an *anchor*: a value that an unmatched node makes and the
//! original's nodes also make (same name). Unmatched nodes joined by values that
//! are not known equal form *regions*. A region claims that, given the known-equal values it
//! reads, it computes its anchors as the original does; checking every claim checks the whole
//! result, by induction along the graph.
//!
//! Each claim is checked by running the region and the original's nodes that compute its anchors
//! (back to known-equal values) as one model, on the verification's own graph inputs and, for
//! the known-equal float values at the boundary, random normal values of the shapes a run at the
//! verification's dims gives them. Integer and boolean boundary values (shapes, indices, masks)
//! are never made up: the original's nodes that compute them are run too, back to float values or
//! graph inputs. So a rewrite is exercised on a wider range of values than real activations
//! take, and exactly where it changed the graph.
//!
//! A region and its counterpart hold only the weights they read, so regions are checked in
//! groups under the verification memory budget: a model whose weights all changed (a merged
//! adapter, scales folded into every layer) is verified a few layers at a time, and an -O1 that
//! only folded shape arithmetic never loads a weight at all.
//!
//! Not used (the caller runs both models whole) when a gate is set (fidelity is end to end) or
//! the graphs have subgraphs; `plan` says why.

use std::collections::{BTreeSet, HashMap, HashSet};

use wcc_ir::eval::Array;
use wcc_ir::{DataType, Dim, Graph, Model, Node, TensorType, ValueInfo};
use wcc_runtime::{Backend, NamedArrays, OutputFidelity};

use crate::exec::run_on;
use crate::verify::{compare, kept_initializers};

/// What names of the result's region nodes start with in a group model.
const RESULT_PREFIX: &str = "wcc.region::";

/// Small initializers of the same name and bytes in both models are known equal even when the
/// result holds its own copy (a pass rebuilt it).
const COMPARE_INIT_BYTES: u64 = 64 << 10;

/// One changed region: result nodes and the anchors it claims to compute.
#[derive(Debug)]
struct Region {
    nodes: Vec<usize>,
    anchors: Vec<String>,
}

/// What one region needs from the original and the result to be checked.
#[derive(Debug, Default)]
struct Slice {
    /// Original nodes (indices) that compute the anchors and the non-float values the region
    /// reads.
    original_nodes: BTreeSet<usize>,
    /// Float values fed at random, and their bytes.
    fed: BTreeSet<String>,
    fed_bytes: u64,
    /// Graph inputs fed with the verification's inputs.
    graph_inputs: BTreeSet<String>,
    /// Original initializers read (by the slice, or by the region when kept unchanged).
    original_inits: BTreeSet<String>,
    /// The result's own initializers the region reads.
    result_inits: BTreeSet<String>,
    /// Bytes of every initializer above.
    bytes: u64,
}

/// The regions of `result` against `original`, ready to be checked.
pub struct Plan<'a> {
    original: &'a Model,
    result: &'a Model,
    regions: Vec<Region>,
    slices: Vec<Slice>,
    /// Known-equal values (see the module docs), by their names in the result.
    same: HashSet<String>,
    /// Result values known equal to an original value of another name (the output of a matched
    /// node whose outputs were renamed): result name → original name.
    alias: HashMap<String, String>,
    /// The original names in `alias`.
    alias_targets: HashSet<String>,
    /// Types of the original's values at the verification's dims.
    types: HashMap<String, TensorType>,
    /// Result nodes in no region matched an original node: everything else is in `regions`.
    pub changed_nodes: usize,
}

/// What a region-by-region verification did (the report's `verification.regions`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionSummary {
    /// Changed regions checked.
    pub regions: usize,
    /// Result nodes in them.
    pub nodes: usize,
    /// Models run (regions are grouped under the memory budget).
    pub runs: usize,
}

/// Why a region could not be checked.
#[derive(Debug)]
pub enum RegionError {
    /// One region alone holds more than the budget: its bytes, and the first value it computes.
    OverBudget(u64, String),
    /// The backend could not run a group (either side: the caller runs the models whole to say).
    Run(String),
    /// A region's anchors differ in shape or type from the original's.
    Mismatch(String),
}

fn is_float(d: Option<DataType>) -> bool {
    matches!(d, Some(DataType::F32 | DataType::F16 | DataType::F64))
}

/// The regions where `result` differs from `original`, for a run on `inputs`; Err says why the
/// two cannot be compared region by region.
pub fn plan<'a>(
    original: &'a Model,
    result: &'a Model,
    inputs: &NamedArrays,
) -> Result<Plan<'a>, String> {
    if original.ir_version != result.ir_version
        || original.opset_imports != result.opset_imports
        || original.functions != result.functions
    {
        return Err("the models differ around the graph (IR version, opsets, functions)".into());
    }
    let (og, rg) = (&original.graph, &result.graph);
    if og.nodes.iter().chain(&rg.nodes).any(Node::has_subgraphs) {
        return Err("a graph has subgraphs".into());
    }
    if !rg.rest.sparse_initializer.is_empty() || !og.rest.sparse_initializer.is_empty() {
        return Err("a graph has sparse initializers".into());
    }
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in og.nodes.iter().enumerate() {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            producer.insert(o, i);
        }
    }
    let orig_inputs: HashSet<&str> = og.inputs.iter().map(|v| v.name.as_str()).collect();
    let orig_inits: HashMap<&str, &wcc_ir::Tensor> =
        og.initializers.iter().map(|t| (t.name(), t)).collect();
    let kept = kept_initializers(original, result);

    // Known-equal values, walking the result in order.
    let mut same: HashSet<String> = HashSet::new();
    for v in &rg.inputs {
        if orig_inputs.contains(v.name.as_str()) {
            same.insert(v.name.clone());
        } else if rg.initializer(&v.name).is_none() {
            return Err(format!(
                "the result has an input '{}' the original lacks",
                v.name
            ));
        }
    }
    for t in &rg.initializers {
        let equal = kept.contains(t.name())
            || orig_inits.get(t.name()).is_some_and(|o| {
                o.byte_size() <= COMPARE_INIT_BYTES
                    && o.dims() == t.dims()
                    && o.dtype().ok() == t.dtype().ok()
                    && matches!((o.raw_bytes(), t.raw_bytes()), (Ok(a), Ok(b)) if a == b)
            });
        if equal && !orig_inputs.contains(t.name()) {
            same.insert(t.name().to_string());
        }
    }
    // Original nodes by what they compute: op, domain and inputs.
    let mut by_inputs: HashMap<(&str, &str, &[String]), Vec<usize>> = HashMap::new();
    for (i, n) in og.nodes.iter().enumerate() {
        by_inputs
            .entry((&n.op_type, &n.domain, &n.inputs))
            .or_default()
            .push(i);
    }
    let mut defined: HashSet<&str> = rg.inputs.iter().map(|v| v.name.as_str()).collect();
    defined.extend(rg.initializers.iter().map(|t| t.name()));
    let mut changed: Vec<usize> = vec![];
    let mut anchors: HashSet<String> = HashSet::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut alias_anchors: Vec<String> = vec![];
    for (i, n) in rg.nodes.iter().enumerate() {
        if !n.present_inputs().all(|v| defined.contains(v)) {
            return Err(format!("node '{}' is not in topological order", n.name));
        }
        defined.extend(n.outputs.iter().map(String::as_str));
        // Matched: an original node computes the same from the same values; its outputs may
        // have other names (a removed Identity after it renamed them).
        let inputs: Vec<String> = n
            .inputs
            .iter()
            .map(|v| alias.get(v).unwrap_or(v).clone())
            .collect();
        let matched = n
            .present_inputs()
            .all(|v| same.contains(v))
            .then(|| by_inputs.get(&(n.op_type.as_str(), n.domain.as_str(), &inputs[..])))
            .flatten()
            .and_then(|cands| {
                let same_node = |&&j: &&usize| {
                    let o = &og.nodes[j];
                    o.outputs.len() == n.outputs.len()
                        && o.attributes.len() == n.attributes.len()
                        && o.attributes
                            .iter()
                            .zip(&n.attributes)
                            .all(|(a, b)| a.proto == b.proto)
                };
                let named = |&&j: &&usize| og.nodes[j].outputs == n.outputs;
                let mut ok = cands.iter().filter(same_node);
                ok.clone().find(named).or_else(|| ok.next()).copied()
            });
        if let Some(j) = matched {
            for (r, o) in n.outputs.iter().zip(&og.nodes[j].outputs) {
                if r.is_empty() {
                    continue;
                }
                same.insert(r.clone());
                if r != o {
                    alias.insert(r.clone(), o.clone());
                    // The original's value of that name, if any, must be this one.
                    if producer.contains_key(r.as_str()) {
                        alias_anchors.push(r.clone());
                    }
                }
            }
            continue;
        }
        changed.push(i);
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if producer.contains_key(o.as_str()) {
                anchors.insert(o.clone());
                same.insert(o.clone());
            }
        }
    }
    if let Some(o) = rg.outputs.iter().find(|o| !same.contains(&o.name)) {
        return Err(format!(
            "the result's output '{}' is not computed as the original's",
            o.name
        ));
    }

    // Regions: changed nodes joined by values that are not known equal.
    let mut made_by: HashMap<&str, usize> = HashMap::new();
    for &i in &changed {
        for o in &rg.nodes[i].outputs {
            made_by.insert(o, i);
        }
    }
    let mut parent: HashMap<usize, usize> = changed.iter().map(|&i| (i, i)).collect();
    fn root(p: &mut HashMap<usize, usize>, mut i: usize) -> usize {
        while p[&i] != i {
            let up = p[&p[&i]];
            p.insert(i, up);
            i = up;
        }
        i
    }
    for &i in &changed {
        for v in rg.nodes[i].present_inputs() {
            if same.contains(v) {
                continue;
            }
            if let Some(&j) = made_by.get(v) {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent.insert(a.max(b), a.min(b));
            }
        }
    }
    let mut by_root: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &i in &changed {
        let r = root(&mut parent, i);
        by_root.entry(r).or_default().push(i);
    }
    let regions: Vec<Region> = by_root
        .into_values()
        .map(|nodes| {
            let anchors = nodes
                .iter()
                .flat_map(|&i| &rg.nodes[i].outputs)
                .filter(|o| anchors.contains(*o))
                .cloned()
                .collect();
            Region { nodes, anchors }
        })
        .filter(|r| !r.anchors.is_empty())
        .chain(alias_anchors.into_iter().map(|a| Region {
            nodes: vec![],
            anchors: vec![a],
        }))
        .collect();

    // Types at the verification's dims, to make the boundary's random values.
    let given: Vec<(String, TensorType)> = inputs
        .iter()
        .map(|(n, a)| (n.clone(), type_of_array(a)))
        .collect();
    let types = wcc_ir::infer::infer_graph_with_inputs(og, original.default_opset(), None, &given)
        .types
        .into_iter()
        .collect();
    let mut plan = Plan {
        original,
        result,
        slices: vec![],
        same,
        alias_targets: alias.values().cloned().collect(),
        alias,
        types,
        changed_nodes: changed.len(),
        regions,
    };
    plan.slices = plan
        .regions
        .iter()
        .map(|r| plan.slice(r, &producer, &orig_inits))
        .collect::<Result<_, _>>()?;
    Ok(plan)
}

impl Plan<'_> {
    /// The original's name for the result's known-equal value `v`.
    fn original_name<'s>(&'s self, v: &'s str) -> &'s str {
        self.alias.get(v).map_or(v, String::as_str)
    }

    fn slice(
        &self,
        r: &Region,
        producer: &HashMap<&str, usize>,
        orig_inits: &HashMap<&str, &wcc_ir::Tensor>,
    ) -> Result<Slice, String> {
        let (og, rg) = (&self.original.graph, &self.result.graph);
        let mut s = Slice::default();
        let targets: HashSet<&str> = r.anchors.iter().map(String::as_str).collect();
        // What the region reads: its own initializers, or values of the original.
        let mut todo: Vec<&str> = r.anchors.iter().map(String::as_str).collect();
        // An anchor a matched node computes under another name: that value is the result's.
        todo.extend(
            r.anchors
                .iter()
                .filter_map(|a| self.alias.get(a))
                .map(String::as_str),
        );
        let inside: HashSet<&str> = r
            .nodes
            .iter()
            .flat_map(|&i| rg.nodes[i].outputs.iter().map(String::as_str))
            .collect();
        for &i in &r.nodes {
            for v in rg.nodes[i].present_inputs() {
                if inside.contains(v) {
                    continue;
                }
                if self.same.contains(v) {
                    todo.push(self.original_name(v));
                } else if rg.initializer(v).is_some() {
                    s.result_inits.insert(v.to_string());
                } else {
                    return Err(format!("region value '{v}' has no source"));
                }
            }
        }
        // The original's side, back to known-equal float values (fed) and graph inputs.
        let mut seen: HashSet<&str> = HashSet::new();
        while let Some(v) = todo.pop() {
            if !seen.insert(v) {
                continue;
            }
            if orig_inits.contains_key(v) {
                s.original_inits.insert(v.to_string());
                continue;
            }
            if og.inputs.iter().any(|i| i.name == v) {
                s.graph_inputs.insert(v.to_string());
                continue;
            }
            let ty = self.types.get(v);
            let known = self.same.contains(v) || self.alias_targets.contains(v);
            if !targets.contains(v) && known && is_float(ty.and_then(|t| t.dtype)) {
                let numel = ty.and_then(|t| t.shape.as_ref()).and_then(|d| {
                    d.iter().try_fold(1u64, |n, d| match d {
                        Dim::Known(k) => u64::try_from(*k).ok().and_then(|k| n.checked_mul(k)),
                        _ => None,
                    })
                });
                let bytes =
                    numel.and_then(|n| ty.and_then(|t| t.dtype).and_then(|d| d.storage_bytes(n)));
                let Some(bytes) = bytes else {
                    return Err(format!("the shape of '{v}' is not known at these dims"));
                };
                // Made up before any backend sees it: held to what a backend may take.
                s.fed_bytes = s.fed_bytes.saturating_add(bytes);
                if s.fed_bytes > crate::exec::RUN_BUDGET_BYTES {
                    return Err(format!("'{v}' would take {bytes} bytes at these dims"));
                }
                s.fed.insert(v.to_string());
                continue;
            }
            let Some(&j) = producer.get(v) else {
                return Err(format!("the original does not compute '{v}'"));
            };
            if s.original_nodes.insert(j) {
                todo.extend(og.nodes[j].present_inputs());
            }
        }
        s.bytes = s
            .original_inits
            .iter()
            .filter_map(|n| orig_inits.get(n.as_str()).map(|t| t.byte_size()))
            .chain(
                s.result_inits
                    .iter()
                    .filter_map(|n| rg.initializer(n).map(|t| t.byte_size())),
            )
            .sum();
        Ok(s)
    }

    /// Regions to check.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// Runs every region beside its counterpart on `backend`, in groups whose initializers take
    /// at most `budget` bytes all together, and compares each anchor; `seed` makes the boundary's
    /// values. Groups are formed under half the budget and run `CHECK_THREADS` at a time while
    /// the bytes they hold together stay within it (a region over half the budget runs alone); the
    /// results are put back in group order, so the report does not depend on the schedule.
    pub fn check(
        &self,
        backend: &Backend,
        inputs: &NamedArrays,
        budget: u64,
        seed: u64,
    ) -> Result<(Vec<OutputFidelity>, RegionSummary), RegionError> {
        let mut groups: Vec<(Vec<usize>, u64)> = vec![];
        let half = budget / 2;
        for (k, s) in self.slices.iter().enumerate() {
            if s.bytes > budget {
                let anchor = self.regions[k].anchors[0].clone();
                return Err(RegionError::OverBudget(s.bytes, anchor));
            }
            match groups.last_mut() {
                Some((g, held)) if *held + s.bytes <= half => {
                    g.push(k);
                    *held += s.bytes;
                }
                _ => groups.push((vec![k], s.bytes)),
            }
        }
        // The boundary's random values, drawn in group order.
        let mut rng = wcc_runtime::rng::Rng::new(seed);
        let work: Vec<(Model, NamedArrays, u64)> = groups
            .iter()
            .map(|(g, held)| {
                let (m, f) = self.group_model(g, inputs, &mut rng);
                (m, f, *held)
            })
            .collect();
        let results = run_limited(&work, budget, |(model, feeds, _)| {
            let outs =
                run_on(backend, model, feeds).map_err(|e| RegionError::Run(e.to_string()))?;
            let (mut reference, mut got) = (vec![], vec![]);
            for (name, a) in outs {
                match name.strip_prefix(RESULT_PREFIX) {
                    Some(n) => got.push((n.to_string(), a)),
                    None => reference.push((name, a)),
                }
            }
            let f = compare(&reference, &got, &[]).map_err(RegionError::Mismatch);
            release_freed_memory(budget);
            f
        });
        let mut fidelity = vec![];
        for r in results {
            fidelity.extend(r?);
        }
        let summary = RegionSummary {
            regions: self.regions.len(),
            nodes: self.regions.iter().map(|r| r.nodes.len()).sum(),
            runs: groups.len(),
        };
        Ok((fidelity, summary))
    }

    /// One model that runs the regions `group` (indices) and their counterparts, with the values
    /// it is fed.
    fn group_model(
        &self,
        group: &[usize],
        inputs: &NamedArrays,
        rng: &mut wcc_runtime::rng::Rng,
    ) -> (Model, NamedArrays) {
        let (og, rg) = (&self.original.graph, &self.result.graph);
        let mut onodes: BTreeSet<usize> = BTreeSet::new();
        let mut rnodes: BTreeSet<usize> = BTreeSet::new();
        let (mut fed, mut gin, mut oinit, mut rinit) = (
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        let mut anchors: Vec<&str> = vec![];
        for &k in group {
            let (r, s) = (&self.regions[k], &self.slices[k]);
            onodes.extend(&s.original_nodes);
            rnodes.extend(&r.nodes);
            fed.extend(s.fed.iter().cloned());
            gin.extend(s.graph_inputs.iter().cloned());
            oinit.extend(s.original_inits.iter().cloned());
            rinit.extend(s.result_inits.iter().cloned());
            anchors.extend(r.anchors.iter().map(String::as_str));
        }
        // A value one region's counterpart computes is not also fed for another's.
        let computed: HashSet<&str> = onodes
            .iter()
            .flat_map(|&j| og.nodes[j].outputs.iter().map(String::as_str))
            .collect();
        fed.retain(|v| !computed.contains(v.as_str()));
        let prefixed = |v: &str| format!("{RESULT_PREFIX}{v}");
        let rename = |v: &str| -> String {
            if v.is_empty() || self.same.contains(v) {
                self.original_name(v).to_string()
            } else {
                prefixed(v)
            }
        };
        let mut g = Graph {
            name: "wcc_regions".into(),
            ..Default::default()
        };
        g.nodes.extend(onodes.iter().map(|&j| og.nodes[j].clone()));
        for &i in &rnodes {
            let mut n = rg.nodes[i].clone();
            n.name = prefixed(&n.name);
            for v in &mut n.inputs {
                *v = rename(v);
            }
            for v in &mut n.outputs {
                if !v.is_empty() {
                    *v = prefixed(v);
                }
            }
            g.nodes.push(n);
        }
        g.initializers.extend(
            og.initializers
                .iter()
                .filter(|t| oinit.contains(t.name()))
                .cloned(),
        );
        for t in rg.initializers.iter().filter(|t| rinit.contains(t.name())) {
            let mut t = t.clone();
            t.proto.name = prefixed(t.name());
            g.initializers.push(t);
        }
        let mut feeds: NamedArrays = vec![];
        for (n, a) in inputs {
            if gin.contains(n) {
                g.inputs.push(ValueInfo::tensor(n, type_of_array(a)));
                feeds.push((n.clone(), a.clone()));
            }
        }
        for v in &fed {
            let ty = self.types[v.as_str()].clone();
            let a = random_array(&ty, rng);
            g.inputs.push(ValueInfo::tensor(v, ty));
            feeds.push((v.clone(), a));
        }
        // Anchors of matched nodes that renamed their outputs: the result's value is the
        // original's of the other name.
        for a in &anchors {
            if let Some(o) = self.alias.get(*a) {
                g.nodes.push(Node::new(
                    &prefixed(a),
                    "Identity",
                    vec![o.clone()],
                    vec![prefixed(a)],
                ));
            }
        }
        for a in anchors {
            // The element type only: shapes are the backend's to find.
            let ty = TensorType {
                dtype: self.types.get(a).and_then(|t| t.dtype),
                shape: None,
            };
            g.outputs.push(ValueInfo::tensor(a, ty.clone()));
            g.outputs.push(ValueInfo::tensor(&prefixed(a), ty));
        }
        let model = Model {
            ir_version: self.original.ir_version,
            opset_imports: self.original.opset_imports.clone(),
            graph: g,
            functions: self.original.functions.clone(),
            rest: Default::default(),
            sources: vec![],
            escaped_strings: self.original.escaped_strings,
        };
        (model, feeds)
    }
}

/// How many groups of regions run at once.
const CHECK_THREADS: usize = 2;

/// `f` on every item (each holding `.2` bytes), up to `CHECK_THREADS` at a time while the bytes
/// of the items in flight stay within `budget` (an item over it alone runs alone); results in
/// the items' order. Once one fails, items not started are skipped (their result is that error's
/// turn to be reported by the first failure in order).
fn run_limited<T: Sync, R: Send>(
    items: &[(T, NamedArrays, u64)],
    budget: u64,
    f: impl Fn(&(T, NamedArrays, u64)) -> Result<R, RegionError> + Sync,
) -> Vec<Result<R, RegionError>>
where
    (T, NamedArrays, u64): Sync,
{
    use std::sync::{Condvar, Mutex};
    struct State {
        next: usize,
        in_flight: u64,
        running: usize,
        failed: bool,
    }
    let state = Mutex::new(State {
        next: 0,
        in_flight: 0,
        running: 0,
        failed: false,
    });
    let turn = Condvar::new();
    let slots: Vec<Mutex<Option<Result<R, RegionError>>>> =
        items.iter().map(|_| Mutex::new(None)).collect();
    fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    let worker = || loop {
        let k = {
            let mut st = lock(&state);
            loop {
                if st.next >= items.len() || st.failed {
                    return;
                }
                let bytes = items[st.next].2;
                if st.running == 0 || st.in_flight + bytes <= budget {
                    st.in_flight += bytes;
                    st.running += 1;
                    st.next += 1;
                    break st.next - 1;
                }
                st = turn.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let r = f(&items[k]);
        let failed = r.is_err();
        *slots[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        let mut st = lock(&state);
        st.in_flight -= items[k].2;
        st.running -= 1;
        st.failed |= failed;
        turn.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 1..CHECK_THREADS.min(items.len()) {
            s.spawn(worker);
        }
        worker();
    });
    slots
        .into_iter()
        .map_while(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// Hands memory that runs freed back to the kernel once the allocator holds more than `keep`
/// bytes of it: the `wcc` binary asks glibc to keep freed memory, so that the next group reuses
/// the last one's pages (fast), but what is kept must not add up past the budget across groups.
fn release_freed_memory(keep: u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 reads the allocator's counters; malloc_trim only returns free heap
    // memory to the kernel.
    unsafe {
        if libc::mallinfo2().fordblks as u64 > keep {
            libc::malloc_trim(0);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = keep;
}

fn type_of_array(a: &Array) -> TensorType {
    TensorType {
        dtype: Some(a.dtype()),
        shape: Some(a.shape().iter().map(|d| Dim::Known(*d as i64)).collect()),
    }
}

/// Standard normal values of a float type whose dims are all known (`slice` checked both).
fn random_array(ty: &TensorType, rng: &mut wcc_runtime::rng::Rng) -> Array {
    let dims: Vec<usize> = ty
        .shape
        .iter()
        .flatten()
        .map(|d| match d {
            Dim::Known(v) => *v as usize,
            _ => 1,
        })
        .collect();
    let sh = ndarray::IxDyn(&dims);
    match ty.dtype {
        Some(DataType::F64) => {
            Array::F64(ndarray::ArrayD::from_shape_simple_fn(sh, || rng.normal()))
        }
        Some(DataType::F16) => Array::F16(ndarray::ArrayD::from_shape_simple_fn(sh, || {
            half::f16::from_f64(rng.normal())
        })),
        _ => Array::F32(ndarray::ArrayD::from_shape_simple_fn(sh, || {
            rng.normal() as f32
        })),
    }
}
