//! Graphs that are long rather than wide: every -O1 pass must be linear in the graph (no rescans
//! per rewrite, no recursion as deep as the graph, extraction without a nodes × depth table).
//! These assert results, not times; `fixtures/bench_scale.py --pathological` times them.

use wcc_ir::{Dim, Graph, Model, Node, TensorType, ValueInfo};
use wcc_passes::OptLevel;

fn value(name: &str) -> ValueInfo {
    ValueInfo::tensor(
        name,
        TensorType::new(wcc_ir::DataType::F32, vec![Dim::Known(1), Dim::Known(8)]),
    )
}

/// A model whose graph is `x` → `steps` → output `y`; `step(i, prev)` gives the nodes of step
/// `i` and the value it produces.
fn chain(steps: usize, step: impl Fn(usize, &str) -> (Vec<Node>, String)) -> Model {
    let mut g = Graph {
        name: "chain".into(),
        inputs: vec![value("x")],
        ..Default::default()
    };
    let mut prev = "x".to_string();
    for i in 0..steps {
        let (nodes, out) = step(i, &prev);
        g.nodes.extend(nodes);
        prev = out;
    }
    g.nodes
        .push(Node::new("out", "Identity", vec![prev], vec!["y".into()]));
    g.outputs = vec![value("y")];
    Model {
        ir_version: 8,
        opset_imports: vec![(String::new(), 17)],
        graph: g,
        functions: vec![],
        rest: Default::default(),
        sources: vec![],
        escaped_strings: false,
    }
}

fn o1(mut m: Model) -> Model {
    wcc_passes::optimize(&mut m, wcc_passes::pipeline(OptLevel::O1)).unwrap();
    m
}

fn ops(m: &Model) -> Vec<&str> {
    m.graph.nodes.iter().map(|n| n.op_type.as_str()).collect()
}

#[test]
fn a_long_negation_chain_cancels_in_pairs() {
    for (n, left) in [(20_001, vec!["Neg"]), (20_000, vec!["Identity"])] {
        let m = chain(n, |i, prev| {
            let out = format!("v{i}");
            (
                vec![Node::new(
                    &format!("n{i}"),
                    "Neg",
                    vec![prev.into()],
                    vec![out.clone()],
                )],
                out,
            )
        });
        let m = o1(m);
        assert_eq!(ops(&m), left, "{n} negations");
        assert_eq!(m.graph.outputs[0].name, "y");
    }
}

#[test]
fn a_long_identity_chain_is_removed() {
    let m = chain(40_000, |i, prev| {
        let out = format!("v{i}");
        (
            vec![Node::new(
                &format!("n{i}"),
                "Identity",
                vec![prev.into()],
                vec![out.clone()],
            )],
            out,
        )
    });
    let m = o1(m);
    // The last Identity writes the graph output; its producer is the input itself, so one stays.
    assert_eq!(ops(&m), ["Identity"]);
    assert_eq!(m.graph.nodes[0].inputs, ["x"]);
}

#[test]
fn a_long_residual_chain_keeps_every_step() {
    // x ← x + relu(x), 3000 times: nothing to remove, and nothing may be lost or reordered badly.
    let m = chain(3_000, |i, prev| {
        let r = format!("r{i}");
        let a = format!("a{i}");
        (
            vec![
                Node::new(
                    &format!("relu{i}"),
                    "Relu",
                    vec![prev.into()],
                    vec![r.clone()],
                ),
                Node::new(
                    &format!("add{i}"),
                    "Add",
                    vec![prev.into(), r],
                    vec![a.clone()],
                ),
            ],
            a,
        )
    });
    let m = o1(m);
    let relu = ops(&m).iter().filter(|o| **o == "Relu").count();
    let add = ops(&m).iter().filter(|o| **o == "Add").count();
    assert_eq!((relu, add), (3_000, 3_000));
    wcc_ir::validate::validate(&m).unwrap();
}

#[test]
fn duplicate_chains_merge_in_one_pass() {
    // Two identical 5000-node chains off the same input: CSE merges the second into the first.
    let mut m = chain(5_000, |i, prev| {
        let out = format!("v{i}");
        (
            vec![Node::new(
                &format!("n{i}"),
                "Relu",
                vec![prev.into()],
                vec![out.clone()],
            )],
            out,
        )
    });
    let mut prev = "x".to_string();
    for i in 0..5_000 {
        let out = format!("w{i}");
        m.graph.nodes.push(Node::new(
            &format!("m{i}"),
            "Relu",
            vec![prev],
            vec![out.clone()],
        ));
        prev = out;
    }
    m.graph
        .nodes
        .push(Node::new("out2", "Identity", vec![prev], vec!["z".into()]));
    m.graph.outputs.push(value("z"));
    let m = o1(m);
    let relu = ops(&m).iter().filter(|o| **o == "Relu").count();
    // All but the last node of the second chain merge: the last ones write distinct graph
    // outputs (y and z), which keep their own producers.
    assert_eq!(relu, 5_001, "the duplicate chain is merged");
    assert_eq!(m.graph.outputs.len(), 2);
}
