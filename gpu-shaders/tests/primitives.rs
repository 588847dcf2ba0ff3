//! The primitives of common.wgsl against merge-core, bit for bit, on whatever
//! adapter the runtime picks (lavapipe in CI).

mod common;

use common::{assert_bits, ctx, SplitMix64, TestInputs};
use gpu_shaders::ops::{Op, Ops, RngParams};
use merge_core::arith;

fn fl(x: u32) -> f32 {
    arith::flush(f32::from_bits(x))
}

/// CPU result of a binary op on flushed operands; non-finite results are compared
/// only as "non-finite" (they are reported, never stored).
fn check_binary(ops: &Ops, ctx: &gpu_shaders::GpuContext, op: Op, a: &[u32], b: &[u32], cpu: fn(f32, f32) -> f32) {
    let gpu = ops.eval(ctx, op, a, b, RngParams::default()).unwrap();
    let want: Vec<u32> = a
        .iter()
        .zip(b)
        .zip(&gpu)
        .map(|((&x, &y), &g)| {
            let r = cpu(fl(x), fl(y));
            if arith::is_non_finite(r) && arith::is_non_finite(f32::from_bits(g)) { g } else { r.to_bits() }
        })
        .collect();
    assert_bits(&format!("{op:?}"), &gpu, &want, |i| format!("{:#010x} {:#010x}", a[i], b[i]));
}

/// Edge operands: zeros of both signs, subnormals, the normal extremes, ±Inf, NaN, ±1.
fn edges() -> Vec<u32> {
    vec![
        0, 0x8000_0000, 1, 0x807f_ffff, 0x0040_0000, 0x0080_0000, 0x8080_0000, 0x0080_0001, 0x7f7f_ffff, 0xff7f_ffff,
        0x7f00_0000, 0x3f80_0000, 0xbf80_0000, 0x3f7f_ffff, 0x3f80_0001, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000,
        0x4000_0000, 0x3400_0000, 0x0100_0000, 0x5f80_0000, 0x1f80_0000,
    ]
}

#[test]
fn add_sub_mul_and_no_contraction() {
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let mut rng = SplitMix64::new(1);
    let n = 1 << 20;
    let mut a = Vec::with_capacity(n);
    let mut b = Vec::with_capacity(n);
    for i in 0..n {
        // Half over the full exponent range (overflow, underflow into subnormals),
        // half over 2^-20..2^20 where a·b+b rounds differently from an FMA.
        if i % 2 == 0 {
            a.push(rng.next_u32());
            b.push(rng.next_u32());
        } else {
            a.push(rng.f32_exp(-20, 20).to_bits());
            b.push(rng.f32_exp(-20, 20).to_bits());
        }
    }
    let e = edges();
    for &x in &e {
        for &y in &e {
            a.push(x);
            b.push(y);
        }
    }
    check_binary(&ops, &ctx, Op::Add, &a, &b, arith::add);
    check_binary(&ops, &ctx, Op::Sub, &a, &b, arith::sub);
    check_binary(&ops, &ctx, Op::Mul, &a, &b, arith::mul);
    check_binary(&ops, &ctx, Op::MulAdd, &a, &b, |x, y| arith::add(arith::mul(x, y), y));
}

#[test]
fn division_is_correctly_rounded() {
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let mut rng = SplitMix64::new(2);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..(1 << 21) {
        match i % 4 {
            0 => {
                a.push(rng.next_u32());
                b.push(rng.next_u32());
            }
            1 => {
                a.push(rng.f32_exp(-20, 20).to_bits());
                b.push(rng.f32_exp(-20, 20).to_bits());
            }
            2 => {
                // Quotients around 2^-126, where IEEE rounds on the subnormal grid
                // and only an all-ones significand reaches the smallest normal.
                a.push(rng.f32_exp(-126, -120).to_bits());
                b.push(rng.f32_exp(-1, 7).to_bits());
            }
            _ => {
                // Quotients around the overflow threshold, and divisors with
                // significands near 1 and near 2 (longest carries in the rounding).
                a.push(rng.f32_exp(120, 128).to_bits());
                let m = if rng.next_u32() & 1 == 0 { rng.next_u32() & 0xff } else { 0x7f_ffff - (rng.next_u32() & 0xff) };
                b.push(((rng.below(16) as u32 + 120) << 23) | m);
            }
        }
    }
    // The only way below 2^-126 to round up to it: an all-ones significand over a
    // power of two, landing on a tie of the subnormal grid; plus its near misses.
    for (x, y) in [(0x00ff_ffffu32, 0x4000_0000u32), (0x80ff_ffff, 0x4000_0000), (0x01ff_ffff, 0x4100_0000),
        (0x00ff_fffe, 0x4000_0000), (0x00ff_ffff, 0x4000_0001), (0x00ff_ffff, 0x3fff_ffff)] {
        a.push(x);
        b.push(y);
    }
    let e = edges();
    for &x in &e {
        for &y in &e {
            a.push(x);
            b.push(y);
        }
    }
    check_binary(&ops, &ctx, Op::Div, &a, &b, arith::div);
}

/// The significand of √x depends only on x's significand and the parity of its
/// exponent: 2 × 2^23 inputs cover every case, and a spread of exponents checks
/// the exponent arithmetic.
#[test]
fn square_root_is_correctly_rounded_exhaustively() {
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let step = 1u32 << 22;
    let mut rng = SplitMix64::new(3);
    for parity in 0..2u32 {
        for start in (0..(1u32 << 23)).step_by(step as usize) {
            let a: Vec<u32> = (start..start + step)
                .map(|m| {
                    let e = (rng.below(126) as u32) * 2 + 1 + parity; // biased exponent in [1, 254]
                    (e << 23) | m
                })
                .collect();
            let gpu = ops.eval(&ctx, Op::Sqrt, &a, &[], RngParams::default()).unwrap();
            let want: Vec<u32> = a.iter().map(|&x| arith::sqrt(fl(x)).to_bits()).collect();
            assert_bits("sqrt", &gpu, &want, |i| format!("{:#010x}", a[i]));
        }
    }
    let e = edges();
    let gpu = ops.eval(&ctx, Op::Sqrt, &e, &[], RngParams::default()).unwrap();
    for (i, &x) in e.iter().enumerate() {
        let r = arith::sqrt(fl(x));
        if arith::is_non_finite(r) {
            assert!(arith::is_non_finite(f32::from_bits(gpu[i])), "sqrt({x:#010x}) must be non-finite");
        } else {
            assert_eq!(gpu[i], r.to_bits(), "sqrt({x:#010x})");
        }
    }
}

/// Division and square root whatever the float estimate: shifted by up to ±4
/// units the exact correction steps fix it, beyond that the integer fallback
/// decides (an exact `/` and `sqrt`, as lavapipe has, would test neither).
#[test]
fn division_and_square_root_with_perturbed_estimates() {
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let mut rng = SplitMix64::new(8);
    let mut a: Vec<u32> = (0..1 << 16).map(|_| rng.f32_exp(-30, 30).to_bits()).collect();
    let mut b: Vec<u32> = (0..1 << 16).map(|_| rng.f32_exp(-30, 30).to_bits()).collect();
    // Significands at the ends of [1, 2), where the estimate can cross a binade.
    for m in [0u32, 1, 2, 3, 0x7f_fffc, 0x7f_fffd, 0x7f_fffe, 0x7f_ffff] {
        for n in [0u32, 1, 0x7f_fffe, 0x7f_ffff] {
            a.push((127 << 23) | m);
            b.push((127 << 23) | n);
            a.push((128 << 23) | m);
            b.push((127 << 23) | n);
        }
    }
    let sq: Vec<u32> = a.iter().map(|&x| x & 0x7fff_ffff).collect();
    let want_div: Vec<u32> = a.iter().zip(&b).map(|(&x, &y)| arith::div(fl(x), fl(y)).to_bits()).collect();
    let want_sqrt: Vec<u32> = sq.iter().map(|&x| arith::sqrt(fl(x)).to_bits()).collect();
    for bias in [-9, -5, -4, -3, -1, 1, 2, 4, 5, 9] {
        let gpu = ops.eval_biased(&ctx, Op::Div, &a, &b, RngParams::default(), bias).unwrap();
        assert_bits(&format!("div, estimate {bias:+}"), &gpu, &want_div, |i| format!("{:#010x}, {:#010x}", a[i], b[i]));
        let gpu = ops.eval_biased(&ctx, Op::Sqrt, &sq, &[], RngParams::default(), bias).unwrap();
        assert_bits(&format!("sqrt, estimate {bias:+}"), &gpu, &want_sqrt, |i| format!("{:#010x}", sq[i]));
    }
}

#[test]
fn flush_rule() {
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let mut rng = SplitMix64::new(4);
    let mut a: Vec<u32> = (0..65536).map(|_| rng.next_u32() & 0x80ff_ffff).collect(); // many subnormals
    a.extend(edges());
    let gpu = ops.eval(&ctx, Op::Flush, &a, &[], RngParams::default()).unwrap();
    let want: Vec<u32> = a.iter().map(|&x| fl(x).to_bits()).collect();
    assert_bits("flush", &gpu, &want, |i| format!("{:#010x}", a[i]));
}

/// merge-core's storing conversion as the GPU must mirror it: a refused value
/// (non-finite or overflowing, `Err` on the CPU) must come out non-finite.
fn check_store(what: &str, gpu: &[u32], x: &[u32], cpu: fn(f32) -> Result<u16, merge_core::dtype::StoreError>) {
    let want: Vec<u32> = x
        .iter()
        .zip(gpu)
        .map(|(&v, &g)| match cpu(f32::from_bits(v)) {
            Ok(h) => u32::from(h),
            Err(_) if what == "f32->bf16" && g & 0x7f80 == 0x7f80 => g,
            Err(_) if what == "f32->f16" && g & 0x7c00 == 0x7c00 => g,
            Err(_) => 0xdead_0000,
        })
        .collect();
    assert_bits(what, gpu, &want, |i| format!("{:#010x}", x[i]));
}

#[test]
fn sixteen_bit_conversions_match_merge_core() {
    use merge_core::dtype;
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let all: Vec<u32> = (0..65536u32).collect();
    let finite = |h: u32, exp: u32| h & exp != exp;
    let gpu = ops.eval(&ctx, Op::Bf16ToF32, &all, &[], RngParams::default()).unwrap();
    let want: Vec<u32> = all.iter().map(|&h| dtype::bf16_to_f32(h as u16).to_bits()).collect();
    assert_bits("bf16->f32", &gpu, &want, |i| format!("{:#06x}", all[i]));
    assert!(all.iter().all(|&h| finite(h, 0x7f80) || arith::is_non_finite(f32::from_bits(gpu[h as usize]))));
    let gpu = ops.eval(&ctx, Op::F16ToF32, &all, &[], RngParams::default()).unwrap();
    let want: Vec<u32> = all.iter().map(|&h| dtype::f16_to_f32(h as u16).to_bits()).collect();
    assert_bits("f16->f32", &gpu, &want, |i| format!("{:#06x}", all[i]));

    let mut rng = SplitMix64::new(5);
    let mut x: Vec<u32> = (0..1 << 20).map(|_| rng.next_u32()).collect();
    // Values whose dropped bits are exactly half: the ties of round-to-nearest-even,
    // including those that round up into the binary16 overflow.
    x.extend((0..65536u32).map(|h| (h << 16) | 0x8000));
    x.extend((0..65536u32).map(|h| 0x3300_0000u32.wrapping_add(h << 13) | 0x1000));
    x.extend((0..8192u32).map(|h| 0x3300_0000u32 + (h << 12)));
    x.extend(edges());
    let gpu = ops.eval(&ctx, Op::F32ToBf16, &x, &[], RngParams::default()).unwrap();
    check_store("f32->bf16", &gpu, &x, dtype::f32_to_bf16);
    let gpu = ops.eval(&ctx, Op::F32ToF16, &x, &[], RngParams::default()).unwrap();
    check_store("f32->f16", &gpu, &x, dtype::f32_to_f16);
}

#[test]
fn threefry_and_keep_decisions_match_merge_core() {
    use merge_core::rng::{threefry2x32_20, tensor_id, Keep, MaskKey};
    let ctx = ctx();
    let ops = Ops::new(&ctx);
    let mut rng = SplitMix64::new(6);
    let key = MaskKey::new(0x0123_4567_89ab_cdef, tensor_id("model.layers.0.mlp.up_proj.weight"), 42);
    let c0: Vec<u32> = (0..1 << 16).map(|i| if i < 256 { i } else { rng.next_u32() }).collect();
    let c1: Vec<u32> = (0..1 << 16).map(|i| if i < 256 { 0 } else { rng.next_u32() }).collect();
    let params = RngParams { k0: key.0[0], k1: key.0[1], ..Default::default() };
    let gpu = ops.eval(&ctx, Op::Threefry, &c0, &c1, params).unwrap();
    let want: Vec<u32> = c0.iter().zip(&c1).flat_map(|(&a, &b)| threefry2x32_20(key.0, [a, b])).collect();
    assert_bits("threefry", &gpu, &want, |i| format!("ctr ({:#x}, {:#x})", c0[i / 2], c1[i / 2]));

    let idx: Vec<u32> = (0..1u32 << 17).chain([u32::MAX - 1, u32::MAX]).collect();
    for p in [1e-3f32, 0.01, 0.3, 0.999_999_9, 1.0] {
        let keep = Keep::new(p).unwrap();
        for stream in [0u32, 1, 5] {
            let params = RngParams {
                k0: key.0[0],
                k1: key.0[1],
                stream,
                threshold: keep.threshold().unwrap_or(0),
                keep_all: keep.threshold().is_none(),
            };
            let gpu = ops.eval(&ctx, Op::Keep, &idx, &[], params).unwrap();
            let want: Vec<u32> = idx.iter().map(|&i| u32::from(keep.keeps(key.uniform(i, stream)))).collect();
            assert_bits(&format!("keep p={p} stream={stream}"), &gpu, &want, |i| format!("index {}", idx[i]));
        }
    }
}

#[test]
fn self_test_passes_on_this_adapter() {
    let report = gpu_shaders::self_test(&gpu_shaders::GpuOptions::default()).unwrap_or_else(|e| {
        panic!("self-test could not run ({e}); install mesa-vulkan-drivers libvulkan1 (software Vulkan)")
    });
    assert!(report.passed(), "{report}");
    assert!(report.checks.len() >= 9 && report.checks.iter().all(|c| c.cases > 0), "{report}");
}
