//! The in-memory API: one tensor's f32 arrays merged by the engine (the `umerge.ops` kernels
//! on numpy arrays).

use super::{Engine, Job, SliceSink, SliceSource, Source, ZeroSource};
use crate::error::{Error, Result};
use crate::methods::{self, BaseUse};
use crate::params::Params;

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
    let ctx = methods::TensorCtx { name, shape: &shape, pos: crate::params::TensorPos { name, t: 0.0 }, params, models: &model_ids };
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
        p.models = weights.iter().map(|w| [("weight".to_string(), ParamValue::Number(*w))].into_iter().collect()).collect();
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
