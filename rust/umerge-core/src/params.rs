//! Method parameters and how they resolve for one tensor of one model.
//!
//! A parameter value is, as in mergekit YAML:
//! - a scalar (`0.5`), a string (`"mergekit"`) or a boolean;
//! - a gradient (`[0.0, 0.5, 1.0]`): values spaced evenly over the layer stack and interpolated
//!   linearly at the tensor's position `t` in [0, 1] (layer i of L sits at i / (L - 1); tensors
//!   outside the layers sit at 0 before them (embeddings) or 1 after them (final norm, lm_head));
//! - a rule list (`[{"filter": "mlp", "value": 0.5}, {"value": 1.0}]`): the first rule whose
//!   `filter` is a substring of the tensor name gives the value; a rule without a filter matches
//!   every tensor, so it serves as the default when placed last. A rule's value may be a gradient.
//!
//! Lookup order for a model's parameter: the model's own `params`, then the global `params`,
//! then the method's default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One parameter value as written in a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// A number.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// A word (a preset name, a method option).
    Text(String),
    /// A gradient over the layer stack.
    Gradient(Vec<f64>),
    /// Filter rules, first match wins.
    Rules(Vec<Rule>),
}

/// One filter rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Substring of the tensor name this rule applies to; none matches every tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// The value: a number or a gradient.
    pub value: RuleValue,
}

/// The value of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RuleValue {
    /// A number.
    Number(f64),
    /// A gradient.
    Gradient(Vec<f64>),
}

/// Where a tensor sits, for resolving rules and gradients.
#[derive(Debug, Clone, Copy)]
pub struct TensorPos<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Position in the layer stack, 0..=1.
    pub t: f64,
}

fn interpolate(values: &[f64], t: f64) -> Option<f64> {
    match values.len() {
        0 => None,
        1 => Some(values[0]),
        n => {
            let scaled = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i0 = scaled.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            let frac = scaled - i0 as f64;
            Some(values[i0] * (1.0 - frac) + values[i1] * frac)
        }
    }
}

impl ParamValue {
    /// The number this value gives at `pos`; `None` for text/bool, an empty gradient, or rules
    /// that match nothing.
    pub fn number_at(&self, pos: &TensorPos<'_>) -> Option<f64> {
        match self {
            ParamValue::Number(x) => Some(*x),
            ParamValue::Gradient(v) => interpolate(v, pos.t),
            ParamValue::Rules(rules) => {
                let rule = rules.iter().find(|r| r.filter.as_deref().is_none_or(|f| pos.name.contains(f)))?;
                match &rule.value {
                    RuleValue::Number(x) => Some(*x),
                    RuleValue::Gradient(v) => interpolate(v, pos.t),
                }
            }
            ParamValue::Bool(_) | ParamValue::Text(_) => None,
        }
    }

    /// The text of a `Text` value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            ParamValue::Text(s) => Some(s),
            _ => None,
        }
    }

    /// True when the value is the same for every tensor (a plain scalar, text or flag).
    pub fn is_uniform(&self) -> bool {
        matches!(self, ParamValue::Number(_) | ParamValue::Text(_) | ParamValue::Bool(_))
    }
}

/// A parameter map: name -> value.
pub type ParamMap = BTreeMap<String, ParamValue>;

/// Global and per-model parameters of a merge.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Global parameters.
    pub global: ParamMap,
    /// Per-model parameters, one map per input model (in model order).
    pub models: Vec<ParamMap>,
}

impl Params {
    /// The raw value of `key` for model `model` (its own, else global).
    pub fn raw(&self, model: Option<usize>, key: &str) -> Option<&ParamValue> {
        model.and_then(|m| self.models.get(m)?.get(key)).or_else(|| self.global.get(key))
    }

    /// A global text parameter, or `default`.
    pub fn text(&self, key: &str, default: &str) -> Result<String, String> {
        match self.global.get(key) {
            None => Ok(default.to_string()),
            Some(ParamValue::Text(s)) => Ok(s.clone()),
            Some(other) => Err(format!("expected a word, got {}", serde_json::to_string(other).unwrap_or_default())),
        }
    }

    /// A global flag, or `default`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.global.get(key) {
            None => Ok(default),
            Some(ParamValue::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("expected true or false, got {}", serde_json::to_string(other).unwrap_or_default())),
        }
    }
}

/// The layer number of a tensor name: its position among the dot-separated parts and its value
/// (`model.layers.12.mlp...` -> (2, 12)).
fn layer_part(name: &str) -> Option<(usize, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    for (k, w) in parts.windows(2).enumerate() {
        if matches!(w[0], "layers" | "h" | "blocks" | "layer" | "block") {
            if let Ok(i) = w[1].parse::<usize>() {
                return Some((k + 1, i));
            }
        }
    }
    None
}

/// Layer index of a tensor name (`model.layers.12.mlp...` -> 12), for gradients.
pub fn layer_index(name: &str) -> Option<usize> {
    layer_part(name).map(|(_, i)| i)
}

/// The same tensor name in layer `layer` (`model.layers.12.mlp.w`, 3 -> `model.layers.3.mlp.w`);
/// `None` for a name outside the layers. The part replaced is the one [`layer_index`] reads.
pub fn with_layer(name: &str, layer: usize) -> Option<String> {
    let (k, _) = layer_part(name)?;
    let mut parts: Vec<String> = name.split('.').map(str::to_string).collect();
    parts[k] = layer.to_string();
    Some(parts.join("."))
}

/// True for a tensor outside the layers that sits after them (final norm, lm_head), false for
/// one before them (embeddings) and for layer tensors.
pub fn after_layers(name: &str) -> bool {
    let after = ["lm_head", "embed_out", "ln_f", "final_layer_norm", "model.norm", "norm.weight", "norm.bias"];
    layer_index(name).is_none() && after.iter().any(|p| name.contains(p))
}

/// Position `t` of a tensor in the layer stack, given the number of layers.
pub fn layer_position(name: &str, num_layers: usize) -> f64 {
    match layer_index(name) {
        Some(i) if num_layers > 1 => i as f64 / (num_layers - 1) as f64,
        Some(_) => 0.0,
        None if after_layers(name) => 1.0,
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(name: &str, t: f64) -> TensorPos<'_> {
        TensorPos { name, t }
    }

    #[test]
    fn rules_first_match_wins_and_default_last() {
        let v: ParamValue =
            serde_json::from_str(r#"[{"filter":"lora_A","value":0.25},{"filter":"mlp","value":0.5},{"value":1.0}]"#).unwrap();
        assert_eq!(v.number_at(&pos("x.mlp.lora_A.weight", 0.0)), Some(0.25));
        assert_eq!(v.number_at(&pos("x.mlp.up.weight", 0.0)), Some(0.5));
        assert_eq!(v.number_at(&pos("x.attn.q.weight", 0.0)), Some(1.0));
        let no_default: ParamValue = serde_json::from_str(r#"[{"filter":"mlp","value":0.5}]"#).unwrap();
        assert_eq!(no_default.number_at(&pos("attn", 0.0)), None);
    }

    #[test]
    fn gradient_interpolates() {
        let v: ParamValue = serde_json::from_str("[0.0, 1.0, 0.0]").unwrap();
        assert_eq!(v.number_at(&pos("a", 0.0)), Some(0.0));
        assert_eq!(v.number_at(&pos("a", 0.25)), Some(0.5));
        assert_eq!(v.number_at(&pos("a", 0.5)), Some(1.0));
        assert_eq!(v.number_at(&pos("a", 1.0)), Some(0.0));
    }

    #[test]
    fn layer_positions() {
        assert_eq!(layer_index("model.layers.3.mlp.up_proj.weight"), Some(3));
        assert_eq!(layer_position("model.layers.3.mlp.up_proj.weight", 4), 1.0);
        assert_eq!(layer_position("model.embed_tokens.weight", 4), 0.0);
        assert_eq!(layer_position("lm_head.weight", 4), 1.0);
    }

    #[test]
    fn layers_renumber_and_outside_tensors_sit_before_or_after() {
        assert_eq!(with_layer("model.layers.12.mlp.up_proj.weight", 3).as_deref(), Some("model.layers.3.mlp.up_proj.weight"));
        assert_eq!(with_layer("transformer.h.0.attn.c_attn.weight", 10).as_deref(), Some("transformer.h.10.attn.c_attn.weight"));
        assert_eq!(with_layer("model.embed_tokens.weight", 1), None);
        assert!(after_layers("model.norm.weight") && after_layers("lm_head.weight") && after_layers("transformer.ln_f.bias"));
        assert!(!after_layers("model.embed_tokens.weight") && !after_layers("model.layers.1.input_layernorm.weight"));
    }
}
