//! Reusable buffers of the engine's hot loop, and the pointer wrapper that lets parallel loops
//! fill disjoint ranges of one vector.

/// Reusable buffers (f32 chunk buffers; the encoded bytes of the file sink): chunk buffers are taken from and returned to this pool so the hot loop
/// does not allocate. Measured: allocating fresh 4 MiB vectors per chunk cost ~13 M minor page
/// faults and a third of the CPU time on the 1.1B benchmark (every large allocation is a fresh
/// mmap whose pages fault in on first write).
pub(super) struct BufPool<T = f32>(std::sync::Mutex<Vec<Vec<T>>>);

impl<T> Default for BufPool<T> {
    fn default() -> Self {
        BufPool(Default::default())
    }
}

impl<T: Copy + Default> BufPool<T> {
    /// A buffer of exactly `len` elements; contents unspecified (callers overwrite it).
    pub(super) fn take(&self, len: usize) -> Vec<T> {
        let mut v = self.0.lock().ok().and_then(|mut p| p.pop()).unwrap_or_default();
        if v.len() < len {
            v.resize(len, T::default());
        } else {
            v.truncate(len);
        }
        v
    }
    /// Returns a buffer for reuse (at most 64 are kept).
    pub(super) fn put(&self, v: Vec<T>) {
        if let Ok(mut p) = self.0.lock() {
            if p.len() < 64 {
                p.push(v);
            }
        }
    }
}

/// One chunk's decoded inputs (and base), taken from the engine's pool.
pub(super) struct Bufs {
    pub base: Option<Vec<f32>>,
    pub inputs: Vec<Vec<f32>>,
}

/// Raw pointer wrapper for filling disjoint ranges of one vector from several threads.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub *mut f32);
// SAFETY: only used to write disjoint element ranges of a vector that outlives the parallel
// loop (see `Engine::load_cache`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
