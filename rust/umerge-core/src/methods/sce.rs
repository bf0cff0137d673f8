//! SCE: select, calculate, erase (Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models",
//! arXiv:2408.07990), as mergekit 0.1.5's `sce` (`merge_methods/sce.py`).
//!
//! For task vectors d_i = x_i - base of m models, per tensor of n elements:
//!
//! 1. **select** (when `select_topk` < 1): the element-wise variance across the models,
//!    var_j = (1/m) sum_i (d_ij - mean_j)^2, and k = trunc(f32(nonzero) * f32(select_topk)) where
//!    nonzero counts the elements with var_j != 0; the k elements of largest variance are kept
//!    in every d_i and the others zeroed (so elements where all models moved alike are dropped
//!    whenever k < n). Exact, with equal variances at the threshold kept lowest index first
//!    (torch's `topk`, which mergekit uses, leaves that order unspecified);
//! 2. **calculate**: per model, the mean square of its (selected) task vector, s_i = (1/n) sum_j
//!    d_ij^2, and weights w_i = s_i / sum_i s_i (all 1/m when that sum is below 1e-6);
//! 3. **erase**: per element, the sign of sum_i d_ij is elected (+ when >= 0) and the entries of
//!    the other sign (and zeros) are erased: with a_ij = w_i where sign(d_ij) is the elected
//!    sign, else 0, out_j = base_j + sum_i a_ij d_ij / max(sum_i a_ij, 1e-6).
//!
//! Passes: the selection's (a radix select on the variance, `exec::score`, the variance being
//! computed again from the inputs by each of its passes), one reduction (the m sums of squares,
//! after the selection), the output. The variance is mergekit's: torch's Welford recurrence
//! accumulated in float64 over the models in order, rounded to float32, so the selected set is
//! mergekit's own; the weights come from float64 sums where mergekit averages in float32 (the
//! last bits of w_i, which the division by sum_i a_ij cancels up to rounding); the rest is
//! float32 in mergekit's order.

use crate::error::{Error, Result};
use crate::methods::task_vector::sign;
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, ScoreSelect, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "select_topk",
    per_model: false,
    default: "1.0",
    doc: "fraction of the elements with non-zero variance across the models kept, largest variance first, in (0, 1] (1: no selection)",
}];

/// The smallest divisor of the erased weighted sum (mergekit's clamp).
pub const MIN_DIVISOR: f32 = 1e-6;
/// Below this sum of mean squares the weights are uniform (mergekit's rule).
pub const MIN_WEIGHT_SUM: f64 = 1e-6;

/// SCE over the task vectors of any number of models.
#[derive(Debug, Clone, Copy)]
pub struct Sce;

impl Sce {
    /// SCE has only per-tensor parameters.
    pub fn from_params(_params: &Params) -> Result<Sce> {
        Ok(Sce)
    }
}

/// The variance across the models of one element: torch's Welford recurrence in float64 over
/// the values in order, divided by their count (`torch.var(unbiased=False)`), in float32.
#[inline(always)]
pub fn variance(values: impl Iterator<Item = f32>) -> f32 {
    let (mut count, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for v in values {
        let a = v as f64;
        count += 1.0;
        let delta = a - mean;
        mean += delta / count;
        m2 += delta * (a - mean);
    }
    if count == 0.0 {
        0.0
    } else {
        (m2 / count) as f32
    }
}

/// The weights from the sums of squares `squares` of `m` task vectors over `n` elements: the
/// mean squares (rounded to float32, as mergekit's float32 means) over their float32 sum, or 1/m
/// each when that sum is below 1e-6.
pub fn weights(squares: &[f64], n: f64) -> Vec<f32> {
    let m = squares.len();
    let means: Vec<f32> = squares.iter().map(|&s| if n > 0.0 { (s / n) as f32 } else { 0.0 }).collect();
    let mut total = 0f32;
    for &x in &means {
        total += x;
    }
    if (total as f64).abs() < MIN_WEIGHT_SUM {
        return vec![1.0 / m as f32; m];
    }
    means.iter().map(|&x| x / total).collect()
}

/// One element: elect the sign of sum_i d_i (+ when >= 0), then sum_i a_i d_i / max(sum_i a_i,
/// 1e-6) with a_i = w_i where d_i has the elected sign, else 0 (float32, mergekit's order).
#[inline(always)]
pub fn erase(d: impl Iterator<Item = f32> + Clone, w: &[f32]) -> f32 {
    let mut sum = 0f32;
    for x in d.clone() {
        sum += x;
    }
    let elected = if sum >= 0.0 { 1.0 } else { -1.0 };
    let (mut num, mut den) = (0f32, 0f32);
    for (x, &wi) in d.zip(w) {
        let a = if sign(x) == elected { wi } else { 0.0 };
        num += x * a;
        den += a;
    }
    // torch.clamp(min=): a NaN divisor stays NaN.
    num / if den < MIN_DIVISOR { MIN_DIVISOR } else { den }
}

impl Method for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn scores(&self) -> bool {
        true
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let topk = t.global_number("select_topk", Some(1.0))?;
        if !(topk > 0.0 && topk <= 1.0) {
            return Err(Error::Param {
                name: "select_topk".into(),
                reason: format!("{topk} is outside (0, 1]: it is the fraction of the elements kept by their variance across the models"),
                place: format!(" (tensor {})", t.name),
            });
        }
        let m = t.models.len();
        let score = (topk < 1.0 && m > 0).then_some(ScoreSelect::TopOfNonzero(topk as f32));
        // The m sums of squares, then the element count.
        Ok(TensorRecipe { trim: vec![None; m], scalars: Vec::new(), reductions: m + 1, row: 0, score })
    }

    fn score(&self, _r: &TensorRecipe, c: &Chunk<'_>, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = variance(c.inputs.iter().map(|x| x[j]));
        }
    }

    fn reduce(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let m = c.inputs.len();
        for (a, x) in acc.iter_mut().zip(c.inputs) {
            *a += x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        }
        acc[m] += c.len() as f64;
    }

    fn derive(&self, _r: &TensorRecipe, _tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        let m = sums.len() - 1;
        Ok(weights(&sums[..m], sums[m]).into_iter().map(f64::from).collect())
    }

    fn apply(&self, _r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let Some(base) = c.base else { return };
        if c.inputs.is_empty() {
            // No model has the tensor: the base passes through (mergekit's `return base_tensor`).
            out.copy_from_slice(base);
            return;
        }
        let w: Vec<f32> = s.tensor.iter().map(|&x| x as f32).collect();
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            *o = b + erase(c.inputs.iter().map(|x| x[j]), &w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    fn params(topk: f64) -> Params {
        let mut p = Params::default();
        p.global.insert("select_topk".into(), ParamValue::Number(topk));
        p
    }

    #[test]
    fn variance_is_the_population_variance() {
        assert_eq!(variance([1.0f32, 3.0].into_iter()), 1.0);
        assert_eq!(variance([2.0f32, 2.0, 2.0].into_iter()), 0.0);
        assert!((variance([1.0f32, 2.0, 4.0].into_iter()) - 14.0 / 9.0).abs() < 1e-6);
    }

    #[test]
    fn weights_by_hand() {
        // mean squares 1 and 3 over 2 elements: 0.25 and 0.75.
        assert_eq!(weights(&[2.0, 6.0], 2.0), vec![0.25, 0.75]);
        // below 1e-6 in total: uniform.
        assert_eq!(weights(&[1e-7, 2e-7], 1.0), vec![0.5, 0.5]);
    }

    #[test]
    fn erase_by_hand() {
        // d = [2, -1, 3], w = [0.5, 0.25, 0.25]: sum 4 elects +, a = [0.5, 0, 0.25]:
        // (1 + 0.75) / 0.75.
        assert_eq!(erase([2.0f32, -1.0, 3.0].into_iter(), &[0.5, 0.25, 0.25]), 1.75 / 0.75);
        // all erased (zeros): 0 / 1e-6 = 0.
        assert_eq!(erase([0.0f32, 0.0].into_iter(), &[0.5, 0.5]), 0.0);
    }

    #[test]
    fn selection_keeps_the_largest_variances_of_the_nonzero_ones() {
        // Three elements move differently, one alike in both models (variance 0), one not at all.
        let base = [0f32; 5];
        let a = [1.0f32, 0.0, 5.0, 2.0, 0.0];
        let b = [-1.0f32, 0.5, 1.0, 2.0, 0.0];
        // variances: 1, 1/16, 4, 0, 0: nonzero 3, k = trunc(3 * 0.7) = 2: elements 0 and 2 kept.
        let out = merge_in_memory("sce", &params(0.7), Some(&base), &[&a, &b], "w", 2, 0).unwrap();
        assert_eq!(out[1], 0.0);
        assert_eq!(out[3], 0.0);
        assert_eq!(out[4], 0.0);
        // Element 2: both positive, weights from the mean squares of the selected vectors:
        // a: (1 + 25) / 5, b: (1 + 1) / 5, so w = [26/28, 2/28] and out = (5 w_a + 1 w_b) / 1.
        let (wa, wb) = (26.0f32 / 5.0 / (28.0 / 5.0), 2.0f32 / 5.0 / (28.0 / 5.0));
        assert!((out[2] - (5.0 * wa + wb)).abs() < 1e-6, "{}", out[2]);
        // Element 0: sum 0 elects +: only a's 1 survives.
        assert_eq!(out[0], 1.0);
        // The same bytes decoded once into a cache in one chunk.
        let cached = merge_in_memory("sce", &params(0.7), Some(&base), &[&a, &b], "w", 1 << 16, u64::MAX).unwrap();
        assert_eq!(out, cached);
    }

    #[test]
    fn equal_variances_at_the_threshold_are_kept_lowest_index_first() {
        let n = 1000;
        let base = vec![0f32; n];
        // Variance 1 everywhere (a = 1, b = -1), so 300 of 1000 are kept: the first 300.
        let a = vec![1.0f32; n];
        let b = vec![-1.0f32; n];
        for (chunk, cache) in [(7usize, 0u64), (1 << 16, u64::MAX)] {
            let out = merge_in_memory("sce", &params(0.3), Some(&base), &[&a, &b], "w", chunk, cache).unwrap();
            // Sum 0 elects +: a's 1 kept where selected.
            assert!(out[..300].iter().all(|&x| x == 1.0), "chunk {chunk}");
            assert!(out[300..].iter().all(|&x| x == 0.0), "chunk {chunk}");
        }
    }

    #[test]
    fn select_topk_outside_the_unit_interval_is_an_error() {
        let base = [0f32; 4];
        let a = [1f32; 4];
        for bad in [0.0, -0.5, 1.5] {
            let e = merge_in_memory("sce", &params(bad), Some(&base), &[&a], "w", 4, 0).unwrap_err().to_string();
            assert!(e.contains("select_topk") && e.contains("outside (0, 1]"), "{e}");
        }
    }
}
