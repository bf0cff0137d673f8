//! Reductions: a method's f64 sums over fixed blocks, added in block order so they do not depend
//! on the chunk size or the thread count.

use super::engine::{Cache, Data, Engine, Item, Job};
use super::selection::Selection;
use super::trim::Cuts;
use crate::error::Result;
use crate::methods::Chunk;

/// Which of a method's reductions a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reduction {
    /// [`crate::methods::Method::reduce`]: the job's own `recipe.reductions` sums.
    Tensor,
    /// [`crate::methods::Method::reduce_global`]: the sums over the whole merge.
    Global,
}

impl Engine<'_> {
    /// Per-block partial reductions of one job's items (trimmed), summed in block order.
    pub(super) fn block_reduce(
        &self,
        job: &Job<'_>,
        items: &[Item],
        cache: Option<&mut Cache>,
        cuts: &Cuts<'_>,
        which: Reduction,
    ) -> Result<Vec<f64>> {
        let n = match which {
            Reduction::Tensor => job.recipe.reductions,
            Reduction::Global => self.method.global_reductions(),
        };
        let block = self.layout(job).0;
        let per_item = self.for_trimmed(job, items, cache, cuts, &|_, c| {
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
        let mut total = vec![0f64; n];
        for p in per_item.into_iter().flatten() {
            for (a, b) in total.iter_mut().zip(p) {
                *a += b;
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
            let cuts = Cuts { tensor: &tensor, model: model_sel.map(|g| (g, offsets[ji])) };
            let part = self.block_reduce(job, items, None, &cuts, Reduction::Global)?;
            for (a, b) in global_acc.iter_mut().zip(part) {
                *a += b;
            }
        }
        Ok(global_acc)
    }
}
