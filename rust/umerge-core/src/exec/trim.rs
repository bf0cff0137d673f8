//! Trimming: zeroing, in place, the entries of a chunk that a selection's thresholds cut, and
//! then those that a score cut leaves out (`score`).

use rayon::prelude::*;

use super::engine::{Cache, Engine, Job};
use super::score::ScoreCut;
use super::selection::Selection;
use crate::methods::TrimScope;
use crate::select;

/// The thresholds that trim one job's inputs: its tensor-scope selection, the whole-model
/// selection (when there is one) with the offset of the job's first item in it, and the score
/// cut of a `ScoreSelect::TopOfNonzero` once it is known.
#[derive(Clone, Copy)]
pub(super) struct Cuts<'s> {
    /// The job's own selection (`TrimScope::Tensor` trims).
    pub tensor: &'s Selection,
    /// The whole-model selection and the job's item offset (`TrimScope::Model` trims).
    pub model: Option<(&'s Selection, usize)>,
    /// The score cut, applied to every input after the trims above.
    pub score: Option<&'s ScoreCut>,
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

    /// Trims one item's inputs in place (`base` and `start`: the item's base values and first
    /// element, which a score cut's score may read).
    pub(super) fn trim(&self, job: &Job<'_>, inputs: &mut [&mut [f32]], base: Option<&[f32]>, start: u64, cuts: &Cuts<'_>, item: usize) {
        for (slot, values) in inputs.iter_mut().enumerate() {
            self.trim_slot(job, slot, values, cuts, item);
        }
        if let Some(cut) = cuts.score {
            self.trim_by_score(job, inputs, base, start, cut, item);
        }
    }

    /// Trims a cached tensor in place, chunk by chunk (same chunks as streaming), by its
    /// selections; a score cut is applied afterwards (`Engine::score_trim_cache`).
    pub(super) fn trim_cache(&self, job: &Job<'_>, chunk: usize, cache: &mut Cache, cuts: &Cuts<'_>) {
        for (slot, values) in cache.inputs.iter_mut().enumerate() {
            values.par_chunks_mut(chunk).enumerate().for_each(|(ii, c)| self.trim_slot(job, slot, c, cuts, ii));
        }
        cache.trimmed = true;
    }
}
