//! Graph statistics for reports: nodes by op, parameters and bytes by dtype.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Graph, Model};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GraphStats {
    pub nodes: usize,
    pub nodes_by_op: BTreeMap<String, usize>,
    /// Elements in initializers.
    pub parameters: u64,
    pub bytes: u64,
    pub bytes_by_dtype: BTreeMap<String, u64>,
    pub initializers: usize,
}

impl GraphStats {
    pub fn of(model: &Model) -> Self {
        let mut s = GraphStats::default();
        s.add(&model.graph);
        s
    }

    fn add(&mut self, g: &Graph) {
        for n in &g.nodes {
            self.nodes += 1;
            let key = if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}::{}", n.domain, n.op_type)
            };
            *self.nodes_by_op.entry(key).or_default() += 1;
            for a in &n.attributes {
                for sg in &a.graphs {
                    self.add(sg);
                }
            }
        }
        for t in &g.initializers {
            self.initializers += 1;
            self.parameters += t.numel();
            let b = t.byte_size();
            self.bytes += b;
            let d = t
                .dtype()
                .map(|d| d.name().to_string())
                .unwrap_or_else(|_| "?".into());
            *self.bytes_by_dtype.entry(d).or_default() += b;
        }
    }
}
