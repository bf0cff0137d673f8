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

/// Entries per generator block: `HALF` outputs of 64 bits serve `BLOCK` entries, 32 bits each.
pub const BLOCK: u64 = 1024;
const HALF: usize = BLOCK as usize / 2;

/// The 32 random bits of entry `i` of the stream `key`.
///
/// A 64-bit output gives two entries 32 bits each: in block b = i / 1024, output b * 512 + l
/// (l < 512) gives entry b * 1024 + l its high half and entry b * 1024 + 512 + l its low half. A
/// keep probability needs far fewer than 64 bits, and halving the multiplies mattered: measured
/// on the 1.1B benchmark, one output per entry made the generator 44% of the CPU time of
/// `dare_linear` with `rescale: l1`. Halves of 512 consecutive entries (rather than neighbours
/// sharing an output) keep the kernels plain loops that the compiler vectorises.
#[inline(always)]
pub fn bits32(key: u64, i: u64) -> u32 {
    let (b, l) = (i / BLOCK, (i % BLOCK) as usize);
    let r = at(key, b * HALF as u64 + (l % HALF) as u64);
    if l < HALF {
        (r >> 32) as u32
    } else {
        r as u32
    }
}

/// Bernoulli(p) draw for entry `i`: true with probability `p` (p <= 0: never, p >= 1: always).
///
/// Compares integers: `u < p` with u = bits / 2^32 is `bits < ceil(p * 2^32)`, computed once per
/// tensor by [`keep_cutoff`], so the hot loop has no float conversion. The probability is thus
/// rounded up to a multiple of 2^-32.
#[inline(always)]
pub fn keep(key: u64, i: u64, cutoff: u64) -> bool {
    (bits32(key, i) as u64) < cutoff
}

/// The integer cutoff for [`keep`]: keep when the entry's 32 bits are below it.
pub fn keep_cutoff(p: f64) -> u64 {
    if p <= 0.0 {
        0
    } else if p >= 1.0 {
        1u64 << 32
    } else {
        ceil_to_u64(p * (1u64 << 32) as f64)
    }
}

/// `y.ceil() as u64` for 0 <= y < 2^53, without a libm call (baseline x86-64 has no rounding
/// instruction; measured: `ceil` was 9% of DELLA's CPU time, one cutoff per entry).
#[inline(always)]
fn ceil_to_u64(y: f64) -> u64 {
    let t = y as u64;
    t + ((t as f64) < y) as u64
}

/// The 32-bit draws ([`bits32`]) of entries `first..first + out.len()`, whole blocks at the
/// vector kernels' speed.
pub fn fill_bits(key: u64, first: u64, out: &mut [u32]) {
    let mut draws = Draws::new(key, first, out.len());
    while let Some((j0, bits)) = draws.next() {
        out[j0..j0 + bits.len()].copy_from_slice(bits);
    }
}

/// The bits of every entry of block `b` (see [`bits32`]): `hi` for its first half, `lo` for its
/// second.
#[inline(always)]
fn block_bits(key: u64, b: u64, hi: &mut [u32; HALF], lo: &mut [u32; HALF]) {
    // SplitMix64's state, advanced by an add per output (an induction the compiler vectorises).
    let mut state = key.wrapping_add((b * HALF as u64 + 1).wrapping_mul(GAMMA));
    for (h, l) in hi.iter_mut().zip(lo.iter_mut()) {
        let r = mix64(state);
        *h = (r >> 32) as u32;
        *l = r as u32;
        state = state.wrapping_add(GAMMA);
    }
}

/// A [`keep_cutoff`] as a 32-bit comparison: (last, none): keep when `bits <= last` unless
/// `none` (cutoff 0: nothing kept).
#[inline(always)]
fn last_kept(cutoff: u64) -> (u32, bool) {
    match cutoff.checked_sub(1) {
        Some(c) => (c.min(u32::MAX as u64) as u32, false),
        None => (0, true),
    }
}

/// The draws ([`bits32`]) of the entries `first..first + n`, run by run, in order: each
/// [`Draws::next`] gives `(j, draws)`, the draws of entries `first + j..first + j + draws.len()`:
/// entry by entry up to the first block boundary and after the last whole block, whole
/// half-blocks of 512 (from [`block_bits`]) in between. The one walk behind every kernel here, so
/// they all follow the documented layout. A loop over it rather than a closure: a closure is
/// compiled apart from the kernel that calls it, without the kernel's instruction set.
struct Draws {
    key: u64,
    first: u64,
    n: usize,
    j: usize,
    hi: [u32; HALF],
    lo: [u32; HALF],
    /// The low half-block is ready and comes next.
    lo_next: bool,
}

impl Draws {
    #[inline(always)]
    fn new(key: u64, first: u64, n: usize) -> Self {
        Draws { key, first, n, j: 0, hi: [0; HALF], lo: [0; HALF], lo_next: false }
    }

    #[inline(always)]
    fn next(&mut self) -> Option<(usize, &[u32])> {
        let j = self.j;
        if self.lo_next {
            self.lo_next = false;
            self.j += HALF;
            return Some((j, &self.lo));
        }
        if j >= self.n {
            return None;
        }
        let i = self.first + j as u64;
        let to_boundary = ((BLOCK - i % BLOCK) % BLOCK) as usize;
        if to_boundary == 0 && self.n - j >= BLOCK as usize {
            block_bits(self.key, i / BLOCK, &mut self.hi, &mut self.lo);
            self.lo_next = true;
            self.j += HALF;
            return Some((j, &self.hi));
        }
        // Before the first block boundary or after the last whole block: entry by entry.
        let end = if to_boundary == 0 { self.n } else { self.n.min(j + to_boundary) };
        let len = (end - j).min(HALF);
        for (k, d) in self.hi[..len].iter_mut().enumerate() {
            *d = bits32(self.key, i + k as u64);
        }
        self.j += len;
        Some((j, &self.hi[..len]))
    }
}

crate::simd::kernel! {
    /// DARE's masked, scaled task vector for one run of entries: `out[j] = (x[j] * scale) * w`
    /// when entry `first + j` of the stream `key` is kept (see [`keep`]), else 0. With AVX-512
    /// the generator's 64-bit multiplies run in vector lanes: measured on the 1.1B benchmark,
    /// the scalar generator was 70% of the CPU time of `dare_linear`.
    pub fn masked_scale(key: u64, first: u64, cutoff: u64, x: &[f32], scale: f32, w: f32, out: &mut [f32]) {
        let (last, none) = last_kept(cutoff);
        let mut draws = Draws::new(key, first, x.len());
        while let Some((j0, bits)) = draws.next() {
            let (xs, os) = (&x[j0..j0 + bits.len()], &mut out[j0..j0 + bits.len()]);
            for ((o, &d), &r) in os.iter_mut().zip(xs).zip(bits) {
                *o = (if r <= last && !none { d * scale } else { 0.0 }) * w;
            }
        }
    }
}

crate::simd::kernel! {
    /// Sums of |x| over a run of entries, all of them and the kept ones (stream `key` from
    /// index `first`): the two L1 norms of DARE's `rescale: l1`. Summed in 8 interleaved f64
    /// lanes (entry i into lane i % 8, i the entry's index in the tensor; each lane in index
    /// order), then the lanes in order: a fixed order for a given chunking, the same on every
    /// build, and one the compiler can vectorise.
    pub fn masked_l1(key: u64, first: u64, cutoff: u64, x: &[f32]) -> (f64, f64) {
        let (last, none) = last_kept(cutoff);
        let (mut all, mut kept) = ([0f64; 8], [0f64; 8]);
        let is_kept = |r: u32| r <= last && !none;
        let mut draws = Draws::new(key, first, x.len());
        while let Some((j0, bits)) = draws.next() {
            let xs = &x[j0..j0 + bits.len()];
            if (first + j0 as u64).is_multiple_of(8) && xs.len().is_multiple_of(8) {
                // Half-blocks: lane l of each run of 8 is lane l of the tensor (vectorises).
                for (run, rs) in xs.chunks_exact(8).zip(bits.chunks_exact(8)) {
                    for l in 0..8 {
                        let a = run[l].abs() as f64;
                        all[l] += a;
                        kept[l] += if is_kept(rs[l]) { a } else { 0.0 };
                    }
                }
            } else {
                for (k, (&v, &r)) in xs.iter().zip(bits).enumerate() {
                    let (lane, a) = (((first + (j0 + k) as u64) % 8) as usize, v.abs() as f64);
                    all[lane] += a;
                    kept[lane] += if is_kept(r) { a } else { 0.0 };
                }
            }
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
        let x: Vec<f32> = (0..5003).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect(); // head, 3 blocks, tail
        let (key, cut) = (stream_key(5, "t", 1), keep_cutoff(0.4));
        let mut out = vec![0f32; x.len()];
        masked_scale(key, 17, cut, &x, 2.5, 0.5, &mut out);
        for (j, (&o, &d)) in out.iter().zip(&x).enumerate() {
            let expect = if keep(key, 17 + j as u64, cut) { d * 2.5 * 0.5 } else { 0.0 };
            assert_eq!(o, expect, "j={j}");
        }
        // The sums: lane i % 8 in index order, then the lanes in order, exactly.
        let (mut lane_all, mut lane_kept) = ([0f64; 8], [0f64; 8]);
        for (j, d) in x.iter().enumerate() {
            let i = 17 + j as u64;
            lane_all[(i % 8) as usize] += d.abs() as f64;
            lane_kept[(i % 8) as usize] += if keep(key, i, cut) { d.abs() as f64 } else { 0.0 };
        }
        let (all, kept) = masked_l1(key, 17, cut, &x);
        assert_eq!(all, lane_all.iter().sum::<f64>());
        assert_eq!(kept, lane_kept.iter().sum::<f64>());
        assert!(kept < all && kept > 0.0);
    }

    #[test]
    fn two_entries_per_output_in_the_documented_layout() {
        let key = stream_key(3, "t", 0);
        for b in [0u64, 1, 1000] {
            for l in [0u64, 1, 7, 300, 511] {
                let r = at(key, b * 512 + l);
                assert_eq!(bits32(key, b * 1024 + l), (r >> 32) as u32);
                assert_eq!(bits32(key, b * 1024 + 512 + l), r as u32);
            }
        }
        // Runs starting anywhere (head, whole blocks, tail) agree with the entry-wise rule.
        let x = vec![1f32; 3000];
        for p in [0.0, 0.5, 1.0] {
            let cut = keep_cutoff(p);
            for first in [0u64, 5, 1024, 2047] {
                let mut out = vec![0f32; x.len()];
                masked_scale(key, first, cut, &x, 1.0, 1.0, &mut out);
                for (j, &o) in out.iter().enumerate() {
                    assert_eq!(o == 1.0, keep(key, first + j as u64, cut), "p {p} first {first} j {j}");
                }
                let (all, kept) = masked_l1(key, first, cut, &x);
                assert_eq!((all, kept), (3000.0, out.iter().sum::<f32>() as f64), "p {p} first {first}");
            }
        }
        for first in [0u64, 5, 1024, 2047] {
            let mut bits = vec![0u32; 3000];
            fill_bits(key, first, &mut bits);
            assert!(bits.iter().enumerate().all(|(j, &b)| b == bits32(key, first + j as u64)), "first {first}");
        }
        assert_eq!(keep_cutoff(0.5), 1 << 31);
        for p in [1e-12, 0.1, 0.3, 0.8, 0.999_999_999] {
            assert_eq!(keep_cutoff(p), (p * 4294967296.0).ceil() as u64, "p {p}");
        }
        assert!(!keep(key, 0, keep_cutoff(0.0)) && keep(key, 0, keep_cutoff(1.0)));
    }
}
