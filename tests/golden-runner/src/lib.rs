//! The golden-vector format of `tests/golden/*.json` and its evaluation by merge-core.
//!
//! One evaluator serves three users, so that they cannot drift apart: the
//! `make-golden` generator (which fills in `expected` from merge-core), the native
//! test and the wasm32 build (which recompute every case and compare bits). The
//! NumPy oracle reads the same files with its own code.
//!
//! File: `{"format": FORMAT, "about": "...", "cases": [case, ...]}`. A case:
//! ```text
//! { "name": "...", "op": "...", "tensor": "...", "seed": "<16 hex>", "step": 3,
//!   "params": { "<name>": {"f32": "<8 hex>"} | "<word>" | <integer> },
//!   "inputs": { "<name>": array },
//!   "expected": {"outputs": {"<name>": array}} | {"error": {...}} }
//! ```
//! Arrays are `{"dtype": "f32"|"u32", "hex": "3f800000 00000000 ..."}`,
//! `{"dtype": "bf16"|"f16", "hex": "3f80 8000 ..."}` or `{"dtype": "bool", "bits": "0110"}`:
//! bit patterns, never decimal, so every value (subnormals, -0.0, NaN payloads)
//! survives the round trip.
//!
//! `no_std` with `alloc`, so that the same evaluator also runs on a Cortex-M
//! (`tests/cortex-m`); the default `std` feature only forwards to merge-core.

// merge-core's `Error` names its tensor inline.
#![allow(clippy::result_large_err)]

#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write as _;

use serde_json::{Map, Value, json};

mod ops;

pub use ops::evaluate;

/// The `format` tag every golden file carries.
pub const FORMAT: &str = "online-merging-golden/1";

/// A typed array of bit patterns.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
    U32(Vec<u32>),
    Bool(Vec<bool>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::F32(v) => v.len(),
            Array::Bf16(v) | Array::F16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype(&self) -> &'static str {
        match self {
            Array::F32(_) => "f32",
            Array::Bf16(_) => "bf16",
            Array::F16(_) => "f16",
            Array::U32(_) => "u32",
            Array::Bool(_) => "bool",
        }
    }

    /// The element `i` as the string the file stores.
    fn element(&self, i: usize) -> String {
        match self {
            Array::F32(v) => format!("{:08x}", v[i].to_bits()),
            Array::Bf16(v) | Array::F16(v) => format!("{:04x}", v[i]),
            Array::U32(v) => format!("{:08x}", v[i]),
            Array::Bool(v) => if v[i] { "1" } else { "0" }.to_string(),
        }
    }

    pub fn to_json(&self) -> Value {
        if let Array::Bool(v) = self {
            let bits: String = v.iter().map(|&b| if b { '1' } else { '0' }).collect();
            return json!({"dtype": "bool", "bits": bits});
        }
        let hex: Vec<String> = (0..self.len()).map(|i| self.element(i)).collect();
        json!({"dtype": self.dtype(), "hex": hex.join(" ")})
    }

    pub fn from_json(v: &Value, what: &str) -> Result<Array, String> {
        let dtype = v.get("dtype").and_then(Value::as_str).ok_or_else(|| format!("{what}: missing \"dtype\""))?;
        if dtype == "bool" {
            let bits = v.get("bits").and_then(Value::as_str).ok_or_else(|| format!("{what}: missing \"bits\""))?;
            return bits
                .chars()
                .enumerate()
                .map(|(i, c)| match c {
                    '0' => Ok(false),
                    '1' => Ok(true),
                    _ => Err(format!("{what}: bit {i} is {c:?}, expected '0' or '1'")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Array::Bool);
        }
        let hex = v.get("hex").and_then(Value::as_str).ok_or_else(|| format!("{what}: missing \"hex\" string"))?;
        let width = match dtype {
            "f32" | "u32" => 8,
            "bf16" | "f16" => 4,
            other => return Err(format!("{what}: unknown dtype {other:?}")),
        };
        let mut words = Vec::new();
        for (i, s) in hex.split_ascii_whitespace().enumerate() {
            if s.len() != width {
                return Err(format!("{what}[{i}] = {s:?}: expected {width} hex digits for {dtype}"));
            }
            let w = u32::from_str_radix(s, 16).map_err(|e| format!("{what}[{i}] = {s:?}: {e}"))?;
            words.push(w);
        }
        Ok(match dtype {
            "f32" => Array::F32(words.into_iter().map(f32::from_bits).collect()),
            "u32" => Array::U32(words),
            "bf16" => Array::Bf16(words.into_iter().map(|w| w as u16).collect()),
            _ => Array::F16(words.into_iter().map(|w| w as u16).collect()),
        })
    }
}

/// One golden case without its expected result.
#[derive(Clone, Debug, Default)]
pub struct Case {
    pub name: String,
    pub op: String,
    pub tensor: Option<String>,
    pub seed: Option<u64>,
    pub step: Option<u64>,
    pub params: Map<String, Value>,
    pub inputs: BTreeMap<String, Array>,
}

/// What evaluating a case gives: named output arrays, or the error merge-core reported.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Outputs(BTreeMap<String, Array>),
    Error(merge_core::Error),
}

/// Hyperparameter helpers for case builders: floats are stored as bits.
pub fn f32_param(x: f32) -> Value {
    json!({"f32": format!("{:08x}", x.to_bits())})
}

pub fn f64_param(x: f64) -> Value {
    json!({"f64": format!("{:016x}", x.to_bits())})
}

impl Case {
    pub fn new(name: &str, op: &str) -> Case {
        Case { name: name.to_string(), op: op.to_string(), ..Case::default() }
    }

    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("op".into(), self.op.clone().into());
        if let Some(t) = &self.tensor {
            m.insert("tensor".into(), t.clone().into());
        }
        if let Some(s) = self.seed {
            m.insert("seed".into(), format!("{s:016x}").into());
        }
        if let Some(s) = self.step {
            m.insert("step".into(), s.into());
        }
        m.insert("params".into(), Value::Object(self.params.clone()));
        let inputs: Map<String, Value> = self.inputs.iter().map(|(k, a)| (k.clone(), a.to_json())).collect();
        m.insert("inputs".into(), Value::Object(inputs));
        m
    }

    pub fn from_json(v: &Value) -> Result<Case, String> {
        let name = v.get("name").and_then(Value::as_str).ok_or("case without \"name\"")?.to_string();
        let ctx = |field: &str| format!("case {name:?}: {field}");
        let op = v.get("op").and_then(Value::as_str).ok_or_else(|| ctx("missing \"op\""))?.to_string();
        let tensor = match v.get("tensor") {
            None => None,
            Some(t) => Some(t.as_str().ok_or_else(|| ctx("\"tensor\" is not a string"))?.to_string()),
        };
        let seed = match v.get("seed") {
            None => None,
            Some(s) => {
                let s = s.as_str().ok_or_else(|| ctx("\"seed\" is not a hex string"))?;
                Some(u64::from_str_radix(s, 16).map_err(|e| ctx(&format!("seed {s:?}: {e}")))?)
            }
        };
        let step = match v.get("step") {
            None => None,
            Some(s) => Some(s.as_u64().ok_or_else(|| ctx("\"step\" is not a non-negative integer"))?),
        };
        let params = match v.get("params") {
            None => Map::new(),
            Some(p) => p.as_object().ok_or_else(|| ctx("\"params\" is not an object"))?.clone(),
        };
        let mut inputs = BTreeMap::new();
        if let Some(obj) = v.get("inputs") {
            for (k, a) in obj.as_object().ok_or_else(|| ctx("\"inputs\" is not an object"))? {
                inputs.insert(k.clone(), Array::from_json(a, &ctx(&format!("input {k:?}")))?);
            }
        }
        Ok(Case { name, op, tensor, seed, step, params, inputs })
    }

    /// The f32 hyperparameter `key` (stored as bits).
    pub fn f32(&self, key: &str) -> Result<f32, String> {
        let v = self.params.get(key).ok_or_else(|| format!("case {:?}: missing param {key:?}", self.name))?;
        let hex = v.get("f32").and_then(Value::as_str).ok_or_else(|| format!("case {:?}: param {key:?} is not {{\"f32\": hex}}", self.name))?;
        u32::from_str_radix(hex, 16).map(f32::from_bits).map_err(|e| format!("case {:?}: param {key:?} = {hex:?}: {e}", self.name))
    }

    /// The f64 hyperparameter `key` (stored as bits).
    pub fn f64(&self, key: &str) -> Result<f64, String> {
        let v = self.params.get(key).ok_or_else(|| format!("case {:?}: missing param {key:?}", self.name))?;
        let hex = v.get("f64").and_then(Value::as_str).ok_or_else(|| format!("case {:?}: param {key:?} is not {{\"f64\": hex}}", self.name))?;
        u64::from_str_radix(hex, 16).map(f64::from_bits).map_err(|e| format!("case {:?}: param {key:?} = {hex:?}: {e}", self.name))
    }

    pub fn flag(&self, key: &str) -> Result<bool, String> {
        self.params.get(key).and_then(Value::as_bool).ok_or_else(|| format!("case {:?}: missing boolean param {key:?}", self.name))
    }

    pub fn word(&self, key: &str) -> Result<&str, String> {
        self.params.get(key).and_then(Value::as_str).ok_or_else(|| format!("case {:?}: missing string param {key:?}", self.name))
    }

    pub fn int(&self, key: &str) -> Result<u64, String> {
        self.params.get(key).and_then(Value::as_u64).ok_or_else(|| format!("case {:?}: missing integer param {key:?}", self.name))
    }

    pub fn input(&self, key: &str) -> Result<&Array, String> {
        self.inputs.get(key).ok_or_else(|| format!("case {:?}: missing input {key:?}", self.name))
    }

    pub fn f32s(&self, key: &str) -> Result<&[f32], String> {
        match self.input(key)? {
            Array::F32(v) => Ok(v),
            other => Err(format!("case {:?}: input {key:?} is {}, expected f32", self.name, other.dtype())),
        }
    }

    pub fn tensor_name(&self) -> Result<&str, String> {
        self.tensor.as_deref().ok_or_else(|| format!("case {:?}: missing \"tensor\"", self.name))
    }
}

/// merge-core's error as the file stores it: its variant name and message, and for
/// errors about one element the tensor, the input or output (`what`) and the index,
/// which the NumPy oracle reproduces field by field.
pub fn error_to_json(e: &merge_core::Error) -> Value {
    use merge_core::Error as E;
    let debug = format!("{e:?}");
    let kind: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
    let mut m = json!({"kind": kind, "message": e.to_string()});
    match e {
        E::NonFinite { tensor, what, index } | E::StorageOverflow { tensor, what, index, .. } => {
            m["tensor"] = tensor.as_str().into();
            m["what"] = (*what).into();
            m["index"] = (*index).into();
        }
        E::InvalidHyperparameter { name, .. } => m["name"] = (*name).into(),
        _ => {}
    }
    m
}

pub fn outcome_to_json(o: &Outcome) -> Value {
    match o {
        Outcome::Outputs(outs) => {
            let m: Map<String, Value> = outs.iter().map(|(k, a)| (k.clone(), a.to_json())).collect();
            json!({"outputs": m})
        }
        Outcome::Error(e) => json!({"error": error_to_json(e)}),
    }
}

/// Compares a computed outcome with the stored one (a case's `expected`); `Err`
/// describes the first difference of each output (index, expected and computed
/// bits, count).
pub fn compare(expected: &Value, got: &Outcome) -> Result<(), String> {
    let got_json = outcome_to_json(got);
    if let (Some(want), Some(have)) = (expected.get("outputs").and_then(Value::as_object), got_json.get("outputs").and_then(Value::as_object)) {
        let mut report = String::new();
        for (k, w) in want {
            let Some(h) = have.get(k) else {
                let _ = writeln!(report, "output {k:?} not produced");
                continue;
            };
            let wa = Array::from_json(w, &format!("expected output {k:?}"))?;
            let ha = Array::from_json(h, k)?;
            if wa.dtype() != ha.dtype() || wa.len() != ha.len() {
                let _ = writeln!(report, "output {k:?}: expected {} x {}, computed {} x {}", wa.len(), wa.dtype(), ha.len(), ha.dtype());
                continue;
            }
            let diffs: Vec<usize> = (0..wa.len()).filter(|&i| wa.element(i) != ha.element(i)).collect();
            if let Some(&first) = diffs.first() {
                let _ = writeln!(
                    report,
                    "output {k:?}: {} of {} elements differ; first at index {first}: expected {}, computed {}",
                    diffs.len(),
                    wa.len(),
                    wa.element(first),
                    ha.element(first)
                );
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            let _ = writeln!(report, "output {k:?} computed but not in the golden file");
        }
        return if report.is_empty() { Ok(()) } else { Err(report) };
    }
    if expected == &got_json {
        Ok(())
    } else {
        Err(format!("expected {expected}, computed {got_json}"))
    }
}

/// The result of checking one golden file.
pub struct FileReport {
    pub cases: usize,
    pub failures: Vec<String>,
}

/// Recomputes every case of a golden file's text and compares bits.
pub fn check_file(text: &str) -> Result<FileReport, String> {
    let file: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let format = file.get("format").and_then(Value::as_str);
    if format != Some(FORMAT) {
        return Err(format!("\"format\" is {format:?}, expected {FORMAT:?}"));
    }
    let cases = file.get("cases").and_then(Value::as_array).ok_or("missing \"cases\" array")?;
    let mut failures = Vec::new();
    for c in cases {
        let case = Case::from_json(c)?;
        let expected = c.get("expected").ok_or_else(|| format!("case {:?}: missing \"expected\"", case.name))?;
        let outcome = evaluate(&case)?;
        if let Err(diff) = compare(expected, &outcome) {
            failures.push(format!("case {:?} (op {}): {}", case.name, case.op, diff.trim_end()));
        }
    }
    Ok(FileReport { cases: cases.len(), failures })
}

/// A whole golden file, as the generator writes it (pretty-printed, stable key order).
pub fn file_json(about: &str, cases: &[Case]) -> Result<String, String> {
    let mut out = Vec::with_capacity(cases.len());
    for c in cases {
        let mut m = c.to_json();
        m.insert("expected".into(), outcome_to_json(&evaluate(c)?));
        out.push(Value::Object(m));
    }
    let file = json!({"format": FORMAT, "about": about, "cases": out});
    serde_json::to_string_pretty(&file).map(|s| s + "\n").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn arrays_survive_the_round_trip_bit_for_bit() {
        let arrays = [
            Array::F32(vec![-0.0, f32::from_bits(1), f32::from_bits(0x7fc0_1234), f32::NEG_INFINITY, 1.5]),
            Array::Bf16(vec![0x8000, 0x0001, 0x7f80]),
            Array::F16(vec![0xfbff, 0x0200]),
            Array::U32(vec![0, u32::MAX]),
            Array::Bool(vec![true, false, true]),
            Array::F32(vec![]),
        ];
        for a in arrays {
            let back = Array::from_json(&a.to_json(), "test").unwrap();
            let (x, y) = (a.to_json(), back.to_json());
            assert_eq!(x, y);
        }
    }

    #[test]
    fn malformed_files_are_refused_with_the_place_named() {
        let wrong_format = r#"{"format": "other/9", "cases": []}"#;
        assert!(check_file(wrong_format).err().unwrap().contains("other/9"));
        let bad_hex = r#"{"format": "online-merging-golden/1", "cases": [{"name": "c1", "op": "arith",
            "params": {"fn": "add"}, "inputs": {"a": {"dtype": "f32", "hex": "3f80"}}, "expected": {}}]}"#;
        let e = check_file(bad_hex).err().unwrap();
        assert!(e.contains("c1") && e.contains("input \"a\"") && e.contains("8 hex digits"), "{e}");
        let unknown_op = r#"{"format": "online-merging-golden/1", "cases": [{"name": "c2", "op": "nope", "expected": {}}]}"#;
        let e = check_file(unknown_op).err().unwrap();
        assert!(e.contains("c2") && e.contains("nope"), "{e}");
    }
}
