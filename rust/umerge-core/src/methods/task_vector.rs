//! The task-vector kernel: task arithmetic (Ilharco et al., 2023, "Editing Models with Task
//! Arithmetic", arXiv:2212.04089) and the family that mergekit calls "generalized task
//! arithmetic": `task_arithmetic`, `magnitude_prune`, `dare_linear`, `dare_ties`, `breadcrumbs`,
//! `breadcrumbs_ties`, `della`, `della_linear` (see `magnitude_prune.rs`, `dare.rs`,
//! `breadcrumbs.rs`, `della.rs`). Its combine step, with the TIES sign election and disjoint
//! mean ([`Consensus`]), is also the apply kernel of `ties` (all three presets, see `ties.rs`).
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
//!    with consensus (TIES sign election, mergekit's `sum` method, [`Consensus::MERGEKIT`]), the
//!    elected sign is + when sum_i v_i >= 0, else -, m = sum of the v_i whose sign equals it and
//!    D = sum of their w_i (0 -> 1); the `ties` presets `peft` and `paper` elect and average
//!    otherwise ([`Elect`], [`ElectOn`], [`Mean`]);
//! 4. **normalize** (optional): m = m / D;
//! 5. out = base + lambda * m.
//!
//! This follows mergekit's `GeneralizedTaskArithmeticMerge` step for step (same f32 operations
//! in the same order), so deterministic variants agree with it bit for bit except where its
//! top-k picks a different entry among equal magnitudes.

use crate::error::{Error, Result};
use crate::methods::{
    breadcrumbs, della, rng, BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe, Trim, TrimRule, TrimScope,
};
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
pub const LAMBDA: ParamSpec =
    ParamSpec { name: "lambda", per_model: false, default: "1.0", doc: "scale of the merged task vector added to the base" };
/// `density`, required.
pub const DENSITY: ParamSpec =
    ParamSpec { name: "density", per_model: true, default: "required", doc: "fraction of each task vector's entries kept, in (0, 1]" };
/// `seed`.
pub const SEED: ParamSpec = ParamSpec {
    name: "seed",
    per_model: false,
    default: "0",
    doc: "seed of the counter-based random masks (keyed by seed, tensor name, model, element)",
};
/// `rescale`.
pub const RESCALE: ParamSpec = ParamSpec { name: "rescale", per_model: false, default: "density", doc: "density (divide kept entries by their keep probability, as the DARE and DELLA papers; alias: probability) | l1 (match the L1 norm, mergekit) | none" };
/// `gamma` (breadcrumbs).
pub const GAMMA: ParamSpec = ParamSpec {
    name: "gamma",
    per_model: true,
    default: "0.01",
    doc: "fraction of the largest |d| dropped as outliers, in [0, 1) (mergekit's default 0.01)",
};
/// `epsilon` (DELLA).
pub const EPSILON: ParamSpec = ParamSpec {
    name: "epsilon",
    per_model: true,
    default: "0.15",
    doc: "keep probabilities span density +- epsilon by magnitude rank; density +- epsilon must lie in (0, 1)",
};

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
                // numbers as written (-1, not serde's -1.0); anything else as JSON
                let shown = match other {
                    ParamValue::Number(x) => x.to_string(),
                    _ => serde_json::to_string(other).unwrap_or_default(),
                };
                return Err(perr("seed", format!("{shown} is not a non-negative integer")));
            }
        };
        Ok(TaskVectorMerge { name, sparsify, consensus, normalize, rescale, seed, params: specs })
    }

    fn needs_density(&self) -> bool {
        self.sparsify != Sparsify::None
    }
}

/// torch.sign: +1, -1, or 0 for zero (and -0, and NaN).
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// How a TIES consensus elects each element's sign from the sum `s` of its models' values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Elect {
    /// Plus where s >= 0, else minus (mergekit's `(sign(s) >= 0) * 2 - 1`; a NaN sum elects
    /// minus).
    PlusUnlessNegative,
    /// Plus where s >= 0, minus where s < 0: a NaN sum (from non-finite inputs, accepted only with
    /// `allow_nonfinite`) elects no sign, so no value agrees. The rule of the `ties` presets
    /// `mergekit` and `peft`; it differs from [`Elect::PlusUnlessNegative`] only at NaN sums,
    /// and is kept apart so their output bytes stay as they were.
    PlusOrMinus,
    /// The TIES paper: sign(s), or the given model majority where that is 0; plus where the
    /// result is positive, else minus.
    SignOrModelMajority(f32),
}

/// What a consensus sums to elect the sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElectOn {
    /// The values themselves.
    Values,
    /// Their signs (a vote; PEFT's `majority_sign_method="frequency"`).
    Signs,
}

/// What a consensus averages the agreeing values over. The values a rule gets differ: the
/// weighted v_i = w_i d_i for [`Mean::AgreeingWeights`], the unweighted d_i for the others
/// (they weight them here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mean {
    /// sum of the agreeing v_i / sum of their w_i (0 -> 1): mergekit.
    AgreeingWeights,
    /// sum of the agreeing w_i d_i / how many agree (min 1): PEFT.
    AgreeingCount,
    /// sum of the agreeing w_i d_i / how many of them are nonzero (min 1): the TIES paper.
    NonzeroAgreeing,
}

/// A TIES consensus (sign election and disjoint mean). A value agrees when its sign is the
/// elected one, so zeros never agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Consensus {
    /// What is summed to elect.
    pub elect_on: ElectOn,
    /// How the sum elects.
    pub elect: Elect,
    /// How agreeing values are averaged.
    pub mean: Mean,
}

impl Consensus {
    /// mergekit's `sum` consensus: the `*_ties` methods of the task-vector family.
    pub const MERGEKIT: Consensus = Consensus { elect_on: ElectOn::Values, elect: Elect::PlusUnlessNegative, mean: Mean::AgreeingWeights };

    /// Whether the rule takes weighted values (v_i = w_i d_i) rather than the d_i.
    fn weighted(&self) -> bool {
        self.mean == Mean::AgreeingWeights
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
        Ok(TensorRecipe { trim, scalars: s, reductions, row, score: None })
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
        let rule =
            Combine { w: sc.w, consensus: self.consensus.then_some(Consensus::MERGEKIT), normalize: self.normalize, lambda: sc.lambda };
        combine_tiles(&rule, c.base, out, |i, t0, v| {
            // v_i = w_i * sparsify(d_i)
            let x = &c.inputs[i][t0..t0 + v.len()];
            let w = sc.w[i];
            if let Some(d) = dare.filter(|_| sc.p[i] < 1.0) {
                rng::masked_scale(d.keys[i], c.start + t0 as u64, d.cuts[i], x, d.scale[i], w, v);
            } else {
                weigh(x, w, v);
            }
        });
    }
}

/// `v = d * w`, element-wise.
fn weigh(d: &[f32], w: f32, v: &mut [f32]) {
    for (v, &d) in v.iter_mut().zip(d) {
        *v = d * w;
    }
}

/// The TIES merge of one chunk of trimmed task vectors `deltas` (the `ties` method's apply):
/// `out = base + lambda * m`, with m the consensus mean of the deltas weighted by `weights`
/// (with `normalize` false: their agreeing sum, not divided).
pub fn merge_with_consensus(
    consensus: Consensus,
    normalize: bool,
    lambda: f32,
    weights: &[f32],
    base: Option<&[f32]>,
    deltas: &[&[f32]],
    out: &mut [f32],
) {
    let rule = Combine { w: weights, consensus: Some(consensus), normalize, lambda };
    let m = weights.len();
    let wsum: f32 = weights.iter().fold(0.0f32, |a, &b| a + b);
    // Weighted elections see w_i * d_i, the others d_i; multiplying by 1.0 changes no bit.
    let scale: Vec<f32> = if consensus.weighted() { weights.to_vec() } else { vec![1.0; m] };
    let mut scratch = vec![0f32; 2 * TILE];
    let n = out.len();
    let mut t0 = 0;
    while t0 < n {
        let len = TILE.min(n - t0);
        // The deltas are read in place: copying them into a tile first cost TIES ~20% of its CPU
        // time on the 1.1B benchmark (one more pass over every input element).
        let tile = Tile { values: Values::InPlace { deltas, t0, scale: &scale }, m, rule: &rule, wsum };
        combine_tile(&tile, base.map(|b| &b[t0..t0 + len]), &mut out[t0..t0 + len], &mut scratch);
        t0 += len;
    }
}

/// DARE's keep masks for one chunk, per model: stream key, [`rng::keep_cutoff`] and the scale of
/// kept entries.
struct DareMask {
    keys: Vec<u64>,
    cuts: Vec<u64>,
    scale: Vec<f32>,
}

/// Steps 3-5 of the module doc: how the models' values are combined.
struct Combine<'a> {
    /// The weights w_i, one per model.
    w: &'a [f32],
    /// The sign election and disjoint mean, or `None` for a plain sum.
    consensus: Option<Consensus>,
    /// Divide by the (agreeing) weight sum or count.
    normalize: bool,
    lambda: f32,
}

/// Steps 3-5 over one chunk, tile by tile: `fill(i, t0, v)` writes model i's values (weighted
/// and sparsified as the rule expects) for the tile starting at element `t0` into `v`.
fn combine_tiles(rule: &Combine<'_>, base: Option<&[f32]>, out: &mut [f32], mut fill: impl FnMut(usize, usize, &mut [f32])) {
    let m = rule.w.len();
    let n = out.len();
    let wsum: f32 = rule.w.iter().fold(0.0f32, |a, &b| a + b);
    let mut vals = vec![0f32; m * TILE];
    let mut scratch = vec![0f32; 2 * TILE];
    let mut t0 = 0;
    while t0 < n {
        let len = TILE.min(n - t0);
        for i in 0..m {
            fill(i, t0, &mut vals[i * TILE..i * TILE + len]);
        }
        let tile = Tile { values: Values::Filled(&vals), m, rule, wsum };
        combine_tile(&tile, base.map(|b| &b[t0..t0 + len]), &mut out[t0..t0 + len], &mut scratch);
        t0 += len;
    }
}

/// Where a tile's per-model values come from.
enum Values<'a> {
    /// Model i at `vals[i * TILE..]`, already weighted and sparsified as the rule expects.
    Filled(&'a [f32]),
    /// Model i's own slice from element `t0`, each value times `scale[i]` as it is read.
    InPlace { deltas: &'a [&'a [f32]], t0: usize, scale: &'a [f32] },
}

impl Values<'_> {
    /// Model i's `len` values of this tile and the factor they are read with.
    #[inline(always)]
    fn model(&self, i: usize, len: usize) -> (&[f32], f32) {
        match *self {
            Values::Filled(vals) => (&vals[i * TILE..i * TILE + len], 1.0),
            Values::InPlace { deltas, t0, scale } => (&deltas[i][t0..t0 + len], scale[i]),
        }
    }
}

/// One tile of values, combined per element with the models in order.
struct Tile<'a> {
    values: Values<'a>,
    m: usize,
    rule: &'a Combine<'a>,
    /// Sum of the weights (the divisor without consensus).
    wsum: f32,
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
        let model = |i: usize| t.values.model(i, len);
        if let Some(cs) = t.rule.consensus {
            // `out` holds the sums, then the elected signs (1, -1, or 0 for none).
            let elected = &mut *out;
            elected.fill(0.0);
            for i in 0..t.m {
                let (vals, k) = model(i);
                match cs.elect_on {
                    ElectOn::Values => elected.iter_mut().zip(vals).for_each(|(s, &v)| *s += v * k),
                    ElectOn::Signs => elected.iter_mut().zip(vals).for_each(|(s, &v)| *s += sign(v * k)),
                }
            }
            // One loop per rule, so each is a plain vectorised select.
            match cs.elect {
                Elect::PlusUnlessNegative => elected.iter_mut().for_each(|s| *s = if *s >= 0.0 { 1.0 } else { -1.0 }),
                Elect::PlusOrMinus => elected.iter_mut().for_each(|s| *s = if *s >= 0.0 { 1.0 } else if *s < 0.0 { -1.0 } else { 0.0 }),
                Elect::SignOrModelMajority(model_majority) => elected.iter_mut().for_each(|s| {
                    let sg = sign(*s);
                    *s = if (if sg == 0.0 { model_majority } else { sg }) > 0.0 { 1.0 } else { -1.0 };
                }),
            }
            div.fill(0.0);
            for i in 0..t.m {
                let wi = t.rule.w[i];
                let (vals, k) = model(i);
                let agreeing = mixed.iter_mut().zip(div.iter_mut()).zip(elected.iter()).zip(vals);
                match cs.mean {
                    Mean::AgreeingWeights => agreeing.for_each(|(((mx, dv), &e), &v)| {
                        let v = v * k;
                        let agree = ((e > 0.0) & (v > 0.0)) | ((e < 0.0) & (v < 0.0));
                        *mx += if agree { v } else { 0.0 };
                        *dv += if agree { wi } else { 0.0 };
                    }),
                    Mean::AgreeingCount => agreeing.for_each(|(((mx, dv), &e), &v)| {
                        let v = v * k;
                        let agree = ((e > 0.0) & (v > 0.0)) | ((e < 0.0) & (v < 0.0));
                        *mx += if agree { v * wi } else { 0.0 };
                        *dv += if agree { 1.0 } else { 0.0 };
                    }),
                    Mean::NonzeroAgreeing => agreeing.for_each(|(((mx, dv), &e), &v)| {
                        let v = v * k;
                        let agree = ((e > 0.0) & (v > 0.0)) | ((e < 0.0) & (v < 0.0));
                        let x = v * wi;
                        *mx += if agree { x } else { 0.0 };
                        *dv += if agree & (x != 0.0) { 1.0 } else { 0.0 };
                    }),
                }
            }
            // No agreeing value: divide by 1 (the sum is 0 there anyway). Fused into the division.
            if t.rule.normalize {
                match cs.mean {
                    Mean::AgreeingWeights => mixed.iter_mut().zip(div.iter()).for_each(|(m, &d)| *m /= if d == 0.0 { 1.0 } else { d }),
                    Mean::AgreeingCount | Mean::NonzeroAgreeing => mixed.iter_mut().zip(div.iter()).for_each(|(m, &d)| *m /= d.max(1.0)),
                }
            }
        } else {
            for i in 0..t.m {
                let (vals, k) = model(i);
                for (mx, &v) in mixed.iter_mut().zip(vals) {
                    *mx += v * k;
                }
            }
            if t.rule.normalize {
                let d = if t.wsum.abs() < 1e-8 { 1.0 } else { t.wsum };
                mixed.iter_mut().for_each(|m| *m /= d);
            }
        }
        // v = mixed / div * lambda (divided above), then base + v: one plain loop per step
        // (branches hoisted out of the element loop so it vectorises; the same operations in the
        // same order per element).
        if t.rule.lambda != 1.0 {
            let lambda = t.rule.lambda;
            mixed.iter_mut().for_each(|m| *m *= lambda);
        }
        match base {
            Some(b) => out.iter_mut().zip(mixed.iter()).zip(b).for_each(|((o, &m), &b)| *o = b + m),
            None => out.copy_from_slice(mixed),
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
