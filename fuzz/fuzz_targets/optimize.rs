//! Small models: import, validate, then the -O1 pipeline (with tight e-graph limits). Must never
//! panic; whatever -O1 returns must validate (the pass manager checks after every pass).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 << 10 {
        return;
    }
    let Ok(mut m) = wcc_ir::import::load_bytes(data) else {
        return;
    };
    if wcc_ir::validate::validate(&m).is_err() || m.graph.total_nodes() > 2000 {
        return;
    }
    let opts = wcc_passes::PipelineOptions {
        egraph_limits: wcc_egraph::Limits {
            nodes: 20_000,
            iterations: 4,
            time: std::time::Duration::from_millis(200),
        },
        ..Default::default()
    };
    let Ok(passes) = wcc_passes::pipeline_with(wcc_passes::OptLevel::O1, &opts) else {
        return;
    };
    if wcc_passes::optimize(&mut m, passes).is_ok() {
        wcc_ir::validate::validate(&m).expect("-O1 output validates");
        let _ = wcc_ir::export::to_bytes(&m);
    }
});
