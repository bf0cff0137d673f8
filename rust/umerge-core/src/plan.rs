//! Planning: decide every output tensor, and find every problem, before any work.
//!
//! First the routes: for each output tensor, the name each input holds it under. Without slices
//! that is the union of tensor names (base order first, then each model's), every input under
//! the same name. With slices ([`SliceSpec`], mergekit's layer stacking) the output's layers are
//! the slices' layers in order, renumbered from 0: output layer `J` of a slice takes layer
//! `start + (J - first layer of the slice)` of each of the slice's sources (and of the base when
//! the slice gives `base_layer_range`); layers no slice takes are left out; the tensors outside
//! the layers come from the first slice's inputs when they sit before the layers (embeddings)
//! and from the last slice's when they sit after them (final norm, lm_head), as mergekit's
//! planner takes them. Then, for each output tensor, what it is:
//! - a float tensor with models: **merge** it over the models that have it (a tensor missing from
//!   some models is merged over the others with a warning, as mergekit does, or is an error with
//!   `strict`); embedding-like tensors (`embed_tokens`, `lm_head`, `wte`, `word_embeddings`,
//!   `embed_out`) larger than the base are cropped to the base's shape with a warning; any other
//!   shape mismatch is an error naming the tensor and both files;
//! - with [`Combine::Passthrough`] (mergekit's passthrough): **copy** it from its one model,
//!   times the model's `scale` where one is given (no scale, or 1, is a byte copy);
//! - a float tensor only the base has: **copy** it (warning);
//! - a non-float tensor: **copy** it when identical (dtype, shape, bytes) in every input that has
//!   it, else an error.
//!
//! Every problem is collected and reported at once ([`Error::Many`]); nothing is written before
//! the plan succeeds. This module reads tensor bytes only to compare non-float tensors.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{is_float, Dtype};
use crate::error::{Error, Result};
use crate::methods::{BaseUse, Method, TensorCtx, TensorRecipe};
use crate::params::{after_layers, layer_index, layer_position, with_layer, ParamValue, Params, TensorPos};
use crate::spec::SliceSpec;

/// Which input a tensor is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputId {
    /// The base model.
    Base,
    /// Model `i` of the spec.
    Model(usize),
    /// An all-zero base (adapters: the task vectors are the weights themselves).
    Zeros,
}

/// A tensor to read: which input, where, and how to crop it to the output shape.
#[derive(Debug, Clone)]
pub struct SrcRef {
    /// The input.
    pub input: InputId,
    /// The tensor as stored (absent for [`InputId::Zeros`]).
    pub info: Option<TensorInfo>,
    /// `(output columns, stored columns)` when a 2-D tensor is cropped in its second dimension too.
    pub crop_cols: Option<(usize, usize)>,
}

/// What happens to one output tensor.
#[derive(Debug, Clone)]
pub enum Action {
    /// Merge with the method.
    Merge {
        /// The base (required by task-vector methods).
        base: Option<SrcRef>,
        /// The models that have the tensor: (model index, source).
        models: Vec<(usize, SrcRef)>,
        /// The method's resolved recipe.
        recipe: TensorRecipe,
    },
    /// Copy from one input (converted to the output dtype when both are float and differ).
    Copy {
        /// The input tensor.
        src: SrcRef,
        /// Multiply every element by this (computed in f32); `None` copies the values unchanged
        /// (the bytes themselves when the dtype is kept).
        scale: Option<f32>,
    },
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name.
    pub name: String,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Output dtype.
    pub dtype: Dtype,
    /// What to do.
    pub action: Action,
    /// Input bytes this tensor reads once (for progress and the report).
    pub in_bytes: u64,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The inputs of a merge.
#[derive(Debug)]
pub struct Inputs {
    /// Base checkpoint, if any.
    pub base: Option<Checkpoint>,
    /// Model checkpoints in spec order.
    pub models: Vec<Checkpoint>,
    /// Use an all-zero base (adapter merges); `base` must then be `None`.
    pub zero_base: bool,
}

impl Inputs {
    /// The checkpoint behind an input id.
    pub fn get(&self, id: InputId) -> Option<&Checkpoint> {
        match id {
            InputId::Base => self.base.as_ref(),
            InputId::Model(i) => self.models.get(i),
            InputId::Zeros => None,
        }
    }
}

/// How output tensors are made from their inputs.
#[derive(Clone, Copy)]
pub enum Combine<'a> {
    /// Merged by a method.
    Method(&'a dyn Method),
    /// Copied from the tensor's single model, times that model's `scale` parameter where one
    /// is given (mergekit's `passthrough`; with slices, the layer stacking of frankenmerges).
    Passthrough,
}

impl Combine<'_> {
    fn base_use(&self) -> BaseUse {
        match self {
            Combine::Method(m) => m.base_use(),
            Combine::Passthrough => BaseUse::Unused,
        }
    }

    fn name(&self) -> &str {
        match self {
            Combine::Method(m) => m.name(),
            Combine::Passthrough => "passthrough",
        }
    }
}

/// Options that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions<'a> {
    /// Missing tensors are errors.
    pub strict: bool,
    /// Output dtype for float tensors (default: the base's, or the first model's).
    pub out_dtype: Option<Dtype>,
    /// Layer stacking (empty: every model's layers as they are).
    pub slices: &'a [SliceSpec],
}

/// The resolved merge.
#[derive(Debug)]
pub struct Plan {
    /// Output tensors in output order.
    pub tensors: Vec<PlannedTensor>,
    /// Warnings (missing tensors, cropped embeddings).
    pub warnings: Vec<String>,
    /// The dtype recorded in config.json (when every float output tensor shares one).
    pub float_dtype: Option<Dtype>,
    /// The output's number of layers when slices restack them (recorded in config.json).
    pub num_layers: Option<usize>,
}

const EMBEDDING_NAMES: &[&str] = &["embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out"];

fn is_embedding_like(name: &str) -> bool {
    EMBEDDING_NAMES.iter().any(|p| name.contains(p))
}

/// Where one output tensor comes from: the name each input holds it under.
#[derive(Debug)]
struct Route {
    name: String,
    sources: Sources,
}

/// The names an output tensor's inputs hold it under.
#[derive(Debug)]
enum Sources {
    /// Every input under the output's name (no slices).
    Same,
    /// Each input under its own name (slices), `None` for an input that takes no part.
    Each { base: Option<String>, models: Vec<Option<String>> },
}

impl Route {
    /// The name the base holds this tensor under, when it takes part.
    fn base(&self) -> Option<&str> {
        match &self.sources {
            Sources::Same => Some(&self.name),
            Sources::Each { base, .. } => base.as_deref(),
        }
    }

    /// The name model `i` holds this tensor under, when it takes part.
    fn model(&self, i: usize) -> Option<&str> {
        match &self.sources {
            Sources::Same => Some(&self.name),
            Sources::Each { models, .. } => models.get(i)?.as_deref(),
        }
    }
}

/// Builds the plan; every problem found is returned at once.
pub fn plan(combine: Combine<'_>, inputs: &Inputs, params: &Params, opts: &PlanOptions<'_>) -> Result<Plan> {
    let (routes, num_layers) = if opts.slices.is_empty() {
        let routes = plain_routes(inputs);
        let n = routes.iter().filter_map(|r| layer_index(&r.name)).max().map_or(0, |m| m + 1);
        (routes, n)
    } else {
        sliced_routes(combine, inputs, opts.slices)?
    };
    if let Combine::Passthrough = combine {
        check_passthrough_params(params)?;
    }

    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut tensors = Vec::with_capacity(routes.len());
    for route in &routes {
        match plan_one(combine, inputs, params, opts, route, num_layers, &mut warnings) {
            Ok(Some(t)) => tensors.push(t),
            Ok(None) => {}
            Err(Error::Many(v)) => errors.extend(v),
            Err(e) => errors.push(e),
        }
    }
    if let Some(e) = Error::from_many(errors) {
        return Err(e);
    }
    let float_dtypes: BTreeSet<String> = tensors.iter().filter(|t| is_float(t.dtype)).map(|t| format!("{:?}", t.dtype)).collect();
    let float_dtype = if float_dtypes.len() == 1 { tensors.iter().find(|t| is_float(t.dtype)).map(|t| t.dtype) } else { None };
    let num_layers = (!opts.slices.is_empty()).then_some(num_layers);
    Ok(Plan { tensors, warnings, float_dtype, num_layers })
}

/// Every tensor name of the inputs (base order first, then each model's), each input under that name.
fn plain_routes(inputs: &Inputs) -> Vec<Route> {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut routes = Vec::new();
    for c in inputs.base.iter().chain(inputs.models.iter()) {
        for n in &c.order {
            if seen.insert(n.as_str()) {
                routes.push(Route { name: n.clone(), sources: Sources::Same });
            }
        }
    }
    routes
}

/// Number of layers of a checkpoint: one more than its highest layer index (0 without layers).
fn layer_count(c: &Checkpoint) -> usize {
    c.order.iter().filter_map(|n| layer_index(n)).max().map_or(0, |m| m + 1)
}

/// One input of a slice: which input, and its first layer.
#[derive(Clone, Copy)]
struct SliceInput {
    input: InputId,
    start: usize,
}

/// Checks the slices against the inputs and returns each slice's inputs (the base first, when
/// it takes part) and length in layers.
fn check_slices(combine: Combine<'_>, inputs: &Inputs, slices: &[SliceSpec]) -> Result<Vec<(Vec<SliceInput>, usize)>> {
    let base_use = combine.base_use();
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(slices.len());
    for (k, s) in slices.iter().enumerate() {
        let here = format!("slice {}", k + 1);
        let mut ins = Vec::new();
        let mut ranges: Vec<(String, [usize; 2], usize)> = Vec::new(); // (input, range, its layers)
        if let Some(r) = s.base_layer_range {
            match (&inputs.base, base_use) {
                (None, _) => errors.push(Error::Spec(format!("{here} gives base_layer_range but the merge has no base"))),
                (Some(_), BaseUse::Unused) => errors.push(Error::Spec(format!(
                    "{here} gives base_layer_range but {} does not use a base (list the base among the sources to merge it as a model)",
                    combine.name()
                ))),
                (Some(b), _) => {
                    ins.push(SliceInput { input: InputId::Base, start: r[0] });
                    ranges.push((format!("the base {}", b.display()), r, layer_count(b)));
                }
            }
        } else if base_use == BaseUse::Required && inputs.base.is_some() {
            errors.push(Error::Spec(format!(
                "{here} does not take the base's layers (base_layer_range): {} merges task vectors (model - base), so the base must be one of every slice's inputs",
                combine.name()
            )));
        }
        if s.sources.is_empty() {
            errors.push(Error::Spec(format!("{here} has no sources")));
        }
        if let Combine::Passthrough = combine {
            if s.sources.len() > 1 {
                errors.push(Error::Spec(format!(
                    "{here} has {} sources: passthrough copies each tensor from one model, so a slice takes one",
                    s.sources.len()
                )));
            }
        }
        let mut seen = BTreeSet::new();
        for src in &s.sources {
            let Some(c) = inputs.models.get(src.model) else {
                errors.push(Error::Spec(format!("{here}: model index {} is out of range ({} models)", src.model, inputs.models.len())));
                continue;
            };
            if !seen.insert(src.model) {
                errors.push(Error::Spec(format!("{here} takes model {} twice: each slice takes each model once", c.display())));
                continue;
            }
            ins.push(SliceInput { input: InputId::Model(src.model), start: src.layer_range[0] });
            ranges.push((format!("model {}", c.display()), src.layer_range, layer_count(c)));
        }
        let mut len = None;
        for (who, [a, b], have) in &ranges {
            if a >= b {
                errors.push(Error::Spec(format!(
                    "{here}: layer_range [{a}, {b}] of {who} is empty or reversed (give [start, end) with start < end)"
                )));
            } else if *b > *have {
                errors.push(Error::Spec(format!(
                    "{here}: layer_range [{a}, {b}] of {who} goes past its {have} layers (layers 0 to {})",
                    have.saturating_sub(1)
                )));
            } else if let Some((first, l)) = &len {
                if b - a != *l {
                    errors.push(Error::Spec(format!(
                        "{here}: layer_range [{a}, {b}] of {who} has {} layers but {first}'s has {l}: every input of a slice gives the same number of layers",
                        b - a
                    )));
                }
            } else {
                len = Some((who.clone(), b - a));
            }
        }
        out.push((ins, len.map_or(0, |(_, l)| l)));
    }
    match Error::from_many(errors) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The routes of a sliced merge (see the module docs) and its number of output layers.
fn sliced_routes(combine: Combine<'_>, inputs: &Inputs, slices: &[SliceSpec]) -> Result<(Vec<Route>, usize)> {
    let checked = check_slices(combine, inputs, slices)?;
    let n_models = inputs.models.len();
    let ck = |id: InputId| inputs.get(id);
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut routes = Vec::new();
    // A route naming `name` in every input of `ins`, with each input's layer set by `layer_of`.
    let route = |name: &str, ins: &[SliceInput], layer_of: &dyn Fn(&SliceInput) -> Option<usize>| -> Route {
        let rename = |i: &SliceInput| match layer_of(i) {
            Some(l) => with_layer(name, l).unwrap_or_else(|| name.to_string()),
            None => name.to_string(),
        };
        let (mut base, mut models) = (None, vec![None; n_models]);
        for i in ins {
            match i.input {
                InputId::Base => base = Some(rename(i)),
                InputId::Model(m) => models[m] = Some(rename(i)),
                InputId::Zeros => {}
            }
        }
        Route { name: name.to_string(), sources: Sources::Each { base, models } }
    };
    let outside = |ins: &[SliceInput], after: bool, seen: &mut BTreeSet<String>, routes: &mut Vec<Route>| {
        for i in ins {
            for n in ck(i.input).map(|c| c.order.as_slice()).unwrap_or_default() {
                if layer_index(n).is_none() && after_layers(n) == after && seen.insert(n.clone()) {
                    routes.push(route(n, ins, &|_| None));
                }
            }
        }
    };
    let (first, last) = (&checked[0].0, &checked[checked.len() - 1].0);
    outside(first, false, &mut seen, &mut routes);
    let mut out_layer = 0usize;
    for (ins, len) in &checked {
        // Each input's tensor names by layer, in storage order.
        let by_layer: Vec<Vec<Vec<&str>>> = ins
            .iter()
            .map(|i| {
                let mut v: Vec<Vec<&str>> = Vec::new();
                for n in ck(i.input).map(|c| c.order.as_slice()).unwrap_or_default() {
                    if let Some(l) = layer_index(n) {
                        if v.len() <= l {
                            v.resize(l + 1, Vec::new());
                        }
                        v[l].push(n.as_str());
                    }
                }
                v
            })
            .collect();
        for offset in 0..*len {
            for (i, names) in ins.iter().zip(&by_layer) {
                for n in names.get(i.start + offset).map(Vec::as_slice).unwrap_or_default() {
                    let out = with_layer(n, out_layer).unwrap_or_else(|| n.to_string());
                    if seen.insert(out.clone()) {
                        routes.push(route(&out, ins, &|j| Some(j.start + offset)));
                    }
                }
            }
            out_layer += 1;
        }
    }
    outside(last, true, &mut seen, &mut routes);
    Ok((routes, out_layer))
}

/// Passthrough takes one parameter, `scale`, global or per model.
fn check_passthrough_params(params: &Params) -> Result<()> {
    let place = |m: Option<usize>| m.map(|i| format!(" (model {})", i + 1)).unwrap_or_default();
    let maps = std::iter::once((None, &params.global)).chain(params.models.iter().enumerate().map(|(i, m)| (Some(i), m)));
    for (m, map) in maps {
        for (key, v) in map {
            if key != "scale" {
                return Err(Error::Param {
                    name: key.clone(),
                    reason: "passthrough has no such parameter (it takes: scale)".into(),
                    place: place(m),
                });
            }
            if matches!(v, ParamValue::Bool(_) | ParamValue::Text(_)) {
                return Err(Error::Param {
                    name: key.clone(),
                    reason: "must be a number, a gradient or filter rules".into(),
                    place: place(m),
                });
            }
        }
    }
    Ok(())
}

fn file_of(inputs: &Inputs, id: InputId, info: &TensorInfo) -> PathBuf {
    inputs.get(id).map(|c| c.file_of(info)).unwrap_or_default()
}

fn plan_one(
    combine: Combine<'_>,
    inputs: &Inputs,
    params: &Params,
    opts: &PlanOptions<'_>,
    route: &Route,
    num_layers: usize,
    warnings: &mut Vec<String>,
) -> Result<Option<PlannedTensor>> {
    let name = route.name.as_str();
    let base = route.base().and_then(|n| inputs.base.as_ref()?.tensors.get(n));
    let assigned: Vec<usize> = (0..inputs.models.len()).filter(|&i| route.model(i).is_some()).collect();
    let have: Vec<(usize, &TensorInfo)> =
        assigned.iter().filter_map(|&i| inputs.models[i].tensors.get(route.model(i)?).map(|t| (i, t))).collect();
    let missing: Vec<usize> = assigned.iter().copied().filter(|i| !have.iter().any(|(j, _)| j == i)).collect();
    let (ref_id, ref_info) = match (base, have.first()) {
        (Some(b), _) => (InputId::Base, b),
        (None, Some((i, t))) => (InputId::Model(*i), *t),
        (None, None) => return Ok(None),
    };
    let mut errors = Vec::new();
    if opts.strict {
        for &i in &missing {
            errors.push(Error::MissingTensor {
                tensor: route.model(i).unwrap_or_default().to_string(),
                path: inputs.models[i].path.clone(),
                hint: format!(" but present in {} (strict mode)", file_of(inputs, ref_id, ref_info).display()),
            });
        }
    }

    // Non-float tensors: carried over when identical everywhere.
    if !is_float(ref_info.dtype) {
        let ref_ck = inputs.get(ref_id).ok_or_else(|| Error::Internal("reference input missing".into()))?;
        let ref_bytes = ref_ck.tensor_bytes(ref_info)?;
        for &(i, t) in &have {
            let same = t.dtype == ref_info.dtype && t.shape == ref_info.shape && inputs.models[i].tensor_bytes(t)? == ref_bytes;
            if !same {
                errors.push(Error::NonFloatDiffers {
                    tensor: name.to_string(),
                    dtype: format!("{:?}", ref_info.dtype),
                    file_a: file_of(inputs, ref_id, ref_info),
                    file_b: inputs.models[i].file_of(t),
                });
            }
        }
        if let Some(e) = Error::from_many(errors) {
            return Err(e);
        }
        return Ok(Some(PlannedTensor {
            name: name.to_string(),
            shape: ref_info.shape.clone(),
            dtype: ref_info.dtype,
            action: Action::Copy { src: SrcRef { input: ref_id, info: Some(ref_info.clone()), crop_cols: None }, scale: None },
            in_bytes: ref_info.nbytes(),
        }));
    }

    for &(i, t) in &have {
        if !is_float(t.dtype) {
            errors.push(Error::DtypeMismatch {
                tensor: name.to_string(),
                dtype_a: format!("{:?}", ref_info.dtype),
                file_a: file_of(inputs, ref_id, ref_info),
                dtype_b: format!("{:?}", t.dtype),
                file_b: inputs.models[i].file_of(t),
            });
        }
    }
    let out_dtype = opts.out_dtype.unwrap_or(ref_info.dtype);
    let shape = ref_info.shape.clone();
    let pos = TensorPos { name, t: layer_position(name, num_layers) };

    if let Combine::Passthrough = combine {
        if let Some(e) = Error::from_many(errors) {
            return Err(e);
        }
        let [(i, info)] = have.as_slice() else {
            return Err(Error::Spec(format!(
                "passthrough copies each tensor from one model, but {name} comes from {} models: give one model (or one source per slice)",
                have.len()
            )));
        };
        let scale = params.raw(Some(*i), "scale").and_then(|v| v.number_at(&pos));
        if let Some(s) = scale {
            if !s.is_finite() {
                return Err(Error::Param {
                    name: "scale".into(),
                    reason: format!("{s} is not a finite number"),
                    place: format!(" (tensor {name})"),
                });
            }
        }
        return Ok(Some(PlannedTensor {
            name: name.to_string(),
            shape: info.shape.clone(),
            dtype: out_dtype,
            action: Action::Copy {
                src: SrcRef { input: InputId::Model(*i), info: Some((*info).clone()), crop_cols: None },
                // A scale of exactly 1 leaves every value as it is: copied, not multiplied.
                scale: scale.filter(|&s| s != 1.0).map(|s| s as f32),
            },
            in_bytes: info.nbytes(),
        }));
    }
    let Combine::Method(method) = combine else { unreachable!("passthrough returned above") };
    let needs_base = method.base_use() == BaseUse::Required;

    if needs_base && base.is_none() && !inputs.zero_base {
        errors.push(Error::MissingTensor {
            tensor: route.base().unwrap_or(name).to_string(),
            path: inputs.base.as_ref().map(|b| b.path.clone()).unwrap_or_default(),
            hint: format!(
                " (the base) but present in {}: {} merges task vectors (model - base), so every merged tensor needs a base",
                file_of(inputs, ref_id, ref_info).display(),
                method.name()
            ),
        });
        return Err(Error::from_many(errors).unwrap_or_else(|| Error::Internal("unreachable".into())));
    }

    if have.is_empty() {
        if let Some(e) = Error::from_many(errors) {
            return Err(e);
        }
        warnings.push(format!("tensor {name} is only in the base: copied unchanged"));
        return Ok(Some(PlannedTensor {
            name: name.to_string(),
            shape,
            dtype: out_dtype,
            action: Action::Copy { src: SrcRef { input: ref_id, info: Some(ref_info.clone()), crop_cols: None }, scale: None },
            in_bytes: ref_info.nbytes(),
        }));
    }
    // Shapes: every model must match the reference, or be a larger embedding (cropped).
    let mut models = Vec::with_capacity(have.len());
    for &(i, t) in &have {
        let mut crop_cols = None;
        if t.shape != shape {
            let croppable = is_embedding_like(name)
                && t.shape.len() == shape.len()
                && !shape.is_empty()
                && t.shape.iter().zip(&shape).all(|(a, b)| a >= b)
                && shape.len() <= 2;
            if croppable {
                warnings.push(format!(
                    "tensor {name} has shape {:?} in {} but {:?} in {}: using its first {:?} block (like mergekit)",
                    t.shape,
                    inputs.models[i].display(),
                    shape,
                    inputs.get(ref_id).map(|c| c.display()).unwrap_or_default(),
                    shape
                ));
                if shape.len() == 2 && t.shape[1] != shape[1] {
                    crop_cols = Some((shape[1], t.shape[1]));
                }
            } else {
                errors.push(Error::ShapeMismatch(Box::new(crate::error::ShapeMismatch {
                    tensor: name.to_string(),
                    shape_a: t.shape.clone(),
                    file_a: inputs.models[i].file_of(t),
                    shape_b: shape.clone(),
                    file_b: file_of(inputs, ref_id, ref_info),
                    hint: if is_embedding_like(name) {
                        " (embedding rows can only be cropped down to the base's shape)".into()
                    } else {
                        String::new()
                    },
                })));
            }
        }
        models.push((i, SrcRef { input: InputId::Model(i), info: Some(t.clone()), crop_cols }));
    }
    if !missing.is_empty() && !opts.strict {
        let names: Vec<String> = missing.iter().map(|&i| inputs.models[i].display()).collect();
        warnings.push(format!("tensor {name} is missing from {}: merged over the {} model(s) that have it", names.join(", "), have.len()));
    }

    let model_ids: Vec<usize> = have.iter().map(|(i, _)| *i).collect();
    let ctx = TensorCtx { name, shape: &shape, pos, params, models: &model_ids };
    let recipe = match method.plan_tensor(&ctx) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if let Some(e) = Error::from_many(errors) {
        return Err(e);
    }
    let recipe = recipe.ok_or_else(|| Error::Internal("recipe missing".into()))?;
    let base_src = if needs_base || method.base_use() == BaseUse::Optional {
        match base {
            Some(b) => Some(SrcRef { input: InputId::Base, info: Some(b.clone()), crop_cols: None }),
            None if inputs.zero_base => Some(SrcRef { input: InputId::Zeros, info: None, crop_cols: None }),
            None => None,
        }
    } else {
        None
    };
    let in_bytes = base_src.as_ref().and_then(|s| s.info.as_ref()).map_or(0, |i| i.nbytes())
        + models.iter().map(|(_, s)| s.info.as_ref().map_or(0, |i| i.nbytes())).sum::<u64>();
    Ok(Some(PlannedTensor {
        name: name.to_string(),
        shape,
        dtype: out_dtype,
        action: Action::Merge { base: base_src, models, recipe },
        in_bytes,
    }))
}
