//! Checking a checkpoint before trusting it: `umerge verify DIR`.
//!
//! [`verify`] runs every check it can and reports every problem it finds (it does not stop at the
//! first), as one [`VerifyReport`]:
//!
//! 1. **Header rules**, per shard file, independently: the safetensors format's own rules (the
//!    8-byte header length within the file and under the crate's 100 MB cap, valid UTF-8 JSON,
//!    known dtypes, `data_offsets` contiguous from 0 with no gap or overlap, each tensor's byte
//!    size equal to shape x dtype, the data section ending exactly at the end of the file), plus
//!    umerge's own (no sub-byte dtypes).
//! 2. **Index consistency** (sharded checkpoints): the index is JSON with a `weight_map`; every
//!    shard name is a plain relative path inside the directory and exists; every tensor is stored
//!    in the shard the index names, and every stored tensor is listed; no tensor is stored twice;
//!    `metadata.total_size`, when present, equals the tensor bytes; `*.safetensors` files the
//!    index does not name are reported as warnings. Then the engine's own reader
//!    ([`Checkpoint::open`]) must accept the checkpoint, so "valid" means "umerge will read it".
//! 3. **Sizes**: each shard file is exactly header + data long (part of rule 1), and, with a
//!    recipe, equal to the size the merge recorded.
//! 4. **NaN / Inf scan** (optional): every float tensor (BF16, F16, F32, F64, F8) is scanned for
//!    non-finite values by their bit patterns (exponent field all ones), which needs no decoding.
//! 5. **Checksums**: the sha256 of every shard file, compared with the `shards:` line that the
//!    merge writes into the recipe `umerge.yml` beside the weights (a JSON flow mapping
//!    `{"<file>": {"bytes": N, "sha256": "<hex>"}}`, see [`RECIPE_SHARDS_KEY`]). A checkpoint with
//!    no recipe is reported with a warning (nothing to compare against), not as invalid.
//!
//! This module only reads; it never modifies the checkpoint. It does not judge the values
//! themselves beyond finiteness.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, INDEX_NAME, SINGLE_NAME};
use crate::dtype::{elem_bytes, Dtype};

/// The recipe file written beside merged weights.
pub const RECIPE_NAME: &str = "umerge.yml";
/// The recipe key whose value (a one-line JSON mapping) records every shard's size and sha256.
pub const RECIPE_SHARDS_KEY: &str = "shards";

/// What to check beyond the structural rules.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Scan every float tensor for NaN and infinity.
    pub scan_nonfinite: bool,
    /// Compute the sha256 of every shard (and compare it with the recipe when there is one).
    pub hash: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { scan_nonfinite: false, hash: true }
    }
}

/// One shard file as verified.
#[derive(Debug, Clone, Serialize)]
pub struct ShardCheck {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// Tensors in its header (0 when the header is invalid).
    pub tensors: usize,
    /// Whether its header passed the rules.
    pub header_ok: bool,
    /// Its sha256 (hex), when hashing was asked for and the file could be read.
    pub sha256: Option<String>,
    /// The sha256 the recipe records for it, if any.
    pub recipe_sha256: Option<String>,
}

/// A float tensor holding non-finite values.
#[derive(Debug, Clone, Serialize)]
pub struct NonFiniteTensor {
    /// Tensor name.
    pub tensor: String,
    /// Shard file name.
    pub file: String,
    /// How many NaN elements.
    pub nan: u64,
    /// How many infinite elements.
    pub inf: u64,
    /// Flat index of the first non-finite element.
    pub first_index: u64,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The path checked.
    pub path: String,
    /// True when no error was found.
    pub valid: bool,
    /// `single`, `sharded` or `unknown` (when the layout could not be read).
    pub format: String,
    /// Every shard file.
    pub shards: Vec<ShardCheck>,
    /// Number of tensors (0 when the checkpoint could not be read).
    pub tensor_count: usize,
    /// Tensor data bytes.
    pub total_bytes: u64,
    /// The checks that ran, in order (`headers`, `index`, `reader`, `nonfinite`, `sha256`, `recipe`).
    pub checks: Vec<String>,
    /// Whether the recipe recorded checksums that were compared.
    pub recipe_checked: bool,
    /// Tensors with NaN or Inf (only with the scan).
    pub nonfinite: Vec<NonFiniteTensor>,
    /// Every problem that makes the checkpoint invalid, each saying what and where.
    pub errors: Vec<String>,
    /// Things worth knowing that do not make it invalid.
    pub warnings: Vec<String>,
}

/// One tensor entry of a shard header, as [`check_shard_bytes`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Tensor name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute start of its bytes in the file.
    pub start: usize,
    /// Absolute end (exclusive).
    pub end: usize,
}

/// The parsed header of a shard that passed the rules.
#[derive(Debug, Clone)]
pub struct HeaderSummary {
    /// Where the data section starts (8 + header length).
    pub data_start: usize,
    /// Tensors in offset order.
    pub tensors: Vec<HeaderTensor>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Checks the whole content of one safetensors file against the format's rules (see the module
/// docs, rule 1). Pure: no I/O, so it is also what the fuzz targets drive.
pub fn check_shard_bytes(buf: &[u8]) -> Result<HeaderSummary, String> {
    if buf.len() < 8 {
        return Err(format!("file is {} bytes, shorter than the 8-byte header length (truncated?)", buf.len()));
    }
    let (n, meta) = SafeTensors::read_metadata(buf).map_err(|e| {
        use safetensors::SafeTensorError as E;
        let hl = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
        match e {
            E::InvalidHeaderLength => format!("header length {hl} runs past the end of the {}-byte file", buf.len()),
            E::HeaderTooLarge => format!("header length {hl} is over the format's 100 MB cap"),
            E::MetadataIncompleteBuffer => format!(
                "data section does not match the header: the file is {} bytes but the tensors do not end exactly at its end (truncated or padded?)",
                buf.len()
            ),
            E::InvalidOffset(name) => format!("tensor {name} has data offsets that overlap, leave a gap or run backwards"),
            E::TensorInvalidInfo => "a tensor's byte size does not equal its shape x dtype".to_string(),
            other => other.to_string(),
        }
    })?;
    let data_start = 8 + n;
    let mut tensors = Vec::new();
    for (name, info) in meta.tensors() {
        if elem_bytes(info.dtype).is_none() {
            return Err(format!("tensor {name} has sub-byte dtype {:?}, which umerge cannot carry", info.dtype));
        }
        let (a, b) = info.data_offsets;
        let (start, end) = match (data_start.checked_add(a), data_start.checked_add(b)) {
            (Some(s), Some(e)) if s <= e && e <= buf.len() => (s, e),
            _ => return Err(format!("tensor {name} has data offsets [{a}, {b}] outside the file")),
        };
        tensors.push(HeaderTensor { name, dtype: info.dtype, shape: info.shape.clone(), start, end });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    Ok(HeaderSummary { data_start, tensors, metadata })
}

/// Counts NaN and infinite values of a float tensor's raw little-endian bytes, by bit pattern.
/// Returns `(nan, inf, first_index)`, or `None` for a non-float dtype.
pub fn count_nonfinite(dtype: Dtype, bytes: &[u8]) -> Option<(u64, u64, Option<u64>)> {
    // (element bytes, exponent mask, mantissa mask); "non-finite" = exponent all ones.
    let (eb, exp, man): (usize, u64, u64) = match dtype {
        Dtype::F64 => (8, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        Dtype::F32 => (4, 0x7f80_0000, 0x007f_ffff),
        Dtype::BF16 => (2, 0x7f80, 0x007f),
        Dtype::F16 => (2, 0x7c00, 0x03ff),
        Dtype::F8_E5M2 => (1, 0x7c, 0x03),
        // E4M3 (the "fn" variant) has no infinities; NaN is S.1111.111.
        Dtype::F8_E4M3 => (1, 0x7f, 0),
        _ => return None,
    };
    let (mut nan, mut inf, mut first) = (0u64, 0u64, None);
    for (i, c) in bytes.chunks_exact(eb).enumerate() {
        let mut v = [0u8; 8];
        v[..eb].copy_from_slice(c);
        let bits = u64::from_le_bytes(v);
        if bits & exp == exp {
            if dtype == Dtype::F8_E4M3 || bits & man != 0 {
                nan += 1;
            } else {
                inf += 1;
            }
            first.get_or_insert(i as u64);
        }
    }
    Some((nan, inf, first))
}

/// Checks that an index's shard name is a plain relative path (no `..`, no root, not empty).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| p.display().to_string())
}

/// What a recipe records per shard file: (bytes, if recorded; sha256 in lowercase hex).
pub type RecipeShards = BTreeMap<String, (Option<u64>, String)>;

/// The recorded `{file: (bytes, sha256)}` from a recipe's `shards:` line, if any.
pub fn recipe_shards(recipe: &str) -> Result<Option<RecipeShards>, String> {
    let prefix = format!("{RECIPE_SHARDS_KEY}:");
    let Some(line) = recipe.lines().find(|l| l.starts_with(&prefix)) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(line[prefix.len()..].trim())
        .map_err(|e| format!("the {RECIPE_SHARDS_KEY}: line is not a JSON mapping: {e}"))?;
    let obj = v.as_object().ok_or_else(|| format!("the {RECIPE_SHARDS_KEY}: line is not a mapping"))?;
    let mut out = BTreeMap::new();
    for (file, entry) in obj {
        let sha = entry.get("sha256").and_then(|s| s.as_str()).ok_or_else(|| format!("no sha256 recorded for {file}"))?;
        out.insert(file.clone(), (entry.get("bytes").and_then(|b| b.as_u64()), sha.to_ascii_lowercase()));
    }
    Ok(Some(out))
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

use crate::checksum::hex;

/// The shard files a checkpoint path names, and what was learned from the index on the way.
struct Layout {
    dir: PathBuf,
    format: &'static str,
    files: Vec<PathBuf>,
    /// tensor -> shard name, from the index.
    weight_map: Option<BTreeMap<String, String>>,
    total_size: Option<u64>,
}

fn find_layout(path: &Path, errors: &mut Vec<String>, warnings: &mut Vec<String>) -> Option<Layout> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    if meta.is_file() {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        return Some(Layout { dir, format: "single", files: vec![path.to_path_buf()], weight_map: None, total_size: None });
    }
    let index = path.join(INDEX_NAME);
    if index.is_file() {
        let text = match std::fs::read_to_string(&index) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("cannot read the shard index: {e} ({})", index.display()));
                return None;
            }
        };
        let v: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("the shard index is not valid JSON: {e} ({})", index.display()));
                return None;
            }
        };
        let Some(wm) = v.get("weight_map").and_then(|w| w.as_object()) else {
            errors.push(format!("the shard index has no \"weight_map\" object ({})", index.display()));
            return None;
        };
        let mut weight_map = BTreeMap::new();
        let mut names = BTreeSet::new();
        for (t, s) in wm {
            match s.as_str() {
                Some(s) => {
                    weight_map.insert(t.clone(), s.to_string());
                    names.insert(s.to_string());
                }
                None => errors.push(format!("weight_map entry for {t} is not a string ({})", index.display())),
            }
        }
        let total_size = match v.get("metadata").and_then(|m| m.get("total_size")) {
            None => None,
            Some(x) => match x.as_u64().or_else(|| x.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)) {
                Some(n) => Some(n),
                None => {
                    errors.push(format!("metadata.total_size {x} is not a byte count ({})", index.display()));
                    None
                }
            },
        };
        let mut files = Vec::new();
        for name in &names {
            if !plain_name(name) {
                errors.push(format!("shard name {name:?} in the index points outside the model directory ({})", index.display()));
                continue;
            }
            let full = path.join(name);
            if !full.exists() {
                errors.push(format!("shard {name} named in the index does not exist ({})", index.display()));
                continue;
            }
            if !full.is_file() {
                errors.push(format!("shard {name} named in the index is not a regular file ({})", index.display()));
                continue;
            }
            let inside = match (path.canonicalize(), full.canonicalize()) {
                (Ok(d), Ok(f)) => f.starts_with(d),
                _ => false,
            };
            if !inside {
                errors.push(format!("shard {name} named in the index resolves outside the model directory ({})", index.display()));
                continue;
            }
            files.push(full);
        }
        if let Ok(rd) = std::fs::read_dir(path) {
            let mut strays: Vec<String> = rd
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
                .filter(|n| n.ends_with(".safetensors") && !names.contains(n))
                .collect();
            strays.sort();
            for s in strays {
                warnings.push(format!("{s} is not named in the shard index: umerge and transformers ignore it"));
            }
        }
        return Some(Layout { dir: path.to_path_buf(), format: "sharded", files, weight_map: Some(weight_map), total_size });
    }
    let single = path.join(SINGLE_NAME);
    if single.is_file() {
        return Some(Layout { dir: path.to_path_buf(), format: "single", files: vec![single], weight_map: None, total_size: None });
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect(),
        Err(e) => {
            errors.push(format!("cannot read the model directory: {e} ({})", path.display()));
            return None;
        }
    };
    if files.is_empty() {
        errors
            .push(format!("no safetensors weights found: expected model.safetensors, {INDEX_NAME} or *.safetensors ({})", path.display()));
        return None;
    }
    files.sort();
    let format = if files.len() == 1 { "single" } else { "sharded" };
    Some(Layout { dir: path.to_path_buf(), format, files, weight_map: None, total_size: None })
}

/// Result of checking one shard file.
struct ShardResult {
    check: ShardCheck,
    header: Option<HeaderSummary>,
    nonfinite: Vec<NonFiniteTensor>,
    error: Option<String>,
}

fn check_shard_file(path: &Path, opts: &VerifyOptions) -> ShardResult {
    let file = file_name(path);
    let mut check = ShardCheck { file: file.clone(), bytes: 0, tensors: 0, header_ok: false, sha256: None, recipe_sha256: None };
    let fail = |check: ShardCheck, e: String| ShardResult { check, header: None, nonfinite: Vec::new(), error: Some(e) };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(check, format!("cannot open: {e} ({})", path.display())),
    };
    check.bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mmap = if check.bytes == 0 {
        None
    } else {
        // SAFETY: read-only private map of a file we only read; verification assumes the file is
        // not modified while it runs (like any reader of a memory-mapped file).
        match unsafe { Mmap::map(&f) } {
            Ok(m) => Some(m),
            Err(e) => return fail(check, format!("cannot map: {e} ({})", path.display())),
        }
    };
    let buf: &[u8] = mmap.as_deref().unwrap_or(&[]);
    if opts.hash {
        let mut h = Sha256::new();
        h.update(buf);
        check.sha256 = Some(hex(&h.finalize()));
    }
    let header = match check_shard_bytes(buf) {
        Ok(h) => h,
        Err(e) => {
            let msg = format!("invalid safetensors file: {e} ({})", path.display());
            return fail(check, msg);
        }
    };
    check.header_ok = true;
    check.tensors = header.tensors.len();
    let mut nonfinite = Vec::new();
    if opts.scan_nonfinite {
        for t in &header.tensors {
            if let Some((nan, inf, Some(first))) = buf.get(t.start..t.end).and_then(|b| count_nonfinite(t.dtype, b)) {
                nonfinite.push(NonFiniteTensor { tensor: t.name.clone(), file: file.clone(), nan, inf, first_index: first });
            }
        }
    }
    ShardResult { check, header: Some(header), nonfinite, error: None }
}

/// Verifies the checkpoint at `path` (directory or `.safetensors` file); see the module docs.
pub fn verify(path: &Path, opts: &VerifyOptions) -> VerifyReport {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut checks = vec!["headers".to_string()];
    let mut report = VerifyReport {
        path: path.display().to_string(),
        valid: false,
        format: "unknown".into(),
        shards: Vec::new(),
        tensor_count: 0,
        total_bytes: 0,
        checks: Vec::new(),
        recipe_checked: false,
        nonfinite: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let Some(layout) = find_layout(path, &mut errors, &mut warnings) else {
        report.checks = checks;
        report.errors = errors;
        report.warnings = warnings;
        return report;
    };
    report.format = layout.format.to_string();

    // 1. Every shard on its own (in parallel: hashing and scanning read every byte).
    let results: Vec<ShardResult> = layout.files.par_iter().map(|f| check_shard_file(f, opts)).collect();
    let mut stored: BTreeMap<String, String> = BTreeMap::new(); // tensor -> shard file
    let mut data_bytes = 0u64;
    for r in &results {
        if let Some(e) = &r.error {
            errors.push(e.clone());
        }
        if let Some(h) = &r.header {
            for t in &h.tensors {
                data_bytes += (t.end - t.start) as u64;
                if let Some(prev) = stored.insert(t.name.clone(), r.check.file.clone()) {
                    errors.push(format!("tensor {} is stored twice ({prev} and {})", t.name, r.check.file));
                }
            }
        }
    }
    let all_headers_ok = results.iter().all(|r| r.error.is_none());

    // 2. The index against what the shards hold.
    if let Some(wm) = &layout.weight_map {
        checks.push("index".into());
        let index = layout.dir.join(INDEX_NAME);
        if all_headers_ok && errors.is_empty() {
            for (t, s) in wm {
                match stored.get(t) {
                    None => errors.push(format!("tensor {t} is listed in shard {s} but no shard holds it ({})", index.display())),
                    Some(f) if f != s => errors.push(format!("tensor {t} is listed in shard {s} but stored in {f} ({})", index.display())),
                    _ => {}
                }
            }
            for (t, f) in &stored {
                if !wm.contains_key(t) {
                    errors.push(format!("tensor {t} stored in {f} is not listed in the index's weight_map ({})", index.display()));
                }
            }
        }
        if let Some(ts) = layout.total_size {
            if all_headers_ok && ts != data_bytes {
                errors.push(format!(
                    "metadata.total_size is {ts} but the shards hold {data_bytes} bytes of tensor data ({})",
                    index.display()
                ));
            }
        } else {
            warnings.push("the shard index has no metadata.total_size".into());
        }
    }

    // 3. The engine's own reader must accept it.
    if errors.is_empty() {
        checks.push("reader".into());
        if let Err(e) = Checkpoint::open(path) {
            errors.push(e.to_string());
        }
    }

    // 4. Non-finite values.
    if opts.scan_nonfinite {
        checks.push("nonfinite".into());
        for r in &results {
            for t in &r.nonfinite {
                errors.push(format!(
                    "tensor {} holds {} NaN and {} Inf values, the first at element {} ({})",
                    t.tensor, t.nan, t.inf, t.first_index, t.file
                ));
            }
        }
    }

    // 5. Checksums against the recipe.
    if opts.hash {
        checks.push("sha256".into());
    }
    let recipe_path = layout.dir.join(RECIPE_NAME);
    let mut shards: Vec<ShardCheck> = results.iter().map(|r| r.check.clone()).collect();
    match std::fs::read_to_string(&recipe_path) {
        Err(_) => warnings.push(format!("no {RECIPE_NAME} recipe beside the weights: shard checksums not compared")),
        Ok(text) => match recipe_shards(&text) {
            Err(e) => errors.push(format!("{e} ({})", recipe_path.display())),
            Ok(None) => warnings.push(format!(
                "the recipe records no shard checksums (written by an older umerge?): not compared ({})",
                recipe_path.display()
            )),
            Ok(Some(rec)) => {
                checks.push("recipe".into());
                report.recipe_checked = opts.hash;
                let on_disk: BTreeSet<String> = shards.iter().map(|s| s.file.clone()).collect();
                for name in rec.keys() {
                    if !on_disk.contains(name) {
                        errors.push(format!("shard {name} recorded in the recipe is missing ({})", layout.dir.display()));
                    }
                }
                for s in &mut shards {
                    match rec.get(&s.file) {
                        None => errors.push(format!("shard {} is not recorded in the recipe ({})", s.file, recipe_path.display())),
                        Some((bytes, sha)) => {
                            s.recipe_sha256 = Some(sha.clone());
                            if let Some(b) = bytes {
                                if *b != s.bytes {
                                    errors.push(format!("shard {} is {} bytes but the recipe records {b}", s.file, s.bytes));
                                }
                            }
                            if let Some(h) = &s.sha256 {
                                if h != sha {
                                    errors.push(format!(
                                        "shard {} has sha256 {h} but the recipe records {sha} (modified or corrupted)",
                                        s.file
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        },
    }

    report.tensor_count = stored.len();
    report.total_bytes = data_bytes;
    report.nonfinite = results.into_iter().flat_map(|r| r.nonfinite).collect();
    report.shards = shards;
    report.checks = checks;
    report.valid = errors.is_empty();
    report.errors = errors;
    report.warnings = warnings;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    // A safetensors file's bytes from (name, dtype, shape, bytes), header built by hand.
    use crate::checkpoint::tests::st_bytes as st;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-verify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn nonfinite_counts_by_bit_pattern() {
        let b = f32s(&[1.0, f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0]);
        assert_eq!(count_nonfinite(Dtype::F32, &b), Some((1, 2, Some(1))));
        let h: Vec<u8> =
            [half::bf16::from_f32(1.0), half::bf16::NAN, half::bf16::NEG_INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_nonfinite(Dtype::BF16, &h), Some((1, 1, Some(1))));
        let h: Vec<u8> = [half::f16::INFINITY, half::f16::MAX].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_nonfinite(Dtype::F16, &h), Some((0, 1, Some(0))));
        let d: Vec<u8> = [f64::MAX, 1e300, f64::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_nonfinite(Dtype::F64, &d), Some((1, 0, Some(2))));
        assert_eq!(count_nonfinite(Dtype::I32, &[0; 4]), None);
    }

    #[test]
    fn header_rules() {
        let good = st(&[("a", "F32", vec![2], f32s(&[1.0, 2.0])), ("b", "I64", vec![1], vec![0; 8])]);
        let h = check_shard_bytes(&good).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "a");
        assert!(check_shard_bytes(&good[..good.len() - 1]).unwrap_err().contains("truncated"));
        assert!(check_shard_bytes(&good[..5]).is_err());
        let mut padded = good.clone();
        padded.push(0);
        assert!(check_shard_bytes(&padded).is_err());
        let mut long = good.clone();
        long[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(check_shard_bytes(&long).is_err());
    }

    #[test]
    fn recipe_line_round_trip() {
        let r = "method: \"ties\"\nshards: {\"model.safetensors\": {\"bytes\": 12, \"sha256\": \"AB\"}}\n";
        let m = recipe_shards(r).unwrap().unwrap();
        assert_eq!(m["model.safetensors"], (Some(12), "ab".to_string()));
        assert!(recipe_shards("method: x\n").unwrap().is_none());
        assert!(recipe_shards("shards: [1]\n").is_err());
    }

    #[test]
    fn verifies_a_sharded_checkpoint_and_finds_every_problem() {
        let d = tmpdir("sharded");
        let s1 = st(&[("a", "F32", vec![2], f32s(&[1.0, 2.0]))]);
        let s2 = st(&[("b", "F32", vec![2], f32s(&[3.0, f32::NAN]))]);
        std::fs::write(d.join("s1.safetensors"), &s1).unwrap();
        std::fs::write(d.join("s2.safetensors"), &s2).unwrap();
        std::fs::write(d.join(INDEX_NAME), r#"{"metadata":{"total_size":16},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#)
            .unwrap();
        let sha1 = hex(&Sha256::digest(&s1));
        let sha2 = hex(&Sha256::digest(&s2));
        let recipe = format!(
            "method: \"ties\"\nshards: {{\"s1.safetensors\": {{\"bytes\": {}, \"sha256\": \"{sha1}\"}}, \"s2.safetensors\": {{\"bytes\": {}, \"sha256\": \"{sha2}\"}}}}\n",
            s1.len(),
            s2.len()
        );
        std::fs::write(d.join(RECIPE_NAME), &recipe).unwrap();
        let r = verify(&d, &VerifyOptions::default());
        assert!(r.valid, "{:?}", r.errors);
        assert!(r.recipe_checked);
        assert_eq!(r.tensor_count, 2);
        assert_eq!(r.shards[0].sha256.as_deref(), Some(sha1.as_str()));

        // The scan finds the NaN.
        let r = verify(&d, &VerifyOptions { scan_nonfinite: true, hash: true });
        assert!(!r.valid);
        assert_eq!(r.nonfinite.len(), 1);
        assert_eq!((r.nonfinite[0].nan, r.nonfinite[0].first_index), (1, 1));

        // A flipped byte in the data: headers fine, checksum not.
        let mut bad = s1.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(d.join("s1.safetensors"), &bad).unwrap();
        let r = verify(&d, &VerifyOptions::default());
        assert!(!r.valid);
        assert!(r.errors.iter().any(|e| e.contains("sha256") && e.contains("s1.safetensors")), "{:?}", r.errors);
        std::fs::write(d.join("s1.safetensors"), &s1).unwrap();

        // Index problems: wrong total, a listed tensor nobody holds, a stored tensor not listed, a stray file.
        std::fs::write(d.join(INDEX_NAME), r#"{"metadata":{"total_size":99},"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}}"#)
            .unwrap();
        let mut f = File::create(d.join("extra.safetensors")).unwrap();
        f.write_all(&st(&[("z", "F32", vec![0], vec![])])).unwrap();
        let r = verify(&d, &VerifyOptions::default());
        let all = r.errors.join("\n");
        assert!(all.contains("total_size is 99"), "{all}");
        assert!(all.contains("tensor c is listed"), "{all}");
        assert!(all.contains("tensor b stored in s2.safetensors is not listed"), "{all}");
        assert!(r.warnings.iter().any(|w| w.contains("extra.safetensors")), "{:?}", r.warnings);

        // An index escaping the directory is reported, and the escaping file is never opened.
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"a":"../s1.safetensors","b":"s2.safetensors"}}"#).unwrap();
        let r = verify(&d, &VerifyOptions::default());
        assert!(r.errors.iter().any(|e| e.contains("outside the model directory")), "{:?}", r.errors);
        assert!(r.shards.iter().all(|s| s.file != "s1.safetensors"));
    }

    #[test]
    fn reports_every_bad_shard_not_just_the_first() {
        let d = tmpdir("many");
        std::fs::write(d.join("a.safetensors"), b"1234").unwrap();
        std::fs::write(d.join("b.safetensors"), [255u8; 16]).unwrap();
        let r = verify(&d, &VerifyOptions::default());
        assert!(!r.valid);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert!(r.warnings.iter().any(|w| w.contains("no umerge.yml")));
    }
}
