//! The merge specification: everything a merge needs, as one serde struct.
//!
//! This is the engine's whole input; the Python API and the CLI build it as JSON
//! (`umerge._core.merge(spec_json, progress)`), and the recipe written beside the output
//! (`umerge.yml`) records it so a merge can be repeated.
//!
//! ```json
//! {"method": "ties",
//!  "models": [{"path": "ft1/", "params": {"weight": 0.7}}, {"path": "ft2/"}],
//!  "base": "base/",
//!  "params": {"density": 0.8, "lambda": 1.0, "preset": "mergekit"},
//!  "out": "merged/", "out_dtype": "bf16", "threads": 2,
//!  "memory_budget": 536870912, "max_shard_size": 5000000000,
//!  "strict": false, "overwrite": false, "allow_nonfinite": false}
//! ```
//!
//! Only `method`, `models` and `out` are required. Parameter values follow `params` (scalars,
//! gradients, filter rules).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::params::ParamMap;

/// Default memory budget: 512 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 << 20;
/// Default maximum shard size: 5 GB (decimal, as Hugging Face's "5GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// One input model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A checkpoint directory or a `.safetensors` file.
    pub path: PathBuf,
    /// Parameters for this model (override the global ones).
    #[serde(default, skip_serializing_if = "ParamMap::is_empty")]
    pub params: ParamMap,
}

/// A whole merge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Method name (`ties`, ...).
    pub method: String,
    /// Input models, in order.
    pub models: Vec<ModelSpec>,
    /// The base model the fine-tunes started from (task vectors are model - base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// Global method parameters.
    #[serde(default)]
    pub params: ParamMap,
    /// Output directory.
    pub out: PathBuf,
    /// Output dtype (`bf16`, `f16`, `f32`); default: the base's dtype per tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dtype: Option<String>,
    /// Worker threads; default all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Working-memory budget in bytes; default 512 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    /// Largest shard file in bytes (whole file, header included); default 5 GB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<u64>,
    /// Refuse tensors missing from some models instead of merging over those that have them.
    #[serde(default)]
    pub strict: bool,
    /// Replace an existing non-empty output directory.
    #[serde(default)]
    pub overwrite: bool,
    /// Merge inputs holding NaN or Inf instead of refusing them.
    #[serde(default)]
    pub allow_nonfinite: bool,
}

impl MergeSpec {
    /// Parses a spec from JSON, with the unknown-field message made readable.
    pub fn from_json(s: &str) -> Result<MergeSpec, crate::Error> {
        serde_json::from_str(s).map_err(|e| crate::Error::Spec(format!("invalid merge spec: {e}")))
    }
}
