//! Planning: decide every output tensor, and find every problem, before any work.
//!
//! The plan takes the union of tensor names (base order first, then each model's), and for each
//! name decides what the output is:
//! - a float tensor with models: **merge** it over the models that have it (a tensor missing from
//!   some models is merged over the others with a warning, as mergekit does, or is an error with
//!   `strict`); embedding-like tensors (`embed_tokens`, `lm_head`, `wte`, `word_embeddings`,
//!   `embed_out`) larger than the base are cropped to the base's shape with a warning; any other
//!   shape mismatch is an error naming the tensor and both files;
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
use crate::params::{layer_index, layer_position, Params, TensorPos};

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
    Copy(SrcRef),
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

/// Options that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Missing tensors are errors.
    pub strict: bool,
    /// Output dtype for float tensors (default: the base's, or the first model's).
    pub out_dtype: Option<Dtype>,
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
}

const EMBEDDING_NAMES: &[&str] = &["embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out"];

fn is_embedding_like(name: &str) -> bool {
    EMBEDDING_NAMES.iter().any(|p| name.contains(p))
}

/// Builds the plan; every problem found is returned at once.
pub fn plan(method: &dyn Method, inputs: &Inputs, params: &Params, opts: &PlanOptions) -> Result<Plan> {
    let mut names: Vec<&str> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let all: Vec<&Checkpoint> = inputs.base.iter().chain(inputs.models.iter()).collect();
    for c in &all {
        for n in &c.order {
            if seen.insert(n.as_str()) {
                names.push(n.as_str());
            }
        }
    }
    let num_layers = names.iter().filter_map(|n| layer_index(n)).max().map_or(0, |m| m + 1);

    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        match plan_one(method, inputs, params, opts, name, num_layers, &mut warnings) {
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
    Ok(Plan { tensors, warnings, float_dtype })
}

fn file_of(inputs: &Inputs, id: InputId, info: &TensorInfo) -> PathBuf {
    inputs.get(id).map(|c| c.file_of(info)).unwrap_or_default()
}

fn plan_one(
    method: &dyn Method,
    inputs: &Inputs,
    params: &Params,
    opts: &PlanOptions,
    name: &str,
    num_layers: usize,
    warnings: &mut Vec<String>,
) -> Result<Option<PlannedTensor>> {
    let base = inputs.base.as_ref().and_then(|b| b.tensors.get(name));
    let have: Vec<(usize, &TensorInfo)> =
        inputs.models.iter().enumerate().filter_map(|(i, c)| c.tensors.get(name).map(|t| (i, t))).collect();
    let missing: Vec<usize> = (0..inputs.models.len()).filter(|i| !have.iter().any(|(j, _)| j == i)).collect();
    let (ref_id, ref_info) = match (base, have.first()) {
        (Some(b), _) => (InputId::Base, b),
        (None, Some((i, t))) => (InputId::Model(*i), *t),
        (None, None) => return Ok(None),
    };
    let mut errors = Vec::new();
    if opts.strict {
        for &i in &missing {
            errors.push(Error::MissingTensor {
                tensor: name.to_string(),
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
            action: Action::Copy(SrcRef { input: ref_id, info: Some(ref_info.clone()), crop_cols: None }),
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
    let needs_base = method.base_use() == BaseUse::Required;

    if needs_base && base.is_none() && !inputs.zero_base {
        errors.push(Error::MissingTensor {
            tensor: name.to_string(),
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
            action: Action::Copy(SrcRef { input: ref_id, info: Some(ref_info.clone()), crop_cols: None }),
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
    let ctx = TensorCtx { name, shape: &shape, pos: TensorPos { name, t: layer_position(name, num_layers) }, params, models: &model_ids };
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
