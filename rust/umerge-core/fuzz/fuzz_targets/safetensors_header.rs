//! Fuzz target `safetensors_header`: see `umerge_fuzz::props::header` for the property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    umerge_fuzz::props::header(data);
});
