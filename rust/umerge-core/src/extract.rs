//! LoRA extraction: the PEFT adapter nearest to a fine-tune, `mergekit-extract-lora`'s semantics
//! streamed through the engine.
//!
//! The spec lists the modules to handle and how; the Python layer (`umerge.adapters.extract`)
//! decides that with mergekit's planning rules (regex filters, embeddings, modules saved at full
//! size). For each module, in order:
//!
//! - `lora`: the task vector Δ = W_ft − W_base of `<module>.weight` (m × n) is approximated by its
//!   rank-r truncated SVD Δ ≈ U_r S_r V_rᵀ ([`crate::linalg`]) and written as PEFT's
//!   `lora_A.weight` = S_r^½ V_rᵀ and `lora_B.weight` = U_r S_r^½ (`distribute_scale`, mergekit's
//!   default), or `lora_A` = S_r V_rᵀ and `lora_B` = U_r (mergekit's `--no-distribute-scale`);
//!   `lora_alpha = r`, so PEFT's scaling is 1 and its update B·A is the approximation itself;
//! - `embedding`: the same for an embedding table Δ (vocab × hidden) in PEFT's embedding layout,
//!   `lora_embedding_A` [r, vocab] = S^½ U_rᵀ (or S U_rᵀ) and `lora_embedding_B` [hidden, r] =
//!   V_r S^½ (or V_r), whose (B·A)ᵀ PEFT adds: mergekit decomposes Δᵀ, which is the same SVD;
//! - `save`: the module's `weight` and `bias` copied from the fine-tune at full size (PEFT's
//!   `modules_to_save`), when one of them differs from the base (or the base has another shape,
//!   as a resized vocabulary does).
//!
//! r = min(rank, m, n), cut to the number of singular values above `sv_epsilon` when that is
//! positive (mergekit's rule: an absolute threshold on the singular values). The SVD is
//! randomized (oversampling p, q power iterations, the sketch seeded by the seed and the tensor's
//! name) unless r + p ≥ min(m, n), where it is exact. Δ is the float32 difference of the decoded
//! weights (mergekit subtracts in the storage dtype, so for bf16 inputs its Δ is rounded first).
//!
//! Where umerge departs from mergekit, on purpose: a module whose task vector is zero (or whose
//! r would be 0 after `sv_epsilon`) is left out, where mergekit writes it (and PEFT refuses a
//! rank of 0); a `save` module equal to the base is left out too; `target_modules` and
//! `modules_to_save` name exactly the modules written (a module's last name where it matches no
//! other module, its full name otherwise), so PEFT adds no empty LoRA layers and reports no
//! missing keys; a bias that changed is reported, not written (mergekit writes it as
//! `lora_B.bias`, which PEFT ignores unless `lora_bias`, and that fails on layers without bias).
//!
//! Streaming and memory: modules run one at a time, in the spec's order; each pass over Δ reads
//! row blocks of both checkpoints through their memory maps (decoded, subtracted) and releases
//! them, unless Δ fits a quarter of the memory budget, where it is decoded once and kept for the
//! passes. The sketch (≈ 28 (m + n) ℓ bytes) must fit half the budget, and an exact SVD
//! (≈ 16 (mn + (m + n) min(m, n)) bytes) the whole budget; otherwise the error says to raise
//! it. The next module's tensors are hinted to the kernel (`WILLNEED`) while one is computed.
//! Results do not depend on the thread count or the budget (see [`crate::linalg`]).
//!
//! Output: `adapter_model.safetensors`, `adapter_config.json` and the recipe `umerge.yml` in a
//! temporary directory beside the target, renamed into place when complete. The adapter file's
//! final shapes are known only once each SVD is done, so its header is reserved up front at the
//! size of the largest possible header (every module at full rank) and written last, padded
//! with spaces as the safetensors format allows; the data follow it contiguously.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{elem_bytes, encode, header_name, is_float, Dtype};
use crate::error::{Error, Result, ShapeMismatch};
use crate::exec::prepare::{self, Ticker, Workers};
use crate::exec::{MappedSource, Source};
use crate::linalg::{self, RowBlocks, Sketch, Truncated};
use crate::methods::rng;
use crate::report::{peak_rss_bytes, Report};
use crate::spec::{self, OutputOptions};
use crate::write::{self, TMP_PREFIX};
use crate::Progress;

/// The adapter's weights file, as PEFT names it.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The adapter's config file, as PEFT names it.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// PEFT's prefix of every adapter tensor name.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// How one module is extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// A linear layer's weight, decomposed into `lora_A`/`lora_B`.
    Lora,
    /// An embedding table, decomposed into `lora_embedding_A`/`lora_embedding_B`.
    Embedding,
    /// Copied at full size (`modules_to_save`).
    Save,
}

/// One module of the extraction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractModule {
    /// The module's path in the model (`model.layers.0.self_attn.q_proj`): its tensors are
    /// `<module>.weight` and `<module>.bias`.
    pub module: String,
    /// What to do with it.
    pub kind: ModuleKind,
}

fn default_true() -> bool {
    true
}
fn default_oversample() -> usize {
    10
}
fn default_power_iters() -> usize {
    2
}

/// A whole extraction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ExtractSpec {
    /// The fine-tuned model.
    pub finetuned: PathBuf,
    /// The model it was fine-tuned from.
    pub base: PathBuf,
    /// The largest rank written (mergekit's `--max-rank`).
    pub rank: usize,
    /// Split the singular values between the factors (S^½ on each) rather than putting them on A.
    #[serde(default = "default_true")]
    pub distribute_scale: bool,
    /// Keep only singular values above this (absolute); 0 keeps every one up to the rank.
    #[serde(default)]
    pub sv_epsilon: f64,
    /// Sketch columns beyond the rank (p).
    #[serde(default = "default_oversample")]
    pub oversample: usize,
    /// Power iterations of the randomized SVD (q).
    #[serde(default = "default_power_iters")]
    pub power_iters: usize,
    /// Seed of the random sketches.
    #[serde(default)]
    pub seed: u64,
    /// The modules, in the order they are written.
    pub modules: Vec<ExtractModule>,
    /// `base_model_name_or_path` of the adapter config (default: the base path as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Output directory, dtype and resources (flat in JSON). `max_shard_size`, `page_cache` and
    /// `allow_nonfinite` do not apply.
    #[serde(skip)]
    pub output: OutputOptions,
}

impl<'de> Deserialize<'de> for ExtractSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<ExtractSpec, D::Error> {
        let (spec, output) = spec::deserialize_flat(d, ExtractSpec::deserialize)?;
        Ok(ExtractSpec { output, ..spec })
    }
}

impl Serialize for ExtractSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        spec::serialize_flat(s, ExtractSpec::serialize(self, serde_json::value::Serializer), &self.output)
    }
}

impl ExtractSpec {
    /// Parses a spec from JSON.
    pub fn from_json(s: &str) -> Result<ExtractSpec> {
        serde_json::from_str(s).map_err(|e| Error::Spec(format!("invalid extraction spec: {e}")))
    }
}

/// What was written for one module.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    /// The module.
    pub module: String,
    /// How it was extracted.
    pub kind: ModuleKind,
    /// Rank written (0 for `save`).
    pub rank: usize,
    /// ‖Δ − B·A‖_F / ‖Δ‖_F before rounding to the output dtype, from the singular values
    /// ([`Truncated::relative_error`]: reliable down to about 1e-3); `None` for `save`.
    pub relative_error: Option<f64>,
    /// True when the SVD was exact rather than randomized.
    pub exact: bool,
}

/// The report of an extraction: the engine's usual report, every module written, and the
/// modules left out because they equal the base.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    /// Counts, bytes, time, memory, warnings.
    #[serde(flatten)]
    pub report: Report,
    /// The modules written, in order.
    pub modules: Vec<ModuleReport>,
    /// Modules equal to the base (or with no singular value above `sv_epsilon`), not written.
    pub skipped: Vec<String>,
}

/// Δ = ft − base of one weight, by row blocks: from the maps, or from a decoded copy.
struct Delta<'a> {
    ft: MappedSource<'a>,
    base: MappedSource<'a>,
    rows: usize,
    cols: usize,
    cache: Option<Vec<f32>>,
}

impl Delta<'_> {
    /// Decodes rows `r` of Δ into `out`, using `scratch` (as long as `out`) for the base's values.
    fn decode_rows(&self, r: std::ops::Range<usize>, out: &mut [f32], scratch: &mut [f32]) -> Result<()> {
        let start = (r.start * self.cols) as u64;
        self.base.read(start, scratch)?;
        self.ft.read_sub(start, out, scratch)?;
        self.ft.release(start, out.len());
        self.base.release(start, out.len());
        Ok(())
    }

    /// Decodes the whole of Δ once, block by block in parallel, and keeps it.
    fn load(&mut self) -> Result<()> {
        let (m, n) = (self.rows, self.cols);
        let mut all = vec![0f32; m * n];
        let h = linalg::block_rows(n);
        let this = &*self;
        all.par_chunks_mut((h * n).max(1))
            .enumerate()
            .map_init(Vec::new, |scratch: &mut Vec<f32>, (b, chunk)| {
                scratch.resize(chunk.len(), 0.0);
                this.decode_rows(linalg::block_range(b, m, n), chunk, scratch)
            })
            .collect::<Result<()>>()?;
        self.cache = Some(all);
        Ok(())
    }
}

impl RowBlocks for Delta<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn block<'s>(&'s self, b: usize, buf: &'s mut Vec<f32>) -> Result<&'s [f32]> {
        let r = linalg::block_range(b, self.rows, self.cols);
        let len = r.len() * self.cols;
        if let Some(c) = &self.cache {
            return Ok(&c[r.start * self.cols..r.end * self.cols]);
        }
        buf.resize(2 * len, 0.0);
        let (out, scratch) = buf.split_at_mut(len);
        self.decode_rows(r, out, scratch)?;
        Ok(&buf[..len])
    }
}

/// True when tensor `a` of `ca` and tensor `b` of `cb` hold the same values: their bytes when
/// the dtypes agree, else their decoded values. Reads in steps, stops at the first difference,
/// and releases what it read.
fn identical(ca: &Checkpoint, a: &TensorInfo, cb: &Checkpoint, b: &TensorInfo, name: &str) -> Result<bool> {
    const STEP: usize = 8 << 20;
    if a.shape != b.shape {
        return Ok(false);
    }
    if a.dtype == b.dtype {
        let total = a.end - a.start;
        let mut off = 0usize;
        while off < total {
            let n = STEP.min(total - off);
            let same = ca.bytes(a.shard, a.start + off, n)? == cb.bytes(b.shard, b.start + off, n)?;
            ca.release(a.shard, a.start + off, n);
            cb.release(b.shard, b.start + off, n);
            if !same {
                return Ok(false);
            }
            off += n;
        }
        return Ok(true);
    }
    if !(is_float(a.dtype) && is_float(b.dtype)) {
        return Ok(false);
    }
    let (sa, sb) = (MappedSource::new(ca, a, None, name, true), MappedSource::new(cb, b, None, name, true));
    let n = a.numel();
    let step = (STEP / 4) as u64;
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    let mut start = 0u64;
    while start < n {
        let len = step.min(n - start) as usize;
        va.resize(len, 0f32);
        vb.resize(len, 0f32);
        sa.read(start, &mut va)?;
        sb.read(start, &mut vb)?;
        sa.release(start, len);
        sb.release(start, len);
        if va != vb {
            return Ok(false);
        }
        start += len as u64;
    }
    Ok(true)
}

/// One output tensor as the header records it.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

fn entry_json(name: &str, dtype: Dtype, shape: &[usize], begin: u64, end: u64) -> String {
    let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!(
        r#"{}:{{"dtype":"{}","shape":[{}],"data_offsets":[{begin},{end}]}}"#,
        serde_json::to_string(name).unwrap_or_default(),
        header_name(dtype),
        shape.join(",")
    )
}

const META: &str = r#"{"__metadata__":{"format":"pt"}"#;

/// The adapter directory being built: `adapter_model.safetensors` with its header reserved at
/// the front and its data appended as modules finish (module docs).
struct AdapterOut {
    target: PathBuf,
    tmp: PathBuf,
    file: File,
    header_len: usize,
    pos: u64,
    entries: Vec<Entry>,
    renamed: bool,
    notes: Vec<String>,
}

impl AdapterOut {
    /// Creates the temporary directory and the weights file, reserving `header_bound` bytes of
    /// header and `data_bound` bytes of data (so that a full disk is found now).
    fn create(target: &Path, header_bound: usize, data_bound: u64) -> Result<AdapterOut> {
        let parent = target.parent().unwrap_or(Path::new("/"));
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
        let notes = write::clean_stale(parent, &name);
        let tmp = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| write::werr("stale temporary directory", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| write::werr("temporary directory", &tmp, e))?;
        let p = tmp.join(WEIGHTS_NAME);
        let header_len = header_bound.div_ceil(8) * 8;
        let size = 8 + header_len as u64 + data_bound;
        let file = match File::options().read(true).write(true).create_new(true).open(&p) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(write::werr_out("adapter weights", &p, e, size, target));
            }
        };
        let out = AdapterOut { target: target.to_path_buf(), tmp, file, header_len, pos: 0, entries: Vec::new(), renamed: false, notes };
        let over_limit = write::test_write_limit().is_some_and(|l| size > l);
        let reserved = if over_limit { Err(std::io::Error::from_raw_os_error(libc::ENOSPC)) } else { write::reserve(&out.file, size) };
        reserved.map_err(|e| write::werr_out("adapter weights (reserving space)", &p, e, size, target))?;
        Ok(out)
    }

    fn data_start(&self) -> u64 {
        8 + self.header_len as u64
    }

    /// Appends bytes to the data of the tensor being written.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let p = self.tmp.join(WEIGHTS_NAME);
        self.file
            .write_all_at(bytes, self.data_start() + self.pos)
            .map_err(|e| write::werr_out("adapter weights", &p, e, 0, &self.target))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Records the tensor whose data were written since byte `begin` of the data.
    fn record(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, begin: u64) {
        self.entries.push(Entry { name, dtype, shape, begin, end: self.pos });
    }

    /// Appends one tensor's encoded bytes.
    fn append(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Result<()> {
        let begin = self.pos;
        self.write(bytes)?;
        self.record(name, dtype, shape, begin);
        Ok(())
    }

    /// Writes the header, trims the reservation, syncs; writes the config and the recipe (with
    /// the weights' sha256); renames the directory into place.
    fn finish(mut self, config: &serde_json::Value, recipe_yaml: &str) -> Result<u64> {
        let p = self.tmp.join(WEIGHTS_NAME);
        let werr = |what: &str, path: &Path, e: std::io::Error| write::werr_out(what, path, e, 0, &self.target);
        let mut json = String::from(META);
        for e in &self.entries {
            json.push(',');
            json.push_str(&entry_json(&e.name, e.dtype, &e.shape, e.begin, e.end));
        }
        json.push('}');
        if json.len() > self.header_len {
            return Err(Error::Internal(format!("adapter header of {} bytes exceeds its reservation of {}", json.len(), self.header_len)));
        }
        let mut header = Vec::with_capacity(8 + self.header_len);
        header.extend_from_slice(&(self.header_len as u64).to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        header.resize(8 + self.header_len, b' ');
        self.file.write_all_at(&header, 0).map_err(|e| werr("adapter header", &p, e))?;
        let size = self.data_start() + self.pos;
        self.file.set_len(size).map_err(|e| werr("adapter weights (trimming)", &p, e))?;
        self.file.sync_all().map_err(|e| werr("adapter weights (sync)", &p, e))?;
        let sha = crate::verify::sha256_file(&p).map_err(|e| write::werr("adapter weights (checksum)", &p, e))?;
        let cfg_path = self.tmp.join(CONFIG_NAME);
        let text = serde_json::to_string_pretty(config).unwrap_or_default() + "\n";
        write::write_synced(&cfg_path, text.as_bytes()).map_err(|e| werr("adapter config", &cfg_path, e))?;
        let shards = serde_json::json!({ WEIGHTS_NAME: {"bytes": size, "sha256": sha} });
        let recipe = format!("{recipe_yaml}{}: {shards}\n", crate::verify::RECIPE_SHARDS_KEY);
        let rp = self.tmp.join(crate::verify::RECIPE_NAME);
        write::write_synced(&rp, recipe.as_bytes()).map_err(|e| werr("recipe", &rp, e))?;
        if let Ok(d) = File::open(&self.tmp) {
            let _ = d.sync_all();
        }
        let (tmp, target) = (self.tmp.clone(), self.target.clone());
        write::rename_into_place(&tmp, &target, &mut self.renamed)?;
        Ok(size)
    }
}

impl Drop for AdapterOut {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A module's tensors, checked against both checkpoints.
struct Planned<'a> {
    job: &'a ExtractModule,
    /// (name, fine-tune tensor, base tensor if the base has it) for `weight` then `bias`.
    tensors: Vec<(String, &'a TensorInfo, Option<&'a TensorInfo>)>,
}

fn last_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Checks every module against both checkpoints, collecting every problem.
fn plan<'a>(spec: &'a ExtractSpec, ft: &'a Checkpoint, base: &'a Checkpoint) -> Result<Vec<Planned<'a>>> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    let mut planned = Vec::new();
    for job in &spec.modules {
        if !seen.insert(job.module.as_str()) {
            errors.push(Error::Spec(format!("module {} is listed twice", job.module)));
            continue;
        }
        let mut tensors = Vec::new();
        for suffix in ["weight", "bias"] {
            let name = format!("{}.{suffix}", job.module);
            if let Some(t) = ft.tensors.get(&name) {
                tensors.push((name.clone(), t, base.tensors.get(&name)));
            }
        }
        let weight = tensors.first().filter(|(n, _, _)| n.ends_with(".weight"));
        match job.kind {
            ModuleKind::Save => {
                if tensors.is_empty() {
                    errors.push(Error::MissingTensor {
                        tensor: format!("{}.weight", job.module),
                        path: ft.path.clone(),
                        hint: " (a module to save needs a weight or a bias)".into(),
                    });
                    continue;
                }
            }
            ModuleKind::Lora | ModuleKind::Embedding => {
                let Some((name, w, b)) = weight else {
                    errors.push(Error::MissingTensor {
                        tensor: format!("{}.weight", job.module),
                        path: ft.path.clone(),
                        hint: String::new(),
                    });
                    continue;
                };
                let Some(b) = b else {
                    errors.push(Error::MissingTensor {
                        tensor: name.clone(),
                        path: base.path.clone(),
                        hint: ": a task vector needs the weight in both models (wrong --base?)".into(),
                    });
                    continue;
                };
                if !is_float(w.dtype) || !is_float(b.dtype) {
                    errors.push(Error::Spec(format!(
                        "tensor {name} is not a float tensor ({:?} in the fine-tune, {:?} in the base): only float weights can be decomposed",
                        w.dtype, b.dtype
                    )));
                    continue;
                }
                if w.shape.len() != 2 {
                    errors.push(Error::Spec(format!("tensor {name} has shape {:?}: only 2-D weights can be decomposed", w.shape)));
                    continue;
                }
                if w.shape != b.shape {
                    errors.push(Error::ShapeMismatch(Box::new(ShapeMismatch {
                        tensor: name.clone(),
                        shape_a: w.shape.clone(),
                        file_a: ft.file_of(w),
                        shape_b: b.shape.clone(),
                        file_b: base.file_of(b),
                        hint: ": a task vector needs equal shapes (wrong --base?)".into(),
                    })));
                    continue;
                }
            }
        }
        planned.push(Planned { job, tensors });
    }
    match Error::from_many(errors) {
        Some(e) => Err(e),
        None => Ok(planned),
    }
}

/// The output tensors' names for a decomposed module: (A, B).
fn factor_names(module: &str, kind: ModuleKind) -> (String, String) {
    match kind {
        ModuleKind::Embedding => (format!("{PEFT_PREFIX}{module}.lora_embedding_A"), format!("{PEFT_PREFIX}{module}.lora_embedding_B")),
        _ => (format!("{PEFT_PREFIX}{module}.lora_A.weight"), format!("{PEFT_PREFIX}{module}.lora_B.weight")),
    }
}

/// Upper bounds of the header and data sizes: every module written at its largest rank.
fn bounds(planned: &[Planned<'_>], spec: &ExtractSpec, out_dtype: Option<Dtype>) -> (usize, u64) {
    let mut shapes: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
    for p in planned {
        let (_, w, _) = &p.tensors[0];
        let dtype = out_dtype.unwrap_or(w.dtype);
        match p.job.kind {
            ModuleKind::Save => {
                for (name, t, _) in &p.tensors {
                    shapes.push((
                        format!("{PEFT_PREFIX}{name}"),
                        if is_float(t.dtype) { out_dtype.unwrap_or(t.dtype) } else { t.dtype },
                        t.shape.clone(),
                    ));
                }
            }
            kind => {
                let (m, n) = (w.shape[0], w.shape[1]);
                let r = spec.rank.min(m).min(n);
                let (a, b) = factor_names(&p.job.module, kind);
                let (sa, sb) = if kind == ModuleKind::Embedding { (vec![r, m], vec![n, r]) } else { (vec![r, n], vec![m, r]) };
                shapes.push((a, dtype, sa));
                shapes.push((b, dtype, sb));
            }
        }
    }
    let data: u64 = shapes.iter().map(|(_, d, s)| s.iter().map(|&x| x as u64).product::<u64>() * elem_bytes(*d).unwrap_or(4) as u64).sum();
    let header = META.len() + 1 + shapes.iter().map(|(n, d, s)| entry_json(n, *d, s, data, data).len() + 1).sum::<usize>();
    (header, data)
}

/// The names PEFT should match for `chosen` modules among `all`: a module's last name when it
/// matches no module outside `chosen`, else its full name. `matches(key, module)` is PEFT's rule.
fn peft_names(chosen: &BTreeSet<String>, all: &BTreeSet<String>, matches: impl Fn(&str, &str) -> bool) -> Vec<String> {
    let mut by_last: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for m in chosen {
        by_last.entry(last_name(m)).or_default().push(m);
    }
    let mut out = BTreeSet::new();
    for (key, mods) in by_last {
        if all.iter().filter(|a| matches(key, a)).all(|a| chosen.contains(a)) {
            out.insert(key.to_string());
        } else {
            out.extend(mods.into_iter().cloned());
        }
    }
    out.into_iter().collect()
}

/// PEFT's `target_modules` rule for a list entry: the module's name is it, or ends with `.` + it.
fn lora_matches(key: &str, module: &str) -> bool {
    module == key || module.strip_suffix(key).is_some_and(|rest| rest.ends_with('.'))
}

/// PEFT's `modules_to_save` rule: the module's name ends with it (a plain string suffix).
fn save_matches(key: &str, module: &str) -> bool {
    module.ends_with(key)
}

/// The adapter config: mergekit's fields, with r the largest rank written and lora_alpha = r
/// (per-module ranks in rank_pattern and alpha_pattern, so every module's scaling is 1).
fn adapter_config(spec: &ExtractSpec, modules: &[ModuleReport], ft: &Checkpoint) -> serde_json::Value {
    let mut all = BTreeSet::new();
    for name in ft.tensors.keys() {
        let mut m = name.as_str();
        while let Some((parent, _)) = m.rsplit_once('.') {
            all.insert(parent.to_string());
            m = parent;
        }
    }
    let lora: BTreeSet<String> = modules.iter().filter(|m| m.kind != ModuleKind::Save).map(|m| m.module.clone()).collect();
    let saved: BTreeSet<String> = modules.iter().filter(|m| m.kind == ModuleKind::Save).map(|m| m.module.clone()).collect();
    let r = modules.iter().map(|m| m.rank).max().unwrap_or(0);
    let pattern: BTreeMap<&str, usize> =
        modules.iter().filter(|m| m.kind != ModuleKind::Save && m.rank != r).map(|m| (m.module.as_str(), m.rank)).collect();
    let to_save = peft_names(&saved, &all, save_matches);
    let base_name = spec.base_model_name_or_path.clone().unwrap_or_else(|| spec.base.display().to_string());
    serde_json::json!({
        "base_model_name_or_path": base_name,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": peft_names(&lora, &all, lora_matches),
        "modules_to_save": if to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(to_save) },
        "use_rslora": false,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "bias": "none",
        "inference_mode": true,
    })
}

/// Encodes `values` to `dtype`.
fn encoded(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * elem_bytes(dtype).unwrap_or(4)];
    encode(dtype, values, &mut bytes);
    bytes
}

/// lora_A and lora_B of the first `r` triplets of `t` (module docs): row-major, A first.
fn factors(t: &Truncated, r: usize, m: usize, n: usize, kind: ModuleKind, distribute: bool) -> (Vec<f32>, Vec<f32>) {
    let k = t.k();
    let (sa, sb): (Vec<f32>, Vec<f32>) =
        t.s[..r].iter().map(|&s| if distribute { (s.sqrt() as f32, s.sqrt() as f32) } else { (s as f32, 1.0) }).unzip();
    if kind == ModuleKind::Embedding {
        // Δ (vocab m × hidden n) = U S Vᵀ: A = diag(sa) Uᵀ (r × m), B = V diag(sb) (n × r).
        let mut a = vec![0f32; r * m];
        for i in 0..m {
            for c in 0..r {
                a[c * m + i] = sa[c] * t.u[i * k + c];
            }
        }
        let mut b = vec![0f32; n * r];
        for j in 0..n {
            for c in 0..r {
                b[j * r + c] = t.vt[c * n + j] * sb[c];
            }
        }
        (a, b)
    } else {
        // Δ (out m × in n) = U S Vᵀ: A = diag(sa) Vᵀ (r × n), B = U diag(sb) (m × r).
        let mut a = vec![0f32; r * n];
        for c in 0..r {
            for j in 0..n {
                a[c * n + j] = sa[c] * t.vt[c * n + j];
            }
        }
        let mut b = vec![0f32; m * r];
        for i in 0..m {
            for c in 0..r {
                b[i * r + c] = t.u[i * k + c] * sb[c];
            }
        }
        (a, b)
    }
}

/// Copies one tensor of the fine-tune into the adapter, in steps of 8 MiB so that memory stays
/// bounded whatever its size: the raw bytes when `dtype` is its own, else decoded and re-encoded;
/// a float tensor is checked for NaN and infinity on the way (as every tensor the engine reads).
fn copy_tensor(ft: &Checkpoint, t: &TensorInfo, dtype: Dtype, name: &str, out: &mut AdapterOut) -> Result<()> {
    const STEP: usize = 8 << 20;
    let begin = out.pos;
    let eb = elem_bytes(t.dtype).unwrap_or(1);
    let total = t.end - t.start;
    let step = STEP / eb * eb;
    let src = MappedSource::new(ft, t, None, name, true);
    let (mut values, mut bytes) = (Vec::new(), Vec::new());
    let mut off = 0usize;
    while off < total {
        let n = step.min(total - off);
        if is_float(t.dtype) {
            values.resize(n / eb, 0f32);
            src.read((off / eb) as u64, &mut values)?;
        }
        if dtype == t.dtype || !is_float(t.dtype) {
            out.write(ft.bytes(t.shard, t.start + off, n)?)?;
        } else {
            bytes.resize(values.len() * elem_bytes(dtype).unwrap_or(4), 0u8);
            encode(dtype, &values, &mut bytes);
            out.write(&bytes)?;
        }
        ft.release(t.shard, t.start + off, n);
        off += n;
    }
    out.record(format!("{PEFT_PREFIX}{name}"), dtype, t.shape.clone(), begin);
    Ok(())
}

/// What one module's decomposition gave.
enum Decomposed {
    /// Δ is zero, or no singular value is above `sv_epsilon`.
    Nothing,
    /// The SVD and the rank to keep.
    Kept(Truncated, usize),
}

/// The truncated SVD of one weight's task vector, within the budget.
fn decompose(
    spec: &ExtractSpec,
    ft: &Checkpoint,
    base: &Checkpoint,
    name: &str,
    w: &TensorInfo,
    b: &TensorInfo,
    workers: &Workers,
) -> Result<Decomposed> {
    if identical(ft, w, base, b, name)? {
        return Ok(Decomposed::Nothing);
    }
    let (m, n) = (w.shape[0], w.shape[1]);
    let k = spec.rank.min(m).min(n);
    let l = k + spec.oversample;
    let budget = workers.budget;
    let mut delta = Delta {
        ft: MappedSource::new(ft, w, None, name, true),
        base: MappedSource::new(base, b, None, name, true),
        rows: m,
        cols: n,
        cache: None,
    };
    let t = if l >= m.min(n) {
        let need = linalg::exact_bytes(m, n);
        if need > budget {
            return Err(Error::Budget {
                tensor: name.to_string(),
                what: format!("its exact SVD (rank {k} of a {m} x {n} matrix)"),
                need,
                allowed: budget,
            });
        }
        workers.pool.install(|| linalg::exact_svd(&delta, k))?
    } else {
        let part = (n as u64) * (l as u64) * 4;
        let wave = ((budget / 8) / part.max(1)).clamp(1, workers.threads as u64) as usize;
        let need = linalg::sketch_bytes(m, n, l, wave);
        if need > budget / 2 {
            return Err(Error::Budget {
                tensor: name.to_string(),
                what: format!("its rank-{l} sketch ({m} x {n})"),
                need,
                allowed: budget / 2,
            });
        }
        let sketch = Sketch { oversample: spec.oversample, power_iters: spec.power_iters, key: rng::stream_key(spec.seed, name, 0), wave };
        workers.pool.install(|| -> Result<Truncated> {
            if (m as u64) * (n as u64) * 4 <= crate::exec::cache_bytes_for(budget) {
                delta.load()?;
            }
            linalg::randomized_svd(&delta, k, &sketch)
        })?
    };
    if t.frob2 == 0.0 {
        return Ok(Decomposed::Nothing);
    }
    let r = if spec.sv_epsilon > 0.0 { t.s.iter().take(k).take_while(|&&s| s > spec.sv_epsilon).count() } else { t.k().min(k) };
    Ok(if r == 0 { Decomposed::Nothing } else { Decomposed::Kept(t, r) })
}

fn check_spec(spec: &ExtractSpec) -> Result<()> {
    if spec.rank == 0 {
        return Err(Error::Spec("rank must be at least 1".into()));
    }
    if !(spec.sv_epsilon.is_finite() && spec.sv_epsilon >= 0.0) {
        return Err(Error::Spec(format!("sv_epsilon {} must be a non-negative number", spec.sv_epsilon)));
    }
    if spec.power_iters > 100 {
        return Err(Error::Spec(format!("{} power iterations is far beyond what any spectrum needs (use at most 100)", spec.power_iters)));
    }
    let o = &spec.output;
    for (given, what) in
        [(o.max_shard_size.is_some(), "max_shard_size"), (o.page_cache.is_some(), "page_cache"), (o.allow_nonfinite, "allow_nonfinite")]
    {
        if given {
            return Err(Error::Spec(format!(
                "{what} does not apply to a LoRA extraction (one adapter file; NaN and Inf are always refused)"
            )));
        }
    }
    if spec.modules.is_empty() {
        return Err(Error::Spec("no module to extract".into()));
    }
    prepare::check_workers(o.threads, o.memory_budget)
}

/// Runs a whole extraction. Nothing is written under the target name unless it completes.
pub fn extract(spec: &ExtractSpec, progress: Option<Progress<'_>>) -> Result<ExtractReport> {
    let t0 = Instant::now();
    check_spec(spec)?;
    let out_dtype = prepare::out_dtype(spec.output.out_dtype.as_deref())?;
    let opened =
        prepare::open_inputs(Some(&spec.base), &[spec.finetuned.as_path()], Checkpoint::open, &spec.output.out, spec.output.overwrite)?;
    let (Some(base), Some(ft), target) = (opened.base, opened.models.into_iter().next(), opened.target) else {
        return Err(Error::Internal("inputs missing after opening".into()));
    };
    let planned = plan(spec, &ft, &base)?;
    let workers = Workers::new(spec.output.threads, spec.output.memory_budget, 2, false)?;
    let (header_bound, data_bound) = bounds(&planned, spec, out_dtype);
    let mut out = AdapterOut::create(&target, header_bound, data_bound)?;
    let in_bytes = |p: &Planned<'_>| -> u64 { p.tensors.iter().map(|(_, t, b)| t.nbytes() + b.map_or(0, |b| b.nbytes())).sum() };
    let ticker = Ticker::new(progress, planned.len() as u64, planned.iter().map(in_bytes).sum());
    let mut warnings: Vec<String> = out.notes.clone();
    let mut modules = Vec::new();
    let mut skipped = Vec::new();
    let mut changed_biases = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        if let Some(next) = planned.get(i + 1) {
            for (_, t, b) in &next.tensors {
                ft.will_need(t.shard, t.start, t.end - t.start);
                if let Some(b) = b {
                    base.will_need(b.shard, b.start, b.end - b.start);
                }
            }
        }
        let module = &p.job.module;
        match p.job.kind {
            ModuleKind::Save => {
                let mut differs = false;
                for (name, t, b) in &p.tensors {
                    differs |= match b {
                        Some(b) => !identical(&ft, t, &base, b, name)?,
                        None => true,
                    };
                }
                if differs {
                    for (name, t, _) in &p.tensors {
                        let dtype = if is_float(t.dtype) { out_dtype.unwrap_or(t.dtype) } else { t.dtype };
                        copy_tensor(&ft, t, dtype, name, &mut out)?;
                    }
                    modules.push(ModuleReport {
                        module: module.clone(),
                        kind: ModuleKind::Save,
                        rank: 0,
                        relative_error: None,
                        exact: true,
                    });
                } else {
                    skipped.push(module.clone());
                }
            }
            kind => {
                let (name, w, b) = &p.tensors[0];
                let b = b.ok_or_else(|| Error::Internal(format!("{name} lost its base tensor")))?;
                match decompose(spec, &ft, &base, name, w, b, &workers)? {
                    Decomposed::Nothing => skipped.push(module.clone()),
                    Decomposed::Kept(t, r) => {
                        let (m, n) = (w.shape[0], w.shape[1]);
                        let (a, bm) = factors(&t, r, m, n, kind, spec.distribute_scale);
                        let dtype = out_dtype.unwrap_or(w.dtype);
                        let (an, bn) = factor_names(module, kind);
                        let (sa, sb) = if kind == ModuleKind::Embedding { (vec![r, m], vec![n, r]) } else { (vec![r, n], vec![m, r]) };
                        out.append(an, dtype, sa, &encoded(dtype, &a))?;
                        out.append(bn, dtype, sb, &encoded(dtype, &bm))?;
                        modules.push(ModuleReport {
                            module: module.clone(),
                            kind,
                            rank: r,
                            relative_error: Some(t.relative_error(r)),
                            exact: t.exact,
                        });
                        for (bias, bt, bb) in p.tensors.iter().skip(1) {
                            let same = match bb {
                                Some(bb) => identical(&ft, bt, &base, bb, bias)?,
                                None => false,
                            };
                            if !same {
                                changed_biases.push(bias.clone());
                            }
                        }
                    }
                }
            }
        }
        ticker.tick(in_bytes(p))?;
    }
    if !changed_biases.is_empty() {
        warnings.push(format!(
            "{} bias(es) of extracted modules differ from the base and are not in the adapter (LoRA carries no bias), e.g. {}",
            changed_biases.len(),
            changed_biases[0]
        ));
    }
    if !modules.iter().any(|m| m.kind != ModuleKind::Save) {
        return Err(Error::Spec(format!(
            "no module to decompose differs from the base: the fine-tune {} and the base {} have the same weights there",
            ft.display(),
            base.display()
        )));
    }
    let config = adapter_config(spec, &modules, &ft);
    let tensors = out.entries.len();
    let bytes_written = out.finish(&config, &crate::exec::extract_recipe_yaml(spec))?;
    let method = format!(
        "extract_lora (rank {}, randomized SVD p {} q {}, {} scale)",
        spec.rank,
        spec.oversample,
        spec.power_iters,
        if spec.distribute_scale { "distributed" } else { "on A" }
    );
    Ok(ExtractReport {
        report: Report {
            method,
            output: target,
            tensors,
            shards: 1,
            bytes_read: planned.iter().map(in_bytes).sum(),
            bytes_written,
            seconds: t0.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            threads: workers.threads,
            chunk_elements: linalg::BLOCK_ELEMS,
            warnings,
        },
        modules,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::write_st;
    use crate::dtype::decode;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-extract-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read_f32(c: &Checkpoint, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = &c.tensors[name];
        let mut v = vec![0f32; t.numel() as usize];
        decode(t.dtype, c.tensor_bytes(t).unwrap(), &mut v);
        (t.shape.clone(), v)
    }

    /// base and fine-tune of one 2-D weight `m.proj` (rank-2 difference), an embedding and a norm.
    fn family(d: &Path) -> (Vec<f32>, Vec<f32>) {
        let (m, n) = (12usize, 40usize);
        let w: Vec<f32> = (0..m * n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.01).collect();
        let delta: Vec<f32> =
            (0..m * n).map(|i| ((i / n) as f32 - 5.0) * ((i % n) as f32 * 0.1).sin() * 0.02 + ((i % n) as f32) * 0.001).collect();
        let wf: Vec<f32> = w.iter().zip(&delta).map(|(a, b)| a + b).collect();
        let emb: Vec<f32> = (0..30 * 8).map(|i| (i as f32 * 0.37).cos()).collect();
        let norm = vec![1.0f32; 8];
        let norm_ft = vec![1.5f32; 8];
        for (dir, weight, nw) in [("base", &w, &norm), ("ft", &wf, &norm_ft)] {
            std::fs::create_dir_all(d.join(dir)).unwrap();
            write_st(
                &d.join(dir).join("model.safetensors"),
                &[
                    ("m.embed_tokens.weight", "F32", vec![30, 8], f32s(&emb)),
                    ("m.proj.weight", "F32", vec![m, n], f32s(weight)),
                    ("m.norm.weight", "F32", vec![8], f32s(nw)),
                ],
            );
        }
        (w, wf)
    }

    fn spec(d: &Path, modules: serde_json::Value) -> ExtractSpec {
        ExtractSpec::from_json(
            &serde_json::json!({"finetuned": d.join("ft"), "base": d.join("base"), "rank": 4, "modules": modules,
                                "out": d.join("out"), "threads": 2})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn writes_factors_whose_product_is_the_task_vector_and_skips_unchanged_modules() {
        let d = tmpdir("e2e");
        let (w, wf) = family(&d);
        let s = spec(
            &d,
            serde_json::json!([{"module": "m.embed_tokens", "kind": "save"}, {"module": "m.proj", "kind": "lora"},
                               {"module": "m.norm", "kind": "save"}]),
        );
        let rep = extract(&s, None).unwrap();
        assert_eq!(rep.skipped, vec!["m.embed_tokens".to_string()]);
        assert_eq!(rep.modules.len(), 2);
        let c = Checkpoint::open(&d.join("out/adapter_model.safetensors")).unwrap();
        let (sa, a) = read_f32(&c, "base_model.model.m.proj.lora_A.weight");
        let (sb, b) = read_f32(&c, "base_model.model.m.proj.lora_B.weight");
        assert_eq!((sa.clone(), sb), (vec![4, 40], vec![12, 4]));
        // rank 4 of 12 with oversampling 10: the exact SVD; the difference has rank <= 12, so the
        // product is the best rank-4 approximation, checked here only for closeness.
        let mut err = 0f64;
        let mut tot = 0f64;
        for i in 0..12 {
            for j in 0..40 {
                let p: f64 = (0..4).map(|c| b[i * 4 + c] as f64 * a[c * 40 + j] as f64).sum();
                let dl = (wf[i * 40 + j] - w[i * 40 + j]) as f64;
                err += (p - dl).powi(2);
                tot += dl * dl;
            }
        }
        let rel = (err / tot).sqrt();
        assert!((rel - rep.modules[0].relative_error.unwrap()).abs() < 1e-4, "{rel} vs {:?}", rep.modules[0]);
        assert_eq!(read_f32(&c, "base_model.model.m.norm.weight").1, vec![1.5f32; 8]);
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("out/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 4);
        assert_eq!(cfg["target_modules"], serde_json::json!(["proj"]));
        // "norm" alone would be a suffix of no other module here either.
        assert_eq!(cfg["modules_to_save"], serde_json::json!(["norm"]));
        assert!(d.join("out/umerge.yml").is_file());
    }

    #[test]
    fn short_names_are_used_only_where_they_match_nothing_else() {
        let all: BTreeSet<String> =
            ["a.0.q", "a.1.q", "a.0.k", "a.0.ln", "a.1.ln", "a.ln", "a", "a.0", "a.1"].iter().map(|s| s.to_string()).collect();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
        assert_eq!(peft_names(&set(&["a.0.q", "a.1.q", "a.0.k"]), &all, lora_matches), vec!["k", "q"]);
        assert_eq!(peft_names(&set(&["a.0.q", "a.0.k"]), &all, lora_matches), vec!["a.0.q", "k"]);
        // "ln" is a suffix of a.0.ln, a.1.ln and a.ln: short only when all three are saved.
        assert_eq!(peft_names(&set(&["a.ln"]), &all, save_matches), vec!["a.ln"]);
        assert_eq!(peft_names(&set(&["a.ln", "a.0.ln", "a.1.ln"]), &all, save_matches), vec!["ln"]);
        assert!(lora_matches("q", "a.0.q") && !lora_matches("q", "a.0.xq") && lora_matches("a.0.q", "a.0.q"));
    }

    #[test]
    fn misfits_are_refused_before_anything_is_written() {
        let d = tmpdir("misfit");
        family(&d);
        let s = spec(&d, serde_json::json!([{"module": "m.norm", "kind": "lora"}, {"module": "m.gone", "kind": "lora"}]));
        let e = extract(&s, None).unwrap_err();
        let msg = e.to_string();
        assert!(e.is_input() && msg.contains("only 2-D weights") && msg.contains("m.gone.weight"), "{msg}");
        assert!(!d.join("out").exists());
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(TMP_PREFIX)));
        let same = spec(&d, serde_json::json!([{"module": "m.embed_tokens", "kind": "lora"}]));
        let e = extract(&same, None).unwrap_err();
        assert!(e.to_string().contains("no module to decompose differs"), "{e}");
        assert!(!d.join("out").exists());
    }
}
