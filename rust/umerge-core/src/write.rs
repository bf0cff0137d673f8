//! Writing the output: Hugging Face shard layout planned up front, shards created at their final
//! size and filled in place, everything in a temporary directory renamed into place at the end.
//!
//! The layout is decided from the plan before any tensor is computed: tensors in plan order,
//! greedily packed into shards so that every shard *file* (8-byte length, JSON header padded to
//! 8 bytes, data) is at most `max_shard_size` bytes — byte-accurate, not an estimate — except a
//! single tensor larger than the limit, which gets a shard of its own. One shard is written as
//! `model.safetensors`; several as `model-0000i-of-0000N.safetensors` plus
//! `model.safetensors.index.json` (`metadata.total_size` = tensor bytes, `weight_map`).
//!
//! Each shard is created with its header and `set_len` to the final size; the executor then
//! writes chunks at their offsets with positioned writes (`pwrite`), from any thread. The whole
//! output lives in `.umerge-tmp-<name>-<pid>` beside the target and is renamed to the target
//! only when complete (dropping an unfinished [`Output`] removes it), so an interrupted merge
//! never leaves a half-written model under the target name.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::checkpoint::INDEX_NAME;
use crate::dtype::{elem_bytes, header_name, hf_name, Dtype};
use crate::error::{Error, Result};

/// One output tensor as the layout sees it.
#[derive(Debug, Clone)]
pub struct OutTensor {
    /// Name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl OutTensor {
    fn nbytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * elem_bytes(self.dtype).unwrap_or(0) as u64
    }
}

/// One planned shard.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    /// File name.
    pub name: String,
    /// The 8-byte length followed by the padded JSON header.
    pub header: Vec<u8>,
    /// Final file size.
    pub size: u64,
}

/// The planned output files.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Shards in order.
    pub shards: Vec<ShardLayout>,
    /// Per output tensor: (shard index, absolute byte offset of its data in the shard file).
    pub place: Vec<(usize, u64)>,
    /// Sum of tensor data bytes (the index's `metadata.total_size`).
    pub total_size: u64,
}

const META: &str = r#"{"__metadata__":{"format":"pt"}"#;

fn entry(t: &OutTensor, start: u64, end: u64) -> String {
    let name = serde_json::to_string(&t.name).unwrap_or_default();
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    format!(
        r#"{name}:{{"dtype":"{}","shape":[{}],"data_offsets":[{start},{end}]}}"#,
        header_name(t.dtype),
        shape.join(",")
    )
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Plans shards for `tensors` (in order) with every file at most `max_shard_size` bytes.
pub fn layout(tensors: &[OutTensor], max_shard_size: u64) -> Layout {
    // Group greedily, tracking the exact header length (entries only ever get appended, so the
    // header of the current shard grows by exactly the new entry and a comma).
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_header = META.len() + 1; // META + closing brace
    let mut cur_data = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let nb = t.nbytes();
        let e = entry(t, cur_data, cur_data + nb).len() + 1;
        let size = 8 + padded(cur_header + e) as u64 + cur_data + nb;
        if size > max_shard_size && !cur.is_empty() {
            groups.push(std::mem::take(&mut cur));
            cur_header = META.len() + 1;
            cur_data = 0;
        }
        let e = entry(t, cur_data, cur_data + nb).len() + 1;
        cur_header += e;
        cur_data += nb;
        cur.push(i);
    }
    if !cur.is_empty() || groups.is_empty() {
        groups.push(cur);
    }
    let n = groups.len();
    let mut shards = Vec::with_capacity(n);
    let mut place = vec![(0usize, 0u64); tensors.len()];
    let mut total_size = 0u64;
    for (si, g) in groups.iter().enumerate() {
        let mut json = String::from(META);
        let mut off = 0u64;
        let mut offs = Vec::with_capacity(g.len());
        for &i in g {
            let nb = tensors[i].nbytes();
            json.push(',');
            json.push_str(&entry(&tensors[i], off, off + nb));
            offs.push((i, off));
            off += nb;
        }
        json.push('}');
        let hl = padded(json.len());
        while json.len() < hl {
            json.push(' ');
        }
        let mut header = Vec::with_capacity(8 + hl);
        header.extend_from_slice(&(hl as u64).to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        for (i, o) in offs {
            place[i] = (si, 8 + hl as u64 + o);
        }
        total_size += off;
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        shards.push(ShardLayout { name, size: 8 + hl as u64 + off, header });
    }
    Layout { shards, place, total_size }
}

/// Absolute form of a path that may not exist yet (its parent must).
fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let parent = match p.parent() {
        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cp = parent.canonicalize().map_err(|e| Error::Output {
        reason: format!("the output's parent directory cannot be used: {e}"),
        path: p.to_path_buf(),
    })?;
    let name = p.file_name().ok_or_else(|| Error::Output { reason: "the output path has no name".into(), path: p.to_path_buf() })?;
    Ok(cp.join(name))
}

/// Refuses unusable targets: equal to or inside an input directory, equal to an input file,
/// an existing file, a non-empty directory without `overwrite`, or (with `overwrite`) a
/// directory holding an input. `inputs` are (path as given, directory of the weights).
pub fn check_target(target: &Path, inputs: &[(PathBuf, PathBuf)], overwrite: bool) -> Result<PathBuf> {
    let abs = absolute(target)?;
    for (given, dir) in inputs {
        let g = given.canonicalize().unwrap_or_else(|_| given.clone());
        let d = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let is_file = g.is_file();
        let clash = abs == g || abs == d || (!is_file && abs.starts_with(&d));
        if clash {
            return Err(Error::Output {
                reason: format!("the output is, or lies inside, the input {}: choose another -o", given.display()),
                path: target.to_path_buf(),
            });
        }
        if overwrite && (g.starts_with(&abs) || d.starts_with(&abs)) {
            return Err(Error::Output {
                reason: format!("the output directory holds the input {}; overwriting it would delete that input", given.display()),
                path: target.to_path_buf(),
            });
        }
    }
    if abs.exists() {
        if !abs.is_dir() {
            return Err(Error::Output { reason: "the output exists and is not a directory".into(), path: target.to_path_buf() });
        }
        let nonempty = std::fs::read_dir(&abs).map(|mut d| d.next().is_some()).unwrap_or(true);
        if nonempty && !overwrite {
            return Err(Error::Output {
                reason: "the output directory exists and is not empty (pass --overwrite / overwrite=True to replace it)".into(),
                path: target.to_path_buf(),
            });
        }
    }
    Ok(abs)
}

/// An output being built in its temporary directory.
#[derive(Debug)]
pub struct Output {
    target: PathBuf,
    tmp: PathBuf,
    files: Vec<File>,
    /// The layout being filled.
    pub layout: Layout,
    done: bool,
}

fn werr(what: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Write { what: what.to_string(), path: path.to_path_buf(), source }
}

impl Output {
    /// Creates the temporary directory and every shard at its final size, headers written.
    pub fn create(target_abs: &Path, layout: Layout) -> Result<Output> {
        let parent = target_abs.parent().unwrap_or(Path::new("/"));
        let name = target_abs.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
        let tmp = parent.join(format!(".umerge-tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| werr("stale temporary directory", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| werr("temporary directory", &tmp, e))?;
        let mut out = Output { target: target_abs.to_path_buf(), tmp, files: Vec::new(), layout, done: false };
        for s in &out.layout.shards {
            let p = out.tmp.join(&s.name);
            let f = File::options().read(true).write(true).create_new(true).open(&p).map_err(|e| werr("shard", &p, e))?;
            f.set_len(s.size).map_err(|e| werr("shard (allocating)", &p, e))?;
            f.write_all_at(&s.header, 0).map_err(|e| werr("shard header", &p, e))?;
            out.files.push(f);
        }
        Ok(out)
    }

    /// Writes `bytes` at byte `offset` within output tensor `tensor`'s data.
    pub fn write_at(&self, tensor: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (shard, base) = self.layout.place[tensor];
        self.files[shard]
            .write_all_at(bytes, base + offset)
            .map_err(|e| werr("tensor data", &self.tmp.join(&self.layout.shards[shard].name), e))
    }

    /// The temporary directory.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Total bytes of the shard files.
    pub fn bytes(&self) -> u64 {
        self.layout.shards.iter().map(|s| s.size).sum()
    }

    /// Syncs the shards, writes the index, copies the side files, writes the recipe, and renames
    /// the temporary directory to the target (replacing an existing one when allowed).
    pub fn finish(
        mut self,
        tensors: &[OutTensor],
        side_files_from: Option<&Path>,
        float_dtype: Option<Dtype>,
        recipe_yaml: &str,
    ) -> Result<()> {
        for (f, s) in self.files.iter().zip(&self.layout.shards) {
            f.sync_all().map_err(|e| werr("shard (sync)", &self.tmp.join(&s.name), e))?;
        }
        if self.layout.shards.len() > 1 {
            let mut wm = BTreeMap::new();
            for (i, t) in tensors.iter().enumerate() {
                wm.insert(t.name.clone(), self.layout.shards[self.layout.place[i].0].name.clone());
            }
            let index = serde_json::json!({"metadata": {"total_size": self.layout.total_size}, "weight_map": wm});
            let p = self.tmp.join(INDEX_NAME);
            let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
            std::fs::write(&p, text).map_err(|e| werr("shard index", &p, e))?;
        }
        if let Some(src) = side_files_from {
            copy_side_files(src, &self.tmp, float_dtype)?;
        }
        let p = self.tmp.join("umerge.yml");
        std::fs::write(&p, recipe_yaml).map_err(|e| werr("recipe", &p, e))?;
        if self.target.exists() {
            let r = if self.target.is_dir() { std::fs::remove_dir_all(&self.target) } else { std::fs::remove_file(&self.target) };
            r.map_err(|e| werr("existing output (removing)", &self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| werr("output (renaming into place)", &self.target, e))?;
        if let Some(parent) = self.target.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.done {
            self.files.clear();
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Files copied from the base (or first model) beside the weights.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

fn copy_side_files(src: &Path, dst: &Path, float_dtype: Option<Dtype>) -> Result<()> {
    for name in SIDE_FILES {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let to = dst.join(name);
        if *name == "config.json" {
            if let (Some(d), Ok(text)) = (float_dtype.and_then(hf_name), std::fs::read_to_string(&from)) {
                if let Ok(serde_json::Value::Object(mut cfg)) = serde_json::from_str::<serde_json::Value>(&text) {
                    let mut set = false;
                    for key in ["torch_dtype", "dtype"] {
                        if cfg.contains_key(key) {
                            cfg.insert(key.to_string(), serde_json::Value::String(d.to_string()));
                            set = true;
                        }
                    }
                    if !set {
                        cfg.insert("torch_dtype".to_string(), serde_json::Value::String(d.to_string()));
                    }
                    let out = serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).unwrap_or_default() + "\n";
                    std::fs::write(&to, out).map_err(|e| werr("config.json", &to, e))?;
                    continue;
                }
            }
        }
        std::fs::copy(&from, &to).map_err(|e| werr(name, &to, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor { name: name.into(), dtype: Dtype::F32, shape: vec![n] }
    }

    #[test]
    fn shards_respect_the_byte_limit_exactly() {
        let ts: Vec<OutTensor> = (0..20).map(|i| t(&format!("layer.{i}.w"), 10 + i * 7)).collect();
        for max in [200u64, 333, 600, 1000, 5000] {
            let l = layout(&ts, max);
            for s in &l.shards {
                // Every shard file respects the limit unless it holds a single oversized tensor.
                let hl = u64::from_le_bytes(s.header[..8].try_into().unwrap());
                assert_eq!(hl % 8, 0);
                assert_eq!(s.header.len() as u64, 8 + hl);
                let json: serde_json::Value = serde_json::from_slice(&s.header[8..]).unwrap();
                let count = json.as_object().unwrap().len() - 1;
                assert!(s.size <= max || count == 1, "max {max}: shard {} is {} bytes", s.name, s.size);
            }
            // Greedy packing: moving the next shard's first tensor in would exceed the limit.
            assert_eq!(l.total_size, ts.iter().map(|x| x.nbytes()).sum::<u64>());
        }
        let one = layout(&ts, u64::MAX);
        assert_eq!(one.shards.len(), 1);
        assert_eq!(one.shards[0].name, "model.safetensors");
        let many = layout(&ts, 300);
        assert!(many.shards.len() > 2);
        assert_eq!(many.shards[0].name, format!("model-00001-of-{:05}.safetensors", many.shards.len()));
    }

    #[test]
    fn header_parses_with_safetensors() {
        let ts = vec![t("a", 3), t("b\"q", 2)];
        let l = layout(&ts, u64::MAX);
        let mut buf = l.shards[0].header.clone();
        buf.resize(l.shards[0].size as usize, 0);
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("b\"q").unwrap().shape(), &[2]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}
