//! DARE: drop and rescale (Yu et al., 2024, "Language Models are Super Mario: Absorbing
//! Abilities from Homologous Models as a Free Lunch", arXiv:2311.03099), as `dare_linear`
//! (weighted sum) and `dare_ties` (TIES sign consensus), the two variants of mergekit and PEFT.
//!
//! Each entry of each task vector d_i = x_i - base is kept with probability `density`
//! (independently; the mask bit of element j of model i in tensor T is a pure function of
//! (seed, T, i, j), drawn from the counter-based generator in `rng`, so the output is the same
//! for any thread count or chunk size), and kept entries are rescaled:
//!
//! - `rescale: density` (default): d / density, the paper's rescale. Each element keeps its
//!   expectation, E[mask * d / density] = d, which is the property DARE rests on, and the step is
//!   element-local (no statistics pass over the tensor). PEFT does this too.
//! - `rescale: l1`: times L1(d) / L1(mask * d) per tensor, as current mergekit does
//!   (`rescale: true`): the L1 norm of the task vector is kept exactly rather than in expectation.
//!   Costs one more pass over the inputs. `umerge run` uses it for mergekit YAML, where it is
//!   mergekit's default.
//! - `rescale: none`.
//!
//! Then the task-vector kernel (`task_vector.rs`): dare_linear = base + lambda * sum w_i d_i
//! (normalize: / sum w_i); dare_ties elects the sign of sum w_i d_i per element and sums only the
//! agreeing entries (normalize: / sum of agreeing w_i). `normalize` defaults to false for both,
//! as in mergekit.

use crate::error::Result;
use crate::methods::task_vector::{Sparsify, TaskVectorMerge, DENSITY, LAMBDA, RESCALE, SEED, WEIGHT};
use crate::methods::ParamSpec;
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    DENSITY,
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "false", doc: "divide by the sum of (agreeing) weights" },
    RESCALE,
    SEED,
];

/// `dare_linear` from the merge's parameters.
pub fn dare_linear(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("dare_linear", Sparsify::Random, false, false, PARAMS, params)
}

/// `dare_ties` from the merge's parameters.
pub fn dare_ties(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("dare_ties", Sparsify::Random, true, false, PARAMS, params)
}

#[cfg(test)]
mod tests {
    use crate::exec::merge_in_memory;
    use crate::params::{ParamValue, Params};

    fn params(density: f64, seed: f64, rescale: &str) -> Params {
        let mut p = Params::default();
        p.global.insert("density".into(), ParamValue::Number(density));
        p.global.insert("seed".into(), ParamValue::Number(seed));
        p.global.insert("rescale".into(), ParamValue::Text(rescale.into()));
        p
    }

    #[test]
    fn kept_fraction_and_rescale() {
        let n = 100_000;
        let base = vec![0f32; n];
        let a = vec![2f32; n];
        let out = merge_in_memory("dare_linear", &params(0.3, 7.0, "density"), Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        let kept = out.iter().filter(|&&x| x != 0.0).count() as f64;
        let sd = (n as f64 * 0.3 * 0.7).sqrt();
        assert!((kept - 0.3 * n as f64).abs() < 4.0 * sd, "kept {kept}");
        // kept entries are 2 / 0.3
        assert!(out.iter().all(|&x| x == 0.0 || x == (2.0f32 * (1.0 / 0.3f64) as f32)));
        // l1: the L1 norm is kept exactly (up to rounding).
        let out = merge_in_memory("dare_linear", &params(0.3, 7.0, "l1"), Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        let l1: f64 = out.iter().map(|&x| x.abs() as f64).sum();
        assert!((l1 - 2.0 * n as f64).abs() < 1e-3 * n as f64, "l1 {l1}");
        let other = merge_in_memory("dare_linear", &params(0.3, 8.0, "density"), Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        let same = merge_in_memory("dare_linear", &params(0.3, 7.0, "density"), Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        assert_ne!(other, same);
        let renamed = merge_in_memory("dare_linear", &params(0.3, 7.0, "density"), Some(&base), &[&a], "v", 1 << 16, 0).unwrap();
        assert_ne!(renamed, same);
    }
}
