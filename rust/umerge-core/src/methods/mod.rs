//! Merge methods: one file per method, each implementing [`Method`].
//!
//! The executor (see `exec`) owns reading, chunking, threading and writing; a method only says,
//! per tensor, what statistics it needs ([`TensorRecipe`]) and how to merge one chunk given them
//! ([`Method::apply`]). The passes over a tensor are:
//!
//! 1. **trim statistics** — for every input with a [`Trim`] in the recipe, the exact top-k
//!    magnitude threshold of its delta (or raw value) over the trim scope: the tensor, or the
//!    whole model ([`TrimScope::Model`], the TIES paper's global trimming; the executor then runs
//!    this pass over every tensor before any apply pass);
//! 2. **reductions** — optional f64 sums the method accumulates ([`Method::reduce`], e.g. norms
//!    and dot products for slerp or model_stock), computed on fixed 64 Ki-element blocks and
//!    added in block order so they do not depend on chunk size or threads, then turned once per
//!    tensor into what the apply pass reads ([`Method::derive`]: coefficients, or an error that
//!    depends on the values); and [`Method::reduce_global`] for sums over the whole merge (after
//!    trimming);
//! 3. **apply** — [`Method::apply`] gets the chunk's inputs (deltas already trimmed) and writes
//!    the merged f32 values.
//!
//! A method may also rank the elements of a tensor by a score of its own ([`Method::score`],
//! computed from a chunk's trimmed inputs and base, e.g. the variance across models), selected
//! exactly between the trim and the reductions ([`ScoreSelect`]): either the k largest scores
//! are kept and the others zeroed in every input, a trim shared by the inputs that the
//! reductions and the apply pass then see (SCE's top-k variance), or the scores at given ranks
//! are handed to [`Method::derive`] after the sums (arcee_fusion's quartiles).
//!
//! Adding a method: create `methods/<name>.rs` with a struct implementing [`Method`], add it to
//! [`build`] and [`METHODS`]. Random methods draw from counter-based
//! generators keyed by (seed, tensor name, element index), using [`Chunk::start`] for the index,
//! never a shared stream, so results do not depend on chunking.

pub mod arcee_fusion;
pub mod breadcrumbs;
pub mod dare;
pub mod della;
pub mod gram;
pub mod karcher;
pub mod linear;
pub mod magnitude_prune;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod ram;
pub mod rng;
pub mod sce;
pub mod slerp;
pub mod task_vector;
pub mod ties;

use crate::error::{Error, Result};
use crate::params::{ParamValue, Params, TensorPos};

/// How a method uses the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// Task vectors (model - base) are merged: a base is required.
    Required,
    /// A base is used when given (e.g. linear may include it as a model).
    Optional,
    /// The base plays no role.
    Unused,
}

/// One documented parameter of a method.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// Name as used in specs, YAML and `--name` options.
    pub name: &'static str,
    /// Whether it may differ per model (`models[i].params`).
    pub per_model: bool,
    /// Default, as text for display ("required" when none).
    pub default: &'static str,
    /// One-line meaning.
    pub doc: &'static str,
}

/// Where a trim threshold is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimScope {
    /// Per tensor (mergekit, PEFT).
    Tensor,
    /// Over every tensor of the model at once (TIES paper code).
    Model,
}

/// How many entries a trim keeps, and what happens at magnitude ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimRule {
    /// Exactly k = floor(density * n); entries equal to the threshold kept lowest index first
    /// (mergekit's and PEFT's k; their own tie order is unspecified).
    ExactK,
    /// The TIES paper code: threshold = the (n - floor(density * n))-th smallest |x|
    /// (`kthvalue`), keep every entry with |x| >= threshold, ties included; density 1 keeps all.
    PaperKth,
}

/// Keep the top magnitudes of one input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trim {
    /// Fraction kept, in [0, 1].
    pub density: f64,
    /// Selection scope.
    pub scope: TrimScope,
    /// Count and tie rule.
    pub rule: TrimRule,
    /// Fraction of the largest magnitudes dropped as outliers before the kept ones (Model
    /// Breadcrumbs' gamma; 0 for a plain top-k trim). Tensor scope and [`TrimRule::ExactK`] only.
    pub outliers: f64,
}

impl Trim {
    /// A plain top-k trim.
    pub fn top(density: f64, scope: TrimScope, rule: TrimRule) -> Self {
        Trim { density, scope, rule, outliers: 0.0 }
    }

    /// For a tensor of `n` entries: (largest entries dropped as outliers, entries kept after
    /// them), mergekit's `magnitude_outliers` counts: kept = floor(density * n), dropped =
    /// min(floor(outliers * n), n - kept), so the outlier drop shrinks rather than the kept
    /// count; density 1 keeps everything (no outliers dropped either, as in mergekit).
    pub fn band(&self, n: u64) -> (u64, u64) {
        if self.density >= 1.0 {
            return (0, n);
        }
        let kept = crate::select::keep_count(self.density, n);
        let dropped = crate::select::keep_count(self.outliers, n).min(n - kept);
        (dropped, kept)
    }
}

/// What a method needs for one tensor, resolved at planning time.
#[derive(Debug, Clone, Default)]
pub struct TensorRecipe {
    /// Per input model present for this tensor (same order as the chunk's inputs): trim or not.
    pub trim: Vec<Option<Trim>>,
    /// Method-defined scalars resolved for this tensor (weights, lambda, ...).
    pub scalars: Vec<f32>,
    /// Number of per-tensor f64 reductions [`Method::reduce`] fills.
    pub reductions: usize,
    /// When not 0: chunks and reduction blocks must hold whole rows of this many elements (a
    /// method that looks at a row at once, e.g. DELLA's per-row magnitude ranks).
    pub row: u64,
    /// An exact selection over the method's per-element [`Method::score`], when it needs one.
    pub score: Option<ScoreSelect>,
}

/// A selection over the per-element score of a method ([`Method::score`]), over one tensor.
///
/// Scores are ordered as numbers (negative ones included; -0 equals +0, NaN ranks above
/// everything, as torch sorts). The selection is exact and its integer counts do not depend on
/// chunking or threads, so neither does the output (see `exec::score`).
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreSelect {
    /// Keep the k largest scores, k = trunc(f32(nonzero) * f32(fraction)) where nonzero counts
    /// the scores that are not 0 (torch's `int(count_nonzero(s) * fraction)`, in float32); equal
    /// scores at the k-th are kept lowest index first. Every input is zeroed where the score is
    /// not kept, before the reductions and the apply pass read it.
    TopOfNonzero(f32),
    /// The score's values at these ranks, 0 being the smallest (each below the tensor's element
    /// count), handed to [`Method::derive`] after the tensor's reductions, in this order.
    Ranks(Vec<u64>),
}

/// Context for planning one tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorCtx<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Output shape.
    pub shape: &'a [usize],
    /// Position in the layer stack.
    pub pos: TensorPos<'a>,
    /// All parameters of the merge.
    pub params: &'a Params,
    /// Indices (into the spec's model list) of the models that have this tensor, in order.
    pub models: &'a [usize],
}

impl TensorCtx<'_> {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// A numeric parameter for model `models[slot]`, resolved for this tensor.
    pub fn model_number(&self, slot: usize, key: &str, default: Option<f64>) -> Result<f64> {
        let model = self.models.get(slot).copied();
        self.number(model, key, default)
    }

    /// A numeric global parameter resolved for this tensor.
    pub fn global_number(&self, key: &str, default: Option<f64>) -> Result<f64> {
        self.number(None, key, default)
    }

    fn number(&self, model: Option<usize>, key: &str, default: Option<f64>) -> Result<f64> {
        let place = match model {
            Some(m) => format!(" (model {}, tensor {})", m + 1, self.name),
            None => format!(" (tensor {})", self.name),
        };
        match self.params.raw(model, key) {
            None => default.ok_or_else(|| Error::Param { name: key.into(), reason: "required but not given".into(), place }),
            Some(v) => match v.number_at(&self.pos) {
                Some(x) if x.is_finite() => Ok(x),
                Some(x) => Err(Error::Param { name: key.into(), reason: format!("{x} is not finite"), place }),
                None => match (v, default) {
                    (ParamValue::Rules(_), Some(d)) => Ok(d),
                    _ => Err(Error::Param {
                        name: key.into(),
                        reason: "no number for this tensor (rules match nothing and have no default, or the value is not numeric)".into(),
                        place,
                    }),
                },
            },
        }
    }
}

/// The inputs of one chunk, as the apply pass sees them.
#[derive(Debug)]
pub struct Chunk<'a> {
    /// Tensor name (random methods key their generator on it).
    pub tensor: &'a str,
    /// Flat index of the chunk's first element in the tensor.
    pub start: u64,
    /// Base values (absent when the method does not use a base or none was given).
    pub base: Option<&'a [f32]>,
    /// Per present model: its delta (x - base) when [`Method::uses_deltas`] and a base exists,
    /// else its raw values; already trimmed per the recipe.
    pub inputs: &'a [&'a [f32]],
}

impl Chunk<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.inputs.first().map(|x| x.len()).or(self.base.map(|b| b.len())).unwrap_or(0)
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Statistics handed to the apply pass.
#[derive(Debug, Clone, Copy)]
pub struct Stats<'a> {
    /// This tensor's reductions (length `recipe.reductions`), as [`Method::derive`] left them.
    pub tensor: &'a [f64],
    /// The whole merge's reductions (length [`Method::global_reductions`]).
    pub global: &'a [f64],
}

/// A merge method.
pub trait Method: Send + Sync {
    /// Name (`ties`, ...).
    fn name(&self) -> &'static str;
    /// How it uses the base model.
    fn base_use(&self) -> BaseUse;
    /// Its parameters, for validation and `umerge methods`.
    fn params(&self) -> &'static [ParamSpec];
    /// Whether inputs are given as deltas (x - base) rather than raw values.
    fn uses_deltas(&self) -> bool {
        self.base_use() == BaseUse::Required
    }
    /// Resolves the recipe for one tensor; every parameter problem is reported here.
    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe>;
    /// Number of global reductions (default none).
    fn global_reductions(&self) -> usize {
        0
    }
    /// Adds one block's contribution to the global reductions (inputs trimmed).
    fn reduce_global(&self, _r: &TensorRecipe, _c: &Chunk<'_>, _acc: &mut [f64]) {}
    /// Adds one block's contribution to the tensor's reductions (inputs trimmed).
    fn reduce(&self, _r: &TensorRecipe, _c: &Chunk<'_>, _acc: &mut [f64]) {}
    /// Writes the score of every element of a chunk into `out` (same length), for a recipe with
    /// a [`ScoreSelect`]: from the chunk's inputs after their trims, and its base when the
    /// method uses one. Chunks hold whole rows when the recipe asks for them. Called once per
    /// selection pass and once more by each pass after a [`ScoreSelect::TopOfNonzero`] (its
    /// trim), so it must give the same bits each time for the same chunk.
    fn score(&self, _r: &TensorRecipe, _c: &Chunk<'_>, out: &mut [f32]) {
        out.fill(0.0);
    }
    /// Whether some tensor's recipe may carry a [`ScoreSelect`]: its score is one more chunk
    /// buffer in flight, counted when the chunk size is fitted to the memory budget.
    fn scores(&self) -> bool {
        false
    }
    /// Turns a tensor's finished reductions into what its apply pass reads as
    /// [`Stats::tensor`] (coefficients, say), once per tensor (default: the sums unchanged);
    /// `sums` are followed by the scores a [`ScoreSelect::Ranks`] asked for, and it is called
    /// whenever there are either. A failure that depends on the tensor's values, not on the
    /// parameters (multislerp's weighted mean of unit vectors being zero), is reported here,
    /// naming `tensor`, before anything of the tensor is written.
    fn derive(&self, _r: &TensorRecipe, _tensor: &str, sums: Vec<f64>) -> Result<Vec<f64>> {
        Ok(sums)
    }
    /// Merges one chunk into `out` (same length as the chunk).
    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]);
    /// The method's global options as recorded in the report and recipe (preset etc.).
    fn describe(&self) -> String {
        self.name().to_string()
    }
}

/// Names of the methods this build knows.
pub const METHODS: &[&str] = &[
    "ties",
    "linear",
    "task_arithmetic",
    "magnitude_prune",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "sce",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
];

/// Builds a method by name from the merge's parameters (checks unknown parameter names).
pub fn build(name: &str, params: &Params) -> Result<Box<dyn Method>> {
    let m: Box<dyn Method> = match name {
        "ties" => Box::new(ties::Ties::from_params(params)?),
        "linear" => Box::new(linear::Linear::from_params(params)?),
        "task_arithmetic" => Box::new(task_vector::TaskVectorMerge::task_arithmetic(params)?),
        "magnitude_prune" => Box::new(magnitude_prune::build(params)?),
        "dare_linear" => Box::new(dare::dare_linear(params)?),
        "dare_ties" => Box::new(dare::dare_ties(params)?),
        "breadcrumbs" => Box::new(breadcrumbs::breadcrumbs(params)?),
        "breadcrumbs_ties" => Box::new(breadcrumbs::breadcrumbs_ties(params)?),
        "della" => Box::new(della::della(params)?),
        "della_linear" => Box::new(della::della_linear(params)?),
        "slerp" => Box::new(slerp::Slerp::from_params(params)?),
        "model_stock" => Box::new(model_stock::ModelStock::from_params(params)?),
        "nuslerp" => Box::new(nuslerp::NuSlerp::from_params(params)?),
        "multislerp" => Box::new(multislerp::MultiSlerp::from_params(params)?),
        "karcher" => Box::new(karcher::Karcher::from_params(params)?),
        "nearswap" => Box::new(nearswap::NearSwap::from_params(params)?),
        "sce" => Box::new(sce::Sce::from_params(params)?),
        "arcee_fusion" => Box::new(arcee_fusion::ArceeFusion::from_params(params)?),
        "ram" => Box::new(ram::ram(params)?),
        "ramplus_tl" => Box::new(ram::ramplus_tl(params)?),
        other => {
            return Err(Error::Spec(format!("unknown merge method {other:?} (known: {})", METHODS.join(", "))));
        }
    };
    check_param_names(m.as_ref(), params)?;
    Ok(m)
}

fn check_param_names(m: &dyn Method, params: &Params) -> Result<()> {
    let known = m.params();
    let mut errors = Vec::new();
    for key in params.global.keys() {
        if !known.iter().any(|p| p.name == key) {
            errors.push(Error::Param {
                name: key.clone(),
                reason: format!("{} has no such parameter (it takes: {})", m.name(), names(known)),
                place: String::new(),
            });
        }
    }
    for (i, map) in params.models.iter().enumerate() {
        for key in map.keys() {
            match known.iter().find(|p| p.name == key) {
                Some(p) if p.per_model => {}
                Some(_) => errors.push(Error::Param {
                    name: key.clone(),
                    reason: "is global and cannot be set per model".into(),
                    place: format!(" (model {})", i + 1),
                }),
                None => errors.push(Error::Param {
                    name: key.clone(),
                    reason: format!("{} has no such parameter (it takes: {})", m.name(), names(known)),
                    place: format!(" (model {})", i + 1),
                }),
            }
        }
    }
    match Error::from_many(errors) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn names(p: &[ParamSpec]) -> String {
    p.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}
