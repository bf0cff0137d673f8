//! Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models",
//! arXiv:2403.19522), as mergekit's `model_stock`.
//!
//! Per tensor, with base w_0, the models w_1..w_N (N >= 2) and offsets o_i = w_i - w_0:
//! cos = the mean over pairs i < j of <o_i, o_j> / max(|o_i| |o_j|, 1e-6), each clamped to
//! [-1, 1]; t = N cos / (1 + (N - 1) cos) (t = 0 when |1 + (N - 1) cos| < 1e-6: keep the base);
//! out = t * mean_i(w_i) + (1 - t) * w_0. The norms and dot products are f64 sums over fixed
//! blocks (a statistics pass); the output is computed in f32 in mergekit's order. A tensor that
//! fewer than two models have keeps the base.
//!
//! `filter_wise: true` (mergekit's option) computes one t per filter: per row along the last
//! dimension of a tensor of two or more dimensions (a 1-D tensor is one row, as mergekit's
//! `unsqueeze(0)` makes it). Rows are independent, so no statistics pass is needed: the engine
//! hands the apply pass whole rows and each row's norms and dot products are f64 sums over that
//! row, in index order.

use crate::error::{Error, Result};
use crate::methods::{BaseUse, Chunk, Method, ParamSpec, Stats, TensorCtx, TensorRecipe};
use crate::params::Params;

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "filter_wise",
    per_model: false,
    default: "false",
    doc: "one interpolation factor per row (along the last dimension) instead of per tensor (mergekit's filter_wise)",
}];

/// Model Stock.
#[derive(Debug, Clone, Copy)]
pub struct ModelStock {
    /// One t per row of the last dimension (mergekit's `filter_wise`).
    pub filter_wise: bool,
}

impl ModelStock {
    /// Checks the model count and reads `filter_wise`.
    pub fn from_params(params: &Params) -> Result<ModelStock> {
        let filter_wise =
            params.flag("filter_wise", false).map_err(|r| Error::Param { name: "filter_wise".into(), reason: r, place: String::new() })?;
        if params.models.len() < 2 {
            return Err(Error::Spec(format!("model_stock needs at least 2 models besides the base, got {}", params.models.len())));
        }
        Ok(ModelStock { filter_wise })
    }
}

/// Adds the offsets' squared norms and pair dot products (o_i = x_i - base, in f32 as mergekit
/// subtracts) over these elements to `acc` (the layout of [`factor`]), in f64, in index order.
fn offset_sums(base: &[f32], inputs: &[&[f32]], acc: &mut [f64]) {
    let m = inputs.len();
    let mut off = vec![0f32; m];
    for (k, &b) in base.iter().enumerate() {
        for (o, x) in off.iter_mut().zip(inputs) {
            *o = x[k] - b;
        }
        for i in 0..m {
            let a = off[i] as f64;
            acc[i] += a * a;
            for j in i + 1..m {
                acc[pair_index(m, i, j)] += a * off[j] as f64;
            }
        }
    }
}

/// out = t * mean_i(x_i) + (1 - t) * base over these elements, in f32 in mergekit's order.
fn interpolate(t: f32, base: &[f32], inputs: &[&[f32]], out: &mut [f32]) {
    let count = inputs.len() as f32;
    let one_minus_t = 1.0 - t;
    for (k, o) in out.iter_mut().enumerate() {
        let mut sum = 0.0f32;
        for x in inputs {
            sum += x[k];
        }
        *o = t * (sum / count) + one_minus_t * base[k];
    }
}

/// Index of the dot product of models i < j among the reductions (after the m norms).
fn pair_index(m: usize, i: usize, j: usize) -> usize {
    m + i * m - i * (i + 1) / 2 + (j - i - 1)
}

/// The interpolation factor t from the reductions (m squared norms, then the pair dots).
pub fn factor(m: usize, red: &[f64]) -> f32 {
    if m < 2 {
        return 0.0;
    }
    let mut sum = 0f64;
    let mut pairs = 0usize;
    for i in 0..m {
        for j in i + 1..m {
            let norm = (red[i].sqrt() * red[j].sqrt()).max(1e-6);
            sum += (red[pair_index(m, i, j)] / norm).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let cos = sum / pairs as f64;
    let n = m as f64;
    let den = 1.0 + (n - 1.0) * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        (n * cos / den) as f32
    }
}

impl Method for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }

    fn uses_deltas(&self) -> bool {
        false
    }

    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }

    fn plan_tensor(&self, t: &TensorCtx<'_>) -> Result<TensorRecipe> {
        let m = t.models.len();
        let sums = m + m * m.saturating_sub(1) / 2;
        match t.shape {
            [.., c] if self.filter_wise && t.shape.len() >= 2 => {
                Ok(TensorRecipe { trim: vec![None; m], scalars: Vec::new(), reductions: 0, row: (*c as u64).max(1), score: None })
            }
            _ => Ok(TensorRecipe { trim: vec![None; m], scalars: Vec::new(), reductions: sums, row: 0, score: None }),
        }
    }

    fn reduce(&self, _r: &TensorRecipe, c: &Chunk<'_>, acc: &mut [f64]) {
        if let Some(base) = c.base {
            offset_sums(base, c.inputs, acc);
        }
    }

    fn apply(&self, r: &TensorRecipe, s: &Stats<'_>, c: &Chunk<'_>, out: &mut [f32]) {
        let Some(base) = c.base else { return };
        let m = c.inputs.len();
        if m < 2 {
            out.copy_from_slice(base);
            return;
        }
        if r.row == 0 {
            return interpolate(factor(m, s.tensor), base, c.inputs, out);
        }
        // filter_wise: the chunk holds whole rows; each row gets its own t.
        let row = r.row as usize;
        let mut acc = vec![0f64; m + m * (m - 1) / 2];
        for (ri, (b, o)) in base.chunks(row).zip(out.chunks_mut(row)).enumerate() {
            let xs: Vec<&[f32]> = c.inputs.iter().map(|x| &x[ri * row..ri * row + b.len()]).collect();
            acc.fill(0.0);
            offset_sums(b, &xs, &mut acc);
            interpolate(factor(m, &acc), b, &xs, o);
        }
    }

    fn describe(&self) -> String {
        if self.filter_wise {
            "model_stock (filter_wise)".into()
        } else {
            "model_stock".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::merge_in_memory;

    #[test]
    fn pair_indices_are_dense() {
        let m = 4;
        let mut seen = vec![];
        for i in 0..m {
            for j in i + 1..m {
                seen.push(pair_index(m, i, j));
            }
        }
        assert_eq!(seen, (m..m + 6).collect::<Vec<_>>());
    }

    #[test]
    fn orthogonal_offsets_keep_the_base_and_equal_offsets_take_the_average() {
        let base = [1.0f32, 1.0, 1.0];
        let a = [2.0f32, 1.0, 1.0]; // offset e1
        let b = [1.0f32, 2.0, 1.0]; // offset e2: cos 0 -> t 0
        let p = Params { global: Default::default(), models: vec![Default::default(); 2] };
        assert_eq!(merge_in_memory("model_stock", &p, Some(&base), &[&a, &b], "t", 1, 0).unwrap(), base.to_vec());
        // equal offsets: cos 1 -> t = 2 / 2 = 1: the average.
        assert_eq!(merge_in_memory("model_stock", &p, Some(&base), &[&a, &a], "t", 1, 0).unwrap(), a.to_vec());
    }

    #[test]
    fn filter_wise_takes_one_factor_per_row() {
        // Two rows of 3: row 0 has equal offsets (t = 1: the average), row 1 orthogonal ones
        // (t = 0: the base). Per tensor the mean cosine would mix them.
        let base = [0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let a = [1.0f32, 2.0, 0.0, 2.0, 1.0, 1.0];
        let b = [1.0f32, 2.0, 0.0, 1.0, 2.0, 1.0];
        let m = ModelStock { filter_wise: true };
        let shape = [2usize, 3];
        let params = Params { global: Default::default(), models: vec![Default::default(); 2] };
        let ctx =
            TensorCtx { name: "w", shape: &shape, pos: crate::params::TensorPos { name: "w", t: 0.0 }, params: &params, models: &[0, 1] };
        let r = m.plan_tensor(&ctx).unwrap();
        assert_eq!((r.row, r.reductions), (3, 0));
        let mut out = [0f32; 6];
        m.apply(&r, &Stats { tensor: &[], global: &[] }, &Chunk { tensor: "w", start: 0, base: Some(&base), inputs: &[&a, &b] }, &mut out);
        assert_eq!(out, [1.0, 2.0, 0.0, 1.0, 1.0, 1.0]);
    }
}
