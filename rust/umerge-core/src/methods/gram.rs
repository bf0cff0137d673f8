//! Gram matrices: the per-tensor reductions of the spherical means (`multislerp`, `karcher`).
//!
//! Both methods only ever combine their inputs linearly, so every norm and dot product they need
//! is a quadratic form in the inputs' Gram matrix G_ij = <v_i, v_j>. One reduction pass gives
//! G (upper triangle, row by row, f64 sums over fixed blocks); the methods then work on m
//! coefficients instead of m whole tensors, and the apply pass writes sum_i c_i v_i.

/// Number of sums for `m` vectors: the upper triangle with the diagonal.
pub fn len(m: usize) -> usize {
    m * (m + 1) / 2
}

/// Adds this chunk's contribution to G, for v_i = x_i - base (float32, as mergekit subtracts)
/// or x_i without a base, in index order.
pub fn accumulate(base: Option<&[f32]>, inputs: &[&[f32]], acc: &mut [f64]) {
    let m = inputs.len();
    let mut v = vec![0f64; m];
    let n = inputs.first().map_or(0, |x| x.len());
    for k in 0..n {
        for (vi, x) in v.iter_mut().zip(inputs) {
            *vi = match base {
                Some(b) => (x[k] - b[k]) as f64,
                None => x[k] as f64,
            };
        }
        let mut at = 0;
        for i in 0..m {
            for j in i..m {
                acc[at] += v[i] * v[j];
                at += 1;
            }
        }
    }
}

/// Index of G_ij, i <= j, among the sums (row i of the triangle starts after the i rows above).
fn index(m: usize, i: usize, j: usize) -> usize {
    i * (2 * m - i + 1) / 2 + (j - i)
}

/// The symmetric m x m matrix from the sums.
pub fn matrix(m: usize, sums: &[f64]) -> Vec<Vec<f64>> {
    (0..m).map(|i| (0..m).map(|j| sums[index(m, i.min(j), i.max(j))]).collect()).collect()
}

/// c^T G d.
pub fn form(g: &[Vec<f64>], c: &[f64], d: &[f64]) -> f64 {
    let mut s = 0f64;
    for (i, row) in g.iter().enumerate() {
        let mut r = 0f64;
        for (j, &gij) in row.iter().enumerate() {
            r += gij * d[j];
        }
        s += c[i] * r;
    }
    s
}

/// |sum_i c_i v_i| from G (0 where rounding makes the square negative).
pub fn norm(g: &[Vec<f64>], c: &[f64]) -> f64 {
    form(g, c, c).max(0.0).sqrt()
}

/// out = base + sum_i c_i v_i over a chunk, in float32, models in order (v_i = x_i - base with a
/// base, else x_i); `c` already rounded to float32.
pub fn combine(c: &[f32], base: Option<&[f32]>, inputs: &[&[f32]], out: &mut [f32]) {
    for (k, o) in out.iter_mut().enumerate() {
        let mut s = 0f32;
        match base {
            Some(b) => {
                for (ci, x) in c.iter().zip(inputs) {
                    s += ci * (x[k] - b[k]);
                }
                *o = b[k] + s;
            }
            None => {
                for (ci, x) in c.iter().zip(inputs) {
                    s += ci * x[k];
                }
                *o = s;
            }
        }
    }
}

/// The apply pass of a method whose reduction gave one f64 coefficient per input (`coef`):
/// [`combine`] with them rounded to f32, except that a single input passes through unchanged.
pub fn apply_coefficients(coef: &[f64], base: Option<&[f32]>, inputs: &[&[f32]], out: &mut [f32]) {
    if inputs.len() == 1 {
        out.copy_from_slice(inputs[0]);
        return;
    }
    let c: Vec<f32> = coef.iter().map(|&x| x as f32).collect();
    combine(&c, base, inputs, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_triangle_order() {
        let (a, b) = ([1.0f32, 2.0], [3.0f32, -1.0]);
        let mut acc = vec![0f64; len(2)];
        accumulate(None, &[&a, &b], &mut acc);
        assert_eq!(acc, vec![5.0, 1.0, 10.0]);
        let g = matrix(2, &acc);
        assert_eq!(g, vec![vec![5.0, 1.0], vec![1.0, 10.0]]);
        // The index follows accumulate's order for any m.
        for m in 1..6 {
            let order: Vec<usize> = (0..m).flat_map(|i| (i..m).map(move |j| index(m, i, j))).collect();
            assert_eq!(order, (0..len(m)).collect::<Vec<_>>(), "m={m}");
        }
        // |a + b|^2 = |(4, 1)|^2 = 17.
        assert_eq!(form(&g, &[1.0, 1.0], &[1.0, 1.0]), 17.0);
        // With a base: v = x - base.
        let mut acc = vec![0f64; len(2)];
        accumulate(Some(&[1.0, 1.0]), &[&a, &b], &mut acc);
        assert_eq!(acc, vec![1.0, -2.0, 8.0]);
    }
}
