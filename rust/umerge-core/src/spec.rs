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
//!
//! `slices` stacks layers (mergekit's `slices:`): the output's layers are each slice's layers in
//! order, every source of a slice giving its own run of layers of the same length, so
//! `[{"sources": [{"model": 0, "layer_range": [0, 16]}]}, {"sources": [{"model": 1, "layer_range":
//! [8, 24]}]}]` makes 32 layers, 0-15 from model 0's 0-15 and 16-31 from model 1's 8-23 (see
//! `plan`). Method `passthrough` copies each output tensor from its single source, times the
//! model's `scale` parameter where one is given.

use std::path::PathBuf;

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

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
    /// A LoRA adapter folded into this model as it is read (mergekit's `model+lora`): the model's
    /// targeted weights are `W + scaling * B @ A` in this merge, and nothing else is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::fold::FoldAdapter>,
}

/// The output and resource options every spec shares (a merge's and a fold's): where the result
/// goes and with which dtype, threads and memory. In JSON they sit flat beside the spec's own
/// fields (`{"method": ..., "out": ..., "threads": 2}`); see `deserialize_flat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputOptions {
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
    /// Largest shard file in bytes (whole file, header included); default 5 GB. A merge refuses 0;
    /// a fold takes it as "one tensor per shard" (every file over the limit holds a single tensor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<u64>,
    /// Replace an existing non-empty output directory.
    #[serde(default)]
    pub overwrite: bool,
    /// Merge inputs holding NaN or Inf instead of refusing them.
    #[serde(default)]
    pub allow_nonfinite: bool,
    /// What to do with the page cache pages of the inputs and output once used: `auto`
    /// (default: drop them when the run is larger than half the machine's memory), `keep` or
    /// `drop` (see `exec::readahead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_cache: Option<String>,
}

impl OutputOptions {
    /// The JSON keys of these options (the struct's fields).
    pub const FIELDS: &'static [&'static str] =
        &["out", "out_dtype", "threads", "memory_budget", "max_shard_size", "overwrite", "allow_nonfinite", "page_cache"];
}

/// Deserializes a spec whose [`OutputOptions`] sit flat beside its own fields: the option keys
/// are taken out of the object and read by `OutputOptions`' derive, the rest by `own` (the spec's
/// derive, with its `deny_unknown_fields`). serde's `flatten` would do this but cannot be
/// combined with `deny_unknown_fields`.
pub(crate) fn deserialize_flat<'de, D, T>(d: D, own: impl FnOnce(Value) -> serde_json::Result<T>) -> Result<(T, OutputOptions), D::Error>
where
    D: Deserializer<'de>,
{
    let mut rest = Map::<String, Value>::deserialize(d)?;
    let mut opts = Map::new();
    for &k in OutputOptions::FIELDS {
        if let Some(v) = rest.remove(k) {
            opts.insert(k.to_string(), v);
        }
    }
    let own = own(Value::Object(rest)).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown field") {
            let fields: Vec<String> = OutputOptions::FIELDS.iter().map(|f| format!("`{f}`")).collect();
            D::Error::custom(format!("{msg}, or an output option: {}", fields.join(", ")))
        } else {
            D::Error::custom(msg)
        }
    })?;
    let output = OutputOptions::deserialize(Value::Object(opts)).map_err(D::Error::custom)?;
    Ok((own, output))
}

/// Serializes a spec flat: its own fields (`own`, the spec's derive) and its [`OutputOptions`]
/// in one object, the layout [`deserialize_flat`] reads.
pub(crate) fn serialize_flat<S: Serializer>(s: S, own: serde_json::Result<Value>, output: &OutputOptions) -> Result<S::Ok, S::Error> {
    let mut map = match own.map_err(S::Error::custom)? {
        Value::Object(m) => m,
        _ => return Err(S::Error::custom("a spec serializes to an object")),
    };
    if let Value::Object(o) = serde_json::to_value(output).map_err(S::Error::custom)? {
        map.extend(o);
    }
    map.serialize(s)
}

/// A whole merge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct MergeSpec {
    /// Method name (`ties`, ...).
    pub method: String,
    /// Input models, in order.
    pub models: Vec<ModelSpec>,
    /// The base model the fine-tunes started from (task vectors are model - base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// A LoRA adapter folded into the base as it is read (see [`ModelSpec::lora`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_lora: Option<crate::fold::FoldAdapter>,
    /// Global method parameters.
    #[serde(default)]
    pub params: ParamMap,
    /// Refuse tensors missing from some models instead of merging over those that have them.
    #[serde(default)]
    pub strict: bool,
    /// Layer stacking: the output's layers, slice by slice (empty: every model's layers as they are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<SliceSpec>,
    /// Output directory, dtype and resources (flat in JSON).
    #[serde(skip)]
    pub output: OutputOptions,
}

/// One slice of the output's layers (mergekit's output slice): the same number of consecutive
/// layers from each source, merged layer by layer. The tensors outside the layers (embeddings,
/// final norm, lm_head) come from the first slice's sources when they sit before the layers and
/// from the last slice's when they sit after them, as in mergekit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSpec {
    /// The models this slice takes layers from, each at most once.
    pub sources: Vec<SliceSource>,
    /// The base's layers for this slice, when the method uses the base (it must then be one of
    /// the slice's inputs, as in mergekit); `[start, end)` of the same length as the sources'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_layer_range: Option<[usize; 2]>,
}

/// One source of a slice: a run of layers of one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSource {
    /// Index of the model in the spec's `models`.
    pub model: usize,
    /// `[start, end)`: the model's layers start to end - 1, in order.
    pub layer_range: [usize; 2],
}

impl<'de> Deserialize<'de> for MergeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MergeSpec, D::Error> {
        let (spec, output) = deserialize_flat(d, MergeSpec::deserialize)?;
        Ok(MergeSpec { output, ..spec })
    }
}

impl Serialize for MergeSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_flat(s, MergeSpec::serialize(self, serde_json::value::Serializer), &self.output)
    }
}

impl MergeSpec {
    /// Parses a spec from JSON, with the unknown-field message made readable.
    pub fn from_json(s: &str) -> Result<MergeSpec, crate::Error> {
        serde_json::from_str(s).map_err(|e| crate::Error::Spec(format!("invalid merge spec: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"method": "ties", "models": [{"path": "a", "params": {"weight": 0.5}}, {"path": "b"}],
        "base": "base", "params": {"density": 0.8}, "out": "o", "out_dtype": "bf16", "threads": 2,
        "memory_budget": 1048576, "max_shard_size": 1000, "strict": true, "overwrite": true, "allow_nonfinite": true}"#;

    #[test]
    fn reads_and_writes_the_flat_layout() {
        let spec = MergeSpec::from_json(FULL).unwrap();
        assert_eq!((spec.method.as_str(), spec.models.len(), spec.strict), ("ties", 2, true));
        let o = &spec.output;
        assert_eq!(o.out, PathBuf::from("o"));
        assert_eq!(o.out_dtype.as_deref(), Some("bf16"));
        assert_eq!((o.threads, o.memory_budget, o.max_shard_size), (Some(2), Some(1 << 20), Some(1000)));
        assert!(o.overwrite && o.allow_nonfinite);
        let back = serde_json::to_value(&spec).unwrap();
        let want: Value = serde_json::from_str(FULL).unwrap();
        assert_eq!(back, want);
        let minimal = MergeSpec::from_json(r#"{"method": "linear", "models": [{"path": "a"}], "out": "o"}"#).unwrap();
        assert!(minimal.output.out_dtype.is_none() && !minimal.output.overwrite && !minimal.strict);
    }

    #[test]
    fn slices_read_and_write_and_refuse_unknown_fields() {
        let text = r#"{"method": "ties", "models": [{"path": "a"}], "base": "b", "out": "o", "strict": false,
            "slices": [{"sources": [{"model": 0, "layer_range": [0, 2]}], "base_layer_range": [1, 3]},
                       {"sources": [{"model": 0, "layer_range": [4, 5]}]}]}"#;
        let spec = MergeSpec::from_json(text).unwrap();
        assert_eq!(spec.slices.len(), 2);
        assert_eq!((spec.slices[0].sources[0].model, spec.slices[0].sources[0].layer_range), (0, [0, 2]));
        assert_eq!((spec.slices[0].base_layer_range, spec.slices[1].base_layer_range), (Some([1, 3]), None));
        let mut want: Value = serde_json::from_str(text).unwrap();
        want["params"] = serde_json::json!({});
        want["overwrite"] = false.into();
        want["allow_nonfinite"] = false.into();
        assert_eq!(serde_json::to_value(&spec).unwrap(), want);
        let e =
            MergeSpec::from_json(r#"{"method": "passthrough", "models": [], "out": "o", "slices": [{"sources": [], "range": [0, 1]}]}"#)
                .unwrap_err();
        assert!(e.to_string().contains("unknown field `range`"), "{e}");
    }

    #[test]
    fn unknown_and_missing_fields_are_refused() {
        let e = MergeSpec::from_json(r#"{"method": "linear", "models": [], "out": "o", "ovrewrite": true}"#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unknown field `ovrewrite`") && msg.contains("`overwrite`") && msg.contains("`strict`"), "{msg}");
        let e = MergeSpec::from_json(r#"{"method": "linear", "models": []}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `out`"), "{e}");
        let e = MergeSpec::from_json(r#"{"method": "linear", "models": [], "out": "o", "threads": "two"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = MergeSpec::from_json(r#"{"models": [], "out": "o"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `method`"), "{e}");
    }
}
