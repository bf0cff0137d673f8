//! The truncated SVD behind LoRA extraction ([`crate::extract`]): Δ ≈ U diag(s) Vᵀ for a matrix
//! Δ (m × n) that is read in row blocks, so that it never has to be held whole.
//!
//! **Randomized** (Halko, Martinsson and Tropp, "Finding structure with randomness", SIAM Review
//! 53(2), 2011: Algorithm 4.4, randomized subspace iteration, then Algorithm 5.1, the direct SVD),
//! for rank k with ℓ = k + p sketch columns (p the oversampling):
//!
//! 1. Ω, n × ℓ, standard normal, from the counter-based generator of [`crate::methods::rng`]
//!    keyed by the seed and the tensor's name; entry (j, c) is draw c·n + j, so a larger ℓ only
//!    appends columns to the same sketch;
//! 2. Y = ΔΩ and Q = orth(Y); then q times: Q̂ = orth(ΔᵀQ), Q = orth(ΔQ̂). Orthonormalising
//!    after every product keeps the directions of small singular values from being lost to
//!    rounding (HMT §4.5);
//! 3. Bᵀ = ΔᵀQ (n × ℓ) and its thin SVD Bᵀ = V Σ Wᵀ, so that Δ ≈ QQᵀΔ = (QW) Σ Vᵀ; the first k
//!    triplets are kept.
//!
//! HMT's bound (their Corollary 10.10) on the expected error of the rank-ℓ projection is
//! `(1 + 4 sqrt(ℓ) / (p - 1) * sqrt(min(m, n)))^(1 / (2q + 1))` times σ_{k+1}, the best possible:
//! each power iteration shrinks the excess geometrically, and with a decaying spectrum two of them
//! (the default of `extract`) bring the error to within rounding of the optimum.
//!
//! **Exact**: when the sketch would be as wide as the matrix (ℓ ≥ min(m, n)), Δ is gathered in
//! float64 and decomposed by faer's SVD.
//!
//! **Passes and determinism.** Every pass over Δ is a product by row blocks whose height depends
//! only on the shape ([`block_rows`]): ΔX block by block into disjoint rows of the result; ΔᵀY as
//! the sum over blocks of Δ_bᵀ Y_b, added in block order (a pass computes a wave of blocks at a
//! time, as many as memory allows, but the additions always run in block order). Each block's
//! product runs on one thread (faer built without its own parallelism), blocks run in parallel
//! on the caller's rayon pool, so the result is the same for any thread count and budget. The
//! products are float32 (Δ is float32 once decoded); the orthonormalisations (Householder QR)
//! and the small SVD are float64.

use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::methods::rng;

/// Elements of Δ per row block (1 MiB of float32): large enough for efficient products, small
/// enough that a block's decoded rows stay in cache and that most tensors have many blocks.
pub const BLOCK_ELEMS: usize = 1 << 18;

/// A matrix read in row blocks of [`block_rows`] rows (the last block may be shorter).
pub trait RowBlocks: Sync {
    /// Number of rows, m.
    fn rows(&self) -> usize;
    /// Number of columns, n.
    fn cols(&self) -> usize;
    /// The rows of block `b`, row-major, read (decoded) into `buf` when the matrix is not held in
    /// memory; `buf` is the calling thread's scratch, reused from block to block.
    fn block<'s>(&'s self, b: usize, buf: &'s mut Vec<f32>) -> Result<&'s [f32]>;
}

/// Rows per block for a matrix of `cols` columns: [`BLOCK_ELEMS`] elements, at least one row.
pub fn block_rows(cols: usize) -> usize {
    (BLOCK_ELEMS / cols.max(1)).max(1)
}

/// The number of row blocks of an `rows × cols` matrix.
pub fn n_blocks(rows: usize, cols: usize) -> usize {
    rows.div_ceil(block_rows(cols))
}

/// The rows of block `b`.
pub fn block_range(b: usize, rows: usize, cols: usize) -> Range<usize> {
    let h = block_rows(cols);
    (b * h).min(rows)..((b + 1) * h).min(rows)
}

/// A row-major matrix held in memory.
pub struct Dense<'a> {
    /// The elements, row after row.
    pub data: &'a [f32],
    /// m.
    pub rows: usize,
    /// n.
    pub cols: usize,
}

impl RowBlocks for Dense<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn block<'s>(&'s self, b: usize, _buf: &'s mut Vec<f32>) -> Result<&'s [f32]> {
        let r = block_range(b, self.rows, self.cols);
        self.data
            .get(r.start * self.cols..r.end * self.cols)
            .ok_or_else(|| Error::Internal(format!("row block {b} outside a {} x {} matrix", self.rows, self.cols)))
    }
}

/// A truncated SVD Δ ≈ U diag(s) Vᵀ with k triplets.
#[derive(Debug, Clone)]
pub struct Truncated {
    /// U, m × k, row-major; orthonormal columns.
    pub u: Vec<f32>,
    /// The singular values, non-increasing.
    pub s: Vec<f64>,
    /// Vᵀ, k × n, row-major; orthonormal rows.
    pub vt: Vec<f32>,
    /// ‖Δ‖²_F (from the float32 values, summed in float64).
    pub frob2: f64,
    /// True when computed by the exact SVD.
    pub exact: bool,
}

impl Truncated {
    /// The number of triplets, k.
    pub fn k(&self) -> usize {
        self.s.len()
    }

    /// ‖Δ − U_r diag(s_r) V_rᵀ‖_F / ‖Δ‖_F for the first `r` triplets: sqrt(‖Δ‖² − Σ_{i<r} s_i²)
    /// relative to ‖Δ‖ (exact for the projection onto orthonormal U; rounding of the two sums
    /// makes it unreliable below about 1e-3). 0 for Δ = 0.
    pub fn relative_error(&self, r: usize) -> f64 {
        if self.frob2 <= 0.0 {
            return 0.0;
        }
        let kept: f64 = self.s.iter().take(r).map(|s| s * s).sum();
        ((self.frob2 - kept).max(0.0) / self.frob2).sqrt()
    }
}

/// Options of [`randomized_svd`].
#[derive(Debug, Clone, Copy)]
pub struct Sketch {
    /// Extra sketch columns beyond the rank, p.
    pub oversample: usize,
    /// Power (subspace) iterations, q.
    pub power_iters: usize,
    /// The generator's stream key for Ω ([`rng::stream_key`] of the seed and the tensor's name).
    pub key: u64,
    /// Blocks of a ΔᵀY pass computed at once (memory: one n × ℓ partial product each); does not
    /// change the result.
    pub wave: usize,
}

/// A standard normal draw from 64 random bits (Box–Muller, the cosine half): u1 in (0, 1) from the
/// high 32 bits, u2 in [0, 1) from the low ones.
fn normal(bits: u64) -> f32 {
    const TWO32: f64 = 4_294_967_296.0;
    let u1 = ((bits >> 32) as f64 + 0.5) / TWO32;
    let u2 = (bits & 0xffff_ffff) as f64 / TWO32;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// The test matrix Ω: `rows × cols` standard normal entries, row-major; entry (j, c) is draw
/// `c * rows + j` of the stream `key`, so the first columns do not depend on `cols`.
pub fn gaussian(key: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1)).enumerate().for_each(|(j, row)| {
        for (c, x) in row.iter_mut().enumerate() {
            *x = normal(rng::at(key, (c * rows + j) as u64));
        }
    });
    out
}

/// Y = ΔX for X (n × l, row-major); also ‖Δ‖²_F when `norm` (block sums added in block order).
pub fn mul(op: &dyn RowBlocks, x: &[f32], l: usize, norm: bool) -> Result<(Vec<f32>, f64)> {
    let (m, n) = (op.rows(), op.cols());
    let h = block_rows(n);
    let mut y = vec![0f32; m * l];
    let xr = MatRef::from_row_major_slice(x, n, l);
    let sums: Vec<f64> = y
        .par_chunks_mut((h * l).max(1))
        .enumerate()
        .map_init(Vec::new, |buf, (b, yb)| -> Result<f64> {
            let d = op.block(b, buf)?;
            let rows = block_range(b, m, n).len();
            let dm = MatRef::from_row_major_slice(d, rows, n);
            matmul(MatMut::from_row_major_slice_mut(yb, rows, l), Accum::Replace, dm, xr, 1.0f32, Par::Seq);
            Ok(if norm { d.iter().map(|&v| v as f64 * v as f64).sum() } else { 0.0 })
        })
        .collect::<Result<_>>()?;
    Ok((y, sums.iter().sum()))
}

/// Z = ΔᵀY for Y (m × l, row-major): Σ_b Δ_bᵀ Y_b, `wave` blocks computed at a time, added in
/// block order.
pub fn mul_t(op: &dyn RowBlocks, y: &[f32], l: usize, wave: usize) -> Result<Vec<f32>> {
    const ADD_CHUNK: usize = 1 << 14;
    let (m, n) = (op.rows(), op.cols());
    let nb = n_blocks(m, n);
    let mut z = vec![0f32; n * l];
    let wave = wave.clamp(1, nb.max(1));
    let mut parts: Vec<Vec<f32>> = (0..wave).map(|_| vec![0f32; n * l]).collect();
    for w0 in (0..nb).step_by(wave) {
        let w1 = (w0 + wave).min(nb);
        parts[..w1 - w0]
            .par_iter_mut()
            .enumerate()
            .map_init(Vec::new, |buf, (i, p)| -> Result<()> {
                let b = w0 + i;
                let r = block_range(b, m, n);
                let d = op.block(b, buf)?;
                let dm = MatRef::from_row_major_slice(d, r.len(), n);
                let yb = MatRef::from_row_major_slice(&y[r.start * l..r.end * l], r.len(), l);
                matmul(MatMut::from_row_major_slice_mut(p, n, l), Accum::Replace, dm.transpose(), yb, 1.0f32, Par::Seq);
                Ok(())
            })
            .collect::<Result<()>>()?;
        let done = &parts[..w1 - w0];
        z.par_chunks_mut(ADD_CHUNK).enumerate().for_each(|(c, zc)| {
            let (off, len) = (c * ADD_CHUNK, zc.len());
            for p in done {
                for (a, b) in zc.iter_mut().zip(&p[off..off + len]) {
                    *a += *b;
                }
            }
        });
    }
    Ok(z)
}

/// An orthonormal basis of the columns of `y` (rows × l, row-major, rows ≥ l): the thin Q of its
/// Householder QR, in float64.
fn orth(y: &[f32], rows: usize, l: usize) -> Mat<f64> {
    Mat::<f64>::from_fn(rows, l, |i, j| y[i * l + j] as f64).qr().compute_thin_Q()
}

/// A float64 matrix as row-major float32.
fn rows_f32(a: MatRef<'_, f64>) -> Vec<f32> {
    let (r, c) = (a.nrows(), a.ncols());
    let mut out = vec![0f32; r * c];
    for j in 0..c {
        for i in 0..r {
            out[i * c + j] = a[(i, j)] as f32;
        }
    }
    out
}

fn svd_failed(what: &str) -> Error {
    Error::Internal(format!("the SVD of {what} did not converge"))
}

/// Bytes of memory [`randomized_svd`] holds at once for an m × n matrix and ℓ sketch columns
/// (sketches and bases in float32 and float64, the wave's partial products), beside the
/// matrix's own blocks.
pub fn sketch_bytes(m: usize, n: usize, l: usize, wave: usize) -> u64 {
    ((m + n) as u64 * l as u64) * 28 + (wave as u64) * (n as u64) * (l as u64) * 4
}

/// Bytes [`exact_svd`] holds for an m × n matrix: the matrix and both factors in float64.
pub fn exact_bytes(m: usize, n: usize) -> u64 {
    let k = m.min(n) as u64;
    (m as u64 * n as u64 + (m as u64 + n as u64) * k) * 8 * 2
}

/// The rank-`k` truncated SVD of `op` by randomized subspace iteration (module docs); ℓ = k + p
/// must be at most min(m, n) (callers use [`exact_svd`] otherwise).
pub fn randomized_svd(op: &dyn RowBlocks, k: usize, sk: &Sketch) -> Result<Truncated> {
    let (m, n) = (op.rows(), op.cols());
    let l = (k + sk.oversample).min(m.min(n));
    if k == 0 || l == 0 || l > m.min(n) {
        return Err(Error::Internal(format!("randomized SVD of rank {k} asked of a {m} x {n} matrix")));
    }
    let omega = gaussian(sk.key, n, l);
    let (y, frob2) = mul(op, &omega, l, true)?;
    drop(omega);
    let mut q = orth(&y, m, l);
    drop(y);
    for _ in 0..sk.power_iters {
        let z = mul_t(op, &rows_f32(q.as_ref()), l, sk.wave)?;
        let qh = orth(&z, n, l);
        drop(z);
        let (y, _) = mul(op, &rows_f32(qh.as_ref()), l, false)?;
        q = orth(&y, m, l);
    }
    // Bᵀ = ΔᵀQ = V Σ Wᵀ, so Δ ≈ Q B = (Q W) Σ Vᵀ.
    let bt = mul_t(op, &rows_f32(q.as_ref()), l, sk.wave)?;
    let bt = Mat::<f64>::from_fn(n, l, |i, j| bt[i * l + j] as f64);
    let svd = bt.thin_svd().map_err(|_| svd_failed("the projected matrix"))?;
    let k = k.min(l);
    let mut u = Mat::<f64>::zeros(m, k);
    matmul(u.as_mut(), Accum::Replace, q.as_ref(), svd.V().subcols(0, k), 1.0f64, Par::Seq);
    let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
    let vt = rows_f32(svd.U().subcols(0, k).transpose());
    Ok(Truncated { u: rows_f32(u.as_ref()), s, vt, frob2, exact: false })
}

/// The first `k` (at most min(m, n)) triplets of the exact SVD of `op`, gathered in float64.
pub fn exact_svd(op: &dyn RowBlocks, k: usize) -> Result<Truncated> {
    let (m, n) = (op.rows(), op.cols());
    let mut a = Mat::<f64>::zeros(m, n);
    let mut buf = Vec::new();
    let mut frob2 = 0f64;
    for b in 0..n_blocks(m, n) {
        let r = block_range(b, m, n);
        let d = op.block(b, &mut buf)?;
        let mut sum = 0f64;
        for (i, row) in d.chunks_exact(n.max(1)).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                a[(r.start + i, j)] = v as f64;
                sum += v as f64 * v as f64;
            }
        }
        frob2 += sum;
    }
    let svd = a.thin_svd().map_err(|_| svd_failed("the task vector"))?;
    let k = k.min(m.min(n));
    let s: Vec<f64> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
    Ok(Truncated { u: rows_f32(svd.U().subcols(0, k)), s, vt: rows_f32(svd.V().subcols(0, k).transpose()), frob2, exact: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix with known singular values: U diag(s) Vᵀ with orthonormal U and V from QRs of
    /// seeded Gaussian matrices.
    fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Vec<f32> {
        let k = s.len();
        let qu = orth(&gaussian(seed, m, k), m, k);
        let qv = orth(&gaussian(seed + 1, n, k), n, k);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut x = 0f64;
                for (c, sc) in s.iter().enumerate() {
                    x += qu[(i, c)] * sc * qv[(j, c)];
                }
                out[i * n + j] = x as f32;
            }
        }
        out
    }

    fn sketch(key: u64) -> Sketch {
        Sketch { oversample: 10, power_iters: 2, key, wave: 3 }
    }

    #[test]
    fn gaussian_draws_have_unit_moments_and_nest() {
        let g = gaussian(7, 500, 40);
        let mean = g.iter().map(|&x| x as f64).sum::<f64>() / g.len() as f64;
        let var = g.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / g.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
        let narrow = gaussian(7, 500, 25);
        for j in 0..500 {
            assert_eq!(&g[j * 40..j * 40 + 25], &narrow[j * 25..(j + 1) * 25]);
        }
    }

    #[test]
    fn products_match_a_naive_float64_product() {
        let (m, n, l) = (1000usize, 300usize, 5usize); // block_rows(300) = 873: two blocks
        let d = gaussian(1, m, n);
        let x = gaussian(2, n, l);
        let y = gaussian(3, m, l);
        let op = Dense { data: &d, rows: m, cols: n };
        let (got, frob2) = mul(&op, &x, l, true).unwrap();
        let got_t = mul_t(&op, &y, l, 1).unwrap();
        for i in 0..m {
            for c in 0..l {
                let want: f64 = (0..n).map(|j| d[i * n + j] as f64 * x[j * l + c] as f64).sum();
                assert!((got[i * l + c] as f64 - want).abs() < 1e-3, "{} vs {want}", got[i * l + c]);
            }
        }
        for j in 0..n {
            for c in 0..l {
                let want: f64 = (0..m).map(|i| d[i * n + j] as f64 * y[i * l + c] as f64).sum();
                assert!((got_t[j * l + c] as f64 - want).abs() < 2e-3);
            }
        }
        let want2: f64 = d.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((frob2 - want2).abs() <= 1e-9 * want2);
        // The wave only changes when partial products are computed, never the result.
        for wave in [2, 5] {
            assert_eq!(mul_t(&op, &y, l, wave).unwrap(), got_t);
        }
    }

    #[test]
    fn randomized_svd_recovers_a_decaying_spectrum() {
        let (m, n) = (300usize, 200usize);
        let s: Vec<f64> = (0..60).map(|i| 0.7f64.powi(i)).collect();
        let d = with_spectrum(m, n, &s, 11);
        let op = Dense { data: &d, rows: m, cols: n };
        let k = 8;
        let t = randomized_svd(&op, k, &sketch(5)).unwrap();
        assert_eq!((t.k(), t.u.len(), t.vt.len()), (k, m * k, k * n));
        for i in 0..k {
            assert!((t.s[i] - s[i]).abs() <= 1e-5 * s[0], "sigma {i}: {} vs {}", t.s[i], s[i]);
        }
        let best: f64 = s[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
        let total: f64 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((t.relative_error(k) * total - best).abs() <= 1e-4 * best);
        // U and V orthonormal.
        for a in 0..k {
            for b in 0..k {
                let uu: f64 = (0..m).map(|i| t.u[i * k + a] as f64 * t.u[i * k + b] as f64).sum();
                let vv: f64 = (0..n).map(|j| t.vt[a * n + j] as f64 * t.vt[b * n + j] as f64).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((uu - want).abs() < 1e-5 && (vv - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn exact_svd_reproduces_the_matrix() {
        let (m, n) = (9usize, 14usize);
        let d = gaussian(3, m, n);
        let t = exact_svd(&Dense { data: &d, rows: m, cols: n }, 50).unwrap();
        assert_eq!(t.k(), 9);
        assert!(t.exact && t.s.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..m {
            for j in 0..n {
                let x: f64 = (0..9).map(|c| t.u[i * 9 + c] as f64 * t.s[c] * t.vt[c * n + j] as f64).sum();
                assert!((x - d[i * n + j] as f64).abs() < 1e-5);
            }
        }
        assert!(t.relative_error(9) < 1e-3);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n) = (2000usize, 150usize);
        let d = gaussian(9, m, n);
        let op = Dense { data: &d, rows: m, cols: n };
        let run = |threads: usize, wave: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| randomized_svd(&op, 6, &Sketch { wave, ..sketch(4) }).unwrap())
        };
        let one = run(1, 1);
        for (threads, wave) in [(2, 2), (3, 7), (4, 1)] {
            let other = run(threads, wave);
            assert_eq!((&one.u, &one.s, &one.vt), (&other.u, &other.s, &other.vt));
        }
    }
}
