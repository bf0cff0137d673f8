//! The output shards' sha256, computed while the merge is still writing them.
//!
//! The recipe records every shard's sha256 (see `verify`). Hashed after the merge, a 2 GiB shard
//! kept one core busy for about 2 s while the other idled. Instead a thread follows the merge:
//! tensors are reported complete as they are written ([`Frontier::mark`]), and the thread hashes
//! each shard in file order up to the end of the completed prefix, reading back what the page
//! cache has just received, in the gaps the merge's own threads leave (between passes, on small
//! tensors).

use std::sync::{Condvar, Mutex};

use sha2::{Digest, Sha256};

use crate::write::Output;

/// Which output tensors are completely written.
#[derive(Debug)]
pub struct Frontier {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    done: Vec<bool>,
    stopped: bool,
}

impl Frontier {
    /// A frontier over `tensors` output tensors, none written yet.
    pub fn new(tensors: usize) -> Self {
        Frontier { state: Mutex::new(State { done: vec![false; tensors], stopped: false }), changed: Condvar::new() }
    }

    /// Records that every byte of output tensor `tensor` has been written.
    pub fn mark(&self, tensor: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done[tensor] = true;
        self.changed.notify_all();
    }

    /// A guard that calls [`Frontier::stop`] when dropped: also when the merge panics, so the
    /// hashing thread never waits for tensors that will not come (a scoped thread that never
    /// ends would turn the panic into a hang).
    pub fn stop_on_drop(&self) -> StopOnDrop<'_> {
        StopOnDrop(self)
    }

    /// Tells the hashing thread to stop waiting (the merge ended, well or not).
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.stopped = true;
        self.changed.notify_all();
    }

    /// Waits until `order[at]` is written; then returns how many tensors from `at` on are
    /// written in a row. `None` when stopped first.
    fn wait(&self, order: &[usize], at: usize) -> Option<usize> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.done[order[at]] {
            if s.stopped {
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Some(order[at..].iter().take_while(|&&t| s.done[t]).count())
    }

    /// Hashes every shard of `out` as its tensors complete (run it on its own thread). Returns
    /// each shard's digest (hex), `None` for a shard left unfinished or unreadable: the writer
    /// then hashes that file itself. With `forget`, each hashed range is then dropped from the
    /// page cache once on disk (`Output::forget_range`): hashing first means the bytes are
    /// read from memory, never back from storage.
    pub fn hash_shards(&self, out: &Output, forget: bool) -> Vec<Option<String>> {
        let layout = &out.layout;
        let mut per_shard: Vec<Vec<(u64, usize)>> = vec![Vec::new(); layout.shards.len()];
        for (t, &(shard, offset)) in layout.place.iter().enumerate() {
            per_shard[shard].push((offset, t));
        }
        let mut digests = vec![None; per_shard.len()];
        let mut buf = vec![0u8; 1 << 20];
        for (shard, mut tensors) in per_shard.into_iter().enumerate() {
            tensors.sort_unstable();
            let size = layout.shards[shard].size;
            let order: Vec<usize> = tensors.iter().map(|&(_, t)| t).collect();
            // Each tensor's bytes run to the next one's start (the last to the end of the file).
            let ends: Vec<u64> = (0..tensors.len()).map(|i| tensors.get(i + 1).map_or(size, |n| n.0)).collect();
            let mut h = Sha256::new();
            let mut pos = 0u64;
            let mut at = 0usize;
            while at < order.len() {
                let Some(ready) = self.wait(&order, at) else { return digests };
                at += ready;
                if out.hash_range(shard, pos, ends[at - 1], &mut buf, &mut h).is_err() {
                    return digests;
                }
                if forget {
                    out.forget_range(shard, pos, ends[at - 1]);
                }
                pos = ends[at - 1];
            }
            if out.hash_range(shard, pos, size, &mut buf, &mut h).is_err() {
                return digests;
            }
            digests[shard] = Some(hex(&h.finalize()));
        }
        digests
    }
}

/// Stops a [`Frontier`] when dropped (see [`Frontier::stop_on_drop`]).
#[derive(Debug)]
pub struct StopOnDrop<'a>(&'a Frontier);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Lowercase hex of a digest.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_merge_releases_the_waiting_hasher() {
        let frontier = Frontier::new(3);
        let got = std::thread::scope(|scope| {
            let waiter = scope.spawn(|| frontier.wait(&[0, 1, 2], 0));
            let merge = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _stop = frontier.stop_on_drop();
                panic!("a kernel bug");
            }));
            assert!(merge.is_err());
            waiter.join().unwrap()
        });
        assert_eq!(got, None);
    }

    #[test]
    fn wait_reports_the_written_run() {
        let frontier = Frontier::new(4);
        frontier.mark(0);
        frontier.mark(1);
        frontier.mark(3);
        assert_eq!(frontier.wait(&[0, 1, 2, 3], 0), Some(2));
        frontier.mark(2);
        assert_eq!(frontier.wait(&[0, 1, 2, 3], 2), Some(2));
    }
}
