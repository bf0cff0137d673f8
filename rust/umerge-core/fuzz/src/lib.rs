//! Shared code of the umerge fuzz targets: the properties live in `props.rs` so that the engine's
//! ordinary test suite can replay the corpus and every crash without libFuzzer.

pub mod props;
