//! The fuzz properties, run by the ordinary test suite (no libFuzzer, stable Rust).
//!
//! 1. Replays every committed input under `fuzz/corpus/<target>/` and every input that ever
//!    crashed a target under `fuzz/regressions/<target>/` (each crash found becomes a file there,
//!    named after what it found), through the same property the fuzz target checks.
//! 2. Runs each property on a fixed budget of random inputs (proptest), so the properties are
//!    exercised even where cargo-fuzz cannot run.
//!
//! The properties themselves are in `fuzz/src/props.rs` (shared with the fuzz targets).

#[path = "../fuzz/src/props.rs"]
mod props;

use std::path::Path;

use proptest::prelude::*;

fn replay(target: &str, prop: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| prop(&data));
            assert!(r.is_ok(), "{} fails its property (see the panic above)", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn header_corpus_and_regressions() {
    assert!(replay("safetensors_header", props::header) >= 10);
}

#[test]
fn index_corpus_and_regressions() {
    assert!(replay("shard_index", props::index) >= 10);
}

#[test]
fn planner_corpus_and_regressions() {
    assert!(replay("planner", props::planner) >= 10);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn header_random(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        props::header(&data);
    }

    #[test]
    fn index_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        props::index(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn planner_random(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        props::planner(&data);
    }
}
