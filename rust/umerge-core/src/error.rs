//! The crate's single error type: one variant per way a merge can fail, each saying what and where.
//!
//! Variants are split into bad input (the user can fix it: exit 2 in the CLI) and internal
//! failures (exit 1); [`Error::is_input`] tells which.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the engine reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be opened or read.
    #[error("cannot read {what}: {source} ({path})")]
    Read {
        /// What was being read.
        what: String,
        /// Where.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A path given as a model is neither a safetensors file nor a directory holding one.
    #[error("no safetensors weights found: expected model.safetensors, model.safetensors.index.json or *.safetensors ({path})")]
    NoWeights {
        /// The path given.
        path: PathBuf,
    },
    /// A PyTorch pickle checkpoint (`pytorch_model.bin`, `.pt`, ...) was given: never unpickled.
    #[error("{} is a PyTorch pickle checkpoint: umerge reads only safetensors, because loading a pickle can run arbitrary code. Convert it once, in an environment you trust: python -c \"import torch; from safetensors.torch import save_file; save_file(torch.load('{}', weights_only=True), 'model.safetensors')\" (or transformers' save_pretrained(dir, safe_serialization=True)) ({})", .path.display(), .path.display(), .path.display())]
    Pickle {
        /// The pickle file.
        path: PathBuf,
    },
    /// An input file changed (truncated, rewritten) while the merge had it mapped.
    #[error("input changed while being read: {reason}: inputs must not be modified during a merge ({path})")]
    InputChanged {
        /// What changed.
        reason: String,
        /// The file.
        path: PathBuf,
    },
    /// A safetensors header breaks the format's rules (size cap, offsets, sizes, coverage).
    #[error("invalid safetensors file: {reason} ({path})")]
    Header {
        /// What is wrong, in the safetensors crate's words plus context.
        reason: String,
        /// The shard file.
        path: PathBuf,
    },
    /// `model.safetensors.index.json` is malformed.
    #[error("invalid shard index: {reason} ({path})")]
    Index {
        /// What is wrong.
        reason: String,
        /// The index file.
        path: PathBuf,
    },
    /// The shard index names a file that does not exist.
    #[error("shard {shard} named in the index does not exist ({path})")]
    MissingShard {
        /// The shard name as written in the index.
        shard: String,
        /// The index file.
        path: PathBuf,
    },
    /// The shard index names a file outside the model directory.
    #[error("shard name {shard:?} in the index points outside the model directory ({path})")]
    ShardOutsideDir {
        /// The shard name as written in the index.
        shard: String,
        /// The index file.
        path: PathBuf,
    },
    /// The same tensor name appears in two shards of one checkpoint.
    #[error("tensor {tensor} appears twice ({first} and {second})")]
    DuplicateTensor {
        /// Tensor name.
        tensor: String,
        /// First file holding it.
        first: PathBuf,
        /// Second file holding it.
        second: PathBuf,
    },
    /// Shapes differ in a way that cannot be merged (boxed: the largest variant would make every
    /// `Result` of this error that large).
    #[error("tensor {} has shape {:?} in {} but {:?} in {}{}", .0.tensor, .0.shape_a, .0.file_a.display(), .0.shape_b, .0.file_b.display(), .0.hint)]
    ShapeMismatch(Box<ShapeMismatch>),
    /// A tensor is missing from an input where it is required.
    #[error("tensor {tensor} is missing from {path}{hint}")]
    MissingTensor {
        /// Tensor name.
        tensor: String,
        /// The input lacking it.
        path: PathBuf,
        /// Extra advice, starting with a space or empty.
        hint: String,
    },
    /// A non-float tensor differs between inputs (only identical copies can be carried over).
    #[error("non-float tensor {tensor} ({dtype}) differs between {file_a} and {file_b}: integer tensors are copied, never merged, so they must be identical")]
    NonFloatDiffers {
        /// Tensor name.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// One file.
        file_a: PathBuf,
        /// Another file with different contents, dtype or shape.
        file_b: PathBuf,
    },
    /// A tensor's dtype cannot take part in a float merge (for example a float tensor in one input and an integer in another).
    #[error("tensor {tensor} has dtype {dtype_a} in {file_a} but {dtype_b} in {file_b}")]
    DtypeMismatch {
        /// Tensor name.
        tensor: String,
        /// Dtype in the first file.
        dtype_a: String,
        /// First file.
        file_a: PathBuf,
        /// Dtype in the second file.
        dtype_b: String,
        /// Second file.
        file_b: PathBuf,
    },
    /// A float input holds NaN or infinity.
    #[error("tensor {tensor} contains NaN or Inf at element {index} in {path} (pass allow_nonfinite / --allow-nonfinite to merge anyway)")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Flat index of the first offending element found.
        index: u64,
        /// The input file.
        path: PathBuf,
    },
    /// A method parameter is missing, malformed or out of range.
    #[error("invalid parameter {name}: {reason}{place}")]
    Param {
        /// Parameter name.
        name: String,
        /// What is wrong.
        reason: String,
        /// Where (model / tensor), starting with " (" or empty.
        place: String,
    },
    /// A method is undefined for a tensor's values (not its parameters): multislerp's weighted
    /// mean of unit vectors is zero, a Karcher mean's input is antipodal to the mean.
    #[error("{method} cannot merge tensor {tensor}: {reason}")]
    Undefined {
        /// The method.
        method: String,
        /// Tensor name.
        tensor: String,
        /// Why, and what to change.
        reason: String,
    },
    /// A tensor needs more memory than the budget allows (a method's per-tensor statistics).
    #[error("tensor {tensor} needs {need} bytes for {what}, more than the memory budget allows ({allowed} bytes): raise --memory-budget")]
    Budget {
        /// Tensor name.
        tensor: String,
        /// What the memory is for.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Bytes the budget allows for it.
        allowed: u64,
    },
    /// The merge specification itself is wrong (unknown method, bad option, missing base).
    #[error("{0}")]
    Spec(String),
    /// The output location is unusable (exists, is an input, lies inside an input).
    #[error("{reason} ({path})")]
    Output {
        /// What is wrong.
        reason: String,
        /// The output path.
        path: PathBuf,
    },
    /// Several problems found while planning, all reported at once.
    #[error("{} problems found before merging: {}", .0.len(), join_errors(.0))]
    Many(Vec<Error>),
    /// The output filesystem has no room left (ENOSPC), when reserving the shards or writing.
    #[error("disk full: no space left on device for the output ({need} bytes needed) while writing {what}; nothing was kept ({path})")]
    DiskFull {
        /// What was being written.
        what: String,
        /// Bytes the whole output needs.
        need: u64,
        /// The output directory.
        path: PathBuf,
    },
    /// Writing the output failed (disk full, permissions).
    #[error("cannot write {what}: {source} ({path})")]
    Write {
        /// What was being written.
        what: String,
        /// Where.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The caller cancelled the merge through the progress callback.
    #[error("merge cancelled")]
    Cancelled,
    /// A bug: an invariant the engine relies on was broken.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The two sides of an [`Error::ShapeMismatch`].
#[derive(Debug)]
pub struct ShapeMismatch {
    /// Tensor name.
    pub tensor: String,
    /// Shape in the first file.
    pub shape_a: Vec<usize>,
    /// First file.
    pub file_a: PathBuf,
    /// Shape in the second file.
    pub shape_b: Vec<usize>,
    /// Second file.
    pub file_b: PathBuf,
    /// Extra advice, starting with a space or empty.
    pub hint: String,
}

/// The first few problems, then how many more: a plan with 200,000 bad inputs must still give one
/// readable line.
fn join_errors(errors: &[Error]) -> String {
    const SHOWN: usize = 3;
    let mut s = errors.iter().take(SHOWN).map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
    if errors.len() > SHOWN {
        s.push_str(&format!("; and {} more", errors.len() - SHOWN));
    }
    s
}

impl Error {
    /// True when the error is the user's input or options (CLI exit 2), false for internal failures.
    pub fn is_input(&self) -> bool {
        match self {
            Error::Write { .. } | Error::DiskFull { .. } | Error::Internal(_) | Error::Cancelled => false,
            Error::Many(v) => v.iter().all(Error::is_input),
            _ => true,
        }
    }

    /// Collapses a list of problems into one error (the single one itself when there is one).
    pub fn from_many(mut errors: Vec<Error>) -> Option<Error> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(Error::Many(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_problems_show_the_first_three_and_a_count() {
        let errs: Vec<Error> = (0..200_000).map(|i| Error::Spec(format!("model {i} is missing"))).collect();
        let msg = Error::from_many(errs).unwrap().to_string();
        assert_eq!(
            msg,
            "200000 problems found before merging: model 0 is missing; model 1 is missing; model 2 is missing; and 199997 more"
        );
        let two = Error::from_many(vec![Error::Spec("a".into()), Error::Spec("b".into())]).unwrap().to_string();
        assert_eq!(two, "2 problems found before merging: a; b");
    }
}
