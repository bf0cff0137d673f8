//! Executing a plan: chunks within a memory budget, statistics passes then an apply pass, rayon.
//!
//! Work is cut into chunks of whole 64 Ki-element blocks ([`BLOCK`]); the chunk size comes from
//! the memory budget and the thread count, so the buffers in flight (inputs decoded to f32, the
//! output, the mapped windows) stay within the budget. Per tensor:
//!
//! 1. trim selection (`selection`, with the kernels of [`crate::select`]): the exact top-k
//!    threshold of each trimmed input. A selection over one tensor first tries a band: a
//!    stratified sample of its magnitudes gives a band that very probably holds the threshold,
//!    one pass collects the band's members and the exact threshold is picked among them (tie
//!    counts come from the same lists). A key whose band misses, or whose members would not fit
//!    the list allowance, and every selection spanning several tensors, takes the exact radix
//!    select: a high-bit histogram pass, then the winning high bin's low bits (candidate
//!    lists, or a low-bit histogram pass), then, only when some but not all entries equal to
//!    the threshold are kept and no lists were kept, a tie-counting pass. Whole-model trims
//!    (`TrimScope::Model`) run over every tensor before any output is computed.
//! 2. score selection (`score`), when the recipe has a `ScoreSelect`: exact order statistics of
//!    the method's per-element score (a radix select on order-preserving keys), either trimming
//!    every input to the elements whose score is among the k largest or handing the scores at
//!    given ranks to the method's `derive`;
//! 3. reductions (`reduce`), when the method asks for them, on fixed blocks summed in block
//!    order (the blocks' partial sums held for a window of chunks at a time, within the budget),
//!    then the method's `derive` once per tensor.
//! 4. apply (`engine`): decode, subtract the base, trim (`trim`), [`Method::apply`], encode,
//!    positioned write ([`Sink`]).
//!
//! A tensor with reductions or a score selection (so that several passes read its trimmed
//! inputs) whose decoded inputs fit the cache allowance (a quarter of the budget) is decoded once
//! into a cache; others are decoded again by each pass.
//!
//! Every per-element result depends only on that element's inputs and on integer statistics, and
//! reductions use fixed block boundaries, so the output bytes are the same for any thread count
//! and any budget. Consumed input windows are released after each read (`Checkpoint::release`).
//!
//! Modules: `source` and `sink` (where values come from and go), `buffers` (the hot loop's
//! reusable buffers), `engine` (the pass loop), `selection` and `trim` (computing and applying
//! thresholds), `score` (score selections and their cut), `reduce`, `copy` (tensors copied, scaled
//! where the plan says), `prepare` and `recipe` (shared with [`crate::fold`] and
//! [`crate::quantize`]), `merge` ([`run_merge`]) and `in_memory` ([`merge_in_memory`]).
//!
//! [`Method::apply`]: crate::methods::Method::apply

mod buffers;
mod copy;
mod engine;
mod in_memory;
mod merge;
pub(crate) mod prepare;
pub mod readahead;
mod recipe;
mod reduce;
mod score;
mod selection;
mod sink;
mod source;
mod trim;

pub(crate) use copy::copy_tensor_from;
pub use engine::{Engine, Job};
pub use in_memory::merge_in_memory;
pub use merge::run_merge;
pub use readahead::{PagePolicy, ReadAhead, Span};
pub use recipe::recipe_yaml;
pub(crate) use recipe::{extract_recipe_yaml, fold_recipe_yaml, quantize_recipe_yaml};
pub use sink::{Sink, SliceSink};
pub use source::{first_nonfinite, MappedSource, SliceSource, Source, ZeroSource};

use crate::error::{Error, Result};

/// Elements per block: chunk boundaries and reduction blocks are multiples of it.
pub const BLOCK: usize = 1 << 16;
/// Largest chunk, in elements (4 blocks = 256 Ki elements = 1 MiB of f32 per input): small
/// enough that a chunk's inputs, base and output stay in cache between the trim and apply steps.
pub const MAX_CHUNK: usize = 4 * BLOCK;

/// Elements per chunk for a budget: the buffers in flight per thread are the decoded inputs, the
/// base, the output (f32 each) and its encoded copy, with a factor 2 of slack for the mapped
/// windows and the allocator; whole blocks, between 1 block and [`MAX_CHUNK`].
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
