//! Folding LoRA adapters into their base model: `W' = W + scaling * B @ A` for every targeted
//! module, streamed shard by shard into a full checkpoint (PEFT's `merge_and_unload` followed by
//! `save_pretrained`, without loading the model).
//!
//! An adapter is a safetensors file of factors named `<prefix><module>.lora_A.weight`
//! (`[r, in]`) and `<prefix><module>.lora_B.weight` (`[out, r]`); the base weight they update is
//! `<module>.weight`, of shape `[out, in]` (or `[in, out]` with `fan_in_fan_out`, where the
//! update is `(B @ A)^T`, GPT-2's Conv1D layout). The caller (Python) reads `adapter_config.json`
//! and passes each adapter's scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
//!
//! Without a method, every adapter's update is added: `W + sum_i s_i B_i A_i`. With a method
//! (`--delta full`), each module's updates `s_i B_i A_i` are the task vectors of an engine merge
//! (`methods::build`, over a zero base) and the merged update is added to `W`; the updates are
//! computed chunk by chunk as the engine's passes ask for them ([`LowRankSource`]), so no
//! full-size update is ever held unless the engine's tensor cache chooses to.
//!
//! Products go through `matrixmultiply::sgemm` on row blocks; arithmetic is float32, the sum is
//! rounded once to the output dtype (round to nearest even). PEFT rounds the update to the
//! weight's dtype before adding it, so in bf16 the two can differ by one unit in the last place;
//! in float32 they agree to rounding. Tensors the adapters do not touch are copied byte for byte
//! (converted when `out_dtype` differs). Output layout, atomic rename and side files as in `write`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::checksum::Frontier;
use crate::dtype::{decode, elem_bytes, encode, is_float, Dtype};
use crate::error::{Error, Result};
use crate::exec::prepare::{self, Beside, Ticker, Workers};
use crate::exec::readahead::{PagePolicy, ReadAhead, Span};
use crate::exec::{self, Engine, Job, MappedSource, Sink, Source, ZeroSource};
use crate::methods::{self, BaseUse, TensorCtx};
use crate::params::{layer_index, layer_position, ParamMap, Params, TensorPos};
use crate::report::{peak_rss_bytes, Report};
use crate::spec::{self, OutputOptions};
use crate::write::{ConfigEdits, OutTensor, Output};
use crate::Progress;

/// Suffix of a LoRA A factor.
pub const A_SUFFIX: &str = ".lora_A.weight";
/// Suffix of a LoRA B factor.
pub const B_SUFFIX: &str = ".lora_B.weight";
/// PEFT's prefix of every adapter tensor name.
pub const PEFT_PREFIX: &str = "base_model.model.";

fn default_prefix() -> String {
    PEFT_PREFIX.to_string()
}

/// One adapter to fold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldAdapter {
    /// The adapter's safetensors file (or a directory holding it).
    pub path: PathBuf,
    /// Multiplier of B @ A: lora_alpha / r (or / sqrt(r)), times any user weight.
    pub scaling: f64,
    /// The base stores these weights transposed (`[in, out]`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Prefix stripped from tensor names to get module paths.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

/// A whole fold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct FoldSpec {
    /// The base model the adapters were trained on.
    pub base: PathBuf,
    /// Adapters, in order.
    pub adapters: Vec<FoldAdapter>,
    /// Engine method merging the updates (none: they are summed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Global method parameters.
    #[serde(default)]
    pub params: ParamMap,
    /// Per-adapter method parameters (weights, densities).
    #[serde(default)]
    pub model_params: Vec<ParamMap>,
    /// Output directory, dtype and resources, as a merge's (flat in JSON). Unlike a merge, a fold
    /// takes `max_shard_size` 0: one tensor per shard.
    #[serde(skip)]
    pub output: OutputOptions,
}

impl<'de> Deserialize<'de> for FoldSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<FoldSpec, D::Error> {
        let (spec, output) = spec::deserialize_flat(d, FoldSpec::deserialize)?;
        Ok(FoldSpec { output, ..spec })
    }
}

impl Serialize for FoldSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        spec::serialize_flat(s, FoldSpec::serialize(self, serde_json::value::Serializer), &self.output)
    }
}

impl FoldSpec {
    /// Parses a spec from JSON.
    pub fn from_json(s: &str) -> Result<FoldSpec> {
        serde_json::from_str(s).map_err(|e| Error::Spec(format!("invalid fold spec: {e}")))
    }
}

/// One adapter's factors for one module, decoded to f32.
#[derive(Debug, Clone)]
pub struct Factors {
    /// A, row-major `[r, in]`.
    pub a: Vec<f32>,
    /// B, row-major `[out, r]`.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// Scaling applied to B @ A.
    pub scaling: f32,
    /// The target is stored `[in, out]`.
    pub fan_in_fan_out: bool,
}

impl Factors {
    /// `out[rows x cols] = beta * out + scaling * (rows of the stored update)`, where the stored
    /// update has `cols` columns (`in`, or `out` with fan_in_fan_out) and `rows` is a row range.
    pub fn product_rows(&self, rows: std::ops::Range<usize>, cols: usize, out: &mut [f32], beta: f32) {
        let m = rows.len();
        let k = self.r;
        if m == 0 || cols == 0 {
            return;
        }
        debug_assert!(out.len() >= m * cols);
        // SAFETY: the factor shapes were checked against the target at planning time:
        // normal: B is [R, r], A is [r, cols]; fan_in_fan_out: A is [r, R], B is [cols, r]; rows
        // lie in 0..R and `out` holds m * cols elements, so every strided access is in bounds.
        unsafe {
            if self.fan_in_fan_out {
                let big_r = self.a.len() / k.max(1);
                // stored[i, j] = sum_k A[k, i] * B[j, k]: lhs = A^T (row stride 1, col stride R),
                // rhs = B^T (row stride 1, col stride r).
                matrixmultiply::sgemm(
                    m,
                    k,
                    cols,
                    self.scaling,
                    self.a.as_ptr().add(rows.start),
                    1,
                    big_r as isize,
                    self.b.as_ptr(),
                    1,
                    k as isize,
                    beta,
                    out.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            } else {
                matrixmultiply::sgemm(
                    m,
                    k,
                    cols,
                    self.scaling,
                    self.b.as_ptr().add(rows.start * k),
                    k as isize,
                    1,
                    self.a.as_ptr(),
                    cols as isize,
                    1,
                    beta,
                    out.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            }
        }
    }
}

/// The update `scaling * B @ A` of one module as an engine [`Source`], computed on demand for
/// any flat element range (whole rows are multiplied, then the range is cut out).
pub struct LowRankSource<'a> {
    f: &'a Factors,
    cols: usize,
}

impl Source for LowRankSource<'_> {
    fn read(&self, start: u64, out: &mut [f32]) -> Result<()> {
        let cols = self.cols as u64;
        let r0 = (start / cols) as usize;
        let end = start + out.len() as u64;
        let r1 = end.div_ceil(cols) as usize;
        let off = (start - r0 as u64 * cols) as usize;
        if off == 0 && out.len() == (r1 - r0) * self.cols {
            self.f.product_rows(r0..r1, self.cols, out, 0.0);
        } else {
            let mut tmp = vec![0f32; (r1 - r0) * self.cols];
            self.f.product_rows(r0..r1, self.cols, &mut tmp, 0.0);
            out.copy_from_slice(&tmp[off..off + out.len()]);
        }
        Ok(())
    }
}

/// The factors of one adapter folded into one checkpoint as a merge reads it (mergekit's
/// `model+lora`), by the stored position `(shard, start)` of each weight they update: a position
/// names a tensor whatever the output calls it (slices rename layers). All factors are read up
/// front (an adapter is small beside its model: r (in + out) per module, decoded to f32).
#[derive(Default)]
pub struct FoldedWeights(std::collections::HashMap<(usize, usize), Factors>);

impl FoldedWeights {
    /// Matches `fa`'s factors to `model`'s weights and loads them (every problem at once, as `fold`).
    pub fn load(model: &Checkpoint, fa: &FoldAdapter, check_finite: bool) -> Result<FoldedWeights> {
        let ad = open_adapter(&fa.path)?;
        let one = FoldSpec {
            base: model.path.clone(),
            adapters: vec![fa.clone()],
            method: None,
            params: ParamMap::new(),
            model_params: Vec::new(),
            output: OutputOptions::default(),
        };
        let mut map = std::collections::HashMap::new();
        for (wname, t) in match_targets(model, std::slice::from_ref(&ad), &one, &[])? {
            let w = &model.tensors[&wname];
            for (_, a, b) in &t.by {
                map.insert((w.shard, w.start), load_factors(&ad, a, b, fa, check_finite, &wname)?);
            }
        }
        Ok(FoldedWeights(map))
    }

    /// The factors updating the stored tensor `info`, if any.
    pub fn of(&self, info: &TensorInfo) -> Option<&Factors> {
        self.0.get(&(info.shard, info.start))
    }
}

/// A model's weight with a LoRA update folded in as it is read, `W + scaling * B @ A` (the
/// product added to the decoded rows with one sgemm, beta = 1, as `fold` adds it).
pub struct FoldedSource<'a> {
    /// W.
    pub w: MappedSource<'a>,
    /// The update's factors.
    pub f: &'a Factors,
    /// Columns of W as stored.
    pub cols: usize,
}

impl Source for FoldedSource<'_> {
    fn read(&self, start: u64, out: &mut [f32]) -> Result<()> {
        let cols = self.cols as u64;
        let r0 = (start / cols) as usize;
        let r1 = (start + out.len() as u64).div_ceil(cols) as usize;
        let off = (start - r0 as u64 * cols) as usize;
        if off == 0 && out.len() == (r1 - r0) * self.cols {
            self.w.read(start, out)?;
            self.f.product_rows(r0..r1, self.cols, out, 1.0);
        } else {
            // A chunk that starts or ends inside a row: W + (whole rows of the product), cut.
            let mut tmp = vec![0f32; (r1 - r0) * self.cols];
            self.w.read(r0 as u64 * cols, &mut tmp)?;
            self.f.product_rows(r0..r1, self.cols, &mut tmp, 1.0);
            out.copy_from_slice(&tmp[off..off + out.len()]);
        }
        Ok(())
    }

    fn release(&self, start: u64, len: usize) {
        self.w.release(start, len);
    }

    fn mapped_bytes_per_elem(&self) -> u64 {
        self.w.mapped_bytes_per_elem()
    }
}

/// A targeted base tensor and the adapters touching it.
struct Target {
    /// Index into the output tensors.
    out_index: usize,
    /// (adapter index, factor tensor infos A and B).
    by: Vec<(usize, TensorInfo, TensorInfo)>,
    rows: usize,
    cols: usize,
}

fn module_of<'n>(name: &'n str, prefix: &str) -> Option<(&'n str, bool)> {
    let rest = name.strip_prefix(prefix).unwrap_or(name);
    if let Some(m) = rest.strip_suffix(A_SUFFIX) {
        Some((m, true))
    } else {
        rest.strip_suffix(B_SUFFIX).map(|m| (m, false))
    }
}

fn open_adapter(p: &Path) -> Result<Checkpoint> {
    if p.is_dir() {
        let f = p.join("adapter_model.safetensors");
        if f.is_file() {
            return Checkpoint::open(&f);
        }
    }
    Checkpoint::open(p)
}

/// Matches every adapter's factors to base tensors, collecting every problem.
fn match_targets(base: &Checkpoint, adapters: &[Checkpoint], spec: &FoldSpec, order: &[String]) -> Result<BTreeMap<String, Target>> {
    let index: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let mut errors = Vec::new();
    let mut targets: BTreeMap<String, Target> = BTreeMap::new();
    for (ai, (ad, fa)) in adapters.iter().zip(&spec.adapters).enumerate() {
        let mut pairs: BTreeMap<String, (Option<TensorInfo>, Option<TensorInfo>)> = BTreeMap::new();
        for (name, info) in &ad.tensors {
            match module_of(name, &fa.prefix) {
                Some((m, is_a)) => {
                    let e = pairs.entry(m.to_string()).or_default();
                    if is_a {
                        e.0 = Some(info.clone());
                    } else {
                        e.1 = Some(info.clone());
                    }
                }
                None => errors.push(Error::Spec(format!(
                    "adapter tensor {name} is not a lora_A/lora_B weight; only plain LoRA on linear layers can be folded ({})",
                    ad.display()
                ))),
            }
        }
        for (m, (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                errors.push(Error::Spec(format!("module {m} lacks its lora_A or lora_B weight ({})", ad.display())));
                continue;
            };
            let wname = format!("{m}.weight");
            let Some(w) = base.tensors.get(&wname) else {
                errors.push(Error::MissingTensor {
                    tensor: wname,
                    path: base.path.clone(),
                    hint: format!(": the adapter {} targets module {m}, which this base does not have (wrong --base?)", ad.display()),
                });
                continue;
            };
            let ok_dtypes = is_float(w.dtype) && is_float(a.dtype) && is_float(b.dtype);
            let (rows, cols) = match w.shape.as_slice() {
                [r, c] => (*r, *c),
                _ => (0, 0),
            };
            let (out_dim, in_dim) = if fa.fan_in_fan_out { (cols, rows) } else { (rows, cols) };
            let shapes_ok = a.shape.len() == 2
                && b.shape.len() == 2
                && a.shape[0] == b.shape[1]
                && a.shape[1] == in_dim
                && b.shape[0] == out_dim
                && rows > 0;
            if !ok_dtypes {
                errors.push(Error::Spec(format!("module {m}: base weight or factors are not float tensors ({})", ad.display())));
                continue;
            }
            if !shapes_ok {
                errors.push(Error::ShapeMismatch(Box::new(crate::error::ShapeMismatch {
                    tensor: wname,
                    shape_a: vec![b.shape.first().copied().unwrap_or(0), a.shape.get(1).copied().unwrap_or(0)],
                    file_a: ad.file_of(&a),
                    shape_b: w.shape.clone(),
                    file_b: base.file_of(w),
                    hint: format!(
                        " (lora_B {:?} @ lora_A {:?}{}): the adapter does not fit this base (wrong --base?)",
                        b.shape,
                        a.shape,
                        if fa.fan_in_fan_out { ", fan_in_fan_out" } else { "" }
                    ),
                })));
                continue;
            }
            let t = targets.entry(wname.clone()).or_insert_with(|| Target {
                out_index: index.get(wname.as_str()).copied().unwrap_or(0),
                by: Vec::new(),
                rows,
                cols,
            });
            t.by.push((ai, a, b));
        }
    }
    match Error::from_many(errors) {
        Some(e) => Err(e),
        None => Ok(targets),
    }
}

fn load_factors(ad: &Checkpoint, a: &TensorInfo, b: &TensorInfo, fa: &FoldAdapter, check_finite: bool, name: &str) -> Result<Factors> {
    let mut av = vec![0f32; a.numel() as usize];
    let mut bv = vec![0f32; b.numel() as usize];
    decode(a.dtype, ad.tensor_bytes(a)?, &mut av);
    decode(b.dtype, ad.tensor_bytes(b)?, &mut bv);
    if check_finite {
        for (v, info) in [(&av, a), (&bv, b)] {
            if let Some(p) = exec::first_nonfinite(v) {
                return Err(Error::NonFinite { tensor: name.to_string(), index: p as u64, path: ad.file_of(info) });
            }
        }
    }
    Ok(Factors { a: av, b: bv, r: a.shape[0], scaling: fa.scaling as f32, fan_in_fan_out: fa.fan_in_fan_out })
}

/// Adds the merged update to the base rows and writes the result.
struct FoldSink<'a> {
    w: MappedSource<'a>,
    out: &'a Output,
    ti: usize,
    dtype: Dtype,
}

impl Sink for FoldSink<'_> {
    fn write(&self, _job: usize, start: u64, values: &[f32]) -> Result<()> {
        let mut w = vec![0f32; values.len()];
        self.w.read(start, &mut w)?;
        self.w.release(start, values.len());
        for (x, d) in w.iter_mut().zip(values) {
            *x += *d;
        }
        let eb = elem_bytes(self.dtype).unwrap_or(4);
        let mut bytes = vec![0u8; w.len() * eb];
        encode(self.dtype, &w, &mut bytes);
        self.out.write_at(self.ti, start * eb as u64, &bytes)
    }
}

/// `W + sum_i s_i B_i A_i` for one tensor (`src`: W), in row blocks of about `chunk` elements,
/// in parallel.
fn fold_sum(src: &MappedSource<'_>, factors: &[Factors], t: &Target, dtype: Dtype, out: &Output, chunk: usize) -> Result<()> {
    let rows_per = (chunk / t.cols.max(1)).max(1);
    let blocks: Vec<(usize, usize)> = (0..t.rows).step_by(rows_per).map(|r| (r, (r + rows_per).min(t.rows))).collect();
    let eb = elem_bytes(dtype).unwrap_or(4);
    blocks.par_iter().try_for_each(|&(r0, r1)| -> Result<()> {
        let start = (r0 * t.cols) as u64;
        let len = (r1 - r0) * t.cols;
        let mut vals = vec![0f32; len];
        src.read(start, &mut vals)?;
        src.release(start, len);
        for f in factors {
            f.product_rows(r0..r1, t.cols, &mut vals, 1.0);
        }
        let mut bytes = vec![0u8; len * eb];
        encode(dtype, &vals, &mut bytes);
        out.write_at(t.out_index, start * eb as u64, &bytes)
    })
}

/// Folds the adapters of `spec` into its base and writes the full checkpoint; returns the report.
pub fn fold(spec: &FoldSpec, progress: Option<Progress<'_>>) -> Result<Report> {
    let t0 = Instant::now();
    if spec.adapters.is_empty() {
        return Err(Error::Spec("no adapters given".into()));
    }
    prepare::check_workers(spec.output.threads, spec.output.memory_budget)?;
    let out_dtype = prepare::out_dtype(spec.output.out_dtype.as_deref())?;
    let params = Params { global: spec.params.clone(), models: spec.model_params.clone() };
    let method = match &spec.method {
        Some(m) => Some(methods::build(m, &params)?),
        None => None,
    };
    if method.is_none() && !(spec.params.is_empty() && spec.model_params.iter().all(|m| m.is_empty())) {
        return Err(Error::Spec("method parameters given without a method".into()));
    }

    let adapter_paths: Vec<&Path> = spec.adapters.iter().map(|a| a.path.as_path()).collect();
    let opened = prepare::open_inputs(Some(&spec.base), &adapter_paths, open_adapter, &spec.output.out, spec.output.overwrite)?;
    let (Some(base), adapters, target) = (opened.base, opened.models, opened.target) else {
        return Err(Error::Internal("inputs missing after opening".into()));
    };
    let order = base.order.clone();
    let targets = match_targets(&base, &adapters, spec, &order)?;
    if targets.is_empty() {
        return Err(Error::Spec(format!("the adapters target no tensor of the base {}", base.display())));
    }

    // Output: the base's tensors, in its order, floats in the output dtype.
    let mut float_dtype = None;
    let out_tensors: Vec<OutTensor> = order
        .iter()
        .filter_map(|n| base.tensors.get(n).map(|t| (n, t)))
        .map(|(n, t)| {
            let dtype = if is_float(t.dtype) {
                float_dtype.get_or_insert(t.dtype);
                out_dtype.unwrap_or(t.dtype)
            } else {
                t.dtype
            };
            OutTensor { name: n.clone(), dtype, shape: t.shape.clone() }
        })
        .collect();
    let out = prepare::create_output(&target, &out_tensors, spec.output.max_shard_size)?;

    let buffers = spec.adapters.len() + 1 + usize::from(method.as_ref().is_some_and(|m| m.scores()));
    let workers = Workers::new(spec.output.threads, spec.output.memory_budget, buffers, spec.output.allow_nonfinite)?;
    let (pool, chunk, check_finite) = (&workers.pool, workers.chunk, workers.check_finite);
    let num_layers = order.iter().filter_map(|n| layer_index(n)).max().map_or(0, |m| m + 1);
    let total_bytes: u64 = base.total_bytes();
    let ticker = Ticker::new(progress, out_tensors.len() as u64, total_bytes);

    let out_bytes: u64 = out_tensors.iter().map(OutTensor::nbytes).sum();
    let policy = PagePolicy::parse(spec.output.page_cache.as_deref()).map_err(Error::Spec)?;
    // As in a merge: the base is read ahead of the fold, and the shards hashed as they are
    // written (see `exec::readahead` and `checksum`). One step per output tensor, in order.
    let steps: Vec<Vec<Span<'_>>> = order.iter().map(|n| base.tensors.get(n).map(|w| Span::of(&base, w)).into_iter().collect()).collect();
    let ahead = ReadAhead::new(steps, workers.read_window(), policy);
    let drop_output = policy.drops_output(total_bytes + out_bytes);
    let frontier = Frontier::new(out_tensors.len());
    let (folded, digests) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| frontier.hash_shards(&out, drop_output));
        scope.spawn(|| ahead.run());
        let stop = (frontier.stop_on_drop(), ahead.stop_on_drop());
        // Steps are output tensors, in order.
        let step_of: Vec<usize> = (0..out_tensors.len()).collect();
        let beside = Beside { ahead: &ahead, step_of: &step_of, frontier: &frontier, ticker: &ticker };
        let folded = (|| -> Result<()> {
            for (ti, name) in order.iter().enumerate() {
                let Some(w) = base.tensors.get(name) else { continue };
                let dtype = out_tensors[ti].dtype;
                let Some(t) = targets.get(name) else {
                    exec::copy_tensor_from(&base, w, dtype, name, ti, &out, check_finite, None, Some(beside.step(ti)), None)?;
                    beside.written(ti, w.nbytes())?;
                    continue;
                };
                let factors: Vec<Factors> =
                    t.by.iter()
                        .map(|(ai, a, b)| load_factors(&adapters[*ai], a, b, &spec.adapters[*ai], check_finite, name))
                        .collect::<Result<_>>()?;
                match &method {
                    None => {
                        let src = MappedSource::new(&base, w, None, name, check_finite).with_read_ahead(&ahead, ti);
                        pool.install(|| fold_sum(&src, &factors, t, dtype, &out, chunk))?
                    }
                    Some(m) => {
                        let ids: Vec<usize> = t.by.iter().map(|(ai, _, _)| *ai).collect();
                        let ctx = TensorCtx {
                            name,
                            shape: &w.shape,
                            pos: TensorPos { name, t: layer_position(name, num_layers) },
                            params: &params,
                            models: &ids,
                        };
                        let recipe = m.plan_tensor(&ctx)?;
                        let srcs: Vec<LowRankSource<'_>> = factors.iter().map(|f| LowRankSource { f, cols: t.cols }).collect();
                        let zero = ZeroSource;
                        let job = Job {
                            name,
                            numel: w.numel(),
                            base: (m.base_use() == BaseUse::Required).then_some(&zero as &dyn Source),
                            models: srcs.iter().map(|s| s as &dyn Source).collect(),
                            model_ids: ids.clone(),
                            recipe: &recipe,
                        };
                        let sink = FoldSink {
                            w: MappedSource::new(&base, w, None, name, check_finite).with_read_ahead(&ahead, ti),
                            out: &out,
                            ti,
                            dtype,
                        };
                        let engine = Engine::new(m.as_ref(), chunk, exec::cache_bytes_for(workers.budget));
                        pool.install(|| engine.run(std::slice::from_ref(&job), spec.adapters.len(), &sink, &|_| Ok(())))?;
                    }
                }
                out.start_writeback(ti, out_tensors[ti].nbytes());
                beside.written(ti, w.nbytes())?;
            }
            Ok(())
        })();
        drop(stop);
        (folded, hasher.join().unwrap_or_default())
    });
    folded?;

    let bytes_written = out.bytes();
    let shards = out.layout.shards.len();
    let described = match &method {
        Some(m) => format!("fold ({})", m.describe()),
        None => "fold".to_string(),
    };
    let edits = ConfigEdits { float_dtype: out_dtype.or(float_dtype), num_layers: None };
    out.finish(&out_tensors, Some(&base.dir), edits, &exec::fold_recipe_yaml(spec), &digests)?;
    Ok(Report {
        method: described,
        output: target,
        tensors: out_tensors.len(),
        shards,
        bytes_read: total_bytes + adapters.iter().map(Checkpoint::total_bytes).sum::<u64>(),
        bytes_written,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        threads: workers.threads,
        chunk_elements: chunk,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_keeps_the_flat_layout_and_takes_a_zero_shard_size() {
        let text = r#"{"base": "b", "adapters": [{"path": "a", "scaling": 0.5}], "method": "ties", "params": {"density": 0.5},
            "model_params": [{"weight": 2.0}], "out": "o", "out_dtype": "f16", "threads": 3, "memory_budget": 1048576,
            "max_shard_size": 0, "overwrite": true, "allow_nonfinite": false}"#;
        let spec = FoldSpec::from_json(text).unwrap();
        assert_eq!(spec.output.out, PathBuf::from("o"));
        assert_eq!((spec.output.threads, spec.output.max_shard_size), (Some(3), Some(0)));
        assert_eq!(spec.output.out_dtype.as_deref(), Some("f16"));
        assert!(spec.output.overwrite && !spec.output.allow_nonfinite);
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut back = serde_json::to_value(&spec).unwrap();
        back["adapters"][0].as_object_mut().unwrap().retain(|k, _| k == "path" || k == "scaling");
        assert_eq!(back, want);
        let e = FoldSpec::from_json(r#"{"base": "b", "adapters": [], "out": "o", "strict": true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `strict`") && e.to_string().contains("`overwrite`"), "{e}");
    }

    fn naive(f: &Factors, rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let mut s = 0f64;
                for k in 0..f.r {
                    s += if f.fan_in_fan_out {
                        // stored [in, out]: element (i, j) = (B A)[j, i]
                        f.b[j * f.r + k] as f64 * f.a[k * rows + i] as f64
                    } else {
                        f.b[i * f.r + k] as f64 * f.a[k * cols + j] as f64
                    };
                }
                out[i * cols + j] = f.scaling as f64 * s;
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn product_rows_matches_a_naive_product_for_both_layouts() {
        let mut seed = 7u64;
        for &(out_d, in_d, r, fifo) in &[(7usize, 5usize, 3usize, false), (5, 9, 2, true), (1, 1, 1, false), (13, 4, 6, true)] {
            let a: Vec<f32> = (0..r * in_d).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..out_d * r).map(|_| lcg(&mut seed)).collect();
            let f = Factors { a, b, r, scaling: 1.75, fan_in_fan_out: fifo };
            let (rows, cols) = if fifo { (in_d, out_d) } else { (out_d, in_d) };
            let want = naive(&f, rows, cols);
            // every contiguous flat window, through the engine source
            let src = LowRankSource { f: &f, cols };
            for start in 0..rows * cols {
                for len in [1, cols, 2 * cols + 1] {
                    let len = len.min(rows * cols - start);
                    let mut got = vec![0f32; len];
                    src.read(start as u64, &mut got).unwrap();
                    for (g, w) in got.iter().zip(&want[start..start + len]) {
                        assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
                    }
                }
            }
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-fold-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec(base: &Path, adapter: &Path, out: &Path) -> FoldSpec {
        FoldSpec::from_json(
            &serde_json::json!({
                "base": base, "adapters": [{"path": adapter, "scaling": 0.5}], "out": out, "threads": 2
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn folds_targeted_weights_and_copies_the_rest() {
        use crate::checkpoint::tests::write_st;
        let d = tmpdir("e2e");
        let mut seed = 3u64;
        let (out_d, in_d, r) = (6usize, 5usize, 2usize);
        let w: Vec<f32> = (0..out_d * in_d).map(|_| lcg(&mut seed)).collect();
        let a: Vec<f32> = (0..r * in_d).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..out_d * r).map(|_| lcg(&mut seed)).collect();
        let norm = vec![1.0f32, 2.0, 3.0];
        std::fs::create_dir_all(d.join("base")).unwrap();
        write_st(
            &d.join("base/model.safetensors"),
            &[("m.norm.weight", "F32", vec![3], f32s(&norm)), ("m.proj.weight", "F32", vec![out_d, in_d], f32s(&w))],
        );
        std::fs::write(d.join("base/config.json"), "{}").unwrap();
        std::fs::create_dir_all(d.join("ad")).unwrap();
        write_st(
            &d.join("ad/adapter_model.safetensors"),
            &[
                ("base_model.model.m.proj.lora_A.weight", "F32", vec![r, in_d], f32s(&a)),
                ("base_model.model.m.proj.lora_B.weight", "F32", vec![out_d, r], f32s(&b)),
            ],
        );
        let rep = fold(&spec(&d.join("base"), &d.join("ad"), &d.join("out")), None).unwrap();
        assert_eq!(rep.tensors, 2);
        let c = Checkpoint::open(&d.join("out")).unwrap();
        let mut got = vec![0f32; out_d * in_d];
        decode(Dtype::F32, c.tensor_bytes(&c.tensors["m.proj.weight"]).unwrap(), &mut got);
        let f = Factors { a, b, r, scaling: 0.5, fan_in_fan_out: false };
        let upd = naive(&f, out_d, in_d);
        for i in 0..got.len() {
            let want = w[i] as f64 + upd[i];
            assert!((got[i] as f64 - want).abs() <= 1e-6, "{i}: {} vs {want}", got[i]);
        }
        assert_eq!(c.tensor_bytes(&c.tensors["m.norm.weight"]).unwrap(), &f32s(&norm)[..]);
        assert!(d.join("out/config.json").is_file() && d.join("out/umerge.yml").is_file());
    }

    #[test]
    fn an_adapter_that_does_not_fit_the_base_is_refused_before_writing() {
        use crate::checkpoint::tests::write_st;
        let d = tmpdir("misfit");
        std::fs::create_dir_all(d.join("base")).unwrap();
        write_st(&d.join("base/model.safetensors"), &[("m.proj.weight", "F32", vec![4, 3], f32s(&[0.0; 12]))]);
        std::fs::create_dir_all(d.join("ad")).unwrap();
        write_st(
            &d.join("ad/adapter_model.safetensors"),
            &[
                ("base_model.model.m.proj.lora_A.weight", "F32", vec![2, 5], f32s(&[0.0; 10])),
                ("base_model.model.m.proj.lora_B.weight", "F32", vec![4, 2], f32s(&[0.0; 8])),
                ("base_model.model.m.gone.lora_A.weight", "F32", vec![2, 3], f32s(&[0.0; 6])),
                ("base_model.model.m.gone.lora_B.weight", "F32", vec![4, 2], f32s(&[0.0; 8])),
            ],
        );
        let e = fold(&spec(&d.join("base"), &d.join("ad"), &d.join("out")), None).unwrap_err();
        let msg = e.to_string();
        assert!(e.is_input(), "{msg}");
        assert!(msg.contains("does not fit this base") && msg.contains("m.gone.weight"), "{msg}");
        assert!(!d.join("out").exists());
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".umerge-tmp")));
    }

    #[test]
    fn module_names_strip_the_peft_prefix() {
        assert_eq!(
            module_of("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", PEFT_PREFIX),
            Some(("model.layers.0.mlp.up_proj", true))
        );
        assert_eq!(module_of("x.lora_B.weight", PEFT_PREFIX), Some(("x", false)));
        assert_eq!(module_of("x.lora_magnitude_vector", PEFT_PREFIX), None);
    }
}
