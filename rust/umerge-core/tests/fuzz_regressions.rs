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
    let _cleanup = props::ScratchGuard;
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
        let _cleanup = props::ScratchGuard;
        props::header(&data);
    }

    #[test]
    fn index_random(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _cleanup = props::ScratchGuard;
        props::index(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn planner_random(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _cleanup = props::ScratchGuard;
        props::planner(&data);
    }
}

/// Regression: an index naming a FIFO made the reader block for ever in `open` (a hang, found
/// from the `shard_index` name pool). It must now be refused at once.
#[test]
fn index_naming_a_fifo_is_refused_without_blocking() {
    let d = std::env::temp_dir().join(format!("umerge-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ok = props::st_bytes(&[("a".into(), "F32".into(), vec![1], vec![0, 0, 128, 63])]);
    std::fs::write(d.join("s0.safetensors"), ok).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(d.join("pipe.safetensors")).status().unwrap().success());
    std::fs::write(d.join(umerge_core::checkpoint::INDEX_NAME), r#"{"weight_map":{"a":"s0.safetensors","b":"pipe.safetensors"}}"#).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dd = d.clone();
    std::thread::spawn(move || {
        let r = umerge_core::checkpoint::Checkpoint::open(&dd).map(|_| ()).map_err(|e| e.to_string());
        let v = umerge_core::verify::verify(&dd, &Default::default());
        let _ = tx.send((r, v.valid, v.errors));
    });
    let (r, valid, errors) = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("opening the checkpoint hung");
    let e = r.unwrap_err();
    assert!(e.contains("pipe.safetensors") && e.contains("not a regular file"), "{e}");
    assert!(!valid);
    assert!(errors.iter().any(|x| x.contains("not a regular file")), "{errors:?}");
    let _ = std::fs::remove_dir_all(&d);
}
