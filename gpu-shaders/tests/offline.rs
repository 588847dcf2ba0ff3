//! GPU offline merges against merge_core::offline on random tensors of awkward
//! sizes, mixed input dtypes, 16-bit outputs and forced tiny chunks.

mod common;

use common::{ctx_with, SplitMix64};
use gpu_shaders::offline::GpuMerger;
use gpu_shaders::{GpuError, GpuOptions};
use merge_core::dtype::{f32_to_bf16, f32_to_f16, Dst, Src};
use merge_core::offline::{self, Gta, GtaPlan, ModelParams, Sparsify};

fn merger(chunk: Option<u64>) -> GpuMerger {
    GpuMerger::new(ctx_with(&GpuOptions { max_chunk_bytes: chunk, ..Default::default() }))
}

#[test]
fn gta_linear_interpolate_match_merge_core() {
    for (n, chunk) in [(1usize, None), (257, Some(1024u64)), (65537, Some(4096))] {
        let m = merger(chunk);
        let mut rng = SplitMix64::new(n as u64);
        let base: Vec<f32> = (0..n).map(|_| rng.uniform_f32(0.5)).collect();
        let models32: Vec<Vec<f32>> =
            (0..4).map(|_| base.iter().map(|&b| b + (rng.below(7) as f32 - 3.0) * 1e-3 + rng.uniform_f32(1e-4)).collect()).collect();
        let m16: Vec<u16> = models32[1].iter().map(|&x| f32_to_bf16(x).unwrap()).collect();
        let m16h: Vec<u16> = models32[2].iter().map(|&x| f32_to_f16(x).unwrap()).collect();
        let models = [Src::F32(&models32[0]), Src::Bf16(&m16), Src::F16(&m16h), Src::F32(&models32[3])];
        let params: Vec<ModelParams> =
            [(0.5, 0.3), (0.25, 0.6), (-0.1, 0.9), (0.7, 1.0)].iter().map(|&(weight, density)| ModelParams { weight, density }).collect();
        for sparsify in [Sparsify::None, Sparsify::Magnitude, Sparsify::Random] {
            for (consensus, normalize) in [(false, false), (true, true), (true, false)] {
                let config = Gta { sparsify, consensus, normalize, lambda: 0.9 };
                let mut thr_cpu = Vec::new();
                let mut thr_gpu = Vec::new();
                if sparsify == Sparsify::Magnitude {
                    for (mm, p) in models.iter().zip(&params) {
                        thr_cpu.push(offline::task_vector_threshold("w", p.density, &[Src::F32(&base)], &[*mm]).unwrap());
                        thr_gpu.push(m.task_vector_threshold("w", p.density, &[Src::F32(&base)], &[*mm]).unwrap());
                    }
                    assert_eq!(thr_cpu, thr_gpu, "n={n}");
                }
                let mut want = vec![0u16; n];
                let plan = GtaPlan::new(&config, "w", 3, &params, &thr_cpu, 0).unwrap();
                plan.apply("w", 0, Src::F32(&base), &models, &mut Dst::Bf16(&mut want)).unwrap();
                let mut got = vec![0u16; n];
                m.gta(&config, "w", 3, &params, &thr_gpu, 0, Src::F32(&base), &models, &mut Dst::Bf16(&mut got)).unwrap();
                assert_eq!(got, want, "gta {config:?} n={n}");
            }
        }
        let w = [0.4, 0.3, 0.2, 0.1];
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        offline::linear("w", 0, &models, &w, true, &mut Dst::F32(&mut want)).unwrap();
        m.linear("w", &models, &w, true, &mut Dst::F32(&mut got)).unwrap();
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "linear n={n}");
        offline::interpolate("w", 0, models[0], models[1], 0.3, &mut Dst::F32(&mut want)).unwrap();
        m.interpolate("w", models[0], models[1], 0.3, &mut Dst::F32(&mut got)).unwrap();
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "interpolate n={n}");
    }
}

#[test]
fn bad_inputs_are_named_like_merge_core_and_nothing_is_written() {
    let m = merger(Some(1024));
    let base = vec![0.0f32; 600];
    let mut a = vec![1.0f32; 600];
    let mut b = vec![2.0f32; 600];
    a[530] = f32::NAN;
    b[299] = f32::INFINITY;
    let models = [Src::F32(&a), Src::F32(&b)];
    let params = [ModelParams { weight: 1.0, density: 0.5 }, ModelParams { weight: 1.0, density: 0.5 }];
    let mut got = vec![7.0f32; 600];
    let err = m.gta(&Gta::TASK_ARITHMETIC, "x", 1, &params, &[], 0, Src::F32(&base), &models, &mut Dst::F32(&mut got)).unwrap_err();
    let mut want = vec![7.0f32; 600];
    let cpu = GtaPlan::new(&Gta::TASK_ARITHMETIC, "x", 1, &params, &[], 0)
        .unwrap()
        .apply("x", 0, Src::F32(&base), &models, &mut Dst::F32(&mut want))
        .unwrap_err();
    assert_eq!(err.to_string(), GpuError::Core(cpu).to_string());
    assert!(err.to_string().contains("model 1 weights at element 299"), "{err}");
    assert_eq!(got, vec![7.0f32; 600]);
    // A result too large for binary16 storage, before a later bad input.
    let big = vec![60000.0f32; 600];
    let mut out16 = vec![0u16; 600];
    let err = m.linear("y", &[Src::F32(&big), Src::F32(&a)], &[1.0, 1.0], false, &mut Dst::F16(&mut out16)).unwrap_err();
    let cpu = offline::linear("y", 0, &[Src::F32(&big), Src::F32(&a)], &[1.0, 1.0], false, &mut Dst::F16(&mut vec![0u16; 600])).unwrap_err();
    assert_eq!(err.to_string(), GpuError::Core(cpu).to_string());
    assert!(out16.iter().all(|&h| h == 0));
    let five: Vec<Src> = (0..5).map(|_| Src::F32(&base)).collect();
    let err = m.linear("z", &five, &[1.0; 5], false, &mut Dst::F32(&mut vec![0.0; 600])).unwrap_err();
    assert!(err.to_string().contains("at most") || err.to_string().contains("1 to 4 models"), "{err}");
}
