//! Preparing a run, shared by [`super::run_merge`], [`crate::fold::fold`] and
//! [`crate::quantize::quantize`]: the checks of the options every run has, opening the inputs
//! (every failure collected into one error), the output's shard layout, the worker pool and chunk
//! size, and progress counting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::readahead::ReadAhead;
use super::{chunk_for_budget, pool, Pool};
use crate::checkpoint::Checkpoint;
use crate::checksum::Frontier;
use crate::dtype::{parse_out_dtype, Dtype};
use crate::error::{Error, Result};
use crate::spec::{DEFAULT_MAX_SHARD_SIZE, DEFAULT_MEMORY_BUDGET};
use crate::write::{self, OutTensor, Output};
use crate::Progress;

/// Checks the worker options: at least one thread, a budget of at least 16 MiB.
pub(crate) fn check_workers(threads: Option<usize>, memory_budget: Option<u64>) -> Result<()> {
    if threads == Some(0) {
        return Err(Error::Spec("threads must be at least 1".into()));
    }
    if let Some(b) = memory_budget {
        if b < 16 << 20 {
            return Err(Error::Spec(format!("memory budget {b} bytes is below the 16 MiB minimum")));
        }
    }
    Ok(())
}

/// Parses the optional output dtype (`bf16`, `f16`, `f32`).
pub(crate) fn out_dtype(name: Option<&str>) -> Result<Option<Dtype>> {
    match name {
        None => Ok(None),
        Some(s) => Ok(Some(parse_out_dtype(s).ok_or_else(|| Error::Spec(format!("unknown output dtype {s:?} (use bf16, f16 or f32)")))?)),
    }
}

/// The opened inputs of a run and its checked output directory.
pub(crate) struct Opened {
    /// The base, when the run has one.
    pub base: Option<Checkpoint>,
    /// The models (adapters, for a fold), in order.
    pub models: Vec<Checkpoint>,
    /// The output directory, absolute (see [`write::check_target`]).
    pub target: PathBuf,
}

/// Opens the base (with [`Checkpoint::open`]) and every model (with `open_model`) and checks
/// the output directory against them, collecting every failure into one error.
pub(crate) fn open_inputs(
    base: Option<&Path>,
    models: &[&Path],
    open_model: fn(&Path) -> Result<Checkpoint>,
    out: &Path,
    overwrite: bool,
) -> Result<Opened> {
    let mut errors = Vec::new();
    let base_ck = base.and_then(|p| Checkpoint::open(p).map_err(|e| errors.push(e)).ok());
    let mut opened = Vec::new();
    for m in models {
        match open_model(m) {
            Ok(c) => opened.push(c),
            Err(e) => errors.push(e),
        }
    }
    // (as given, as resolved) for every input, so the output cannot overwrite one of them.
    let mut io: Vec<(PathBuf, PathBuf)> = Vec::new();
    if let Some(b) = base {
        io.push((b.to_path_buf(), base_ck.as_ref().map(|c| c.dir.clone()).unwrap_or_else(|| b.to_path_buf())));
    }
    for (i, m) in models.iter().enumerate() {
        io.push((m.to_path_buf(), opened.get(i).map(|c| c.dir.clone()).unwrap_or_else(|| m.to_path_buf())));
    }
    let target = write::check_target(out, &io, overwrite).map_err(|e| errors.push(e)).ok();
    if let Some(e) = Error::from_many(errors) {
        return Err(e);
    }
    let target = target.ok_or_else(|| Error::Internal("target missing".into()))?;
    Ok(Opened { base: base_ck, models: opened, target })
}

/// Lays the output tensors out in shards of at most `max_shard_size` bytes (default 5 GB) and
/// creates the output under a temporary name in `target`'s parent.
pub(crate) fn create_output(target: &Path, tensors: &[OutTensor], max_shard_size: Option<u64>) -> Result<Output> {
    Output::create(target, write::layout(tensors, max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE)))
}

/// The workers of a run and the sizes derived from its memory budget.
pub(crate) struct Workers {
    /// Worker threads.
    pub threads: usize,
    /// The pool they run in.
    pub pool: Pool,
    /// The memory budget, bytes.
    pub budget: u64,
    /// Elements per chunk ([`chunk_for_budget`]).
    pub chunk: usize,
    /// Whether NaN and infinity in the inputs are errors.
    pub check_finite: bool,
}

impl Workers {
    /// `threads` workers (default: all cores) for `n_inputs` inputs (models and base).
    pub(crate) fn new(threads: Option<usize>, memory_budget: Option<u64>, n_inputs: usize, allow_nonfinite: bool) -> Result<Workers> {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = pool(Some(threads))?;
        let budget = memory_budget.unwrap_or(DEFAULT_MEMORY_BUDGET);
        let chunk = chunk_for_budget(budget, threads, n_inputs);
        Ok(Workers { threads, pool, budget, chunk, check_finite: !allow_nonfinite })
    }

    /// Bytes of read-ahead buffers a run may hold (`exec::readahead`): half the budget. The
    /// engine's own buffers (chunks, the decoded-tensor cache of a quarter, the selection lists
    /// of an eighth) take the other half.
    pub(crate) fn read_window(&self) -> u64 {
        self.budget / 2
    }
}

/// What follows a run's progress beside its workers: the read-ahead (told when a tensor's step
/// is finished), the shard hasher's frontier (told when a tensor is written) and the progress
/// counter.
pub(crate) struct Beside<'r, 'a> {
    /// The run's read-ahead.
    pub ahead: &'r ReadAhead<'a>,
    /// Each output tensor's step in it.
    pub step_of: &'r [usize],
    /// The hasher's frontier.
    pub frontier: &'r Frontier,
    /// The progress counter.
    pub ticker: &'r Ticker<'r>,
}

impl Beside<'_, '_> {
    /// Output tensor `ti`, read from `in_bytes` input bytes, is completely written.
    pub(crate) fn written(&self, ti: usize, in_bytes: u64) -> Result<()> {
        self.ahead.finished(self.step_of[ti]);
        self.frontier.mark(ti);
        self.ticker.tick(in_bytes)
    }

    /// The read-ahead and output tensor `ti`'s step, for its sources.
    pub(crate) fn step(&self, ti: usize) -> (&ReadAhead<'_>, usize) {
        (self.ahead, self.step_of[ti])
    }
}

/// Counts written tensors and their input bytes, and reports them to the progress callback.
pub(crate) struct Ticker<'p> {
    progress: Option<Progress<'p>>,
    total_tensors: u64,
    total_bytes: u64,
    done_tensors: AtomicU64,
    done_bytes: AtomicU64,
}

impl<'p> Ticker<'p> {
    /// A counter towards `total_tensors` tensors and `total_bytes` input bytes.
    pub(crate) fn new(progress: Option<Progress<'p>>, total_tensors: u64, total_bytes: u64) -> Self {
        Ticker { progress, total_tensors, total_bytes, done_tensors: AtomicU64::new(0), done_bytes: AtomicU64::new(0) }
    }

    /// Counts one tensor of `bytes` input bytes; [`Error::Cancelled`] when the callback says stop.
    pub(crate) fn tick(&self, bytes: u64) -> Result<()> {
        let t = self.done_tensors.fetch_add(1, Relaxed) + 1;
        let b = self.done_bytes.fetch_add(bytes, Relaxed) + bytes;
        match self.progress {
            Some(p) if !p(t, self.total_tensors, b, self.total_bytes) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}
