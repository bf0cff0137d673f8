//! Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic",
//! arXiv:2212.04089) and the shared kernel of the task-vector family that mergekit calls
//! "generalized task arithmetic": `task_arithmetic`, `magnitude_prune`, `dare_linear`,
//! `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear` (see
//! `magnitude_prune.rs`, `dare.rs`, `breadcrumbs.rs`, `della.rs`).
//!
//! For task vectors d_i = x_i - base, weights w_i and scale lambda, per element:
//!
//! 1. **sparsify** each d_i: none (task arithmetic); keep the top k = floor(density * n)
//!    magnitudes of the tensor (magnitude pruning; done by the executor from the recipe's
//!    [`Trim`]), optionally after dropping the largest gamma * n as outliers (breadcrumbs);
//!    or keep each entry independently with probability density (DARE's Bernoulli mask, drawn
//!    from the counter-based generator in `rng`), or with a probability that grows with the
//!    entry's magnitude rank in its row (DELLA), and rescale the kept entries ([`Rescale`]);
//! 2. **weight**: v_i = w_i * d_i;
//! 3. **combine**: without consensus, m = sum_i v_i and divisor D = sum_i w_i (|D| < 1e-8 -> 1);
//!    with consensus (TIES sign election, mergekit's `sum` method), the elected sign is + when
//!    sum_i v_i >= 0, m = sum of the v_i whose sign equals it and D = sum of their w_i (0 -> 1);
//! 4. **normalize** (optional): m = m / D;
//! 5. out = base + lambda * m.
//!
//! This follows mergekit's `GeneralizedTaskArithmeticMerge` step for step (same f32 operations
//! in the same order), so deterministic variants agree with it bit for bit except where its
//! top-k picks a different entry among equal magnitudes.

use crate::error::{Error, Result};
use crate::methods::ties::sign;
use crate::methods::{breadcrumbs, della, rng, BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe, Trim, TrimRule, TrimScope};
use crate::params::{ParamValue, Params};

/// How task vectors are sparsified before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// Kept whole.
    None,
    /// Top-k magnitudes per tensor (exact k = floor(density * n), lowest index first at ties).
    Magnitude,
    /// Bernoulli(density) keep mask per element (DARE).
    Random,
    /// Top-k magnitudes after dropping the largest `gamma` fraction as outliers (Model
    /// Breadcrumbs), per tensor, exact as [`Sparsify::Magnitude`].
    Outliers,
    /// Bernoulli keep mask with a probability from the entry's magnitude rank in its row,
    /// density +- epsilon (DELLA's MagPrune; see `della.rs`).
    Della,
}

impl Sparsify {
    /// Whether kept entries come from a random mask (and may be rescaled).
    fn is_random(self) -> bool {
        matches!(self, Sparsify::Random | Sparsify::Della)
    }
}

/// How the entries a random mask keeps are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// Not rescaled.
    None,
    /// Divided by the entry's keep probability: density for DARE, the paper's rescale (Yu et
    /// al., 2023, arXiv:2311.03099); the rank-based probability for DELLA (Deep et al., 2024,
    /// arXiv:2406.11617, Eq. 4's 1/(1 - p_i) with p_i the drop probability). Keeps every
    /// element's expectation, E[mask * d / p] = d. Element-local: no extra pass over the tensor.
    /// The default.
    Density,
    /// Multiplied by L1(d) / L1(mask * d) per tensor, so the kept entries have the L1 norm of the
    /// whole task vector (current mergekit, `rescale: true`); factor 1 when either norm is below
    /// 1e-7, as in mergekit. Needs a statistics pass (two sums per model).
    L1,
}

impl Rescale {
    fn name(self) -> &'static str {
        match self {
            Rescale::None => "none",
            Rescale::Density => "density",
            Rescale::L1 => "l1",
        }
    }
}

/// The task-vector merge kernel, configured per method.
#[derive(Debug, Clone, Copy)]
pub struct TaskVectorMerge {
    /// Method name.
    pub name: &'static str,
    /// Sparsification.
    pub sparsify: Sparsify,
    /// TIES sign consensus.
    pub consensus: bool,
    /// Divide by the (agreeing) weight sum.
    pub normalize: bool,
    /// Rescale of randomly kept entries.
    pub rescale: Rescale,
    /// Seed of the random masks.
    pub seed: u64,
    /// The method's documented parameters.
    pub params: &'static [ParamSpec],
}

/// Default seed of the random methods (recorded in the recipe's description).
pub const DEFAULT_SEED: u64 = 0;

/// Parameter docs shared by the family.
pub const WEIGHT: ParamSpec = ParamSpec { name: "weight", per_model: true, default: "1.0", doc: "weight of each model's task vector" };
/// `lambda`.
pub const LAMBDA: ParamSpec = ParamSpec { name: "lambda", per_model: false, default: "1.0", doc: "scale of the merged task vector added to the base" };
/// `density`, required.
pub const DENSITY: ParamSpec = ParamSpec { name: "density", per_model: true, default: "required", doc: "fraction of each task vector's entries kept, in (0, 1]" };
/// `seed`.
pub const SEED: ParamSpec = ParamSpec { name: "seed", per_model: false, default: "0", doc: "seed of the counter-based random masks (keyed by seed, tensor name, model, element)" };
/// `rescale`.
pub const RESCALE: ParamSpec = ParamSpec { name: "rescale", per_model: false, default: "density", doc: "density (divide kept entries by their keep probability, as the DARE and DELLA papers; alias: probability) | l1 (match the L1 norm, mergekit) | none" };
/// `gamma` (breadcrumbs).
pub const GAMMA: ParamSpec = ParamSpec { name: "gamma", per_model: true, default: "0.01", doc: "fraction of the largest |d| dropped as outliers, in [0, 1) (mergekit's default 0.01)" };
/// `epsilon` (DELLA).
pub const EPSILON: ParamSpec = ParamSpec { name: "epsilon", per_model: true, default: "0.15", doc: "keep probabilities span density +- epsilon by magnitude rank; density +- epsilon must lie in (0, 1)" };

const PARAMS: &[ParamSpec] = &[
    WEIGHT,
    LAMBDA,
    ParamSpec { name: "normalize", per_model: false, default: "false", doc: "divide the weighted sum by the sum of weights" },
];

impl TaskVectorMerge {
    /// Task arithmetic: base + lambda * sum_i w_i d_i (normalize: divided by sum_i w_i).
    pub fn task_arithmetic(params: &Params) -> Result<Self> {
        Self::configure("task_arithmetic", Sparsify::None, false, false, PARAMS, params)
    }

    /// Builds a family member, reading `normalize`, `rescale` and `seed` from the parameters.
    pub fn configure(
        name: &'static str,
        sparsify: Sparsify,
        consensus: bool,
        default_normalize: bool,
        specs: &'static [ParamSpec],
        params: &Params,
    ) -> Result<Self> {
        let perr = |n: &str, reason: String| Error::Param { name: n.into(), reason, place: String::new() };
        let normalize = params.flag("normalize", default_normalize).map_err(|r| perr("normalize", r))?;
        let rescale = if sparsify.is_random() {
            match params.text("rescale", "density").map_err(|r| perr("rescale", r))?.as_str() {
                "density" | "probability" => Rescale::Density,
                "l1" => Rescale::L1,
                "none" => Rescale::None,
                other => return Err(perr("rescale", format!("{other:?} is not one of density (or probability), l1, none"))),
            }
        } else {
            Rescale::None
        };
        let seed = match params.global.get("seed") {
            None => DEFAULT_SEED,
            Some(ParamValue::Number(x)) if *x >= 0.0 && x.fract() == 0.0 && *x <= 9.007_199_254_740_992e15 => *x as u64,
            Some(other) => {
                return Err(perr("seed", format!("{} is not a non-negative integer", serde_json::to_string(other).unwrap_or_default())))
            }
        };
        Ok(TaskVectorMerge { name, sparsify, consensus, normalize, rescale, seed, params: specs })
    }

    fn needs_density(&self) -> bool {
        self.sparsify != Sparsify::None
    }
}

/// Elements per tile of the apply kernel (the weighted values of every model for one tile stay
/// in L1/L2 cache).
const TILE: usize = 1024;

/// Recipe scalars: `[lambda, w_0..w_m, density_0..density_m, model_0..model_m,
/// epsilon_0..epsilon_m]` (model indices as f32, exact below 2^24; epsilons only for DELLA).
struct Scalars<'a> {
    lambda: f32,
    w: &'a [f32],
    p: &'a [f32],
    ids: &'a [f32],
    eps: &'a [f32],
}

fn scalars(r: &TensorRecipe, m: usize) -> Scalars<'_> {
    Scalars {
        lambda: r.scalars[0],
        w: &r.scalars[1..1 + m],
        p: &r.scalars[1 + m..1 + 2 * m],
        ids: &r.scalars[1 + 2 * m..1 + 3 * m],
        eps: r.scalars.get(1 + 3 * m..1 + 4 * m).unwrap_or(&[]),
    }
}

/// The L1 rescale factor L1(d) / L1(mask * d) from the two sums, 1 when either is below 1e-7.
pub fn l1_factor(before: f64, after: f64) -> f32 {
    if before < 1e-7 || after < 1e-7 {
        1.0
    } else {
        (before / after) as f32
    }
}

impl Method for TaskVectorMerge {
    fn name(&self) -> &'static str {
        self.name
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn params(&self) -> &'static [ParamSpec] {
        self.params
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let lambda = t.global_number("lambda", Some(1.0))?;
        let mut ws = Vec::with_capacity(m);
        let mut ps = Vec::with_capacity(m);
        let mut eps = Vec::new();
        let mut trim = Vec::with_capacity(m);
        for slot in 0..m {
            ws.push(t.model_number(slot, "weight", Some(1.0))? as f32);
            let density = if self.needs_density() { t.model_number(slot, "density", None)? } else { 1.0 };
            if !(density > 0.0 && density <= 1.0) {
                return Err(Error::Param {
                    name: "density".into(),
                    reason: format!("{density} is outside (0, 1]: it is the fraction of entries kept"),
                    place: format!(" (model {}, tensor {})", t.models[slot] + 1, t.name),
                });
            }
            ps.push(density as f32);
            trim.push(match self.sparsify {
                Sparsify::Magnitude => Some(Trim::top(density, TrimScope::Tensor, TrimRule::ExactK)),
                Sparsify::Outliers => {
                    let gamma = t.model_number(slot, "gamma", Some(0.01))?;
                    breadcrumbs::check_gamma(gamma, t, slot)?;
                    Some(Trim { outliers: gamma, ..Trim::top(density, TrimScope::Tensor, TrimRule::ExactK) })
                }
                _ => None,
            });
            if self.sparsify == Sparsify::Della {
                eps.push(della::check_epsilon(t.model_number(slot, "epsilon", Some(della::DEFAULT_EPSILON))?, density, t, slot)?);
            }
        }
        let mut s = vec![lambda as f32];
        s.extend(&ws);
        s.extend(&ps);
        s.extend(t.models.iter().map(|&i| i as f32));
        s.extend(&eps);
        let reductions = if self.sparsify.is_random() && self.rescale == Rescale::L1 { 2 * m } else { 0 };
        let row = if self.sparsify == Sparsify::Della { della::row_length(t)? } else { 0 };
        Ok(TensorRecipe { trim, scalars: s, reductions, row })
    }

    /// L1 rescale: per model, sum |d| and sum |d| over the kept entries.
    fn reduce(&self, r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        let m = c.inputs.len();
        let sc = scalars(r, m);
        if self.sparsify == Sparsify::Della {
            for (i, x) in c.inputs.iter().enumerate() {
                let mask = self.della_mask(r, &sc, i, c, x, None);
                acc[2 * i] += x.iter().map(|&d| d.abs() as f64).sum::<f64>();
                acc[2 * i + 1] += mask.iter().map(|&d| d.abs() as f64).sum::<f64>();
            }
            return;
        }
        for (i, x) in c.inputs.iter().enumerate() {
            let key = rng::stream_key(self.seed, c.tensor, sc.ids[i] as u64);
            let (before, after) = rng::masked_l1(key, c.start, rng::keep_cutoff(sc.p[i] as f64), x);
            acc[2 * i] += before;
            acc[2 * i + 1] += after;
        }
    }

    fn apply(&self, r: &TensorRecipe, st: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let m = c.inputs.len();
        let sc = scalars(r, m);
        if self.sparsify == Sparsify::Della {
            // Mask and rescale whole rows first, then combine the sparse task vectors.
            let masked: Vec<Vec<f32>> = (0..m).map(|i| self.della_mask(r, &sc, i, c, c.inputs[i], Some(st))).collect();
            let views: Vec<&[f32]> = masked.iter().map(|v| v.as_slice()).collect();
            let sparse = Chunk { inputs: &views, ..*c };
            return self.combine(&sc, None, &sparse, out);
        }
        let dare = (self.sparsify == Sparsify::Random).then(|| DareMask {
            keys: (0..m).map(|i| rng::stream_key(self.seed, c.tensor, sc.ids[i] as u64)).collect(),
            cuts: (0..m).map(|i| rng::keep_cutoff(sc.p[i] as f64)).collect(),
            scale: (0..m)
                .map(|i| match self.rescale {
                    Rescale::Density if sc.p[i] < 1.0 => (1.0 / sc.p[i] as f64) as f32,
                    Rescale::L1 if sc.p[i] < 1.0 => l1_factor(st.tensor[2 * i], st.tensor[2 * i + 1]),
                    _ => 1.0,
                })
                .collect(),
        });
        self.combine(&sc, dare.as_ref(), c, out)
    }

    fn describe(&self) -> String {
        let mut s = format!("{} (normalize {}", self.name, self.normalize);
        if self.sparsify.is_random() {
            s.push_str(&format!(", rescale {}, seed {}", self.rescale.name(), self.seed));
        }
        s.push(')');
        s
    }
}

impl TaskVectorMerge {
    /// Model `i`'s DELLA-masked, rescaled task vector for one chunk (whole rows). The L1 factor
    /// comes from `stats`; without stats (the reduction pass) kept entries are not rescaled.
    fn della_mask(&self, r: &TensorRecipe, sc: &Scalars<'_>, i: usize, c: &Chunk<'_>, x: &[f32], stats: Option<&Stats<'_>>) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let density = sc.p[i] as f64;
        if density >= 1.0 {
            out.copy_from_slice(x);
            return out;
        }
        let key = rng::stream_key(self.seed, c.tensor, sc.ids[i] as u64);
        let rescale = match (self.rescale, stats) {
            (Rescale::Density, Some(_)) => della::Scale::ByProbability,
            (Rescale::L1, Some(st)) => della::Scale::By(l1_factor(st.tensor[2 * i], st.tensor[2 * i + 1])),
            _ => della::Scale::By(1.0),
        };
        let mask = della::MagPrune { density, epsilon: sc.eps[i] as f64, key, scale: rescale };
        let row = r.row as usize;
        let mut scratch = della::RowScratch::default();
        for (ri, (xs, os)) in x.chunks(row).zip(out.chunks_mut(row)).enumerate() {
            mask.row(xs, c.start + (ri * row) as u64, os, &mut scratch);
        }
        out
    }

    /// Steps 2-5 of the module doc on one chunk; DARE's mask, when given, is drawn here, tile by
    /// tile (otherwise the inputs are used as they come: whole, or already sparsified).
    fn combine(&self, sc: &Scalars<'_>, dare: Option<&DareMask>, c: &Chunk<'_>, out: &mut [f32]) {
        let m = c.inputs.len();
        let n = out.len();
        let wsum: f32 = sc.w.iter().fold(0.0f32, |a, &b| a + b);
        let mut vals = vec![0f32; m * TILE];
        let mut scratch = vec![0f32; 2 * TILE];
        let mut t0 = 0;
        while t0 < n {
            let len = TILE.min(n - t0);
            // v_i = w_i * sparsify(d_i)
            for i in 0..m {
                let v = &mut vals[i * TILE..i * TILE + len];
                let x = &c.inputs[i][t0..t0 + len];
                let w = sc.w[i];
                if let Some(d) = dare.filter(|_| sc.p[i] < 1.0) {
                    rng::masked_scale(d.keys[i], c.start + t0 as u64, d.cuts[i], x, d.scale[i], w, v);
                } else {
                    for (v, &d) in v.iter_mut().zip(x) {
                        *v = d * w;
                    }
                }
            }
            let tile = Tile { vals: &vals, m, w: sc.w, consensus: self.consensus, normalize: self.normalize, wsum, lambda: sc.lambda };
            combine_tile(&tile, c.base.map(|b| &b[t0..t0 + len]), &mut out[t0..t0 + len], &mut scratch);
            t0 += len;
        }
    }
}

/// DARE's keep masks for one chunk, per model: stream key, [`rng::keep_cutoff`] and the scale of
/// kept entries.
struct DareMask {
    keys: Vec<u64>,
    cuts: Vec<u64>,
    scale: Vec<f32>,
}

/// Steps 3-5 of the module doc for one tile: the weighted, sparsified task vectors `vals`
/// (model i at `vals[i * TILE..]`), combined per element with the models in order.
struct Tile<'a> {
    vals: &'a [f32],
    m: usize,
    w: &'a [f32],
    consensus: bool,
    normalize: bool,
    wsum: f32,
    lambda: f32,
}

crate::simd::kernel! {
    /// Writes one tile's merged values to `out` (base added when given); `scratch` holds
    /// 2 * TILE floats. Models outermost, elements innermost (vectorises); per element the sums
    /// still run over the models in order, so every build gives the same bits. Adding 0.0 for
    /// a disagreeing entry equals skipping it: the sums start at +0.0 and a finite sum of them
    /// is never -0.0. Measured on the 1.1B benchmark: the element-by-element form (models
    /// innermost) was 57% of the CPU time of `dare_ties`.
    fn combine_tile(t: &Tile<'_>, base: Option<&[f32]>, out: &mut [f32], scratch: &mut [f32]) {
        let len = out.len();
        let (mixed, div) = scratch.split_at_mut(TILE);
        let (mixed, div) = (&mut mixed[..len], &mut div[..len]);
        mixed.fill(0.0);
        let model = |i: usize| &t.vals[i * TILE..i * TILE + len];
        if t.consensus {
            // The elected sign: + where sum_i v_i >= 0 (`out` holds the sums meanwhile).
            let sum = &mut *out;
            sum.fill(0.0);
            for i in 0..t.m {
                for (s, &v) in sum.iter_mut().zip(model(i)) {
                    *s += v;
                }
            }
            div.fill(0.0);
            for i in 0..t.m {
                let wi = t.w[i];
                for (((mx, dv), &s), &v) in mixed.iter_mut().zip(div.iter_mut()).zip(sum.iter()).zip(model(i)) {
                    let maj = if s >= 0.0 { 1.0 } else { -1.0 };
                    let agree = sign(v) == maj;
                    *mx += if agree { v } else { 0.0 };
                    *dv += if agree { wi } else { 0.0 };
                }
            }
            for d in div.iter_mut() {
                *d = if *d == 0.0 { 1.0 } else { *d };
            }
        } else {
            for i in 0..t.m {
                for (mx, &v) in mixed.iter_mut().zip(model(i)) {
                    *mx += v;
                }
            }
            div.fill(if t.wsum.abs() < 1e-8 { 1.0 } else { t.wsum });
        }
        for (j, o) in out.iter_mut().enumerate() {
            let mut v = mixed[j];
            if t.normalize {
                v /= div[j];
            }
            if t.lambda != 1.0 {
                v *= t.lambda;
            }
            *o = match base {
                Some(b) => b[j] + v,
                None => v,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;

    fn p(pairs: &[(&str, ParamValue)], weights: &[f64]) -> Params {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.global.insert(k.to_string(), v.clone());
        }
        p.models = weights.iter().map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect()).collect();
        p
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let base = [1.0f32, 2.0, 3.0];
        let a = [2.0f32, 2.0, 1.0]; // d = [1, 0, -2]
        let b = [1.0f32, 4.0, 3.0]; // d = [0, 2, 0]
        let pr = p(&[("lambda", ParamValue::Number(0.5))], &[1.0, 0.5]);
        let out = merge_in_memory("task_arithmetic", &pr, Some(&base), &[&a, &b], "t", 2, 0).unwrap();
        // base + 0.5 * (1*d_a + 0.5*d_b) = [1.5, 2.5, 2.0]
        assert_eq!(out, vec![1.5, 2.5, 2.0]);
        let pr = p(&[("normalize", ParamValue::Bool(true))], &[1.0, 0.5]);
        let out = merge_in_memory("task_arithmetic", &pr, Some(&base), &[&a, &b], "t", 2, 0).unwrap();
        // divided by 1.5
        assert_eq!(out, vec![1.0 + 1.0 / 1.5, 2.0 + 1.0 / 1.5, 3.0 - 2.0 / 1.5]);
    }

    #[test]
    fn dare_density_one_is_task_arithmetic_and_masks_are_chunk_independent() {
        let n = 5000;
        let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).sin() * 2.0).collect();
        let full = p(&[("density", ParamValue::Number(1.0))], &[1.0, 0.7]);
        let ta = merge_in_memory("task_arithmetic", &p(&[], &[1.0, 0.7]), Some(&base), &[&a, &b], "t", 64, 0).unwrap();
        let d1 = merge_in_memory("dare_linear", &full, Some(&base), &[&a, &b], "t", 64, 0).unwrap();
        assert_eq!(ta, d1);
        // Bitwise independence of chunking for element-local rescales (the L1 sums are
        // block-ordered and only chunk-independent for whole-block chunks, as in the engine).
        for rescale in ["density", "none"] {
            let half = p(&[("density", ParamValue::Number(0.5)), ("rescale", ParamValue::Text(rescale.into()))], &[1.0, 0.7]);
            for m in ["dare_linear", "dare_ties"] {
                let x = merge_in_memory(m, &half, Some(&base), &[&a, &b], "t", 7, 0).unwrap();
                let y = merge_in_memory(m, &half, Some(&base), &[&a, &b], "t", 1 << 20, u64::MAX).unwrap();
                assert_eq!(x, y, "{m} {rescale}");
            }
        }
    }
}
