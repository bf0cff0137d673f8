//! Fake quantization of a checkpoint: every chosen weight is quantized to int4 or int8 and
//! dequantized again, round to nearest, group-wise symmetric, and the result is written as a full
//! checkpoint in the weights' own dtype. transformers then loads the model as usual and it behaves
//! as the integer model would (up to the kernel's arithmetic), which is what a check that an
//! unlearned model still forgets after quantization needs (Zhang et al. 2025, "Catastrophic
//! Failure of LLM Unlearning via Quantization").
//!
//! For a weight `W` stored `[rows, cols]` (out x in for a linear layer), each row is cut into
//! groups of `group_size` consecutive columns (the last group shorter when `cols` is not a
//! multiple; no group size: the whole row is one group). Per group, in float32:
//!
//! ```text
//! scale = max|w| / qmax                  qmax = 2^(bits-1) - 1: 7 (int4), 127 (int8)
//! q     = clamp(round(w / scale), -qmax, qmax)     round: to nearest, ties to even
//! w'    = q * scale                      then rounded once to the tensor's dtype (nearest even)
//! ```
//!
//! Each of `max`, `/`, the rounding and `*` is one float32 operation (IEEE, correctly rounded).
//! A group whose scale is 0 (all zeros, or a maximum so small that `max / qmax` underflows)
//! becomes +0. This is the symmetric RTN of AWQ's `pseudo_quantize_tensor` (`zero_point=False`):
//! the same scale and `torch.round` (ties to even); AWQ clamps to -8..7, but with `scale =
//! max|w| / 7` no value reaches beyond ±7, so the grid is the same. AWQ floors the maximum at
//! 1e-5 where this gives zeros for a scale of 0.
//!
//! Which tensors are quantized is the caller's list ([`QuantizeSpec::tensors`]; the Python layer
//! chooses the linear layers' weights by name, `umerge.quantization`): each must be a 2-D float
//! tensor. Every other tensor is copied unchanged (converted when `out_dtype` differs).
//!
//! Streaming as in [`crate::fold`]: the model is read ahead through memory maps, each quantized
//! tensor is processed in blocks of whole rows sized from the memory budget, in parallel; each
//! value depends only on its own group, so the output bytes are the same for any thread count
//! and budget. NaN or infinity in an input is an error unless `allow_nonfinite`; then a group
//! holding one is written unchanged. Output layout, atomic rename, side files (config,
//! tokenizer) and shard checksums as in `write`.

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::checkpoint::Checkpoint;
use crate::checksum::Frontier;
use crate::dtype::{elem_bytes, encode, is_float};
use crate::error::{Error, Result};
use crate::exec::prepare::{self, Beside, Ticker, Workers};
use crate::exec::readahead::{PagePolicy, ReadAhead, Span};
use crate::exec::{self, MappedSource, Source};
use crate::report::{peak_rss_bytes, Report};
use crate::spec::{self, OutputOptions};
use crate::write::{ConfigEdits, OutTensor, Output};
use crate::Progress;

/// The bit widths the quantizer takes.
pub const BITS: &[u32] = &[4, 8];

/// The largest quantized magnitude for `bits`: `2^(bits-1) - 1` (7 for int4, 127 for int8).
pub fn qmax(bits: u32) -> f32 {
    ((1u32 << (bits - 1)) - 1) as f32
}

/// A whole quantization.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct QuantizeSpec {
    /// The model to quantize (a checkpoint directory or a `.safetensors` file).
    pub model: PathBuf,
    /// Bits per quantized value: 4 or 8.
    pub bits: u32,
    /// Consecutive input columns sharing one scale; none: one scale per row.
    #[serde(default)]
    pub group_size: Option<usize>,
    /// The tensors to quantize, by name: 2-D float tensors of the model. Every other tensor is
    /// copied.
    pub tensors: Vec<String>,
    /// Output directory, dtype and resources, as a merge's (flat in JSON).
    #[serde(skip)]
    pub output: OutputOptions,
}

impl<'de> Deserialize<'de> for QuantizeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<QuantizeSpec, D::Error> {
        let (spec, output) = spec::deserialize_flat(d, QuantizeSpec::deserialize)?;
        Ok(QuantizeSpec { output, ..spec })
    }
}

impl Serialize for QuantizeSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        spec::serialize_flat(s, QuantizeSpec::serialize(self, serde_json::value::Serializer), &self.output)
    }
}

impl QuantizeSpec {
    /// Parses a spec from JSON.
    pub fn from_json(s: &str) -> Result<QuantizeSpec> {
        serde_json::from_str(s).map_err(|e| Error::Spec(format!("invalid quantize spec: {e}")))
    }
}

/// Quantizes and dequantizes one group in place (see the module docs for the arithmetic). A group
/// holding NaN or infinity is left unchanged (callers refuse such inputs unless told not to).
pub fn fake_quantize_group(g: &mut [f32], qmax: f32) {
    let mut m = 0f32;
    let mut finite = true;
    for x in g.iter() {
        finite &= x.is_finite();
        m = m.max(x.abs());
    }
    if !finite {
        return;
    }
    let scale = m / qmax;
    if scale == 0.0 {
        g.fill(0.0);
        return;
    }
    for x in g.iter_mut() {
        *x = (*x / scale).round_ties_even().clamp(-qmax, qmax) * scale;
    }
}

/// [`fake_quantize_group`] over the rows of a row-major block of `cols` columns, groups of
/// `group` columns (`None`: the whole row).
pub fn fake_quantize_rows(block: &mut [f32], cols: usize, group: Option<usize>, qmax: f32) {
    if cols == 0 {
        return;
    }
    let g = group.unwrap_or(cols).clamp(1, cols);
    for row in block.chunks_mut(cols) {
        for grp in row.chunks_mut(g) {
            fake_quantize_group(grp, qmax);
        }
    }
}

/// Quantizes one tensor (`src`, `[rows, cols]`) into output tensor `ti`, in parallel blocks of
/// whole rows of about `chunk` elements.
#[allow(clippy::too_many_arguments)]
fn quantize_tensor(
    src: &MappedSource<'_>,
    rows: usize,
    cols: usize,
    group: Option<usize>,
    qmax: f32,
    dtype: crate::dtype::Dtype,
    out: &Output,
    ti: usize,
    chunk: usize,
) -> Result<()> {
    let rows_per = (chunk / cols.max(1)).max(1);
    let blocks: Vec<(usize, usize)> = (0..rows).step_by(rows_per).map(|r| (r, (r + rows_per).min(rows))).collect();
    let eb = elem_bytes(dtype).unwrap_or(4);
    blocks.par_iter().try_for_each(|&(r0, r1)| -> Result<()> {
        let start = (r0 * cols) as u64;
        let len = (r1 - r0) * cols;
        let mut vals = vec![0f32; len];
        src.read(start, &mut vals)?;
        src.release(start, len);
        fake_quantize_rows(&mut vals, cols, group, qmax);
        let mut bytes = vec![0u8; len * eb];
        encode(dtype, &vals, &mut bytes);
        out.write_at(ti, start * eb as u64, &bytes)
    })
}

/// Checks the spec's own fields and that every listed tensor is a 2-D float tensor of `model`.
fn check(spec: &QuantizeSpec, model: &Checkpoint) -> Result<()> {
    let mut errors = Vec::new();
    if !BITS.contains(&spec.bits) {
        errors.push(Error::Spec(format!("bits {} is not supported: use 4 (int4) or 8 (int8)", spec.bits)));
    }
    if spec.group_size == Some(0) {
        errors.push(Error::Spec("group size 0 is not a size: give a positive number of columns, or none for one group per row".into()));
    }
    if spec.tensors.is_empty() {
        errors.push(Error::Spec(format!("no tensor to quantize in {}", model.display())));
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in &spec.tensors {
        if !seen.insert(name.as_str()) {
            errors.push(Error::Spec(format!("tensor {name} is listed twice")));
            continue;
        }
        match model.tensors.get(name) {
            None => errors.push(Error::MissingTensor {
                tensor: name.clone(),
                path: model.path.clone(),
                hint: " (listed to be quantized)".into(),
            }),
            Some(t) if !(is_float(t.dtype) && t.shape.len() == 2) => errors.push(Error::Spec(format!(
                "tensor {name} ({:?}, shape {:?}) cannot be quantized: only 2-D float weights can ({})",
                t.dtype,
                t.shape,
                model.file_of(t).display()
            ))),
            Some(_) => {}
        }
    }
    match Error::from_many(errors) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Quantizes the tensors `spec` lists and writes the full checkpoint; returns the report.
pub fn quantize(spec: &QuantizeSpec, progress: Option<Progress<'_>>) -> Result<Report> {
    let t0 = Instant::now();
    prepare::check_workers(spec.output.threads, spec.output.memory_budget)?;
    let out_dtype = prepare::out_dtype(spec.output.out_dtype.as_deref())?;
    let opened = prepare::open_inputs(Some(&spec.model), &[], Checkpoint::open, &spec.output.out, spec.output.overwrite)?;
    let (Some(model), target) = (opened.base, opened.target) else {
        return Err(Error::Internal("model missing after opening".into()));
    };
    check(spec, &model)?;
    let chosen: std::collections::BTreeSet<&str> = spec.tensors.iter().map(String::as_str).collect();
    let qmax = qmax(spec.bits);
    let order = model.order.clone();

    let mut float_dtype = None;
    let out_tensors: Vec<OutTensor> = order
        .iter()
        .filter_map(|n| model.tensors.get(n).map(|t| (n, t)))
        .map(|(n, t)| {
            let dtype = if is_float(t.dtype) {
                float_dtype.get_or_insert(t.dtype);
                out_dtype.unwrap_or(t.dtype)
            } else {
                t.dtype
            };
            OutTensor { name: n.clone(), dtype, shape: t.shape.clone() }
        })
        .collect();
    let out = prepare::create_output(&target, &out_tensors, spec.output.max_shard_size)?;

    let workers = Workers::new(spec.output.threads, spec.output.memory_budget, 1, spec.output.allow_nonfinite)?;
    let (pool, chunk, check_finite) = (&workers.pool, workers.chunk, workers.check_finite);
    let total_bytes = model.total_bytes();
    let ticker = Ticker::new(progress, out_tensors.len() as u64, total_bytes);
    let out_bytes: u64 = out_tensors.iter().map(OutTensor::nbytes).sum();
    let policy = PagePolicy::parse(spec.output.page_cache.as_deref()).map_err(Error::Spec)?;
    // As in a fold: the model is read ahead, the shards hashed as they are written; one step per
    // output tensor, in order.
    let steps: Vec<Vec<Span<'_>>> = order.iter().map(|n| model.tensors.get(n).map(|w| Span::of(&model, w)).into_iter().collect()).collect();
    let ahead = ReadAhead::new(steps, workers.read_window(), policy);
    let drop_output = policy.drops_output(total_bytes + out_bytes);
    let frontier = Frontier::new(out_tensors.len());
    let (done, digests) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| frontier.hash_shards(&out, drop_output));
        scope.spawn(|| ahead.run());
        let stop = (frontier.stop_on_drop(), ahead.stop_on_drop());
        let step_of: Vec<usize> = (0..out_tensors.len()).collect();
        let beside = Beside { ahead: &ahead, step_of: &step_of, frontier: &frontier, ticker: &ticker };
        let done = (|| -> Result<()> {
            for (ti, name) in order.iter().enumerate() {
                let Some(w) = model.tensors.get(name) else { continue };
                let dtype = out_tensors[ti].dtype;
                if chosen.contains(name.as_str()) {
                    let src = MappedSource::new(&model, w, None, name, check_finite).with_read_ahead(&ahead, ti);
                    pool.install(|| quantize_tensor(&src, w.shape[0], w.shape[1], spec.group_size, qmax, dtype, &out, ti, chunk))?;
                    out.start_writeback(ti, out_tensors[ti].nbytes());
                } else {
                    exec::copy_tensor_from(&model, w, dtype, name, ti, &out, check_finite, None, Some(beside.step(ti)), None)?;
                }
                beside.written(ti, w.nbytes())?;
            }
            Ok(())
        })();
        drop(stop);
        (done, hasher.join().unwrap_or_default())
    });
    done?;

    let bytes_written = out.bytes();
    let shards = out.layout.shards.len();
    let group = spec.group_size.map_or("per row".to_string(), |g| format!("group {g}"));
    let described = format!("quantize (int{}, {group}, {} of {} tensors)", spec.bits, spec.tensors.len(), out_tensors.len());
    let edits = ConfigEdits { float_dtype: out_dtype.or(float_dtype), num_layers: None };
    out.finish(&out_tensors, Some(&model.dir), edits, &exec::quantize_recipe_yaml(spec), &digests)?;
    Ok(Report {
        method: described,
        output: target,
        tensors: out_tensors.len(),
        shards,
        bytes_read: total_bytes,
        bytes_written,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        threads: workers.threads,
        chunk_elements: chunk,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{decode, Dtype};

    /// The group math written out in float64 for one group, with the float32 rounding of each
    /// documented step made explicit (f64 has more than 2 x 24 + 2 bits, so rounding an f64
    /// quotient or product of two f32 values to f32 gives the correctly rounded f32 result).
    fn reference(g: &[f32], qmax: f64) -> Vec<f32> {
        let m = g.iter().fold(0f64, |a, x| a.max((*x as f64).abs()));
        let scale = (m / qmax) as f32;
        if scale == 0.0 {
            return vec![0.0; g.len()];
        }
        g.iter()
            .map(|x| {
                let r = ((*x as f64) / scale as f64) as f32;
                // ties to even, written out: floor, then compare the remainder with one half
                let f = (r as f64).floor();
                let d = r as f64 - f;
                let q = if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) { f + 1.0 } else { f };
                let q = q.clamp(-qmax, qmax);
                (q * scale as f64) as f32
            })
            .collect()
    }

    #[test]
    fn the_group_math_rounds_ties_to_even_and_zero_groups_to_zero() {
        // max 7 -> int4 scale 1: w / scale is w itself, so the ties are exact .5 values.
        let mut g = vec![0.5f32, 1.5, 2.5, -2.5, -0.5, 3.49, 7.0, -7.0];
        fake_quantize_group(&mut g, qmax(4));
        assert_eq!(g, vec![0.0, 2.0, 2.0, -2.0, -0.0, 3.0, 7.0, -7.0]);
        assert!(g[4].is_sign_negative());
        // max 127 -> int8 scale 1
        let mut g = vec![126.5f32, 125.5, -127.0, 0.25];
        fake_quantize_group(&mut g, qmax(8));
        assert_eq!(g, vec![126.0, 126.0, -127.0, 0.0]);
        let mut z = vec![0.0f32, -0.0, 0.0];
        fake_quantize_group(&mut z, qmax(4));
        assert!(z.iter().all(|x| x.to_bits() == 0));
        // a maximum whose scale underflows to 0 gives zeros too
        let mut tiny = vec![f32::from_bits(1), -f32::from_bits(1)];
        fake_quantize_group(&mut tiny, qmax(4));
        assert!(tiny.iter().all(|x| x.to_bits() == 0));
        // a non-finite group is left as it is
        let mut bad = vec![1.0f32, f32::NAN, 0.3];
        fake_quantize_group(&mut bad, qmax(4));
        assert_eq!((bad[0], bad[2]), (1.0, 0.3));
        assert!(bad[1].is_nan());
    }

    #[test]
    fn rows_are_cut_into_groups_with_a_shorter_last_group() {
        let mut seed = 11u64;
        for &(cols, group) in &[(10usize, Some(4usize)), (7, Some(7)), (7, Some(100)), (9, None), (5, Some(1))] {
            for bits in [4u32, 8] {
                let rows = 3;
                let v: Vec<f32> = (0..rows * cols)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
                    })
                    .collect();
                let mut got = v.clone();
                fake_quantize_rows(&mut got, cols, group, qmax(bits));
                let g = group.unwrap_or(cols).min(cols);
                let mut want = Vec::new();
                for r in 0..rows {
                    let row = &v[r * cols..(r + 1) * cols];
                    let mut c = 0;
                    while c < cols {
                        let e = (c + g).min(cols);
                        want.extend(reference(&row[c..e], qmax(bits) as f64));
                        c = e;
                    }
                }
                let bits_of = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits_of(&got), bits_of(&want), "cols {cols} group {group:?} bits {bits}");
                // within half a step of the input, and at most 2^bits - 1 levels per group
                for r in 0..rows {
                    for (gi, grp) in v[r * cols..(r + 1) * cols].chunks(g).enumerate() {
                        let m = grp.iter().fold(0f32, |a, x| a.max(x.abs()));
                        let step = m / qmax(bits);
                        for (j, x) in grp.iter().enumerate() {
                            let y = got[r * cols + gi * g + j];
                            assert!((x - y).abs() <= step * 0.5 * (1.0 + 1e-6), "{x} -> {y}, step {step}");
                        }
                    }
                }
            }
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umerge-quantize-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn spec(model: &std::path::Path, out: &std::path::Path, tensors: &[&str], threads: usize, bits: u32) -> QuantizeSpec {
        QuantizeSpec::from_json(
            &serde_json::json!({"model": model, "bits": bits, "group_size": 4, "tensors": tensors, "out": out,
                                "threads": threads, "memory_budget": 16u64 << 20})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn quantizes_the_listed_tensors_copies_the_rest_and_refuses_bad_specs() {
        use crate::checkpoint::tests::write_st;
        let d = tmpdir("e2e");
        let (rows, cols) = (5usize, 10usize);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let norm = vec![1.0f32, 2.0, 3.0];
        std::fs::create_dir_all(d.join("m")).unwrap();
        write_st(
            &d.join("m/model.safetensors"),
            &[("a.norm.weight", "F32", vec![3], f32s(&norm)), ("a.proj.weight", "F32", vec![rows, cols], f32s(&w))],
        );
        std::fs::write(d.join("m/config.json"), "{}").unwrap();
        let mut outs = Vec::new();
        for threads in [1usize, 3] {
            let out = d.join(format!("out{threads}"));
            let rep = quantize(&spec(&d.join("m"), &out, &["a.proj.weight"], threads, 4), None).unwrap();
            assert_eq!(rep.tensors, 2);
            assert!(rep.method.contains("int4") && rep.method.contains("group 4"), "{}", rep.method);
            let c = Checkpoint::open(&out).unwrap();
            let mut got = vec![0f32; rows * cols];
            decode(Dtype::F32, c.tensor_bytes(&c.tensors["a.proj.weight"]).unwrap(), &mut got);
            let mut want = Vec::new();
            for r in w.chunks(cols) {
                for g in r.chunks(4) {
                    want.extend(reference(g, 7.0));
                }
            }
            assert_eq!(got, want);
            assert_eq!(c.tensor_bytes(&c.tensors["a.norm.weight"]).unwrap(), &f32s(&norm)[..]);
            assert!(out.join("config.json").is_file());
            let recipe = std::fs::read_to_string(out.join("umerge.yml")).unwrap();
            assert!(recipe.contains("operation: quantize") && recipe.contains("bits: 4"), "{recipe}");
            outs.push(std::fs::read(out.join("model.safetensors")).unwrap());
        }
        assert_eq!(outs[0], outs[1]);

        let bad = [
            (spec(&d.join("m"), &d.join("x"), &["a.proj.weight"], 1, 3), "bits 3"),
            (spec(&d.join("m"), &d.join("x"), &["a.norm.weight"], 1, 4), "only 2-D float"),
            (spec(&d.join("m"), &d.join("x"), &["nope.weight"], 1, 4), "nope.weight"),
            (spec(&d.join("m"), &d.join("x"), &[], 1, 4), "no tensor to quantize"),
            (spec(&d.join("gone"), &d.join("x"), &["a.proj.weight"], 1, 4), "gone"),
        ];
        for (s, want) in bad {
            let e = quantize(&s, None).unwrap_err();
            assert!(e.is_input() && e.to_string().contains(want), "{e}");
            assert!(!d.join("x").exists());
        }
        let mut zero = spec(&d.join("m"), &d.join("x"), &["a.proj.weight"], 1, 4);
        zero.group_size = Some(0);
        assert!(quantize(&zero, None).unwrap_err().to_string().contains("group size 0"));
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".umerge-tmp")));
    }

    #[test]
    fn spec_keeps_the_flat_layout() {
        let text = r#"{"model": "m", "bits": 8, "group_size": 128, "tensors": ["x.weight"], "out": "o", "threads": 2,
            "overwrite": true, "allow_nonfinite": false}"#;
        let s = QuantizeSpec::from_json(text).unwrap();
        assert_eq!((s.bits, s.group_size, s.output.threads), (8, Some(128), Some(2)));
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back, serde_json::from_str::<serde_json::Value>(text).unwrap());
        let per_row = QuantizeSpec::from_json(r#"{"model": "m", "bits": 4, "tensors": [], "out": "o"}"#).unwrap();
        assert_eq!(per_row.group_size, None);
        let e = QuantizeSpec::from_json(r#"{"model": "m", "bits": 4, "tensors": [], "out": "o", "groups": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `groups`"), "{e}");
    }
}
