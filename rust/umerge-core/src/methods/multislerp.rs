//! Multi-SLERP: a weighted spherical barycentre of several models, or of their task vectors when
//! a base is given; mergekit's `multislerp` (`mergekit/merge_methods/multislerp.py`, mergekit
//! 0.1.5; C. Goddard, "Multi-SLERP", goddard.blog/posts/multislerp-wow-what-a-cool-idea).
//!
//! Per tensor, with vectors v_i = x_i - base (or x_i without a base), weights w_i (divided by
//! their sum when `normalize_weights`, the default) and eps (default 1e-8):
//!
//! 1. n_i = |v_i|, u_i = v_i / (n_i + eps) (a zero vector gives u_i = 0);
//! 2. the weighted mean M = sum_i w_i u_i; when |M| < eps two models fall back to the weighted
//!    sum w_0 v_0 + w_1 v_1, and three or more are an error (the mean direction is undefined:
//!    antipodal inputs whose weights cancel), as in mergekit;
//! 3. mergekit then projects the u_i onto the tangent space at M / |M| and maps their weighted
//!    sum T back with the exponential map. That weighted sum is identically zero:
//!    sum_i w_i (u_i - <u_i, M/|M|> M/|M|) = M - <M, M/|M|> M/|M| = 0. So the result is the
//!    exponential map of nothing, the mean direction itself (mergekit's float32 gives a T of
//!    rounding size only, and cos |T| and sin |T| / |T| round to 1 in float32);
//! 4. out = base + (sum_i w_i n_i) M / |M|.
//!
//! umerge computes that closed form: out = base + sum_i c_i v_i with c_i = (sum_j w_j n_j) w_i /
//! ((n_i + eps) |M|). Every norm is a quadratic form in the vectors' Gram matrix, one
//! per-tensor reduction pass of f64 sums (`gram`); the coefficients are computed once per tensor
//! ([`Method::derive`]) and the output in float32. A single model is returned as it is (mergekit:
//! `return tensors[0]`, without the base).

use crate::error::{Error, Result};
use crate::methods::{gram, BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "weight", per_model: true, default: "1.0", doc: "weight of each model's point on the sphere" },
    ParamSpec {
        name: "normalize_weights",
        per_model: false,
        default: "true",
        doc: "divide the weights by their sum (an error when they sum to 0)",
    },
    ParamSpec {
        name: "eps",
        per_model: false,
        default: "1e-8",
        doc: "added to each norm before dividing, and the smallest norm of the weighted mean (> 0)",
    },
];

/// mergekit's default eps.
pub const DEFAULT_EPS: f64 = 1e-8;

/// Multi-SLERP.
#[derive(Debug, Clone, Copy)]
pub struct MultiSlerp {
    /// Divide the weights by their sum.
    pub normalize_weights: bool,
}

impl MultiSlerp {
    /// Reads `normalize_weights`.
    pub fn from_params(params: &Params) -> Result<MultiSlerp> {
        let normalize_weights = params.flag("normalize_weights", true).map_err(|r| Error::Param {
            name: "normalize_weights".into(),
            reason: r,
            place: String::new(),
        })?;
        Ok(MultiSlerp { normalize_weights })
    }
}

/// The weights as mergekit holds them: float32, divided by their float32 sum when normalised.
pub fn weights(raw: &[f64], normalize: bool) -> Vec<f32> {
    let w: Vec<f32> = raw.iter().map(|&w| w as f32).collect();
    if !normalize {
        return w;
    }
    let sum = w.iter().fold(0f32, |a, &b| a + b);
    w.iter().map(|&x| x / sum).collect()
}

/// What the apply pass does with the derived coefficients c_i: out = base + sum_i c_i v_i.
/// `Err(reason)` when the mean direction is undefined (three or more models, |M| < eps).
pub fn coefficients(w: &[f32], eps: f64, sums: &[f64]) -> std::result::Result<Vec<f64>, String> {
    let m = w.len();
    let g = gram::matrix(m, sums);
    let n: Vec<f64> = (0..m).map(|i| g[i][i].max(0.0).sqrt()).collect();
    // M = sum_i a_i v_i with a_i = w_i / (n_i + eps).
    let a: Vec<f64> = (0..m).map(|i| w[i] as f64 / (n[i] + eps)).collect();
    let mean_norm = gram::norm(&g, &a);
    if mean_norm < eps {
        if m == 2 {
            return Ok(w.iter().map(|&x| x as f64).collect());
        }
        return Err(format!(
            "the weighted mean of the {m} unit vectors is zero (|M| = {mean_norm:e} < eps {eps:e}): antipodal inputs whose weights cancel; change a weight"
        ));
    }
    let avg_norm: f64 = (0..m).map(|i| w[i] as f64 * n[i]).sum();
    Ok(a.iter().map(|&ai| avg_norm * ai / mean_norm).collect())
}

impl Method for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Optional
    }

    /// Raw values: the task vectors are formed here, so that a single model passes through as it is.
    fn uses_deltas(&self) -> bool {
        false
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    /// Scalars: [eps, w_0..w_m] (the weights normalised as mergekit does).
    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let eps = t.global_number("eps", Some(DEFAULT_EPS))?;
        if eps <= 0.0 {
            return Err(Error::Param {
                name: "eps".into(),
                reason: format!("{eps} is not positive (it is added to norms before dividing by them)"),
                place: format!(" (tensor {})", t.name),
            });
        }
        let raw = (0..m).map(|slot| t.model_number(slot, "weight", Some(1.0))).collect::<Result<Vec<f64>>>()?;
        let w = weights(&raw, self.normalize_weights);
        if self.normalize_weights && m > 1 && w.iter().any(|x| !x.is_finite()) {
            return Err(Error::Param {
                name: "weight".into(),
                reason: format!("the weights {raw:?} sum to 0, so normalize_weights cannot divide by their sum (change a weight, or set normalize_weights: false)"),
                place: format!(" (tensor {})", t.name),
            });
        }
        let mut scalars = vec![eps as f32];
        scalars.extend(w);
        let reductions = if m > 1 { gram::len(m) } else { 0 };
        Ok(TensorRecipe { trim: vec![None; m], scalars, reductions, row: 0, score: None })
    }

    fn reduce(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        gram::accumulate(c.base, c.inputs, acc);
    }

    fn derive(&self, r: &TensorRecipe, tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        // eps as float32, as mergekit adds it to float32 norms and compares it with one.
        let eps = r.scalars[0] as f64;
        coefficients(&r.scalars[1..], eps, &sums).map_err(|reason| Error::Undefined {
            method: "multislerp".into(),
            tensor: tensor.into(),
            reason,
        })
    }

    fn apply(&self, _r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        gram::apply_coefficients(s.tensor, c.base, c.inputs, out);
    }

    fn describe(&self) -> String {
        format!("multislerp (normalize_weights {})", self.normalize_weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    fn p(ws: &[f64]) -> Params {
        let models = ws.iter().map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect()).collect();
        Params { models, ..Default::default() }
    }

    #[test]
    fn barycentre_by_hand() {
        // e1 and 3 e2, equal weights: the mean direction is (e1 + e2)/sqrt 2, the mean norm 2.
        let out = merge_in_memory("multislerp", &p(&[1.0, 1.0]), None, &[&[1.0, 0.0], &[0.0, 3.0]], "t", 1, 0).unwrap();
        let h = std::f64::consts::SQRT_2 as f32;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6, "{out:?}");
        // Three orthogonal unit vectors: their mean direction, norm 1.
        let e = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let out = merge_in_memory("multislerp", &p(&[1.0, 1.0, 1.0]), None, &[&e[0], &e[1], &e[2]], "t", 1, 0).unwrap();
        let third = (1.0 / 3f64.sqrt()) as f32;
        assert!(out.iter().all(|&x| (x - third).abs() < 1e-6), "{out:?}");
        // One model: itself, even with a base.
        let out = merge_in_memory("multislerp", &p(&[2.0]), Some(&[9.0, 9.0]), &[&[1.0, -1.0]], "t", 1, 0).unwrap();
        assert_eq!(out, vec![1.0, -1.0]);
    }

    #[test]
    fn antipodal_pair_falls_back_to_the_weighted_sum_and_three_are_an_error() {
        // a and -a, equal weights: |M| = 0. Two models: 0.5 a + 0.5 (-a) = 0.
        let a = [1.0f32, 2.0];
        let na = [-1.0f32, -2.0];
        let out = merge_in_memory("multislerp", &p(&[1.0, 1.0]), None, &[&a, &na], "t", 1, 0).unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
        // Three: a, -a and a zero vector (u = 0): an error naming the tensor.
        let z = [0.0f32, 0.0];
        let err = merge_in_memory("multislerp", &p(&[1.0, 1.0, 1.0]), None, &[&a, &na, &z], "w.3", 1, 0).unwrap_err().to_string();
        assert!(err.contains("tensor w.3") && err.contains("weighted mean"), "{err}");
        // Weights summing to 0 with normalize_weights: a parameter error.
        let err = merge_in_memory("multislerp", &p(&[1.0, -1.0]), None, &[&a, &z], "t", 1, 0).unwrap_err().to_string();
        assert!(err.contains("sum to 0"), "{err}");
    }
}
