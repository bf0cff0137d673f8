//! Tensors copied: raw bytes when the dtype is kept and no scale is applied, else decoded,
//! scaled and re-encoded (with a LoRA update folded in, for a `model+lora` input).

use super::readahead::ReadAhead;
use super::MappedSource;
use super::Source;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{elem_bytes, encode, is_float, Dtype};
use crate::error::Result;
use crate::fold::{Factors, FoldedSource};
use crate::write::Output;

/// Copies tensor `info` of checkpoint `ck` into output tensor `ti`: raw bytes when the dtype is
/// kept, no `scale` is given and no NaN/Inf check is asked of a float tensor, else decoded
/// (to f32), multiplied by `scale` when given (one f32 multiplication per element, as torch
/// multiplies a float32 tensor by a number) and re-encoded, in steps of 8 MiB so memory stays
/// bounded. Reads what `ahead` (the run's read-ahead and the tensor's step) prepared. Shared by
/// the merge executor and `fold`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_tensor_from<'a>(
    ck: &'a Checkpoint,
    info: &'a TensorInfo,
    out_dtype: Dtype,
    name: &'a str,
    ti: usize,
    out: &Output,
    check_finite: bool,
    scale: Option<f32>,
    ahead: Option<(&'a ReadAhead<'a>, usize)>,
    lora: Option<&'a Factors>,
) -> Result<()> {
    const STEP: usize = 8 << 20;
    let mut s = MappedSource::new(ck, info, None, name, check_finite);
    if let Some((ra, step)) = ahead {
        s = s.with_read_ahead(ra, step);
    }
    if info.dtype == out_dtype && scale.is_none() && lora.is_none() && !(check_finite && is_float(info.dtype)) {
        let total = info.end - info.start;
        let mut off = 0usize;
        while off < total {
            let n = STEP.min(total - off);
            s.with_bytes(info.start + off, n, |b| out.write_at(ti, off as u64, b))??;
            ck.release(info.shard, info.start + off, n);
            off += n;
        }
        return Ok(());
    }
    let eb = elem_bytes(out_dtype).unwrap_or(4);
    let n = info.numel();
    let cols = info.shape.last().copied().unwrap_or(1).max(1);
    // Whole rows per step, so a folded update is added row block by row block.
    let step = ((STEP / 4 / cols).max(1) * cols) as u64;
    let s: Box<dyn Source + '_> = match lora {
        Some(f) => Box::new(FoldedSource { w: s, f, cols }),
        None => Box::new(s),
    };
    let mut start = 0u64;
    let mut vals = Vec::new();
    let mut bytes = Vec::new();
    while start < n {
        let len = step.min(n - start) as usize;
        vals.resize(len, 0f32);
        s.read(start, &mut vals)?;
        s.release(start, len);
        if let Some(f) = scale {
            for v in vals.iter_mut() {
                *v *= f;
            }
        }
        bytes.resize(len * eb, 0u8);
        encode(out_dtype, &vals, &mut bytes);
        out.write_at(ti, start * eb as u64, &bytes)?;
        start += len as u64;
    }
    Ok(())
}
