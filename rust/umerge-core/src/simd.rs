//! Kernels compiled for the best instruction set of the running CPU.
//!
//! Wheels are built for baseline x86-64 (SSE2), where a hot loop gets 4 f32 lanes. `kernel!`
//! compiles one loop body three times, for AVX-512 (16 lanes, mask registers, 64-bit lane
//! multiplies), for AVX2 + FMA (8 lanes) and for the baseline, and picks one at run time from
//! [`level`], detected once. The bodies are plain Rust: LLVM does not reassociate or contract
//! floating-point operations (an FMA appears only where the code says `mul_add`), so every
//! version gives the same bits; the tests run whichever this machine has.

use std::sync::OnceLock;

/// The instruction sets a `kernel!` is compiled for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F, BW, DQ and VL (with AVX2 and FMA).
    Avx512,
    /// AVX2 and FMA.
    Avx2,
    /// Whatever the target baseline has.
    Base,
}

/// The best [`Level`] of this CPU (detected on first use).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("avx2") && has!("fma") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

/// Defines a function whose body is compiled for every [`Level`] and run at the best one.
///
/// ```ignore
/// kernel! {
///     /// Doubles every value.
///     pub fn double(values: &mut [f32]) {
///         for v in values { *v *= 2.0; }
///     }
/// }
/// ```
macro_rules! kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            match $crate::simd::level() {
                // SAFETY: `level()` found these features on this CPU.
                $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                $crate::simd::Level::Base => {}
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use kernel;
