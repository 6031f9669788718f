//! Extraction by a cost model kept apart from the rules: FLOPs at the expected shapes for values
//! computed at run time, plus the bytes of every parameter (a constant class is stored once,
//! whatever computes it at compile time). DAG-aware: a class shared by several users counts once.
//! Greedy bottom-up over cost sets, with a cycle check so the chosen term is always a DAG.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use egg::{EGraph, Id, Language};
use wcc_ir::Dim;

use crate::analysis::{Facts, Info};
use crate::lang::{leaf_parts, Op};

/// The fixed cost of one node at run time, in FLOP-equivalents.
pub const NODE_OVERHEAD: f64 = 256.0;

/// Sizes for symbolic dims when estimating FLOPs.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub dims: HashMap<String, i64>,
    pub default_dim: i64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            dims: HashMap::new(),
            default_dim: 64,
        }
    }
}

impl CostModel {
    /// The size of a symbolic dim; product names (`batch*seq`) multiply their parts.
    fn sym(&self, name: &str) -> f64 {
        name.split('*')
            .map(|p| *self.dims.get(p).unwrap_or(&self.default_dim) as f64)
            .product()
    }

    fn numel(&self, info: &Info) -> f64 {
        match &info.ty.shape {
            None => self.default_dim as f64,
            Some(s) => s
                .iter()
                .map(|d| match d {
                    Dim::Known(v) => *v as f64,
                    Dim::Sym(n) => self.sym(n),
                    Dim::Unknown => self.default_dim as f64,
                })
                .product(),
        }
    }

    fn bytes(&self, info: &Info) -> f64 {
        let w = info.ty.dtype.and_then(|d| d.bits()).unwrap_or(32) as f64 / 8.0;
        self.numel(info) * w
    }

    /// The contracted dim of a product: the left operand's last dim.
    fn contraction(&self, egraph: &EGraph<Op, Facts>, left: Id) -> f64 {
        match egraph[left].data.ty.shape.as_ref().and_then(|s| s.last()) {
            Some(Dim::Known(v)) => *v as f64,
            Some(Dim::Sym(n)) => self.sym(n),
            _ => self.default_dim as f64,
        }
    }

    /// Cost of computing `node` (class data `info`) at run time, not counting its operands.
    pub fn node_cost(&self, egraph: &EGraph<Op, Facts>, node: &Op, info: &Info) -> f64 {
        if info.attr {
            return 0.0;
        }
        if info.constant {
            // Stored once as a parameter (a leaf is already one; a computed one will be).
            return self.bytes(info);
        }
        // Every node run costs something beyond its arithmetic (a kernel launch, a pass over memory).
        NODE_OVERHEAD
            + match node {
                Op::Leaf(_) | Op::Num(_) | Op::Out(_) => return 0.0,
                Op::Gemm([a, _, _]) => {
                    2.0 * self.numel(info) * self.contraction(egraph, *a) + self.numel(info)
                }
                Op::MatMul([a, _]) => 2.0 * self.numel(info) * self.contraction(egraph, *a),
                _ => self.numel(info).max(1.0),
            }
    }
}

/// The chosen node of each class reachable from the roots, and the total cost.
pub struct Extraction {
    pub choice: HashMap<Id, Op>,
    pub cost: f64,
    /// Alternatives the DAG refinement did not try because its work budget ran out (0: all tried).
    pub untried: usize,
}

/// Why extraction gave up (the graph is then left as it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtractStop {
    /// The deadline passed.
    Time,
    /// No acyclic choice reaches every root.
    Incomplete,
}

/// Class visits the DAG refinement may spend (each alternative it tries costs one walk over the
/// chosen DAG): keeps refinement near-linear on huge graphs, and exhaustive on usual ones.
pub const REFINE_BUDGET: usize = 4_000_000;

/// A cost with a total order, for the heap.
#[derive(Clone, Copy, PartialEq)]
struct Key(f64, bool, usize);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap pops the largest, we want the cheapest (then the first pushed).
        other
            .0
            .total_cmp(&self.0)
            .then(other.1.cmp(&self.1))
            .then(other.2.cmp(&self.2))
    }
}

/// Up to this many classes, step 1 costs each candidate by the exact DAG cost of its sub-term
/// (bitsets of the classes it reaches: classes² / 8 bytes, 12.5 MB at the limit); above it, by
/// shares (see `extract`).
pub const EXACT_CLASSES: usize = 10_000;

/// Extraction in two steps:
///
/// 1. Bottom-up, cheapest first (Knuth's generalization of Dijkstra to and-or graphs): an e-node
///    becomes a candidate once every child class has its choice, and a class takes the first
///    candidate popped. Choices only ever point at classes chosen before, so the result is acyclic
///    by construction, with no cycle check. A candidate's cost is the DAG cost of its sub-term:
///    every class it reaches at run time counted once (exact, with bitsets, up to
///    `EXACT_CLASSES`; above, each child's cost is shared among the e-nodes that read it, which
///    approximates DAG cost in linear time without tree cost's exponential blow-up on shared
///    values). A constant class costs its stored bytes, however it is computed; leaves come first.
///    Among equal costs, the node the graph had wins (then the first).
/// 2. DAG refinement: every alternative of every chosen class is tried against the true DAG cost
///    of the whole choice and kept when the total drops, within `REFINE_BUDGET` class visits.
pub fn extract(
    egraph: &EGraph<Op, Facts>,
    roots: &[Id],
    model: &CostModel,
    original: &HashSet<Op>,
    deadline: Instant,
) -> Result<Extraction, ExtractStop> {
    // Every e-node, with its distinct child classes, by dense class index.
    let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    classes.sort();
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let mut nodes: Vec<(usize, &Op, Vec<usize>)> = vec![];
    for (ci, &cid) in classes.iter().enumerate() {
        for node in &egraph[cid].nodes {
            let mut kids: Vec<usize> = node
                .children()
                .iter()
                .map(|c| index[&egraph.find(*c)])
                .collect();
            kids.sort();
            kids.dedup();
            nodes.push((ci, node, kids));
        }
    }
    let n_classes = classes.len();
    let mut readers: Vec<Vec<usize>> = vec![vec![]; n_classes];
    for (i, (_, _, kids)) in nodes.iter().enumerate() {
        for &k in kids {
            readers[k].push(i);
        }
    }
    let exact = n_classes <= EXACT_CLASSES;
    let words = n_classes.div_ceil(64);
    // Per chosen class: its own cost, its total, and (exact mode) the run-time classes it reaches.
    let mut own: Vec<f64> = vec![0.0; n_classes];
    let mut total: Vec<f64> = vec![0.0; n_classes];
    let mut reach: Vec<Vec<u64>> = vec![vec![]; n_classes];
    let mut chosen: Vec<Option<usize>> = vec![None; n_classes];
    let union = |kids: &[usize], reach: &[Vec<u64>]| -> Vec<u64> {
        let mut set = vec![0u64; words];
        for &k in kids {
            for (w, r) in set.iter_mut().zip(&reach[k]) {
                *w |= r;
            }
        }
        set
    };
    let own_cost = |i: usize| -> f64 {
        let (ci, node, _) = &nodes[i];
        let data = &egraph[classes[*ci]].data;
        let c = model.node_cost(egraph, node, data);
        // Leaves first: a stored constant needs no compile-time work.
        if data.constant && !matches!(node, Op::Leaf(_)) {
            c + 1e-6
        } else {
            c
        }
    };
    let candidate = |i: usize, own: &[f64], total: &[f64], reach: &[Vec<u64>]| -> f64 {
        let (ci, _, kids) = &nodes[i];
        let mine = own_cost(i);
        if egraph[classes[*ci]].data.constant {
            return mine;
        }
        if exact {
            let set = union(kids, reach);
            let mut sum = mine;
            for (w, bits) in set.iter().enumerate() {
                let mut b = *bits;
                while b != 0 {
                    let t = b.trailing_zeros() as usize;
                    let c = w * 64 + t;
                    if c != *ci {
                        sum += own[c];
                    }
                    b &= b - 1;
                }
            }
            sum
        } else {
            mine + kids
                .iter()
                .map(|&k| total[k] / readers[k].len().max(1) as f64)
                .sum::<f64>()
        }
    };
    // Ties go to what the graph had, so an equal-cost rewrite does not churn the output.
    let is_original = |i: usize| original.contains(nodes[i].1);
    let mut pending: Vec<usize> = nodes.iter().map(|(_, _, k)| k.len()).collect();
    let mut heap = std::collections::BinaryHeap::new();
    for (i, _) in pending.iter().enumerate().filter(|(_, p)| **p == 0) {
        let key = Key(candidate(i, &own, &total, &reach), !is_original(i), i);
        heap.push((key, i));
    }
    let mut popped = 0usize;
    while let Some((Key(cost, _, _), i)) = heap.pop() {
        popped += 1;
        if popped.is_multiple_of(1024) && Instant::now() > deadline {
            return Err(ExtractStop::Time);
        }
        let ci = nodes[i].0;
        if chosen[ci].is_some() {
            continue;
        }
        chosen[ci] = Some(i);
        own[ci] = own_cost(i);
        total[ci] = cost;
        if exact {
            let mut set = if egraph[classes[ci]].data.constant {
                vec![0u64; words]
            } else {
                union(&nodes[i].2, &reach)
            };
            set[ci / 64] |= 1 << (ci % 64);
            reach[ci] = set;
        }
        for &r in &readers[ci] {
            pending[r] -= 1;
            if pending[r] == 0 && chosen[nodes[r].0].is_none() {
                heap.push((
                    Key(candidate(r, &own, &total, &reach), !is_original(r), r),
                    r,
                ));
            }
        }
    }
    drop(reach);
    let chosen: HashMap<Id, Op> = chosen
        .iter()
        .enumerate()
        .filter_map(|(ci, n)| n.map(|i| (classes[ci], nodes[i].1.clone())))
        .collect();

    // Greedy per-class choices can duplicate work that a shared value already does (choosing a
    // rewritten `x/s` that recomputes `x` when `x` is needed anyway). Improve the whole DAG: try
    // every alternative node of every chosen class and keep it when the global cost drops.
    let mut choice = chosen;
    let mut best_total = dag_cost(egraph, roots, &choice, model).ok_or(ExtractStop::Incomplete)?;
    let mut budget = REFINE_BUDGET;
    let mut untried = 0usize;
    for _pass in 0..4 {
        let mut improved = false;
        let reach = reachable(egraph, roots, &choice);
        let walk = reach.len().max(1);
        for c in reach {
            let alternatives = &egraph[c].nodes;
            if alternatives.len() < 2 {
                continue;
            }
            for n in alternatives {
                if choice.get(&c) == Some(n)
                    || n.children()
                        .iter()
                        .any(|k| !choice.contains_key(&egraph.find(*k)))
                {
                    continue;
                }
                if budget < walk || Instant::now() > deadline {
                    untried += 1;
                    continue;
                }
                budget -= walk;
                let old = choice.insert(c, n.clone());
                match dag_cost(egraph, roots, &choice, model) {
                    Some(v) if v + 1e-9 < best_total => {
                        best_total = v;
                        improved = true;
                    }
                    _ => {
                        if let Some(o) = old {
                            choice.insert(c, o);
                        }
                    }
                }
            }
        }
        if !improved || untried > 0 {
            break;
        }
    }
    let keep: std::collections::HashSet<Id> =
        reachable(egraph, roots, &choice).into_iter().collect();
    choice.retain(|c, _| keep.contains(c));
    Ok(Extraction {
        choice,
        cost: best_total,
        untried,
    })
}

/// Classes reachable from the roots through the chosen nodes, in a stable order.
fn reachable(egraph: &EGraph<Op, Facts>, roots: &[Id], choice: &HashMap<Id, Op>) -> Vec<Id> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    let mut out = vec![];
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        out.push(c);
        if let Some(n) = choice.get(&c) {
            for k in n.children() {
                stack.push(egraph.find(*k));
            }
        }
    }
    out
}

/// The cost of the DAG a choice selects, or None when it is incomplete or cyclic. A constant
/// class costs its stored bytes; what computes it (at compile time) costs nothing, unless the
/// run-time graph also reaches it.
pub fn dag_cost(
    egraph: &EGraph<Op, Facts>,
    roots: &[Id],
    choice: &HashMap<Id, Op>,
    model: &CostModel,
) -> Option<f64> {
    // Complete and acyclic: iterative DFS with colours (1 = on the stack, 2 = done).
    let mut colour: HashMap<Id, u8> = HashMap::new();
    for r in roots {
        let mut stack: Vec<(Id, bool)> = vec![(egraph.find(*r), false)];
        while let Some((c, expanded)) = stack.pop() {
            if expanded {
                colour.insert(c, 2);
                continue;
            }
            match colour.get(&c) {
                Some(2) => continue,
                Some(1) => return None,
                _ => {}
            }
            colour.insert(c, 1);
            stack.push((c, true));
            for k in choice.get(&c)?.children() {
                let k = egraph.find(*k);
                match colour.get(&k) {
                    Some(1) => return None,
                    Some(2) => {}
                    _ => stack.push((k, false)),
                }
            }
        }
    }
    Some(cost_of(egraph, roots, choice, model))
}

/// The DAG cost of a given choice: every class the run-time graph reaches counts once; the
/// inside of a constant class (computed at compile time) is not reached.
pub fn cost_of(
    egraph: &EGraph<Op, Facts>,
    roots: &[Id],
    choice: &HashMap<Id, Op>,
    model: &CostModel,
) -> f64 {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    let mut total = 0.0;
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        let Some(node) = choice.get(&c) else { continue };
        let data = &egraph[c].data;
        total += model.node_cost(egraph, node, data);
        if !data.constant {
            for k in node.children() {
                stack.push(egraph.find(*k));
            }
        }
    }
    total
}

/// A leaf's (kind, name), if the node is one.
pub fn as_leaf(node: &Op) -> Option<(&str, &str)> {
    match node {
        Op::Leaf(s) => Some(leaf_parts(s)),
        _ => None,
    }
}
