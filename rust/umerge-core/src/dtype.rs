//! Storage dtypes: which ones are merged as floats, and conversion between their bytes and f32.
//!
//! All arithmetic happens in f32. Decoding is exact for BF16, F16 and F32 (F64 is rounded to f32);
//! encoding rounds to nearest, ties to even (the `half` crate's conversions, IEEE 754 default),
//! which is what `torch.Tensor.to(torch.bfloat16)` does. Bytes are little-endian as safetensors
//! requires; slices need not be aligned.

pub use safetensors::Dtype;

/// True for the dtypes the engine merges arithmetically (BF16, F16, F32, F64).
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// Bytes per element of a dtype, or `None` for sub-byte dtypes.
pub fn elem_bytes(d: Dtype) -> Option<usize> {
    let bits = d.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// The dtype's name as written in safetensors headers (`BF16`, `F32`, ...).
pub fn header_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// The dtype's name as Hugging Face `config.json` writes it (`bfloat16`, ...), for float dtypes.
pub fn hf_name(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F16 => Some("float16"),
        Dtype::F32 => Some("float32"),
        Dtype::F64 => Some("float64"),
        _ => None,
    }
}

/// Parses a user-facing output dtype name: `bf16`, `f16`, `f32` (and the long torch spellings).
pub fn parse_out_dtype(s: &str) -> Option<Dtype> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Some(Dtype::BF16),
        "f16" | "fp16" | "float16" | "half" => Some(Dtype::F16),
        "f32" | "fp32" | "float32" | "float" => Some(Dtype::F32),
        _ => None,
    }
}

/// Decodes `out.len()` elements of float dtype `d` from `src` into f32.
///
/// `src` must hold exactly `out.len() * elem_bytes(d)` bytes; `d` must be a float dtype.
pub fn decode(d: Dtype, src: &[u8], out: &mut [f32]) {
    match d {
        Dtype::BF16 => {
            // bf16 is the top half of an f32: a shift, which the compiler vectorises when the
            // bytes are 2-aligned (always, in practice: safetensors offsets are multiples of the
            // element size and headers are padded to 8).
            // SAFETY: any bit pattern is a valid u16; align_to only reinterprets the aligned middle.
            let (pre, mid, post) = unsafe { src.align_to::<u16>() };
            if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                for (o, &u) in out.iter_mut().zip(mid) {
                    *o = f32::from_bits((u as u32) << 16);
                }
            } else {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::F32 => {
            // SAFETY: any bit pattern is a valid f32; align_to only reinterprets the aligned middle.
            let (pre, mid, post) = unsafe { src.align_to::<f32>() };
            if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                out.copy_from_slice(&mid[..out.len()]);
            } else {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
        _ => unreachable!("decode called on non-float dtype {d:?}"),
    }
}

crate::simd::kernel! {
    /// bf16 fast path of [`decode`], fused with the subtraction of `sub` and the finite check:
    /// `out[i] = bf16(src[i]) - sub[i]` (just the value without `sub`). Returns whether any input
    /// was NaN or infinite (exponent bits all ones), or `None` when `src` is not 2-aligned (then
    /// nothing was written). One loop instead of three passes (decode, `first_nonfinite`,
    /// subtract); it vectorises.
    pub fn decode_bf16_fused(src: &[u8], sub: Option<&[f32]>, out: &mut [f32]) -> Option<bool> {
        // SAFETY: any bit pattern is a valid u16; align_to only reinterprets the aligned middle.
        let (pre, mid, post) = unsafe { src.align_to::<u16>() };
        if !(pre.is_empty() && post.is_empty() && cfg!(target_endian = "little")) || mid.len() != out.len() {
            return None;
        }
        let mut bad = false;
        match sub {
            Some(b) if b.len() == out.len() => {
                for ((o, &u), &y) in out.iter_mut().zip(mid).zip(b) {
                    bad |= (u & 0x7f80) == 0x7f80;
                    *o = f32::from_bits((u as u32) << 16) - y;
                }
            }
            Some(_) => return None,
            None => {
                for (o, &u) in out.iter_mut().zip(mid) {
                    bad |= (u & 0x7f80) == 0x7f80;
                    *o = f32::from_bits((u as u32) << 16);
                }
            }
        }
        Some(bad)
    }
}

crate::simd::kernel! {
    /// The aligned bf16 case of [`encode`].
    fn encode_bf16(src: &[f32], out: &mut [u16]) {
        for (x, o) in src.iter().zip(out.iter_mut()) {
            *o = bf16_bits(*x);
        }
    }
}

/// Encodes f32 values into float dtype `d`, rounding to nearest even. `out` holds
/// `src.len() * elem_bytes(d)` bytes.
pub fn encode(d: Dtype, src: &[f32], out: &mut [u8]) {
    match d {
        Dtype::BF16 => {
            // `bf16_bits` is `half::bf16::from_f32` written without branches, so this loop
            // vectorises; through `half` per element, encoding was 4% of a TinyLlama layer's
            // CPU time (perf). Same bits for every input (tested against `half`).
            // SAFETY: any bit pattern is a valid u16; align_to_mut only reinterprets the aligned middle.
            let (pre, mid, post) = unsafe { out.align_to_mut::<u16>() };
            if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                encode_bf16(src, mid);
            } else {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&bf16_bits(*x).to_le_bytes());
                }
            }
        }
        Dtype::F16 => {
            for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (x, o) in src.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&(*x as f64).to_le_bytes());
            }
        }
        _ => unreachable!("encode called on non-float dtype {d:?}"),
    }
}

/// f32 -> bf16 bits exactly as `half::bf16::from_f32` (NaN: top half with the quiet bit set;
/// otherwise the top half plus one when bit 15 is set and any of bits 0..=16 is), branch-free.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let x = x.to_bits();
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    let up = ((x & 0x8000) != 0) & ((x & 0x1_7fff) != 0);
    let r = (x >> 16) + up as u32;
    (if nan { (x >> 16) | 0x40 } else { r }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_bits_equals_half() {
        let mut special = vec![
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x7f7f_ffff,
            0xff7f_ffff,
            1,
            0x8000,
            0x1_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
        ];
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2_000_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            special.push((s >> 32) as u32);
            // Around rounding boundaries: low 17 bits near 0x8000.
            special.push(((s >> 32) as u32 & 0xfffe_0000) | ((s as u32) & 0x1_8001));
        }
        for b in special {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "bits {b:#x}");
        }
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        let xs = [1.0f32, -2.5, 0.0, 3.0e-5, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        let mut bytes = vec![0u8; xs.len() * 2];
        encode(Dtype::BF16, &xs, &mut bytes);
        let mut back = vec![0f32; xs.len()];
        decode(Dtype::BF16, &bytes, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        // 1 + 2^-8 lies exactly between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(back[4], 1.0);
        // 1 + 3*2^-8 lies between 1 + 2^-7 and 1 + 2^-6: tie, even is 1 + 2^-6.
        assert_eq!(back[5], 1.0 + 1.0 / 64.0);
    }

    #[test]
    fn f16_and_f64_decode() {
        let mut b = vec![0u8; 4];
        encode(Dtype::F16, &[0.5, -1.25], &mut b);
        let mut out = [0f32; 2];
        decode(Dtype::F16, &b, &mut out);
        assert_eq!(out, [0.5, -1.25]);
        let mut b8 = vec![0u8; 8];
        encode(Dtype::F64, &[0.1], &mut b8);
        let mut o1 = [0f32; 1];
        decode(Dtype::F64, &b8, &mut o1);
        assert_eq!(o1[0], 0.1f32);
    }
}
