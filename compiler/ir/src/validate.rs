//! Structural validation: every node against its op's schema (arity, attribute types, attribute
//! values), unique value names, every input defined before use, no cycles, outputs defined; recursively into subgraphs (which may read values of enclosing graphs). Also the
//! topological sort used before export.

use std::collections::{HashMap, HashSet};

use petgraph::graph::DiGraph;

use crate::error::{IrError, Result};
use crate::model::{Graph, Model};

/// Checks the whole model; the error names the graph, the node and the problem.
pub fn validate(model: &Model) -> Result<()> {
    validate_graph(&model.graph, &HashSet::new())
}

fn node_label(g: &Graph, i: usize) -> String {
    let n = &g.nodes[i];
    if n.name.is_empty() {
        format!("#{i} ({})", n.op_type)
    } else {
        format!("'{}' ({})", n.name, n.op_type)
    }
}

fn validate_graph(g: &Graph, outer: &HashSet<String>) -> Result<()> {
    let err = |d: String| IrError::invalid(&g.name, d);
    // Definitions: graph inputs, initializers (which may also be listed as inputs), node outputs.
    let mut defined: HashMap<&str, String> = HashMap::new();
    let input_names: HashSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    for v in &g.inputs {
        if v.name.is_empty() {
            return Err(err("a graph input has an empty name".into()));
        }
        if defined.insert(&v.name, "graph input".into()).is_some() {
            return Err(err(format!("graph input '{}' is declared twice", v.name)));
        }
    }
    let mut seen_init = HashSet::new();
    for t in &g.initializers {
        if !seen_init.insert(t.name()) {
            return Err(err(format!("initializer '{}' is declared twice", t.name())));
        }
        if !input_names.contains(t.name()) {
            defined.insert(t.name(), "initializer".into());
        }
    }
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        crate::ops::validate_node(n).map_err(|d| err(format!("node {}: {d}", node_label(g, i))))?;
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if let Some(prev) = defined.get(o.as_str()) {
                return Err(err(format!(
                    "value '{o}' is produced by node {} but is already defined by {prev}",
                    node_label(g, i)
                )));
            }
            defined.insert(o, format!("node {}", node_label(g, i)));
            producer.insert(o, i);
        }
    }
    // Inputs defined, and the dependency graph acyclic.
    let mut dg = DiGraph::<usize, ()>::with_capacity(g.nodes.len(), g.nodes.len());
    let ids: Vec<_> = (0..g.nodes.len()).map(|i| dg.add_node(i)).collect();
    for (i, n) in g.nodes.iter().enumerate() {
        for inp in n.present_inputs() {
            if let Some(&p) = producer.get(inp) {
                dg.add_edge(ids[p], ids[i], ());
            } else if !defined.contains_key(inp) && !outer.contains(inp) {
                return Err(err(format!(
                    "node {} reads '{inp}', which is not defined",
                    node_label(g, i)
                )));
            }
        }
        // Subgraphs see everything defined here and outside.
        if n.has_subgraphs() {
            let mut scope: HashSet<String> = outer.clone();
            scope.extend(defined.keys().map(|s| s.to_string()));
            for a in &n.attributes {
                for sg in &a.graphs {
                    validate_graph(sg, &scope).map_err(|e| {
                        IrError::invalid(
                            &g.name,
                            format!(
                                "in subgraph '{}' of node {}: {e}",
                                a.name(),
                                node_label(g, i)
                            ),
                        )
                    })?;
                }
            }
        }
    }
    if let Err(cycle) = petgraph::algo::toposort(&dg, None) {
        let i = dg[cycle.node_id()];
        return Err(err(format!("node {} is part of a cycle", node_label(g, i))));
    }
    for o in &g.outputs {
        if !defined.contains_key(o.name.as_str()) && !outer.contains(&o.name) {
            return Err(err(format!(
                "graph output '{}' is not produced by any node",
                o.name
            )));
        }
    }
    Ok(())
}

/// Reorders nodes topologically, keeping the current order wherever dependencies allow
/// (deterministic). Assumes the graph is acyclic.
pub fn topo_sort(g: &mut Graph) {
    let n = g.nodes.len();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        for o in &node.outputs {
            producer.insert(o, i);
        }
    }
    let mut indeg = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let mut deps: Vec<usize> = node
            .present_inputs()
            .filter_map(|x| producer.get(x).copied())
            .collect();
        // Values read from inside subgraphs are dependencies too.
        for a in &node.attributes {
            for sg in &a.graphs {
                collect_outer_reads(sg, &mut |x| {
                    if let Some(&p) = producer.get(x) {
                        deps.push(p)
                    }
                });
            }
        }
        deps.sort_unstable();
        deps.dedup();
        deps.retain(|d| *d != i);
        indeg[i] = deps.len();
        for d in deps {
            users[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|i| indeg[*i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != n {
        return; // cyclic: leave as is, validation reports it
    }
    let mut old: Vec<Option<crate::model::Node>> =
        std::mem::take(&mut g.nodes).into_iter().map(Some).collect();
    g.nodes = order.into_iter().map(|i| old[i].take().unwrap()).collect();
}

/// Calls `f` with every value name a subgraph reads (conservatively: all its node inputs).
pub fn collect_outer_reads(g: &Graph, f: &mut dyn FnMut(&str)) {
    for n in &g.nodes {
        for i in n.present_inputs() {
            f(i);
        }
        for a in &n.attributes {
            for sg in &a.graphs {
                collect_outer_reads(sg, f);
            }
        }
    }
    for o in &g.outputs {
        f(&o.name);
    }
}

/// Checks, before a backend runs `model` on inputs of these concrete shapes, that no value whose
/// shape inference can size would take more than `max_tensor_bytes`: a model that asks for a
/// terabyte intermediate is refused with the value's name instead of being handed to a backend
/// that would try to allocate it.
pub fn check_run_budget(
    model: &Model,
    input_shapes: &[(String, Vec<usize>)],
    max_tensor_bytes: u64,
) -> Result<()> {
    let g = &model.graph;
    let concrete: Vec<(String, crate::model::TensorType)> = input_shapes
        .iter()
        .map(|(name, dims)| {
            let dtype = g
                .inputs
                .iter()
                .find(|v| v.name == *name)
                .and_then(|v| v.tensor_type())
                .and_then(|t| t.dtype);
            let shape = dims
                .iter()
                .map(|d| crate::model::Dim::Known(*d as i64))
                .collect();
            (
                name.clone(),
                crate::model::TensorType {
                    dtype,
                    shape: Some(shape),
                },
            )
        })
        .collect();
    let m = crate::infer::infer_graph_with_inputs(g, model.default_opset(), None, &concrete);
    for n in &g.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            let Some(t) = m.get(o) else { continue };
            let (Some(dtype), Some(dims)) = (t.dtype, t.static_dims()) else {
                continue;
            };
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, d| acc.checked_mul(u64::try_from(*d).ok()?));
            let bytes = numel.and_then(|n| dtype.storage_bytes(n));
            if bytes.is_none_or(|b| b > max_tensor_bytes) {
                return Err(IrError::invalid(
                    &g.name,
                    format!(
                        "value '{o}' of node '{}' ({}) would be {} with these inputs ({dims:?}), over the {} budget for running a model",
                        n.name,
                        n.op_type,
                        bytes.map_or("more than 2^64 bytes".to_string(), human_bytes),
                        human_bytes(max_tensor_bytes)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
