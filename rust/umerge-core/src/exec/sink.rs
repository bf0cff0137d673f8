//! Sinks: where merged f32 values go (in-memory buffers, or the output shards encoded to each
//! tensor's dtype).

use super::buffers::BufPool;
use crate::dtype::{elem_bytes, encode, Dtype};
use crate::error::{Error, Result};
use crate::write::Output;

/// Where merged values go.
pub trait Sink: Sync {
    /// Stores merged values of job `job` starting at flat element `start`.
    fn write(&self, job: usize, start: u64, values: &[f32]) -> Result<()>;
}

/// Writes into in-memory f32 buffers (one per job); chunks are disjoint.
pub struct SliceSink {
    ptrs: Vec<(usize, usize)>,
}

impl SliceSink {
    /// Wraps output buffers; they must outlive every `write` call (the executor's run).
    pub fn new(bufs: &mut [&mut [f32]]) -> Self {
        SliceSink { ptrs: bufs.iter_mut().map(|b| (b.as_mut_ptr() as usize, b.len())).collect() }
    }
}

impl Sink for SliceSink {
    fn write(&self, job: usize, start: u64, values: &[f32]) -> Result<()> {
        let (p, n) = self.ptrs[job];
        let s = start as usize;
        if s + values.len() > n {
            return Err(Error::Internal("slice sink write out of range".into()));
        }
        // SAFETY: the buffer is alive for the whole run (the caller keeps the `&mut` borrow it
        // handed to `new`), the range was checked against its length, and the executor writes
        // each element range of a job exactly once from one chunk, so writes never overlap.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), (p as *mut f32).add(s), values.len()) };
        Ok(())
    }
}

/// Writes f32 values into the output shards, encoded to the tensor's dtype.
pub(super) struct FileSink<'a> {
    pub(super) out: &'a Output,
    /// Per job: (output tensor index, dtype).
    pub(super) targets: Vec<(usize, Dtype)>,
    /// Encoded-byte buffers reused across chunks: a fresh zeroed vector per chunk cost a
    /// memset of every output byte (~3% of the CPU time, perf on a TinyLlama layer); `encode`
    /// overwrites every byte, so a reused buffer needs no clearing.
    pub(super) bufs: BufPool<u8>,
}

impl Sink for FileSink<'_> {
    fn write(&self, job: usize, start: u64, values: &[f32]) -> Result<()> {
        let (ti, dt) = self.targets[job];
        let eb = elem_bytes(dt).unwrap_or(4);
        let mut bytes = self.bufs.take(values.len() * eb);
        encode(dt, values, &mut bytes);
        let r = self.out.write_at(ti, start * eb as u64, &bytes);
        self.bufs.put(bytes);
        r
    }
}
