//! The recipe written beside the weights (`umerge.yml`) by merges, folds and quantizations: JSON-compatible
//! YAML, one `key: value` a line, flow values written as JSON.

use std::fmt::Display;
use std::path::Path;

use crate::extract::ExtractSpec;
use crate::fold::FoldSpec;
use crate::quantize::QuantizeSpec;
use crate::spec::MergeSpec;

/// Builds a recipe line by line.
struct RecipeWriter(String);

impl RecipeWriter {
    /// The header of the recipe of `operation` ("merge", "fold") and the engine's version.
    fn new(operation: &str) -> Self {
        let mut w = RecipeWriter(format!("# umerge recipe: the {operation} that produced these weights\n"));
        w.field("umerge_version", text(crate::VERSION));
        w
    }

    /// A top-level `key: value` line.
    fn field(&mut self, key: &str, value: impl Display) {
        self.0.push_str(&format!("{key}: {value}\n"));
    }

    /// A top-level key whose value is the list that follows.
    fn list(&mut self, key: &str) {
        self.0.push_str(&format!("{key}:\n"));
    }

    /// The first line of a list entry.
    fn item(&mut self, key: &str, value: impl Display) {
        self.0.push_str(&format!("  - {key}: {value}\n"));
    }

    /// A further line of the current list entry.
    fn item_field(&mut self, key: &str, value: impl Display) {
        self.0.push_str(&format!("    {key}: {value}\n"));
    }
}

/// A string as a quoted YAML (JSON) scalar.
fn text(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// An optional string, `null` when absent.
fn text_or_null(s: Option<&str>) -> String {
    s.map(text).unwrap_or_else(|| "null".into())
}

/// A path made absolute (as given when it cannot be resolved), quoted.
fn path(p: &Path) -> String {
    text(&p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).display().to_string())
}

/// Any value as flow JSON.
fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The recipe of a merge whose method describes itself as `description`.
pub fn recipe_yaml(spec: &MergeSpec, description: &str) -> String {
    let mut y = RecipeWriter::new("merge");
    y.field("method", text(&spec.method));
    y.field("description", text(description));
    y.field("base", spec.base.as_deref().map(path).unwrap_or_else(|| "null".into()));
    y.list("models");
    for m in &spec.models {
        y.item("path", path(&m.path));
        if !m.params.is_empty() {
            y.item_field("params", json(&m.params));
        }
    }
    y.field("params", json(&spec.params));
    if !spec.slices.is_empty() {
        y.field("slices", json(&spec.slices));
    }
    y.field("out_dtype", text_or_null(spec.output.out_dtype.as_deref()));
    y.field("strict", spec.strict);
    y.field("allow_nonfinite", spec.output.allow_nonfinite);
    y.0
}

/// The recipe of a fold.
pub(crate) fn fold_recipe_yaml(spec: &FoldSpec) -> String {
    let mut y = RecipeWriter::new("fold");
    y.field("operation", "fold");
    y.field("method", text_or_null(spec.method.as_deref()));
    y.field("base", path(&spec.base));
    y.list("adapters");
    for a in &spec.adapters {
        y.item("path", path(&a.path));
        y.item_field("scaling", a.scaling);
        y.item_field("fan_in_fan_out", a.fan_in_fan_out);
    }
    y.field("params", json(&spec.params));
    y.field("model_params", json(&spec.model_params));
    y.field("out_dtype", text_or_null(spec.output.out_dtype.as_deref()));
    y.0
}

/// The recipe of a quantization (`crate::quantize`): the model, the grid and the tensors quantized.
pub(crate) fn quantize_recipe_yaml(spec: &QuantizeSpec) -> String {
    let mut y = RecipeWriter::new("quantization");
    y.field("operation", "quantize");
    y.field("model", path(&spec.model));
    y.field("bits", spec.bits);
    y.field("group_size", json(&spec.group_size));
    y.field("rounding", text("round to nearest, ties to even; scale = max|w| / (2^(bits-1) - 1) per group"));
    y.field("tensors", json(&spec.tensors));
    y.field("out_dtype", text_or_null(spec.output.out_dtype.as_deref()));
    y.0
}

/// The recipe of a LoRA extraction.
pub(crate) fn extract_recipe_yaml(spec: &ExtractSpec) -> String {
    let mut y = RecipeWriter::new("LoRA extraction");
    y.field("operation", "extract_lora");
    y.field("finetuned", path(&spec.finetuned));
    y.field("base", path(&spec.base));
    y.field("rank", spec.rank);
    y.field("distribute_scale", spec.distribute_scale);
    y.field("sv_epsilon", json(&spec.sv_epsilon));
    y.field("oversample", spec.oversample);
    y.field("power_iters", spec.power_iters);
    y.field("seed", spec.seed);
    y.field("modules", json(&spec.modules));
    y.field("out_dtype", text_or_null(spec.output.out_dtype.as_deref()));
    y.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;

    #[test]
    fn merge_recipe_text() {
        let spec: MergeSpec = serde_json::from_value(serde_json::json!({
            "method": "linear", "models": [{"path": "no/such/a", "params": {"weight": 2.0}}, {"path": "no/such/b"}],
            "out": "no/such/out", "params": {"normalize": true}
        }))
        .unwrap();
        let method = crate::methods::build("linear", &Params::default()).unwrap();
        let want = format!(
            "# umerge recipe: the merge that produced these weights\numerge_version: \"{}\"\nmethod: \"linear\"\ndescription: {}\nbase: null\nmodels:\n  - path: \"no/such/a\"\n    params: {{\"weight\":2.0}}\n  - path: \"no/such/b\"\nparams: {{\"normalize\":true}}\nout_dtype: null\nstrict: false\nallow_nonfinite: false\n",
            crate::VERSION,
            serde_json::to_string(&method.describe()).unwrap()
        );
        assert_eq!(recipe_yaml(&spec, &method.describe()), want);
    }

    #[test]
    fn fold_recipe_text() {
        let spec = FoldSpec::from_json(
            r#"{"base": "no/such/base", "adapters": [{"path": "no/such/ad", "scaling": 0.5}], "out": "no/such/out", "out_dtype": "bf16"}"#,
        )
        .unwrap();
        let want = format!(
            "# umerge recipe: the fold that produced these weights\numerge_version: \"{}\"\noperation: fold\nmethod: null\nbase: \"no/such/base\"\nadapters:\n  - path: \"no/such/ad\"\n    scaling: 0.5\n    fan_in_fan_out: false\nparams: {{}}\nmodel_params: []\nout_dtype: \"bf16\"\n",
            crate::VERSION
        );
        assert_eq!(fold_recipe_yaml(&spec), want);
    }
}
