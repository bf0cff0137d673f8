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
//!
//! Crash safety, beyond the rename:
//! - **Killed runs.** A process killed outright (SIGKILL, power loss) cannot remove its
//!   temporary directory. The next merge to the same target removes every
//!   `.umerge-tmp-<name>-<pid>` (and `.umerge-old-<name>-<pid>`) whose process is gone, leaves
//!   alone one whose process is alive, and reports both as warnings ([`Output::notes`]).
//! - **Overwrite.** An existing target is first renamed aside (`.umerge-old-<name>-<pid>`), the new
//!   output renamed in, then the old one deleted: at every instant the target name holds the
//!   complete old output, the complete new one, or nothing — never a half-deleted directory.
//! - **Durability.** Shards, index, side files and recipe are fsynced, then the directory, before
//!   the rename; the parent directory after it.
//! - **Disk full.** Every shard's blocks are reserved up front (`fallocate`), so a full disk is
//!   found before any work, as [`Error::DiskFull`] with the bytes needed; an ENOSPC later (a
//!   filesystem without `fallocate`) maps to the same error. The temporary directory is removed
//!   either way. For tests, `UMERGE_TEST_WRITE_LIMIT=<bytes>` makes the reservation fail with
//!   ENOSPC once the output would exceed that many bytes (fault injection where no small
//!   filesystem can be mounted).
//! - **Checksums.** The sha256 of every finished shard is recorded in the recipe (`shards:` line,
//!   see `verify`), so `umerge verify` can prove later that the weights are the ones written.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

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
    /// Bytes of its data.
    pub fn nbytes(&self) -> u64 {
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
    format!(r#"{name}:{{"dtype":"{}","shape":[{}],"data_offsets":[{start},{end}]}}"#, header_name(t.dtype), shape.join(","))
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
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", si + 1, n) };
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
    let cp = parent
        .canonicalize()
        .map_err(|e| Error::Output { reason: format!("the output's parent directory cannot be used: {e}"), path: p.to_path_buf() })?;
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

/// Name prefix of the temporary directory an output is built in, beside the target.
pub const TMP_PREFIX: &str = ".umerge-tmp-";
/// Name prefix of a replaced output moved aside while `overwrite` renames the new one in.
pub const OLD_PREFIX: &str = ".umerge-old-";

/// An output being built in its temporary directory.
#[derive(Debug)]
pub struct Output {
    target: PathBuf,
    tmp: PathBuf,
    files: Vec<File>,
    /// The layout being filled.
    pub layout: Layout,
    done: bool,
    notes: Vec<String>,
}

pub(crate) fn werr(what: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Write { what: what.to_string(), path: path.to_path_buf(), source }
}

/// [`werr`], except that "no space left on device" becomes [`Error::DiskFull`] naming the
/// output directory and the bytes the output needs.
pub(crate) fn werr_out(what: &str, path: &Path, source: std::io::Error, need: u64, target: &Path) -> Error {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        let file = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_else(|| target.to_path_buf());
        return Error::DiskFull { what: format!("{what} {file}").trim().to_string(), need, path: dir };
    }
    werr(what, path, source)
}

/// True while process `pid` exists (signal 0 checks without sending anything).
fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill(pid, 0) sends no signal; it only asks whether the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporary directories that interrupted merges to `parent/name` left behind
/// (`.umerge-tmp-<name>-<pid>`, `.umerge-old-<name>-<pid>`) when their process is gone; one
/// whose process still runs is left alone. Returns a sentence for each, for the report.
pub fn clean_stale(parent: &Path, name: &str) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok(rd) = std::fs::read_dir(parent) else { return notes };
    for e in rd.flatten() {
        let fname = e.file_name().to_string_lossy().to_string();
        for prefix in [TMP_PREFIX, OLD_PREFIX] {
            let Some(pid) = fname
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(name))
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let p = e.path();
            if pid_alive(pid) {
                notes.push(format!(
                    "left {} alone: process {pid}, which made it, is still running (another merge to the same output?)",
                    p.display()
                ));
            } else {
                match std::fs::remove_dir_all(&p) {
                    Ok(()) => notes.push(format!("removed {}, left by an interrupted merge (process {pid} is gone)", p.display())),
                    Err(err) => notes.push(format!("could not remove {}, left by an interrupted merge: {err}", p.display())),
                }
            }
        }
    }
    notes.sort();
    notes
}

/// The injected write limit of the fault-injection hook (`UMERGE_TEST_WRITE_LIMIT`), if set.
pub(crate) fn test_write_limit() -> Option<u64> {
    std::env::var("UMERGE_TEST_WRITE_LIMIT").ok().and_then(|v| v.trim().parse().ok())
}

/// Reserves `size` bytes of blocks for `f` so that a full disk fails now, not mid-merge.
/// Filesystems without `fallocate` keep the sparse file (later writes may then hit ENOSPC).
pub(crate) fn reserve(f: &File, size: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = libc::off_t::try_from(size) else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the descriptor is open for writing for the duration of the call; fallocate
        // (mode 0) only allocates blocks for the range and changes no data.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(()),
                _ => Err(e),
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, size);
    Ok(())
}

/// Writes a file and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()
}

/// A finished shard's (file name, bytes, sha256), as recorded in the recipe.
type ShardSum = (String, u64, String);

impl Output {
    /// Creates the temporary directory and every shard at its final size, headers written.
    pub fn create(target_abs: &Path, layout: Layout) -> Result<Output> {
        let parent = target_abs.parent().unwrap_or(Path::new("/"));
        let name = target_abs.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
        let notes = clean_stale(parent, &name);
        let tmp = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| werr("stale temporary directory", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| werr("temporary directory", &tmp, e))?;
        let need: u64 = layout.shards.iter().map(|s| s.size).sum();
        let target = target_abs.to_path_buf();
        let mut out = Output { target, tmp, files: Vec::new(), layout, done: false, notes };
        let limit = test_write_limit();
        let mut reserved = 0u64;
        for s in &out.layout.shards {
            let p = out.tmp.join(&s.name);
            let err = |what: &str, e: std::io::Error| werr_out(what, &p, e, need, &out.target);
            let f = File::options().read(true).write(true).create_new(true).open(&p).map_err(|e| err("shard", e))?;
            f.set_len(s.size).map_err(|e| err("shard (allocating)", e))?;
            reserved += s.size;
            if limit.is_some_and(|l| reserved > l) {
                return Err(err("shard (reserving space)", std::io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            reserve(&f, s.size).map_err(|e| err("shard (reserving space)", e))?;
            f.write_all_at(&s.header, 0).map_err(|e| err("shard header", e))?;
            out.files.push(f);
        }
        Ok(out)
    }

    /// Writes `bytes` at byte `offset` within output tensor `tensor`'s data.
    pub fn write_at(&self, tensor: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (shard, base) = self.layout.place[tensor];
        self.files[shard]
            .write_all_at(bytes, base + offset)
            .map_err(|e| werr_out("tensor data", &self.tmp.join(&self.layout.shards[shard].name), e, self.bytes(), &self.target))
    }

    /// Starts writing tensor `tensor`'s finished bytes back to disk without waiting (Linux
    /// `sync_file_range`), so that the final fsync has little left to flush: the disk works
    /// while the merge goes on. Best effort: errors surface at the fsync.
    pub fn start_writeback(&self, tensor: usize, bytes: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (shard, base) = self.layout.place[tensor];
            let (Ok(off), Ok(len)) = (libc::off64_t::try_from(base), libc::off64_t::try_from(bytes)) else { return };
            // SAFETY: the descriptor is open for the life of `self`; the call only schedules
            // write-back of a byte range and changes no data.
            unsafe { libc::sync_file_range(self.files[shard].as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (tensor, bytes);
    }

    /// Drops bytes `from..to` of shard `shard` from the page cache once they are on disk: waits
    /// for their write-back (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`), then
    /// `POSIX_FADV_DONTNEED` (only clean pages can be dropped). Under `PagePolicy::Drop`, so
    /// that a large output does not fill the page cache. Best effort: errors surface at the
    /// final fsync.
    pub(crate) fn forget_range(&self, shard: usize, from: u64, to: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let f = &self.files[shard];
            let (Ok(off), Ok(len)) = (libc::off64_t::try_from(from), libc::off64_t::try_from(to.saturating_sub(from))) else { return };
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: the descriptor is open for the life of `self`; the call only writes back a
            // byte range and changes no data.
            unsafe { libc::sync_file_range(f.as_raw_fd(), off, len, flags) };
            crate::checkpoint::fadvise(f, from as usize, (to - from) as usize, libc::POSIX_FADV_DONTNEED);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (shard, from, to);
    }

    /// Feeds bytes `from..to` of shard `shard` to `hasher`, through `buf`.
    pub(crate) fn hash_range(&self, shard: usize, from: u64, to: u64, buf: &mut [u8], hasher: &mut sha2::Sha256) -> std::io::Result<()> {
        use sha2::Digest;
        let mut pos = from;
        while pos < to {
            let n = ((to - pos) as usize).min(buf.len());
            self.files[shard].read_exact_at(&mut buf[..n], pos)?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(())
    }

    /// What creating the output found and did beside the target (stale temporary directories
    /// removed or left alone), for the report's warnings.
    pub fn notes(&self) -> &[String] {
        &self.notes
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
        edits: ConfigEdits,
        recipe_yaml: &str,
        digests: &[Option<String>],
    ) -> Result<()> {
        let need = self.bytes();
        // The sha256 of every finished shard, recorded in the recipe for `umerge verify`: from
        // `digests` (hashed while the merge wrote, see `checksum`) where given, else computed
        // now, while the shards are synced (one waits on the disk, the other on the CPU).
        let (synced, sums): (Result<()>, Vec<Result<ShardSum>>) = rayon::join(
            || {
                for (f, s) in self.files.iter().zip(&self.layout.shards) {
                    let p = self.tmp.join(&s.name);
                    f.sync_all().map_err(|e| werr_out("shard (sync)", &p, e, need, &self.target))?;
                }
                Ok(())
            },
            || {
                self.layout
                    .shards
                    .par_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        if let Some(Some(d)) = digests.get(i) {
                            return Ok((s.name.clone(), s.size, d.clone()));
                        }
                        let p = self.tmp.join(&s.name);
                        crate::verify::sha256_file(&p).map(|h| (s.name.clone(), s.size, h)).map_err(|e| werr("shard (checksum)", &p, e))
                    })
                    .collect()
            },
        );
        synced?;
        let mut shards_json = serde_json::Map::new();
        for r in sums {
            let (name, size, sha) = r?;
            shards_json.insert(name, serde_json::json!({"bytes": size, "sha256": sha}));
        }
        let recipe = format!("{}{}: {}\n", recipe_yaml, crate::verify::RECIPE_SHARDS_KEY, serde_json::Value::Object(shards_json));
        if self.layout.shards.len() > 1 {
            let mut wm = BTreeMap::new();
            for (i, t) in tensors.iter().enumerate() {
                wm.insert(t.name.clone(), self.layout.shards[self.layout.place[i].0].name.clone());
            }
            let index = serde_json::json!({"metadata": {"total_size": self.layout.total_size}, "weight_map": wm});
            let p = self.tmp.join(INDEX_NAME);
            let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
            write_synced(&p, text.as_bytes()).map_err(|e| werr_out("shard index", &p, e, need, &self.target))?;
        }
        if let Some(src) = side_files_from {
            copy_side_files(src, &self.tmp, edits).map_err(|e| match e {
                Error::Write { what, path, source } => werr_out(&what, &path, source, need, &self.target),
                other => other,
            })?;
        }
        let p = self.tmp.join("umerge.yml");
        write_synced(&p, recipe.as_bytes()).map_err(|e| werr_out("recipe", &p, e, need, &self.target))?;
        if let Ok(d) = File::open(&self.tmp) {
            let _ = d.sync_all();
        }
        rename_into_place(&self.tmp, &self.target, &mut self.done)
    }
}

/// Renames the finished temporary directory `tmp` to `target`, replacing an existing target
/// without ever leaving it half-deleted: it is moved aside, the new output renamed in, then the
/// old one deleted (see the module docs). `renamed` is set once `tmp` has become `target`, so
/// that the caller no longer removes it. Shared by [`Output::finish`] and the adapter writer of
/// [`crate::extract`].
pub(crate) fn rename_into_place(tmp: &Path, target: &Path, renamed: &mut bool) -> Result<()> {
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let old = if target.exists() {
        let old = parent.join(format!("{OLD_PREFIX}{name}-{}", std::process::id()));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| werr("stale replaced output", &old, e))?;
        }
        std::fs::rename(target, &old).map_err(|e| werr("existing output (moving aside)", target, e))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(tmp, target) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, target);
        }
        return Err(werr("output (renaming into place)", target, e));
    }
    *renamed = true;
    if let Ok(d) = File::open(&parent) {
        let _ = d.sync_all();
    }
    if let Some(old) = old {
        let r = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
        r.map_err(|e| werr("replaced output (removing)", &old, e))?;
    }
    Ok(())
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

/// What the copied `config.json` is changed to say about the output.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigEdits {
    /// The dtype of the output's float tensors (`torch_dtype`), when they share one.
    pub float_dtype: Option<Dtype>,
    /// The output's number of layers, when it differs from the source's (layer stacking).
    pub num_layers: Option<usize>,
}

/// The `config.json` keys that hold a model's number of layers (transformers' names across
/// architectures: Llama, Mistral, Qwen, ... `num_hidden_layers`; GPT-2 `n_layer`; others).
const LAYER_COUNT_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// `config.json` with `edits` applied (`None` when there is nothing to change); a file that is
/// not a JSON object is copied as it is.
fn edited_config(text: &str, edits: ConfigEdits) -> Option<String> {
    let serde_json::Value::Object(mut cfg) = serde_json::from_str::<serde_json::Value>(text).ok()? else {
        return None;
    };
    let dtype = edits.float_dtype.and_then(hf_name);
    if dtype.is_none() && edits.num_layers.is_none() {
        return None;
    }
    if let Some(d) = dtype {
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
    }
    if let Some(n) = edits.num_layers {
        let mut set = false;
        for key in LAYER_COUNT_KEYS {
            if cfg.contains_key(*key) {
                cfg.insert(key.to_string(), serde_json::Value::from(n));
                set = true;
            }
        }
        if !set {
            cfg.insert(LAYER_COUNT_KEYS[0].to_string(), serde_json::Value::from(n));
        }
    }
    Some(serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).unwrap_or_default() + "\n")
}

fn copy_side_files(src: &Path, dst: &Path, edits: ConfigEdits) -> Result<()> {
    for name in SIDE_FILES {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let to = dst.join(name);
        if *name == "config.json" {
            if let Some(out) = std::fs::read_to_string(&from).ok().and_then(|t| edited_config(&t, edits)) {
                std::fs::write(&to, out).map_err(|e| werr("config.json", &to, e))?;
                continue;
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
    fn config_edits_set_the_dtype_and_the_layer_count() {
        let edits = ConfigEdits { float_dtype: Some(Dtype::BF16), num_layers: Some(32) };
        let out = edited_config(r#"{"num_hidden_layers": 24, "torch_dtype": "float32", "hidden_size": 8}"#, edits).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, serde_json::json!({"num_hidden_layers": 32, "torch_dtype": "bfloat16", "hidden_size": 8}));
        let gpt2 = edited_config(r#"{"n_layer": 12}"#, ConfigEdits { float_dtype: None, num_layers: Some(6) }).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&gpt2).unwrap(), serde_json::json!({"n_layer": 6}));
        assert!(edited_config(r#"{"n_layer": 12}"#, ConfigEdits::default()).is_none());
        assert!(edited_config("[1, 2]", edits).is_none());
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
