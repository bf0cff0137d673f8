//! NearSwap: take the other model's value where it is near the base's, keep the base's where
//! they differ much; mergekit's `nearswap` (`mergekit/merge_methods/nearswap.py`, mergekit
//! 0.1.5; after alchemonaut's QuartetAnemoi-70B-t0.0001 model card).
//!
//! Per element, with a = base, b = the other model and t >= 0:
//! w = clamp(t / max(|a - b|, 1e-6), 0, 1); out = w b + (1 - w) a.
//! An element whose models differ by at most t takes b; one that differs by d > t moves t/d of
//! the way to b. t = 0 gives the base. Element-wise float32 in mergekit's order, where torch's
//! `t / x` is `x.reciprocal() * t`: w = min(max((1 / max(|a - b|, 1e-6)) * t, 0), 1), so the
//! bytes equal mergekit's. No statistics pass.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "t",
    per_model: false,
    default: "required",
    doc: "distance below which the other model's value is taken whole (>= 0; 0 gives the base)",
}];

/// The smallest |a - b| divided by (mergekit's clamp).
pub const MIN_DIFF: f32 = 1e-6;

/// NearSwap between the base and one model.
#[derive(Debug, Clone, Copy)]
pub struct NearSwap;

impl NearSwap {
    /// Checks that exactly one model besides the base is given.
    pub fn from_params(params: &Params) -> Result<NearSwap> {
        if params.models.len() != 1 {
            return Err(Error::Spec(format!(
                "nearswap works on the base and exactly one other model, but {} models were given",
                params.models.len()
            )));
        }
        Ok(NearSwap)
    }
}

/// One element: w = clamp(t / max(|a - b|, 1e-6), 0, 1), w b + (1 - w) a.
#[inline(always)]
pub fn swap(t: f32, a: f32, b: f32) -> f32 {
    let w = ((1.0 / (a - b).abs().max(MIN_DIFF)) * t).clamp(0.0, 1.0);
    w * b + (1.0 - w) * a
}

impl Method for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn uses_deltas(&self) -> bool {
        false
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let tt = t.global_number("t", None)?;
        if tt < 0.0 {
            return Err(Error::Param {
                name: "t".into(),
                reason: format!("{tt} is negative (it is a distance: 0 keeps the base)"),
                place: format!(" (tensor {})", t.name),
            });
        }
        Ok(TensorRecipe { trim: vec![None; t.models.len()], scalars: vec![tt as f32], reductions: 0, row: 0, score: None })
    }

    fn apply(&self, r: &TensorRecipe, _s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let Some(a) = c.base else { return };
        let Some(b) = c.inputs.first() else {
            // The model lacks the tensor: the base passes through (mergekit's policy).
            out.copy_from_slice(a);
            return;
        };
        let t = r.scalars[0];
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b.iter()) {
            *o = swap(t, x, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_values_swap_and_far_ones_move_part_way() {
        // |a - b| = 0.5 <= t = 1: b. |a - b| = 4 > t: a quarter of the way.
        assert_eq!(swap(1.0, 1.0, 1.5), 1.5);
        assert_eq!(swap(1.0, 0.0, 4.0), 1.0);
        // Equal values: b (= a). t = 0: the base.
        assert_eq!(swap(0.3, 2.0, 2.0), 2.0);
        assert_eq!(swap(0.0, 2.0, -7.0), 2.0);
    }
}
