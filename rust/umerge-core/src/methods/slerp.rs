//! Spherical linear interpolation between the base and one other model (Shoemake, 1985), per
//! tensor, as mergekit's `slerp`.
//!
//! For a tensor flattened to vectors a (base) and b (the model), with norms |a|, |b| (a norm
//! <= 1e-8 is taken as 1) and dot = <a/|a|, b/|b|> clamped to [-1, 1]:
//! when |dot| > 0.9995 (nearly collinear) out = (1 - t) a + t b; otherwise, with
//! theta = acos(dot), out = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b.
//! t = 0 gives the base. The norms and the dot product are f64 sums over fixed blocks (a
//! statistics pass), so the coefficients do not depend on chunking or threads; the output is
//! computed in f32 as mergekit does.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "t",
    per_model: false,
    default: "required",
    doc: "interpolation factor: 0 gives the base, 1 the other model (a number, gradient or filter rules)",
}];

/// Threshold on |dot| above which slerp falls back to linear interpolation (mergekit's).
pub const DOT_THRESHOLD: f64 = 0.9995;

/// SLERP between the base and one model.
#[derive(Debug, Clone, Copy)]
pub struct Slerp;

impl Slerp {
    /// Checks that exactly one model besides the base is given.
    pub fn from_params(params: &Params) -> Result<Slerp> {
        if params.models.len() != 1 {
            return Err(Error::Spec(format!(
                "slerp interpolates between the base and exactly one other model, but {} models were given",
                params.models.len()
            )));
        }
        Ok(Slerp)
    }
}

/// The two coefficients (of the base and of the model) from the sums a.a, b.b, a.b.
pub fn coefficients(t: f32, aa: f64, bb: f64, ab: f64) -> (f32, f32) {
    let na = aa.sqrt();
    let nb = bb.sqrt();
    let na = if na > 1e-8 { na } else { 1.0 };
    let nb = if nb > 1e-8 { nb } else { 1.0 };
    let dot = (ab / (na * nb)).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        let t = t as f64;
        (((1.0 - t) * theta).sin() as f32 / s as f32, (t * theta).sin() as f32 / s as f32)
    }
}

impl Method for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
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
        Ok(TensorRecipe { trim: vec![None; t.models.len()], scalars: vec![tt as f32], reductions: 3, row: 0, score: None })
    }

    fn reduce(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let (Some(a), Some(b)) = (c.base, c.inputs.first()) else { return };
        let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(b.iter()) {
            let (x, y) = (x as f64, y as f64);
            aa += x * x;
            bb += y * y;
            ab += x * y;
        }
        acc[0] += aa;
        acc[1] += bb;
        acc[2] += ab;
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let (Some(a), Some(b)) = (c.base, c.inputs.first()) else {
            // A tensor the model lacks: keep the base (t applies to nothing).
            if let Some(a) = c.base {
                out.copy_from_slice(a);
            }
            return;
        };
        let (ca, cb) = coefficients(r.scalars[0], s.tensor[0], s.tensor[1], s.tensor[2]);
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b.iter()) {
            *o = ca * x + cb * y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;
    use crate::params::ParamValue;

    fn p(t: f64) -> Params {
        let mut p = Params::default();
        p.global.insert("t".into(), ParamValue::Number(t));
        p.models = vec![Default::default()];
        p
    }

    #[test]
    fn orthogonal_unit_vectors_by_hand() {
        // a = e1, b = e2: theta = pi/2, at t = 0.5 both coefficients are sin(pi/4)/1.
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let out = merge_in_memory("slerp", &p(0.5), Some(&a), &[&b], "t", 1, 0).unwrap();
        let h = std::f64::consts::FRAC_1_SQRT_2 as f32;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6, "{out:?}");
        // t = 0 is the base, t = 1 the model.
        assert_eq!(merge_in_memory("slerp", &p(0.0), Some(&a), &[&b], "t", 1, 0).unwrap(), vec![1.0, 0.0]);
        let one = merge_in_memory("slerp", &p(1.0), Some(&a), &[&b], "t", 1, 0).unwrap();
        assert!(one[0].abs() < 1e-7 && (one[1] - 1.0).abs() < 1e-6, "{one:?}");
        // Collinear: linear interpolation.
        let c = [2.0f32, 0.0];
        assert_eq!(merge_in_memory("slerp", &p(0.25), Some(&a), &[&c], "t", 1, 0).unwrap(), vec![1.25, 0.0]);
    }
}
