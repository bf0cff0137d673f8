//! Runs one merge from a JSON `MergeSpec` file and prints the report: a Python-free driver for
//! profiling the engine (`perf record`, `valgrind --tool=callgrind`).
//!
//!     cargo run --release --example merge_json -- spec.json

fn main() {
    let path = std::env::args().nth(1).expect("usage: merge_json SPEC.json");
    let text = std::fs::read_to_string(&path).expect("cannot read the spec");
    let spec: umerge_core::MergeSpec = serde_json::from_str(&text).expect("invalid spec JSON");
    match umerge_core::merge(&spec, None) {
        Ok(r) => println!("{} tensors, {:.2} s, peak RSS {} MiB", r.tensors, r.seconds, r.peak_rss_bytes >> 20),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
