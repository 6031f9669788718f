//! Snapshots of `wcc print` after -O1 for every fixture: a reviewer sees exactly what -O1 leaves.

mod common;

use common::*;
use wcc_passes::OptLevel;

#[test]
fn print_after_o1() {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(false);
    settings.set_snapshot_path(root().join("tests/snapshots"));
    settings.bind(|| {
        for stem in fixture_stems() {
            let m = optimized(&stem, OptLevel::O1);
            insta::assert_snapshot!(format!("O1__{stem}"), wcc_ir::print::print_model(&m));
        }
    });
}
