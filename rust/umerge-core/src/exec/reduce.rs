//! Reductions: a method's f64 sums over fixed blocks, added in block order so they do not depend
//! on the chunk size or the thread count.

use super::engine::{Cache, Data, Engine, Item, Job};
use super::selection::Selection;
use super::trim::Cuts;
use crate::error::{Error, Result};
use crate::methods::Chunk;

/// Which of a method's reductions a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reduction {
    /// [`crate::methods::Method::reduce`]: the job's own `recipe.reductions` sums.
    Tensor,
    /// [`crate::methods::Method::reduce_global`]: the sums over the whole merge.
    Global,
}

/// The least memory the partial sums of a reduction pass may take, whatever the budget: a few
/// dozen sums per block always fit (the allowance below is a share of the budget, which the
/// in-memory API sets to 0).
const MIN_PARTS_BYTES: u64 = 64 << 10;

impl Engine<'_> {
    /// Per-block partial reductions of one job's items (trimmed), summed in block order.
    ///
    /// The partial sums of every block are kept until they are added in order, so that the
    /// total does not depend on which thread finished first. A method with many sums per tensor
    /// (nuslerp by columns keeps three per column) would hold blocks x sums of them: the items
    /// are therefore taken in windows whose partial sums fit the list allowance (an eighth of
    /// the budget, unused once the selection is done), each window's blocks added to the total
    /// in order before the next starts. The order of the additions is the same for any window,
    /// so the bytes do not change; a tensor whose sums do not fit twice (the total and one
    /// item's blocks) is an error naming it.
    pub(super) fn block_reduce(
        &self,
        job: &Job<'_>,
        items: &[Item],
        mut cache: Option<&mut Cache>,
        cuts: &Cuts<'_>,
        which: Reduction,
    ) -> Result<Vec<f64>> {
        let n = match which {
            Reduction::Tensor => job.recipe.reductions,
            Reduction::Global => self.method.global_reductions(),
        };
        let (block, chunk) = self.layout(job);
        let sums_bytes = n as u64 * 8;
        let item_bytes = sums_bytes * chunk.div_ceil(block).max(1) as u64;
        let allowed = self.list_bytes.max(MIN_PARTS_BYTES);
        if sums_bytes + item_bytes > allowed {
            return Err(Error::Budget {
                tensor: job.name.to_string(),
                what: format!("{n} per-tensor sums of {}, in float64, twice", self.method.name()),
                need: sums_bytes + item_bytes,
                allowed,
            });
        }
        let window = (((allowed - sums_bytes) / item_bytes.max(1)) as usize).max(1);
        let mut total = vec![0f64; n];
        for (w, part) in items.chunks(window).enumerate() {
            let per_item = self.for_trimmed(job, part, w * window, cache.as_deref_mut(), cuts, &|_, c| {
                let mut parts = Vec::new();
                let len = c.len();
                let mut s = 0usize;
                while s < len {
                    let e = (s + block).min(len);
                    let views: Vec<&[f32]> = c.inputs.iter().map(|v| &v[s..e]).collect();
                    let b = Chunk { tensor: c.tensor, start: c.start + s as u64, base: c.base.map(|b| &b[s..e]), inputs: &views };
                    let mut acc = vec![0f64; n];
                    match which {
                        Reduction::Tensor => self.method.reduce(job.recipe, &b, &mut acc),
                        Reduction::Global => self.method.reduce_global(job.recipe, &b, &mut acc),
                    }
                    parts.push(acc);
                    s = e;
                }
                Ok(parts)
            })?;
            for p in per_item.into_iter().flatten() {
                for (a, b) in total.iter_mut().zip(p) {
                    *a += b;
                }
            }
        }
        Ok(total)
    }

    /// The method's global reductions over every job (after trimming), added job by job in order;
    /// empty when the method has none. `offsets[j]`: job j's first item in the whole-model
    /// selection `model_sel`.
    pub(super) fn global_reductions(
        &self,
        jobs: &[Job<'_>],
        per_job: &[Vec<Item>],
        offsets: &[usize],
        model_sel: Option<&Selection>,
    ) -> Result<Vec<f64>> {
        let mut global_acc = vec![0f64; self.method.global_reductions()];
        if global_acc.is_empty() {
            return Ok(global_acc);
        }
        for (ji, job) in jobs.iter().enumerate() {
            let items = &per_job[ji];
            let tensor = self.tensor_selection(jobs, ji, items, Data::Stream)?;
            let cuts = Cuts { tensor: &tensor, model: model_sel.map(|g| (g, offsets[ji])), score: None };
            let part = self.block_reduce(job, items, None, &cuts, Reduction::Global)?;
            for (a, b) in global_acc.iter_mut().zip(part) {
                *a += b;
            }
        }
        Ok(global_acc)
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, Result};
    use crate::exec::{Engine, Job, SliceSink, SliceSource, Source};
    use crate::methods::{self, TensorCtx};
    use crate::params::{ParamValue, Params, TensorPos};

    /// nuslerp by columns of a [64, 3000] tensor: 9000 sums (72 KB) per block, 3 blocks.
    fn by_columns(list_bytes: u64, chunk: usize) -> Result<Vec<f32>> {
        let (rows, cols) = (64usize, 3000usize);
        let n = rows * cols;
        let x0: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
        let x1: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        let mut p = Params::default();
        p.global.insert("nuslerp_flatten".into(), ParamValue::Bool(false));
        p.global.insert("nuslerp_row_wise".into(), ParamValue::Bool(true));
        p.models = vec![Default::default(); 2];
        let method = methods::build("nuslerp", &p)?;
        let shape = [rows, cols];
        let ctx = TensorCtx { name: "w", shape: &shape, pos: TensorPos { name: "w", t: 0.0 }, params: &p, models: &[0, 1] };
        let recipe = method.plan_tensor(&ctx)?;
        assert_eq!(recipe.reductions, 3 * cols);
        let (s0, s1) = (SliceSource(&x0), SliceSource(&x1));
        let job =
            Job { name: "w", numel: n as u64, base: None, models: vec![&s0 as &dyn Source, &s1], model_ids: vec![0, 1], recipe: &recipe };
        let mut out = vec![0f32; n];
        {
            let mut bufs = [out.as_mut_slice()];
            let sink = SliceSink::new(&mut bufs);
            let mut engine = Engine::new(method.as_ref(), chunk, 0);
            engine.list_bytes = list_bytes;
            engine.run(std::slice::from_ref(&job), 2, &sink, &|_| Ok(()))?;
        }
        Ok(out)
    }

    #[test]
    fn windows_of_partial_sums_give_the_same_bytes() {
        let whole = by_columns(u64::MAX, 1 << 16).unwrap();
        // 72 KB of sums: room for the total and one item, then two, then all three.
        for list_bytes in [2 * 72_000, 3 * 72_000, 4 * 72_000] {
            assert_eq!(by_columns(list_bytes, 1 << 16).unwrap(), whole, "{list_bytes}");
        }
        // Too little for the total and one block's sums: an error naming the tensor.
        match by_columns(100_000, 1 << 16) {
            Err(e @ Error::Budget { .. }) => assert!(e.to_string().contains("tensor w needs 144000 bytes"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
