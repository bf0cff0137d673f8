//! Sources: where a merge job's elements come from, decoded to f32 by flat output index (a
//! mapped checkpoint tensor, an all-zero base, an in-memory slice).

use super::readahead::ReadAhead;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{decode, elem_bytes, Dtype};
use crate::error::{Error, Result};

/// Reads a tensor's elements as f32, by flat output index.
pub trait Source: Sync {
    /// Decodes elements `[start, start + out.len())` into `out`.
    fn read(&self, start: u64, out: &mut [f32]) -> Result<()>;
    /// Tells the source the window is consumed (releases mapped pages).
    fn release(&self, _start: u64, _len: usize) {}
    /// Bytes of mapped file per element (0 for sources not backed by a mapping).
    fn mapped_bytes_per_elem(&self) -> u64 {
        0
    }
    /// Like [`Source::read`], then subtracts `base` element-wise (`out = x - base`): the deltas.
    /// Sources may fuse the two (see [`MappedSource`]); the result is the same f32 subtraction.
    fn read_sub(&self, start: u64, out: &mut [f32], base: &[f32]) -> Result<()> {
        self.read(start, out)?;
        for (x, y) in out.iter_mut().zip(base) {
            *x -= *y;
        }
        Ok(())
    }
}

/// A tensor in a memory-mapped checkpoint, read from the buffer the run's read-ahead filled
/// when there is one (see `readahead`), else from the map.
pub struct MappedSource<'a> {
    ckpt: &'a Checkpoint,
    info: &'a TensorInfo,
    crop_cols: Option<(usize, usize)>,
    name: &'a str,
    check_finite: bool,
    /// The run's read-ahead and this tensor's step in it.
    ahead: Option<(&'a ReadAhead<'a>, usize)>,
}

impl<'a> MappedSource<'a> {
    /// A source over `info` in `ckpt`; `crop_cols` maps a narrower output onto wider rows.
    pub fn new(ckpt: &'a Checkpoint, info: &'a TensorInfo, crop_cols: Option<(usize, usize)>, name: &'a str, check_finite: bool) -> Self {
        MappedSource { ckpt, info, crop_cols, name, check_finite, ahead: None }
    }

    /// The same source, reading what `ahead` prepared for step `step`.
    pub fn with_read_ahead(self, ahead: &'a ReadAhead<'a>, step: usize) -> Self {
        MappedSource { ahead: Some((ahead, step)), ..self }
    }

    /// Runs `f` on bytes `start..start + len` (absolute, in the tensor's shard).
    pub(crate) fn with_bytes<R>(&self, start: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        if let Some((ahead, step)) = self.ahead {
            if let Some(l) = ahead.loaded(step, self.ckpt, self.info.shard, start, len) {
                return Ok(f(l.bytes(start, len)));
            }
        }
        Ok(f(self.ckpt.bytes(self.info.shard, start, len)?))
    }

    fn src_index(&self, i: u64) -> u64 {
        match self.crop_cols {
            None => i,
            Some((oc, ic)) => (i / oc as u64) * ic as u64 + i % oc as u64,
        }
    }
}

impl MappedSource<'_> {
    /// bf16 without cropping: decode (minus `sub`) straight from the mapped bytes in one fused
    /// loop (`dtype::decode_bf16_fused`). Returns false when the fast path does not apply or an
    /// input is non-finite and must be reported; the caller then takes the general path.
    /// Measured (perf, one thread): decode + `first_nonfinite` + the delta loop were ~20% of a
    /// TinyLlama layer's CPU time as three passes.
    fn read_fast(&self, start: u64, out: &mut [f32], sub: Option<&[f32]>) -> Result<bool> {
        if self.crop_cols.is_some() || self.info.dtype != Dtype::BF16 {
            return Ok(false);
        }
        let fused =
            self.with_bytes(self.info.start + start as usize * 2, out.len() * 2, |b| crate::dtype::decode_bf16_fused(b, sub, out))?;
        Ok(match fused {
            Some(bad) => !(bad && self.check_finite),
            None => false,
        })
    }
}

impl Source for MappedSource<'_> {
    fn read_sub(&self, start: u64, out: &mut [f32], base: &[f32]) -> Result<()> {
        if self.read_fast(start, out, Some(base))? {
            return Ok(());
        }
        self.read(start, out)?;
        for (x, y) in out.iter_mut().zip(base) {
            *x -= *y;
        }
        Ok(())
    }

    fn read(&self, start: u64, out: &mut [f32]) -> Result<()> {
        if self.read_fast(start, out, None)? {
            return Ok(());
        }
        let eb = elem_bytes(self.info.dtype).unwrap_or(1);
        let mut j = 0usize;
        while j < out.len() {
            let idx = start + j as u64;
            let run = match self.crop_cols {
                None => out.len() - j,
                Some((oc, _)) => (oc - (idx % oc as u64) as usize).min(out.len() - j),
            };
            let s = self.info.start + self.src_index(idx) as usize * eb;
            self.with_bytes(s, run * eb, |b| decode(self.info.dtype, b, &mut out[j..j + run]))?;
            j += run;
        }
        if self.check_finite {
            if let Some(p) = first_nonfinite(out) {
                return Err(Error::NonFinite {
                    tensor: self.name.to_string(),
                    index: self.src_index(start + p as u64),
                    path: self.ckpt.file_of(self.info),
                });
            }
        }
        Ok(())
    }

    fn mapped_bytes_per_elem(&self) -> u64 {
        elem_bytes(self.info.dtype).unwrap_or(1) as u64
    }

    fn release(&self, start: u64, len: usize) {
        if len == 0 {
            return;
        }
        let eb = elem_bytes(self.info.dtype).unwrap_or(1);
        let a = self.src_index(start) as usize * eb;
        let b = (self.src_index(start + len as u64 - 1) as usize + 1) * eb;
        self.ckpt.release(self.info.shard, self.info.start + a, b - a);
    }
}

/// Index of the first NaN or infinity. Checks blocks with a branch-free OR of "exponent all
/// ones" (vectorises) and only searches a block that has one; the early-exit `position` loop
/// it replaces was 20% of the benchmark's CPU time.
pub fn first_nonfinite(v: &[f32]) -> Option<usize> {
    for (ci, c) in v.chunks(1024).enumerate() {
        let mut bad = false;
        for x in c {
            bad |= (x.to_bits() & 0x7f80_0000) == 0x7f80_0000;
        }
        if bad {
            return c.iter().position(|x| !x.is_finite()).map(|p| ci * 1024 + p);
        }
    }
    None
}

/// An all-zero tensor (the base of adapter merges).
pub struct ZeroSource;

impl Source for ZeroSource {
    fn read(&self, _start: u64, out: &mut [f32]) -> Result<()> {
        out.fill(0.0);
        Ok(())
    }
}

/// An in-memory f32 tensor (the `ops` kernels on numpy arrays).
pub struct SliceSource<'a>(pub &'a [f32]);

impl Source for SliceSource<'_> {
    fn read(&self, start: u64, out: &mut [f32]) -> Result<()> {
        let s = start as usize;
        let src = self.0.get(s..s + out.len()).ok_or_else(|| Error::Internal("slice source read out of range".into()))?;
        out.copy_from_slice(src);
        Ok(())
    }
}
