//! `run_merge`: a whole merge from its spec: prepare (checks, inputs, plan, output layout),
//! copy and merge every tensor while a thread hashes the finished shards, then finish the
//! output (side files, recipe, atomic rename) and report.

use std::time::Instant;

use super::copy::copy_tensor_from;
use super::prepare::{self, Beside, Ticker, Workers};
use super::readahead::{PagePolicy, ReadAhead, Span};
use super::recipe::recipe_yaml;
use super::sink::FileSink;
use super::{cache_bytes_for, Engine, Job, MappedSource, Source, ZeroSource};
use crate::checkpoint::Checkpoint;
use crate::checksum::Frontier;
use crate::dtype::{elem_bytes, is_float};
use crate::error::{Error, Result};
use crate::methods::{self, BaseUse, Method};
use crate::params::Params;
use crate::plan::{self, Action, InputId, Inputs, PlanOptions, SrcRef};
use crate::report::{peak_rss_bytes, Report};
use crate::spec::MergeSpec;
use crate::write::{OutTensor, Output};
use crate::Progress;

/// Validates the merge-specific options that do not need the inputs.
fn check_spec(spec: &MergeSpec, method: &dyn Method) -> Result<()> {
    if spec.models.is_empty() {
        return Err(Error::Spec("no input models given".into()));
    }
    if method.base_use() == BaseUse::Required && spec.base.is_none() {
        return Err(Error::Spec(format!(
            "{} needs a base model (base=... / --base DIR): it works from the weights the models were fine-tuned from (task vectors are model - base). LoRA adapter directories carry their task vectors themselves and are merged without a base.",
            method.name()
        )));
    }
    prepare::check_workers(spec.output.threads, spec.output.memory_budget)?;
    // A merge refuses a zero shard size; a fold takes it as one tensor per shard (see OutputOptions).
    if spec.output.max_shard_size == Some(0) {
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
    let out_dtype = prepare::out_dtype(spec.output.out_dtype.as_deref())?;

    let model_paths: Vec<&std::path::Path> = spec.models.iter().map(|m| m.path.as_path()).collect();
    let opened = prepare::open_inputs(spec.base.as_deref(), &model_paths, Checkpoint::open, &spec.output.out, spec.output.overwrite)?;
    let target = opened.target;
    let inputs = Inputs { base: opened.base, models: opened.models, zero_base: false };
    let plan = plan::plan(method.as_ref(), &inputs, &params, &PlanOptions { strict: spec.strict, out_dtype })?;

    let out_tensors: Vec<OutTensor> =
        plan.tensors.iter().map(|t| OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let total_bytes: u64 = plan.tensors.iter().map(|t| t.in_bytes).sum();
    let out_bytes: u64 = out_tensors.iter().map(OutTensor::nbytes).sum();
    let policy = PagePolicy::parse(spec.output.page_cache.as_deref()).map_err(Error::Spec)?;
    let out = prepare::create_output(&target, &out_tensors, spec.output.max_shard_size)?;
    let mut plan_warnings = out.notes().to_vec();

    // The chunk buffers in flight: the models, the base, and a method's score.
    let buffers = inputs.models.len() + 1 + usize::from(method.scores());
    let workers = Workers::new(spec.output.threads, spec.output.memory_budget, buffers, spec.output.allow_nonfinite)?;
    let ticker = Ticker::new(progress, plan.tensors.len() as u64, total_bytes);

    // Beside the merge: a thread reads the inputs ahead of it, and one hashes the shards as the
    // tensors are written (see `readahead` and `checksum`).
    let frontier = Frontier::new(plan.tensors.len());
    let (steps, step_of) = read_steps(&plan, &inputs);
    let ahead = ReadAhead::new(steps, workers.read_window(), policy);
    let drop_output = policy.drops_output(total_bytes + out_bytes);
    let (merged, digests) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| frontier.hash_shards(&out, drop_output));
        scope.spawn(|| ahead.run());
        let stop = (frontier.stop_on_drop(), ahead.stop_on_drop());
        let beside = Beside { ahead: &ahead, step_of: &step_of, frontier: &frontier, ticker: &ticker };
        let merged = merge_tensors(&plan, &inputs, &out, method.as_ref(), &workers, &beside);
        drop(stop);
        (merged, hasher.join().unwrap_or_default())
    });
    merged?;

    let bytes_written = out.bytes();
    let shards = out.layout.shards.len();
    let side_src = inputs.base.as_ref().or(inputs.models.first()).map(|c| c.dir.clone());
    let recipe = recipe_yaml(spec, method.as_ref());
    out.finish(&out_tensors, side_src.as_deref(), out_dtype.or(plan.float_dtype), &recipe, &digests)?;
    plan_warnings.extend(plan.warnings);
    Ok(Report {
        method: method.describe(),
        output: target,
        tensors: plan.tensors.len(),
        shards,
        bytes_read: total_bytes,
        bytes_written,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        threads: workers.threads,
        chunk_elements: workers.chunk,
        warnings: plan_warnings,
    })
}

/// A tensor's sources: the base, when the method uses one, and the models.
type JobSources<'a> = (Option<Box<dyn Source + 'a>>, Vec<Box<dyn Source + 'a>>);

/// The run's reads in the order `merge_tensors` makes them, one step per output tensor (copies
/// first, then merges), and each output tensor's step.
fn read_steps<'a>(plan: &'a plan::Plan, inputs: &'a Inputs) -> (Vec<Vec<Span<'a>>>, Vec<usize>) {
    let span = |s: &'a SrcRef| -> Option<Span<'a>> { Some(Span::of(inputs.get(s.input)?, s.info.as_ref()?)) };
    let mut steps = Vec::with_capacity(plan.tensors.len());
    let mut step_of = vec![0usize; plan.tensors.len()];
    for copies in [true, false] {
        for (ti, t) in plan.tensors.iter().enumerate() {
            let spans: Vec<Span<'a>> = match (&t.action, copies) {
                (Action::Copy(src), true) => span(src).into_iter().collect(),
                (Action::Merge { base, models, .. }, false) => base.iter().chain(models.iter().map(|(_, s)| s)).filter_map(span).collect(),
                _ => continue,
            };
            step_of[ti] = steps.len();
            steps.push(spans);
        }
    }
    (steps, step_of)
}

/// Writes every output tensor of `plan` into `out`: copies first (sequential, small), then the
/// merges, reading what the read-ahead prepared for each tensor's step, and telling `beside`
/// when each is written.
fn merge_tensors(
    plan: &plan::Plan,
    inputs: &Inputs,
    out: &Output,
    method: &dyn Method,
    workers: &Workers,
    beside: &Beside<'_, '_>,
) -> Result<()> {
    let check_finite = workers.check_finite;
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Copy(src) = &t.action {
            let (Some(ck), Some(info)) = (inputs.get(src.input), src.info.as_ref()) else {
                return Err(Error::Internal(format!("copy source for {} missing", t.name)));
            };
            copy_tensor_from(ck, info, t.dtype, &t.name, ti, out, check_finite && is_float(t.dtype), Some(beside.step(ti)))?;
            beside.written(ti, t.in_bytes)?;
        }
    }

    let mut srcs: Vec<JobSources<'_>> = Vec::new();
    let mut merge_idx = Vec::new();
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Merge { base, models, .. } = &t.action {
            let step = beside.step(ti);
            let b = base.as_ref().map(|s| make_src(inputs, s, &t.name, check_finite, step));
            let ms = models.iter().map(|(_, s)| make_src(inputs, s, &t.name, check_finite, step)).collect();
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
    let engine = Engine::new(method, workers.chunk, cache_bytes_for(workers.budget));
    let done = |j: usize| {
        let t = &plan.tensors[merge_idx[j]];
        out.start_writeback(merge_idx[j], t.numel() * elem_bytes(t.dtype).unwrap_or(0) as u64);
        beside.written(merge_idx[j], t.in_bytes)
    };
    workers.pool.install(|| engine.run(&jobs, inputs.models.len(), &sink, &done))
}

fn make_src<'a>(
    inputs: &'a Inputs,
    s: &'a SrcRef,
    name: &'a str,
    check_finite: bool,
    (ahead, step): (&'a ReadAhead<'a>, usize),
) -> Box<dyn Source + 'a> {
    match (s.input, inputs.get(s.input), s.info.as_ref()) {
        (InputId::Zeros, _, _) | (_, None, _) | (_, _, None) => Box::new(ZeroSource),
        (_, Some(ck), Some(info)) => Box::new(MappedSource::new(ck, info, s.crop_cols, name, check_finite).with_read_ahead(ahead, step)),
    }
}
