//! Arcee Fusion: take the other model's values only where they matter most, as mergekit 0.1.5's
//! `arcee_fusion` (`merge_methods/arcee_fusion.py`; Arcee AI, 2025, no paper: mergekit cites
//! arcee.ai). A base and one model.
//!
//! With a = base and x = the model, per row of the last dimension (a 1-D tensor is one row):
//!
//! 1. **importance**: p = softmax(x) + 1e-8 and q = softmax(a) + 1e-8 over the row,
//!    kl = sum_j p_j ln(p_j / q_j) (one number per row), and each element's importance is
//!    |x_j - a_j| kl;
//! 2. **dynamic threshold** over the whole tensor of n importances, sorted ascending as s:
//!    q1 = s[floor((n-1)/4)], median = s[floor((n-1)/2)], q3 = s[floor(3(n-1)/4)] and
//!    threshold = median + 1.5 (q3 - q1), Tukey's fence for outliers;
//! 3. **fusion**: `out = a + (x - a) [importance >= threshold]`: the model's value where the
//!    element is an outlier of importance, the base's elsewhere.
//!
//! The quartiles are exact order statistics of the whole tensor (the engine's score selection,
//! `exec::score`: two radix passes over the importances, recomputed from the inputs each time,
//! then the output pass). mergekit sorts the importances of a tensor of at most 10^6 elements,
//! so the quartiles are the same there, and estimates them from 10^6 entries drawn with
//! replacement by torch's global generator for larger tensors, which umerge does not imitate (its
//! threshold is the one mergekit estimates, and the same for every run). The softmax and the
//! KL sum are taken in float64 (mergekit: float32), the importance rounded to float32 and the
//! threshold computed in float32 as mergekit does; the element arithmetic is mergekit's.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, ScoreSelect, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

/// Added to both softmaxes before the ratio (mergekit's eps).
pub const EPS: f64 = 1e-8;
/// Tukey's fence: the threshold is the median plus this many interquartile ranges.
pub const FENCE: f32 = 1.5;

/// Arcee Fusion between the base and one model.
#[derive(Debug, Clone, Copy)]
pub struct ArceeFusion;

impl ArceeFusion {
    /// Checks that exactly one model besides the base is given.
    pub fn from_params(params: &Params) -> Result<ArceeFusion> {
        if params.models.len() != 1 {
            return Err(Error::Spec(format!(
                "arcee_fusion works on the base and exactly one other model, but {} models were given",
                params.models.len()
            )));
        }
        Ok(ArceeFusion)
    }
}

/// The importances of one row: |x_j - a_j| kl with kl = sum_j p_j ln(p_j / q_j), p and q the
/// softmaxes of x and a plus [`EPS`], in float64, rounded to float32 into `out`. `ex` and `ea`
/// are scratch rows.
pub fn importance_row(x: &[f32], a: &[f32], out: &mut [f32], ex: &mut Vec<f64>, ea: &mut Vec<f64>) {
    let exps = |v: &[f32], e: &mut Vec<f64>| -> f64 {
        let max = v.iter().fold(f64::NEG_INFINITY, |m, &y| m.max(y as f64));
        e.clear();
        e.extend(v.iter().map(|&y| (y as f64 - max).exp()));
        e.iter().sum::<f64>()
    };
    let (sx, sa) = (exps(x, ex), exps(a, ea));
    let mut kl = 0f64;
    for (&px, &pa) in ex.iter().zip(ea.iter()) {
        let (p, q) = (px / sx + EPS, pa / sa + EPS);
        kl += p * (p / q).ln();
    }
    for ((o, &xv), &av) in out.iter_mut().zip(x).zip(a) {
        *o = ((xv - av).abs() as f64 * kl) as f32;
    }
}

/// The importances of a chunk of whole rows of `row` elements.
fn importances(row: usize, x: &[f32], a: &[f32], out: &mut [f32]) {
    let (mut ex, mut ea) = (Vec::with_capacity(row), Vec::with_capacity(row));
    for ((xr, ar), or) in x.chunks(row).zip(a.chunks(row)).zip(out.chunks_mut(row)) {
        importance_row(xr, ar, or, &mut ex, &mut ea);
    }
}

/// The ascending ranks of the quartiles of `n` sorted values (mergekit's
/// `(q * (n - 1)).long()` for q = 0.25, 0.5, 0.75, exact for these q).
pub fn quartile_ranks(n: u64) -> [u64; 3] {
    let last = n.saturating_sub(1);
    [last / 4, last / 2, last * 3 / 4]
}

/// Tukey's fence from the quartiles, in float32: median + 1.5 (q3 - q1).
pub fn threshold(q1: f32, median: f32, q3: f32) -> f32 {
    median + FENCE * (q3 - q1)
}

impl Method for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn uses_deltas(&self) -> bool {
        false
    }

    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }

    fn scores(&self) -> bool {
        true
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let row = (t.shape.last().map_or(1, |&c| c as u64)).max(1);
        let row = if t.shape.len() < 2 { t.numel().max(1) } else { row };
        if row > u32::MAX as u64 {
            return Err(Error::Param {
                name: "arcee_fusion".into(),
                reason: format!("takes a softmax over rows of {row} entries, too long"),
                place: format!(" (tensor {})", t.name),
            });
        }
        // A model lacking the tensor: the base passes through, nothing to rank.
        let score = (m == 1).then(|| ScoreSelect::Ranks(quartile_ranks(t.numel()).to_vec()));
        Ok(TensorRecipe { trim: vec![None; m], scalars: Vec::new(), reductions: 0, row, score })
    }

    fn score(&self, r: &TensorRecipe, c: &Chunk<'_>, out: &mut [f32]) {
        match (c.inputs.first(), c.base) {
            (Some(x), Some(a)) => importances(r.row as usize, x, a, out),
            _ => out.fill(0.0),
        }
    }

    fn derive(&self, _r: &TensorRecipe, _tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        let q: Vec<f32> = sums.iter().map(|&v| v as f32).collect();
        Ok(vec![threshold(q[0], q[1], q[2]) as f64])
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let Some(a) = c.base else { return };
        let Some(x) = c.inputs.first() else {
            out.copy_from_slice(a);
            return;
        };
        let thr = s.tensor[0] as f32;
        importances(r.row as usize, x, a, out);
        for ((o, &xv), &av) in out.iter_mut().zip(x.iter()).zip(a) {
            let mask = if *o >= thr { 1.0 } else { 0.0 };
            *o = av + (xv - av) * mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;

    fn one_model() -> Params {
        Params { models: vec![Default::default()], ..Default::default() }
    }

    #[test]
    fn quartile_ranks_are_mergekits_indices() {
        assert_eq!(quartile_ranks(1), [0, 0, 0]);
        assert_eq!(quartile_ranks(5), [1, 2, 3]);
        assert_eq!(quartile_ranks(10), [2, 4, 6]); // 9 * 0.25 = 2.25, 4.5, 6.75
                                                   // mergekit's float32 product, exact below 2^22 elements.
        for n in [2u64, 7, 1000, 999_999, 1_000_000] {
            let f = |q: f32| (q * (n - 1) as f32) as u64;
            assert_eq!(quartile_ranks(n), [f(0.25), f(0.5), f(0.75)], "{n}");
        }
    }

    #[test]
    fn importance_of_a_row_by_hand() {
        // x = [ln 3, 0], a = [0, 0]: p = [3/4, 1/4], q = [1/2, 1/2] (plus 1e-8 each).
        let x = [3f32.ln(), 0.0];
        let a = [0f32, 0.0];
        let mut out = [0f32; 2];
        importance_row(&x, &a, &mut out, &mut Vec::new(), &mut Vec::new());
        let (p0, p1, q) = (0.75 + EPS, 0.25 + EPS, 0.5 + EPS);
        let kl = p0 * (p0 / q).ln() + p1 * (p1 / q).ln();
        assert_eq!(out[0], ((3f32.ln() as f64) * kl) as f32);
        assert_eq!(out[1], 0.0);
    }

    #[test]
    fn only_outliers_of_importance_take_the_models_value() {
        // One row, so importance = |d| kl with one kl. |d| = 0.01 (i + 1) for i < 20: the
        // quartiles are s[4], s[9], s[14] = (0.05, 0.1, 0.15) kl, the fence 0.25 kl is above
        // every importance, and nothing is taken.
        let n = 20;
        let a = vec![0f32; n];
        let x: Vec<f32> = (0..n).map(|i| (i + 1) as f32 * 0.01).collect();
        let out = merge_in_memory("arcee_fusion", &one_model(), Some(&a), &[&x], "w", 4, 0).unwrap();
        assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
        // |d| = 0.01 nineteen times and 1 once: q1 = median = q3 = 0.01 kl, the fence too, and
        // every element reaches it: the model's values everywhere.
        let mut y = vec![0.01f32; n];
        y[n - 1] = 1.0;
        let out = merge_in_memory("arcee_fusion", &one_model(), Some(&a), &[&y], "w", 4, 0).unwrap();
        assert_eq!(out, y);
    }

    #[test]
    fn the_same_bytes_streamed_in_rows_and_cached() {
        let (rows, cols) = (37usize, 53usize);
        let a: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
        // Small changes, and every 17th element a large one: those are the outliers taken.
        let x: Vec<f32> =
            a.iter().enumerate().map(|(i, &v)| v + ((i * 104_729) % 997) as f32 / 99_700.0 + if i % 17 == 0 { 0.5 } else { 0.0 }).collect();
        let m = ArceeFusion::from_params(&one_model()).unwrap();
        let shape = [rows, cols];
        let p = one_model();
        let ctx = TensorCtx { name: "w", shape: &shape, pos: crate::params::TensorPos { name: "w", t: 0.0 }, params: &p, models: &[0] };
        let recipe = m.plan_tensor(&ctx).unwrap();
        assert_eq!(recipe.row, cols as u64);
        // merge_in_memory sees a 1-D array: one row of all elements; the engine's 2-D path is
        // checked in tests/ against mergekit. Here: chunking and caching do not change the bytes.
        let streamed = merge_in_memory("arcee_fusion", &p, Some(&a), &[&x], "w", 5, 0).unwrap();
        let cached = merge_in_memory("arcee_fusion", &p, Some(&a), &[&x], "w", 1 << 16, u64::MAX).unwrap();
        assert_eq!(streamed, cached);
        // (a + (x - a) need not round back to x: what is taken is what moved from the base)
        let taken: Vec<usize> = (0..rows * cols).filter(|&i| streamed[i] != a[i]).collect();
        assert_eq!(taken, (0..rows * cols).step_by(17).collect::<Vec<_>>());
    }

    #[test]
    fn two_models_are_an_error() {
        let p = Params { models: vec![Default::default(); 2], ..Default::default() };
        let e = ArceeFusion::from_params(&p).unwrap_err().to_string();
        assert!(e.contains("exactly one other model, but 2"), "{e}");
    }
}
