//! `host merge` end to end: parity with mergekit 0.1.5 on the committed fixtures
//! (tests/fixtures/merge, made by scripts/merge_parity.py), DARE's reproducibility
//! across runs, backends, shardings and tensor orders, the complete output folder,
//! and every refusal leaving the output folder as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use host::merge::stream::{self, ModelFiles, OutTensor, ShardWriter};
use merge_core::dtype::{Dtype, bf16_to_f32};

mod common;
use common::tmp;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/merge")
}

fn host_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_host")).args(args).current_dir(dir).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "host failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "host succeeded but should have refused: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every tensor of a model folder (single file or shards) as f32, with its stored bits.
fn load(dir: &Path) -> BTreeMap<String, (Dtype, Vec<f32>, Vec<u32>)> {
    let files = ModelFiles::open(dir).unwrap();
    files
        .tensors
        .iter()
        .map(|(name, e)| {
            let bytes = stream::read_tensor(e).unwrap();
            let (vals, bits): (Vec<f32>, Vec<u32>) = match e.dtype {
                Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).map(|x| (x, x.to_bits())).unzip(),
                Dtype::Bf16 => bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .map(|h| (bf16_to_f32(h), u32::from(h)))
                    .unzip(),
                Dtype::F16 => panic!("no f16 fixtures"),
            };
            (name.clone(), (e.dtype, vals, bits))
        })
        .collect()
}

/// Runs a fixture YAML on the CPU into `out`.
fn merge_fixture(name: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["merge", &*format!("{name}.yml")].into_iter().map(String::from).collect::<Vec<_>>();
    args.push(out.to_str().unwrap().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&host_in(&fixtures(), &refs));
}

/// Deterministic methods against mergekit: the largest error relative to each
/// tensor's largest magnitude, and how many elements differ at all.
fn parity(name: &str) -> (f64, usize) {
    let dir = tmp(&format!("parity-{name}"));
    let out = dir.join("out");
    merge_fixture(name, &out, &["--backend", "cpu"]);
    let ours = load(&out);
    let theirs = load(&fixtures().join("mergekit").join(name));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{name}: tensor names");
    let (mut worst, mut differing) = (0f64, 0usize);
    for (tensor, (dt, x, xb)) in &ours {
        let (tdt, y, yb) = &theirs[tensor];
        assert_eq!(dt, tdt, "{name}: {tensor} dtype");
        let scale = y.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))).max(1e-30);
        for i in 0..x.len() {
            worst = worst.max(f64::from((x[i] - y[i]).abs()) / scale);
            differing += usize::from(xb[i] != yb[i]);
        }
    }
    (worst, differing)
}

#[test]
fn task_arithmetic_and_ties_match_mergekit_bit_for_bit() {
    // Same left-to-right sums, the same TIES trim (density·n is a whole number
    // in every fixture tensor, where ⌈·⌉ and mergekit's int() agree), the same
    // sign election and disjoint mean, the same round-to-nearest-even to bf16.
    for name in ["task_arithmetic", "ties", "ties_bf16_out"] {
        assert_eq!(parity(name), (0.0, 0), "{name}");
    }
}

#[test]
fn linear_and_slerp_match_mergekit_to_rounding() {
    // mergekit's linear accumulates with addcmul (a fused multiply-add on the
    // CPU), merge-core rounds the product first (SPEC.md §1: no FMA); SLERP's
    // norms are summed in another order (chunked vector norms vs §3's tree).
    // Both stay within 2^-22 of each tensor's largest magnitude.
    for name in ["linear", "slerp"] {
        let (worst, differing) = parity(name);
        assert!(worst <= 2f64.powi(-22), "{name}: max relative error {worst:e}");
        assert!(differing > 0, "{name}: expected the documented rounding differences, found none (fixtures changed?)");
    }
}

#[test]
fn dare_keeps_density_and_rescales_by_its_inverse_where_mergekit_matches_the_l1_norm() {
    let dir = tmp("dare-stats");
    let out = dir.join("out");
    merge_fixture("dare_linear", &out, &["--backend", "cpu", "--seed", "7"]);
    let base = load(&fixtures().join("models/base"));
    let ft = load(&fixtures().join("models/ft1"));
    let ours = load(&out);
    let theirs = load(&fixtures().join("mergekit/dare_linear"));
    let density = 0.5f64;
    let (mut kept_ours, mut kept_theirs, mut n) = (0usize, 0usize, 0usize);
    for (tensor, (_, b, _)) in &base {
        let f = &ft[tensor].1;
        let (o, t) = (&ours[tensor].1, &theirs[tensor].1);
        let (mut l1_all, mut l1_kept) = (0f64, 0f64);
        for i in 0..b.len() {
            let tau = f64::from(f[i]) - f64::from(b[i]);
            n += 1;
            l1_all += tau.abs();
            if o[i] != b[i] {
                kept_ours += 1;
                let ratio = (f64::from(o[i]) - f64::from(b[i])) / tau;
                assert!((ratio - 1.0 / density).abs() < 1e-3, "{tensor}[{i}]: ours rescales by {ratio}, not 1/density");
            }
            if t[i] != b[i] {
                kept_theirs += 1;
                l1_kept += tau.abs();
            }
        }
        // mergekit 0.1.5 scales the kept values so their L1 norm is the full task vector's.
        let l1_ratio = l1_all / l1_kept;
        for i in 0..b.len() {
            let tau = f64::from(f[i]) - f64::from(b[i]);
            if t[i] != b[i] {
                let ratio = (f64::from(t[i]) - f64::from(b[i])) / tau;
                assert!((ratio / l1_ratio - 1.0).abs() < 1e-3, "{tensor}[{i}]: mergekit rescales by {ratio}, L1 ratio {l1_ratio}");
            }
        }
    }
    let sigma = (density * (1.0 - density) / n as f64).sqrt();
    for (who, kept) in [("ours", kept_ours), ("mergekit", kept_theirs)] {
        let frac = kept as f64 / n as f64;
        assert!((frac - density).abs() < 5.0 * sigma, "{who}: kept {frac} of {n}, density {density}");
    }
}

/// A copy of a model folder as shards of at most `max_bytes`, tensors in reverse name order.
fn reshard_reversed(from: &Path, to: &Path, max_bytes: u64) {
    let files = ModelFiles::open(from).unwrap();
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    let outs: Vec<OutTensor> =
        files.tensors.iter().rev().map(|(n, e)| OutTensor { name: n.clone(), dtype: e.dtype, shape: e.shape.clone() }).collect();
    let shards = stream::plan_shards(&outs, max_bytes);
    let names = host::model_folder::shard_file_names(shards.len());
    assert!(shards.len() > 1);
    let mut map = serde_json::Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let mut w = ShardWriter::create(&to.join(file), shard).unwrap();
        for t in shard {
            w.write(&t.name, &stream::read_tensor(&files.tensors[&t.name]).unwrap()).unwrap();
            map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
        }
        w.finish().unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(to.join(stream::INDEX_FILE), index.to_string()).unwrap();
}

#[test]
fn dare_ties_is_reproducible_across_runs_backends_shardings_and_tensor_orders() {
    let dir = tmp("dare-repro");
    let first = dir.join("first");
    merge_fixture("dare_ties", &first, &["--backend", "cpu", "--seed", "3"]);
    let reference = load(&first);
    let again = dir.join("again");
    merge_fixture("dare_ties", &again, &["--backend", "cpu", "--seed", "3"]);
    assert_eq!(load(&again), reference, "a second run");

    // The GPU (lavapipe in CI), every tensor cross-checked against merge-core.
    let gpu = dir.join("gpu");
    let o = host_in(&fixtures(), &["merge", "dare_ties.yml", gpu.to_str().unwrap(), "--backend", "gpu", "--seed", "3"]);
    let stdout = ok(&o);
    assert!(stdout.contains("cross-checked bit for bit"), "{stdout}");
    assert_eq!(load(&gpu), reference, "--backend gpu");

    // Inputs re-saved as shards in reverse tensor order, output sharded small.
    let models = dir.join("models");
    for m in ["base", "ft1", "ft2"] {
        reshard_reversed(&fixtures().join("models").join(m), &models.join(m), 3000);
    }
    std::fs::copy(fixtures().join("dare_ties.yml"), dir.join("dare_ties.yml")).unwrap();
    let o = host_in(&dir, &["merge", "dare_ties.yml", "resharded", "--backend", "cpu", "--seed", "3", "--max-shard-size", "4KB"]);
    let stdout = ok(&o);
    assert!(dir.join("resharded").join(stream::INDEX_FILE).is_file(), "{stdout}");
    assert_eq!(load(&dir.join("resharded")), reference, "sharded inputs in another tensor order, sharded output");

    let seed4 = dir.join("seed4");
    merge_fixture("dare_ties", &seed4, &["--backend", "cpu", "--seed", "4"]);
    assert_ne!(load(&seed4), reference, "another seed draws other masks");
}

#[test]
fn output_is_a_complete_model_folder() {
    let dir = tmp("folder");
    let src = dir.join("src");
    for m in ["base", "ft1"] {
        let to = src.join(m);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures().join("models").join(m).join(f), to.join(f)).unwrap();
        }
    }
    std::fs::write(src.join("ft1/tokenizer.json"), "{\"ft1\": true}").unwrap();
    std::fs::write(src.join("ft1/generation_config.json"), "{\"eos_token_id\": [2, 5]}").unwrap();
    std::fs::write(src.join("base/tokenizer.json"), "{\"base\": true}").unwrap();
    let yaml = "merge_method: ties\nbase_model: src/base\nmodels:\n  - model: src/ft1\n    parameters: {weight: 1.0, density: 0.5}\n\
                tokenizer_source: src/ft1\nout_dtype: bfloat16\n";
    std::fs::write(dir.join("m.yml"), yaml).unwrap();
    ok(&host_in(&dir, &["merge", "m.yml", "out", "--backend", "cpu"]));
    let out = dir.join("out");
    assert_eq!(std::fs::read_to_string(out.join("tokenizer.json")).unwrap(), "{\"ft1\": true}");
    assert_eq!(std::fs::read_to_string(out.join("generation_config.json")).unwrap(), "{\"eos_token_id\": [2, 5]}");
    assert_eq!(std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(), yaml);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["num_hidden_layers"], 3);
    let loaded = host::hf::load_model(&out).unwrap();
    assert_eq!(loaded.1, Dtype::Bf16, "the trainer's loader reads the merged folder");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("merge-tmp")).collect();
    assert!(leftovers.is_empty(), "staging folder left behind");
}

/// Writes `yaml` beside copies of the fixture models, runs it, and checks the
/// refusal names `needle` and leaves `out` as it was (absent, or with its marker).
fn refused(tag: &str, yaml: &str, edit: impl Fn(&Path), needle: &str) {
    let dir = tmp(tag);
    for m in ["base", "ft1", "ft2"] {
        let to = dir.join("models").join(m);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures().join("models").join(m).join(f), to.join(f)).unwrap();
        }
    }
    edit(&dir);
    std::fs::write(dir.join("m.yml"), yaml).unwrap();
    let msg = err(&host_in(&dir, &["merge", "m.yml", "out", "--backend", "cpu"]));
    assert!(msg.contains(needle), "{tag}: expected `{needle}` in: {msg}");
    let before_marker = dir.join("out").join("keep.txt").exists();
    if !before_marker {
        assert!(!dir.join("out").exists(), "{tag}: output folder created by a refused merge");
    }
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("merge-tmp")), "{tag}: staging left behind: {names:?}");
}

const TIES: &str = "merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n    parameters:\n      weight: 1.0\n      density: 0.5\n";

/// Rewrites one tensor of a model: `f` gets the header entry and the data bytes.
fn patch_tensor(path: &Path, tensor: &str, f: impl Fn(&mut serde_json::Value, &mut Vec<u8>)) {
    let raw = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let mut data = raw[8 + n..].to_vec();
    f(&mut header[tensor], &mut data);
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn bad_inputs_are_named_and_leave_the_output_folder_alone() {
    let none = |_: &Path| {};
    refused("slices", "merge_method: ties\nslices: []\nmodels: []\n", none, "m.yml:2: `slices` (layer slicing) is not supported");
    refused("passthrough", "merge_method: passthrough\nmodels:\n  - model: models/ft1\n", none, "merge_method `passthrough` is not supported");
    refused("della", "merge_method: della\nmodels:\n  - model: models/ft1\n", none, "no DELLA");
    refused("unknown-param", &format!("{TIES}parameters:\n  epsilon: 0.1\n"), none, "m.yml:9: ties has no parameter `epsilon`");
    refused("global-in-model", "merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n    parameters:\n      weight: 1\n      normalize: true\n", none, "m.yml:7: `normalize` is a parameter of the whole ties merge");
    refused("union", &format!("{TIES}tokenizer_source: union\n"), none, "`tokenizer_source: union`");
    refused("no-weight", "merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n", none, "no `weight` for model models/ft1");
    refused("density-high", &TIES.replace("density: 0.5", "density: 1.5"), none, "density");
    refused("density-zero", &TIES.replace("density: 0.5", "density: 0"), none, "density");
    refused("weight-nan", &TIES.replace("weight: 1.0", "weight: .nan"), none, "m.yml:6: `.nan` is not a finite number");
    refused(
        "zero-sum",
        "merge_method: linear\nmodels:\n  - model: models/ft1\n    parameters: {weight: 0.5}\n  - model: models/ft2\n    parameters: {weight: -0.5}\n",
        none,
        "weights whose binary32 sum is not zero",
    );
    refused("dare-no-rescale", "merge_method: dare_ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n    parameters: {weight: 1, density: 0.5}\nparameters:\n  rescale: false\n", none, "`rescale: false` for dare_ties is not supported");
    refused("missing-model", &TIES.replace("models/ft1", "models/nope"), none, "model models/nope: is not a folder");
    refused(
        "shape",
        TIES,
        |d| patch_tensor(&d.join("models/ft1/model.safetensors"), "model.norm.weight", |h, _| h["shape"] = serde_json::json!([4, 4])),
        "tensor `model.norm.weight` has shape [16] in models/base but [4, 4] in models/ft1",
    );
    refused(
        "missing-tensor",
        TIES,
        |d| {
            let p = d.join("models/ft1/model.safetensors");
            patch_tensor(&p, "model.norm.weight", |_, _| {});
            let raw = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
            let mut header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
            header.as_object_mut().unwrap().remove("model.norm.weight");
            let text = header.to_string();
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(&raw[8 + n..]);
            std::fs::write(&p, out).unwrap();
        },
        "tensor `model.norm.weight` (shape [16]) is in models/base but missing from models/ft1",
    );
    refused(
        "int-dtype",
        TIES,
        |d| patch_tensor(&d.join("models/ft1/model.safetensors"), "model.norm.weight", |h, _| h["dtype"] = "I32".into()),
        "tensor `model.norm.weight`: dtype I32: merges take F32, BF16 or F16 tensors",
    );
    refused(
        "nan-value",
        TIES,
        |d| {
            patch_tensor(&d.join("models/ft1/model.safetensors"), "model.norm.weight", |h, data| {
                let start = h["data_offsets"][0].as_u64().unwrap() as usize + 4 * 3;
                data[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            })
        },
        "tensor `model.norm.weight`: non-finite model weights at element 3 (in the TIES trim of model 0 = models/ft1; base = models/base, model 0 = models/ft1)",
    );
    refused(
        "out-not-empty",
        TIES,
        |d| {
            std::fs::create_dir_all(d.join("out")).unwrap();
            std::fs::write(d.join("out/keep.txt"), "mine").unwrap();
        },
        "out exists and is not empty",
    );
}

#[test]
fn the_shipped_examples_merge_models_that_pretrain_makes() {
    let dir = tmp("examples");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    // The commands the examples' comments give, at test sizes.
    ok(&host_in(&dir, &["pretrain", "--builtin", "8", "--steps", "1", "--batch-size", "4", "--out", "out/base", "--backend", "cpu"]));
    for (seed, out) in [("1", "out/ft_a"), ("2", "out/ft_b")] {
        let args = ["sft", "--model", "out/base/model", "--builtin", "8", "--steps", "1", "--batch-size", "4", "--seed", seed, "--out", out, "--backend", "cpu"];
        ok(&host_in(&dir, &args));
    }
    for example in ["ties.yml", "dare_ties.yml"] {
        let out = format!("out/{}", example.trim_end_matches(".yml"));
        let stdout = ok(&host_in(&dir, &["merge", examples.join(example).to_str().unwrap(), &out, "--backend", "cpu"]));
        assert!(stdout.contains("merged"), "{stdout}");
        host::hf::load_model(&dir.join(&out)).unwrap();
    }
}

/// Three one-layer models with one 300k-element tensor, large enough to be cut
/// into pieces across threads; `nan_at` puts NaNs into the first fine-tune.
fn big_models(dir: &Path, nan_at: &[usize]) {
    let n = 600 * 500;
    let config = "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"num_hidden_layers\": 1}";
    for (m, seed) in [("base", 1u64), ("ft1", 2), ("ft2", 3)] {
        let to = dir.join(m);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(to.join("config.json"), config).unwrap();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect();
        if m == "ft1" {
            for &i in nan_at {
                values[i] = f32::NAN;
            }
        }
        let t = OutTensor { name: "model.layers.0.mlp.up_proj.weight".into(), dtype: Dtype::F32, shape: vec![600, 500] };
        let mut w = ShardWriter::create(&to.join("model.safetensors"), &[t]).unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write("model.layers.0.mlp.up_proj.weight", &bytes).unwrap();
        w.finish().unwrap();
    }
}

#[test]
fn the_thread_count_changes_no_bit_and_not_which_bad_element_is_named() {
    let dir = tmp("threads");
    big_models(&dir, &[]);
    let configs = [
        ("ties", "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 0.6, density: 0.3}\n  - model: ft2\n    parameters: {weight: 0.4, density: 0.5}\n"),
        ("dare", "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 0.6, density: 0.3}\n  - model: ft2\n    parameters: {weight: 0.4, density: 0.5}\n"),
        ("linear", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 0.6}\n  - model: ft2\n    parameters: {weight: 0.4}\nout_dtype: bfloat16\n"),
        ("slerp", "merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft1\nparameters:\n  t: 0.3\n"),
    ];
    for (name, yaml) in configs {
        std::fs::write(dir.join(format!("{name}.yml")), yaml).unwrap();
        let one = format!("{name}-1");
        let four = format!("{name}-4");
        ok(&host_in(&dir, &["merge", &format!("{name}.yml"), &one, "--backend", "cpu", "--threads", "1"]));
        ok(&host_in(&dir, &["merge", &format!("{name}.yml"), &four, "--backend", "cpu", "--threads", "4"]));
        assert_eq!(load(&dir.join(&one)), load(&dir.join(&four)), "{name}: 1 vs 4 threads");
    }

    let bad = tmp("threads-nan");
    big_models(&bad, &[250_000, 100_000]);
    std::fs::write(bad.join("m.yml"), configs[1].1).unwrap();
    for threads in ["1", "4"] {
        let msg = err(&host_in(&bad, &["merge", "m.yml", "out", "--backend", "cpu", "--threads", threads]));
        assert!(msg.contains("non-finite model 0 weights at element 100000"), "--threads {threads}: {msg}");
    }
}

#[test]
fn a_gpu_merge_of_more_models_than_the_kernel_binds_is_refused_up_front() {
    let dir = tmp("gpu-five");
    let mut yaml = String::from("merge_method: linear\nmodels:\n");
    for (i, m) in ["base", "ft1", "ft2", "ft3", "ft1"].iter().enumerate() {
        let to = dir.join(format!("m{i}"));
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixtures().join("models").join(m).join(f), to.join(f)).unwrap();
        }
        yaml.push_str(&format!("  - model: m{i}\n    parameters: {{weight: 0.2}}\n"));
    }
    std::fs::write(dir.join("five.yml"), &yaml).unwrap();
    let msg = err(&host_in(&dir, &["merge", "five.yml", "out", "--backend", "gpu"]));
    assert!(msg.contains("the GPU merge kernel takes at most 4 models; use --backend cpu"), "{msg}");
    assert!(!dir.join("out").exists());
    // Four models fit the kernel.
    let four = yaml.rsplitn(2, "  - model: m4").last().unwrap().to_string();
    std::fs::write(dir.join("four.yml"), four).unwrap();
    let stdout = ok(&host_in(&dir, &["merge", "four.yml", "out4", "--backend", "gpu"]));
    assert!(stdout.contains("cross-checked bit for bit"), "{stdout}");
}
