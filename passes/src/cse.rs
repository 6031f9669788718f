//! Common-subexpression elimination: nodes with the same op, domain, attributes and inputs are
//! merged; initializers with the same dtype, dims and bytes are merged (compared by a sampled
//! fingerprint first, then in full). Random ops and nodes with
//! subgraphs are left alone. Recurses into subgraphs.

use std::collections::HashMap;

use protobuf::Message;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Graph, Model, Result};

use crate::graph_util::{
    constant_initializers, is_nondeterministic, output_names, rename_all, resolve_chains,
};

pub struct CommonSubexpressionElimination;

impl Pass for CommonSubexpressionElimination {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn description(&self) -> &'static str {
        "merges identical nodes and identical initializers"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let mut changes = 0;
        run_graph(&mut model.graph, &mut changes);
        Ok(PassOutcome::changed(changes))
    }
}

fn run_graph(g: &mut Graph, changes: &mut usize) {
    for n in &mut g.nodes {
        for a in &mut n.attributes {
            for sg in &mut a.graphs {
                run_graph(sg, changes);
            }
        }
    }
    let outputs = output_names(g);
    // Initializers: key by (hash, dtype, dims); confirm by bytes.
    let consts = constant_initializers(g);
    let mut first: HashMap<(u64, i32, Vec<i64>), Vec<usize>> = HashMap::new();
    let mut renames: Vec<(String, String)> = vec![];
    for (i, t) in g.initializers.iter().enumerate() {
        if !consts.contains(t.name()) || outputs.contains(t.name()) {
            continue;
        }
        // A sampled fingerprint keeps large distinct weights from being read in full.
        let key = (t.fingerprint(), t.proto.data_type, t.dims().to_vec());
        let cands = first.entry(key).or_default();
        if let Some(&j) = cands.iter().find(|&&j| g.initializers[j].same_data(t)) {
            renames.push((t.name().to_string(), g.initializers[j].name().to_string()));
        } else {
            cands.push(i);
        }
    }
    let mut renames: HashMap<String, String> = renames.into_iter().collect();
    *changes += renames.len();

    // Nodes, in order, so a merge can enable merges downstream: a node's inputs are read through
    // the renames made so far (topological order makes them final), and every rename is applied
    // in one sweep at the end, so the pass is linear in the graph.
    let mut seen: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    let mut dup = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        if is_nondeterministic(&n.op_type)
            || n.has_subgraphs()
            || n.outputs.iter().any(|o| outputs.contains(o))
        {
            continue;
        }
        let mut key = Vec::new();
        for part in [&n.domain, &n.op_type] {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        for inp in &n.inputs {
            let inp = renames.get(inp).unwrap_or(inp);
            key.extend_from_slice(inp.as_bytes());
            key.push(0);
        }
        key.push(1);
        let mut attrs: Vec<_> = n.attributes.iter().map(|a| &a.proto).collect();
        attrs.sort_by(|a, b| a.name.cmp(&b.name));
        for a in attrs {
            key.extend(a.write_to_bytes().unwrap_or_default());
            key.push(2);
        }
        key.extend((n.outputs.len() as u32).to_le_bytes());
        key.extend(n.outputs.iter().map(|o| o.is_empty() as u8));
        if let Some(prev_outs) = seen.get(&key) {
            for (o, p) in n.outputs.iter().zip(prev_outs) {
                if !o.is_empty() {
                    renames.insert(o.clone(), p.clone());
                }
            }
            dup[i] = true;
            *changes += 1;
        } else {
            seen.insert(key, n.outputs.clone());
        }
    }
    let mut keep = dup.iter().map(|d| !d);
    g.nodes.retain(|_| keep.next().unwrap_or(true));
    resolve_chains(&mut renames);
    rename_all(g, &renames);
}
