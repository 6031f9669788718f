//! Bone/MiSS branch rewriting. PEFT's MiSS (formerly Bone) forward adds `Σ_j x_j · B` (the input
//! split into blocks of r, summed, times the shared block `B ∈ R^{r×out}`), exported as
//! `MatMul(ReduceSum(Reshape(X, [..., n, r]), axis=-2), B)`. Since `Σ_j x_j·B = X·tile(B, [n, 1])`,
//! the branch becomes `MatMul(X, Tile(B, [n, 1]))`, which the algebra pass then adds into the base
//! weight (`W' = W + tile(B)`, i.e. `W'[:, jr:(j+1)r] += Bᵀ` in PyTorch's layout).
//! Paper: Kang, "Bone/MiSS", arXiv 2409.15371. May touch: the branch's MatMul (its first input)
//! and new Tile/initializer for the repeats. Exact.

use wcc_ir::infer::infer_graph;
use wcc_ir::ops::util::{axes_of, norm_axes};
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Dim, Model, Node, Result, Tensor};

use crate::graph_util::{constant_initializers, fresh_name};

pub struct MissBranch;

impl Pass for MissBranch {
    fn name(&self) -> &'static str {
        "miss-branch"
    }
    fn description(&self) -> &'static str {
        "rewrites Bone/MiSS adapter branches (Reshape→ReduceSum→MatMul) into a MatMul by a tiled block"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let g = &mut model.graph;
        let types = infer_graph(g, opset, None);
        let consts = constant_initializers(g);
        let producer = |name: &str, g: &wcc_ir::Graph| {
            g.nodes
                .iter()
                .position(|n| n.outputs.iter().any(|o| o == name))
        };
        let mut edits: Vec<(usize, String, String, i64)> = vec![]; // (matmul idx, X, B, n)
        for (i, mm) in g.nodes.iter().enumerate() {
            if !mm.is("MatMul") || !consts.contains(&mm.inputs[1]) {
                continue;
            }
            let Some(r_idx) = producer(&mm.inputs[0], g) else {
                continue;
            };
            let rs = &g.nodes[r_idx];
            if !rs.is("ReduceSum") || rs.attr_i("keepdims").unwrap_or(1) != 0 {
                continue;
            }
            let Some(rank_in) = rs
                .inputs
                .first()
                .and_then(|x| types.shape(x))
                .map(|s| s.len())
            else {
                continue;
            };
            let axes = axes_of(rs, || rs.inputs.get(1).and_then(|a| types.ints(a)));
            if axes.and_then(|a| norm_axes(&a, rank_in)) != Some(vec![rank_in.wrapping_sub(2)]) {
                continue;
            }
            let Some(sh_idx) = producer(&rs.inputs[0], g) else {
                continue;
            };
            let reshape = &g.nodes[sh_idx];
            if !reshape.is("Reshape") {
                continue;
            }
            let x = &reshape.inputs[0];
            let (Some(xs), Some(rshape), Some(bdims)) = (
                types.shape(x),
                types.shape(&rs.inputs[0]),
                g.initializer(&mm.inputs[1]).map(|t| t.dims().to_vec()),
            ) else {
                continue;
            };
            let (Some(Dim::Known(width)), [.., Dim::Known(n), Dim::Known(r)]) =
                (xs.last(), rshape.as_slice())
            else {
                continue;
            };
            // Only the leading dims may differ: [..., n, r] must split X's last dim exactly.
            if n * r != *width
                || rshape.len() != xs.len() + 1
                || rshape[..xs.len() - 1] != xs[..xs.len() - 1]
                || bdims.len() != 2
                || bdims[0] != *r
            {
                continue;
            }
            edits.push((i, x.clone(), mm.inputs[1].clone(), *n));
        }
        let count = edits.len();
        for (i, x, b, n) in edits.into_iter().rev() {
            let reps = fresh_name(g, &format!("{b}_miss_reps"));
            g.initializers.push(
                Tensor::from_raw(
                    &reps,
                    DataType::I64,
                    &[2],
                    [n, 1].iter().flat_map(|v: &i64| v.to_le_bytes()).collect(),
                )
                .expect("consistent"),
            );
            let tiled = fresh_name(g, &format!("{b}_miss_tiled"));
            let tile = Node::new(
                &format!("{}/miss_tile", g.nodes[i].name),
                "Tile",
                vec![b, reps],
                vec![tiled.clone()],
            );
            g.nodes[i].inputs = vec![x, tiled];
            g.nodes.insert(i, tile);
        }
        Ok(PassOutcome::changed(count))
    }
}
