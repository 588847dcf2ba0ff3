//! `capi/tests/golden/*.txt` are golden files of `tests/golden/` in a plain-text
//! form that `examples/golden.c` reads without a JSON parser: every case's
//! inputs, hyperparameters and expected bits (or expected error code and
//! message). This test writes that text from the JSON files and fails when the
//! committed text differs, so the C program is held to the real golden vectors;
//! `MERGE_CORE_CAPI_UPDATE=1` rewrites the text instead.
//!
//! Format (`merge-core-capi-golden/1`), whitespace-separated tokens:
//! - strings are `<byte length>:<bytes>`; binary64 hyperparameters and seeds are
//!   16 hex digits of their bits; codes, counts and flags are decimal;
//! - arrays are `<dtype> <count> <words>`: `f32` 8 hex digits per value,
//!   `bf16`/`f16` 4, `bool` 0 or 1;
//! - a file is `merge-core-capi-golden/1 <source path>`, then cases
//!   `case <name> <op> <op fields> expect ... end`, where `expect` is
//!   `error <MC_ERR_* code> <message>` or `outputs <count>` followed by that many
//!   `out <label> <array>`, labels as the JSON names the outputs.
//!
//! The op fields, in order (`<T>` tensors, `<S>` steps, `<M>` models):
//! - `optimizer`: the `McOnlineConfig` as `form lr beta1 beta2 eps weight_decay
//!   schedule warmup total method variant p alpha rescale clip scope k seed`
//!   (each `key value`), `tau_dtype <code> tensors <T> steps <S>`, then per tensor
//!   `tensor <name> <output label prefix>`, `base`, `sft` (read by the task-vector
//!   init, which plain AdamW skips), `theta`, `m`, `v` and `S` times `grad`, each
//!   `key <array>`;
//! - `linear`: `models <M> normalize <flag> weights <M values> out_dtype <code>`,
//!   `tensor <name> <prefix>`, `M` times `model <array>`;
//! - `interpolate`: `weight <value> out_dtype <code>`, `tensor`, `sft`, `rlhf`;
//! - `slerp`: `t <value> out_dtype <code>`, `tensor`, `a`, `b`;
//! - `gta`: the `McGtaConfig` as `sparsify consensus normalize lambda`, then
//!   `seed scope out_dtype`, `models <M> weights <M values> densities <M values>
//!   tensors <T>`, then per tensor `tensor`, `base`, `M` times `model`.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use golden_runner::{Array, Case};
use merge_core_c::*;
use serde_json::Value;

/// The golden files the C program reproduces.
const FILES: [&str; 2] = ["optimizer", "offline"];

fn string(s: &str) -> String {
    format!("{}:{s}", s.len())
}

fn bits(x: f64) -> String {
    format!("{:016x}", x.to_bits())
}

fn values(xs: &[f64]) -> String {
    xs.iter().map(|&x| bits(x)).collect::<Vec<_>>().join(" ")
}

fn flag(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

fn array(a: &Array) -> String {
    let (dtype, words): (&str, Vec<String>) = match a {
        Array::F32(v) => ("f32", v.iter().map(|x| format!("{:08x}", x.to_bits())).collect()),
        Array::Bf16(v) => ("bf16", v.iter().map(|h| format!("{h:04x}")).collect()),
        Array::F16(v) => ("f16", v.iter().map(|h| format!("{h:04x}")).collect()),
        Array::Bool(v) => ("bool", v.iter().map(|&b| flag(b).to_string()).collect()),
        Array::U32(_) => panic!("no C ABI output is a u32 array"),
    };
    let mut s = format!("{dtype} {}", words.len());
    for w in words {
        s.push(' ');
        s.push_str(&w);
    }
    s
}

fn dtype_code(word: &str) -> u32 {
    match word {
        "f32" => MC_DTYPE_F32,
        "bf16" => MC_DTYPE_BF16,
        "f16" => MC_DTYPE_F16,
        other => panic!("unknown dtype {other:?}"),
    }
}

/// The `MC_ERR_*` code of a merge-core error kind as the golden files name it.
fn error_code(kind: &str) -> i32 {
    match kind {
        "NonFinite" => MC_ERR_NON_FINITE,
        "InvalidHyperparameter" => MC_ERR_INVALID_HYPERPARAMETER,
        "LengthMismatch" => MC_ERR_LENGTH_MISMATCH,
        "StorageOverflow" => MC_ERR_STORAGE_OVERFLOW,
        "NonFiniteReduction" => MC_ERR_NON_FINITE_REDUCTION,
        "OutOfRange" => MC_ERR_OUT_OF_RANGE,
        "Misuse" => MC_ERR_MISUSE,
        other => panic!("unknown error kind {other:?}"),
    }
}

/// A case's fields, each marked when read, so that a case with an input or
/// parameter the text leaves out fails here instead of passing in C untested.
struct Fields<'a> {
    case: &'a Case,
    params: RefCell<BTreeSet<String>>,
    inputs: RefCell<BTreeSet<String>>,
}

impl<'a> Fields<'a> {
    fn new(case: &'a Case) -> Fields<'a> {
        Fields { case, params: RefCell::default(), inputs: RefCell::default() }
    }

    fn param(&self, key: &str) {
        self.params.borrow_mut().insert(key.to_string());
    }

    fn f64(&self, key: &str) -> f64 {
        self.param(key);
        self.case.f64(key).unwrap()
    }

    fn word(&self, key: &str) -> &'a str {
        self.param(key);
        self.case.word(key).unwrap()
    }

    fn int(&self, key: &str) -> u64 {
        self.param(key);
        self.case.int(key).unwrap()
    }

    fn flag(&self, key: &str) -> bool {
        self.param(key);
        self.case.flag(key).unwrap()
    }

    fn f64_list(&self, key: &str) -> Vec<f64> {
        self.param(key);
        let list = self.case.params[key].as_array().unwrap_or_else(|| panic!("{}: {key} is not a list", self.case.name));
        list.iter().map(|v| f64::from_bits(u64::from_str_radix(v["f64"].as_str().unwrap(), 16).unwrap())).collect()
    }

    fn names(&self, key: &str) -> Vec<&'a str> {
        self.param(key);
        self.case.params[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect()
    }

    fn has_input(&self, key: &str) -> bool {
        self.case.inputs.contains_key(key)
    }

    fn input(&self, key: &str) -> String {
        self.inputs.borrow_mut().insert(key.to_string());
        array(self.case.input(key).unwrap())
    }

    /// Every parameter and input of the case has been read.
    fn finish(self) {
        let params: BTreeSet<String> = self.case.params.keys().cloned().collect();
        let inputs: BTreeSet<String> = self.case.inputs.keys().cloned().collect();
        assert_eq!(params, self.params.into_inner(), "case {}: parameters not carried into the text", self.case.name);
        assert_eq!(inputs, self.inputs.into_inner(), "case {}: inputs not carried into the text", self.case.name);
    }
}

fn optimizer(f: &Fields<'_>, out: &mut String) {
    let mut c = mc_online_config_default();
    c.adam.form = match f.word("form") {
        "hf" => MC_ADAM_HUGGING_FACE,
        "torch" => MC_ADAM_TORCH,
        other => panic!("form {other:?}"),
    };
    for (key, slot) in [("lr", &mut c.adam.lr), ("beta1", &mut c.adam.beta1), ("beta2", &mut c.adam.beta2), ("eps", &mut c.adam.eps), ("weight_decay", &mut c.adam.weight_decay)] {
        *slot = f.f64(key);
    }
    c.adam.schedule = match f.word("schedule") {
        "constant" => MC_SCHEDULE_CONSTANT,
        "warmup_cosine" => {
            c.adam.warmup = f.int("warmup");
            c.adam.total = f.int("total");
            MC_SCHEDULE_WARMUP_COSINE
        }
        other => panic!("schedule {other:?}"),
    };
    c.merge.method = match f.word("merge") {
        "none" => MC_MERGE_NONE,
        "dare" => MC_MERGE_DARE,
        "ties" => MC_MERGE_TIES,
        other => panic!("merge {other:?}"),
    };
    if c.merge.method != MC_MERGE_NONE {
        c.merge.variant = match f.word("variant") {
            "reference" => MC_VARIANT_REFERENCE,
            "paper" => MC_VARIANT_PAPER,
            other => panic!("variant {other:?}"),
        };
        c.merge.p = f.f64("p");
        c.merge.alpha = f.f64("alpha");
        c.merge.rescale = f.flag("rescale");
    }
    if c.merge.method == MC_MERGE_DARE {
        c.merge.clip = f.f64("clip");
    }
    if c.merge.method == MC_MERGE_TIES {
        c.merge.scope = match f.word("scope") {
            "tensor" => MC_SCOPE_PER_TENSOR,
            "global" => MC_SCOPE_GLOBAL,
            other => panic!("scope {other:?}"),
        };
    }
    c.k = u32::try_from(f.int("k")).unwrap();
    c.seed = f.case.seed.expect("an optimizer case has a seed");
    let a = &c.adam;
    let m = &c.merge;
    writeln!(
        out,
        "form {} lr {} beta1 {} beta2 {} eps {} weight_decay {} schedule {} warmup {} total {}",
        a.form,
        bits(a.lr),
        bits(a.beta1),
        bits(a.beta2),
        bits(a.eps),
        bits(a.weight_decay),
        a.schedule,
        a.warmup,
        a.total
    )
    .unwrap();
    writeln!(out, "method {} variant {} p {} alpha {} rescale {} clip {} scope {}", m.method, m.variant, bits(m.p), bits(m.alpha), flag(m.rescale), bits(m.clip), m.scope).unwrap();
    writeln!(out, "k {} seed {:016x}", c.k, c.seed).unwrap();
    // One tensor named by the case, or several listed with inputs prefixed t<j>/.
    let tensors: Vec<(&str, String)> = if f.case.params.contains_key("tensors") {
        f.names("tensors").into_iter().enumerate().map(|(j, name)| (name, format!("t{j}/"))).collect()
    } else {
        vec![(f.case.tensor_name().unwrap(), String::new())]
    };
    let steps = (1..).take_while(|s| f.has_input(&format!("{}grad.{s}", tensors[0].1))).count();
    writeln!(out, "tau_dtype {} tensors {} steps {steps}", dtype_code(f.word("tau_dtype")), tensors.len()).unwrap();
    for (name, prefix) in &tensors {
        writeln!(out, "tensor {} {}", string(name), string(prefix)).unwrap();
        for key in ["base", "sft", "theta", "m", "v"] {
            writeln!(out, "{key} {}", f.input(&format!("{prefix}{key}"))).unwrap();
        }
        for s in 1..=steps {
            writeln!(out, "grad {}", f.input(&format!("{prefix}grad.{s}"))).unwrap();
        }
    }
}

fn offline(f: &Fields<'_>, out: &mut String) {
    let name = f.case.tensor_name().unwrap();
    let tensor = format!("tensor {} {}", string(name), string(""));
    let out_dtype = dtype_code(f.word("out_dtype"));
    let models: Vec<String> = (0..).map(|i| format!("model.{i}")).take_while(|k| f.has_input(k)).collect();
    match f.word("method") {
        "linear" => {
            let weights = f.f64_list("weights");
            writeln!(out, "linear\nmodels {} normalize {} weights {} out_dtype {out_dtype}\n{tensor}", models.len(), flag(f.flag("normalize")), values(&weights)).unwrap();
            for m in &models {
                writeln!(out, "model {}", f.input(m)).unwrap();
            }
        }
        "interpolate" => {
            writeln!(out, "interpolate\nweight {} out_dtype {out_dtype}\n{tensor}", bits(f.f64("weight"))).unwrap();
            writeln!(out, "sft {}\nrlhf {}", f.input("model.0"), f.input("model.1")).unwrap();
        }
        "slerp" => {
            writeln!(out, "slerp\nt {} out_dtype {out_dtype}\n{tensor}", bits(f.f64("t"))).unwrap();
            writeln!(out, "a {}\nb {}", f.input("model.0"), f.input("model.1")).unwrap();
        }
        "gta" => {
            let config = McGtaConfig {
                sparsify: match f.word("sparsify") {
                    "none" => MC_SPARSIFY_NONE,
                    "magnitude" => MC_SPARSIFY_MAGNITUDE,
                    "random" => MC_SPARSIFY_RANDOM,
                    other => panic!("sparsify {other:?}"),
                },
                consensus: f.flag("consensus"),
                normalize: f.flag("normalize"),
                lambda: f.f64("lambda"),
            };
            let seed = f.case.seed.expect("a gta case has a seed");
            gta(f, out, &config, seed, MC_SCOPE_PER_TENSOR, out_dtype, &[(name, String::new())], &models);
        }
        other => panic!("method {other:?}"),
    }
}

/// `ties_global`: TIES with the trim over all tensors, one call for all of them.
fn ties_global(f: &Fields<'_>, out: &mut String) {
    let mut config = McGtaConfig { sparsify: u32::MAX, consensus: false, normalize: false, lambda: 0.0 };
    // SAFETY: `config` is one writable McGtaConfig; no message buffer.
    let status = unsafe { mc_gta_preset(MC_GTA_TIES, &mut config, std::ptr::null_mut(), 0) };
    assert_eq!(status, MC_OK);
    config.lambda = f.f64("lambda");
    let tensors: Vec<(&str, String)> = f.names("tensors").into_iter().enumerate().map(|(j, name)| (name, format!("t{j}/"))).collect();
    let models: Vec<String> = (0..).map(|i| format!("model.{i}")).take_while(|k| f.has_input(&format!("t0/{k}"))).collect();
    // The golden runner's seed when the case has none (TIES draws no mask).
    gta(f, out, &config, f.case.seed.unwrap_or(0), MC_SCOPE_GLOBAL, MC_DTYPE_F32, &tensors, &models);
}

#[allow(clippy::too_many_arguments)]
fn gta(f: &Fields<'_>, out: &mut String, c: &McGtaConfig, seed: u64, scope: u32, out_dtype: u32, tensors: &[(&str, String)], models: &[String]) {
    writeln!(out, "gta\nsparsify {} consensus {} normalize {} lambda {}", c.sparsify, flag(c.consensus), flag(c.normalize), bits(c.lambda)).unwrap();
    writeln!(out, "seed {seed:016x} scope {scope} out_dtype {out_dtype}").unwrap();
    let (weights, densities) = (f.f64_list("weights"), f.f64_list("densities"));
    writeln!(out, "models {} weights {} densities {} tensors {}", models.len(), values(&weights), values(&densities), tensors.len()).unwrap();
    for (name, prefix) in tensors {
        writeln!(out, "tensor {} {}\nbase {}", string(name), string(prefix), f.input(&format!("{prefix}base"))).unwrap();
        for m in models {
            writeln!(out, "model {}", f.input(&format!("{prefix}{m}"))).unwrap();
        }
    }
}

fn expectation(expected: &Value, out: &mut String) {
    if let Some(e) = expected.get("error") {
        let message = e["message"].as_str().unwrap();
        writeln!(out, "expect error {} {}", error_code(e["kind"].as_str().unwrap()), string(message)).unwrap();
        return;
    }
    let outputs = expected["outputs"].as_object().expect("expected outputs or an error");
    writeln!(out, "expect outputs {}", outputs.len()).unwrap();
    for (label, a) in outputs {
        writeln!(out, "out {} {}", string(label), array(&Array::from_json(a, label).unwrap())).unwrap();
    }
}

/// The text of one golden JSON file.
fn text(source: &str, json: &str) -> String {
    let file: Value = serde_json::from_str(json).unwrap();
    let mut out = format!("merge-core-capi-golden/1 {}\n", string(source));
    for c in file["cases"].as_array().unwrap() {
        let case = Case::from_json(c).unwrap();
        let fields = Fields::new(&case);
        writeln!(out, "case {}", string(&case.name)).unwrap();
        match case.op.as_str() {
            "optimizer" => {
                out.push_str("optimizer\n");
                optimizer(&fields, &mut out);
            }
            "offline" => offline(&fields, &mut out),
            "ties_global" => ties_global(&fields, &mut out),
            other => panic!("case {}: op {other:?} has no C ABI counterpart", case.name),
        }
        fields.finish();
        expectation(&c["expected"], &mut out);
        out.push_str("end\n");
    }
    out
}

#[test]
fn the_committed_text_matches_the_golden_json() {
    let capi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("MERGE_CORE_CAPI_UPDATE").is_some();
    let mut stale = Vec::new();
    for name in FILES {
        let source = format!("tests/golden/{name}.json");
        let json = std::fs::read_to_string(capi.join("..").join(&source)).unwrap_or_else(|e| panic!("{source}: {e}"));
        let text = text(&source, &json);
        let path = capi.join(format!("tests/golden/{name}.txt"));
        if update {
            std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(stale.is_empty(), "{} differ from tests/golden: run `MERGE_CORE_CAPI_UPDATE=1 cargo test -p merge-core-capi` and commit them", stale.join(", "));
}
