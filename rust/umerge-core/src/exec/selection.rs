//! The selection driver: computes trim thresholds over a tensor or a whole model with the
//! kernels of [`crate::select`], and applies them to chunks.

use rayon::prelude::*;

use super::engine::{Data, Engine, Item, Job};
use crate::error::Result;
use crate::methods::{Trim, TrimRule, TrimScope};
use crate::select::{self, Threshold, HIGH_BINS, LOW_BINS};

/// Trim thresholds for one selection: per key, and per (item, key) the count of threshold-equal
/// entries before the item; per model slot, the key of its outlier cut when it has one (the
/// keys after the slots' own).
#[derive(Default, Clone)]
pub(super) struct Selection {
    th: Vec<Threshold>,
    eq_before: Vec<Vec<u64>>,
    pub(super) outlier_key: Vec<Option<usize>>,
}

impl Selection {
    /// The threshold of `key` and the count of its equal entries before `item`.
    pub(super) fn cut(&self, key: usize, item: usize) -> (Threshold, u64) {
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

type Targets = Vec<(usize, usize)>; // (slot, key)
/// Adds one input's values into a key's histogram: `(values, key, histogram)`.
type HistogramAdd<'a> = dyn Fn(&[f32], usize, &mut [u64]) + Sync + 'a;

impl Engine<'_> {
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
            let members = if sample.is_empty() {
                job.numel
            } else {
                sample.iter().filter(|&&b| b >= lo && b <= hi).count() as u64 * job.numel / sampled
            };
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
    fn histograms(&self, q: &Query<'_, '_>, active: &[bool], bins: usize, add: &HistogramAdd<'_>) -> Result<Vec<Vec<u64>>> {
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

    /// The whole-model selection (`TrimScope::Model` trims, the TIES paper's global trimming):
    /// one key per model over every tensor it takes part in, with `items` the items of every
    /// job in job order. `None` when no job has such a trim.
    pub(super) fn model_selection(&self, jobs: &[Job<'_>], items: &[Item], n_models: usize) -> Result<Option<Selection>> {
        if !jobs.iter().any(|j| j.recipe.trim.iter().flatten().any(|t| t.scope == TrimScope::Model)) {
            return Ok(None);
        }
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
        Ok(Some(self.select(&Query { jobs, items, data: Data::Stream, targets: &targets, spec: &spec })?))
    }

    /// The tensor-scope selection of one job: key `slot` for each slot's kept entries, then one
    /// key per slot that drops outliers.
    pub(super) fn tensor_selection(&self, jobs: &[Job<'_>], ji: usize, items: &[Item], data: Data<'_>) -> Result<Selection> {
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
