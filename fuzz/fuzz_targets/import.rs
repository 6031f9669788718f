//! Any bytes: parse as an ONNX model, validate, print, and write back. Must never panic; a model
//! that imports and validates must export, and re-import to the same IR.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = wcc_ir::import::load_bytes(data) else {
        return;
    };
    if wcc_ir::validate::validate(&m).is_err() {
        return;
    }
    let _ = wcc_ir::print::print_model(&m);
    let _ = wcc_ir::infer::infer_graph(&m.graph, m.default_opset(), None);
    let bytes = wcc_ir::export::to_bytes(&m).expect("a validated model exports");
    let back = wcc_ir::import::load_bytes(&bytes).expect("an exported model imports");
    assert!(back.same_ir(&m), "export → import changed the IR");
});
