//! Trimming: zeroing, in place, the entries of a chunk that a selection's thresholds cut.

use rayon::prelude::*;

use super::engine::{Cache, Engine, Job};
use super::selection::Selection;
use crate::methods::TrimScope;
use crate::select;

/// The thresholds that trim one job's inputs: its tensor-scope selection, and the whole-model
/// selection (when there is one) with the offset of the job's first item in it.
#[derive(Clone, Copy)]
pub(super) struct Cuts<'s> {
    /// The job's own selection (`TrimScope::Tensor` trims).
    pub tensor: &'s Selection,
    /// The whole-model selection and the job's item offset (`TrimScope::Model` trims).
    pub model: Option<(&'s Selection, usize)>,
}

impl Engine<'_> {
    /// Trims one model slot's values of item `item` (index within the tensor).
    fn trim_slot(&self, job: &Job<'_>, slot: usize, values: &mut [f32], cuts: &Cuts<'_>, item: usize) {
        let Some(trim) = job.recipe.trim[slot] else { return };
        match trim.scope {
            TrimScope::Tensor => {
                let tsel = cuts.tensor;
                let (th, eq) = tsel.cut(slot, item);
                match tsel.outlier_key.get(slot).copied().flatten() {
                    Some(ok) => {
                        let (drop, drop_eq) = tsel.cut(ok, item);
                        select::apply_band(values, &th, eq, &drop, drop_eq);
                    }
                    None => select::apply_trim(values, &th, eq),
                }
            }
            TrimScope::Model => {
                if let Some((g, off)) = cuts.model {
                    let (th, eq) = g.cut(job.model_ids[slot], off + item);
                    select::apply_trim(values, &th, eq);
                }
            }
        }
    }

    /// Trims one item's inputs in place.
    pub(super) fn trim(&self, job: &Job<'_>, inputs: &mut [&mut [f32]], cuts: &Cuts<'_>, item: usize) {
        for (slot, values) in inputs.iter_mut().enumerate() {
            self.trim_slot(job, slot, values, cuts, item);
        }
    }

    /// Trims a cached tensor in place, chunk by chunk (same chunks as streaming).
    pub(super) fn trim_cache(&self, job: &Job<'_>, chunk: usize, cache: &mut Cache, cuts: &Cuts<'_>) {
        for (slot, values) in cache.inputs.iter_mut().enumerate() {
            values.par_chunks_mut(chunk).enumerate().for_each(|(ii, c)| self.trim_slot(job, slot, c, cuts, ii));
        }
        cache.trimmed = true;
    }
}
