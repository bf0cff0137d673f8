//! DELLA (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
//! Magnitude-Based Sampling", arXiv:2406.11617), as mergekit's `della` (TIES sign consensus,
//! normalize on by default) and `della_linear` (weighted sum).
//!
//! MagPrune, per row of each task vector d_i (the last dimension of a 2-D tensor; a 1-D tensor
//! is one row, as in mergekit, which unsqueezes it): rank the row's c entries by |d| ascending,
//! r = 0..c-1 (equal magnitudes: lower index first), and keep entry r with probability
//!
//!   p_r = (density - epsilon) + 2 epsilon r / (c - 1)
//!
//! so larger entries survive more often and the row keeps density * c entries on average
//! (mergekit's `della_magprune`: rank_norm = (rank - min) / (max - min)); a one-entry row keeps
//! with p = density. The draws come from the counter-based generator in `rng`, keyed by (seed,
//! tensor, model, element), so the bytes do not depend on threads or budget. Kept entries are
//! rescaled ([`Rescale`](super::task_vector::Rescale)): by 1/p_r (default: the paper's
//! 1/(1 - P_drop), which keeps every entry's expectation), by the tensor's L1 ratio
//! (mergekit's `rescale: true`), or not at all. Then the task-vector kernel of
//! `task_vector.rs`.
//!
//! The executor hands this method chunks of whole rows (`TensorRecipe::row`); tensors with more
//! than two dimensions are refused (mergekit ranks them along dim 1, a strided layout no LLM
//! weight uses).

use crate::error::{Error, Result};
use crate::methods::task_vector::{Sparsify, TaskVectorMerge, DENSITY, EPSILON, LAMBDA, RESCALE, SEED, WEIGHT};
use crate::methods::{rng, ParamSpec, TensorCtx};
use crate::params::Params;
use crate::select::abs_bits;

/// mergekit's default epsilon.
pub const DEFAULT_EPSILON: f64 = 0.15;

const PARAMS_TIES: &[ParamSpec] = &[
    DENSITY,
    EPSILON,
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "true", doc: "divide by the sum of agreeing weights" },
    RESCALE,
    SEED,
];

const PARAMS_LINEAR: &[ParamSpec] = &[
    DENSITY,
    EPSILON,
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "false", doc: "divide by the sum of weights" },
    RESCALE,
    SEED,
];

/// `della` (sign consensus, normalize by default) from the merge's parameters.
pub fn della(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("della", Sparsify::Della, true, true, PARAMS_TIES, params)
}

/// `della_linear` (weighted sum) from the merge's parameters.
pub fn della_linear(params: &Params) -> Result<TaskVectorMerge> {
    TaskVectorMerge::configure("della_linear", Sparsify::Della, false, false, PARAMS_LINEAR, params)
}

/// Checks epsilon against density (mergekit's rule: density +- epsilon inside (0, 1) unless
/// density is 1, which keeps everything).
pub fn check_epsilon(epsilon: f64, density: f64, t: &TensorCtx<'_>, slot: usize) -> Result<f32> {
    let ok = epsilon >= 0.0 && (density >= 1.0 || (density - epsilon > 0.0 && density + epsilon < 1.0));
    if ok {
        Ok(epsilon as f32)
    } else {
        Err(Error::Param {
            name: "epsilon".into(),
            reason: format!("{epsilon} with density {density}: density - epsilon and density + epsilon must lie in (0, 1)"),
            place: format!(" (model {}, tensor {})", t.models[slot] + 1, t.name),
        })
    }
}

/// Elements per rank row of a tensor: its last dimension (2-D) or all of it (0-D, 1-D).
pub fn row_length(t: &TensorCtx<'_>) -> Result<u64> {
    let row = match t.shape {
        [] | [_] => t.numel(),
        [_, c] => *c as u64,
        more => {
            return Err(Error::Param {
                name: "della".into(),
                reason: format!("ranks entries within rows of 1-D or 2-D tensors; this one has {} dimensions", more.len()),
                place: format!(" (tensor {})", t.name),
            })
        }
    };
    if row > u32::MAX as u64 {
        return Err(Error::Param {
            name: "della".into(),
            reason: format!("rows of {row} entries are too long"),
            place: format!(" (tensor {})", t.name),
        });
    }
    Ok(row.max(1))
}

/// How kept entries are scaled.
#[derive(Debug, Clone, Copy)]
pub enum Scale {
    /// Divided by their keep probability.
    ByProbability,
    /// Multiplied by a constant (1 for none, the L1 ratio for `rescale: l1`).
    By(f32),
}

/// DELLA's MagPrune for one model of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct MagPrune {
    /// Mean keep probability.
    pub density: f64,
    /// Half-width of the keep probabilities' range.
    pub epsilon: f64,
    /// The model's stream key (`rng::stream_key`).
    pub key: u64,
    /// Scale of kept entries.
    pub scale: Scale,
}

impl MagPrune {
    /// Keep probability of the entry ranked `rank` (0 = smallest) of a row of `c`.
    pub fn probability(&self, rank: usize, c: usize) -> f64 {
        if c > 1 {
            (self.density - self.epsilon) + 2.0 * self.epsilon * rank as f64 / (c - 1) as f64
        } else {
            self.density
        }
    }

    /// Masks one row `x` whose first element has flat index `first` into `out`; `scratch` is
    /// reused from row to row.
    pub fn row(&self, x: &[f32], first: u64, out: &mut [f32], scratch: &mut RowScratch) {
        let c = x.len();
        scratch.prepare(self, c);
        let RowScratch { order, bits, probs, cuts, .. } = scratch;
        // (|x| bits, index) pairs, stably radix-sorted by magnitude: ranks with ties broken by
        // index. Measured on the 1.1B benchmark: a comparison sort of (|x| bits, index) words
        // was 40% of della_linear's CPU time.
        order.clear();
        order.extend(x.iter().enumerate().map(|(j, &v)| (abs_bits(v), j as u32)));
        radsort::sort_by_key(order, |&(magnitude, _)| magnitude);
        bits.resize(c, 0);
        rng::fill_bits(self.key, first, bits);
        // Every entry is written, kept or not: a branch on a coin flip mispredicts half the time.
        for ((&(_, j), &cut), &p) in order.iter().zip(cuts.iter()).zip(probs.iter()) {
            let j = j as usize;
            let kept = match self.scale {
                Scale::ByProbability => (x[j] as f64 / p) as f32,
                Scale::By(s) => x[j] * s,
            };
            out[j] = if (bits[j] as u64) < cut { kept } else { 0.0 };
        }
    }
}

/// Buffers [`MagPrune::row`] reuses from row to row: the ranking, the row's random draws, and
/// the keep probability and [`rng::keep_cutoff`] of every rank, which depend only on the row
/// length and the mask's density and epsilon, so they are computed once per chunk of rows rather
/// than once per entry.
#[derive(Debug, Default)]
pub struct RowScratch {
    order: Vec<(u32, u32)>,
    bits: Vec<u32>,
    probs: Vec<f64>,
    cuts: Vec<u64>,
    /// (row length, density bits, epsilon bits) that `probs` and `cuts` were computed for.
    made_for: Option<(usize, u64, u64)>,
}

impl RowScratch {
    fn prepare(&mut self, mask: &MagPrune, c: usize) {
        let wanted = (c, mask.density.to_bits(), mask.epsilon.to_bits());
        if self.made_for != Some(wanted) {
            self.probs.clear();
            self.probs.extend((0..c).map(|rank| mask.probability(rank, c)));
            self.cuts.clear();
            self.cuts.extend(self.probs.iter().map(|&p| rng::keep_cutoff(p)));
            self.made_for = Some(wanted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    fn params(pairs: &[(&str, ParamValue)]) -> Params {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.global.insert(k.to_string(), v.clone());
        }
        p
    }

    #[test]
    fn keep_probability_grows_with_rank_and_averages_density() {
        let n = 200_000;
        // One row: |x| = index + 1, so rank = index.
        let base = vec![0f32; n];
        let a: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { (i + 1) as f32 } else { -((i + 1) as f32) }).collect();
        let p = params(&[
            ("density", ParamValue::Number(0.5)),
            ("epsilon", ParamValue::Number(0.3)),
            ("rescale", ParamValue::Text("none".into())),
        ]);
        let out = merge_in_memory("della_linear", &p, Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        let kept = |r: std::ops::Range<usize>| out[r.clone()].iter().filter(|&&x| x != 0.0).count() as f64 / r.len() as f64;
        // Expected keep rate of the bottom tenth ~ 0.2 + 0.06 * 0.5 / 1 = 0.23, top tenth ~ 0.77.
        assert!((kept(0..n / 10) - 0.23).abs() < 0.01, "{}", kept(0..n / 10));
        assert!((kept(n - n / 10..n) - 0.77).abs() < 0.01, "{}", kept(n - n / 10..n));
        let all = kept(0..n);
        let sd = (0.25f64 / n as f64).sqrt();
        assert!((all - 0.5).abs() < 4.0 * sd, "{all}");
        // Kept entries are unscaled with rescale none.
        assert!(out.iter().zip(&a).all(|(&o, &x)| o == 0.0 || o == x));
    }

    #[test]
    fn probability_rescale_divides_by_each_entry_probability() {
        let n = 1000;
        let base = vec![0f32; n];
        let a: Vec<f32> = (0..n).map(|i| (i + 1) as f32).collect();
        let p = params(&[("density", ParamValue::Number(0.4)), ("epsilon", ParamValue::Number(0.2))]);
        let out = merge_in_memory("della_linear", &p, Some(&base), &[&a], "w", 1 << 16, 0).unwrap();
        for (i, (&o, &x)) in out.iter().zip(&a).enumerate() {
            // density and epsilon travel as f32 in the recipe.
            let (d, e) = (0.4f32 as f64, 0.2f32 as f64);
            let prob = (d - e) + 2.0 * e * i as f64 / (n - 1) as f64;
            assert!(o == 0.0 || o == (x as f64 / prob) as f32, "i={i} o={o}");
        }
    }

    #[test]
    fn row_mask_follows_rank_with_ties_by_index() {
        // Few distinct magnitudes (many ties) and both signs, over whole generator blocks.
        let x: Vec<f32> = (0..3000).map(|i| ((i * 7919) % 13) as f32 * if i % 3 == 0 { -0.5 } else { 0.5 }).collect();
        let mask = MagPrune { density: 0.5, epsilon: 0.4, key: rng::stream_key(1, "t", 0), scale: Scale::By(1.0) };
        let first = 1024 * 5 + 17;
        let mut out = vec![0f32; x.len()];
        mask.row(&x, first, &mut out, &mut RowScratch::default());
        // Reference: a stable comparison sort by |x| (ties keep index order), the scalar draw.
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()));
        for (rank, &j) in order.iter().enumerate() {
            let kept = rng::keep(mask.key, first + j as u64, rng::keep_cutoff(mask.probability(rank, x.len())));
            assert_eq!(out[j], if kept { x[j] } else { 0.0 }, "entry {j} rank {rank}");
        }
        assert!(out.iter().filter(|&&v| v != 0.0).count() > 1000);
    }

    #[test]
    fn bad_epsilon_and_three_dims_are_errors() {
        let base = vec![0f32; 4];
        let a = vec![1f32; 4];
        let p = params(&[("density", ParamValue::Number(0.9)), ("epsilon", ParamValue::Number(0.15))]);
        let e = merge_in_memory("della", &p, Some(&base), &[&a], "w", 4, 0).unwrap_err().to_string();
        assert!(e.contains("epsilon"), "{e}");
    }
}
