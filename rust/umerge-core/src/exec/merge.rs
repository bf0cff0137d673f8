//! `run_merge`: a whole merge from its spec: prepare (checks, inputs, plan, output layout),
//! copy and merge every tensor while a thread hashes the finished shards, then finish the
//! output (side files, recipe, atomic rename) and report.
//!
//! Method `passthrough` (mergekit's) is no [`Method`]: it merges nothing, so every tensor of its
//! plan is a copy ([`Combine::Passthrough`]), scaled where the spec says so.

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
use crate::fold::{Factors, FoldedSource, FoldedWeights};
use crate::methods::{self, BaseUse, Method};
use crate::params::Params;
use crate::plan::{self, Action, Combine, InputId, Inputs, PlanOptions, SrcRef};
use crate::report::{peak_rss_bytes, Report};
use crate::spec::MergeSpec;
use crate::write::{ConfigEdits, OutTensor, Output};
use crate::Progress;

/// The name of the method that copies instead of merging (see the module docs).
const PASSTHROUGH: &str = "passthrough";

/// What `passthrough` says of itself in reports and recipes.
const PASSTHROUGH_DESCRIPTION: &str = "passthrough: each tensor copied from its one model, times scale where given";

/// Validates the merge-specific options that do not need the inputs (`method` is `None` for
/// passthrough).
fn check_spec(spec: &MergeSpec, method: Option<&dyn Method>) -> Result<()> {
    if spec.models.is_empty() {
        return Err(Error::Spec("no input models given".into()));
    }
    let Some(method) = method else {
        if spec.base.is_some() {
            return Err(Error::Spec(
                "passthrough takes no base: it copies each tensor from one model (give that model as the model)".into(),
            ));
        }
        if spec.slices.is_empty() && spec.models.len() != 1 {
            return Err(Error::Spec(format!(
                "passthrough copies one model, got {}: give one model, or slices with one source each",
                spec.models.len()
            )));
        }
        return check_output(spec);
    };
    if method.base_use() == BaseUse::Required && spec.base.is_none() {
        return Err(Error::Spec(format!(
            "{} needs a base model (base=... / --base DIR): it works from the weights the models were fine-tuned from (task vectors are model - base). LoRA adapter directories carry their task vectors themselves and are merged without a base.",
            method.name()
        )));
    }
    check_output(spec)
}

/// Validates the output and resource options.
fn check_output(spec: &MergeSpec) -> Result<()> {
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
    let method = if spec.method == PASSTHROUGH { None } else { Some(methods::build(&spec.method, &params)?) };
    check_spec(spec, method.as_deref())?;
    let (combine, description) = match method.as_deref() {
        Some(m) => (Combine::Method(m), m.describe()),
        None => (Combine::Passthrough, PASSTHROUGH_DESCRIPTION.to_string()),
    };
    let out_dtype = prepare::out_dtype(spec.output.out_dtype.as_deref())?;

    let model_paths: Vec<&std::path::Path> = spec.models.iter().map(|m| m.path.as_path()).collect();
    let opened = prepare::open_inputs(spec.base.as_deref(), &model_paths, Checkpoint::open, &spec.output.out, spec.output.overwrite)?;
    let target = opened.target;
    let inputs = Inputs { base: opened.base, models: opened.models, zero_base: false };
    let folds = Folds::load(spec, &inputs)?;
    let plan = plan::plan(combine, &inputs, &params, &PlanOptions { strict: spec.strict, out_dtype, slices: &spec.slices })?;

    let out_tensors: Vec<OutTensor> =
        plan.tensors.iter().map(|t| OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let total_bytes: u64 = plan.tensors.iter().map(|t| t.in_bytes).sum();
    let out_bytes: u64 = out_tensors.iter().map(OutTensor::nbytes).sum();
    let policy = PagePolicy::parse(spec.output.page_cache.as_deref()).map_err(Error::Spec)?;
    let out = prepare::create_output(&target, &out_tensors, spec.output.max_shard_size)?;
    let mut plan_warnings = out.notes().to_vec();

    // The chunk buffers in flight: the models, the base, and a method's score.
    let buffers = inputs.models.len() + 1 + usize::from(method.as_deref().is_some_and(|m| m.scores()));
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
        let merged = merge_tensors(&plan, &inputs, &folds, &out, method.as_deref(), &workers, &beside);
        drop(stop);
        (merged, hasher.join().unwrap_or_default())
    });
    merged?;

    let bytes_written = out.bytes();
    let shards = out.layout.shards.len();
    let side_src = inputs.base.as_ref().or(inputs.models.first()).map(|c| c.dir.clone());
    let recipe = recipe_yaml(spec, &description);
    let edits = ConfigEdits { float_dtype: out_dtype.or(plan.float_dtype), num_layers: plan.num_layers };
    out.finish(&out_tensors, side_src.as_deref(), edits, &recipe, &digests)?;
    plan_warnings.extend(plan.warnings);
    Ok(Report {
        method: description,
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

/// The LoRA adapters folded into inputs as they are read (`model+lora`), per input.
struct Folds {
    base: Option<FoldedWeights>,
    models: Vec<Option<FoldedWeights>>,
}

impl Folds {
    /// Loads the factors of every `lora` of the spec, matched to its model's weights.
    fn load(spec: &MergeSpec, inputs: &Inputs) -> Result<Folds> {
        let check_finite = !spec.output.allow_nonfinite;
        let base = match (&spec.base_lora, inputs.base.as_ref()) {
            (Some(fa), Some(ck)) => Some(FoldedWeights::load(ck, fa, check_finite)?),
            (Some(_), None) => return Err(Error::Spec("a LoRA adapter for the base was given, but no base".into())),
            (None, _) => None,
        };
        let models = spec
            .models
            .iter()
            .zip(&inputs.models)
            .map(|(m, ck)| m.lora.as_ref().map(|fa| FoldedWeights::load(ck, fa, check_finite)).transpose())
            .collect::<Result<_>>()?;
        Ok(Folds { base, models })
    }

    /// The LoRA factors updating the tensor `s` reads, if its input has an adapter touching it.
    fn of(&self, s: &SrcRef) -> Option<&Factors> {
        let folded = match s.input {
            InputId::Base => self.base.as_ref(),
            InputId::Model(i) => self.models.get(i).and_then(Option::as_ref),
            InputId::Zeros => None,
        }?;
        folded.of(s.info.as_ref()?)
    }
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
                (Action::Copy { src, .. }, true) => span(src).into_iter().collect(),
                (Action::Merge { base, models, .. }, false) => base.iter().chain(models.iter().map(|(_, s)| s)).filter_map(span).collect(),
                _ => continue,
            };
            step_of[ti] = steps.len();
            steps.push(spans);
        }
    }
    (steps, step_of)
}

/// Writes every output tensor of `plan` into `out`: copies first (sequential: a copy is bound by
/// the disk, not the CPU), then the merges (`method`, absent when the plan merges nothing),
/// reading what the read-ahead prepared for each tensor's step, and telling `beside` when each
/// is written.
fn merge_tensors(
    plan: &plan::Plan,
    inputs: &Inputs,
    folds: &Folds,
    out: &Output,
    method: Option<&dyn Method>,
    workers: &Workers,
    beside: &Beside<'_, '_>,
) -> Result<()> {
    let check_finite = workers.check_finite;
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Copy { src, scale } = &t.action {
            let (Some(ck), Some(info)) = (inputs.get(src.input), src.info.as_ref()) else {
                return Err(Error::Internal(format!("copy source for {} missing", t.name)));
            };
            let (lora, check) = (folds.of(src), check_finite && is_float(t.dtype));
            copy_tensor_from(ck, info, t.dtype, &t.name, ti, out, check, *scale, Some(beside.step(ti)), lora)?;
            beside.written(ti, t.in_bytes)?;
        }
    }

    let Some(method) = method else {
        return match plan.tensors.iter().find(|t| matches!(t.action, Action::Merge { .. })) {
            Some(t) => Err(Error::Internal(format!("tensor {} is to be merged without a method", t.name))),
            None => Ok(()),
        };
    };
    let mut srcs: Vec<JobSources<'_>> = Vec::new();
    let mut merge_idx = Vec::new();
    for (ti, t) in plan.tensors.iter().enumerate() {
        if let Action::Merge { base, models, .. } = &t.action {
            let step = beside.step(ti);
            let b = base.as_ref().map(|s| make_src(inputs, folds, s, &t.name, check_finite, step)).transpose()?;
            let ms = models.iter().map(|(_, s)| make_src(inputs, folds, s, &t.name, check_finite, step)).collect::<Result<_>>()?;
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
    folds: &'a Folds,
    s: &'a SrcRef,
    name: &'a str,
    check_finite: bool,
    (ahead, step): (&'a ReadAhead<'a>, usize),
) -> Result<Box<dyn Source + 'a>> {
    let (Some(ck), Some(info)) = (inputs.get(s.input), s.info.as_ref()) else {
        return Ok(Box::new(ZeroSource));
    };
    let w = MappedSource::new(ck, info, s.crop_cols, name, check_finite).with_read_ahead(ahead, step);
    let Some(f) = folds.of(s) else { return Ok(Box::new(w)) };
    if s.crop_cols.is_some() {
        return Err(Error::Spec(format!(
            "{name}: a LoRA-updated weight cropped to a narrower output is not supported (fold the adapter first: umerge fold)"
        )));
    }
    Ok(Box::new(FoldedSource { w, f, cols: info.shape.last().copied().unwrap_or(1).max(1) }))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::checkpoint::tests::write_st;
    use crate::checkpoint::Checkpoint;
    use crate::spec::MergeSpec;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-merge-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A 3-layer model whose every element says where it comes from: 100 * model + 10 * layer
    /// + position (embeddings -1, norm -2, lm_head -3 times the model number).
    fn model(dir: &Path, m: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let vals = |base: f32, n: usize| -> Vec<u8> { (0..n).flat_map(|i| (base + i as f32).to_le_bytes()).collect() };
        let mut ts: Vec<(String, Vec<usize>, Vec<u8>)> = vec![("model.embed_tokens.weight".into(), vec![2], vals(-(m as f32), 2))];
        for l in 0..3 {
            let v = 100.0 * m as f32 + 10.0 * l as f32;
            ts.push((format!("model.layers.{l}.mlp.down_proj.weight"), vec![2], vals(v, 2)));
            ts.push((format!("model.layers.{l}.self_attn.o_proj.weight"), vec![3], vals(v + 5.0, 3)));
        }
        ts.push(("model.norm.weight".into(), vec![2], vals(-2.0 * m as f32, 2)));
        ts.push(("lm_head.weight".into(), vec![2], vals(-3.0 * m as f32, 2)));
        let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = ts.iter().map(|(n, s, b)| (n.as_str(), "F32", s.clone(), b.clone())).collect();
        write_st(&dir.join("model.safetensors"), &refs);
        std::fs::write(dir.join("config.json"), r#"{"num_hidden_layers": 3, "torch_dtype": "float32"}"#).unwrap();
    }

    fn values(ck: &Checkpoint, name: &str) -> Vec<f32> {
        let info = ck.tensors.get(name).unwrap_or_else(|| panic!("{name} missing"));
        ck.tensor_bytes(info).unwrap().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    #[test]
    fn passthrough_slices_stack_renumbered_layers_and_scale_by_filter() {
        let root = tmpdir("slices");
        let (a, b, out) = (root.join("a"), root.join("b"), root.join("out"));
        model(&a, 1);
        model(&b, 2);
        // [0, 2) of a, then [1, 3) of b: four layers; o_proj of b scaled by 0.5 (its filter rule),
        // the rest of b's tensors copied as they are.
        let spec = MergeSpec::from_json(
            &serde_json::json!({
                "method": "passthrough",
                "models": [{"path": a}, {"path": b, "params": {"scale": [{"filter": "o_proj", "value": 0.5}]}}],
                "slices": [{"sources": [{"model": 0, "layer_range": [0, 2]}]}, {"sources": [{"model": 1, "layer_range": [1, 3]}]}],
                "out": out, "threads": 1
            })
            .to_string(),
        )
        .unwrap();
        let report = super::run_merge(&spec, None).unwrap();
        assert_eq!(report.tensors, 3 + 4 * 2);
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(values(&ck, "model.embed_tokens.weight"), vec![-1.0, 0.0]); // from a, the first slice
        assert_eq!(values(&ck, "model.norm.weight"), vec![-4.0, -3.0]); // from b, the last slice
        assert_eq!(values(&ck, "lm_head.weight"), vec![-6.0, -5.0]);
        let want = [(0, 1, 0), (1, 1, 1), (2, 2, 1), (3, 2, 2)]; // (output layer, model, its layer)
        for (j, m, l) in want {
            let v = 100.0 * m as f32 + 10.0 * l as f32;
            assert_eq!(values(&ck, &format!("model.layers.{j}.mlp.down_proj.weight")), vec![v, v + 1.0], "layer {j}");
            let s = if m == 2 { 0.5 } else { 1.0 };
            let o: Vec<f32> = (0..3).map(|i| (v + 5.0 + i as f32) * s).collect();
            assert_eq!(values(&ck, &format!("model.layers.{j}.self_attn.o_proj.weight")), o, "layer {j}");
        }
        assert!(ck.tensors.keys().all(|n| !n.contains("layers.4")));
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_hidden_layers"], 4);
        assert!(std::fs::read_to_string(out.join("umerge.yml")).unwrap().contains("slices: [{\"sources\""));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn bad_slices_are_refused_before_anything_is_written() {
        let root = tmpdir("bad-slices");
        let (a, b, out) = (root.join("a"), root.join("b"), root.join("out"));
        model(&a, 1);
        model(&b, 2);
        let cases = [
            (r#"[{"sources": [{"model": 0, "layer_range": [2, 1]}]}]"#, "empty or reversed"),
            (r#"[{"sources": [{"model": 0, "layer_range": [1, 4]}]}]"#, "goes past its 3 layers"),
            (
                r#"[{"sources": [{"model": 0, "layer_range": [0, 2]}, {"model": 1, "layer_range": [0, 2]}]}]"#,
                "passthrough copies each tensor from one model",
            ),
            (r#"[{"sources": [{"model": 2, "layer_range": [0, 2]}]}]"#, "out of range"),
        ];
        for (slices, needle) in cases {
            let spec = format!(
                r#"{{"method": "passthrough", "models": [{{"path": {a:?}}}, {{"path": {b:?}}}], "slices": {slices}, "out": {out:?}}}"#
            );
            let e = super::run_merge(&MergeSpec::from_json(&spec).unwrap(), None).unwrap_err();
            assert!(e.to_string().contains(needle), "{slices}: {e}");
            assert!(e.is_input(), "{e}");
            assert!(!out.exists());
        }
        // A merge method over slices whose sources differ in length.
        let spec = format!(
            r#"{{"method": "linear", "models": [{{"path": {a:?}}}, {{"path": {b:?}}}], "slices": [{{"sources": [{{"model": 0, "layer_range": [0, 2]}}, {{"model": 1, "layer_range": [0, 3]}}]}}], "out": {out:?}}}"#
        );
        let e = super::run_merge(&MergeSpec::from_json(&spec).unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("every input of a slice gives the same number of layers"), "{e}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2, "only the two inputs are left");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn slices_of_a_method_merge_each_layer_over_its_slice_sources() {
        let root = tmpdir("method-slices");
        let (a, b, out) = (root.join("a"), root.join("b"), root.join("out"));
        model(&a, 1);
        model(&b, 2);
        // One slice averaging a's layers [0, 2) with b's [1, 3): layer j = (a's j + b's j + 1) / 2.
        let spec = MergeSpec::from_json(
            &serde_json::json!({
                "method": "linear",
                "models": [{"path": a}, {"path": b}],
                "slices": [{"sources": [{"model": 0, "layer_range": [0, 2]}, {"model": 1, "layer_range": [1, 3]}]}],
                "out": out, "threads": 1
            })
            .to_string(),
        )
        .unwrap();
        super::run_merge(&spec, None).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        for j in 0..2 {
            let (va, vb) = (100.0 + 10.0 * j as f32, 200.0 + 10.0 * (j + 1) as f32);
            let mean = (va + vb) / 2.0;
            assert_eq!(values(&ck, &format!("model.layers.{j}.mlp.down_proj.weight")), vec![mean, mean + 1.0]);
        }
        assert_eq!(values(&ck, "model.embed_tokens.weight"), vec![-1.5, -0.5]);
        assert!(!ck.tensors.contains_key("model.layers.2.mlp.down_proj.weight"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
