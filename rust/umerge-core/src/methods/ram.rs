//! RAM, Reinforced Agent Merging (Yuan et al., 2026, "Behavior Knowledge Merge in Reinforced
//! Agentic Models", arXiv:2601.13572), as mergekit 0.1.5's `ram` and `ramplus_tl`
//! (`merge_methods/ram.py`): RL fine-tunes change sparse, mostly disjoint sets of weights, so
//! averaging every task vector would dilute the updates only one model made.
//!
//! For task vectors d_i = x_i - base and a threshold epsilon, per element j: an entry contributes
//! when |d_ij| > epsilon, c_j is the number of models whose entry contributes, and
//!
//! - an element changed by one model only (c_j = 1, "unique") takes that model's update whole;
//! - one changed by several (c_j > 1, "shared") takes the mean of their updates, sum / c_j;
//! - one changed by none keeps the base (entries at most epsilon are dropped).
//!
//! `out_j = base_j + sum_i [|d_ij| > eps] d_ij ([c_j = 1] lambda_i + [c_j > 1] / c_j)`.
//!
//! `ram` has lambda_i = 1. `ramplus_tl` (RAM+, tensor-local) rescales each model's unique updates
//! to make up for what averaging took from its shared ones: with S_i and U_i the numbers of
//! model i's contributing entries in shared and in unique elements of the tensor,
//! rho_i = S_i / max(U_i, epsilon) and lambda_i = 1 + r clamp(rho_i, 0, alpha). Those counts are
//! one reduction pass (integers, exact); the rest is element-wise float32 in mergekit's order,
//! so the bytes are mergekit's.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const EPSILON: ParamSpec = ParamSpec {
    name: "epsilon",
    per_model: false,
    default: "1e-5",
    doc: "a task-vector entry counts as changed when its magnitude is above this (>= 0)",
};
const PARAMS_RAM: &[ParamSpec] = &[EPSILON];
const PARAMS_PLUS: &[ParamSpec] = &[
    ParamSpec { name: "r", per_model: false, default: "0.1", doc: "strength of the rescaling of each model's unique updates (>= 0)" },
    ParamSpec {
        name: "alpha",
        per_model: false,
        default: "0.2",
        doc: "cap of each model's shared-to-unique ratio in the rescaling (>= 0)",
    },
    EPSILON,
];

/// `ram` or `ramplus_tl`.
#[derive(Debug, Clone, Copy)]
pub struct Ram {
    /// RAM+ (tensor-local rescaling of the unique updates).
    pub plus: bool,
}

/// `ram` (its parameters are per tensor, read when planning).
pub fn ram(_params: &Params) -> Result<Ram> {
    Ok(Ram { plus: false })
}

/// `ramplus_tl`.
pub fn ramplus_tl(_params: &Params) -> Result<Ram> {
    Ok(Ram { plus: true })
}

/// A non-negative global number of the tensor.
fn non_negative(t: &TensorCtx<'_>, name: &str, default: f64, what: &str) -> Result<f32> {
    let v = t.global_number(name, Some(default))?;
    if v < 0.0 {
        return Err(Error::Param {
            name: name.into(),
            reason: format!("{v} is negative ({what})"),
            place: format!(" (tensor {})", t.name),
        });
    }
    Ok(v as f32)
}

/// The number of the entries `d` that contribute (|d| > eps).
#[inline(always)]
fn contributors(d: &[f32], eps: f32) -> u32 {
    d.iter().map(|x| (x.abs() > eps) as u32).sum()
}

/// lambda = 1 + r clamp(S / max(U, eps), 0, alpha) in float32, as torch computes it from the
/// integer counts S (shared) and U (unique).
pub fn lambda(shared: f64, unique: f64, r: f32, alpha: f32, eps: f32) -> f32 {
    let u = unique as f32;
    let rho = shared as f32 / if u < eps { eps } else { u };
    1.0 + r * rho.clamp(0.0, alpha)
}

/// One element: base + sum_i t_i with `t_i = z_i [c = 1] lambda_i + (z_i [c > 1]) / max(c, 1)`
/// and `z_i = d_i [|d_i| > eps]` (mergekit's float32 operations in its order).
#[inline(always)]
pub fn merge_element(base: f32, d: &[f32], lambdas: Option<&[f32]>, eps: f32) -> f32 {
    let c = contributors(d, eps);
    let (unique, shared) = ((c == 1) as u32 as f32, (c > 1) as u32 as f32);
    let divisor = c.max(1) as f32;
    let mut acc = 0f32;
    for (i, &x) in d.iter().enumerate() {
        let z = x * (x.abs() > eps) as u32 as f32;
        let mut kept = z * unique;
        if let Some(l) = lambdas {
            kept *= l[i];
        }
        acc += kept + (z * shared) / divisor;
    }
    base + acc
}

impl Method for Ram {
    fn name(&self) -> &'static str {
        if self.plus {
            "ramplus_tl"
        } else {
            "ram"
        }
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn params(&self) -> &'static [ParamSpec] {
        if self.plus {
            PARAMS_PLUS
        } else {
            PARAMS_RAM
        }
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let eps = non_negative(t, "epsilon", 1e-5, "it is the magnitude below which an update does not count")?;
        let mut scalars = vec![eps];
        let mut reductions = 0;
        if self.plus {
            scalars.push(non_negative(t, "r", 0.1, "it scales the unique updates up")?);
            scalars.push(non_negative(t, "alpha", 0.2, "it caps a ratio of counts")?);
            reductions = 2 * m; // per model: entries in shared elements, in unique ones
        }
        Ok(TensorRecipe { trim: vec![None; m], scalars, reductions, row: 0, score: None })
    }

    fn reduce(&self, r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let eps = r.scalars[0];
        let m = c.inputs.len();
        let mut counts = vec![0u64; 2 * m];
        let mut d = vec![0f32; m];
        for j in 0..c.len() {
            for (v, x) in d.iter_mut().zip(c.inputs) {
                *v = x[j];
            }
            let n = contributors(&d, eps);
            if n == 0 {
                continue;
            }
            let at = if n > 1 { 0 } else { 1 };
            for (i, v) in d.iter().enumerate() {
                counts[2 * i + at] += (v.abs() > eps) as u64;
            }
        }
        for (a, c) in acc.iter_mut().zip(counts) {
            *a += c as f64;
        }
    }

    fn derive(&self, r: &TensorRecipe, _tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        let (eps, rr, alpha) = (r.scalars[0], r.scalars[1], r.scalars[2]);
        Ok(sums.chunks(2).map(|s| lambda(s[0], s[1], rr, alpha, eps) as f64).collect())
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let Some(base) = c.base else { return };
        let eps = r.scalars[0];
        let lambdas: Option<Vec<f32>> = self.plus.then(|| s.tensor.iter().map(|&x| x as f32).collect());
        let mut d = vec![0f32; c.inputs.len()];
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            for (v, x) in d.iter_mut().zip(c.inputs) {
                *v = x[j];
            }
            *o = merge_element(b, &d, lambdas.as_deref(), eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    #[test]
    fn unique_updates_are_kept_and_shared_ones_averaged() {
        let eps = 1e-5;
        // changed by model 0 only: kept whole; by both: averaged; by none (below eps): the base.
        assert_eq!(merge_element(1.0, &[0.5, 0.0], None, eps), 1.5);
        assert_eq!(merge_element(1.0, &[0.5, -0.25], None, eps), 1.0 + (0.5 / 2.0 + -0.25 / 2.0));
        assert_eq!(merge_element(1.0, &[1e-6, -1e-6], None, eps), 1.0);
        // one entry below eps beside one above: the element is unique to the other model.
        assert_eq!(merge_element(0.0, &[1e-6, 0.5], None, eps), 0.5);
        // RAM+: the unique update scaled by its model's lambda.
        assert_eq!(merge_element(0.0, &[0.5, 0.0], Some(&[1.5, 1.0]), eps), 0.75);
    }

    #[test]
    fn lambda_by_hand() {
        // 3 shared, 10 unique: rho 0.3 capped at alpha 0.2: 1 + 0.1 * 0.2.
        assert_eq!(lambda(3.0, 10.0, 0.1, 0.2, 1e-5), 1.0 + 0.1f32 * 0.2);
        // no unique entries: divided by eps, capped.
        assert_eq!(lambda(2.0, 0.0, 0.5, 0.2, 1e-5), 1.0 + 0.5f32 * 0.2);
        assert_eq!(lambda(0.0, 4.0, 0.5, 0.2, 1e-5), 1.0);
        assert_eq!(lambda(1.0, 20.0, 1.0, 0.2, 1e-5), 1.0 + 1.0f32 / 20.0);
    }

    #[test]
    fn ramplus_counts_each_models_shared_and_unique_entries() {
        let base = [0f32; 6];
        // model 0: unique at 0, 1; shared at 4. model 1: unique at 2; shared at 4.
        let a = [1.0f32, 1.0, 0.0, 0.0, 2.0, 0.0];
        let b = [0.0f32, 0.0, 1.0, 0.0, 4.0, 0.0];
        let mut p = Params::default();
        p.global.insert("r".into(), ParamValue::Number(1.0));
        p.global.insert("alpha".into(), ParamValue::Number(1.0));
        let out = merge_in_memory("ramplus_tl", &p, Some(&base), &[&a, &b], "w", 2, 0).unwrap();
        // lambda_0 = 1 + 1 * (1/2), lambda_1 = 1 + 1 * (1/1) (rho capped at 1).
        assert_eq!(out, vec![1.5, 1.5, 2.0, 0.0, 3.0, 0.0]);
        let cached = merge_in_memory("ramplus_tl", &p, Some(&base), &[&a, &b], "w", 1 << 16, u64::MAX).unwrap();
        assert_eq!(out, cached);
        let plain = merge_in_memory("ram", &Params::default(), Some(&base), &[&a, &b], "w", 2, 0).unwrap();
        assert_eq!(plain, vec![1.0, 1.0, 1.0, 0.0, 3.0, 0.0]);
    }

    #[test]
    fn negative_parameters_are_errors() {
        let base = [0f32; 2];
        let a = [1f32; 2];
        for (name, method) in [("epsilon", "ram"), ("r", "ramplus_tl"), ("alpha", "ramplus_tl")] {
            let mut p = Params::default();
            p.global.insert(name.into(), ParamValue::Number(-0.5));
            let e = merge_in_memory(method, &p, Some(&base), &[&a], "w", 2, 0).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("-0.5 is negative"), "{e}");
        }
        let mut p = Params::default();
        p.global.insert("r".into(), ParamValue::Number(0.5));
        let e = merge_in_memory("ram", &p, Some(&base), &[&a], "w", 2, 0).unwrap_err().to_string();
        assert!(e.contains("ram has no such parameter"), "{e}");
    }
}
