//! Model Breadcrumbs (Davari and Belilovsky, 2024, "Model Breadcrumbs: Scaling Multi-Task Model
//! Merging with Sparse Masks", arXiv:2312.06795), as mergekit's `breadcrumbs` (weighted sum) and
//! `breadcrumbs_ties` (with TIES sign consensus).
//!
//! Per tensor of n entries and per model: drop the largest min(floor(gamma * n), n - kept)
//! magnitudes of d_i = x_i - base as outliers and keep the next kept = floor(density * n); every
//! other entry is zeroed (mergekit's `magnitude_outliers`: the outlier drop shrinks when it would
//! eat into the kept count; density 1 keeps everything). Both cuts are exact (the executor's
//! radix select, two thresholds per model), equal magnitudes ranked lowest index first. Then the
//! task-vector kernel of `task_vector.rs`: out = base + lambda * sum_i w_i d_i (normalize
//! and consensus as there). gamma 0 is `magnitude_prune`.

use crate::error::{Error, Result};
use crate::methods::task_vector::{Sparsify, TaskVectorMerge, DENSITY, GAMMA, LAMBDA, WEIGHT};
use crate::methods::{ParamSpec, TensorCtx};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    DENSITY,
    GAMMA,
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "false", doc: "divide by the sum of (agreeing) weights" },
];

/// `breadcrumbs` from the merge's parameters.
pub fn breadcrumbs(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("breadcrumbs", Sparsify::Outliers, false, false, PARAMS, params)
}

/// `breadcrumbs_ties` from the merge's parameters.
pub fn breadcrumbs_ties(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("breadcrumbs_ties", Sparsify::Outliers, true, false, PARAMS, params)
}

/// gamma must be a fraction in [0, 1).
pub fn check_gamma(gamma: f64, t: &TensorCtx<'_>, slot: usize) -> Result<()> {
    if (0.0..1.0).contains(&gamma) {
        return Ok(());
    }
    Err(Error::Param {
        name: "gamma".into(),
        reason: format!("{gamma} is outside [0, 1): it is the fraction of the largest entries dropped"),
        place: format!(" (model {}, tensor {})", t.models[slot] + 1, t.name),
    })
}

#[cfg(test)]
mod tests {
    use crate::exec::merge_in_memory;
    use crate::params::{ParamValue, Params};

    fn params(density: f64, gamma: f64) -> Params {
        let mut p = Params::default();
        p.global.insert("density".into(), ParamValue::Number(density));
        p.global.insert("gamma".into(), ParamValue::Number(gamma));
        p
    }

    #[test]
    fn drops_outliers_and_smallest_by_hand() {
        let base = [0.0f32; 10];
        // |d| ranks (descending): 9 (idx 3), 8 (0), 7 (6), 6 (1), 5 (8), 4 (2), 3 (9), 2 (4), 1 (7), 0.5 (5)
        let a = [8.0f32, -6.0, 4.0, -9.0, 2.0, 0.5, 7.0, -1.0, 5.0, 3.0];
        // n 10: kept floor(0.4 * 10) = 4, dropped floor(0.2 * 10) = 2 -> ranks 2..6: 7, 6, 5, 4.
        let out = merge_in_memory("breadcrumbs", &params(0.4, 0.2), Some(&base), &[&a], "t", 3, 0).unwrap();
        assert_eq!(out, vec![0.0, -6.0, 4.0, 0.0, 0.0, 0.0, 7.0, 0.0, 5.0, 0.0]);
        // density 0.9: kept 9, so only one outlier may go (min(2, 10 - 9)).
        let out = merge_in_memory("breadcrumbs", &params(0.9, 0.2), Some(&base), &[&a], "t", 4, 0).unwrap();
        assert_eq!(out, vec![8.0, -6.0, 4.0, 0.0, 2.0, 0.5, 7.0, -1.0, 5.0, 3.0]);
        // gamma 0 is magnitude_prune.
        let mp = {
            let mut p = Params::default();
            p.global.insert("density".into(), ParamValue::Number(0.4));
            merge_in_memory("magnitude_prune", &p, Some(&base), &[&a], "t", 3, 0).unwrap()
        };
        assert_eq!(merge_in_memory("breadcrumbs", &params(0.4, 0.0), Some(&base), &[&a], "t", 3, 0).unwrap(), mp);
    }

    #[test]
    fn ties_variant_elects_signs_after_the_band() {
        let base = [0.0f32; 4];
        let a = [10.0f32, 3.0, -2.0, 1.0]; // n 4, density 0.5, gamma 0.25: drop 10, keep 3 and -2
        let b = [-1.0f32, -4.0, 20.0, 2.0]; // drop 20, keep -4 and 2
        let out = merge_in_memory("breadcrumbs_ties", &params(0.5, 0.25), Some(&base), &[&a, &b], "t", 4, 0).unwrap();
        // element 1: 3 + (-4) = -1 -> minus wins: -4; element 2: -2 (only a); element 3: 2.
        assert_eq!(out, vec![0.0, -4.0, -2.0, 2.0]);
        let out = merge_in_memory("breadcrumbs", &params(0.5, 0.25), Some(&base), &[&a, &b], "t", 4, 0).unwrap();
        assert_eq!(out, vec![0.0, -1.0, -2.0, 2.0]);
    }
}
