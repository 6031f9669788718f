//! Extraction by a cost model kept apart from the rules: FLOPs at the expected shapes for values
//! computed at run time, plus the bytes of every parameter (a constant class is stored once,
//! whatever computes it at compile time). DAG-aware: a class shared by several users counts once.
//! Greedy bottom-up over cost sets, with a cycle check so the chosen term is always a DAG.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
}

struct Best {
    node: Op,
    /// Classes whose cost is counted, with their own cost.
    costs: BTreeMap<Id, f64>,
    /// Every class in the chosen sub-DAG (for the cycle check).
    reach: BTreeSet<Id>,
    total: f64,
}

pub fn extract(egraph: &EGraph<Op, Facts>, roots: &[Id], model: &CostModel) -> Option<Extraction> {
    let mut best: HashMap<Id, Best> = HashMap::new();
    let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    classes.sort();
    for _round in 0..100 {
        let mut changed = false;
        for &cid in &classes {
            let class = &egraph[cid];
            for node in &class.nodes {
                let kids: Vec<Id> = node.children().iter().map(|c| egraph.find(*c)).collect();
                if kids
                    .iter()
                    .any(|k| !best.contains_key(k) || *k == cid || best[k].reach.contains(&cid))
                {
                    continue;
                }
                let own = model.node_cost(egraph, node, &class.data);
                let mut reach: BTreeSet<Id> = BTreeSet::new();
                let mut costs: BTreeMap<Id, f64> = BTreeMap::new();
                for k in &kids {
                    reach.extend(best[k].reach.iter().copied());
                    reach.insert(*k);
                    // A constant class is folded: what computes it costs nothing at run time.
                    if !class.data.constant {
                        for (c, v) in &best[k].costs {
                            costs.insert(*c, *v);
                        }
                    }
                }
                costs.insert(cid, own);
                let total: f64 = costs.values().sum();
                // Prefer leaves (no compile-time work), then cheaper, then the first node.
                let better = match best.get(&cid) {
                    None => true,
                    Some(b) => {
                        let leaf_now = matches!(node, Op::Leaf(_));
                        let leaf_before = matches!(b.node, Op::Leaf(_));
                        (leaf_now && !leaf_before && class.data.constant)
                            || (total + 1e-9 < b.total && !(leaf_before && class.data.constant))
                    }
                };
                if better {
                    best.insert(
                        cid,
                        Best {
                            node: node.clone(),
                            costs,
                            reach,
                            total,
                        },
                    );
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    // Greedy per-class choices can duplicate work that a shared value already does (choosing a
    // rewritten `x/s` that recomputes `x` when `x` is needed anyway). Improve the whole DAG: try
    // every alternative node of every chosen class and keep it when the global cost drops.
    let mut choice: HashMap<Id, Op> = best.iter().map(|(c, b)| (*c, b.node.clone())).collect();
    let mut cost = dag_cost(egraph, roots, &choice, model)?;
    for _pass in 0..4 {
        let mut improved = false;
        for c in reachable(egraph, roots, &choice) {
            let nodes = &egraph[c].nodes;
            if nodes.len() < 2 {
                continue;
            }
            for n in nodes {
                if choice.get(&c) == Some(n)
                    || n.children()
                        .iter()
                        .any(|k| !choice.contains_key(&egraph.find(*k)))
                {
                    continue;
                }
                let old = choice.insert(c, n.clone());
                match dag_cost(egraph, roots, &choice, model) {
                    Some(v) if v + 1e-9 < cost => {
                        cost = v;
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
        if !improved {
            break;
        }
    }
    let keep: std::collections::HashSet<Id> =
        reachable(egraph, roots, &choice).into_iter().collect();
    choice.retain(|c, _| keep.contains(c));
    Some(Extraction { choice, cost })
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
