//! Linear merging: the weighted average of the models (Wortsman et al., 2022, "Model soups",
//! arXiv:2203.05482), as mergekit's `linear`.
//!
//! out = sum_i w_i x_i, divided by sum_i w_i when `normalize` (the default). Weights default to
//! 1.0 and may differ per tensor (filters, gradients). With `normalize`, weights summing to 0
//! for some tensor are an error (the average is undefined), reported before any output is
//! written. The base plays no role (mergekit adds `base_model` as one more input: `umerge run`
//! does the same). f32 arithmetic in mergekit's order: accumulate w_i * x_i in model order with fused
//! multiply-adds, then divide once.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::{ParamValue, Params};

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "weight", per_model: true, default: "1.0", doc: "weight of each model" },
    ParamSpec { name: "normalize", per_model: false, default: "true", doc: "divide by the sum of weights (an error when they sum to 0)" },
];

/// Weighted average.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    /// Divide by the weight sum.
    pub normalize: bool,
}

impl Linear {
    /// Reads `normalize` from the merge's parameters.
    pub fn from_params(params: &Params) -> Result<Linear> {
        let normalize =
            params.flag("normalize", true).map_err(|r| Error::Param { name: "normalize".into(), reason: r, place: String::new() })?;
        if normalize {
            // Plain numbers everywhere: check the sum once, for one clear message (per-tensor
            // values from rules or gradients are checked per tensor in `plan_tensor`).
            let ws: Option<Vec<f32>> = (0..params.models.len())
                .map(|i| match params.raw(Some(i), "weight") {
                    None => Some(1.0),
                    Some(ParamValue::Number(x)) => Some(*x as f32),
                    Some(_) => None,
                })
                .collect();
            if let Some(ws) = ws {
                if !ws.is_empty() && ws.iter().fold(0.0f32, |a, &b| a + b) == 0.0 {
                    return Err(Error::Param {
                        name: "weight".into(),
                        reason: format!(
                            "the weights {ws:?} sum to 0, so their average is undefined (set normalize: false, or change a weight)"
                        ),
                        place: String::new(),
                    });
                }
            }
        }
        Ok(Linear { normalize })
    }
}

impl Method for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Unused
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    /// Scalars: `[sum of weights, w_0, ..., w_m]`.
    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let mut w = Vec::with_capacity(t.models.len());
        for slot in 0..t.models.len() {
            w.push(t.model_number(slot, "weight", Some(1.0))? as f32);
        }
        let sum = w.iter().fold(0.0f32, |a, &b| a + b);
        if self.normalize && sum == 0.0 {
            return Err(Error::Param {
                name: "weight".into(),
                reason: "the weights sum to 0, so their average is undefined (set normalize: false, or change a weight)".into(),
                place: format!(" (tensor {})", t.name),
            });
        }
        let mut scalars = vec![sum];
        scalars.extend(w);
        Ok(TensorRecipe { trim: vec![None; t.models.len()], scalars, reductions: 0, row: 0, score: None })
    }

    fn apply(&self, r: &TensorRecipe, _s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        weighted_sum(c.inputs, &r.scalars[1..], self.normalize.then_some(r.scalars[0]), out)
    }

    fn describe(&self) -> String {
        format!("linear (normalize {})", self.normalize)
    }
}

crate::simd::kernel! {
    /// out = sum_i w_i x_i (then / `divisor`), accumulated with fused multiply-adds in input order.
    ///
    /// Fused, as mergekit's `result.addcmul_(tensor, weight)` is on x86-64 (torch's vectorised
    /// kernel compiles to FMA): measured, a separate multiply and add differed from mergekit by 1
    /// ulp in ~18% of elements; with `mul_add` they are identical. `mul_add` is exactly rounded
    /// on every target, so the FMA builds and the baseline one (a libm call per element, 60% of
    /// the CPU time of `umerge linear` on the 1.1B benchmark) give the same bits.
    fn weighted_sum(inputs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
        out.fill(0.0);
        for (x, &w) in inputs.iter().zip(weights) {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o = v.mul_add(w, *o);
            }
        }
        if let Some(d) = divisor {
            for o in out.iter_mut() {
                *o /= d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::exec::merge_in_memory;
    use crate::params::{ParamValue, Params};

    fn p(weights: &[f64], normalize: bool) -> Params {
        let mut p = Params::default();
        p.global.insert("normalize".into(), ParamValue::Bool(normalize));
        p.models = weights.iter().map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect()).collect();
        p
    }

    #[test]
    fn weighted_average_by_hand() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 6.0];
        let out = merge_in_memory("linear", &p(&[1.0, 3.0], true), None, &[&a, &b], "t", 1, 0).unwrap();
        assert_eq!(out, vec![2.5, 5.0]);
        let out = merge_in_memory("linear", &p(&[1.0, 3.0], false), None, &[&a, &b], "t", 1, 0).unwrap();
        assert_eq!(out, vec![10.0, 20.0]);
    }

    #[test]
    fn zero_weight_sum_is_an_error() {
        let a = [1.0f32];
        let e = merge_in_memory("linear", &p(&[1.0, -1.0], true), None, &[&a, &a], "t", 1, 0).unwrap_err();
        assert!(e.to_string().contains("sum to 0"), "{e}");
        assert!(merge_in_memory("linear", &p(&[1.0, -1.0], false), None, &[&a, &a], "t", 1, 0).is_ok());
    }
}
