//! NuSLERP: spherical interpolation between two models, or between their task vectors when a
//! base is given, over the whole tensor, its rows or its columns; mergekit's `nuslerp`
//! (`mergekit/merge_methods/nuslerp.py`, mergekit 0.1.5; slerp: Shoemake, 1985).
//!
//! With models x_0, x_1 and weights w_0, w_1: t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| <
//! 1e-6). The vectors are v_i = x_i - base with a base, else x_i. For each pair of vectors
//! (v_0, v_1), with n_i = max(|v_i|, 1e-7) and cos = <v_0, v_1> / (n_0 n_1) clamped to [-1, 1]:
//!
//! - collinear, 1 - cos^2 <= 1e-16 (mergekit's test with eps 1e-8, made in float32, where it
//!   holds exactly when cos^2 rounds to 1): r = (1 - t) v_0 + t v_1;
//! - otherwise, theta = acos(cos): r = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta);
//!
//! out = base + r (or r without a base). The coefficients apply to the vectors as they are (not
//! normalised), as in mergekit; a zero vector has cos 0 and weight sin(t pi/2) on the other.
//!
//! Which vectors (mergekit's `nuslerp_flatten`, default true, and `nuslerp_row_wise`):
//!
//! - flatten, or a tensor of fewer than 2 dimensions: the whole tensor is one vector. The three
//!   sums are per-tensor f64 reductions over fixed blocks;
//! - `nuslerp_row_wise: false`: each row along the last dimension is a vector (mergekit's
//!   `dim=-1`). The engine hands the apply pass whole rows, and each row's sums are f64 sums
//!   over that row; no statistics pass;
//! - `nuslerp_row_wise: true`: each vector runs along the first dimension (mergekit's `dim=0`,
//!   that is one vector per column of a matrix): element k belongs to vector k mod S, S =
//!   numel / `shape[0]`. That needs 3 S per-tensor sums, a reduction pass whose partial sums the
//!   engine keeps within the memory budget (an error naming the tensor when 3 S sums do not fit
//!   twice), turned into 3 S coefficients once per tensor ([`Method::derive`]).
//!
//! The sums are f64 where mergekit adds float32 values, so coefficients can differ in the last
//! float32 bits; the output is then computed in float32 in mergekit's order:
//! base + (a v_0 + b v_1) / d.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "weight",
        per_model: true,
        default: "1.0",
        doc: "weight of each of the two models: t = w_1 / (w_0 + w_1) (0.5 when they sum to about 0)",
    },
    ParamSpec {
        name: "nuslerp_flatten",
        per_model: false,
        default: "true",
        doc: "one vector per tensor (false: per row, or per column with nuslerp_row_wise)",
    },
    ParamSpec {
        name: "nuslerp_row_wise",
        per_model: false,
        default: "false",
        doc: "without flatten: vectors along the first dimension (mergekit's dim 0, a matrix's columns) instead of the last",
    },
];

/// mergekit's lower bound on a vector's norm when normalising (`_normalize`'s eps).
pub const NORM_EPS: f64 = 1e-7;
/// mergekit's collinearity bound: 1 - cos^2 <= EPS^2 (its `eps`).
pub const EPS: f32 = 1e-8;

/// Which vectors a tensor is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vectors {
    /// The whole tensor.
    Tensor,
    /// Rows along the last dimension (contiguous).
    Rows,
    /// Vectors along the first dimension (strided, one per index of the other dimensions).
    Columns,
}

/// NuSLERP of two models.
#[derive(Debug, Clone, Copy)]
pub struct NuSlerp {
    /// mergekit's `nuslerp_flatten`.
    pub flatten: bool,
    /// mergekit's `nuslerp_row_wise`.
    pub row_wise: bool,
}

impl NuSlerp {
    /// Checks the model count and reads the two flags.
    pub fn from_params(params: &Params) -> Result<NuSlerp> {
        if params.models.len() != 2 {
            return Err(Error::Spec(format!(
                "nuslerp interpolates between exactly two models (with an optional base), but {} were given",
                params.models.len()
            )));
        }
        let flag = |k: &str, d: bool| params.flag(k, d).map_err(|r| Error::Param { name: k.into(), reason: r, place: String::new() });
        Ok(NuSlerp { flatten: flag("nuslerp_flatten", true)?, row_wise: flag("nuslerp_row_wise", false)? })
    }

    /// How a tensor of this shape is cut into vectors.
    pub fn vectors(&self, shape: &[usize]) -> Vectors {
        if self.flatten || shape.len() < 2 {
            Vectors::Tensor
        } else if self.row_wise {
            Vectors::Columns
        } else {
            Vectors::Rows
        }
    }
}

/// The interpolation factor from the two weights (mergekit's, in f64).
pub fn factor(w0: f64, w1: f64) -> f64 {
    let total = w0 + w1;
    if total.abs() < 1e-6 {
        0.5
    } else {
        w1 / total
    }
}

/// The coefficients (a, b, d) of one pair of vectors, out = (a v_0 + b v_1) / d, from the sums
/// v_0.v_0, v_1.v_1, v_0.v_1; `one_minus_t` and `t` as float32 (mergekit multiplies its float32
/// tensors by them). d is 1 in the collinear case, which changes no bit.
pub fn coefficients(one_minus_t: f32, t: f32, aa: f64, bb: f64, ab: f64) -> [f32; 3] {
    let n0 = aa.sqrt().max(NORM_EPS);
    let n1 = bb.sqrt().max(NORM_EPS);
    let cos = (ab / (n0 * n1)).clamp(-1.0, 1.0);
    let c = cos as f32;
    if 1.0 - c * c <= EPS * EPS {
        return [one_minus_t, t, 1.0];
    }
    let theta = cos.acos();
    [(one_minus_t as f64 * theta).sin() as f32, (t as f64 * theta).sin() as f32, theta.sin() as f32]
}

/// v_i = x_i - base (float32, as mergekit subtracts), or x_i without a base.
#[inline(always)]
fn vector(x: f32, base: Option<f32>) -> f32 {
    match base {
        Some(b) => x - b,
        None => x,
    }
}

/// base + (a v_0 + b v_1) / d for one element.
#[inline(always)]
fn combine(k: &[f32; 3], x0: f32, x1: f32, base: Option<f32>) -> f32 {
    let r = (k[0] * vector(x0, base) + k[1] * vector(x1, base)) / k[2];
    match base {
        Some(b) => b + r,
        None => r,
    }
}

/// The three sums of one pair of contiguous vectors (or of one chunk of the whole tensor).
fn sums(x0: &[f32], x1: &[f32], base: Option<&[f32]>) -> [f64; 3] {
    let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
    for k in 0..x0.len() {
        let b = base.map(|b| b[k]);
        let (v0, v1) = (vector(x0[k], b) as f64, vector(x1[k], b) as f64);
        aa += v0 * v0;
        bb += v1 * v1;
        ab += v0 * v1;
    }
    [aa, bb, ab]
}

impl Method for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Optional
    }

    /// Raw values: the vectors are formed here, so that a single model passes through unchanged.
    fn uses_deltas(&self) -> bool {
        false
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let mut w = [1.0f64; 2];
        for (slot, wi) in w.iter_mut().enumerate().take(m) {
            *wi = t.model_number(slot, "weight", Some(1.0))?;
        }
        let tt = factor(w[0], w[1]);
        let scalars = vec![(1.0 - tt) as f32, tt as f32];
        let trim = vec![None; m];
        Ok(match self.vectors(t.shape) {
            Vectors::Tensor => TensorRecipe { trim, scalars, reductions: 3, row: 0, score: None },
            Vectors::Rows => TensorRecipe { trim, scalars, reductions: 0, row: (*t.shape.last().unwrap_or(&1) as u64).max(1), score: None },
            Vectors::Columns => {
                let s = t.numel() / (t.shape[0] as u64).max(1);
                let reductions = usize::try_from(3 * s).map_err(|_| Error::Budget {
                    tensor: t.name.into(),
                    what: "nuslerp's per-column sums".into(),
                    need: 3 * s * 8,
                    allowed: usize::MAX as u64,
                })?;
                TensorRecipe { trim, scalars, reductions, row: 0, score: None }
            }
        })
    }

    /// Per vector: v_0.v_0, v_1.v_1, v_0.v_1 (vector k mod S for element k; S = 1 for the whole
    /// tensor).
    fn reduce(&self, r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let [x0, x1] = c.inputs else { return };
        let s = r.reductions / 3;
        if s == 0 {
            return;
        }
        if s == 1 {
            let [aa, bb, ab] = sums(x0, x1, c.base);
            acc[0] += aa;
            acc[1] += bb;
            acc[2] += ab;
            return;
        }
        let mut j = (c.start % s as u64) as usize;
        for k in 0..x0.len() {
            let b = c.base.map(|b| b[k]);
            let (v0, v1) = (vector(x0[k], b) as f64, vector(x1[k], b) as f64);
            acc[3 * j] += v0 * v0;
            acc[3 * j + 1] += v1 * v1;
            acc[3 * j + 2] += v0 * v1;
            j += 1;
            if j == s {
                j = 0;
            }
        }
    }

    /// Each vector's three sums become its three coefficients (a, b, d).
    fn derive(&self, r: &TensorRecipe, _tensor: &str, mut sums: Vec<f64>) -> Result<Vec<f64>> {
        let (one_minus_t, t) = (r.scalars[0], r.scalars[1]);
        for v in sums.chunks_mut(3) {
            let k = coefficients(one_minus_t, t, v[0], v[1], v[2]);
            for (o, k) in v.iter_mut().zip(k) {
                *o = k as f64;
            }
        }
        Ok(sums)
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let [x0, x1] = c.inputs else {
            // One of the two models lacks the tensor: it passes through from the other (mergekit's
            // passthrough of a single input).
            if let Some(x) = c.inputs.first() {
                out.copy_from_slice(x);
            }
            return;
        };
        let at = |k: usize| c.base.map(|b| b[k]);
        if r.row > 0 {
            let row = r.row as usize;
            for (ri, o) in out.chunks_mut(row).enumerate() {
                let (lo, hi) = (ri * row, ri * row + o.len());
                let [aa, bb, ab] = sums(&x0[lo..hi], &x1[lo..hi], c.base.map(|b| &b[lo..hi]));
                let k = coefficients(r.scalars[0], r.scalars[1], aa, bb, ab);
                for (j, o) in o.iter_mut().enumerate() {
                    *o = combine(&k, x0[lo + j], x1[lo + j], at(lo + j));
                }
            }
            return;
        }
        let coef = |j: usize| [s.tensor[3 * j] as f32, s.tensor[3 * j + 1] as f32, s.tensor[3 * j + 2] as f32];
        let n = s.tensor.len() / 3;
        if n == 1 {
            let k = coef(0);
            for (j, o) in out.iter_mut().enumerate() {
                *o = combine(&k, x0[j], x1[j], at(j));
            }
            return;
        }
        let mut col = (c.start % n as u64) as usize;
        for (j, o) in out.iter_mut().enumerate() {
            *o = combine(&coef(col), x0[j], x1[j], at(j));
            col += 1;
            if col == n {
                col = 0;
            }
        }
    }

    fn describe(&self) -> String {
        format!("nuslerp (flatten {}, row_wise {})", self.flatten, self.row_wise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    fn p(w0: f64, w1: f64) -> Params {
        let models = [w0, w1].iter().map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect()).collect();
        Params { models, ..Default::default() }
    }

    #[test]
    fn orthogonal_and_collinear_pairs_by_hand() {
        // e1, e2 at t = 0.5: theta = pi/2, both coefficients sin(pi/4).
        let h = std::f64::consts::FRAC_1_SQRT_2 as f32;
        let out = merge_in_memory("nuslerp", &p(1.0, 1.0), None, &[&[1.0, 0.0], &[0.0, 1.0]], "t", 1, 0).unwrap();
        assert!((out[0] - h).abs() < 1e-7 && (out[1] - h).abs() < 1e-7, "{out:?}");
        // Parallel (2 e1 and e1), t = 3/4: linear, 0.25 * 2 + 0.75 * 1.
        let out = merge_in_memory("nuslerp", &p(1.0, 3.0), None, &[&[2.0, 0.0], &[1.0, 0.0]], "t", 1, 0).unwrap();
        assert_eq!(out, vec![1.25, 0.0]);
        // Antiparallel is collinear too: 0.5 * 1 + 0.5 * (-3).
        let out = merge_in_memory("nuslerp", &p(2.0, 2.0), None, &[&[1.0, 0.0], &[-3.0, 0.0]], "t", 1, 0).unwrap();
        assert_eq!(out, vec![-1.0, 0.0]);
        // Weights summing to 0: t = 0.5. A zero vector: cos 0, the other gets sin(pi/4).
        let out = merge_in_memory("nuslerp", &p(1.0, -1.0), None, &[&[0.0, 0.0], &[0.0, 2.0]], "t", 1, 0).unwrap();
        assert!(out[0] == 0.0 && (out[1] - 2.0 * h).abs() < 1e-6, "{out:?}");
        // With a base: slerp of the task vectors, added back.
        let base = [1.0f32, 1.0];
        let out = merge_in_memory("nuslerp", &p(1.0, 1.0), Some(&base), &[&[2.0, 1.0], &[1.0, 2.0]], "t", 1, 0).unwrap();
        assert!((out[0] - (1.0 + h)).abs() < 1e-6 && (out[1] - (1.0 + h)).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn rows_and_columns_take_their_own_angles() {
        // [[1, 0], [0, 1]] and [[0, 1], [0, 1]]: rows: (e1, e2) orthogonal, (e2, e2) collinear;
        // columns: ((1, 0), (0, 0)) -> cos 0, ((0, 1), (1, 1)) -> 45 degrees.
        let x0 = [1.0f32, 0.0, 0.0, 1.0];
        let x1 = [0.0f32, 1.0, 0.0, 1.0];
        let h = std::f64::consts::FRAC_1_SQRT_2 as f32;
        let run = |row_wise: bool| {
            let m = NuSlerp { flatten: false, row_wise };
            let shape = [2usize, 2];
            let params = p(1.0, 1.0);
            let ctx = TensorCtx {
                name: "w",
                shape: &shape,
                pos: crate::params::TensorPos { name: "w", t: 0.0 },
                params: &params,
                models: &[0, 1],
            };
            let r = m.plan_tensor(&ctx).unwrap();
            let c = Chunk { tensor: "w", start: 0, base: None, inputs: &[&x0, &x1] };
            let mut acc = vec![0f64; r.reductions];
            if r.reductions > 0 {
                m.reduce(&r, &c, &mut acc);
                acc = m.derive(&r, "w", acc).unwrap();
            }
            let st = acc;
            let mut out = [0f32; 4];
            m.apply(&r, &Stats { tensor: &st, global: &[] }, &c, &mut out);
            out
        };
        let rows = run(false);
        assert!((rows[0] - h).abs() < 1e-7 && (rows[1] - h).abs() < 1e-7 && rows[2] == 0.0 && rows[3] == 1.0, "{rows:?}");
        let cols = run(true);
        // column 0: (1, 0) and (0, 0): sin(pi/4) (1, 0); column 1: (0, 1) and (1, 1) at pi/4.
        let theta = std::f64::consts::FRAC_PI_4;
        let (a, b) = (((0.5 * theta).sin() / theta.sin()) as f32, ((0.5 * theta).sin() / theta.sin()) as f32);
        assert!((cols[0] - h).abs() < 1e-7 && cols[2] == 0.0, "{cols:?}");
        assert!((cols[1] - b).abs() < 1e-6 && (cols[3] - (a + b)).abs() < 1e-6, "{cols:?}");
    }
}
