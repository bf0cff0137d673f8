//! Fuzz target `planner`: see `umerge_fuzz::props::planner` for the property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    umerge_fuzz::props::planner(data);
});
