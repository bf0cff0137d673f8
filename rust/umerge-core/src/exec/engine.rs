//! The engine: runs merge jobs through a method, tensor by tensor: cuts each tensor into
//! items (chunks), gathers their inputs (streamed from the sources, or from a whole-tensor
//! cache), runs the selection, score selection, reduction and apply passes, and writes through
//! a [`Sink`].

use rayon::prelude::*;

use super::buffers::{BufPool, Bufs, SendPtr};
use super::reduce::Reduction;
use super::score::Scored;
use super::trim::Cuts;
use super::{Sink, Source, BLOCK};
use crate::error::Result;
use crate::methods::{Chunk, Method, Stats, TensorRecipe};

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

#[derive(Clone, Copy)]
pub(super) struct Item {
    /// Index of the job in the run.
    pub job: usize,
    /// First element.
    pub start: u64,
    /// Elements.
    pub len: usize,
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

/// A whole tensor decoded in memory (deltas when the method uses them), reused by every pass.
pub(super) struct Cache {
    /// Per model slot: the whole tensor's deltas (or values), f32.
    pub inputs: Vec<Vec<f32>>,
    /// True once trimmed in place.
    pub trimmed: bool,
}

/// Where a pass gets a chunk's inputs from.
#[derive(Clone, Copy)]
pub(super) enum Data<'c> {
    /// Decode from the sources each time.
    Stream,
    /// Slices of a cached tensor.
    Cached(&'c Cache),
}

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
    pub(super) pool: BufPool,
    /// Whole-tensor vectors kept between tensors: reusing them avoids faulting in fresh pages
    /// for every cached tensor (1.5 M page faults on the 1.1B benchmark).
    pub(super) cache_pool: BufPool,
}

impl<'a> Engine<'a> {
    /// An engine running `method` on chunks of `chunk` elements, caching tensors up to
    /// `cache_bytes` of decoded inputs.
    pub fn new(method: &'a dyn Method, chunk: usize, cache_bytes: u64) -> Self {
        Engine {
            method,
            chunk: chunk.max(1),
            cache_bytes,
            list_bytes: cache_bytes / 2,
            pool: BufPool::default(),
            cache_pool: BufPool::default(),
        }
    }

    /// (reduction block, chunk), in elements, for one job: [`BLOCK`] and the engine's chunk, or,
    /// when the recipe needs whole rows, both made whole rows: the block the most rows that fit
    /// in [`BLOCK`] (at least one), the chunk the engine's chunk rounded up to whole blocks. The
    /// block depends only on the tensor, so reductions stay independent of budget and threads.
    pub(super) fn layout(&self, job: &Job<'_>) -> (usize, usize) {
        let row = job.recipe.row as usize;
        if row == 0 {
            return (BLOCK, self.chunk);
        }
        let block = (BLOCK / row).max(1) * row;
        (block, self.chunk.div_ceil(block).max(1) * block)
    }

    /// Decodes one window of every input into the given slices; inputs become deltas
    /// (x - base) when the method uses them.
    pub(super) fn gather_into(&self, job: &Job<'_>, start: u64, base: Option<&mut [f32]>, inputs: &mut [&mut [f32]]) -> Result<()> {
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
    pub(super) fn keeps_mapped(&self, job: &Job<'_>) -> bool {
        let per_elem: u64 = job.base.iter().chain(job.models.iter()).map(|s| s.mapped_bytes_per_elem()).sum();
        job.numel.saturating_mul(per_elem) <= self.cache_bytes
    }

    pub(super) fn gather(&self, job: &Job<'_>, start: u64, len: usize) -> Result<Bufs> {
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

    pub(super) fn recycle(&self, b: Bufs) {
        if let Some(v) = b.base {
            self.pool.put(v);
        }
        for v in b.inputs {
            self.pool.put(v);
        }
    }

    /// Runs `f` on the (untrimmed) inputs of one item.
    pub(super) fn with_inputs<R>(&self, job: &Job<'_>, it: &Item, data: Data<'_>, f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
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
    pub(super) fn load_cache(&self, job: &Job<'_>, items: &[Item]) -> Result<Cache> {
        let n = job.numel as usize;
        let mut inputs: Vec<Vec<f32>> = job.models.iter().map(|_| self.cache_pool.take(n)).collect();
        let ips: Vec<SendPtr> = inputs.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect();
        items.par_iter().try_for_each(|it| -> Result<()> {
            let s = it.start as usize;
            // SAFETY: each item covers a distinct range [s, s + len) of vectors of length n
            // that live until after this loop; no other reference to them exists meanwhile.
            let mut ins: Vec<&mut [f32]> = unsafe { ips.iter().map(|p| std::slice::from_raw_parts_mut(p.0.add(s), it.len)).collect() };
            let mut base = job.base.map(|_| self.pool.take(it.len));
            let r = self.gather_into(job, it.start, base.as_deref_mut(), &mut ins);
            if let Some(b) = base {
                self.pool.put(b);
            }
            r
        })?;
        Ok(Cache { inputs, trimmed: false })
    }

    /// Runs `f` on each item's trimmed inputs (and base), in parallel; results in item order.
    /// `items` are the tensor's items from index `first` on (the trim's tie counts are per item
    /// index). A cache not yet trimmed is trimmed here, item by item, just before `f` reads it
    /// (one sweep over memory instead of two); `f` must then be the only pass after selection.
    pub(super) fn for_trimmed<R: Send>(
        &self,
        job: &Job<'_>,
        items: &[Item],
        first: usize,
        cache: Option<&mut Cache>,
        cuts: &Cuts<'_>,
        f: &(dyn Fn(&Item, &Chunk<'_>) -> Result<R> + Sync),
    ) -> Result<Vec<R>> {
        let cache_ptrs: Option<(Vec<SendPtr>, bool)> =
            cache.map(|c| (c.inputs.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect(), c.trimmed));
        items
            .par_iter()
            .enumerate()
            .map(|(ii, it)| -> Result<R> {
                let ii = first + ii;
                match &cache_ptrs {
                    Some((ptrs, trimmed)) => {
                        let s = it.start as usize;
                        // SAFETY: items are disjoint ranges of the cached vectors, which the
                        // `&mut Cache` borrow keeps alive and unaliased for this loop.
                        let mut muts: Vec<&mut [f32]> =
                            unsafe { ptrs.iter().map(|p| std::slice::from_raw_parts_mut(p.0.add(s), it.len)).collect() };
                        let mut base = job.base.map(|_| self.pool.take(it.len));
                        if let (Some(src), Some(b)) = (job.base, base.as_deref_mut()) {
                            src.read(it.start, b)?;
                            src.release(it.start, it.len);
                        }
                        if !*trimmed {
                            self.trim(job, &mut muts, base.as_deref(), it.start, cuts, ii);
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
                            self.trim(job, &mut muts, bufs.base.as_deref(), it.start, cuts, ii);
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
        let global_sel = self.model_selection(jobs, &all_items, n_models)?;
        // Global reductions (after trimming), on fixed blocks summed in order.
        let global_acc = self.global_reductions(jobs, &per_job, &offsets, global_sel.as_ref())?;

        for (ji, job) in jobs.iter().enumerate() {
            let items = &per_job[ji];
            // Decoding again from the mapped inputs (2 bytes an element for bf16, into buffers
            // that stay in cache) is cheaper than keeping a tensor's f32 deltas in memory (4
            // bytes written and read back per pass), unless several passes read trimmed data:
            // only then is the tensor cached. Measured on the 1.1B TIES benchmark (band
            // selection: two passes): caching every tensor cost 10% more CPU time.
            let decoded = job.numel * job.models.len() as u64 * 4;
            let passes_after_selection = job.recipe.reductions > 0 || job.recipe.score.is_some();
            let mut cache = if passes_after_selection && decoded <= self.cache_bytes { Some(self.load_cache(job, items)?) } else { None };
            let tensor_sel = self.tensor_selection(jobs, ji, items, cache.as_ref().map_or(Data::Stream, Data::Cached))?;
            let mut cuts = Cuts { tensor: &tensor_sel, model: global_sel.as_ref().map(|g| (g, offsets[ji])), score: None };
            if passes_after_selection {
                // Several passes read the trimmed data: trim the cache once up front.
                if let Some(c) = cache.as_mut() {
                    self.trim_cache(job, self.layout(job).1, c, &cuts);
                }
            }
            // The score selection: a cut that trims every input from here on, or ranked scores
            // handed to derive after the sums.
            let (score_cut, ranked) = match &job.recipe.score {
                None => (None, Vec::new()),
                Some(sel) => match self.score_select(job, items, cache.as_ref(), &cuts, sel)? {
                    Scored::Cut(cut) => (Some(cut), Vec::new()),
                    Scored::Values(v) => (None, v),
                },
            };
            if let Some(cut) = &score_cut {
                if let Some(c) = cache.as_mut() {
                    self.score_trim_cache(job, items, c, cut)?;
                }
                cuts.score = Some(cut);
            }
            let tensor_acc = if job.recipe.reductions > 0 || !ranked.is_empty() {
                let mut sums = if job.recipe.reductions > 0 {
                    self.block_reduce(job, items, cache.as_mut(), &cuts, Reduction::Tensor)?
                } else {
                    Vec::new()
                };
                sums.extend(ranked);
                self.method.derive(job.recipe, job.name, sums)?
            } else {
                Vec::new()
            };
            let stats = Stats { tensor: &tensor_acc, global: &global_acc };
            self.for_trimmed(job, items, 0, cache.as_mut(), &cuts, &|it, c| {
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
