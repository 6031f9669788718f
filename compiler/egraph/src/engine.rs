//! Runs the rules over one graph: IR → e-graph, equality saturation under limits, extraction by the
//! cost model, e-graph → IR. The graph is rebuilt only when the extracted term is strictly cheaper,
//! so a run that finds nothing leaves the graph exactly as it was.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use egg::{EGraph, Id, Language, Runner};
use serde::Serialize;
use wcc_ir::infer::infer_graph;
use wcc_ir::validate::collect_outer_reads;
use wcc_ir::{Attribute, Graph, Node, TensorType};

use crate::analysis::{Facts, Info};
use crate::extract::{cost_of, extract, CostModel, ExtractStop};
use crate::lang::{leaf, leaf_parts, parse_perm, perm_leaf, Op};
use crate::rules::Rule;
use egg::Analysis;

#[derive(Debug, Clone)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 200_000,
            iterations: 12,
            time: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub enodes: usize,
    pub classes: usize,
    pub iterations: usize,
    /// saturated | iteration limit | node limit | time limit
    pub stop_reason: String,
    pub rules_fired: BTreeMap<String, usize>,
    pub saturate_ms: f64,
    pub extract_ms: f64,
    pub cost_before: f64,
    pub cost_after: f64,
    /// Whether the graph was rebuilt from the extracted term.
    pub rewritten: bool,
    /// Why extraction gave up, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extract_stop: Option<String>,
    /// Alternatives the extraction's DAG refinement left untried (its work budget ran out).
    pub untried_alternatives: usize,
}

const ALGEBRA: [&str; 9] = [
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Transpose",
    "Reshape",
    "Gemm",
];

/// Saturates `g` (not its subgraphs) with `rules` and rewrites it when that is cheaper.
///
/// egg times itself with `quanta`, whose global clock, on first use in a process, calibrates the
/// CPU's counter against the OS clock in a busy loop (0.5 ms to 200 ms; measured here: 4-10 ms
/// of a 65 ms MiniLM run, more on a loaded VM). egg runs under a mock clock instead, which
/// `saturate` keeps at std's monotonic time.
pub fn run_graph(
    g: &mut Graph,
    opset: i64,
    rules: &[Rule],
    limits: &Limits,
    model: &CostModel,
) -> Stats {
    let (clock, mock) = quanta::Clock::mock();
    quanta::with_clock(&clock, || {
        run_graph_on(g, opset, rules, limits, model, mock)
    })
}

fn run_graph_on(
    g: &mut Graph,
    opset: i64,
    rules: &[Rule],
    limits: &Limits,
    model: &CostModel,
    mock: std::sync::Arc<quanta::Mock>,
) -> Stats {
    let types = infer_graph(g, opset, None);
    let ty = |name: &str| types.get(name).cloned().unwrap_or_else(TensorType::unknown);

    // Facts first: leaves and node output types.
    let mut facts = Facts::default();
    let mut leaf_of: HashMap<String, Op> = HashMap::new();
    let consts = g.constants();
    for t in &g.initializers {
        if !consts.contains(t.name()) {
            continue;
        }
        let scalar = (t.numel() == 1)
            .then(|| t.to_f64_vec().ok().and_then(|v| v.first().copied()))
            .flatten();
        let l = leaf("c", t.name());
        if let Op::Leaf(s) = &l {
            facts.leaves.insert(*s, (ty(t.name()), true, scalar));
        }
        leaf_of.insert(t.name().to_string(), l);
    }
    let defined: HashSet<String> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().cloned())
        .collect();
    for n in &g.nodes {
        for i in n.present_inputs() {
            if !leaf_of.contains_key(i) && !defined.contains(i) {
                let l = leaf("x", i);
                if let Op::Leaf(s) = &l {
                    facts.leaves.insert(*s, (ty(i), false, None));
                }
                leaf_of.insert(i.to_string(), l);
            }
        }
    }
    for o in &g.outputs {
        if !leaf_of.contains_key(&o.name) && !defined.contains(&o.name) {
            let l = leaf("x", &o.name);
            if let Op::Leaf(s) = &l {
                facts.leaves.insert(*s, (ty(&o.name), false, None));
            }
            leaf_of.insert(o.name.clone(), l);
        }
    }
    for (idx, n) in g.nodes.iter().enumerate() {
        let outs = n.outputs.iter().map(|o| ty(o)).collect();
        facts.nodes.insert(
            idx,
            (
                outs,
                n.domain.is_empty()
                    && !wcc_ir::model::is_nondeterministic(&n.op_type)
                    && !n.has_subgraphs(),
            ),
        );
    }

    // The graph as e-nodes.
    let mut eg: EGraph<Op, Facts> = EGraph::new(facts);
    let mut ids: HashMap<String, Id> = HashMap::new();
    let mut original: HashMap<Id, Op> = HashMap::new();
    let mut algebra_node_of: HashMap<Id, usize> = HashMap::new();
    let mut multi_output_names: HashSet<String> = HashSet::new();
    for (name, l) in &leaf_of {
        let id = eg.add(l.clone());
        original.insert(id, l.clone());
        ids.insert(name.clone(), id);
    }
    let none = eg.add(leaf("none", ""));
    original.insert(none, leaf("none", ""));
    for (idx, n) in g.nodes.iter().enumerate() {
        let arg = |i: usize, ids: &HashMap<String, Id>| -> Id {
            match n.inputs.get(i) {
                Some(s) if !s.is_empty() => ids[s],
                _ => none,
            }
        };
        let arity_ok = |k: usize| n.inputs.len() == k && n.inputs.iter().all(|s| !s.is_empty());
        let algebra = n.domain.is_empty()
            && n.outputs.len() == 1
            && ALGEBRA.contains(&n.op_type.as_str())
            && n.attributes.iter().all(|a| match a.name() {
                "perm" => true,
                "allowzero" | "transA" | "transB" => a.proto.i == 0,
                "alpha" | "beta" => a.proto.f == 1.0,
                _ => false,
            });
        let enode = match n.op_type.as_str() {
            "MatMul" if algebra && arity_ok(2) => Some(Op::MatMul([arg(0, &ids), arg(1, &ids)])),
            "Add" if algebra && arity_ok(2) => Some(Op::Add([arg(0, &ids), arg(1, &ids)])),
            "Sub" if algebra && arity_ok(2) => Some(Op::Sub([arg(0, &ids), arg(1, &ids)])),
            "Mul" if algebra && arity_ok(2) => Some(Op::Mul([arg(0, &ids), arg(1, &ids)])),
            "Div" if algebra && arity_ok(2) => Some(Op::Div([arg(0, &ids), arg(1, &ids)])),
            "Neg" if algebra && arity_ok(1) => Some(Op::Neg([arg(0, &ids)])),
            "Reshape" if algebra && arity_ok(2) => Some(Op::Reshape([arg(0, &ids), arg(1, &ids)])),
            "Gemm" if algebra && arity_ok(3) => {
                Some(Op::Gemm([arg(0, &ids), arg(1, &ids), arg(2, &ids)]))
            }
            "Transpose" if algebra && arity_ok(1) => {
                n.attr_ints("perm").map(|p| p.to_vec()).map(|p| {
                    let pl = eg.add(perm_leaf(&p));
                    original.insert(pl, perm_leaf(&p));
                    Op::Transpose([pl, arg(0, &ids)])
                })
            }
            _ => None,
        };
        match enode {
            Some(e) => {
                let id = eg.add(e.clone());
                original.insert(id, e);
                algebra_node_of.insert(id, idx);
                ids.insert(n.outputs[0].clone(), id);
                // What inference knows of the value refines what the analysis derived.
                let mut data = eg[id].data.clone();
                let seeded = Info {
                    ty: ty(&n.outputs[0]),
                    ..data.clone()
                };
                let _ = eg.analysis.merge(&mut data, seeded);
                eg.set_analysis_data(id, data);
            }
            None => {
                let tag = eg.add(leaf("n", &idx.to_string()));
                original.insert(tag, leaf("n", &idx.to_string()));
                let mut ch = vec![tag];
                ch.extend((0..n.inputs.len()).map(|i| arg(i, &ids)));
                let e = Op::Onnx(ch.into_boxed_slice());
                let tuple = eg.add(e.clone());
                original.insert(tuple, e);
                if n.outputs.len() == 1 {
                    ids.insert(n.outputs[0].clone(), tuple);
                } else {
                    for (k, o) in n.outputs.iter().enumerate() {
                        multi_output_names.insert(o.clone());
                        if o.is_empty() {
                            continue;
                        }
                        let kid = eg.add(Op::Num(k as i64));
                        original.insert(kid, Op::Num(k as i64));
                        let e = Op::Out([kid, tuple]);
                        let id = eg.add(e.clone());
                        original.insert(id, e);
                        ids.insert(o.clone(), id);
                    }
                }
            }
        }
    }
    eg.rebuild();

    // Values that must keep their names: graph outputs and values read inside subgraphs.
    let mut pinned: Vec<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    for n in &g.nodes {
        for a in &n.attributes {
            for sg in &a.graphs {
                collect_outer_reads(sg, &mut |x| {
                    if defined.contains(x) && !pinned.iter().any(|p| p == x) {
                        pinned.push(x.to_string());
                    }
                });
            }
        }
    }
    let roots: Vec<Id> = pinned.iter().map(|p| ids[p]).collect();
    let orig_choice: HashMap<Id, Op> = original
        .iter()
        .map(|(id, op)| (eg.find(*id), op.clone()))
        .collect();
    let mut stats = Stats {
        cost_before: cost_of(&eg, &roots, &orig_choice, model),
        ..Default::default()
    };

    // One time limit for the whole pass: saturation may use three fifths of it, extraction the
    // rest (and whatever saturation left).
    let t0 = Instant::now();
    let deadline = t0 + limits.time;
    let runner = saturate(eg, rules, limits, t0, mock);
    stats.saturate_ms = t0.elapsed().as_secs_f64() * 1e3;
    stats.iterations = runner.iterations.len();
    stats.stop_reason = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".into(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n} e-nodes)"),
        Some(egg::StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    };
    for it in &runner.iterations {
        for (r, n) in &it.applied {
            *stats.rules_fired.entry(r.to_string()).or_default() += n;
        }
    }
    let eg = runner.egraph;
    stats.enodes = eg.total_number_of_nodes();
    stats.classes = eg.number_of_classes();

    let t1 = Instant::now();
    // The graph's own nodes, in the saturated e-graph's terms (ties in extraction go to them).
    let originals: HashSet<Op> = original
        .values()
        .map(|op| op.clone().map_children(|c| eg.find(c)))
        .collect();
    let extraction = extract(&eg, &roots, model, &originals, deadline);
    stats.extract_ms = t1.elapsed().as_secs_f64() * 1e3;
    let extraction = match extraction {
        Ok(x) => x,
        Err(stop) => {
            stats.extract_stop = Some(match stop {
                ExtractStop::Time => format!(
                    "time limit ({:.1} s) during extraction: graph left as it was",
                    limits.time.as_secs_f64()
                ),
                ExtractStop::Incomplete => {
                    "no complete acyclic choice: graph left as it was".into()
                }
            });
            stats.cost_after = stats.cost_before;
            return stats;
        }
    };
    stats.untried_alternatives = extraction.untried;
    stats.cost_after = extraction.cost;
    if extraction.cost >= stats.cost_before * (1.0 - 1e-9) {
        stats.cost_after = stats.cost_before;
        return stats;
    }

    // Names each class may reuse: values an algebraic node made (multi-output names stay with
    // their node).
    let mut names: HashMap<Id, Vec<String>> = HashMap::new();
    for n in &g.nodes {
        for o in &n.outputs {
            if !o.is_empty() && !multi_output_names.contains(o) {
                names.entry(eg.find(ids[o])).or_default().push(o.clone());
            }
        }
    }
    let algebra_node_of: HashMap<Id, usize> = algebra_node_of
        .into_iter()
        .map(|(id, i)| (eg.find(id), i))
        .collect();
    let mut b = Builder {
        eg: &eg,
        choice: &extraction.choice,
        old: &g.nodes,
        names,
        algebra_node_of,
        emitted: HashMap::new(),
        emitted_tuples: HashSet::new(),
        used: g
            .initializers
            .iter()
            .map(|t| t.name().to_string())
            .chain(g.inputs.iter().map(|v| v.name.clone()))
            .collect(),
        nodes: vec![],
        origin: vec![],
        fresh: 0,
    };
    for (p, r) in pinned.iter().zip(&roots) {
        b.emit_operands(*r);
        let v = b.value(*r, Some(p));
        if v != *p {
            b.nodes.push(Node::new(
                &format!("{p}/wcc_identity"),
                "Identity",
                vec![v],
                vec![p.clone()],
            ));
            b.origin.push(None);
        }
    }
    g.nodes = original_order(b.nodes, b.origin);
    stats.rewritten = true;
    stats
}

struct Builder<'a> {
    eg: &'a EGraph<Op, Facts>,
    choice: &'a HashMap<Id, Op>,
    old: &'a [Node],
    names: HashMap<Id, Vec<String>>,
    algebra_node_of: HashMap<Id, usize>,
    emitted: HashMap<Id, String>,
    emitted_tuples: HashSet<Id>,
    used: HashSet<String>,
    nodes: Vec<Node>,
    /// For each emitted node, the index of the original node it continues (None: new).
    origin: Vec<Option<usize>>,
    fresh: usize,
}

impl Builder<'_> {
    fn name_for(&mut self, c: Id, want: Option<&str>, hint: &str) -> String {
        if let Some(w) = want {
            if !self.used.contains(w) {
                self.used.insert(w.to_string());
                return w.to_string();
            }
        }
        let cands = self.names.get(&c).cloned().unwrap_or_default();
        for n in cands {
            if !self.used.contains(&n) {
                self.used.insert(n.clone());
                return n;
            }
        }
        // A new value: named after the operand it is built from, to keep reviews readable.
        let base = if hint.is_empty() {
            "wcc".to_string()
        } else {
            hint.to_string()
        };
        let mut n = base.clone();
        while self.used.contains(&n) {
            self.fresh += 1;
            n = format!("{base}_{}", self.fresh);
        }
        self.used.insert(n.clone());
        n
    }

    fn tag(&self, id: Id) -> Option<usize> {
        match self
            .choice
            .get(&self.eg.find(id))
            .or_else(|| self.eg[id].nodes.first())
        {
            Some(Op::Leaf(s)) => leaf_parts(s).1.parse().ok(),
            _ => None,
        }
    }

    fn emit_tuple(&mut self, c: Id) {
        if !self.emitted_tuples.insert(c) {
            return;
        }
        let Some(Op::Onnx(ch)) = self.choice.get(&c).cloned() else {
            return;
        };
        let idx = self.tag(ch[0]).expect("onnx nodes carry their tag");
        let inputs: Vec<String> = ch[1..].iter().map(|k| self.value(*k, None)).collect();
        let mut n = self.old[idx].clone();
        n.inputs = inputs;
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            self.used.insert(o.clone());
        }
        self.nodes.push(n);
        self.origin.push(Some(idx));
    }

    /// The classes whose values computing class `c` reads (through its chosen node).
    fn operands(&self, c: Id) -> Vec<Id> {
        let node = self.choice.get(&c).unwrap_or_else(|| &self.eg[c].nodes[0]);
        match node {
            Op::Leaf(_) | Op::Num(_) => vec![],
            Op::Onnx(ch) => ch[1..].to_vec(),
            Op::Out([_, t]) => vec![*t],
            Op::Transpose([_, x]) => vec![*x],
            other => other.children().to_vec(),
        }
    }

    /// Emits everything class `c` reads, deepest first, without recursion (a chain of 50k nodes
    /// must not exhaust the stack); afterwards `value(c)` only looks its operands up. The order is
    /// the one a recursive left-to-right walk gives, so names and node order do not change.
    fn emit_operands(&mut self, c: Id) {
        let root = self.eg.find(c);
        let mut stack: Vec<(Id, bool)> = self
            .operands(root)
            .into_iter()
            .rev()
            .map(|k| (self.eg.find(k), false))
            .collect();
        while let Some((c, expanded)) = stack.pop() {
            if self.emitted.contains_key(&c) {
                continue;
            }
            if expanded {
                self.value(c, None);
                continue;
            }
            stack.push((c, true));
            for k in self.operands(c).into_iter().rev() {
                let k = self.eg.find(k);
                if !self.emitted.contains_key(&k) {
                    stack.push((k, false));
                }
            }
        }
    }

    /// The name of the value of class `c`, emitting what computes it.
    fn value(&mut self, c: Id, want: Option<&str>) -> String {
        let c = self.eg.find(c);
        if let Some(v) = self.emitted.get(&c) {
            return v.clone();
        }
        let node = self
            .choice
            .get(&c)
            .cloned()
            .unwrap_or_else(|| self.eg[c].nodes[0].clone());
        let v = match &node {
            Op::Leaf(s) => {
                let (kind, name) = leaf_parts(s);
                if kind == "none" {
                    String::new()
                } else {
                    name.to_string()
                }
            }
            Op::Num(_) => String::new(),
            Op::Onnx(ch) => {
                self.emit_tuple(c);
                let idx = self.tag(ch[0]).expect("tag");
                self.old[idx].outputs[0].clone()
            }
            Op::Out([k, t]) => {
                let t = self.eg.find(*t);
                self.emit_tuple(t);
                let k = match self.eg[*k].nodes.first() {
                    Some(Op::Num(v)) => *v as usize,
                    _ => 0,
                };
                let Some(Op::Onnx(ch)) = self.choice.get(&t).cloned() else {
                    unreachable!("a tuple class holds its node")
                };
                let idx = self.tag(ch[0]).expect("tag");
                self.old[idx].outputs[k].clone()
            }
            Op::Transpose([p, x]) => {
                let perm = match self.eg[*p].nodes.first() {
                    Some(Op::Leaf(s)) => parse_perm(leaf_parts(s).1).unwrap_or_default(),
                    _ => vec![],
                };
                let xv = self.value(*x, None);
                let out = self.name_for(c, want, &format!("{xv}/wcc_transpose"));
                let mut n = self.new_node(c, "Transpose", vec![xv], &out);
                n.attributes = vec![Attribute::ints("perm", &perm)];
                self.push(c, n);
                out
            }
            Op::MatMul([a, b])
            | Op::Add([a, b])
            | Op::Sub([a, b])
            | Op::Mul([a, b])
            | Op::Div([a, b]) => {
                let op = match node {
                    Op::MatMul(_) => "MatMul",
                    Op::Add(_) => "Add",
                    Op::Sub(_) => "Sub",
                    Op::Mul(_) => "Mul",
                    _ => "Div",
                };
                let (av, bv) = (self.value(*a, None), self.value(*b, None));
                let base = if op == "MatMul" || av.is_empty() {
                    &bv
                } else {
                    &av
                };
                let out = self.name_for(c, want, &format!("{base}/wcc_{}", op.to_lowercase()));
                let n = self.new_node(c, op, vec![av, bv], &out);
                self.push(c, n);
                out
            }
            Op::Gemm([a, b, cc]) => {
                let (av, bv, cv) = (
                    self.value(*a, None),
                    self.value(*b, None),
                    self.value(*cc, None),
                );
                let out = self.name_for(c, want, &format!("{bv}/wcc_gemm"));
                let n = self.new_node(c, "Gemm", vec![av, bv, cv], &out);
                self.push(c, n);
                out
            }
            Op::Reshape([x, sh]) => {
                let (xv, shv) = (self.value(*x, None), self.value(*sh, None));
                let out = self.name_for(c, want, &format!("{xv}/wcc_reshape"));
                let n = self.new_node(c, "Reshape", vec![xv, shv], &out);
                self.push(c, n);
                out
            }
            Op::Neg([a]) => {
                let av = self.value(*a, None);
                let out = self.name_for(c, want, &format!("{av}/wcc_neg"));
                let n = self.new_node(c, "Neg", vec![av], &out);
                self.push(c, n);
                out
            }
        };
        self.emitted.insert(c, v.clone());
        v
    }

    fn push(&mut self, c: Id, n: Node) {
        let origin = self
            .algebra_node_of
            .get(&c)
            .copied()
            .filter(|i| self.old[*i].op_type == n.op_type);
        self.nodes.push(n);
        self.origin.push(origin);
    }

    /// A node for class `c`: the original node's name and metadata when it made this class with
    /// the same op, a fresh name otherwise.
    fn new_node(&mut self, c: Id, op: &str, inputs: Vec<String>, out: &str) -> Node {
        match self.algebra_node_of.get(&c).map(|i| &self.old[*i]) {
            Some(orig) if orig.op_type == op => {
                let mut n = orig.clone();
                n.inputs = inputs;
                n.outputs = vec![out.to_string()];
                n.attributes.retain(|a| {
                    matches!(
                        a.name(),
                        "perm" | "allowzero" | "alpha" | "beta" | "transA" | "transB"
                    )
                });
                n
            }
            _ => Node::new(out, op, inputs, vec![out.to_string()]),
        }
    }
}

/// Orders rebuilt nodes like the original graph: a kept node at its old position, a new node just
/// before the first node that reads it; then a stable topological sort fixes any dependency.
fn original_order(nodes: Vec<Node>, origin: Vec<Option<usize>>) -> Vec<Node> {
    let mut key: Vec<f64> = vec![f64::INFINITY; nodes.len()];
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    // Emission is post-order, so every reader comes after what it reads: walk backwards.
    for i in (0..nodes.len()).rev() {
        if let Some(o) = origin[i] {
            key[i] = o as f64;
        }
        for inp in nodes[i].present_inputs() {
            if let Some(&p) = producer.get(inp) {
                if origin[p].is_none() {
                    key[p] = key[p].min(key[i] - 0.5);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|a, b| key[*a].total_cmp(&key[*b]).then(a.cmp(b)));
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    let mut g = Graph {
        nodes: order
            .into_iter()
            .map(|i| slots[i].take().unwrap())
            .collect(),
        ..Default::default()
    };
    wcc_ir::validate::topo_sort(&mut g);
    g.nodes
}

/// Runs `rules` on `eg` within `limits` (three fifths of the time, from `t0`, for saturation),
/// under the mock clock of `run_graph`: a hook sets it to std's monotonic time at the start of
/// every iteration, and egg's own limit checks (after every rule's search and application) read
/// it from there.
fn saturate(
    eg: EGraph<Op, Facts>,
    rules: &[egg::Rewrite<Op, Facts>],
    limits: &Limits,
    t0: Instant,
    mock: std::sync::Arc<quanta::Mock>,
) -> Runner<Op, Facts, ()> {
    Runner::<Op, Facts, ()>::default()
        .with_egraph(eg)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time * 3 / 5)
        .with_hook(move |_| {
            let shown = Duration::from_nanos(mock.value());
            mock.increment(t0.elapsed().saturating_sub(shown));
            Ok(())
        })
        .run(rules)
}
