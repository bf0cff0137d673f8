//! Magnitude pruning: trim each task vector as TIES does, then a plain weighted sum (no sign
//! election). PEFT's `magnitude_prune` (`peft.utils.merge_utils.magnitude_prune`, used by
//! `add_weighted_adapter(combination_type="magnitude_prune")`), and mergekit's `breadcrumbs`
//! with `gamma: 0`.
//!
//! out = base + lambda * sum_i w_i * trim_k(d_i), k = floor(density * n) per tensor (exact,
//! lowest index first at equal magnitudes), d_i = x_i - base; with `normalize` the sum is
//! divided by sum_i w_i. The kernel is the task-vector family's (`task_vector.rs`); the
//! trim is the executor's exact radix select.

use crate::error::Result;
use crate::methods::task_vector::{Sparsify, TaskVectorMerge, DENSITY, LAMBDA, WEIGHT};
use crate::methods::ParamSpec;
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    DENSITY,
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "false", doc: "divide the weighted sum by the sum of weights" },
];

/// Builds `magnitude_prune` from the merge's parameters.
pub fn build(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("magnitude_prune", Sparsify::Magnitude, false, false, PARAMS, params)
}

#[cfg(test)]
mod tests {
    use crate::exec::merge_in_memory;
    use crate::params::{ParamValue, Params};

    #[test]
    fn prunes_then_sums_without_sign_election() {
        let base = [0.0f32; 4];
        let a = [4.0f32, -1.0, 2.0, 0.5]; // density 0.5 keeps 4, 2
        let b = [-3.0f32, 0.25, -1.0, 5.0]; // keeps -3, 5
        let mut p = Params::default();
        p.global.insert("density".into(), ParamValue::Number(0.5));
        let out = merge_in_memory("magnitude_prune", &p, Some(&base), &[&a, &b], "t", 3, 0).unwrap();
        // No election: 4 + (-3) = 1 (TIES would keep only 4).
        assert_eq!(out, vec![1.0, 0.0, 2.0, 5.0]);
    }
}
