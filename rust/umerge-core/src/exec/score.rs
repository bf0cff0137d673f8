//! Score selections ([`ScoreSelect`]): exact order statistics of a per-element score that the
//! method computes from each chunk ([`Method::score`]), over one tensor, and the trim a
//! [`ScoreSelect::TopOfNonzero`] makes of every input.
//!
//! Scores are mapped to order-preserving 32-bit keys ([`order_key`]: negative numbers below
//! positive ones, -0 with +0, every NaN above +inf, as torch sorts), so the score at a rank is
//! found by a radix select on the keys, as the trim selection finds magnitudes: a histogram of
//! the keys' high 16 bits (one pass, which also counts the zero scores that
//! [`ScoreSelect::TopOfNonzero`] leaves out of its k), then histograms of the low 16 bits of
//! the entries in each winning high bin (a second pass), then, only when a
//! [`ScoreSelect::TopOfNonzero`] keeps some but not all of the scores equal to its threshold, a
//! pass counting the equal scores of each chunk, so that they are kept lowest index first. The
//! counts are integers, so the result is exact and the same for any chunking and thread count.
//! Nothing of the size of the tensor is held: each pass computes the score again from its
//! chunk (the inputs come from the tensor cache when the tensor has one).
//!
//! [`Method::score`]: crate::methods::Method::score

use rayon::prelude::*;

use super::engine::{Cache, Engine, Item, Job};
use super::trim::Cuts;
use crate::error::Result;
use crate::methods::{Chunk, ScoreSelect};

/// Bins of each radix pass: 16 bits of the key.
const BINS: usize = 1 << 16;

/// The order-preserving key of a score: larger scores have larger keys; -0 and +0 share one,
/// and every NaN has the largest.
#[inline(always)]
pub fn order_key(x: f32) -> u32 {
    if x.is_nan() {
        return u32::MAX;
    }
    if x == 0.0 {
        return 0x8000_0000;
    }
    let b = x.to_bits();
    if b >> 31 == 0 {
        b | 0x8000_0000
    } else {
        !b
    }
}

/// The score of a key ([`order_key`]'s inverse; a zero comes back as +0, a NaN as one NaN).
pub fn key_value(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// What a [`ScoreSelect::TopOfNonzero`] keeps: the scores whose key is above `key`, and the
/// first `keep_eq` (in index order) of the `eq_total` equal to it; `eq_before[item]` counts the
/// equal ones before each item (only when some but not all are kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ScoreCut {
    key: u32,
    keep_eq: u64,
    eq_total: u64,
    eq_before: Vec<u64>,
}

impl ScoreCut {
    /// Keeps everything (k = n).
    const KEEP_ALL: ScoreCut = ScoreCut { key: 0, keep_eq: u64::MAX, eq_total: 0, eq_before: Vec::new() };
    /// Keeps nothing (k = 0): no key is above the largest, and none of the equal ones is kept.
    const KEEP_NONE: ScoreCut = ScoreCut { key: u32::MAX, keep_eq: 0, eq_total: 0, eq_before: Vec::new() };

    fn keeps_all(&self) -> bool {
        *self == ScoreCut::KEEP_ALL
    }

    fn needs_tie_ranks(&self) -> bool {
        self.keep_eq > 0 && self.keep_eq < self.eq_total
    }

    /// Zeroes every input where the score of item `item` is not kept.
    fn apply(&self, score: &[f32], item: usize, inputs: &mut [&mut [f32]]) {
        let mut seen = self.eq_before.get(item).copied().unwrap_or(0);
        for (j, &s) in score.iter().enumerate() {
            let k = order_key(s);
            let eq = k == self.key;
            let keep = k > self.key || (eq && seen < self.keep_eq);
            seen += eq as u64;
            if !keep {
                for x in inputs.iter_mut() {
                    x[j] = 0.0;
                }
            }
        }
    }
}

/// The outcome of a tensor's score selection.
pub(super) enum Scored {
    /// The trim of a [`ScoreSelect::TopOfNonzero`].
    Cut(ScoreCut),
    /// The scores at the ranks of a [`ScoreSelect::Ranks`], in its order.
    Values(Vec<f64>),
}

/// Where a rank falls after the high-bit pass: its high bin, and its rank inside the bin.
fn locate(hist: &[u64], rank: u64) -> (usize, u64) {
    let mut below = 0u64;
    for (b, &h) in hist.iter().enumerate() {
        if rank < below + h {
            return (b, rank - below);
        }
        below += h;
    }
    (hist.len() - 1, 0) // unreachable for rank < total
}

fn add_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

impl Engine<'_> {
    /// Runs `f` on the scores of item `it` (index `ii`), computed from its trimmed inputs: the
    /// cache's (already trimmed) or decoded and trimmed here, and the base.
    fn with_scores<R>(
        &self,
        job: &Job<'_>,
        it: &Item,
        ii: usize,
        cache: Option<&Cache>,
        cuts: &Cuts<'_>,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        let mut score = self.pool.take(it.len);
        let r = match cache {
            Some(c) => {
                let s = it.start as usize;
                let views: Vec<&[f32]> = c.inputs.iter().map(|v| &v[s..s + it.len]).collect();
                let mut base = job.base.map(|_| self.pool.take(it.len));
                if let (Some(src), Some(b)) = (job.base, base.as_deref_mut()) {
                    src.read(it.start, b)?;
                    if !self.keeps_mapped(job) {
                        src.release(it.start, it.len);
                    }
                }
                let chunk = Chunk { tensor: job.name, start: it.start, base: base.as_deref(), inputs: &views };
                self.method.score(job.recipe, &chunk, &mut score);
                if let Some(b) = base {
                    self.pool.put(b);
                }
                f(&score)
            }
            None => {
                let mut bufs = self.gather(job, it.start, it.len)?;
                {
                    let mut muts: Vec<&mut [f32]> = bufs.inputs.iter_mut().map(|v| v.as_mut_slice()).collect();
                    self.trim(job, &mut muts, bufs.base.as_deref(), it.start, cuts, ii);
                }
                let views: Vec<&[f32]> = bufs.inputs.iter().map(|v| v.as_slice()).collect();
                let chunk = Chunk { tensor: job.name, start: it.start, base: bufs.base.as_deref(), inputs: &views };
                self.method.score(job.recipe, &chunk, &mut score);
                drop(views);
                self.recycle(bufs);
                f(&score)
            }
        };
        self.pool.put(score);
        Ok(r)
    }

    /// One pass over the items adding `add(scores, acc)` into an accumulator of `len` counts per
    /// thread, summed (integers: the order does not matter).
    fn count_pass(
        &self,
        job: &Job<'_>,
        items: &[Item],
        cache: Option<&Cache>,
        cuts: &Cuts<'_>,
        len: usize,
        add: &(dyn Fn(&[f32], &mut [u64]) + Sync),
    ) -> Result<Vec<u64>> {
        items
            .par_iter()
            .enumerate()
            .try_fold(
                || vec![0u64; len],
                |mut acc, (ii, it)| -> Result<Vec<u64>> {
                    self.with_scores(job, it, ii, cache, cuts, |s| add(s, &mut acc))?;
                    Ok(acc)
                },
            )
            .try_reduce(
                || vec![0u64; len],
                |mut a, b| {
                    add_into(&mut a, &b);
                    Ok(a)
                },
            )
    }

    /// The score selection of one job (`cuts`: its trims, without a score cut). A cache must
    /// already be trimmed.
    pub(super) fn score_select(
        &self,
        job: &Job<'_>,
        items: &[Item],
        cache: Option<&Cache>,
        cuts: &Cuts<'_>,
        sel: &ScoreSelect,
    ) -> Result<Scored> {
        let n = job.numel;
        // Pass 1: high 16 bits of the keys (bins 0..BINS), and the zero scores (bin BINS).
        let high = self.count_pass(job, items, cache, cuts, BINS + 1, &|s, acc| {
            let mut zeros = 0u64;
            for &x in s {
                acc[(order_key(x) >> 16) as usize] += 1;
                zeros += (x == 0.0) as u64;
            }
            acc[BINS] += zeros;
        })?;
        let (hist, zeros) = (&high[..BINS], high[BINS]);
        // Ascending ranks to find.
        let (ranks, k) = match sel {
            ScoreSelect::Ranks(r) => (r.iter().map(|&r| r.min(n.saturating_sub(1))).collect::<Vec<u64>>(), 0),
            ScoreSelect::TopOfNonzero(fraction) => {
                // torch: int(count_nonzero(s) * fraction), the product in float32.
                let k = (((n - zeros) as f32 * fraction) as u64).min(n);
                if k == 0 {
                    return Ok(Scored::Cut(ScoreCut::KEEP_NONE));
                }
                if k >= n {
                    return Ok(Scored::Cut(ScoreCut::KEEP_ALL));
                }
                (vec![n - k], k)
            }
        };
        if n == 0 {
            return Ok(Scored::Values(vec![0.0; ranks.len()]));
        }
        let located: Vec<(usize, u64)> = ranks.iter().map(|&r| locate(hist, r)).collect();
        let mut bins: Vec<usize> = located.iter().map(|&(b, _)| b).collect();
        bins.sort_unstable();
        bins.dedup();
        // Pass 2: low 16 bits of the keys in each winning high bin.
        let low = self.count_pass(job, items, cache, cuts, BINS * bins.len(), &|s, acc| {
            for &x in s {
                let key = order_key(x);
                if let Ok(i) = bins.binary_search(&((key >> 16) as usize)) {
                    acc[i * BINS + (key & 0xffff) as usize] += 1;
                }
            }
        })?;
        let keys: Vec<(u32, u64)> = located
            .iter()
            .map(|&(b, within)| {
                let i = bins.binary_search(&b).unwrap_or(0);
                let (l, _) = locate(&low[i * BINS..(i + 1) * BINS], within);
                ((b as u32) << 16 | l as u32, low[i * BINS + l])
            })
            .collect();
        if let ScoreSelect::Ranks(_) = sel {
            return Ok(Scored::Values(keys.iter().map(|&(key, _)| key_value(key) as f64).collect()));
        }
        let (key, eq_total) = keys[0];
        let (b, i) = (located[0].0, bins.binary_search(&located[0].0).unwrap_or(0));
        let above: u64 =
            hist[b + 1..].iter().sum::<u64>() + low[i * BINS + (key & 0xffff) as usize + 1..(i + 1) * BINS].iter().sum::<u64>();
        let mut cut = ScoreCut { key, keep_eq: k - above, eq_total, eq_before: Vec::new() };
        if cut.needs_tie_ranks() {
            // Pass 3: the equal keys of each item, for the lowest-index-first rule.
            let per_item: Vec<u64> = items
                .par_iter()
                .enumerate()
                .map(|(ii, it)| self.with_scores(job, it, ii, cache, cuts, |s| s.iter().filter(|&&x| order_key(x) == key).count() as u64))
                .collect::<Result<_>>()?;
            let mut running = 0u64;
            cut.eq_before = per_item
                .iter()
                .map(|&c| {
                    let before = running;
                    running += c;
                    before
                })
                .collect();
        }
        Ok(Scored::Cut(cut))
    }

    /// Zeroes the inputs of one item where a score cut does not keep the score (computed from
    /// the inputs as they are, already trimmed, and the base).
    pub(super) fn trim_by_score(
        &self,
        job: &Job<'_>,
        inputs: &mut [&mut [f32]],
        base: Option<&[f32]>,
        start: u64,
        cut: &ScoreCut,
        item: usize,
    ) {
        if cut.keeps_all() || inputs.is_empty() {
            return;
        }
        let mut score = self.pool.take(inputs[0].len());
        {
            let views: Vec<&[f32]> = inputs.iter().map(|v| &**v).collect();
            self.method.score(job.recipe, &Chunk { tensor: job.name, start, base, inputs: &views }, &mut score);
        }
        cut.apply(&score, item, inputs);
        self.pool.put(score);
    }

    /// Applies a score cut to a cached (already trimmed) tensor in place, item by item, reading
    /// the base for the score.
    pub(super) fn score_trim_cache(&self, job: &Job<'_>, items: &[Item], cache: &mut Cache, cut: &ScoreCut) -> Result<()> {
        if cut.keeps_all() {
            return Ok(());
        }
        let ptrs: Vec<super::buffers::SendPtr> = cache.inputs.iter_mut().map(|v| super::buffers::SendPtr(v.as_mut_ptr())).collect();
        items.par_iter().enumerate().try_for_each(|(ii, it)| -> Result<()> {
            let s = it.start as usize;
            // SAFETY: items are disjoint ranges of the cached vectors, which the `&mut Cache`
            // borrow keeps alive and unaliased for this loop.
            let mut muts: Vec<&mut [f32]> = unsafe { ptrs.iter().map(|p| std::slice::from_raw_parts_mut(p.0.add(s), it.len)).collect() };
            let mut base = job.base.map(|_| self.pool.take(it.len));
            if let (Some(src), Some(b)) = (job.base, base.as_deref_mut()) {
                src.read(it.start, b)?;
                if !self.keeps_mapped(job) {
                    src.release(it.start, it.len);
                }
            }
            self.trim_by_score(job, &mut muts, base.as_deref(), it.start, cut, ii);
            if let Some(b) = base {
                self.pool.put(b);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{SliceSink, SliceSource, Source};
    use crate::methods::{BaseUse, Method, ParamSpec, Stats, TensorRecipe};
    use proptest::prelude::*;

    /// A method whose score is its first input's value (signed): the apply pass writes the
    /// input as the cut left it, or, for ranks, the ranked scores over and over.
    struct Identity;

    impl Method for Identity {
        fn name(&self) -> &'static str {
            "identity"
        }
        fn base_use(&self) -> BaseUse {
            BaseUse::Unused
        }
        fn params(&self) -> &'static [ParamSpec] {
            &[]
        }
        fn plan_tensor(&self, _t: &crate::methods::TensorCtx<'_>) -> Result<TensorRecipe> {
            unreachable!("recipes are made by the test")
        }
        fn score(&self, _r: &TensorRecipe, c: &Chunk<'_>, out: &mut [f32]) {
            out.copy_from_slice(c.inputs[0]);
        }
        fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
            match r.score {
                Some(ScoreSelect::Ranks(_)) => {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = s.tensor[(c.start as usize + j) % s.tensor.len()] as f32;
                    }
                }
                _ => out.copy_from_slice(c.inputs[0]),
            }
        }
    }

    fn run(values: &[f32], sel: ScoreSelect, chunk: usize, cache_bytes: u64) -> Vec<f32> {
        let recipe = TensorRecipe { trim: vec![None], score: Some(sel), ..Default::default() };
        let src = SliceSource(values);
        let job = Job {
            name: "t",
            numel: values.len() as u64,
            base: None,
            models: vec![&src as &dyn Source],
            model_ids: vec![0],
            recipe: &recipe,
        };
        let mut out = vec![f32::NAN; values.len()];
        {
            let mut bufs = [out.as_mut_slice()];
            let sink = SliceSink::new(&mut bufs);
            Engine::new(&Identity, chunk, cache_bytes).run(std::slice::from_ref(&job), 1, &sink, &|_| Ok(())).unwrap();
        }
        out
    }

    /// Values with repeats, both zeros, negative and positive numbers of several scales.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                match (s >> 60) % 4 {
                    0 => [0.0, -0.0, 1.5, -1.5][((s >> 40) % 4) as usize],
                    1 => ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 1e-3,
                    _ => ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0,
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn ranks_are_the_sorted_values(seed in any::<u64>(), n in 1usize..400, chunk in 1usize..70,
                                       q in proptest::collection::vec(0.0f64..1.0, 1..4)) {
            let v = values(seed, n);
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let ranks: Vec<u64> = q.iter().map(|&q| (q * n as f64) as u64).collect();
            for cache in [0, u64::MAX] {
                let out = run(&v, ScoreSelect::Ranks(ranks.clone()), chunk, cache);
                for (i, &r) in ranks.iter().enumerate().take(n) {
                    // -0 and +0 are one value: compare as numbers.
                    prop_assert_eq!(out[i], sorted[r as usize], "rank {} of {:?}", r, sorted);
                }
            }
        }

        #[test]
        fn the_top_of_the_nonzero_scores_is_kept_lowest_index_first(seed in any::<u64>(), n in 1usize..400,
                                                                    chunk in 1usize..70, fraction in 0.0f32..1.0) {
            let v = values(seed, n);
            let nonzero = v.iter().filter(|&&x| x != 0.0).count();
            let k = (nonzero as f32 * fraction) as usize;
            // Reference: a stable sort by value, largest first (ties: lower index first).
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
            let mut want = vec![0f32; n];
            for &i in &order[..k] {
                want[i] = v[i];
            }
            for cache in [0, u64::MAX] {
                let out = run(&v, ScoreSelect::TopOfNonzero(fraction), chunk, cache);
                prop_assert_eq!(&out, &want);
            }
        }
    }

    #[test]
    fn keys_order_like_the_numbers() {
        let xs = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-40, 1e-30, 2.0, f32::INFINITY, f32::NAN];
        for w in xs.windows(2) {
            let (a, b) = (order_key(w[0]), order_key(w[1]));
            if w[0] == w[1] {
                assert_eq!(a, b, "{} {}", w[0], w[1]);
            } else {
                assert!(a < b, "{} {}", w[0], w[1]);
            }
        }
        assert_eq!(order_key(-f32::NAN), u32::MAX);
        for &x in &xs[..xs.len() - 1] {
            let back = key_value(order_key(x));
            assert!(back == x && (x != 0.0 || back.to_bits() == 0), "{x} {back}");
        }
        assert!(key_value(u32::MAX).is_nan());
    }

    #[test]
    fn locate_finds_the_bin_and_the_rank_inside_it() {
        let hist = [2u64, 0, 3, 1];
        assert_eq!(locate(&hist, 0), (0, 0));
        assert_eq!(locate(&hist, 1), (0, 1));
        assert_eq!(locate(&hist, 2), (2, 0));
        assert_eq!(locate(&hist, 4), (2, 2));
        assert_eq!(locate(&hist, 5), (3, 0));
    }

    #[test]
    fn a_cut_keeps_the_first_equal_scores_by_index() {
        // keys above 2.0 kept, and two of the 2.0s, counting one before this item.
        let cut = ScoreCut { key: order_key(2.0), keep_eq: 2, eq_total: 3, eq_before: vec![0, 1] };
        let score = [2.0f32, 3.0, 1.0, 2.0, 2.0];
        let mut a = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let mut b = [-1.0f32; 5];
        cut.apply(&score, 1, &mut [&mut a, &mut b]);
        assert_eq!(a, [1.0, 2.0, 0.0, 0.0, 0.0]);
        assert_eq!(b, [-1.0, -1.0, 0.0, 0.0, 0.0]);
        let mut c = [1.0f32; 5];
        ScoreCut::KEEP_NONE.apply(&[f32::NAN, 1.0, -1.0, 0.0, 5.0], 0, &mut [&mut c]);
        assert_eq!(c, [0.0; 5]);
    }
}
