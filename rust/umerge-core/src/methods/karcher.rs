//! Karcher mean: the weighted Riemannian (Fréchet) mean of the models' directions on the unit
//! sphere, scaled by their mean norm; mergekit's `karcher` (`mergekit/merge_methods/karcher.py`,
//! mergekit 0.1.5; H. Karcher, 1977, "Riemannian center of mass and mollifier smoothing";
//! mergekit cites arXiv:2603.04972).
//!
//! Per tensor, for the N models' tensors x_i (all inputs alike: a base is one more model), with
//! alpha_i = 1/N, n_i = |x_i|, u_i = x_i / n_i, and the tolerance `tol` (default 1e-5):
//!
//! 1. the valid inputs are those with n_i > tol; none: the output is 0. Their weights are
//!    alpha_i renormalised to sum to 1 (a_i);
//! 2. start: mu = sum a_i u_i normalised (the first valid u_i when that sum's norm is < tol);
//! 3. up to `max_iter` (default 10) times: for each valid i, theta_i = acos(<mu, u_i>) (clamped);
//!    inputs with theta_i < tol are skipped; T = sum a_i (theta_i / sin theta_i) (u_i - <mu, u_i>
//!    mu). Stop when |T| < tol; else mu = cos|T| mu + sin|T| T/|T|, renormalised when its norm
//!    is > tol (the exponential map, one Riemannian gradient step);
//! 4. out = (sum_i alpha_i n_i) mu, over all N inputs.
//!
//! mu and T are always linear combinations of the inputs, so umerge runs the iteration on their
//! N coefficients: every dot product and norm above is a quadratic form in the inputs' Gram
//! matrix, which one per-tensor reduction pass gives (f64 sums over fixed blocks, `gram`). The
//! iteration then costs nothing per element, the tensor streams once for the Gram matrix and
//! once for the output (out = sum_i c_i x_i, float32), and no tensor is held whole, whatever
//! `max_iter`. mergekit iterates on float32 tensors; the two agree to float32 rounding of each
//! step, except that mergekit's float32 dot product rounds to 1 for angles below about 3e-4 (so
//! it skips those inputs) where umerge's f64 skips only angles below `tol`: at such small
//! angles the start is already the mean to O(theta^3), so the outputs differ by rounding only.
//!
//! An input exactly antipodal to the current mean (theta = pi, sin theta = 0) makes mergekit's
//! step divide by zero (NaN or a meaningless value); umerge reports it as an error naming the
//! tensor. A single model is returned as it is.

use crate::error::{Error, Result};
use crate::methods::{gram, BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "max_iter", per_model: false, default: "10", doc: "most Riemannian gradient steps (a whole number >= 0)" },
    ParamSpec {
        name: "tol",
        per_model: false,
        default: "1e-5",
        doc: "stop when the step is shorter; inputs with a norm or an angle to the mean below it are left out (>= 0)",
    },
];

/// mergekit's defaults.
pub const DEFAULT_MAX_ITER: f64 = 10.0;
/// The largest `max_iter` taken (a float32 scalar holds whole numbers exactly up to 2^24).
const MAX_ITER_LIMIT: f64 = 16_777_216.0;
/// mergekit's default tolerance.
pub const DEFAULT_TOL: f64 = 1e-5;

/// The Karcher mean.
#[derive(Debug, Clone, Copy)]
pub struct Karcher;

impl Karcher {
    /// The method takes no global options beyond its per-tensor parameters.
    pub fn from_params(_params: &Params) -> Result<Karcher> {
        Ok(Karcher)
    }
}

/// The output's coefficients c (out = sum_i c_i x_i) from the Gram matrix sums, or the reason
/// the mean is undefined. `max_iter` steps at most, tolerance `tol`.
pub fn coefficients(m: usize, sums: &[f64], max_iter: u32, tol: f64) -> std::result::Result<Vec<f64>, String> {
    let g = gram::matrix(m, sums);
    let n: Vec<f64> = (0..m).map(|i| g[i][i].max(0.0).sqrt()).collect();
    let alpha = 1.0 / m as f64;
    let scale: f64 = n.iter().map(|&ni| alpha * ni).sum();
    let valid: Vec<usize> = (0..m).filter(|&i| n[i] > tol).collect();
    let Some(&first) = valid.first() else { return Ok(vec![0.0; m]) };
    let a = 1.0 / valid.len() as f64; // alpha_i / sum of the valid alphas, all equal
                                      // u_i as a coefficient vector: e_i / n_i.
    let unit = |i: usize| -> Vec<f64> {
        let mut e = vec![0.0; m];
        e[i] = 1.0 / n[i];
        e
    };
    let mut mu = vec![0.0; m];
    for &i in &valid {
        mu[i] += a / n[i];
    }
    let mn = gram::norm(&g, &mu);
    if mn < tol {
        mu = unit(first);
    } else {
        mu.iter_mut().for_each(|c| *c /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; m];
        for &i in &valid {
            let u = unit(i);
            let dot = gram::form(&g, &mu, &u).clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let s = theta.sin();
            if dot <= -1.0 || s == 0.0 {
                return Err(format!(
                    "input {} points exactly away from the current mean (angle pi), so the Karcher mean is not unique; drop or change one of the antipodal models",
                    i + 1
                ));
            }
            let k = a * theta / s;
            for j in 0..m {
                tangent[j] += k * (u[j] - dot * mu[j]);
            }
        }
        let tn = gram::norm(&g, &tangent);
        if tn < tol {
            break;
        }
        let (c, s) = (tn.cos(), tn.sin() / tn);
        for (mj, tj) in mu.iter_mut().zip(&tangent) {
            *mj = c * *mj + s * tj;
        }
        let un = gram::norm(&g, &mu);
        if un > tol {
            mu.iter_mut().for_each(|c| *c /= un);
        }
    }
    Ok(mu.iter().map(|&c| scale * c).collect())
}

impl Method for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Unused
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    /// Scalars: [max_iter, tol].
    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let place = format!(" (tensor {})", t.name);
        let max_iter = t.global_number("max_iter", Some(DEFAULT_MAX_ITER))?;
        if max_iter < 0.0 || max_iter.fract() != 0.0 || max_iter > MAX_ITER_LIMIT {
            return Err(Error::Param { name: "max_iter".into(), reason: format!("{max_iter} is not a whole number in [0, 2^24]"), place });
        }
        let tol = t.global_number("tol", Some(DEFAULT_TOL))?;
        if tol < 0.0 {
            return Err(Error::Param { name: "tol".into(), reason: format!("{tol} is negative"), place });
        }
        let reductions = if m > 1 { gram::len(m) } else { 0 };
        Ok(TensorRecipe { trim: vec![None; m], scalars: vec![max_iter as f32, tol as f32], reductions, row: 0, score: None })
    }

    fn reduce(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        gram::accumulate(None, c.inputs, acc);
    }

    fn derive(&self, r: &TensorRecipe, tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        let m = r.trim.len();
        // tol as float32, as mergekit compares it with float32 norms and angles.
        coefficients(m, &sums, r.scalars[0] as u32, r.scalars[1] as f64).map_err(|reason| Error::Undefined {
            method: "karcher".into(),
            tensor: tensor.into(),
            reason,
        })
    }

    fn apply(&self, _r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        gram::apply_coefficients(s.tensor, None, c.inputs, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;

    fn p(m: usize) -> Params {
        Params { global: Default::default(), models: vec![Default::default(); m] }
    }

    #[test]
    fn two_directions_meet_halfway_and_keep_the_mean_norm() {
        // e1 and 3 e2: the geodesic midpoint (e1 + e2)/sqrt 2, scaled by (1 + 3)/2.
        let out = merge_in_memory("karcher", &p(2), None, &[&[1.0, 0.0], &[0.0, 3.0]], "t", 1, 0).unwrap();
        let h = std::f64::consts::SQRT_2 as f32;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn iterates_where_the_euclidean_mean_is_off() {
        // Three unit vectors in a plane at 0, 0 and 120 degrees: the Karcher mean lies at 40
        // degrees (the angles balance: 2 * 40 = 80), the normalised Euclidean mean at 30.
        let c = (120f64.to_radians().cos()) as f32;
        let s = (120f64.to_radians().sin()) as f32;
        let mut params = p(3);
        params.global.insert("max_iter".into(), crate::params::ParamValue::Number(100.0));
        params.global.insert("tol".into(), crate::params::ParamValue::Number(1e-9));
        let out = merge_in_memory("karcher", &params, None, &[&[1.0, 0.0], &[1.0, 0.0], &[c, s]], "t", 1, 0).unwrap();
        let angle = (out[1] as f64).atan2(out[0] as f64).to_degrees();
        assert!((angle - 40.0).abs() < 1e-4, "{angle} {out:?}");
        assert!(((out[0] as f64).hypot(out[1] as f64) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn zero_and_antipodal_inputs() {
        // All norms below tol: zeros. A zero input is left out of the direction but counts in
        // the scale: mean norm (0 + 2)/2 = 1 along e1.
        let out = merge_in_memory("karcher", &p(2), None, &[&[0.0, 0.0], &[1e-7, 0.0]], "t", 1, 0).unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
        let out = merge_in_memory("karcher", &p(2), None, &[&[0.0, 0.0], &[2.0, 0.0]], "t", 1, 0).unwrap();
        assert_eq!(out, vec![1.0, 0.0]);
        // a and -a: the mean starts at a (their sum is 0), then -a lies at angle pi: an error.
        let err = merge_in_memory("karcher", &p(2), None, &[&[1.0, 2.0], &[-1.0, -2.0]], "w", 1, 0).unwrap_err().to_string();
        assert!(err.contains("karcher cannot merge tensor w") && err.contains("antipodal"), "{err}");
    }
}
