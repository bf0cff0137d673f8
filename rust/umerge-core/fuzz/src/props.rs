//! The properties the fuzz targets check, as plain functions over bytes.
//!
//! Shared by the libFuzzer targets (`fuzz_targets/*.rs`) and by the engine's ordinary test suite
//! (`rust/umerge-core/tests/fuzz_regressions.rs` includes this file with `#[path]`), which replays
//! the committed corpus and every crash ever found, so a fixed bug stays fixed without a fuzzer.
//! Only `std`, `serde_json` and `umerge_core` are used here, for that reason.
//!
//! Each function takes arbitrary bytes, turns them into files on disk (a safetensors shard, a
//! sharded checkpoint with an index, a family of checkpoints to merge), runs the engine on them,
//! and panics when the engine breaks a promise:
//!
//! - [`header`]: the engine's reader and the pure header check in `verify` agree on every file;
//!   an accepted file's tensors all lie inside it; a rejected one gives an input error.
//! - [`index`]: a sharded checkpoint is accepted only when every shard it opens lies inside the
//!   model directory and every index entry matches what the shards hold; `verify` never calls
//!   valid what the reader refuses.
//! - [`planner`]: a merge either succeeds, and its output verifies (headers, index, recipe
//!   checksums) and holds exactly the union of the input tensors, byte-identical for another
//!   thread count and memory budget, or fails with an input error leaving no output and no
//!   temporary directory; never an internal error, never a panic.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use umerge_core::checkpoint::{self, Checkpoint};
use umerge_core::spec::{MergeSpec, ModelSpec, OutputOptions};
use umerge_core::verify::{self, VerifyOptions};
use umerge_core::Error;

/// Reads fuzz bytes as small choices; past the end every read returns 0.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// Wraps fuzz input.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// A value in `0..n` (n >= 1).
    pub fn below(&mut self, n: usize) -> usize {
        self.u8() as usize % n.max(1)
    }
    /// True with probability about `num / 8` (false past the end of the input).
    pub fn chance(&mut self, num: u8) -> bool {
        self.u8() % 8 >= 8 - num.min(8)
    }
    /// Up to `n` raw bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let s = self.pos.min(self.data.len());
        let e = (s + n).min(self.data.len());
        self.pos = e.max(self.pos + n);
        &self.data[s..e]
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[s..]
    }
}

/// This process's and this thread's scratch root (the test suite runs properties on several
/// threads at once), in tmpfs when there is one.
fn scratch_root() -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    root.join(format!("umerge-fuzz-{}", std::process::id())).join(thread)
}

/// Removes this thread's scratch files when dropped (the test suite holds one per test).
pub struct ScratchGuard;

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        let d = scratch_root();
        let _ = std::fs::remove_dir_all(&d);
        if let Some(p) = d.parent() {
            let _ = std::fs::remove_dir(p); // only when no other thread still uses it
        }
    }
}

/// A scratch directory for `tag`, emptied.
pub fn scratch(tag: &str) -> PathBuf {
    let d = scratch_root().join(tag);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// One tensor to write: name, dtype name, shape, raw data.
pub type Entry = (String, String, Vec<usize>, Vec<u8>);

/// A safetensors file (header padded to 8 bytes, `{"format":"pt"}` metadata) from entries.
pub fn st_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut off = 0usize;
    let mut data = Vec::new();
    for (name, dt, shape, bytes) in entries {
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{dt}\",\"shape\":{shape:?},\"data_offsets\":[{off},{}]}}",
            serde_json::to_string(name).unwrap_or_default(),
            off + bytes.len()
        ));
        off += bytes.len();
        data.extend_from_slice(bytes);
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn elem_size(dt: &str) -> usize {
    match dt {
        // C64 (complex64: two f32) arrived with safetensors 0.8; the reader copies it unchanged.
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "BF16" | "F16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// header

/// Property of the `safetensors_header` target. The first byte picks the mode: even = the rest
/// is the whole file; odd = bytes 1..3 give a header length `hl` (little-endian, at most the
/// rest), and the file is `le64(hl) ++ rest` — so mutations of the JSON keep a matching length
/// prefix and reach the deeper rules.
pub fn header(data: &[u8]) {
    let file = match data.first() {
        None => Vec::new(),
        Some(b) if b % 2 == 0 => data[1..].to_vec(),
        Some(_) => {
            let rest = data.get(3..).unwrap_or(&[]);
            let hl = data.get(1..3).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).unwrap_or(0).min(rest.len());
            let mut f = (hl as u64).to_le_bytes().to_vec();
            f.extend_from_slice(rest);
            f
        }
    };
    let dir = scratch("header");
    let p = dir.join("x.safetensors");
    std::fs::write(&p, &file).expect("write");
    let engine = Checkpoint::open(&p);
    let pure = verify::check_shard_bytes(&file);
    match (&engine, &pure) {
        (Ok(c), Ok(h)) => {
            assert_eq!(c.tensors.len(), h.tensors.len(), "reader and verify disagree on the tensor count");
            for t in &h.tensors {
                let info = c.tensors.get(&t.name).expect("tensor known to verify missing from the reader");
                assert_eq!((info.start, info.end), (t.start, t.end));
                assert!(info.end <= file.len(), "tensor {} ends past the file", t.name);
                let b = c.tensor_bytes(info).expect("accepted tensor must be readable");
                let eb = elem_size(&format!("{:?}", info.dtype)) as u64;
                assert_eq!(b.len() as u64, info.numel() * eb, "tensor {} byte size != shape x dtype", t.name);
                c.release(info.shard, info.start, b.len());
            }
        }
        (Err(e), Err(_)) => {
            assert!(e.is_input(), "a bad file must be an input error, got: {e}");
            assert!(!e.to_string().contains('\n'), "error message spans lines: {e}");
        }
        (Ok(_), Err(e)) => panic!("reader accepts a file verify rejects: {e}"),
        (Err(e), Ok(_)) => panic!("verify accepts a file the reader rejects: {e}"),
    }
    let info = checkpoint::inspect(&p);
    assert_eq!(info["valid"].as_bool(), Some(pure.is_ok()));
    let v = verify::verify(&p, &VerifyOptions { scan_nonfinite: true, hash: true });
    if pure.is_err() {
        assert!(!v.valid);
    }
}

// ---------------------------------------------------------------------------------------------
// index

const INDEX_TENSORS: &[&str] = &["a", "b", "c", "model.layers.0.w", "lm_head.weight"];
const INDEX_NAMES: &[&str] = &[
    "s0.safetensors",
    "s1.safetensors",
    "s2.safetensors",
    "../outside.safetensors",
    "/etc/passwd",
    "",
    "./s0.safetensors",
    "sub/../s0.safetensors",
    "missing.safetensors",
    "link.safetensors",
    "sub",
    "s0.safetensors/",
    "pipe.safetensors",
];
const INDEX_DTYPES: &[&str] = &["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL"];

fn tensor_bytes(b: &mut Bytes<'_>, dt: &str, shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product::<usize>() * elem_size(dt);
    let mut v = b.take(n).to_vec();
    v.resize(n, 0);
    v
}

/// Property of the `shard_index` target (see the module docs).
pub fn index(data: &[u8]) {
    let mut b = Bytes::new(data);
    let root = scratch("index");
    let dir = root.join("model");
    std::fs::create_dir_all(dir.join("sub")).expect("dir");
    // A valid shard outside the model directory, reachable by `..` and by a symlink.
    let outside = st_bytes(&[("a".into(), "F32".into(), vec![1], vec![0, 0, 128, 63])]);
    std::fs::write(root.join("outside.safetensors"), &outside).expect("write");
    #[cfg(unix)]
    let _ = std::os::unix::fs::symlink("../outside.safetensors", dir.join("link.safetensors"));
    // A FIFO: opening it would block for ever (a hang found by this target's name pool).
    #[cfg(unix)]
    let _ = std::process::Command::new("mkfifo").arg(dir.join("pipe.safetensors")).status();

    let n_shards = 1 + b.below(3);
    let mut stored: Vec<(String, usize)> = Vec::new();
    for s in 0..n_shards {
        let mut entries: Vec<Entry> = Vec::new();
        for _ in 0..b.below(4) {
            let name = INDEX_TENSORS[b.below(INDEX_TENSORS.len())].to_string();
            if entries.iter().any(|e| e.0 == name) {
                continue;
            }
            let dt = INDEX_DTYPES[b.below(INDEX_DTYPES.len())];
            let shape: Vec<usize> = (0..b.below(3)).map(|_| b.below(4)).collect();
            let bytes = tensor_bytes(&mut b, dt, &shape);
            entries.push((name.clone(), dt.into(), shape, bytes));
            stored.push((name, s));
        }
        std::fs::write(dir.join(format!("s{s}.safetensors")), st_bytes(&entries)).expect("write");
    }
    let index_text = if b.chance(1) {
        String::from_utf8_lossy(b.rest()).to_string()
    } else {
        let mut wm = serde_json::Map::new();
        for (name, s) in &stored {
            let shard = if b.chance(6) { format!("s{s}.safetensors") } else { INDEX_NAMES[b.below(INDEX_NAMES.len())].to_string() };
            if b.chance(7) {
                wm.insert(name.clone(), serde_json::Value::String(shard));
            }
        }
        for _ in 0..b.below(3) {
            let t = INDEX_TENSORS[b.below(INDEX_TENSORS.len())];
            let v = match b.below(4) {
                0 => serde_json::json!(1),
                1 => serde_json::Value::Null,
                _ => serde_json::Value::String(INDEX_NAMES[b.below(INDEX_NAMES.len())].to_string()),
            };
            wm.insert(t.to_string(), v);
        }
        let total: u64 = 0;
        let mut v = serde_json::json!({"weight_map": wm});
        match b.below(4) {
            0 => {}
            1 => v["metadata"] = serde_json::json!({"total_size": total + b.u8() as u64}),
            2 => v["metadata"] = serde_json::json!({"total_size": "big"}),
            _ => v["metadata"] = serde_json::json!(null),
        }
        if b.chance(1) {
            v = serde_json::json!([v]);
        }
        v.to_string()
    };
    std::fs::write(dir.join(checkpoint::INDEX_NAME), index_text).expect("write index");

    let engine = Checkpoint::open(&dir);
    let v = verify::verify(&dir, &VerifyOptions { scan_nonfinite: false, hash: true });
    match &engine {
        Ok(c) => {
            let cdir = dir.canonicalize().expect("canon");
            for s in &c.shards {
                let cs = s.path.canonicalize().expect("shard path");
                assert!(cs.starts_with(&cdir), "reader opened {} outside the model directory", cs.display());
            }
            for (name, info) in &c.tensors {
                let bytes = c.tensor_bytes(info).expect("accepted tensor readable");
                assert_eq!(bytes.len(), info.end - info.start, "tensor {name}");
            }
        }
        Err(e) => {
            assert!(e.is_input(), "bad index must be an input error: {e}");
            assert!(!v.valid, "verify calls valid a checkpoint the reader refuses: {e}");
        }
    }
    for s in &v.shards {
        assert_ne!(s.file, "outside.safetensors", "verify read a shard outside the model directory");
    }
}

// ---------------------------------------------------------------------------------------------
// planner

const PLAN_TENSORS: &[&str] = &[
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "lm_head.weight",
    "model.layers.0.rotary.inv_freq",
];
const PLAN_FLOATS: &[&str] = &["F32", "BF16", "F16", "F64"];

/// `n` values of float dtype `dt` from fuzz bytes: multiples of 1/16 in [-8, 8), and with
/// `specials` also NaN, +Inf and -0.0.
fn float_bytes(b: &mut Bytes<'_>, dt: &str, n: usize, specials: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * elem_size(dt));
    for _ in 0..n {
        let x = b.u8();
        let v: f64 = match x {
            255 if specials => f64::NAN,
            254 if specials => f64::INFINITY,
            253 if specials => -0.0,
            _ => (x as f64 - 128.0) / 16.0,
        };
        match dt {
            "F64" => out.extend_from_slice(&v.to_le_bytes()),
            "F32" => out.extend_from_slice(&(v as f32).to_le_bytes()),
            // bf16: the top half of the f32 (values here are exact in bf16 but for a few).
            "BF16" => out.extend_from_slice(&(((v as f32).to_bits() >> 16) as u16).to_le_bytes()),
            "F16" => {
                // Small integers / 16 and the specials are exact in f16; build the bits directly.
                let f = v as f32;
                let bits: u16 = if f.is_nan() {
                    0x7e00
                } else if f.is_infinite() {
                    0x7c00
                } else if f == 0.0 {
                    if f.is_sign_negative() {
                        0x8000
                    } else {
                        0
                    }
                } else {
                    let sign = if f < 0.0 { 0x8000u16 } else { 0 };
                    let a = f.abs();
                    let e = a.log2().floor() as i32;
                    let m = ((a / 2f32.powi(e) - 1.0) * 1024.0).round() as u16;
                    sign | (((e + 15) as u16) << 10) | (m & 0x3ff)
                };
                out.extend_from_slice(&bits.to_le_bytes())
            }
            _ => out.push(x),
        }
    }
    out
}

fn write_checkpoint(dir: &Path, entries: Vec<Entry>, sharded: bool) {
    std::fs::create_dir_all(dir).expect("dir");
    if sharded && entries.len() >= 2 {
        let mid = entries.len() / 2;
        let parts = [&entries[..mid], &entries[mid..]];
        let mut wm = serde_json::Map::new();
        let mut total = 0usize;
        for (i, part) in parts.iter().enumerate() {
            let name = format!("model-{:05}-of-00002.safetensors", i + 1);
            for e in part.iter() {
                wm.insert(e.0.clone(), serde_json::Value::String(name.clone()));
                total += e.3.len();
            }
            std::fs::write(dir.join(&name), st_bytes(part)).expect("write");
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": wm});
        std::fs::write(dir.join(checkpoint::INDEX_NAME), index.to_string()).expect("write");
    } else {
        std::fs::write(dir.join("model.safetensors"), st_bytes(&entries)).expect("write");
    }
    std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float32", "model_type": "llama"}"#).expect("write");
}

fn leftovers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string())).filter(|n| n.starts_with(".umerge")).collect()
        })
        .unwrap_or_default()
}

/// Property of the `planner` target (see the module docs).
pub fn planner(data: &[u8]) {
    let mut b = Bytes::new(data);
    let root = scratch("planner");
    // Canonical shapes, shared by every checkpoint unless mutated.
    let shapes: Vec<Vec<usize>> = PLAN_TENSORS
        .iter()
        .map(|n| {
            if n.ends_with("layernorm.weight") || n.ends_with("inv_freq") {
                vec![1 + b.below(5)]
            } else {
                vec![1 + b.below(4), 1 + b.below(5)]
            }
        })
        .collect();
    let n_models = 1 + b.below(3);
    let int_buffer = b.chance(4);
    // At most one invalid option per case (0 = none), so most cases reach the executor.
    let bad = if b.chance(2) { 1 + b.below(7) } else { 0 };
    let with_base = bad != 1;
    let mut union: std::collections::BTreeSet<String> = Default::default();
    let mut dirs = Vec::new();
    for ci in 0..(n_models + 1) {
        let is_base = ci == 0;
        if is_base && !with_base {
            continue;
        }
        let dir = root.join(if is_base { "base".to_string() } else { format!("m{ci}") });
        let mut entries: Vec<Entry> = Vec::new();
        let specials = b.below(16) == 15;
        for (ti, name) in PLAN_TENSORS.iter().enumerate() {
            if b.chance(1) {
                continue;
            }
            let mut shape = shapes[ti].clone();
            match b.below(128) {
                127 => shape[0] += 1,
                126 => shape.reverse(),
                125 => shape.push(1),
                _ => {}
            }
            let n: usize = shape.iter().product();
            let (dt, bytes) = if name.ends_with("inv_freq") && int_buffer {
                let v: Vec<u8> = if b.chance(1) { b.take(n * 8).to_vec() } else { vec![7; n * 8] };
                let mut v = v;
                v.resize(n * 8, 0);
                ("I64".to_string(), v)
            } else {
                let dt = PLAN_FLOATS[b.below(PLAN_FLOATS.len())];
                (dt.to_string(), float_bytes(&mut b, dt, n, specials))
            };
            union.insert(name.to_string());
            entries.push((name.to_string(), dt, shape, bytes));
        }
        if entries.is_empty() {
            entries.push(("model.norm.weight".into(), "F32".into(), vec![1], 1f32.to_le_bytes().to_vec()));
            union.insert("model.norm.weight".into());
        }
        write_checkpoint(&dir, entries, b.chance(3));
        dirs.push((is_base, dir));
    }
    // Mostly valid options (so merges run), sometimes each kind of invalid one.
    let density = if bad == 2 { [0.0, -0.5, 1.5][b.below(3)] } else { [0.1, 0.5, 0.8, 1.0, 0.3333, 0.01, 0.7, 0.9][b.below(8)] };
    let preset = if bad == 3 { "nope" } else { ["mergekit", "peft", "paper"][b.below(3)] };
    let mut params = serde_json::json!({"density": density, "preset": preset});
    if b.chance(2) {
        let l = [0.0, 1.0, -2.0, 0.5][b.below(4)];
        params["lambda"] = serde_json::json!(l);
    }
    let models: Vec<ModelSpec> = dirs
        .iter()
        .filter(|(is_base, _)| !is_base)
        .map(|(_, d)| {
            let mut m = serde_json::json!({"path": d});
            if b.chance(2) {
                let w = [1.0, 0.0, -1.0, 0.25][b.below(4)];
                m["params"] = serde_json::json!({ "weight": w });
            }
            serde_json::from_value(m).expect("model spec")
        })
        .collect();
    let out = root.join("out");
    let mut spec = MergeSpec {
        method: if bad != 4 { "ties".into() } else { "nope".into() },
        models,
        base: dirs.iter().find(|(is_base, _)| *is_base).map(|(_, d)| d.clone()),
        base_lora: None,
        params: serde_json::from_value(params).expect("params"),
        strict: bad == 7,
        slices: Vec::new(),
        output: OutputOptions {
            out: out.clone(),
            out_dtype: if bad == 5 {
                Some("int8".into())
            } else {
                [None, Some("bf16"), Some("f16"), Some("f32")][b.below(4)].map(String::from)
            },
            threads: Some(1 + b.below(2)),
            memory_budget: if bad == 6 { Some(1) } else { [None, Some(16u64 << 20), Some(32 << 20), Some(64 << 20)][b.below(4)] },
            max_shard_size: [None, Some(1u64), Some(200), Some(600)][b.below(4)],
            overwrite: false,
            allow_nonfinite: b.chance(2),
            page_cache: [None, Some("keep"), Some("drop")][b.below(3)].map(String::from),
        },
    };
    let check_determinism = b.chance(4);
    let result = umerge_core::merge(&spec, None);
    if std::env::var_os("UMERGE_FUZZ_TRACE").is_some() {
        match &result {
            Ok(r) => eprintln!("planner: ok, {} tensors", r.tensors),
            Err(e) => eprintln!("planner: error: {e}"),
        }
    }
    match result {
        Ok(report) => {
            assert!(out.is_dir(), "merge succeeded but {} is missing", out.display());
            let v = verify::verify(&out, &VerifyOptions { scan_nonfinite: false, hash: true });
            assert!(v.valid, "merged output does not verify: {:?}", v.errors);
            let c = Checkpoint::open(&out).expect("output readable");
            let names: std::collections::BTreeSet<String> = c.tensors.keys().cloned().collect();
            assert_eq!(names, union, "output tensors != union of the inputs");
            assert_eq!(report.tensors, union.len());
            if check_determinism {
                let out2 = root.join("out2");
                spec.output.out = out2.clone();
                spec.output.threads = Some(if spec.output.threads == Some(1) { 2 } else { 1 });
                spec.output.memory_budget = Some(if spec.output.memory_budget == Some(16 << 20) { 64 << 20 } else { 16 << 20 });
                umerge_core::merge(&spec, None).expect("the same merge with other threads/budget must succeed");
                for s in &c.shards {
                    let name = s.path.file_name().expect("name");
                    let a = std::fs::read(&s.path).expect("read");
                    let bb = std::fs::read(out2.join(name)).expect("read");
                    assert!(a == bb, "output differs across thread counts / memory budgets");
                }
            }
        }
        Err(e) => {
            assert!(!matches!(e, Error::Internal(_)), "internal error on fuzzed input: {e}");
            assert!(e.is_input(), "fuzzed input gave a non-input error: {e}");
            assert!(!out.exists(), "failed merge left {}", out.display());
        }
    }
    let left = leftovers(&root);
    assert!(left.is_empty(), "temporary files left beside the output: {left:?}");
}
