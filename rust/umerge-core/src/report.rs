//! The merge report: what was done, how much was moved, how long it took, how much memory.

use std::path::PathBuf;

use serde::Serialize;

/// Summary of a finished merge (serialised as JSON for Python).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Method, with its preset.
    pub method: String,
    /// Output directory.
    pub output: PathBuf,
    /// Output tensors written.
    pub tensors: usize,
    /// Output shard files.
    pub shards: usize,
    /// Input tensor bytes read (each input tensor counted once).
    pub bytes_read: u64,
    /// Output bytes written (all shard files, headers included).
    pub bytes_written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Worker threads used.
    pub threads: usize,
    /// Elements per chunk chosen from the memory budget.
    pub chunk_elements: usize,
    /// Warnings (missing tensors, cropped embeddings, ...).
    pub warnings: Vec<String>,
}

/// Peak resident set size of this process in bytes (`VmHWM` in /proc/self/status), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
