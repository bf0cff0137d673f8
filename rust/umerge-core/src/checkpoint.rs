//! Reading checkpoints: single-file or sharded safetensors, validated and memory-mapped.
//!
//! A checkpoint is a `.safetensors` file, or a directory holding `model.safetensors.index.json`
//! (Hugging Face sharding), `model.safetensors`, or otherwise every `*.safetensors` file in it.
//! Every shard header is validated with the `safetensors` crate's own rules (header size cap,
//! contiguous non-overlapping offsets, sizes equal to shape x dtype, data covering the file to
//! its end) before any tensor is used. Shard names in the index must stay inside the directory.
//!
//! Tensor bytes are read straight from read-only memory maps. [`Checkpoint::release`] tells the
//! kernel a window is consumed (`madvise(MADV_DONTNEED)`), so resident memory stays bounded by
//! the windows in flight rather than growing with everything read. This module does not decode
//! values (see `dtype`) or decide what to merge (see `plan`).
//!
//! **Inputs changed while mapped.** Reading a page of a mapped file that has since been truncated
//! raises SIGBUS, which would kill the process. So before every window is handed out
//! ([`Checkpoint::bytes`]) the open file is `fstat`ed: a size or modification time different from
//! when it was opened is an [`Error::InputChanged`] naming the file, not a crash. A file replaced
//! by renaming a new one over it (what downloaders and `save_pretrained` do) is harmless: the map
//! keeps the old file's pages, so the merge finishes with the data it started with. The one case
//! this cannot rule out is a truncation that lands in the microseconds between the check and the
//! read of that very window; inputs must not be modified during a merge.
//!
//! **Pickles are refused.** PyTorch `.bin`/`.pt`/`.pth`/`.ckpt` files are pickles, and unpickling
//! can run arbitrary code: the reader never opens one as data, and says how to convert it
//! ([`Error::Pickle`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;

use crate::dtype::{elem_bytes, Dtype};
use crate::error::{Error, Result};

/// Name of the Hugging Face shard index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// Alignment of `O_DIRECT` offsets, lengths and buffers (the largest logical block size in use).
pub const DIRECT_ALIGN: usize = 4096;

/// Buffer length [`Checkpoint::read_direct`] needs for `len` bytes at `start`.
pub fn direct_len(start: usize, len: usize) -> usize {
    let first = start / DIRECT_ALIGN * DIRECT_ALIGN;
    (start + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN - first
}

/// Bytes per read-ahead hint (see [`Checkpoint::will_need`]): no larger than the smallest
/// common `read_ahead_kb`, so that no part of a hinted range is dropped.
pub const WILL_NEED_PIECE: usize = 128 << 10;

/// Name of a single-file Hugging Face checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

/// One memory-mapped shard file.
#[derive(Debug)]
pub struct Shard {
    /// Path of the file.
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// Byte offset where the data section starts (8 + header length).
    pub data_start: usize,
    mmap: Option<Mmap>,
    /// The open file, to check before each window that it has not changed.
    file: Option<File>,
    /// Its modification time when opened.
    mtime: Option<SystemTime>,
    /// The file opened again with `O_DIRECT` for [`Checkpoint::read_direct`], on first use;
    /// `None` inside when the filesystem refuses `O_DIRECT` (tmpfs).
    direct: std::sync::OnceLock<Option<File>>,
}

impl Shard {
    /// Errors when the file no longer has the size and modification time it had when opened
    /// (truncated or rewritten in place): reading the map then could raise SIGBUS.
    fn check_unchanged(&self) -> Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let m = f.metadata().map_err(|e| read_err("safetensors file", &self.path, e))?;
        if m.len() != self.size {
            return Err(Error::InputChanged {
                reason: format!("its size went from {} to {} bytes (truncated or rewritten?)", self.size, m.len()),
                path: self.path.clone(),
            });
        }
        if self.mtime.is_some() && m.modified().ok() != self.mtime {
            return Err(Error::InputChanged {
                reason: "it was rewritten in place (its modification time changed)".to_string(),
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Extensions of PyTorch pickle checkpoints.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

/// True for a file that is a pickle checkpoint: by extension, or (any other name but
/// `.safetensors`) by its first bytes: a zip container (`torch.save` since 1.6) or a pickle
/// protocol 2-5 opcode.
pub fn is_pickle_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some(e) if PICKLE_EXTENSIONS.contains(&e) => return true,
        Some("safetensors") => return false,
        _ => {}
    }
    let mut head = [0u8; 4];
    let n = File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    n >= 2 && (head.starts_with(b"PK\x03\x04") || (head[0] == 0x80 && (2..=5).contains(&head[1])))
}

/// The first pickle checkpoint in a directory that holds no safetensors weights, if any.
fn pickle_in_dir(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Index of its shard in [`Checkpoint::shards`].
    pub shard: usize,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    pub start: usize,
    /// End of the absolute byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// A validated, memory-mapped checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path as given (file or directory).
    pub path: PathBuf,
    /// The directory holding the shards and the non-weight files (config.json, tokenizer, ...).
    pub dir: PathBuf,
    /// Shard files in index order.
    pub shards: Vec<Shard>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Tensor names in storage order (shard, then offset): the order the output follows.
    pub order: Vec<String>,
    /// True when read through `model.safetensors.index.json`.
    pub sharded: bool,
}

fn read_err(what: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Read { what: what.to_string(), path: path.to_path_buf(), source }
}

/// Maps and validates one safetensors file; returns the shard and its tensors in offset order.
fn open_shard(path: &Path) -> Result<(Shard, Vec<(String, safetensors::tensor::TensorInfo)>)> {
    // Opening a FIFO blocks until a writer appears: only regular files (or links to them) are read.
    if !std::fs::metadata(path).map_err(|e| read_err("safetensors file", path, e))?.is_file() {
        return Err(Error::Header { reason: "not a regular file".to_string(), path: path.to_path_buf() });
    }
    let file = File::open(path).map_err(|e| read_err("safetensors file", path, e))?;
    let size = file.metadata().map_err(|e| read_err("safetensors file", path, e))?.len();
    if size < 8 {
        return Err(Error::Header {
            reason: format!("file is {size} bytes, shorter than the 8-byte header length (truncated?)"),
            path: path.to_path_buf(),
        });
    }
    // SAFETY: the map is read-only and private to this process; the files are inputs that the
    // user must not modify during the merge (as with any reader of memory-mapped safetensors).
    // All reads go through bounds-checked slices of the map.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| read_err("safetensors file (mmap)", path, e))?;
    let (n, meta) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::Header { reason: describe_header_error(&e, size, &mmap), path: path.to_path_buf() })?;
    let data_start = 8 + n;
    let mut tensors: Vec<(String, safetensors::tensor::TensorInfo)> = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mtime = file.metadata().ok().and_then(|m| m.modified().ok());
    Ok((
        Shard { path: path.to_path_buf(), size, data_start, mmap: Some(mmap), file: Some(file), mtime, direct: Default::default() },
        tensors,
    ))
}

fn describe_header_error(e: &safetensors::SafeTensorError, size: u64, buf: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let n = buf.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(0);
    match e {
        E::InvalidHeaderLength => {
            format!("header length {n} runs past the end of the {size}-byte file")
        }
        E::MetadataIncompleteBuffer => {
            format!("data section does not match the header: file is {size} bytes, tensors do not end exactly at its end (truncated or padded file)")
        }
        E::InvalidOffset(name) => {
            format!("tensor {name} has data offsets that overlap, leave a gap or run backwards")
        }
        E::TensorInvalidInfo => "a tensor's byte size does not equal its shape x dtype".to_string(),
        other => other.to_string(),
    }
}

/// Checks that a shard name from an index is a plain relative path inside the directory.
fn safe_shard_path(dir: &Path, name: &str, index: &Path) -> Result<PathBuf> {
    let rel = Path::new(name);
    let ok = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::ShardOutsideDir { shard: name.to_string(), path: index.to_path_buf() });
    }
    let full = dir.join(rel);
    if !full.exists() {
        return Err(Error::MissingShard { shard: name.to_string(), path: index.to_path_buf() });
    }
    // A symlink could still point elsewhere: compare canonical paths.
    let cdir = dir.canonicalize().map_err(|e| read_err("model directory", dir, e))?;
    let cfull = full.canonicalize().map_err(|e| read_err("shard", &full, e))?;
    if !cfull.starts_with(&cdir) {
        return Err(Error::ShardOutsideDir { shard: name.to_string(), path: index.to_path_buf() });
    }
    // A FIFO or device would block or never end on open/read (found while fuzzing the index).
    if !cfull.is_file() {
        return Err(Error::Index { reason: format!("shard {name} named in the index is not a regular file"), path: index.to_path_buf() });
    }
    Ok(full)
}

impl Checkpoint {
    /// Opens and validates a checkpoint (file or directory).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| read_err("model path", path, e))?;
        if meta.is_file() {
            if is_pickle_file(path) {
                return Err(Error::Pickle { path: path.to_path_buf() });
            }
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            return Self::from_files(path, &dir, vec![path.to_path_buf()], None, false);
        }
        let index = path.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join(SINGLE_NAME);
        if single.is_file() {
            return Self::from_files(path, path, vec![single], None, false);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| read_err("model directory", path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if files.is_empty() {
            if let Some(p) = pickle_in_dir(path) {
                return Err(Error::Pickle { path: p });
            }
            return Err(Error::NoWeights { path: path.to_path_buf() });
        }
        files.sort();
        Self::from_files(path, path, files, None, false)
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index).map_err(|e| read_err("shard index", index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Index { reason: format!("not valid JSON: {e}"), path: index.to_path_buf() })?;
        let wm = v
            .get("weight_map")
            .and_then(|w| w.as_object())
            .ok_or_else(|| Error::Index { reason: "no \"weight_map\" object".to_string(), path: index.to_path_buf() })?;
        let mut shard_names: Vec<String> = Vec::new();
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, shard) in wm {
            let shard = shard.as_str().ok_or_else(|| Error::Index {
                reason: format!("weight_map entry for {tensor} is not a string"),
                path: index.to_path_buf(),
            })?;
            if !shard_names.iter().any(|s| s == shard) {
                shard_names.push(shard.to_string());
            }
            expected.insert(tensor.clone(), shard.to_string());
        }
        shard_names.sort();
        let mut files = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            files.push(safe_shard_path(dir, name, index)?);
        }
        Self::from_files(dir, dir, files, Some((index, expected, shard_names)), true)
    }

    fn from_files(
        path: &Path,
        dir: &Path,
        files: Vec<PathBuf>,
        index: Option<(&Path, BTreeMap<String, String>, Vec<String>)>,
        sharded: bool,
    ) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        let mut order = Vec::new();
        for (si, f) in files.iter().enumerate() {
            let (shard, infos) = open_shard(f)?;
            for (name, info) in infos {
                if let Some(prev) = tensors.get(&name) {
                    return Err(Error::DuplicateTensor {
                        tensor: name,
                        first: shards.get(prev.shard).map(|s: &Shard| s.path.clone()).unwrap_or_default(),
                        second: f.clone(),
                    });
                }
                if elem_bytes(info.dtype).is_none() {
                    return Err(Error::Header {
                        reason: format!("tensor {name} has sub-byte dtype {:?}, which umerge cannot carry", info.dtype),
                        path: f.clone(),
                    });
                }
                let t = TensorInfo {
                    shard: si,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: shard.data_start + info.data_offsets.0,
                    end: shard.data_start + info.data_offsets.1,
                };
                order.push(name.clone());
                tensors.insert(name, t);
            }
            shards.push(shard);
        }
        if let Some((index_path, expected, names)) = index {
            for (tensor, shard) in &expected {
                let found = tensors.get(tensor).map(|t| &names[t.shard]);
                if found != Some(shard) {
                    return Err(Error::Index {
                        reason: match found {
                            None => format!("tensor {tensor} is listed in shard {shard} but no shard holds it"),
                            Some(other) => format!("tensor {tensor} is listed in shard {shard} but stored in {other}"),
                        },
                        path: index_path.to_path_buf(),
                    });
                }
            }
        }
        let c = Checkpoint { path: path.to_path_buf(), dir: dir.to_path_buf(), shards, tensors, order, sharded };
        c.advise_sequential();
        Ok(c)
    }

    fn advise_sequential(&self) {
        for s in &self.shards {
            if let Some(m) = &s.mmap {
                // Readahead hint only; failure is harmless.
                let _ = m.advise(memmap2::Advice::Sequential);
            }
        }
    }

    /// The bytes of `len` bytes at absolute offset `start` of shard `shard`.
    ///
    /// Checks first that the file has not changed since it was opened (see the module docs).
    pub fn bytes(&self, shard: usize, start: usize, len: usize) -> Result<&[u8]> {
        if let Some(s) = self.shards.get(shard) {
            s.check_unchanged()?;
        }
        let m = self.shards.get(shard).and_then(|s| s.mmap.as_ref());
        m.and_then(|m| m.get(start..start.checked_add(len)?))
            .ok_or_else(|| Error::Internal(format!("read past the end of {}", self.display())))
    }

    /// The full data of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        self.bytes(t.shard, t.start, t.end - t.start)
    }

    /// Releases the resident pages of a consumed window (`madvise(MADV_DONTNEED)`).
    ///
    /// The pages stay in the page cache; only this process's resident set shrinks. Reading the
    /// window again later simply faults the pages back in.
    ///
    /// The window is widened to 64 KiB boundaries: on a page fault the kernel maps the
    /// neighbouring cached pages too ("fault-around", 64 KiB by default), including pages of
    /// windows already released; releasing exactly the window leaked those, and resident memory
    /// crept up by ~10% of every tensor read. Releasing a neighbour's live pages is harmless
    /// (they fault back in).
    pub fn release(&self, shard: usize, start: usize, len: usize) {
        const AROUND: usize = 64 << 10;
        if let Some(m) = self.shards.get(shard).and_then(|s| s.mmap.as_ref()) {
            let end = start.saturating_add(len).div_ceil(AROUND).saturating_mul(AROUND).min(m.len());
            let start = start / AROUND * AROUND;
            let len = end.saturating_sub(start);
            if start.saturating_add(len) <= m.len() && len > 0 {
                // SAFETY: the mapping is a read-only shared file mapping. MADV_DONTNEED drops the
                // process's page-table entries for the range; any later access (including a slice
                // another thread still holds) re-reads the same file contents from the page cache,
                // so no borrowed data changes. memmap2 rounds the range to page boundaries.
                unsafe {
                    let _ = m.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len);
                }
            }
        }
    }

    /// Asks the kernel to start reading bytes `start..start + len` of shard `shard` into the page
    /// cache now, without waiting (`posix_fadvise(POSIX_FADV_WILLNEED)`): the read-ahead of
    /// [`crate::exec::ReadAhead`]. Best effort: a hint that fails costs only speed.
    ///
    /// The range is hinted in pieces of [`WILL_NEED_PIECE`]: Linux reads at most the device's
    /// read-ahead size (`read_ahead_kb`, often 128 KiB to 8 MiB) per `WILLNEED` call and silently
    /// ignores the rest of a longer range.
    pub fn will_need(&self, shard: usize, start: usize, len: usize) {
        if let Some(f) = self.shards.get(shard).and_then(|s| s.file.as_ref()) {
            let end = start.saturating_add(len);
            let mut at = start;
            while at < end {
                let n = WILL_NEED_PIECE.min(end - at);
                fadvise(f, at, n, libc::POSIX_FADV_WILLNEED);
                at += n;
            }
        }
    }

    /// Forgets a consumed window entirely: releases it from this process ([`Checkpoint::release`])
    /// and then drops its clean pages from the page cache (`POSIX_FADV_DONTNEED`), so that a
    /// merge of inputs larger than memory does not evict everyone else's working set. Pages
    /// still mapped by another process are kept by the kernel.
    pub fn forget(&self, shard: usize, start: usize, len: usize) {
        self.release(shard, start, len);
        if let Some(f) = self.shards.get(shard).and_then(|s| s.file.as_ref()) {
            fadvise(f, start, len, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Fraction (0 to 1) of the pages of bytes `start..start + len` of shard `shard` that are in
    /// the page cache now (`mincore` on the map); 0 when unknown.
    pub fn resident_fraction(&self, shard: usize, start: usize, len: usize) -> f64 {
        const PAGE: usize = 4096;
        let Some(m) = self.shards.get(shard).and_then(|s| s.mmap.as_ref()) else { return 0.0 };
        let end = start.saturating_add(len).min(m.len());
        let first = start / PAGE * PAGE;
        if end <= first {
            return 0.0;
        }
        let pages = (end - first).div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside the live mapping (`first` is page-aligned because the
        // map is, and `end` is clamped to its length); mincore only fills `vec`, one byte per page.
        let r = unsafe { libc::mincore(m.as_ptr().add(first) as *mut libc::c_void, end - first, vec.as_mut_ptr()) };
        if r != 0 {
            return 0.0;
        }
        vec.iter().filter(|&&v| v & 1 == 1).count() as f64 / pages as f64
    }

    /// Reads bytes `start..start + len` of shard `shard` around the page cache (`O_DIRECT`) into
    /// `buf` (page-aligned, at least [`direct_len`] bytes) and returns where they begin in it:
    /// the read covers the range widened to 4 KiB boundaries, as `O_DIRECT` requires. On these
    /// machines a read through the page cache costs about 1.3 s of system time per GB (measured:
    /// `cat` of the 6.6 GB benchmark inputs, 11.4 s wall and 8.9 s system; `dd iflag=direct`,
    /// 7.2 s and 0.3 s), which is what kept cold merges from the disk's speed.
    ///
    /// Errors (a filesystem without `O_DIRECT`, a short read, a file changed since it was opened)
    /// are returned for the caller to fall back on the map, whose reads report them properly.
    pub fn read_direct(&self, shard: usize, start: usize, len: usize, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let s = self.shards.get(shard).ok_or_else(|| std::io::Error::other("no such shard"))?;
        let f = s
            .direct
            .get_or_init(|| File::options().read(true).custom_flags(libc::O_DIRECT).open(&s.path).ok())
            .as_ref()
            .ok_or_else(|| std::io::Error::other("O_DIRECT is not available"))?;
        let first = start / DIRECT_ALIGN * DIRECT_ALIGN;
        let want = (start + len).min(s.size as usize) - first;
        let n = direct_len(start, len);
        if buf.len() < n || !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            return Err(std::io::Error::other("direct read buffer too small or misaligned"));
        }
        s.check_unchanged().map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut got = 0usize;
        while got < want {
            // The request runs to the aligned end; the file may end inside it (a short read).
            let r = f.read_at(&mut buf[got..n], (first + got) as u64)?;
            if r == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            got += r;
        }
        s.check_unchanged().map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(start - first)
    }

    /// A short name for messages: the path as given.
    pub fn display(&self) -> String {
        self.path.display().to_string()
    }

    /// Path of the shard holding `t` (for messages).
    pub fn file_of(&self, t: &TensorInfo) -> PathBuf {
        self.shards.get(t.shard).map(|s| s.path.clone()).unwrap_or_else(|| self.path.clone())
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(TensorInfo::nbytes).sum()
    }
}

/// `posix_fadvise` on a byte range of an open file; errors are ignored (advice only).
pub(crate) fn fadvise(f: &File, start: usize, len: usize, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else { return };
    if n == 0 {
        return;
    }
    // SAFETY: the descriptor is open for the duration of the call; fadvise only changes how
    // the kernel caches the file, never its contents.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), off, n, advice) };
}

/// A JSON description of a checkpoint for `umerge inspect`: format, shards, tensors (name,
/// dtype, shape, bytes, shard), totals, and whether it is valid (with the error when not).
pub fn inspect(path: &Path) -> serde_json::Value {
    let c = match Checkpoint::open(path) {
        Ok(c) => c,
        Err(e) => {
            return serde_json::json!({"path": path.display().to_string(), "valid": false, "error": e.to_string()});
        }
    };
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut params = 0u64;
    let tensors: Vec<serde_json::Value> = c
        .order
        .iter()
        .filter_map(|n| c.tensors.get(n).map(|t| (n, t)))
        .map(|(n, t)| {
            *dtypes.entry(format!("{:?}", t.dtype)).or_default() += t.numel();
            params += t.numel();
            serde_json::json!({
                "name": n,
                "dtype": format!("{:?}", t.dtype),
                "shape": t.shape,
                "bytes": t.nbytes(),
                "shard": c.shards[t.shard].path.file_name().map(|f| f.to_string_lossy().to_string()),
            })
        })
        .collect();
    let shards: Vec<serde_json::Value> = c
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "file": s.path.file_name().map(|f| f.to_string_lossy().to_string()),
                "bytes": s.size,
                "tensors": c.tensors.values().filter(|t| t.shard == i).count(),
            })
        })
        .collect();
    serde_json::json!({
        "path": path.display().to_string(),
        "valid": true,
        "format": if c.sharded { "sharded" } else { "single" },
        "shards": shards,
        "tensor_count": tensors.len(),
        "parameters": params,
        "elements_by_dtype": dtypes,
        "total_bytes": c.total_bytes(),
        "tensors": tensors,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a safetensors file from (name, dtype, shape, bytes) with a raw header (test helper).
    pub fn write_st(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        std::fs::write(path, st_bytes(tensors)).unwrap();
    }

    /// The bytes of a safetensors file from (name, dtype, shape, bytes), header built by hand
    /// (test helper, also used by `verify`'s tests).
    pub fn st_bytes(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = String::from("{");
        let mut off = 0usize;
        let mut data = Vec::new();
        for (i, (name, dt, shape, bytes)) in tensors.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header
                .push_str(&format!("\"{name}\":{{\"dtype\":\"{dt}\",\"shape\":{shape:?},\"data_offsets\":[{off},{}]}}", off + bytes.len()));
            off += bytes.len();
            data.extend_from_slice(bytes);
        }
        header.push('}');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    }

    pub fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_single_file() {
        let d = tmpdir("single");
        write_st(&d.join("model.safetensors"), &[("a", "F32", vec![2], f32s(&[1.0, 2.0]))]);
        let c = Checkpoint::open(&d).unwrap();
        assert_eq!(c.tensors.len(), 1);
        let t = &c.tensors["a"];
        assert_eq!(c.tensor_bytes(t).unwrap(), &f32s(&[1.0, 2.0])[..]);
    }

    #[test]
    fn truncated_file_is_rejected() {
        let d = tmpdir("trunc");
        let p = d.join("model.safetensors");
        write_st(&p, &[("a", "F32", vec![4], f32s(&[1.0, 2.0, 3.0, 4.0]))]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = Checkpoint::open(&d).unwrap_err();
        assert!(matches!(e, Error::Header { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn header_length_past_end_is_rejected() {
        let d = tmpdir("hlen");
        let p = d.join("model.safetensors");
        let mut f = File::create(&p).unwrap();
        f.write_all(&1000u64.to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        drop(f);
        let e = Checkpoint::open(&d).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        std::fs::write(&p, b"abc").unwrap();
        assert!(matches!(Checkpoint::open(&d).unwrap_err(), Error::Header { .. }));
    }

    #[test]
    fn overlapping_offsets_are_rejected() {
        let d = tmpdir("overlap");
        let p = d.join("model.safetensors");
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        write_raw(&p, header, &[0u8; 12]);
        let e = Checkpoint::open(&d).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn index_escaping_dir_and_missing_shard_are_rejected() {
        let d = tmpdir("index");
        write_st(&d.join("s1.safetensors"), &[("a", "F32", vec![1], f32s(&[1.0]))]);
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"a":"../s1.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d).unwrap_err(), Error::ShardOutsideDir { .. }));
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"a":"/etc/passwd"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d).unwrap_err(), Error::ShardOutsideDir { .. }));
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"a":"nope.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d).unwrap_err(), Error::MissingShard { .. }));
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"a":"s1.safetensors"}}"#).unwrap();
        let c = Checkpoint::open(&d).unwrap();
        assert!(c.sharded);
        std::fs::write(d.join(INDEX_NAME), r#"{"weight_map":{"b":"s1.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d).unwrap_err(), Error::Index { .. }));
    }
}
