#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod checkpoint;
pub mod checksum;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod extract;
pub mod fold;
pub mod linalg;
pub mod methods;
pub mod params;
pub mod plan;
pub mod quantize;
pub mod report;
pub mod select;
pub mod simd;
pub mod spec;
pub mod verify;
pub mod write;

pub use error::{Error, Result};
pub use report::Report;
pub use spec::{MergeSpec, OutputOptions};

/// The engine's version, written into every recipe.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Progress callback: `(tensors_done, tensors_total, bytes_done, bytes_total)`.
/// Returning `false` cancels the merge (the output is not created).
pub type Progress<'a> = &'a (dyn Fn(u64, u64, u64, u64) -> bool + Sync);

/// Runs a whole merge described by `spec`: read, plan, execute, write. Returns the report.
///
/// Nothing is written under the target name unless the merge completes.
pub fn merge(spec: &MergeSpec, progress: Option<Progress<'_>>) -> Result<Report> {
    exec::run_merge(spec, progress)
}
