//! GPU radix-select thresholds against merge_core::topk::select, per tensor and
//! global, with heavy ties (index passes) and forced tiny chunks.

mod common;

use common::{ctx_with, SplitMix64, TestInputs};
use gpu_shaders::tensor::GpuArray;
use gpu_shaders::topk::GpuTopK;
use gpu_shaders::GpuOptions;
use merge_core::topk::{keep_count, select};

fn data(rng: &mut SplitMix64, n: usize, tie_heavy: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if tie_heavy {
                // Few distinct magnitudes of both signs, zeros of both signs, subnormals.
                match rng.below(6) {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::from_bits(0x8000_0003),
                    _ => (rng.below(4) as f32 - 1.5) * 0.25,
                }
            } else if i % 13 == 0 {
                rng.f32_exp(-30, 30)
            } else {
                rng.uniform_f32(1.0)
            }
        })
        .collect()
}

#[test]
fn thresholds_match_merge_core_per_tensor_and_global() {
    for chunk in [None, Some(1024u64)] {
        let ctx = ctx_with(&GpuOptions { max_chunk_bytes: chunk, ..Default::default() });
        let topk = GpuTopK::new(&ctx);
        let mut rng = SplitMix64::new(17);
        let sizes = [1usize, 255, 257, 3000, 65537];
        for tie_heavy in [false, true] {
            let host: Vec<Vec<f32>> = sizes.iter().map(|&n| data(&mut rng, n, tie_heavy)).collect();
            let dev: Vec<GpuArray> = host.iter().map(|h| GpuArray::from_f32(&ctx, "x", h)).collect();
            for p in [1e-3f32, 0.01, 0.3, 0.5, 1.0] {
                for (h, d) in host.iter().zip(&dev) {
                    let k = keep_count("p", p, h.len() as u64).unwrap();
                    let want = select("t", &[h], k).unwrap();
                    let got = topk.select(&ctx, "t", &[d], k).unwrap();
                    assert_eq!(got, want, "per tensor n={} p={p} ties={tie_heavy} chunk={chunk:?}", h.len());
                }
                let all: Vec<&[f32]> = host.iter().map(|h| h.as_slice()).collect();
                let n: u64 = host.iter().map(|h| h.len() as u64).sum();
                let k = keep_count("p", p, n).unwrap();
                let want = select("global", &all, k).unwrap();
                let refs: Vec<&GpuArray> = dev.iter().collect();
                let got = topk.select(&ctx, "global", &refs, k).unwrap();
                assert_eq!(got, want, "global p={p} ties={tie_heavy} chunk={chunk:?}");
            }
        }
    }
}

#[test]
fn non_finite_input_is_named_with_its_lowest_global_index() {
    let ctx = ctx_with(&GpuOptions { max_chunk_bytes: Some(1024), ..Default::default() });
    let topk = GpuTopK::new(&ctx);
    let a = vec![1.0f32; 700];
    let mut b = vec![2.0f32; 900];
    b[800] = f32::NAN;
    b[600] = f32::NEG_INFINITY;
    let da = GpuArray::from_f32(&ctx, "a", &a);
    let db = GpuArray::from_f32(&ctx, "b", &b);
    let err = topk.select(&ctx, "global", &[&da, &db], 10).unwrap_err();
    let cpu = select("global", &[&a, &b], 10).unwrap_err();
    assert_eq!(err.to_string(), cpu.to_string());
    assert!(err.to_string().contains("element 1300"), "{err}");
}
