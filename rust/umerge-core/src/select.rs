//! Exact top-k magnitude selection in O(n) by radix select on float bit patterns.
//!
//! TIES and magnitude pruning keep exactly k = floor(density * n) entries of largest |x|
//! (mergekit and PEFT semantics). Sorting is not needed: for non-negative IEEE floats the bit
//! pattern orders like the value, so the k-th largest |x| is found with two histogram passes —
//! one over the high 15 bits of `bits(|x|)` (the sign bit is cleared), one over the low 16 bits
//! inside the winning high bin. The result is a [`Threshold`]: entries strictly above it are kept;
//! entries equal to it are kept lowest index first until k are kept. Counts are integers, so the
//! threshold is exact and identical for any chunking or thread count; the lowest-index tie rule
//! needs, per chunk, the number of equal entries before it (a third, counting pass, run only when
//! some but not all equal entries are kept).
//!
//! No index arrays (mergekit's argsort needs 8 bytes per element) and no sorting. The histogram
//! loops are shaped as plain counting loops over contiguous f32 slices: the per-element work is a
//! shift and an increment, which keeps a pass close to memory bandwidth.

/// Number of bins of the first (high-bit) pass: bits 16..31 of |x| (bit 31, the sign, is 0).
pub const HIGH_BINS: usize = 1 << 15;
/// Number of bins of the second (low-bit) pass.
pub const LOW_BINS: usize = 1 << 16;

/// Bit pattern of |x|: non-negative floats order like these integers (NaN sorts above +Inf).
#[inline(always)]
pub fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Which entries of a selection scope (a tensor, or a whole model) survive trimming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// Bit pattern of the k-th largest |x|; entries with larger `abs_bits` are kept.
    pub bits: u32,
    /// How many entries equal to `bits` are kept (lowest index first).
    pub keep_eq: u64,
    /// How many entries equal to `bits` exist in the scope.
    pub eq_total: u64,
}

impl Threshold {
    /// Keeps every entry (k = n).
    pub const KEEP_ALL: Threshold = Threshold { bits: 0, keep_eq: u64::MAX, eq_total: 0 };
    /// Keeps no entry (k = 0): no `abs_bits` value reaches `u32::MAX`.
    pub const KEEP_NONE: Threshold = Threshold { bits: u32::MAX, keep_eq: 0, eq_total: 0 };

    /// True when equal entries must be ranked by index (some, but not all, are kept).
    ///
    /// At a zero threshold the choice cannot matter: a trimmed zero and a kept zero are the same
    /// value, so every zero is simply kept.
    pub fn needs_tie_ranks(&self) -> bool {
        self.bits != 0 && self.keep_eq < self.eq_total
    }
}

/// k = floor(density * n), as `int(density * n)` in mergekit and PEFT (computed in f64).
pub fn keep_count(density: f64, n: u64) -> u64 {
    let k = (density * n as f64).floor();
    if k <= 0.0 {
        0
    } else {
        (k as u64).min(n)
    }
}

/// Adds the high-bit histogram of `|values|` into `hist` (length [`HIGH_BINS`]).
pub fn hist_high(values: &[f32], hist: &mut [u64]) {
    let hist = &mut hist[..HIGH_BINS];
    for &x in values {
        hist[(abs_bits(x) >> 16) as usize] += 1;
    }
}

/// Adds the low-bit histogram of the entries whose high bits equal `high` into `hist`
/// (length [`LOW_BINS`]).
pub fn hist_low(values: &[f32], high: u32, hist: &mut [u64]) {
    let hist = &mut hist[..LOW_BINS];
    for &x in values {
        let b = abs_bits(x);
        if b >> 16 == high {
            hist[(b & 0xffff) as usize] += 1;
        }
    }
}

/// Appends to `out`, in index order, the low 16 bits of `|x|` for the entries whose high bits
/// equal `high` (the candidates of the second pass; see `exec`'s candidate lists).
pub fn collect_low(values: &[f32], high: u32, out: &mut Vec<u16>) {
    for &x in values {
        let b = abs_bits(x);
        if b >> 16 == high {
            out.push(b as u16);
        }
    }
}

/// Number of entries with `abs_bits == bits`.
pub fn count_eq(values: &[f32], bits: u32) -> u64 {
    // u32 counts per block of 2^16 (no overflow), summed in u64: vectorises, where the
    // `filter().count()` form compiled to a scalar loop.
    values.chunks(1 << 16).map(|c| count_eq_u32(c, bits) as u64).sum()
}

/// First pass result: the high bin holding the k-th largest entry, and how many entries lie in
/// higher bins. `k` must be in 1..=total.
pub fn pick_high(hist: &[u64], k: u64) -> (u32, u64) {
    let mut above = 0u64;
    for b in (0..HIGH_BINS).rev() {
        if above + hist[b] >= k {
            return (b as u32, above);
        }
        above += hist[b];
    }
    (0, above)
}

/// Second pass result: the exact threshold, given the high bin and the count above it.
pub fn pick_low(hist: &[u64], high: u32, above: u64, k: u64) -> Threshold {
    let mut above = above;
    for l in (0..LOW_BINS).rev() {
        if above + hist[l] >= k {
            return Threshold { bits: (high << 16) | l as u32, keep_eq: k - above, eq_total: hist[l] };
        }
        above += hist[l];
    }
    Threshold::KEEP_ALL
}

/// Zeroes, in place, the entries of one chunk that the threshold trims.
///
/// `eq_before` is the number of entries equal to the threshold that precede this chunk in the
/// selection scope (only read when [`Threshold::needs_tie_ranks`]).
pub fn apply_trim(values: &mut [f32], th: &Threshold, eq_before: u64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { apply_trim_avx2(values, th, eq_before) };
            return;
        }
    }
    apply_trim_impl(values, th, eq_before)
}

/// [`apply_trim_impl`] compiled with AVX2 (integer compares and selects, so the same bits as
/// the baseline build); chosen at run time, wheels stay baseline x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_trim_avx2(values: &mut [f32], th: &Threshold, eq_before: u64) {
    apply_trim_impl(values, th, eq_before)
}

#[inline(always)]
fn apply_trim_impl(values: &mut [f32], th: &Threshold, eq_before: u64) {
    if *th == Threshold::KEEP_ALL {
        return;
    }
    if !th.needs_tie_ranks() {
        let bits = th.bits;
        // A select, not a branch: vectorises.
        for x in values.iter_mut() {
            *x = if abs_bits(*x) < bits { 0.0 } else { *x };
        }
        return;
    }
    // Tie ranks, block by block. A per-element loop carrying the running count of equal
    // entries does not vectorise and was 29% of the CPU time of a TinyLlama layer (perf, one
    // thread). Per block of TRIM_BLOCK entries the equal ones are counted first (vectorised);
    // when all of them are kept the block is trimmed with the cut `b >= bits`, when none is kept
    // with `b > bits` (both the plain vectorised select); only the one block where the count
    // crosses `keep_eq` takes the scalar loop. Same kept set as the scalar rule.
    let (bits, keep_eq) = (th.bits, th.keep_eq);
    let mut seen = eq_before;
    for blk in values.chunks_mut(TRIM_BLOCK) {
        let n_eq = count_eq_u32(blk, bits) as u64;
        if seen >= keep_eq || seen + n_eq <= keep_eq {
            // `bits + 1` cannot overflow: `bits` is the abs bit pattern of a value, < 2^31.
            let cut = if seen >= keep_eq { bits + 1 } else { bits };
            for x in blk.iter_mut() {
                *x = if abs_bits(*x) < cut { 0.0 } else { *x };
            }
        } else {
            for x in blk.iter_mut() {
                let b = abs_bits(*x);
                let is_eq = b == bits;
                let keep = (b > bits) | (is_eq & (seen < keep_eq));
                seen += is_eq as u64;
                *x = if keep { *x } else { 0.0 };
            }
            continue;
        }
        seen += n_eq;
    }
}

/// Block length of the tie-ranked trim (see [`apply_trim`]).
const TRIM_BLOCK: usize = 256;

/// Count of entries with `abs_bits == bits` in a short slice, with a u32 accumulator (vectorises).
#[inline(always)]
fn count_eq_u32(values: &[f32], bits: u32) -> u32 {
    let mut c = 0u32;
    for &x in values {
        c += (abs_bits(x) == bits) as u32;
    }
    c
}

/// Selects the top-k magnitudes of one in-memory slice (the whole scope at once). Used by tests
/// and by in-memory callers; the executor runs the same steps chunk by chunk.
pub fn select_slice(values: &[f32], k: u64) -> Threshold {
    let n = values.len() as u64;
    if k >= n {
        return Threshold::KEEP_ALL;
    }
    if k == 0 {
        return Threshold::KEEP_NONE;
    }
    let mut h = vec![0u64; HIGH_BINS];
    hist_high(values, &mut h);
    let (high, above) = pick_high(&h, k);
    let mut l = vec![0u64; LOW_BINS];
    hist_low(values, high, &mut l);
    pick_low(&l, high, above, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive reference: stable sort of indices by |x| descending (ties: lower index first), keep k.
    fn naive_keep(values: &[f32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].abs().partial_cmp(&values[a].abs()).unwrap().then(a.cmp(&b)));
        let mut keep = vec![false; values.len()];
        for &i in idx.iter().take(k) {
            keep[i] = true;
        }
        keep
    }

    fn check(values: &[f32], k: usize, chunk: usize) {
        let th = select_slice(values, k as u64);
        let mut out = values.to_vec();
        let mut eq_before = 0;
        for c in out.chunks_mut(chunk.max(1)) {
            let orig = c.to_vec();
            apply_trim(c, &th, eq_before);
            eq_before += count_eq(&orig, th.bits);
        }
        let keep = naive_keep(values, k);
        for i in 0..values.len() {
            let expect = if keep[i] { values[i] } else { 0.0 };
            // A kept or trimmed zero is the same value.
            assert_eq!(out[i], expect, "i={i} k={k} v={}", values[i]);
        }
        let kept_nonzero = out.iter().filter(|x| **x != 0.0).count();
        let expect_nonzero = (0..values.len()).filter(|&i| keep[i] && values[i] != 0.0).count();
        assert_eq!(kept_nonzero, expect_nonzero);
    }

    #[test]
    fn small_cases() {
        check(&[3.0, -1.0, 2.0, -3.0], 1, 4);
        check(&[3.0, -1.0, 2.0, -3.0], 2, 1);
        check(&[1.0, 1.0, 1.0, 1.0], 2, 3);
        check(&[0.0, 0.0, 5.0], 2, 2);
        check(&[7.0], 0, 1);
        check(&[7.0], 1, 1);
        check(&[-0.0, 0.0, 1e-45, -1e-45], 1, 1);
    }

    #[test]
    fn keep_count_matches_int_truncation() {
        assert_eq!(keep_count(0.8, 10), 8);
        assert_eq!(keep_count(0.7, 10), 7);
        assert_eq!(keep_count(1.0, 3), 3);
        assert_eq!(keep_count(0.1, 5), 0);
        assert_eq!(keep_count(0.29, 100), 28); // 0.29*100 = 28.999999999999996 in f64
    }

    proptest! {
        #[test]
        fn radix_select_equals_naive(
            values in prop::collection::vec(
                prop_oneof![
                    -4.0f32..4.0,
                    // few distinct values: many ties
                    (-3i32..=3).prop_map(|v| v as f32 * 0.5),
                    Just(0.0f32),
                ], 1..400),
            frac in 0.0f64..=1.0,
            chunk in 1usize..64,
        ) {
            let k = keep_count(frac, values.len() as u64) as usize;
            check(&values, k, chunk);
        }
    }
}
