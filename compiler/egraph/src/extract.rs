//! Extraction by a cost model kept apart from the rules: FLOPs at the expected shapes for values
//! computed at run time, plus the bytes of every parameter (a constant class is stored once,
//! whatever computes it at compile time). DAG-aware: a class shared by several users counts once.
//! Greedy bottom-up over cost sets, with a cycle check so the chosen term is always a DAG.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use egg::{EGraph, Id, Language};
use wcc_ir::Dim;

use crate::analysis::{Facts, Info};
use crate::lang::{leaf_parts, Op};

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
    fn numel(&self, info: &Info) -> f64 {
        match &info.ty.shape {
            None => self.default_dim as f64,
            Some(s) => s
                .iter()
                .map(|d| match d {
                    Dim::Known(v) => *v as f64,
                    Dim::Sym(n) => *self.dims.get(n).unwrap_or(&self.default_dim) as f64,
                    Dim::Unknown => self.default_dim as f64,
                })
                .product(),
        }
    }

    fn bytes(&self, info: &Info) -> f64 {
        let w = info.ty.dtype.and_then(|d| d.bits()).unwrap_or(32) as f64 / 8.0;
        self.numel(info) * w
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
        match node {
            Op::Leaf(_) | Op::Num(_) | Op::Out(_) => 0.0,
            Op::MatMul([a, _]) => {
                let k = egraph[*a]
                    .data
                    .ty
                    .shape
                    .as_ref()
                    .and_then(|s| s.last().cloned());
                let k = match k {
                    Some(Dim::Known(v)) => v as f64,
                    Some(Dim::Sym(n)) => *self.dims.get(&n).unwrap_or(&self.default_dim) as f64,
                    _ => self.default_dim as f64,
                };
                2.0 * self.numel(info) * k
            }
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
    let mut costs: BTreeMap<Id, f64> = BTreeMap::new();
    let mut choice = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    while let Some(c) = stack.pop() {
        if choice.contains_key(&c) {
            continue;
        }
        let b = best.get(&c)?;
        for (k, v) in &b.costs {
            costs.insert(*k, *v);
        }
        for k in b.node.children() {
            stack.push(egraph.find(*k));
        }
        choice.insert(c, b.node.clone());
    }
    Some(Extraction {
        choice,
        cost: costs.values().sum(),
    })
}

/// The DAG cost of a given choice (used for the graph as it was imported).
pub fn cost_of(
    egraph: &EGraph<Op, Facts>,
    roots: &[Id],
    choice: &HashMap<Id, Op>,
    model: &CostModel,
) -> f64 {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<(Id, bool)> = roots.iter().map(|r| (egraph.find(*r), false)).collect();
    let mut total = 0.0;
    while let Some((c, under_const)) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        let Some(node) = choice.get(&c) else { continue };
        let data = &egraph[c].data;
        if !under_const {
            total += model.node_cost(egraph, node, data);
        }
        for k in node.children() {
            stack.push((egraph.find(*k), under_const || data.constant));
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
