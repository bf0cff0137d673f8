//! Counter-based random numbers keyed by (seed, tensor name, model, element index).
//!
//! Random methods (DARE, DELLA) must give the same output bytes for any thread count, chunk size
//! or machine, so no generator state is carried from one element to the next: the random number
//! of element `i` is a pure function of its key and `i`. We use SplitMix64 (Steele, Lea and
//! Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014; the generator behind
//! Java's `SplittableRandom`), whose i-th output is by construction `mix(key + (i + 1) * GAMMA)`,
//! so jumping to any position costs nothing. The finaliser is Stafford's "Mix13" variant of the
//! MurmurHash3 64-bit finaliser, with the published constants below; SplitMix64 passes BigCrush.
//!
//! The stream key is derived by mixing the seed, an FNV-1a hash of the tensor name (Fowler, Noll,
//! Vo; 64-bit offset basis and prime as published) and the model's index in the spec, so every
//! (seed, tensor, model) triple has its own stream and no two streams are shifted copies of one
//! another except with negligible probability (keys are 64-bit hashes).

/// SplitMix64's increment: 2^64 / golden ratio, odd.
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Stafford's Mix13 finaliser (the SplitMix64 output function).
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a hash of a byte string.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stream key of one (seed, tensor, model) triple.
pub fn stream_key(seed: u64, tensor: &str, model: u64) -> u64 {
    mix64(mix64(seed ^ mix64(fnv1a64(tensor.as_bytes()))) ^ mix64(model.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// The i-th 64-bit output of the stream `key` (SplitMix64 positioned at `i`).
#[inline(always)]
pub fn at(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// A uniform number in [0, 1) from the top 53 bits of [`at`].
#[inline(always)]
pub fn uniform(key: u64, i: u64) -> f64 {
    (at(key, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Bernoulli(p) draw for element `i`: true with probability `p` (p <= 0: never, p >= 1: always).
///
/// Compares integers: `u < p` with u = top 53 bits / 2^53 is `bits < ceil(p * 2^53)`, computed
/// once per tensor by [`keep_cutoff`], so the hot loop has no float conversion.
#[inline(always)]
pub fn keep(key: u64, i: u64, cutoff: u64) -> bool {
    (at(key, i) >> 11) < cutoff
}

/// The integer cutoff for [`keep`]: keep when the top 53 bits are below it.
pub fn keep_cutoff(p: f64) -> u64 {
    if p <= 0.0 {
        0
    } else if p >= 1.0 {
        1u64 << 53
    } else {
        (p * (1u64 << 53) as f64).ceil() as u64
    }
}

crate::simd::kernel! {
    /// DARE's masked, scaled task vector for one run of entries: `out[j] = (x[j] * scale) * w`
    /// when entry `first + j` of the stream `key` is kept (see [`keep`]), else 0. With AVX-512
    /// the generator's 64-bit multiplies run in vector lanes: measured on the 1.1B benchmark,
    /// the scalar generator was 70% of the CPU time of `dare_linear`.
    pub fn masked_scale(key: u64, first: u64, cutoff: u64, x: &[f32], scale: f32, w: f32, out: &mut [f32]) {
        for (j, (o, &d)) in out.iter_mut().zip(x).enumerate() {
            let d = if keep(key, first + j as u64, cutoff) { d * scale } else { 0.0 };
            *o = d * w;
        }
    }
}

crate::simd::kernel! {
    /// Sums of |x| over a run of entries, all of them and the kept ones (stream `key` from
    /// index `first`): the two L1 norms of DARE's `rescale: l1`. Summed in 8 interleaved f64
    /// lanes (entry j into lane j % 8), then the lanes in order: a fixed order, so every build
    /// gives the same sums, and one the compiler can vectorise.
    pub fn masked_l1(key: u64, first: u64, cutoff: u64, x: &[f32]) -> (f64, f64) {
        let (mut all, mut kept) = ([0f64; 8], [0f64; 8]);
        let mut runs = x.chunks_exact(8);
        let mut at = first;
        for run in &mut runs {
            for l in 0..8 {
                let a = run[l].abs() as f64;
                all[l] += a;
                kept[l] += if keep(key, at + l as u64, cutoff) { a } else { 0.0 };
            }
            at += 8;
        }
        for (l, &d) in runs.remainder().iter().enumerate() {
            let a = d.abs() as f64;
            all[l] += a;
            kept[l] += if keep(key, at + l as u64, cutoff) { a } else { 0.0 };
        }
        (all.iter().sum(), kept.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // SplitMix64 seeded with 1234567 (the reference C code by Vigna, prng.di.unimi.it):
        // the first outputs are these.
        let seed = 1234567u64;
        assert_eq!(at(seed, 0), 6457827717110365317);
        assert_eq!(at(seed, 1), 3203168211198807973);
        assert_eq!(at(seed, 2), 9817491932198370423);
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn streams_differ_and_frequencies_match() {
        let a = stream_key(0, "w", 0);
        assert_ne!(a, stream_key(1, "w", 0));
        assert_ne!(a, stream_key(0, "v", 0));
        assert_ne!(a, stream_key(0, "w", 1));
        let n = 200_000u64;
        for p in [0.1, 0.5, 0.9] {
            let c = keep_cutoff(p);
            let k = (0..n).filter(|&i| keep(a, i, c)).count() as f64;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((k - n as f64 * p).abs() < 4.0 * sd, "p={p} kept {k}");
        }
        assert!(!(0..1000).any(|i| keep(a, i, keep_cutoff(0.0))));
        assert!((0..1000).all(|i| keep(a, i, keep_cutoff(1.0))));
    }

    #[test]
    fn vector_kernels_equal_the_scalar_rule() {
        let x: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let (key, cut) = (stream_key(5, "t", 1), keep_cutoff(0.4));
        let mut out = vec![0f32; x.len()];
        masked_scale(key, 17, cut, &x, 2.5, 0.5, &mut out);
        for (j, (&o, &d)) in out.iter().zip(&x).enumerate() {
            let expect = if keep(key, 17 + j as u64, cut) { d * 2.5 * 0.5 } else { 0.0 };
            assert_eq!(o, expect, "j={j}");
        }
        let (all, kept) = masked_l1(key, 17, cut, &x);
        let naive_all: f64 = x.iter().map(|d| d.abs() as f64).sum();
        let naive_kept: f64 = x.iter().enumerate().filter(|(j, _)| keep(key, 17 + *j as u64, cut)).map(|(_, d)| d.abs() as f64).sum();
        assert!((all - naive_all).abs() < 1e-9 && (kept - naive_kept).abs() < 1e-9);
    }
}
