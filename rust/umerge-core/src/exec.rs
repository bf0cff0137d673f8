//! Executing a plan: chunks within a memory budget, statistics passes then an apply pass, rayon.
//!
//! Work is cut into chunks of whole 64 Ki-element blocks ([`BLOCK`]); the chunk size comes from
//! the memory budget and the thread count, so the buffers in flight (inputs decoded to f32, the
//! output, the mapped windows) stay within the budget. Per tensor:
//!
//! 1. trim selection (see `select`): high-bit histogram pass, low-bit pass, and a tie-counting
//!    pass when some but not all entries equal to the threshold are kept. Whole-model trims
//!    (`TrimScope::Model`) run these passes over every tensor before any output is computed.
//! 2. reductions, when the method asks for them, on fixed blocks summed in block order.
//! 3. apply: decode, subtract the base, trim, [`Method::apply`], encode, positioned write.
//!
//! Every per-element result depends only on that element's inputs and on integer statistics, and
//! reductions use fixed block boundaries, so the output bytes are the same for any thread count
//! and any budget. Consumed input windows are released after each read (`Checkpoint::release`).

use std::time::Instant;

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::checksum::Frontier;
use crate::dtype::{decode, elem_bytes, encode, is_float, parse_out_dtype, Dtype};
use crate::error::{Error, Result};
use crate::methods::{self, BaseUse, Chunk, Method, Stats, TensorRecipe, Trim, TrimRule, TrimScope};
use crate::params::Params;
use crate::plan::{self, Action, InputId, Inputs, PlanOptions, SrcRef};
use crate::report::{peak_rss_bytes, Report};
use crate::select::{self, Threshold, HIGH_BINS, LOW_BINS};
use crate::spec::{MergeSpec, DEFAULT_MAX_SHARD_SIZE, DEFAULT_MEMORY_BUDGET};
use crate::write::{self, OutTensor, Output};
use crate::Progress;

/// Elements per block: chunk boundaries and reduction blocks are multiples of it.
pub const BLOCK: usize = 1 << 16;
/// Largest chunk, in elements (4 blocks = 256 Ki elements = 1 MiB of f32 per input): small
/// enough that a chunk's inputs, base and output stay in cache between the trim and apply steps.
pub const MAX_CHUNK: usize = 4 * BLOCK;

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

/// A tensor in a memory-mapped checkpoint.
pub struct MappedSource<'a> {
    ckpt: &'a Checkpoint,
    info: &'a TensorInfo,
    crop_cols: Option<(usize, usize)>,
    name: &'a str,
    check_finite: bool,
}

impl<'a> MappedSource<'a> {
    /// A source over `info` in `ckpt`; `crop_cols` maps a narrower output onto wider rows.
    pub fn new(ckpt: &'a Checkpoint, info: &'a TensorInfo, crop_cols: Option<(usize, usize)>, name: &'a str, check_finite: bool) -> Self {
        MappedSource { ckpt, info, crop_cols, name, check_finite }
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
        let bytes = self.ckpt.bytes(self.info.shard, self.info.start + start as usize * 2, out.len() * 2)?;
        Ok(match crate::dtype::decode_bf16_fused(bytes, sub, out) {
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
            let bytes = self.ckpt.bytes(self.info.shard, s, run * eb)?;
            decode(self.info.dtype, bytes, &mut out[j..j + run]);
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

/// One tensor to merge.
pub struct Job<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Elements.
    pub numel: u64,
    /// The base, if the method uses one.
    pub base: Option<&'a dyn Source>,
    /// The models that have the tensor.
    pub models: Vec<&'a dyn Source>,
    /// Their indices in the spec's model list.
    pub model_ids: Vec<usize>,
    /// The method's recipe for this tensor.
    pub recipe: &'a TensorRecipe,
}

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

#[derive(Clone, Copy)]
struct Item {
    job: usize,
    start: u64,
    len: usize,
}

fn items_of(job: usize, numel: u64, chunk: usize) -> Vec<Item> {
    let mut v = Vec::with_capacity((numel as usize).div_ceil(chunk.max(1)).max(1));
    let mut s = 0u64;
    while s < numel {
        let len = (numel - s).min(chunk as u64) as usize;
        v.push(Item { job, start: s, len });
        s += len as u64;
    }
    v
}

/// Reusable f32 buffers: chunk buffers are taken from and returned to this pool so the hot loop
/// does not allocate. Measured: allocating fresh 4 MiB vectors per chunk cost ~13 M minor page
/// faults and a third of the CPU time on the 1.1B benchmark (every large allocation is a fresh
/// mmap whose pages fault in on first write).
#[derive(Default)]
struct BufPool(std::sync::Mutex<Vec<Vec<f32>>>);

impl BufPool {
    /// A buffer of exactly `len` elements; contents unspecified (callers overwrite it).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut v = self.0.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0.0);
        } else {
            v.truncate(len);
        }
        v
    }
    fn put(&self, v: Vec<f32>) {
        if let Ok(mut p) = self.0.lock() {
            if p.len() < 64 {
                p.push(v);
            }
        }
    }
}

struct Bufs {
    base: Option<Vec<f32>>,
    inputs: Vec<Vec<f32>>,
}

/// Trim thresholds for one selection: per key, and per (item, key) the count of threshold-equal
/// entries before the item; per model slot, the key of its outlier cut when it has one (the
/// keys after the slots' own).
#[derive(Default, Clone)]
struct Selection {
    th: Vec<Threshold>,
    eq_before: Vec<Vec<u64>>,
    outlier_key: Vec<Option<usize>>,
}

impl Selection {
    /// The threshold of `key` and the count of its equal entries before `item`.
    fn cut(&self, key: usize, item: usize) -> (Threshold, u64) {
        (self.th[key], self.eq_before.get(item).map_or(0, |v| v[key]))
    }
}

/// One selection's question: the items it covers, where their data comes from, which input
/// slots of an item's job feed which key (`targets`), and each key's target (`spec`).
#[derive(Clone, Copy)]
struct Query<'q, 'j> {
    jobs: &'q [Job<'j>],
    items: &'q [Item],
    data: Data<'q>,
    targets: &'q (dyn Fn(&Item) -> Targets + Sync),
    spec: &'q [Option<SelKey>],
}

/// A selection in progress: per key its k, whether it is still unresolved and its threshold;
/// per item and key, the entries equal to the threshold (for tie ranks).
struct Found {
    ks: Vec<u64>,
    active: Vec<bool>,
    th: Vec<Threshold>,
    eq_counts: Vec<Vec<u64>>,
}

/// One selection key: the top `k` of `n` magnitudes; `all_ties` keeps every entry equal to the
/// threshold (the TIES paper's kthvalue rule).
#[derive(Debug, Clone, Copy)]
struct SelKey {
    n: u64,
    k: u64,
    all_ties: bool,
}

impl SelKey {
    /// The entries a trim keeps before any outlier drop: its top (dropped + kept).
    fn keep(trim: &Trim, n: u64) -> SelKey {
        match trim.rule {
            TrimRule::ExactK => {
                let (dropped, kept) = trim.band(n);
                SelKey { n, k: dropped + kept, all_ties: false }
            }
            TrimRule::PaperKth => {
                let f = select::keep_count(trim.density, n);
                SelKey { n, k: if f >= n { n } else { f + 1 }, all_ties: true }
            }
        }
    }

    /// The outliers a trim drops (its top `dropped`), when there are any.
    fn outliers(trim: &Trim, n: u64) -> Option<SelKey> {
        let (dropped, _) = trim.band(n);
        (dropped > 0).then_some(SelKey { n, k: dropped, all_ties: false })
    }
}

/// A whole tensor decoded in memory (deltas when the method uses them), reused by every pass.
struct Cache {
    /// Per model slot: the whole tensor's deltas (or values), f32.
    inputs: Vec<Vec<f32>>,
    /// True once trimmed in place.
    trimmed: bool,
}

/// Where a pass gets a chunk's inputs from.
#[derive(Clone, Copy)]
enum Data<'c> {
    /// Decode from the sources each time.
    Stream,
    /// Slices of a cached tensor.
    Cached(&'c Cache),
}

/// Raw pointer wrapper for filling disjoint ranges of one vector from several threads.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint element ranges of a vector that outlives the parallel
// loop (see `Engine::load_cache`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Runs merge jobs through a method. Call inside the rayon pool that should do the work.
pub struct Engine<'a> {
    /// The method.
    pub method: &'a dyn Method,
    /// Elements per chunk (a multiple of [`BLOCK`], or any size for tests).
    pub chunk: usize,
    /// A tensor whose decoded inputs (base and models, f32) fit in this many bytes is decoded
    /// once and kept for all its passes instead of being decoded again by each pass.
    pub cache_bytes: u64,
    /// Bytes the candidate lists of the trim selection may take (see `select`).
    pub list_bytes: u64,
    pool: BufPool,
    /// Whole-tensor vectors kept between tensors: reusing them avoids faulting in fresh pages
    /// for every cached tensor (1.5 M page faults on the 1.1B benchmark).
    cache_pool: BufPool,
}

type Targets = Vec<(usize, usize)>; // (slot, key)
/// Adds one input's values into a key's histogram: `(values, key, histogram)`.
type HistogramAdd<'a> = dyn Fn(&[f32], usize, &mut [u64]) + Sync + 'a;

impl<'a> Engine<'a> {
    /// An engine running `method` on chunks of `chunk` elements, caching tensors up to
    /// `cache_bytes` of decoded inputs.
    pub fn new(method: &'a dyn Method, chunk: usize, cache_bytes: u64) -> Self {
        Engine { method, chunk: chunk.max(1), cache_bytes, list_bytes: cache_bytes / 2, pool: BufPool::default(), cache_pool: BufPool::default() }
    }

    /// (reduction block, chunk), in elements, for one job: [`BLOCK`] and the engine's chunk, or,
    /// when the recipe needs whole rows, both made whole rows: the block the most rows that fit
    /// in [`BLOCK`] (at least one), the chunk the engine's chunk rounded up to whole blocks. The
    /// block depends only on the tensor, so reductions stay independent of budget and threads.
    fn layout(&self, job: &Job<'_>) -> (usize, usize) {
        let row = job.recipe.row as usize;
        if row == 0 {
            return (BLOCK, self.chunk);
        }
        let block = (BLOCK / row).max(1) * row;
        (block, self.chunk.div_ceil(block).max(1) * block)
    }

    /// Decodes one window of every input into the given slices; inputs become deltas
    /// (x - base) when the method uses them.
    fn gather_into(&self, job: &Job<'_>, start: u64, base: Option<&mut [f32]>, inputs: &mut [&mut [f32]]) -> Result<()> {
        let release = !self.keeps_mapped(job);
        let base: Option<&[f32]> = match (job.base, base) {
            (Some(s), Some(b)) => {
                s.read(start, b)?;
                if release {
                    s.release(start, b.len());
                }
                Some(b)
            }
            _ => None,
        };
        let deltas = self.method.uses_deltas();
        for (src, v) in job.models.iter().zip(inputs.iter_mut()) {
            match (deltas, base) {
                (true, Some(b)) => src.read_sub(start, v, b)?,
                _ => src.read(start, v)?,
            }
            if release {
                src.release(start, v.len());
            }
        }
        Ok(())
    }

    /// Whether a tensor's mapped input pages may stay resident until the tensor is done (they
    /// are released then): true when all of them fit in the cache allowance. The selection and
    /// apply passes then fault each page in once instead of twice. Measured on the 1.1B TIES
    /// benchmark: page faults and `madvise` were 9% of the CPU time with a release after
    /// every read.
    fn keeps_mapped(&self, job: &Job<'_>) -> bool {
        let per_elem: u64 = job.base.iter().chain(job.models.iter()).map(|s| s.mapped_bytes_per_elem()).sum();
        job.numel.saturating_mul(per_elem) <= self.cache_bytes
    }

    fn gather(&self, job: &Job<'_>, start: u64, len: usize) -> Result<Bufs> {
        let mut base = job.base.map(|_| self.pool.take(len));
        let mut inputs: Vec<Vec<f32>> = job.models.iter().map(|_| self.pool.take(len)).collect();
        let r = {
            let mut muts: Vec<&mut [f32]> = inputs.iter_mut().map(|v| v.as_mut_slice()).collect();
            self.gather_into(job, start, base.as_deref_mut(), &mut muts)
        };
        let bufs = Bufs { base, inputs };
        match r {
            Ok(()) => Ok(bufs),
            Err(e) => {
                self.recycle(bufs);
                Err(e)
            }
        }
    }

    fn recycle(&self, b: Bufs) {
        if let Some(v) = b.base {
            self.pool.put(v);
        }
        for v in b.inputs {
            self.pool.put(v);
        }
    }

    /// Runs `f` on the (untrimmed) inputs of one item.
    fn with_inputs<R>(&self, job: &Job<'_>, it: &Item, data: Data<'_>, f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
        match data {
            Data::Cached(c) => {
                let s = it.start as usize;
                let views: Vec<&[f32]> = c.inputs.iter().map(|v| &v[s..s + it.len]).collect();
                Ok(f(&views))
            }
            Data::Stream => {
                let bufs = self.gather(job, it.start, it.len)?;
                let views: Vec<&[f32]> = bufs.inputs.iter().map(|v| v.as_slice()).collect();
                let r = f(&views);
                self.recycle(bufs);
                Ok(r)
            }
        }
    }

    /// Decodes a whole tensor's model inputs (deltas) into memory, in parallel over its items.
    /// The base is not kept: the apply pass decodes it again, once, which costs less memory
    /// than caching it.
    fn load_cache(&self, job: &Job<'_>, items: &[Item]) -> Result<Cache> {
        let n = job.numel as usize;
        let mut inputs: Vec<Vec<f32>> = job.models.iter().map(|_| self.cache_pool.take(n)).collect();
        let ips: Vec<SendPtr> = inputs.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect();
        items.par_iter().try_for_each(|it| -> Result<()> {
            let s = it.start as usize;
            // SAFETY: each item covers a distinct range [s, s + len) of vectors of length n
            // that live until after this loop; no other reference to them exists meanwhile.
            let mut ins: Vec<&mut [f32]> =
                unsafe { ips.iter().map(|p| std::slice::from_raw_parts_mut(p.0.add(s), it.len)).collect() };
            let mut base = job.base.map(|_| self.pool.take(it.len));
            let r = self.gather_into(job, it.start, base.as_deref_mut(), &mut ins);
            if let Some(b) = base {
                self.pool.put(b);
            }
            r
        })?;
        Ok(Cache { inputs, trimmed: false })
    }

    /// Computes the thresholds of a selection's keys.
    fn select(&self, q: &Query<'_, '_>) -> Result<Selection> {
        let nkeys = q.spec.len();
        let mut f = Found {
            ks: vec![0u64; nkeys],
            active: vec![false; nkeys],
            th: vec![Threshold::KEEP_ALL; nkeys],
            eq_counts: vec![vec![0u64; nkeys]; q.items.len()],
        };
        for (key, sk) in q.spec.iter().enumerate() {
            let Some(SelKey { n, k, .. }) = *sk else { continue };
            if k >= n {
                f.th[key] = Threshold::KEEP_ALL;
            } else if k == 0 {
                f.th[key] = Threshold::KEEP_NONE;
            } else {
                f.ks[key] = k;
                f.active[key] = true;
            }
        }
        // One tensor: a single pass collecting a sampled band around each threshold replaces
        // the histogram passes (see `select::band_of_sample`); keys whose band misses fall
        // through to them. Measured on the 1.1B benchmark: the scatter of the high-bit
        // histogram was the largest cost of the selection.
        let one_job = q.items.first().is_some_and(|first| q.items.iter().all(|it| it.job == first.job));
        if one_job && f.active.iter().any(|&a| a) {
            self.band_select(q, &mut f)?;
        }
        if f.active.iter().any(|&a| a) {
            self.histogram_select(q, &mut f)?;
        }
        let Found { th, eq_counts, .. } = f;
        if !th.iter().any(|t| t.needs_tie_ranks()) {
            return Ok(Selection { th, ..Default::default() });
        }
        let mut running = vec![0u64; nkeys];
        let mut eq_before = Vec::with_capacity(q.items.len());
        for c in eq_counts {
            eq_before.push(running.clone());
            for k in 0..nkeys {
                running[k] += c[k];
            }
        }
        Ok(Selection { th, eq_before, outlier_key: Vec::new() })
    }

    /// Band selection for the active keys of a one-job selection: a band per key from a
    /// sample, one pass collecting each item's band members, then the exact threshold inside
    /// the band. Resolves the keys whose band holds it.
    fn band_select(&self, q: &Query<'_, '_>, f: &mut Found) -> Result<()> {
        let Query { items, data, targets, spec, .. } = *q;
        let Found { ks, active, th, eq_counts } = f;
        let job = &q.jobs[items[0].job];
        let nkeys = spec.len();
        let tg: Vec<(usize, usize)> = targets(&items[0]).into_iter().filter(|&(_, k)| active[k]).collect();
        let runs = select::sample_runs(job.numel as usize);
        let mut bands = vec![(0u32, u32::MAX); nkeys];
        let mut tg_band = Vec::with_capacity(tg.len());
        // The members of every accepted key are held at once (4 bytes each), plus one key's
        // copy while its threshold is picked: together within the list allowance.
        let (mut held, mut largest) = (0u64, 0u64);
        for &(slot, key) in &tg {
            let mut sample = self.sample(job, slot, data, &runs)?;
            let sampled = sample.len().max(1) as u64;
            let (lo, hi) = select::band_of_sample(&mut sample, ks[key], job.numel);
            // The band's members are kept in lists (and copied once to pick the threshold):
            // when the sample says they would not fit the list allowance, the histogram passes
            // (bounded memory) select this key instead.
            let members = if sample.is_empty() { job.numel } else { sample.iter().filter(|&&b| b >= lo && b <= hi).count() as u64 * job.numel / sampled };
            if (held + members + largest.max(members)) * 4 <= self.list_bytes {
                held += members;
                largest = largest.max(members);
                bands[key] = (lo, hi);
                tg_band.push((slot, key));
            }
        }
        let tg = tg_band;
        if tg.is_empty() {
            return Ok(());
        }
        let parts: Vec<Vec<(u64, Vec<u32>)>> = items
            .par_iter()
            .map(|it| {
                self.with_inputs(job, it, data, |inputs| {
                    let mut p = vec![(0u64, Vec::new()); nkeys];
                    for &(slot, key) in &tg {
                        let (lo, hi) = bands[key];
                        p[key].0 = select::band_collect(inputs[slot], lo, hi, &mut p[key].1);
                    }
                    p
                })
            })
            .collect::<Result<_>>()?;
        for &(_, key) in &tg {
            let above = parts.iter().map(|p| p[key].0).sum();
            let lists: Vec<&[u32]> = parts.iter().map(|p| p[key].1.as_slice()).collect();
            let Some(mut t) = select::pick_in_band(&lists, above, ks[key]) else { continue };
            if spec[key].is_some_and(|sk| sk.all_ties) {
                t.keep_eq = t.eq_total;
            }
            if t.needs_tie_ranks() {
                for (l, counts) in lists.iter().zip(eq_counts.iter_mut()) {
                    counts[key] = l.iter().filter(|&&b| b == t.bits).count() as u64;
                }
            }
            th[key] = t;
            active[key] = false;
        }
        Ok(())
    }

    /// The bit patterns of `|input slot|` (its delta when the method uses deltas) at the
    /// sampled runs.
    fn sample(&self, job: &Job<'_>, slot: usize, data: Data<'_>, runs: &[usize]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(runs.len() * select::SAMPLE_RUN);
        let mut run = [0f32; select::SAMPLE_RUN];
        let mut base = [0f32; select::SAMPLE_RUN];
        // Each sampled run faults in a window of pages around it (64 KiB). A small tensor's
        // pages stay mapped for the passes that read them next (released with the tensor); a
        // large one's are unmapped every RELEASE_EVERY runs (one `madvise` over their span,
        // so at most that many windows are mapped at once), or a budget far below the
        // tensor's size would be exceeded.
        const RELEASE_EVERY: usize = 32;
        let release = !self.keeps_mapped(job) && matches!(data, Data::Stream);
        let drop_span = |from: usize, to: usize| {
            for src in job.base.iter().chain(std::iter::once(&job.models[slot])) {
                src.release(from as u64, to - from);
            }
        };
        for (r, &s) in runs.iter().enumerate() {
            if release && r % RELEASE_EVERY == 0 && r > 0 {
                drop_span(runs[r - RELEASE_EVERY], s);
            }
            let values: &[f32] = match data {
                Data::Cached(c) => &c.inputs[slot][s..s + select::SAMPLE_RUN],
                Data::Stream => {
                    let src = job.models[slot];
                    match job.base.filter(|_| self.method.uses_deltas()) {
                        Some(b) => {
                            b.read(s as u64, &mut base)?;
                            src.read_sub(s as u64, &mut run, &base)?;
                        }
                        None => src.read(s as u64, &mut run)?,
                    }
                    &run
                }
            };
            out.extend(values.iter().map(|&x| select::abs_bits(x)));
        }
        if release && !runs.is_empty() {
            let from = runs[(runs.len() - 1) / RELEASE_EVERY * RELEASE_EVERY];
            drop_span(from, runs[runs.len() - 1] + select::SAMPLE_RUN);
        }
        Ok(out)
    }

    /// One pass over a selection's items adding, per active key, its inputs into a histogram of
    /// `bins` bins with `add(values, key, histogram)`; summed over items (integer counts, so
    /// the order does not matter).
    fn histograms(
        &self,
        q: &Query<'_, '_>,
        active: &[bool],
        bins: usize,
        add: &HistogramAdd<'_>,
    ) -> Result<Vec<Vec<u64>>> {
        let zero = || vec![Vec::<u64>::new(); q.spec.len()];
        q.items
            .par_iter()
            .try_fold(zero, |mut acc, it| -> Result<Vec<Vec<u64>>> {
                let tg = (q.targets)(it);
                self.with_inputs(&q.jobs[it.job], it, q.data, |inputs| {
                    for &(slot, key) in &tg {
                        if active[key] {
                            if acc[key].is_empty() {
                                acc[key] = vec![0u64; bins];
                            }
                            add(inputs[slot], key, &mut acc[key]);
                        }
                    }
                })?;
                Ok(acc)
            })
            .try_reduce(zero, |a, b| Ok(add_hists(a, b)))
    }

    /// The exact radix select for the active keys: a high-bit histogram pass, then the
    /// winning high bin's low bits (candidate lists, or a low-bit histogram pass), then, when
    /// needed, the per-item counts of threshold-equal entries. Resolves every active key.
    fn histogram_select(&self, q: &Query<'_, '_>, f: &mut Found) -> Result<()> {
        let Query { jobs, items, data, targets, spec } = *q;
        let Found { ks, active, th, eq_counts } = f;
        let nkeys = spec.len();
        // Pass A: high-bit histograms.
        let high = self.histograms(q, active, HIGH_BINS, &|values, _, hist| select::hist_high(values, hist))?;
        let mut picks = vec![(0u32, 0u64); nkeys];
        for key in 0..nkeys {
            if active[key] {
                picks[key] = select::pick_high(&high[key], ks[key]);
            }
        }
        // Entries in the winning high bins, summed over keys: what pass B will find.
        let cand: u64 = (0..nkeys).filter(|&k| active[k]).map(|k| high[k][picks[k].0 as usize]).sum();
        drop(high);
        // Pass B with candidate lists: each item keeps, in index order, the low 16 bits of its
        // entries in the winning high bin. The low histograms and the per-item counts of
        // threshold-equal entries (the tie ranks) both come from these lists, so the tie-counting
        // pass C (one more decode of every input, or one more sweep of the cached tensor) is not
        // needed. The lists hold `cand` u16s; they are used when that fits in half the cache
        // allowance, else the histogram pass B and pass C below run. Measured (perf, one thread,
        // one TinyLlama layer): pass C was 5-7% of the CPU time.
        let lists: Option<Vec<Vec<Vec<u16>>>> = if cand.saturating_mul(2) <= self.list_bytes {
            Some(
                items
                    .par_iter()
                    .map(|it| -> Result<Vec<Vec<u16>>> {
                        let tg = targets(it);
                        self.with_inputs(&jobs[it.job], it, data, |inputs| {
                            let mut l = vec![Vec::new(); nkeys];
                            for &(slot, key) in &tg {
                                if active[key] {
                                    select::collect_low(inputs[slot], picks[key].0, &mut l[key]);
                                }
                            }
                            l
                        })
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            None
        };
        let low: Vec<Vec<u64>> = match &lists {
            Some(lists) => {
                let mut low = vec![Vec::<u64>::new(); nkeys];
                for key in (0..nkeys).filter(|&k| active[k]) {
                    let h = &mut low[key];
                    h.resize(LOW_BINS, 0);
                    for l in lists {
                        for &v in &l[key] {
                            h[v as usize] += 1;
                        }
                    }
                }
                low
            }
            // Pass B: low-bit histograms inside the winning high bin.
            None => self.histograms(q, active, LOW_BINS, &|values, key, hist| select::hist_low(values, picks[key].0, hist))?,
        };
        for key in 0..nkeys {
            if active[key] {
                let mut t = select::pick_low(&low[key], picks[key].0, picks[key].1, ks[key]);
                if spec[key].is_some_and(|sk| sk.all_ties) {
                    t.keep_eq = t.eq_total; // |x| >= kth value: every tie kept
                }
                th[key] = t;
            }
        }
        // Pass C: tie ranks, only when some but not all threshold-equal entries are kept.
        let need: Vec<bool> = (0..nkeys).map(|k| active[k] && th[k].needs_tie_ranks()).collect();
        if !need.iter().any(|&x| x) {
            return Ok(());
        }
        match &lists {
            Some(lists) => {
                for (l, counts) in lists.iter().zip(eq_counts.iter_mut()) {
                    for key in (0..nkeys).filter(|&k| need[k]) {
                        let low_bits = (th[key].bits & 0xffff) as u16;
                        counts[key] = l[key].iter().filter(|&&v| v == low_bits).count() as u64;
                    }
                }
            }
            None => {
                let per_item: Vec<Vec<u64>> = items
                    .par_iter()
                    .map(|it| -> Result<Vec<u64>> {
                        let tg = targets(it);
                        self.with_inputs(&jobs[it.job], it, data, |inputs| {
                            let mut c = vec![0u64; nkeys];
                            for &(slot, key) in &tg {
                                if need[key] {
                                    c[key] += select::count_eq(inputs[slot], th[key].bits);
                                }
                            }
                            c
                        })
                    })
                    .collect::<Result<_>>()?;
                for (c, counts) in per_item.iter().zip(eq_counts.iter_mut()) {
                    for key in (0..nkeys).filter(|&k| need[k]) {
                        counts[key] = c[key];
                    }
                }
            }
        }
        Ok(())
    }

    /// Trims one model slot's values of item `item` (index within the tensor; `global`: the
    /// whole-model selection and the item's offset in it).
    fn trim_slot(&self, job: &Job<'_>, slot: usize, values: &mut [f32], tsel: &Selection, item: usize, global: Option<(&Selection, usize)>) {
        let Some(trim) = job.recipe.trim[slot] else { return };
        match trim.scope {
            TrimScope::Tensor => {
                let (th, eq) = tsel.cut(slot, item);
                match tsel.outlier_key.get(slot).copied().flatten() {
                    Some(ok) => {
                        let (drop, drop_eq) = tsel.cut(ok, item);
                        select::apply_band(values, &th, eq, &drop, drop_eq);
                    }
                    None => select::apply_trim(values, &th, eq),
                }
            }
            TrimScope::Model => {
                if let Some((g, off)) = global {
                    let (th, eq) = g.cut(job.model_ids[slot], off + item);
                    select::apply_trim(values, &th, eq);
                }
            }
        }
    }

    /// Trims one item's inputs in place.
    fn trim(&self, job: &Job<'_>, inputs: &mut [&mut [f32]], tensor_sel: &Selection, item: usize, global: Option<(&Selection, usize)>) {
        for (slot, values) in inputs.iter_mut().enumerate() {
            self.trim_slot(job, slot, values, tensor_sel, item, global);
        }
    }

    /// The tensor-scope selection of one job: key `slot` for each slot's kept entries, then one
    /// key per slot that drops outliers.
    fn tensor_selection(&self, jobs: &[Job<'_>], ji: usize, items: &[Item], data: Data<'_>) -> Result<Selection> {
        let job = &jobs[ji];
        let m = job.recipe.trim.len();
        let tensor_trims: Vec<Option<Trim>> = job.recipe.trim.iter().map(|t| t.filter(|t| t.scope == TrimScope::Tensor)).collect();
        let mut spec: Vec<Option<SelKey>> = tensor_trims.iter().map(|t| t.map(|t| SelKey::keep(&t, job.numel))).collect();
        if spec.iter().all(|k| k.is_none()) {
            return Ok(Selection { th: vec![Threshold::KEEP_ALL; m], ..Default::default() });
        }
        let mut outlier_key = vec![None; m];
        let mut key_slot: Vec<usize> = (0..m).collect();
        for (slot, t) in tensor_trims.iter().enumerate() {
            if let Some(ok) = t.and_then(|t| SelKey::outliers(&t, job.numel)) {
                outlier_key[slot] = Some(spec.len());
                key_slot.push(slot);
                spec.push(Some(ok));
            }
        }
        let targets = |_: &Item| -> Targets { key_slot.iter().enumerate().map(|(key, &slot)| (slot, key)).collect() };
        let mut sel = self.select(&Query { jobs, items, data, targets: &targets, spec: &spec })?;
        sel.outlier_key = outlier_key;
        Ok(sel)
    }

    /// Runs `f` on each item's trimmed inputs (and base), in parallel; results in item order.
    /// A cache not yet trimmed is trimmed here, item by item, just before `f` reads it (one
    /// sweep over memory instead of two); `f` must then be the only pass after selection.
    fn for_trimmed<R: Send>(
        &self,
        job: &Job<'_>,
        items: &[Item],
        cache: Option<&mut Cache>,
        tsel: &Selection,
        global: Option<(&Selection, usize)>,
        f: &(dyn Fn(&Item, &Chunk<'_>) -> Result<R> + Sync),
    ) -> Result<Vec<R>> {
        let cache_ptrs: Option<(Vec<SendPtr>, bool)> =
            cache.map(|c| (c.inputs.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect(), c.trimmed));
        items
            .par_iter()
            .enumerate()
            .map(|(ii, it)| -> Result<R> {
                match &cache_ptrs {
                    Some((ptrs, trimmed)) => {
                        let s = it.start as usize;
                        // SAFETY: items are disjoint ranges of the cached vectors, which the
                        // `&mut Cache` borrow keeps alive and unaliased for this loop.
                        let mut muts: Vec<&mut [f32]> =
                            unsafe { ptrs.iter().map(|p| std::slice::from_raw_parts_mut(p.0.add(s), it.len)).collect() };
                        if !*trimmed {
                            self.trim(job, &mut muts, tsel, ii, global);
                        }
                        let mut base = job.base.map(|_| self.pool.take(it.len));
                        if let (Some(src), Some(b)) = (job.base, base.as_deref_mut()) {
                            src.read(it.start, b)?;
                            src.release(it.start, it.len);
                        }
                        let views: Vec<&[f32]> = muts.iter().map(|v| &**v).collect();
                        let chunk = Chunk { tensor: job.name, start: it.start, base: base.as_deref(), inputs: &views };
                        let r = f(it, &chunk);
                        if let Some(b) = base {
                            self.pool.put(b);
                        }
                        r
                    }
                    None => {
                        let mut bufs = self.gather(job, it.start, it.len)?;
                        {
                            let mut muts: Vec<&mut [f32]> = bufs.inputs.iter_mut().map(|v| v.as_mut_slice()).collect();
                            self.trim(job, &mut muts, tsel, ii, global);
                        }
                        let views: Vec<&[f32]> = bufs.inputs.iter().map(|v| v.as_slice()).collect();
                        let chunk = Chunk { tensor: job.name, start: it.start, base: bufs.base.as_deref(), inputs: &views };
                        let r = f(it, &chunk);
                        drop(views);
                        self.recycle(bufs);
                        r
                    }
                }
            })
            .collect()
    }

    /// Trims a cached tensor in place, chunk by chunk (same chunks as streaming).
    fn trim_cache(&self, job: &Job<'_>, chunk: usize, cache: &mut Cache, tsel: &Selection, global: Option<(&Selection, usize)>) {
        for (slot, values) in cache.inputs.iter_mut().enumerate() {
            values.par_chunks_mut(chunk).enumerate().for_each(|(ii, c)| self.trim_slot(job, slot, c, tsel, ii, global));
        }
        cache.trimmed = true;
    }

    /// Per-block partial reductions of one job's items, in block order.
    fn block_reduce(
        &self,
        job: &Job<'_>,
        items: &[Item],
        cache: Option<&mut Cache>,
        tsel: &Selection,
        global: Option<(&Selection, usize)>,
        n: usize,
        is_global: bool,
    ) -> Result<Vec<f64>> {
        let block = self.layout(job).0;
        let per_item = self.for_trimmed(job, items, cache, tsel, global, &|_, c| {
            let mut parts = Vec::new();
            let len = c.len();
            let mut s = 0usize;
            while s < len {
                let e = (s + block).min(len);
                let views: Vec<&[f32]> = c.inputs.iter().map(|v| &v[s..e]).collect();
                let b = Chunk { tensor: c.tensor, start: c.start + s as u64, base: c.base.map(|b| &b[s..e]), inputs: &views };
                let mut acc = vec![0f64; n];
                if is_global {
                    self.method.reduce_global(job.recipe, &b, &mut acc);
                } else {
                    self.method.reduce(job.recipe, &b, &mut acc);
                }
                parts.push(acc);
                s = e;
            }
            Ok(parts)
        })?;
        let mut total = vec![0f64; n];
        for p in per_item.into_iter().flatten() {
            for (a, b) in total.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok(total)
    }

    /// Runs every job: global statistics first when needed, then each tensor in order.
    /// `done(job)` is called after each job is written; an error from it stops the run.
    pub fn run(&self, jobs: &[Job<'_>], n_models: usize, sink: &dyn Sink, done: &(dyn Fn(usize) -> Result<()> + Sync)) -> Result<()> {
        let per_job: Vec<Vec<Item>> = jobs.iter().enumerate().map(|(i, j)| items_of(i, j.numel, self.layout(j).1)).collect();
        let mut offsets = Vec::with_capacity(jobs.len());
        let mut all_items = Vec::new();
        for items in &per_job {
            offsets.push(all_items.len());
            all_items.extend_from_slice(items);
        }

        // Whole-model trims: one selection per model over every tensor it takes part in.
        let any_global = jobs.iter().any(|j| j.recipe.trim.iter().flatten().any(|t| t.scope == TrimScope::Model));
        let global_sel = if any_global {
            let mut totals: Vec<(u64, Option<Trim>)> = vec![(0, None); n_models];
            for j in jobs {
                for (slot, t) in j.recipe.trim.iter().enumerate() {
                    if let Some(t) = t.filter(|t| t.scope == TrimScope::Model) {
                        let e = &mut totals[j.model_ids[slot]];
                        e.0 += j.numel;
                        e.1.get_or_insert(t);
                    }
                }
            }
            let targets = |it: &Item| -> Targets {
                let j = &jobs[it.job];
                j.recipe
                    .trim
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.is_some_and(|t| t.scope == TrimScope::Model))
                    .map(|(s, _)| (s, j.model_ids[s]))
                    .collect()
            };
            let spec: Vec<Option<SelKey>> = totals.iter().map(|(n, t)| t.map(|t| SelKey::keep(&t, *n))).collect();
            Some(self.select(&Query { jobs, items: &all_items, data: Data::Stream, targets: &targets, spec: &spec })?)
        } else {
            None
        };

        // Global reductions (after trimming), on fixed blocks summed in order.
        let ng = self.method.global_reductions();
        let mut global_acc = vec![0f64; ng];
        if ng > 0 {
            for (ji, job) in jobs.iter().enumerate() {
                let items = &per_job[ji];
                let tsel = self.tensor_selection(jobs, ji, items, Data::Stream)?;
                let g = global_sel.as_ref().map(|g| (g, offsets[ji]));
                let part = self.block_reduce(job, items, None, &tsel, g, ng, true)?;
                for (a, b) in global_acc.iter_mut().zip(part) {
                    *a += b;
                }
            }
        }

        for (ji, job) in jobs.iter().enumerate() {
            let items = &per_job[ji];
            let gref = global_sel.as_ref().map(|g| (g, offsets[ji]));
            // Decoding again from the mapped inputs (2 bytes an element for bf16, into buffers
            // that stay in cache) is cheaper than keeping a tensor's f32 deltas in memory (4
            // bytes written and read back per pass), unless several passes read trimmed data:
            // only then is the tensor cached. Measured on the 1.1B TIES benchmark (band
            // selection: two passes): caching every tensor cost 10% more CPU time.
            let decoded = job.numel * job.models.len() as u64 * 4;
            let mut cache = if job.recipe.reductions > 0 && decoded <= self.cache_bytes {
                Some(self.load_cache(job, items)?)
            } else {
                None
            };
            let tsel = self.tensor_selection(jobs, ji, items, cache.as_ref().map_or(Data::Stream, Data::Cached))?;
            let tensor_acc = if job.recipe.reductions > 0 {
                // Two passes read the trimmed data: trim the cache once up front.
                if let Some(c) = cache.as_mut() {
                    self.trim_cache(job, self.layout(job).1, c, &tsel, gref);
                }
                self.block_reduce(job, items, cache.as_mut(), &tsel, gref, job.recipe.reductions, false)?
            } else {
                Vec::new()
            };
            let stats = Stats { tensor: &tensor_acc, global: &global_acc };
            self.for_trimmed(job, items, cache.as_mut(), &tsel, gref, &|it, c| {
                let mut out = self.pool.take(it.len);
                self.method.apply(job.recipe, &stats, c, &mut out);
                let r = sink.write(it.job, it.start, &out);
                self.pool.put(out);
                r
            })?;
            if let Some(c) = cache {
                for v in c.inputs {
                    self.cache_pool.put(v);
                }
            }
            // Drop whatever fault-around mapped back in while this tensor was read.
            for src in job.base.iter().chain(job.models.iter()) {
                src.release(0, job.numel as usize);
            }
            done(ji)?;
        }
        Ok(())
    }
}

fn add_hists(mut a: Vec<Vec<u64>>, b: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    for (x, y) in a.iter_mut().zip(b) {
        if x.is_empty() {
            *x = y;
        } else if !y.is_empty() {
            for (p, q) in x.iter_mut().zip(y) {
                *p += q;
            }
        }
    }
    a
}

/// Elements per chunk for a budget: the buffers in flight per thread are the decoded inputs, the
/// base, the output (f32 each) and its encoded copy, with a factor 2 of slack for the mapped
/// windows and the allocator; whole blocks, between 1 and 16 blocks.
pub fn chunk_for_budget(budget: u64, threads: usize, n_inputs: usize) -> usize {
    let per_elem = (n_inputs as u64 + 3) * 4 * 2 * threads.max(1) as u64;
    let blocks = (budget / per_elem) as usize / BLOCK;
    blocks.clamp(1, MAX_CHUNK / BLOCK) * BLOCK
}

/// Bytes of decoded tensor kept in memory across passes: a quarter of the budget. The rest
/// covers the chunk buffers of streamed tensors and the output path.
pub fn cache_bytes_for(budget: u64) -> u64 {
    budget / 4
}

/// Writes f32 values into the output shards, encoded to the tensor's dtype.
struct FileSink<'a> {
    out: &'a Output,
    /// Per job: (output tensor index, dtype).
    targets: Vec<(usize, Dtype)>,
    /// Encoded-byte buffers reused across chunks: a fresh zeroed vector per chunk cost a
    /// memset of every output byte (~3% of the CPU time, perf on a TinyLlama layer); `encode`
    /// overwrites every byte, so a reused buffer needs no clearing.
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Sink for FileSink<'_> {
    fn write(&self, job: usize, start: u64, values: &[f32]) -> Result<()> {
        let (ti, dt) = self.targets[job];
        let eb = elem_bytes(dt).unwrap_or(4);
        let mut bytes = self.bufs.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
        bytes.resize(values.len() * eb, 0);
        encode(dt, values, &mut bytes);
        let r = self.out.write_at(ti, start * eb as u64, &bytes);
        if let Ok(mut p) = self.bufs.lock() {
            if p.len() < 64 {
                p.push(bytes);
            }
        }
        r
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The recipe written beside the weights (JSON-compatible YAML: flow values are JSON).
pub fn recipe_yaml(spec: &MergeSpec, method: &dyn Method) -> String {
    let mut y = String::new();
    y.push_str("# umerge recipe: the merge that produced these weights\n");
    y.push_str(&format!("umerge_version: {}\n", yaml_str(crate::VERSION)));
    y.push_str(&format!("method: {}\n", yaml_str(&spec.method)));
    y.push_str(&format!("description: {}\n", yaml_str(&method.describe())));
    match &spec.base {
        Some(b) => y.push_str(&format!("base: {}\n", yaml_str(&abs_display(b)))),
        None => y.push_str("base: null\n"),
    }
    y.push_str("models:\n");
    for m in &spec.models {
        y.push_str(&format!("  - path: {}\n", yaml_str(&abs_display(&m.path))));
        if !m.params.is_empty() {
            y.push_str(&format!("    params: {}\n", serde_json::to_string(&m.params).unwrap_or_default()));
        }
    }
    y.push_str(&format!("params: {}\n", serde_json::to_string(&spec.params).unwrap_or_default()));
    y.push_str(&format!(
        "out_dtype: {}\n",
        spec.out_dtype.as_deref().map(yaml_str).unwrap_or_else(|| "null".into())
    ));
    y.push_str(&format!("strict: {}\n", spec.strict));
    y.push_str(&format!("allow_nonfinite: {}\n", spec.allow_nonfinite));
    y
}

fn abs_display(p: &std::path::Path) -> String {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

/// Validates the spec's options that do not need the inputs.
fn check_spec(spec: &MergeSpec, method: &dyn Method) -> Result<()> {
    if spec.models.is_empty() {
        return Err(Error::Spec("no input models given".into()));
    }
    if method.base_use() == BaseUse::Required && spec.base.is_none() {
        return Err(Error::Spec(format!(
            "{} needs a base model (--base DIR): it merges task vectors, model - base, so it must know the weights the models were fine-tuned from. LoRA adapter directories carry their task vectors themselves and are merged without --base.",
            method.name()
        )));
    }
    if spec.threads == Some(0) {
        return Err(Error::Spec("threads must be at least 1".into()));
    }
    if let Some(b) = spec.memory_budget {
        if b < 16 << 20 {
            return Err(Error::Spec(format!("memory budget {b} bytes is below the 16 MiB minimum")));
        }
    }
    if spec.max_shard_size == Some(0) {
        return Err(Error::Spec("max shard size must be positive".into()));
    }
    Ok(())
}

/// Reads, plans, executes and writes a whole merge (see [`crate::merge`]).
pub fn run_merge(spec: &MergeSpec, progress: Option<Progress<'_>>) -> Result<Report> {
    let t0 = Instant::now();
    let params = Params { global: spec.params.clone(), models: spec.models.iter().map(|m| m.params.clone()).collect() };
    let method = methods::build(&spec.method, &params)?;
    check_spec(spec, method.as_ref())?;
    let out_dtype = match &spec.out_dtype {
        None => None,
        Some(s) => Some(parse_out_dtype(s).ok_or_else(|| Error::Spec(format!("unknown output dtype {s:?} (use bf16, f16 or f32)")))?),
    };

    // Open every input, collecting all failures.
    let mut errors = Vec::new();
    let base = match &spec.base {
        Some(p) => Checkpoint::open(p).map_err(|e| errors.push(e)).ok(),
        None => None,
    };
    let mut models = Vec::new();
    for m in &spec.models {
        match Checkpoint::open(&m.path) {
            Ok(c) => models.push(c),
            Err(e) => errors.push(e),
        }
    }
    let mut io: Vec<(std::path::PathBuf, std::path::PathBuf)> = Vec::new();
    if let Some(b) = &spec.base {
        io.push((b.clone(), base.as_ref().map(|c| c.dir.clone()).unwrap_or_else(|| b.clone())));
    }
    for (i, m) in spec.models.iter().enumerate() {
        io.push((m.path.clone(), models.get(i).map(|c| c.dir.clone()).unwrap_or_else(|| m.path.clone())));
    }
    let target = match write::check_target(&spec.out, &io, spec.overwrite) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if let Some(e) = Error::from_many(errors) {
        return Err(e);
    }
    let target = target.ok_or_else(|| Error::Internal("target missing".into()))?;
    let inputs = Inputs { base, models, zero_base: false };
    let plan = plan::plan(method.as_ref(), &inputs, &params, &PlanOptions { strict: spec.strict, out_dtype })?;

    let out_tensors: Vec<OutTensor> =
        plan.tensors.iter().map(|t| OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let layout = write::layout(&out_tensors, spec.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE));
    let out = Output::create(&target, layout)?;
    let mut plan_warnings = out.notes().to_vec();

    let threads = spec.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = pool(Some(threads))?;
    let chunk = chunk_for_budget(spec.memory_budget.unwrap_or(DEFAULT_MEMORY_BUDGET), threads, inputs.models.len() + 1);
    let check_finite = !spec.allow_nonfinite;
    let budget = spec.memory_budget.unwrap_or(DEFAULT_MEMORY_BUDGET);

    // Sources for every merge job.
    let total_tensors = plan.tensors.len() as u64;
    let total_bytes: u64 = plan.tensors.iter().map(|t| t.in_bytes).sum();
    let done_tensors = std::sync::atomic::AtomicU64::new(0);
    let done_bytes = std::sync::atomic::AtomicU64::new(0);
    let tick = |bytes: u64| -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let t = done_tensors.fetch_add(1, Relaxed) + 1;
        let b = done_bytes.fetch_add(bytes, Relaxed) + bytes;
        match progress {
            Some(p) if !p(t, total_tensors, b, total_bytes) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    };


    // The shards are hashed by a thread that follows the tensors as they are written.
    let frontier = Frontier::new(plan.tensors.len());
    let (merged, digests) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| frontier.hash_shards(&out));
        let stop = frontier.stop_on_drop();
        let merged = merge_tensors(&plan, &inputs, &out, method.as_ref(), &pool, chunk, budget, check_finite, &frontier, &tick);
        drop(stop);
        (merged, hasher.join().unwrap_or_default())
    });
    merged?;

    let bytes_written = out.bytes();
    let shards = out.layout.shards.len();
    let side_src = inputs.base.as_ref().or(inputs.models.first()).map(|c| c.dir.clone());
    let recipe = recipe_yaml(spec, method.as_ref());
    out.finish(&out_tensors, side_src.as_deref(), out_dtype.or(plan.float_dtype), &recipe, &digests)?;
    Ok(Report {
        method: method.describe(),
        output: target,
        tensors: plan.tensors.len(),
        shards,
        bytes_read: total_bytes,
        bytes_written,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        threads,
        chunk_elements: chunk,
        warnings: {
            plan_warnings.extend(plan.warnings);
            plan_warnings
        },
    })
}

/// Writes every output tensor of `plan` into `out`: copies first (sequential, small), then the
/// merges; each tensor is marked on `frontier` and counted by `tick` once written.
#[allow(clippy::too_many_arguments)]
fn merge_tensors(
    plan: &plan::Plan,
    inputs: &Inputs,
    out: &Output,
    method: &dyn Method,
    pool: &Pool,
    chunk: usize,
    budget: u64,
    check_finite: bool,
    frontier: &Frontier,
    tick: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Copy(src) = &t.action {
            copy_tensor(inputs, src, t.dtype, &t.name, ti, out, check_finite && is_float(t.dtype))?;
            frontier.mark(ti);
            tick(t.in_bytes)?;
        }
    }

    let mut srcs: Vec<(Option<Box<dyn Source + '_>>, Vec<Box<dyn Source + '_>>)> = Vec::new();
    let mut merge_idx = Vec::new();
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Merge { base, models, .. } = &t.action {
            let b = base.as_ref().map(|s| make_src(inputs, s, &t.name, check_finite));
            let ms = models.iter().map(|(_, s)| make_src(inputs, s, &t.name, check_finite)).collect();
            srcs.push((b, ms));
            merge_idx.push(ti);
        }
    }
    let mut jobs = Vec::with_capacity(merge_idx.len());
    let mut targets = Vec::with_capacity(merge_idx.len());
    for (k, &ti) in merge_idx.iter().enumerate() {
        let t = &plan.tensors[ti];
        let Action::Merge { models, recipe, .. } = &t.action else { continue };
        jobs.push(Job {
            name: &t.name,
            numel: t.numel(),
            base: srcs[k].0.as_deref(),
            models: srcs[k].1.iter().map(|b| b.as_ref()).collect(),
            model_ids: models.iter().map(|(i, _)| *i).collect(),
            recipe,
        });
        targets.push((ti, t.dtype));
    }
    let sink = FileSink { out, targets, bufs: Default::default() };
    let engine = Engine::new(method, chunk, cache_bytes_for(budget));
    let done = |j: usize| {
        let t = &plan.tensors[merge_idx[j]];
        out.start_writeback(merge_idx[j], t.numel() * elem_bytes(t.dtype).unwrap_or(0) as u64);
        frontier.mark(merge_idx[j]);
        tick(t.in_bytes)
    };
    pool.install(|| engine.run(&jobs, inputs.models.len(), &sink, &done))
}


fn make_src<'a>(inputs: &'a Inputs, s: &'a SrcRef, name: &'a str, check_finite: bool) -> Box<dyn Source + 'a> {
    match (s.input, inputs.get(s.input), s.info.as_ref()) {
        (InputId::Zeros, _, _) | (_, None, _) | (_, _, None) => Box::new(ZeroSource),
        (_, Some(ck), Some(info)) => Box::new(MappedSource::new(ck, info, s.crop_cols, name, check_finite)),
    }
}

/// Copies one tensor: raw bytes when the dtype is unchanged, else decoded and re-encoded.
fn copy_tensor(inputs: &Inputs, src: &SrcRef, out_dtype: Dtype, name: &str, ti: usize, out: &Output, check_finite: bool) -> Result<()> {
    let (Some(ck), Some(info)) = (inputs.get(src.input), src.info.as_ref()) else {
        return Err(Error::Internal(format!("copy source for {name} missing")));
    };
    copy_tensor_from(ck, info, out_dtype, name, ti, out, check_finite)
}

/// Copies tensor `info` of checkpoint `ck` into output tensor `ti`: raw bytes when the dtype is
/// kept (and no NaN/Inf check is asked of a float tensor), else decoded and re-encoded in steps
/// of 8 MiB so memory stays bounded. Shared by the merge executor and `fold`.
pub(crate) fn copy_tensor_from(ck: &Checkpoint, info: &TensorInfo, out_dtype: Dtype, name: &str, ti: usize, out: &Output, check_finite: bool) -> Result<()> {
    const STEP: usize = 8 << 20;
    if info.dtype == out_dtype && !(check_finite && is_float(info.dtype)) {
        let total = info.end - info.start;
        let mut off = 0usize;
        while off < total {
            let n = STEP.min(total - off);
            out.write_at(ti, off as u64, ck.bytes(info.shard, info.start + off, n)?)?;
            ck.release(info.shard, info.start + off, n);
            off += n;
        }
        return Ok(());
    }
    let s = MappedSource::new(ck, info, None, name, check_finite);
    let eb = elem_bytes(out_dtype).unwrap_or(4);
    let n = info.numel();
    let step = (STEP / 4) as u64;
    let mut start = 0u64;
    let mut vals = Vec::new();
    let mut bytes = Vec::new();
    while start < n {
        let len = step.min(n - start) as usize;
        vals.resize(len, 0f32);
        s.read(start, &mut vals)?;
        s.release(start, len);
        bytes.resize(len * eb, 0u8);
        encode(out_dtype, &vals, &mut bytes);
        out.write_at(ti, start * eb as u64, &bytes)?;
        start += len as u64;
    }
    Ok(())
}

/// A rayon thread pool.
pub type Pool = rayon::ThreadPool;

/// A pool of `threads` workers (default: all cores).
pub fn pool(threads: Option<usize>) -> Result<Pool> {
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err(Error::Spec("threads must be at least 1".into()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))
}

/// Merges in-memory f32 arrays as one tensor named `name` (the `umerge.ops` kernels).
///
/// `base` may be `None` only for methods that do not need one; a trim over the whole model
/// (`paper` preset) then covers exactly this tensor. Runs on the current rayon pool.
pub fn merge_in_memory(
    method_name: &str,
    params: &Params,
    base: Option<&[f32]>,
    models: &[&[f32]],
    name: &str,
    chunk: usize,
    cache_bytes: u64,
) -> Result<Vec<f32>> {
    let method = methods::build(method_name, params)?;
    if models.is_empty() {
        return Err(Error::Spec("no input arrays given".into()));
    }
    let n = models[0].len();
    for (i, m) in models.iter().enumerate() {
        if m.len() != n {
            return Err(Error::Spec(format!("array {} has {} elements but array 1 has {n}", i + 1, m.len())));
        }
    }
    if let Some(b) = base {
        if b.len() != n {
            return Err(Error::Spec(format!("base has {} elements but the models have {n}", b.len())));
        }
    }
    let zero = ZeroSource;
    let base_src: Option<SliceSource<'_>> = base.map(SliceSource);
    let base_ref: Option<&dyn Source> = match (&base_src, method.base_use()) {
        (Some(s), BaseUse::Required | BaseUse::Optional) => Some(s),
        (None, BaseUse::Required) => Some(&zero),
        _ => None,
    };
    let model_srcs: Vec<SliceSource<'_>> = models.iter().map(|m| SliceSource(m)).collect();
    let model_ids: Vec<usize> = (0..models.len()).collect();
    let shape = [n];
    let ctx = methods::TensorCtx {
        name,
        shape: &shape,
        pos: crate::params::TensorPos { name, t: 0.0 },
        params,
        models: &model_ids,
    };
    let recipe = method.plan_tensor(&ctx)?;
    for (i, m) in models.iter().enumerate() {
        if let Some(p) = m.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { tensor: name.into(), index: p as u64, path: format!("<array {}>", i + 1).into() });
        }
    }
    let job = Job {
        name,
        numel: n as u64,
        base: base_ref,
        models: model_srcs.iter().map(|s| s as &dyn Source).collect(),
        model_ids,
        recipe: &recipe,
    };
    let mut out = vec![0f32; n];
    {
        let mut bufs = [out.as_mut_slice()];
        let sink = SliceSink::new(&mut bufs);
        let engine = Engine::new(method.as_ref(), chunk, cache_bytes);
        engine.run(std::slice::from_ref(&job), models.len(), &sink, &|_| Ok(()))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamValue;
    use proptest::prelude::*;

    fn params(density: f64, weights: &[f64], preset: &str) -> Params {
        let mut p = Params::default();
        p.global.insert("density".into(), ParamValue::Number(density));
        p.global.insert("preset".into(), ParamValue::Text(preset.into()));
        p.models = weights
            .iter()
            .map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect())
            .collect();
        p
    }

    /// Naive TIES (mergekit preset) in f64 over sorted indices, for comparison.
    fn naive_mergekit(base: &[f32], models: &[Vec<f32>], density: f64, w: &[f64]) -> Vec<f64> {
        let n = base.len();
        let k = (density * n as f64).floor() as usize;
        let trimmed: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                let d: Vec<f32> = m.iter().zip(base).map(|(x, b)| x - b).collect();
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| d[b].abs().partial_cmp(&d[a].abs()).unwrap().then(a.cmp(&b)));
                let mut t = vec![0f64; n];
                for &i in idx.iter().take(k) {
                    t[i] = d[i] as f64;
                }
                t
            })
            .collect();
        (0..n)
            .map(|j| {
                let wd: Vec<f64> = trimmed.iter().zip(w).map(|(t, w)| t[j] * w).collect();
                let s: f64 = wd.iter().sum();
                let maj = if s >= 0.0 { 1.0 } else { -1.0 };
                let mut mixed = 0.0;
                let mut div = 0.0;
                for (x, wi) in wd.iter().zip(w) {
                    if x.signum() == maj && *x != 0.0 {
                        mixed += x;
                        div += wi;
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
                base[j] as f64 + mixed / div
            })
            .collect()
    }

    proptest! {
        #[test]
        fn ties_matches_naive_and_is_chunk_independent(
            n in 1usize..300,
            m in 1usize..4,
            seed in any::<u64>(),
            density in 0.05f64..=1.0,
            chunk in 1usize..50,
        ) {
            // Simple LCG so the data is reproducible from the seed.
            let mut s = seed | 1;
            let mut rnd = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5 };
            let base: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let models: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| rnd()).collect()).collect();
            let w: Vec<f64> = (0..m).map(|i| 0.5 + i as f64 * 0.25).collect();
            let p = params(density, &w, "mergekit");
            let views: Vec<&[f32]> = models.iter().map(|v| v.as_slice()).collect();
            // Streamed in small chunks vs decoded once in one chunk: the same bits.
            let a = merge_in_memory("ties", &p, Some(&base), &views, "t", chunk, 0).unwrap();
            let b = merge_in_memory("ties", &p, Some(&base), &views, "t", 1 << 20, u64::MAX).unwrap();
            prop_assert_eq!(&a, &b);
            for preset in ["peft", "paper"] {
                let p = params(density, &w, preset);
                let a = merge_in_memory("ties", &p, Some(&base), &views, "t", chunk, 0).unwrap();
                let b = merge_in_memory("ties", &p, Some(&base), &views, "t", 1 << 20, u64::MAX).unwrap();
                prop_assert_eq!(&a, &b);
            }
            let r = naive_mergekit(&base, &models, density, &w);
            for j in 0..n {
                prop_assert!((a[j] as f64 - r[j]).abs() <= 1e-5 * (1.0 + r[j].abs()), "j={} {} vs {}", j, a[j], r[j]);
            }
        }
    }

    #[test]
    fn paper_preset_keeps_ties_and_uses_kth_value() {
        // |d| = [1, 2, 2, 3], density 0.5: the paper's threshold is the (4 - 2) = 2nd smallest = 2,
        // and every |d| >= 2 is kept (three entries, ties included).
        let base = [0.0f32; 4];
        let m1 = [1.0f32, 2.0, -2.0, 3.0];
        let p = params(0.5, &[1.0], "paper");
        let out = merge_in_memory("ties", &p, Some(&base), &[&m1], "t", 1, 0).unwrap();
        assert_eq!(out, vec![0.0, 2.0, -2.0, 3.0]);
        // mergekit keeps exactly k = 2: 3 and the first 2 (lowest index).
        let p = params(0.5, &[1.0], "mergekit");
        let out = merge_in_memory("ties", &p, Some(&base), &[&m1], "t", 1, 0).unwrap();
        assert_eq!(out, vec![0.0, 2.0, 0.0, 3.0]);
    }
}
