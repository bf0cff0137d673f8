//! Reading ahead of the merge, around the page cache where that is faster, and handing the page
//! cache back behind it.
//!
//! A run reads its inputs in a known order: one *step* per output tensor (the byte ranges of
//! that tensor in the base and in every model), steps in the order the run writes them. Through
//! memory maps alone, a cold input is read by page faults in the compute threads: each fault
//! waits for the disk while the cores idle, and every page passes through the page cache, which
//! on these machines costs about 1.3 s of system time per GB read. Measured on the 1.1B TIES
//! benchmark with the page cache dropped: 2.6x the disk's floor.
//!
//! [`ReadAhead::run`] runs on a thread of its own beside the merge and prepares each step before
//! the compute reaches it. For every span of the step:
//! - **cached** (at least half its pages already in the page cache, a warm input): nothing to
//!   do; the engine reads it through the map, and it stays cached;
//! - **not cached**, and small enough for the read window: read with `O_DIRECT` into a buffer of
//!   the run's own ([`Checkpoint::read_direct`]): large requests, no page-cache copy, no page
//!   faults, nothing evicted; the engine decodes from that buffer in every pass, so each byte
//!   is read from storage once;
//! - **not cached and larger than the window**, or under [`PagePolicy::Keep`] (the user wants
//!   the inputs cached): the kernel is asked to read it into the page cache now
//!   ([`Checkpoint::will_need`]) and the engine reads it through the map.
//!
//! The buffers of unfinished steps hold at most `window` bytes (half the memory budget, see
//! `exec::prepare::Workers`); the next step is always prepared. Buffers are reused from step
//! to step, so their pages fault in once. The engine asks for a step's buffers through
//! [`ReadAhead::loaded`]: it waits for the step it is working on (the oldest unfinished one,
//! which the read-ahead always reaches), and reads any other step through the map, so a pass
//! over the whole model (whole-model trims) never waits on the window.
//!
//! Behind the merge, spans read into the page cache by this run (not cached before it) are
//! dropped from it when their step finishes, unless the policy is [`PagePolicy::Keep`]; under
//! [`PagePolicy::Drop`] every span's pages are, and the output's once written back and hashed
//! (see `checksum`). A merge of inputs larger than memory thus leaves other processes' working
//! sets alone.

use std::sync::{Arc, Condvar, Mutex};

use memmap2::MmapMut;

use crate::checkpoint::{direct_len, Checkpoint, TensorInfo};

/// Bytes of physical memory (0 when unknown).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    pages as u64 * size as u64
}

/// What a run does with the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePolicy {
    /// Leave it as found: inputs already cached are read from it; others are read around it
    /// (`O_DIRECT`) or, when too large for the read window, dropped again once used. The
    /// output's pages are kept, unless the run is larger than half the machine's memory.
    Auto,
    /// Read every input through the page cache and leave it there (a merge run again on the same
    /// inputs finds them warm); keep the output's pages.
    Keep,
    /// Drop every page used behind the merge, inputs and output.
    Drop,
}

impl PagePolicy {
    /// The policy for a spec's `page_cache` option: `auto` (the default), `keep` or `drop`.
    pub fn parse(option: Option<&str>) -> Result<PagePolicy, String> {
        match option.unwrap_or("auto") {
            "auto" => Ok(PagePolicy::Auto),
            "keep" => Ok(PagePolicy::Keep),
            "drop" => Ok(PagePolicy::Drop),
            other => Err(format!("unknown page_cache policy {other:?} (use auto, keep or drop)")),
        }
    }

    /// Whether the output's pages are dropped once written back and hashed: under `Drop`, and
    /// under `Auto` when the run's inputs and output together exceed half the machine's memory.
    pub fn drops_output(self, run_bytes: u64) -> bool {
        match self {
            PagePolicy::Keep => false,
            PagePolicy::Drop => true,
            PagePolicy::Auto => {
                let mem = physical_memory();
                mem > 0 && run_bytes > mem / 2
            }
        }
    }
}

/// A byte range of one input shard.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    /// The checkpoint.
    pub ck: &'a Checkpoint,
    /// Shard index in it.
    pub shard: usize,
    /// First byte (absolute, in the shard file).
    pub start: usize,
    /// Bytes.
    pub len: usize,
}

impl<'a> Span<'a> {
    /// The whole data of tensor `info` of `ck`.
    pub fn of(ck: &'a Checkpoint, info: &TensorInfo) -> Self {
        Span { ck, shard: info.shard, start: info.start, len: info.end - info.start }
    }

    fn holds(&self, ck: &Checkpoint, shard: usize, start: usize, len: usize) -> bool {
        std::ptr::eq(self.ck, ck) && self.shard == shard && start >= self.start && start + len <= self.start + self.len
    }
}

/// A span's bytes, read into a buffer of the run's own.
pub struct Loaded {
    buf: MmapMut,
    /// Where the span's first byte is in `buf`.
    offset: usize,
    /// The span's first byte in its shard.
    start: usize,
}

impl Loaded {
    /// Bytes `start..start + len` of the shard (within the span).
    pub fn bytes(&self, start: usize, len: usize) -> &[u8] {
        let at = self.offset + (start - self.start);
        &self.buf[at..at + len]
    }
}

/// What the read-ahead has done with one step.
enum Prepared {
    /// Not yet reached.
    Pending,
    /// Being read.
    Reading,
    /// Ready: per span, its buffer (or `None`: read it through the map).
    Ready(Vec<Option<Arc<Loaded>>>),
    /// Finished (buffers returned).
    Finished,
}

struct Step {
    prepared: Mutex<Prepared>,
    ready: Condvar,
    /// Per span: whether this run brought its pages into the page cache (drop them after).
    ours: Mutex<Vec<bool>>,
}

struct Window {
    /// Steps finished (they finish in order).
    done: usize,
    stopped: bool,
    /// Bytes of buffers held by unfinished steps.
    in_use: u64,
    /// Buffers free for reuse, and their bytes.
    free: Vec<MmapMut>,
    free_bytes: u64,
}

/// The read-ahead of one run (see the module docs): [`ReadAhead::run`] on a thread of its own,
/// [`ReadAhead::loaded`] from the engine's reads, [`ReadAhead::finished`] after each step,
/// [`ReadAhead::stop`] (or the guard of [`ReadAhead::stop_on_drop`]) at the end.
pub struct ReadAhead<'a> {
    spans: Vec<Vec<Span<'a>>>,
    steps: Vec<Step>,
    window: u64,
    policy: PagePolicy,
    state: Mutex<Window>,
    changed: Condvar,
}

/// A span counts as cached when at least this fraction of its pages is in the page cache.
const CACHED: f64 = 0.5;

impl<'a> ReadAhead<'a> {
    /// A read-ahead over `spans` (per step), holding at most `window` bytes of buffers.
    pub fn new(spans: Vec<Vec<Span<'a>>>, window: u64, policy: PagePolicy) -> Self {
        let steps = spans
            .iter()
            .map(|s| Step { prepared: Mutex::new(Prepared::Pending), ready: Condvar::new(), ours: Mutex::new(vec![false; s.len()]) })
            .collect();
        let state = Window { done: 0, stopped: false, in_use: 0, free: Vec::new(), free_bytes: 0 };
        ReadAhead { spans, steps, window, policy, state: Mutex::new(state), changed: Condvar::new() }
    }

    /// Prepares every step in order (run on its own thread); returns when all are prepared or
    /// the run is stopped.
    pub fn run(&self) {
        for k in 0..self.spans.len() {
            {
                let mut p = lock(&self.steps[k].prepared);
                if !matches!(*p, Prepared::Pending) {
                    continue;
                }
                *p = Prepared::Reading;
            }
            let ready = self.prepare(k);
            let stopped = ready.is_none();
            *lock(&self.steps[k].prepared) = Prepared::Ready(ready.unwrap_or_else(|| vec![None; self.spans[k].len()]));
            self.steps[k].ready.notify_all();
            if stopped {
                return;
            }
        }
    }

    /// Reads step `k`'s uncached spans that fit the window into buffers and hints the rest;
    /// `None` when stopped while waiting for room.
    fn prepare(&self, k: usize) -> Option<Vec<Option<Arc<Loaded>>>> {
        let spans = &self.spans[k];
        let mut out: Vec<Option<Arc<Loaded>>> = vec![None; spans.len()];
        let mut room = self.window; // this step's share: all of the window
        for (i, s) in spans.iter().enumerate() {
            if s.len == 0 || s.ck.resident_fraction(s.shard, s.start, s.len) >= CACHED {
                continue;
            }
            let need = direct_len(s.start, s.len) as u64;
            if self.policy != PagePolicy::Keep && need <= room {
                room -= need;
                let mut buf = self.take_buffer(k, need as usize)?;
                match s.ck.read_direct(s.shard, s.start, s.len, &mut buf) {
                    Ok(offset) => {
                        out[i] = Some(Arc::new(Loaded { buf, offset, start: s.start }));
                        continue;
                    }
                    // Fall back on the map: its reads report a changed file or a read error.
                    Err(_) => self.give_back(buf),
                }
            }
            s.ck.will_need(s.shard, s.start, s.len);
            lock(&self.steps[k].ours)[i] = true;
        }
        Some(out)
    }

    /// A buffer of at least `len` bytes for step `k`, once the buffers of unfinished steps leave
    /// room for it; `None` when stopped first.
    fn take_buffer(&self, k: usize, len: usize) -> Option<MmapMut> {
        let len64 = len as u64;
        let mut w = lock(&self.state);
        // The oldest unfinished step may always take the whole window; later ones wait for room.
        while !w.stopped && k > w.done && w.in_use + len64 > self.window {
            w = self.changed.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        if w.stopped {
            return None;
        }
        w.in_use += len64;
        // Reuse the smallest free buffer that is large enough, unless it is more than twice the
        // size: a 131 MB embedding buffer holding a 23 MB projection would fill the window with
        // a few spans and starve the read-ahead (measured: 13 s instead of 8 s at 512 MiB).
        let best = (0..w.free.len()).filter(|&i| (len..=2 * len).contains(&w.free[i].len())).min_by_key(|&i| w.free[i].len());
        if let Some(i) = best {
            let b = w.free.swap_remove(i);
            w.free_bytes -= b.len() as u64;
            w.in_use += b.len() as u64 - len64;
            return Some(b);
        }
        // Free buffers beyond the window are released before allocating a new one.
        while w.in_use + w.free_bytes > self.window {
            let Some(i) = (0..w.free.len()).max_by_key(|&i| w.free[i].len()) else { break };
            let b = w.free.swap_remove(i);
            w.free_bytes -= b.len() as u64;
        }
        drop(w);
        match MmapMut::map_anon(len) {
            Ok(b) => Some(b),
            Err(_) => {
                lock(&self.state).in_use -= len64;
                None
            }
        }
    }

    /// Returns a buffer taken with [`ReadAhead::take_buffer`] for reuse.
    fn give_back(&self, buf: MmapMut) {
        let mut w = lock(&self.state);
        w.in_use = w.in_use.saturating_sub(buf.len() as u64);
        w.free_bytes += buf.len() as u64;
        w.free.push(buf);
        self.changed.notify_all();
    }

    /// The buffer holding bytes `start..start + len` of `ck`'s shard `shard` for step `step`, or
    /// `None`: read them through the map. Waits for the step while it is the oldest unfinished
    /// one and still being prepared; never waits for any other.
    pub fn loaded(&self, step: usize, ck: &Checkpoint, shard: usize, start: usize, len: usize) -> Option<Arc<Loaded>> {
        let st = self.steps.get(step)?;
        let mut p = lock(&st.prepared);
        loop {
            match &*p {
                Prepared::Ready(bufs) => {
                    let i = self.spans[step].iter().position(|s| s.holds(ck, shard, start, len))?;
                    return bufs[i].clone();
                }
                Prepared::Finished => return None,
                Prepared::Pending | Prepared::Reading => {
                    let current = {
                        let w = lock(&self.state);
                        w.done == step && !w.stopped
                    };
                    if !current {
                        return None;
                    }
                    p = st.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Records that step `k` is finished (steps finish in order): its buffers are returned for
    /// reuse, pages it brought into the page cache are dropped (see [`PagePolicy`]), and the
    /// read-ahead moves on.
    pub fn finished(&self, k: usize) {
        let Some(st) = self.steps.get(k) else { return };
        let prepared = std::mem::replace(&mut *lock(&st.prepared), Prepared::Finished);
        if let Prepared::Ready(bufs) = prepared {
            for b in bufs.into_iter().flatten() {
                // The engine holds no buffer of a finished step; one still shared is simply freed.
                match Arc::try_unwrap(b) {
                    Ok(l) => self.give_back(l.buf),
                    Err(shared) => {
                        let mut w = lock(&self.state);
                        w.in_use = w.in_use.saturating_sub(shared.buf.len() as u64);
                    }
                }
            }
        }
        let ours = lock(&st.ours);
        for (s, &mine) in self.spans[k].iter().zip(ours.iter()) {
            if self.policy == PagePolicy::Drop || (self.policy == PagePolicy::Auto && mine) {
                s.ck.forget(s.shard, s.start, s.len);
            }
        }
        let mut w = lock(&self.state);
        w.done = w.done.max(k + 1);
        self.changed.notify_all();
    }

    /// Stops the read-ahead (the run ended, well or not): the thread returns, and no read waits.
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_all();
        for st in &self.steps {
            // Under the step's lock, so that a read between its check and its wait is woken.
            let _p = lock(&st.prepared);
            st.ready.notify_all();
        }
    }

    /// A guard that calls [`ReadAhead::stop`] when dropped, also when the merge panics: a scoped
    /// read-ahead thread left waiting would turn the panic into a hang.
    pub fn stop_on_drop(&self) -> StopOnDrop<'_, 'a> {
        StopOnDrop(self)
    }
}

/// Stops a [`ReadAhead`] when dropped (see [`ReadAhead::stop_on_drop`]).
pub struct StopOnDrop<'r, 'a>(&'r ReadAhead<'a>);

impl Drop for StopOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn policies_parse_and_auto_drops_only_large_outputs() {
        assert_eq!(PagePolicy::parse(None), Ok(PagePolicy::Auto));
        assert_eq!(PagePolicy::parse(Some("keep")), Ok(PagePolicy::Keep));
        assert_eq!(PagePolicy::parse(Some("drop")), Ok(PagePolicy::Drop));
        assert!(PagePolicy::parse(Some("never")).unwrap_err().contains("auto, keep or drop"));
        let mem = physical_memory();
        assert!(mem > 0);
        assert!(!PagePolicy::Auto.drops_output(mem / 4));
        assert!(PagePolicy::Auto.drops_output(mem));
        assert!(!PagePolicy::Keep.drops_output(u64::MAX));
        assert!(PagePolicy::Drop.drops_output(0));
    }

    /// A checkpoint of one f32 tensor `t` of `n` elements (values 0, 1, 2, ...), its bytes
    /// evicted from the page cache so that the read-ahead takes them as cold.
    fn cold_checkpoint(dir: &Path, n: usize) -> Checkpoint {
        let vals: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], &bytes).unwrap();
        let p = dir.join("model.safetensors");
        safetensors::serialize_to_file([("t", view)], None, &p).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        f.sync_all().unwrap();
        crate::checkpoint::fadvise(&f, 0, 0, libc::POSIX_FADV_DONTNEED);
        Checkpoint::open(&p).unwrap()
    }

    /// Whether the temporary directory's filesystem opens files with `O_DIRECT` (tmpfs does not),
    /// asked of the kernel directly rather than of the code under test; when it does, the direct
    /// reads must work. Checked again afterwards that the file is still out of the page cache.
    fn filesystem_takes_o_direct(ck: &Checkpoint) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let p = &ck.shards[0].path;
        if std::fs::File::options().read(true).custom_flags(libc::O_DIRECT).open(p).is_err() {
            eprintln!("{} refuses O_DIRECT (tmpfs?): the direct path cannot be tested here", p.display());
            return false;
        }
        let mut buf = MmapMut::map_anon(8192).unwrap();
        ck.read_direct(0, 8, 16, &mut buf).expect("O_DIRECT opens here, so read_direct must work");
        ck.forget(0, 0, ck.shards[0].size as usize);
        true
    }

    #[test]
    fn cold_spans_are_read_into_buffers_and_stay_out_of_the_page_cache() {
        let d = tempfile::tempdir().unwrap();
        let ck = cold_checkpoint(d.path(), 300_000);
        let info = &ck.tensors["t"];
        let span = Span::of(&ck, info);
        if !filesystem_takes_o_direct(&ck) {
            return;
        }
        assert!(ck.resident_fraction(0, span.start, span.len) < 0.5, "the test file did not leave the page cache");
        let ra = ReadAhead::new(vec![vec![span]], 64 << 20, PagePolicy::Auto);
        std::thread::scope(|s| {
            s.spawn(|| ra.run());
            // Bytes 4000.. of the tensor (element 1000 on) come from the buffer, equal to the file's.
            let l = ra.loaded(0, &ck, 0, info.start + 4000, 8).expect("a buffer for the cold span");
            assert_eq!(l.bytes(info.start + 4000, 8), &[0, 0, 0x7a, 0x44, 0x00, 0x40, 0x7a, 0x44][..]);
            // A range outside the span is read through the map.
            assert!(ra.loaded(0, &ck, 0, 0, 8).is_none());
        });
        assert!(ck.resident_fraction(0, span.start, span.len) < 0.5, "the direct read went through the page cache");
        ra.finished(0);
        // A finished step reads through the map.
        assert!(ra.loaded(0, &ck, 0, info.start, 8).is_none());
    }

    #[test]
    fn keep_reads_through_the_page_cache_and_a_later_step_never_waits() {
        let d = tempfile::tempdir().unwrap();
        let ck = cold_checkpoint(d.path(), 100_000);
        let span = Span::of(&ck, &ck.tensors["t"]);
        let ra = ReadAhead::new(vec![vec![span], vec![span]], 64 << 20, PagePolicy::Keep);
        // Not started: step 1 is not the oldest unfinished step, so it is read through the map
        // at once instead of waiting (a whole-model pass reads every step before any finishes).
        assert!(ra.loaded(1, &ck, 0, span.start, 8).is_none());
        std::thread::scope(|s| {
            s.spawn(|| ra.run());
            assert!(ra.loaded(0, &ck, 0, span.start, 8).is_none(), "keep reads through the map");
        });
    }

    #[test]
    fn the_window_holds_back_later_steps_until_earlier_ones_finish() {
        let d = tempfile::tempdir().unwrap();
        let ck = cold_checkpoint(d.path(), 200_000); // 800 kB
        let span = Span::of(&ck, &ck.tensors["t"]);
        if !filesystem_takes_o_direct(&ck) {
            return;
        }
        // A window of one span: step 1 cannot be read before step 0 is finished.
        let window = direct_len(span.start, span.len) as u64;
        let ra = ReadAhead::new(vec![vec![span], vec![span]], window, PagePolicy::Auto);
        std::thread::scope(|s| {
            s.spawn(|| ra.run());
            assert!(ra.loaded(0, &ck, 0, span.start, 8).is_some());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(matches!(*lock(&ra.steps[1].prepared), Prepared::Reading), "step 1 went past the window");
            ra.finished(0);
            assert!(ra.loaded(1, &ck, 0, span.start, 8).is_some(), "step 1 is read once step 0 is finished");
            assert_eq!(lock(&ra.state).in_use, window);
        });
    }

    #[test]
    fn stop_releases_a_read_ahead_waiting_for_room() {
        let d = tempfile::tempdir().unwrap();
        let ck = cold_checkpoint(d.path(), 200_000);
        let span = Span::of(&ck, &ck.tensors["t"]);
        let window = direct_len(span.start, span.len) as u64;
        let ra = ReadAhead::new(vec![vec![span], vec![span]], window, PagePolicy::Auto);
        std::thread::scope(|s| {
            let t = s.spawn(|| ra.run());
            let _ = ra.loaded(0, &ck, 0, span.start, 8);
            std::thread::sleep(std::time::Duration::from_millis(20));
            ra.stop();
            t.join().unwrap();
        });
    }
}
