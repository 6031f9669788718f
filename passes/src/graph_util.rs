//! Helpers shared by passes: use counts, renaming, which values are constant.

use std::collections::{HashMap, HashSet};

use wcc_ir::validate::collect_outer_reads;
use wcc_ir::Graph;

/// How many times each value is read in `g` (node inputs, subgraph reads, graph outputs).
pub fn use_counts(g: &Graph) -> HashMap<String, usize> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for n in &g.nodes {
        for i in n.present_inputs() {
            *m.entry(i.to_string()).or_default() += 1;
        }
        for a in &n.attributes {
            for sg in &a.graphs {
                collect_outer_reads(sg, &mut |x| *m.entry(x.to_string()).or_default() += 1);
            }
        }
    }
    for o in &g.outputs {
        *m.entry(o.name.clone()).or_default() += 1;
    }
    m
}

/// Replaces every read of `from` by `to` in `g` and its subgraphs (node inputs and subgraph
/// outputs that refer to outer values; graph outputs of `g` itself are left alone). For many
/// renames at once, `rename_all` does them in one sweep.
pub fn rename_uses(g: &mut Graph, from: &str, to: &str) {
    rename_all(g, &HashMap::from([(from.to_string(), to.to_string())]));
}

/// Replaces every read of a key of `map` by its value, in `g` and its subgraphs (node inputs and
/// subgraph outputs that refer to outer values; graph outputs of `g` itself are left alone), in
/// one sweep. `map` must be resolved (see `resolve_chains`): no value is itself a key.
pub fn rename_all(g: &mut Graph, map: &HashMap<String, String>) {
    if map.is_empty() {
        return;
    }
    for n in &mut g.nodes {
        for i in &mut n.inputs {
            if let Some(to) = map.get(i.as_str()) {
                *i = to.clone();
            }
        }
        for a in &mut n.attributes {
            for sg in &mut a.graphs {
                rename_all(sg, map);
                for o in &mut sg.outputs {
                    if let Some(to) = map.get(o.name.as_str()) {
                        o.name = to.clone();
                    }
                }
            }
        }
    }
}

/// Resolves chains in a rename map (`a→b, b→c` becomes `a→c, b→c`), in time linear in its size.
/// A cycle (which no graph in SSA form yields) is cut where it closes.
pub fn resolve_chains(map: &mut HashMap<String, String>) {
    let keys: Vec<String> = map.keys().cloned().collect();
    let mut done: HashSet<String> = HashSet::new();
    for k in keys {
        if done.contains(&k) {
            continue;
        }
        let mut path = vec![k.clone()];
        let mut on_path: HashSet<String> = HashSet::from([k.clone()]);
        let mut cur = map[&k].clone();
        while let Some(next) = map.get(&cur) {
            if done.contains(&cur) {
                cur = next.clone();
                break;
            }
            if !on_path.insert(cur.clone()) {
                break;
            }
            path.push(cur.clone());
            cur = next.clone();
        }
        for p in path {
            if p != cur {
                map.insert(p.clone(), cur.clone());
            } else {
                map.remove(&p);
            }
            done.insert(p);
        }
    }
}

/// Names of initializers that are constant (see `wcc_ir::Graph::constants`).
pub fn constant_initializers(g: &Graph) -> HashSet<String> {
    g.constants()
}

/// Names of the graph's outputs.
pub fn output_names(g: &Graph) -> HashSet<String> {
    g.outputs.iter().map(|o| o.name.clone()).collect()
}

pub use wcc_ir::model::is_nondeterministic;

/// `base`, or `base_N` with the smallest N that no value or node output of `g` uses.
pub fn fresh_name(g: &Graph, base: &str) -> String {
    let used = g.defined_names();
    if !used.contains(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !used.contains(n))
        .unwrap()
}
