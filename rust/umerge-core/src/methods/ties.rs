//! TIES merging: trim, elect sign, disjoint merge (Yadav et al., 2023, "TIES-Merging: Resolving
//! Interference When Merging Models", arXiv:2306.01708), with the three variants people check
//! against as presets.
//!
//! For task vectors d_i = x_i - base, weights w_i and scale lambda:
//!
//! 1. **trim**: keep the k largest |d_i| of each input (k = floor(density_i * n)), zero the rest
//!    (see `select`; done by the executor from the recipe's [`Trim`]s).
//! 2. **elect sign** per element: s = sum of the inputs (which inputs: see the table); the
//!    elected sign is + when s >= 0, else - (the paper: sign(s), and s = 0 takes the sign held by
//!    most elements of the whole model).
//! 3. **disjoint merge** per element: average the inputs whose sign equals the elected one, then
//!    out = base + lambda * average.
//!
//! | preset | trim | sign elected on | average divides by |
//! |---|---|---|---|
//! | `mergekit` (default) | per tensor, exact k | weighted deltas w_i d_i | sum of agreeing w_i (0 -> 1) |
//! | `peft` | per tensor, exact k | unweighted d_i (`majority_sign`: total or frequency) | count of agreeing (min 1) |
//! | `paper` | whole model, threshold = kthvalue, ties kept | unweighted d_i, zero -> model majority | count of agreeing (min 1) |
//!
//! In `peft` and `paper` the weights multiply the deltas before averaging (PEFT's
//! `ties(task_tensors, weights, density)`; the paper has no weights, i.e. all 1). "Agreeing"
//! means sign(x) equals the elected sign, so zero entries never count (torch.sign(0) = 0).
//!
//! The election and the disjoint mean run in the task-vector kernel (`task_vector.rs`, shared
//! with `dare_ties` and the other consensus methods); this file maps each preset to its rule
//! ([`consensus`]) and plans the trims.

use crate::error::{Error, Result};
use crate::methods::task_vector::{self, Consensus, Elect, ElectOn, Mean};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe, Trim, TrimRule, TrimScope};
use crate::params::Params;

/// The TIES variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// mergekit's `ties` (generalized task arithmetic with sign consensus "sum").
    Mergekit,
    /// PEFT's `peft.utils.merge_utils.ties`.
    Peft,
    /// The TIES paper's reference code (global trimming).
    Paper,
}

/// How PEFT elects the sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MajoritySign {
    /// Sign of the sum of values.
    Total,
    /// Sign of the sum of signs (a vote).
    Frequency,
}

/// TIES with a preset.
#[derive(Debug, Clone, Copy)]
pub struct Ties {
    /// Which variant.
    pub preset: Preset,
    /// PEFT's majority-sign method (used by the peft preset).
    pub majority: MajoritySign,
    /// Divide the agreeing sum by the agreeing weights (mergekit's `normalize`, default true);
    /// false only with the mergekit preset.
    pub normalize: bool,
}

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "density",
        per_model: true,
        default: "required",
        doc: "fraction of each task vector's entries kept, by magnitude: k = floor(density * n), in (0, 1]",
    },
    ParamSpec { name: "weight", per_model: true, default: "1.0", doc: "weight of each model's task vector" },
    ParamSpec { name: "lambda", per_model: false, default: "1.0", doc: "scale of the merged task vector added to the base" },
    ParamSpec {
        name: "preset",
        per_model: false,
        default: "mergekit",
        doc: "mergekit | peft | paper: which published variant (sign election, divisor, trim scope)",
    },
    ParamSpec {
        name: "majority_sign",
        per_model: false,
        default: "total",
        doc: "peft preset: total (sign of the sum) or frequency (sign of the vote)",
    },
    ParamSpec {
        name: "normalize",
        per_model: false,
        default: "true",
        doc:
            "mergekit preset: divide the agreeing sum by the agreeing weights (false: the plain agreeing sum, mergekit's normalize: false)",
    },
];

pub use crate::methods::task_vector::sign;

/// The consensus of a preset (see the module doc's table); `model_majority` is the paper's
/// sign for elements whose sum is 0.
pub fn consensus(preset: Preset, majority: MajoritySign, model_majority: f32) -> Consensus {
    match preset {
        Preset::Mergekit => Consensus { elect_on: ElectOn::Values, elect: Elect::PlusOrMinus, mean: Mean::AgreeingWeights },
        Preset::Peft => Consensus {
            elect_on: match majority {
                MajoritySign::Total => ElectOn::Values,
                MajoritySign::Frequency => ElectOn::Signs,
            },
            elect: Elect::PlusOrMinus,
            mean: Mean::AgreeingCount,
        },
        Preset::Paper => {
            Consensus { elect_on: ElectOn::Values, elect: Elect::SignOrModelMajority(model_majority), mean: Mean::NonzeroAgreeing }
        }
    }
}

/// The apply pass: `out = base + lambda * merged_delta` over trimmed deltas, by the task-vector
/// kernel ([`task_vector::merge_with_consensus`]) with the preset's [`consensus`] (the agreeing
/// sum divided as the preset says, or not divided when `normalize` is false). The tests check it
/// bit for bit against per-element definitions of the three presets.
#[allow(clippy::too_many_arguments)]
pub fn apply_tiled(
    preset: Preset,
    majority: MajoritySign,
    model_majority: f32,
    normalize: bool,
    lambda: f32,
    weights: &[f32],
    base: Option<&[f32]>,
    inputs: &[&[f32]],
    out: &mut [f32],
) {
    task_vector::merge_with_consensus(consensus(preset, majority, model_majority), normalize, lambda, weights, base, inputs, out);
}

impl Ties {
    /// Reads `preset` and `majority_sign` from the merge's global parameters.
    pub fn from_params(params: &Params) -> Result<Ties> {
        let perr = |name: &str, reason: String| Error::Param { name: name.into(), reason, place: String::new() };
        let preset = match params.text("preset", "mergekit").map_err(|r| perr("preset", r))?.as_str() {
            "mergekit" => Preset::Mergekit,
            "peft" => Preset::Peft,
            "paper" => Preset::Paper,
            other => return Err(perr("preset", format!("{other:?} is not one of mergekit, peft, paper"))),
        };
        let majority = match params.text("majority_sign", "total").map_err(|r| perr("majority_sign", r))?.as_str() {
            "total" => MajoritySign::Total,
            "frequency" => MajoritySign::Frequency,
            other => return Err(perr("majority_sign", format!("{other:?} is not one of total, frequency"))),
        };
        if majority == MajoritySign::Frequency && preset != Preset::Peft {
            return Err(perr("majority_sign", "only the peft preset takes majority_sign".into()));
        }
        let normalize = params.flag("normalize", true).map_err(|r| perr("normalize", r))?;
        if !normalize && preset != Preset::Mergekit {
            return Err(perr(
                "normalize",
                "false is mergekit's variant: only the mergekit preset takes it (PEFT and the paper always average)".into(),
            ));
        }
        if preset == Preset::Paper {
            // Global trimming needs one density per model, not one per tensor.
            for (i, m) in params.models.iter().enumerate() {
                if let Some(v) = m.get("density").or(params.global.get("density")) {
                    if !v.is_uniform() {
                        return Err(Error::Param {
                            name: "density".into(),
                            reason: "the paper preset trims over the whole model, so density must be one number per model".into(),
                            place: format!(" (model {})", i + 1),
                        });
                    }
                }
            }
        }
        Ok(Ties { preset, majority, normalize })
    }
}

impl Method for Ties {
    fn name(&self) -> &'static str {
        "ties"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let lambda = t.global_number("lambda", Some(1.0))?;
        let mut scalars = vec![lambda as f32];
        let mut trim = Vec::with_capacity(t.models.len());
        for slot in 0..t.models.len() {
            let density = t.model_number(slot, "density", None)?;
            if !(density > 0.0 && density <= 1.0) {
                return Err(Error::Param {
                    name: "density".into(),
                    reason: format!("{density} is outside (0, 1]: it is the fraction of entries kept"),
                    place: format!(" (model {}, tensor {})", t.models[slot] + 1, t.name),
                });
            }
            let weight = t.model_number(slot, "weight", Some(1.0))?;
            scalars.push(weight as f32);
            trim.push(Some(match self.preset {
                Preset::Mergekit | Preset::Peft => Trim::top(density, TrimScope::Tensor, TrimRule::ExactK),
                Preset::Paper => Trim::top(density, TrimScope::Model, TrimRule::PaperKth),
            }));
        }
        Ok(TensorRecipe { trim, scalars, reductions: 0, row: 0, score: None })
    }

    fn global_reductions(&self) -> usize {
        usize::from(self.preset == Preset::Paper)
    }

    /// Paper: counts sign(sum_i d_i) over every element of the model (+1 / -1 / 0), after trimming;
    /// the sign of that count is the majority sign given to elements whose sum is 0.
    fn reduce_global(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let n = c.len();
        let mut count = 0i64;
        for j in 0..n {
            let mut s = 0.0f32;
            for x in c.inputs {
                s += x[j];
            }
            count += sign(s) as i64;
        }
        acc[0] += count as f64;
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let model_majority = s.global.first().map(|&g| sign(g as f32)).unwrap_or(0.0);
        apply_tiled(self.preset, self.majority, model_majority, self.normalize, r.scalars[0], &r.scalars[1..], c.base, c.inputs, out);
    }

    fn describe(&self) -> String {
        match self.preset {
            Preset::Mergekit if self.normalize => "ties (preset mergekit)".into(),
            Preset::Mergekit => "ties (preset mergekit, normalize false)".into(),
            Preset::Peft => {
                format!("ties (preset peft, majority_sign {})", if self.majority == MajoritySign::Total { "total" } else { "frequency" })
            }
            Preset::Paper => "ties (preset paper)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Per-element definitions of the three presets, the reference of the tiled kernel.

    /// Elected sign from a sum: + when `s >= 0` (mergekit, PEFT), else -.
    fn elect_from_sum(s: f32) -> f32 {
        if s >= 0.0 {
            1.0
        } else {
            -1.0
        }
    }

    /// mergekit step at one element: `vals[i] = w_i * d_i` (trimmed). Returns the merged delta
    /// sum(agreeing w_i d_i) / sum(agreeing w_i), the divisor replaced by 1 when it is 0.
    fn disjoint_mergekit(vals: &[f32], weights: &[f32]) -> f32 {
        let mut s = 0.0f32;
        for &v in vals {
            s += v;
        }
        let maj = elect_from_sum(s);
        let mut mixed = 0.0f32;
        let mut div = 0.0f32;
        for (&v, &w) in vals.iter().zip(weights) {
            if sign(v) == maj {
                mixed += v;
                div += w;
            }
        }
        if div == 0.0 {
            div = 1.0;
        }
        mixed / div
    }

    /// PEFT step at one element: `d` trimmed deltas (unweighted). Sign elected on d (total or
    /// frequency), then sum(agreeing w_i d_i) / max(count agreeing, 1).
    fn disjoint_peft(d: &[f32], weights: &[f32], majority: MajoritySign) -> f32 {
        let mut s = 0.0f32;
        for &v in d {
            s += match majority {
                MajoritySign::Total => v,
                MajoritySign::Frequency => sign(v),
            };
        }
        let maj = elect_from_sum(s);
        let mut mixed = 0.0f32;
        let mut count = 0.0f32;
        for (&v, &w) in d.iter().zip(weights) {
            if sign(v) == maj {
                mixed += v * w;
                count += 1.0;
            }
        }
        mixed / count.max(1.0)
    }

    /// Paper step at one element: elected sign = sign(sum d_i), or `model_majority` when that is 0;
    /// keep d_i > 0 when the elected sign is positive, else d_i < 0; average the kept w_i d_i over
    /// the number of nonzero kept entries (min 1).
    fn disjoint_paper(d: &[f32], weights: &[f32], model_majority: f32) -> f32 {
        let mut s = 0.0f32;
        for &v in d {
            s += v;
        }
        let mut sg = sign(s);
        if sg == 0.0 {
            sg = model_majority;
        }
        let mut mixed = 0.0f32;
        let mut count = 0.0f32;
        for (&v, &w) in d.iter().zip(weights) {
            let keep = if sg > 0.0 { v > 0.0 } else { v < 0.0 };
            if keep {
                let x = v * w;
                mixed += x;
                if x != 0.0 {
                    count += 1.0;
                }
            }
        }
        mixed / count.max(1.0)
    }

    #[test]
    fn mergekit_step_by_hand() {
        // d = [2, -1, 3] with weights [1, 1, 0.5] -> wd = [2, -1, 1.5], sum 2.5 >= 0: +
        // agreeing: 2 and 1.5; divisor 1 + 0.5 -> 3.5 / 1.5
        let w = [1.0, 1.0, 0.5];
        let v = [2.0, -1.0, 1.5];
        assert!((disjoint_mergekit(&v, &w) - 3.5 / 1.5).abs() < 1e-6);
        // sum exactly 0 elects +.
        assert_eq!(disjoint_mergekit(&[1.0, -1.0], &[1.0, 1.0]), 1.0);
        // all zero: divisor 0 -> 1, result 0.
        assert_eq!(disjoint_mergekit(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn peft_step_by_hand() {
        // d = [2, -3, 0.5], w = [2, 1, 1]: total sum -0.5 -> -, agreeing only -3 -> (-3*1)/1
        assert_eq!(disjoint_peft(&[2.0, -3.0, 0.5], &[2.0, 1.0, 1.0], MajoritySign::Total), -3.0);
        // frequency: signs +,-,+ -> +; agreeing 2 and 0.5: (4 + 0.5)/2
        assert_eq!(disjoint_peft(&[2.0, -3.0, 0.5], &[2.0, 1.0, 1.0], MajoritySign::Frequency), 2.25);
    }

    #[test]
    fn tiled_kernel_equals_step_functions_bitwise() {
        let mut st = 12345u64;
        let mut rnd = || {
            st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((st >> 40) as i32 % 7 - 3) as f32 * 0.25; // small set: exact zeros and ties
            if (st >> 20).is_multiple_of(5) {
                v
            } else {
                ((st >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            }
        };
        let n = 2500;
        let m = 3;
        let base: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let xs: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| rnd()).collect()).collect();
        let views: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let w = [1.0f32, -0.5, 0.75];
        for (preset, maj) in [
            (Preset::Mergekit, MajoritySign::Total),
            (Preset::Peft, MajoritySign::Total),
            (Preset::Peft, MajoritySign::Frequency),
            (Preset::Paper, MajoritySign::Total),
        ] {
            let mut out = vec![0f32; n];
            apply_tiled(preset, maj, -1.0, true, 0.7, &w, Some(&base), &views, &mut out);
            for j in 0..n {
                let d: Vec<f32> = xs.iter().map(|x| x[j]).collect();
                let delta = match preset {
                    Preset::Mergekit => {
                        let v: Vec<f32> = d.iter().zip(&w).map(|(a, b)| a * b).collect();
                        disjoint_mergekit(&v, &w)
                    }
                    Preset::Peft => disjoint_peft(&d, &w, maj),
                    Preset::Paper => disjoint_paper(&d, &w, -1.0),
                };
                assert_eq!(out[j].to_bits(), (base[j] + delta * 0.7).to_bits(), "{preset:?} j={j}");
            }
        }
    }

    #[test]
    fn mergekit_without_normalize_is_the_agreeing_weighted_sum() {
        // wd = [2, -1, 1.5] (d = [2, -1, 3], w = [1, 1, 0.5]): + elected, 2 + 1.5 not divided.
        let (d0, d1, d2) = ([2.0f32], [-1.0f32], [3.0f32]);
        let (w, base) = ([1.0f32, 1.0, 0.5], [0.25f32]);
        let mut out = [0f32];
        apply_tiled(Preset::Mergekit, MajoritySign::Total, 0.0, false, 0.5, &w, Some(&base), &[&d0, &d1, &d2], &mut out);
        assert_eq!(out, [0.25 + 0.5 * 3.5]);
        let mut p = Params::default();
        p.global.insert("normalize".into(), crate::params::ParamValue::Bool(false));
        assert!(Ties::from_params(&p).is_ok_and(|t| !t.normalize));
        p.global.insert("preset".into(), crate::params::ParamValue::Text("peft".into()));
        let err = Ties::from_params(&p).unwrap_err().to_string();
        assert!(err.contains("only the mergekit preset"), "{err}");
    }

    #[test]
    fn a_nan_sum_elects_no_sign_in_the_mergekit_and_peft_presets() {
        // Only reachable with allow_nonfinite. The presets keep none of the element's values;
        // mergekit's own rule (Consensus::MERGEKIT, the `*_ties` methods) elects - instead.
        let (d0, d1) = ([f32::NAN], [-2.0f32]);
        let (w, base) = ([1.0f32, 1.0], [0.5f32]);
        for (preset, maj) in [(Preset::Mergekit, MajoritySign::Total), (Preset::Peft, MajoritySign::Total)] {
            let mut out = [0f32];
            apply_tiled(preset, maj, 0.0, true, 1.0, &w, Some(&base), &[&d0, &d1], &mut out);
            assert_eq!(out, [0.5], "{preset:?}");
        }
        let mut out = [0f32];
        task_vector::merge_with_consensus(Consensus::MERGEKIT, true, 1.0, &w, Some(&base), &[&d0, &d1], &mut out);
        assert_eq!(out, [-1.5]);
    }

    #[test]
    fn paper_step_by_hand() {
        // sum 0 -> model majority -1: keep negatives only.
        assert_eq!(disjoint_paper(&[1.0, -1.0], &[1.0, 1.0], -1.0), -1.0);
        assert_eq!(disjoint_paper(&[1.0, -1.0], &[1.0, 1.0], 1.0), 1.0);
        // model majority 0: sign stays 0, the paper's where(sign > 0, x > 0, x < 0) keeps negatives.
        assert_eq!(disjoint_paper(&[1.0, -1.0], &[1.0, 1.0], 0.0), -1.0);
        assert_eq!(disjoint_paper(&[3.0, 1.0, -1.0], &[1.0, 1.0, 1.0], 0.0), 2.0);
    }
}
