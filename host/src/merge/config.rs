//! mergekit's YAML merge configuration, read with every refusal naming its line.
//!
//! The subset this command runs: `merge_method` (`linear`, `task_arithmetic`,
//! `ties`, `dare_linear`, `dare_ties`, `slerp`), `models` with per-model
//! `parameters`, `base_model`, global `parameters`, `dtype`, `out_dtype` and
//! `tokenizer_source` (`base`, or a listed model). Parameter values are what
//! mergekit accepts: a scalar, a gradient (a list of numbers interpolated over the
//! layers), or a list of `{filter, value}` conditions matched against the tensor
//! name. Anything else mergekit knows (`slices`, `modules`, `tokenizer`,
//! `chat_template`, other methods, LoRA references) is refused by name rather than
//! ignored, and so is a parameter the method does not read.

use std::path::{Path, PathBuf};

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, Node};
use merge_core::dtype::Dtype;

use super::MergeError;
use crate::hf::parse_dtype;

/// The merge methods of mergekit that merge-core defines (SPEC.md §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Slerp,
}

impl Method {
    fn parse(name: &str) -> Option<Method> {
        Some(match name {
            "linear" => Method::Linear,
            "task_arithmetic" => Method::TaskArithmetic,
            "ties" => Method::Ties,
            "dare_linear" => Method::DareLinear,
            "dare_ties" => Method::DareTies,
            "slerp" => Method::Slerp,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Slerp => "slerp",
        }
    }

    /// Whether the method works on task vectors `model − base` (needs `base_model`).
    pub fn uses_task_vectors(self) -> bool {
        matches!(self, Method::TaskArithmetic | Method::Ties | Method::DareLinear | Method::DareTies)
    }

    /// Parameters read once per tensor for the whole merge (mergekit's `parameters()`).
    fn global_parameters(self) -> &'static [&'static str] {
        match self {
            Method::Linear => &["normalize"],
            Method::Slerp => &["t"],
            _ => &["normalize", "lambda", "rescale", "int8_mask"],
        }
    }

    /// Parameters read per model and tensor (mergekit's `tensor_parameters()`).
    fn model_parameters(self) -> &'static [&'static str] {
        match self {
            Method::Linear => &["weight"],
            Method::Slerp => &[],
            _ => &["weight", "density"],
        }
    }
}

/// Methods mergekit has that merge-core does not define, with the reason.
fn unsupported_method(name: &str) -> Option<&'static str> {
    Some(match name {
        "passthrough" => "it copies layer slices, which this command does not take (no `slices`)",
        "breadcrumbs" | "breadcrumbs_ties" => "merge-core has no magnitude-outlier sparsification",
        "della" | "della_linear" => "merge-core has no DELLA magnitude-proportional dropping",
        "model_stock" | "nuslerp" | "multislerp" | "karcher" | "sce" | "nearswap" | "arcee_fusion" | "ram" => {
            "merge-core does not define it"
        }
        _ => return None,
    })
}

/// A parameter's value once evaluated for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
}

/// What a parameter is set to: mergekit's `ParameterSetting`.
#[derive(Clone, Debug, PartialEq)]
enum Setting {
    Scalar(Value),
    /// Interpolated linearly over the layers (`t` = layer / (layers − 1)).
    Gradient(Vec<f64>),
    /// The first condition whose filter is absent, `*`, or a substring of the
    /// tensor name decides; none matching leaves the parameter unset at this level.
    Conditions(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// mergekit's `evaluate_setting`.
    fn evaluate(&self, tensor: &str, t: f64) -> Option<Value> {
        match self {
            Setting::Scalar(v) => Some(*v),
            Setting::Gradient(g) => {
                let scaled = t * (g.len() - 1) as f64;
                let i0 = scaled as usize;
                let i1 = (i0 + 1).min(g.len() - 1);
                let frac = scaled - i0 as f64;
                Some(Value::Number((1.0 - frac) * g[i0] + frac * g[i1]))
            }
            Setting::Conditions(conds) => conds
                .iter()
                .find(|(filter, _)| match filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => tensor.contains(f),
                })
                .and_then(|(_, s)| s.evaluate(tensor, t)),
        }
    }
}

/// The parameters set at one level (a model's, or the global ones), in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parameters(Vec<(String, Setting, usize)>);

impl Parameters {
    fn get(&self, name: &str) -> Option<&Setting> {
        self.0.iter().find(|(n, _, _)| n == name).map(|(_, s, _)| s)
    }
}

/// One entry of `models`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    pub path: PathBuf,
    pub parameters: Parameters,
    /// The YAML line of the entry, for errors.
    pub line: usize,
}

/// Which model folder's config and tokenizer files the output gets.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSource {
    /// The base model (mergekit's `base`; also the default when there is a base).
    Base,
    /// A model listed in `models`, by its index there.
    Model(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    /// The YAML file, for errors.
    pub file: PathBuf,
    pub method: Method,
    pub base_model: Option<PathBuf>,
    pub models: Vec<ModelEntry>,
    pub parameters: Parameters,
    /// mergekit computes in `dtype`; here it only sets the output dtype when
    /// `out_dtype` is absent (the arithmetic is always binary32, SPEC.md §6).
    pub dtype: Option<Dtype>,
    pub out_dtype: Option<Dtype>,
    pub tokenizer_source: TokenizerSource,
}

impl MergeConfig {
    pub fn read(file: &Path) -> Result<MergeConfig, MergeError> {
        let text = std::fs::read_to_string(file).map_err(|e| MergeError::io("reading", file, e))?;
        MergeConfig::parse(file, &text)
    }

    /// Parses YAML text; `file` labels errors and anchors relative model paths
    /// (they are taken relative to the working directory, as mergekit does).
    pub fn parse(file: &Path, text: &str) -> Result<MergeConfig, MergeError> {
        let root = marked_yaml::parse_yaml(0, text).map_err(|e| MergeError::Config {
            file: file.to_path_buf(),
            line: load_error_line(&e),
            reason: format!("not valid YAML: {e}"),
        })?;
        let at = |node_line: usize, reason: String| MergeError::Config { file: file.to_path_buf(), line: node_line, reason };
        let map = root.as_mapping().ok_or_else(|| at(1, "the top level must be a mapping".into()))?;

        for (key, _) in map.iter() {
            let known = [
                "merge_method",
                "base_model",
                "models",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
            ];
            if known.contains(&key.as_str()) {
                continue;
            }
            let reason = match key.as_str() {
                "slices" | "modules" => format!("`{}` (layer slicing) is not supported: list whole models under `models`", key.as_str()),
                "tokenizer" => "`tokenizer` (vocabulary merging) is not supported: use `tokenizer_source: base` or a listed model".into(),
                "chat_template" => "`chat_template` is not supported: the output gets the tokenizer source's template files".into(),
                _ => format!("unknown key `{}`", key.as_str()),
            };
            return Err(at(line_of(key), reason));
        }

        let method_node = map
            .get_scalar("merge_method")
            .ok_or_else(|| at(1, "`merge_method` is missing (a string, e.g. `ties`)".into()))?;
        let method = match Method::parse(method_node.as_str()) {
            Some(m) => m,
            None => {
                let name = method_node.as_str();
                let reason = match unsupported_method(name) {
                    Some(why) => format!("merge_method `{name}` is not supported: {why}"),
                    None => format!(
                        "unknown merge_method `{name}` (supported: linear, task_arithmetic, ties, dare_linear, dare_ties, slerp)"
                    ),
                };
                return Err(at(line_of(method_node), reason));
            }
        };

        let base_model = match map.get_node("base_model") {
            None => None,
            Some(n) => Some(model_path(file, n)?),
        };

        let models_node = map
            .get_node("models")
            .ok_or_else(|| at(1, "`models` is missing (a list of `- model: PATH`)".into()))?;
        let seq = models_node
            .as_sequence()
            .ok_or_else(|| at(node_line(models_node), "`models` must be a list of `- model: PATH`".into()))?;
        if seq.is_empty() {
            return Err(at(node_line(models_node), "`models` is empty".into()));
        }
        let mut models = Vec::new();
        for entry in seq.iter() {
            let line = node_line(entry);
            let m = entry
                .as_mapping()
                .ok_or_else(|| at(line, "each entry of `models` must be a mapping with `model:`".into()))?;
            for (key, _) in m.iter() {
                if !["model", "parameters"].contains(&key.as_str()) {
                    return Err(at(line_of(key), format!("unknown key `{}` in a `models` entry (allowed: model, parameters)", key.as_str())));
                }
            }
            let path = model_path(file, m.get_node("model").ok_or_else(|| at(line, "a `models` entry has no `model:`".into()))?)?;
            let parameters = match m.get_node("parameters") {
                None => Parameters::default(),
                Some(p) => parse_parameters(file, p, method, Level::Model)?,
            };
            models.push(ModelEntry { path, parameters, line });
        }

        let parameters = match map.get_node("parameters") {
            None => Parameters::default(),
            Some(p) => parse_parameters(file, p, method, Level::Global)?,
        };

        let dtype_of = |key: &str| -> Result<Option<Dtype>, MergeError> {
            match map.get_node(key) {
                None => Ok(None),
                Some(n) => {
                    let s = n.as_scalar().map(|s| s.as_str()).unwrap_or("");
                    parse_dtype(s).map(Some).ok_or_else(|| {
                        at(node_line(n), format!("`{key}` must be float32, bfloat16 or float16 (got `{s}`)"))
                    })
                }
            }
        };
        let dtype = dtype_of("dtype")?;
        let out_dtype = dtype_of("out_dtype")?;

        let tokenizer_source = match map.get_node("tokenizer_source") {
            None if base_model.is_some() => TokenizerSource::Base,
            None => TokenizerSource::Model(0),
            Some(n) => {
                let s = n.as_scalar().map(|s| s.as_str()).unwrap_or("");
                match s {
                    "base" if base_model.is_some() => TokenizerSource::Base,
                    "base" => return Err(at(node_line(n), "`tokenizer_source: base` needs a `base_model`".into())),
                    "union" => {
                        return Err(at(node_line(n), "`tokenizer_source: union` (vocabulary merging) is not supported".into()));
                    }
                    other => {
                        let p = model_path(file, n)?;
                        if base_model.as_deref() == Some(p.as_path()) {
                            TokenizerSource::Base
                        } else {
                            let i = models.iter().position(|m| m.path == p).ok_or_else(|| {
                                at(node_line(n), format!("`tokenizer_source: {other}` is neither `base` nor a model listed in `models`"))
                            })?;
                            TokenizerSource::Model(i)
                        }
                    }
                }
            }
        };

        let config = MergeConfig { file: file.to_path_buf(), method, base_model, models, parameters, dtype, out_dtype, tokenizer_source };
        config.check_shape(map)?;
        Ok(config)
    }

    /// The method's requirements on the model list.
    fn check_shape(&self, map: &MarkedMappingNode) -> Result<(), MergeError> {
        let line = map.get_node("models").map_or(1, node_line);
        let err = |reason: String| MergeError::Config { file: self.file.clone(), line, reason };
        match self.method {
            Method::Linear => {
                if let Some(b) = &self.base_model
                    && !self.models.iter().any(|m| &m.path == b)
                {
                    return Err(err(format!(
                        "linear merges only the listed models; `base_model` {} is not among them (list it with a weight, or drop `base_model`)",
                        b.display()
                    )));
                }
            }
            Method::Slerp => {
                let base = self.base_model.as_ref().ok_or_else(|| err("slerp needs `base_model` (the t = 0 end)".into()))?;
                let others = self.models.iter().filter(|m| &m.path != base).count();
                if others != 1 {
                    return Err(err(format!(
                        "slerp merges exactly two models, the base and one other; `models` lists {others} besides the base"
                    )));
                }
            }
            m => {
                let base = self.base_model.as_ref().ok_or_else(|| err(format!("{} needs `base_model` (task vectors are model − base)", m.name())))?;
                let tasks = self.models.iter().filter(|e| &e.path != base).count();
                if tasks == 0 {
                    return Err(err("`models` lists only the base model: there is no task vector to merge".into()));
                }
                if tasks > merge_core::offline::MAX_MODELS {
                    return Err(err(format!("{tasks} task models; merge-core merges at most {}", merge_core::offline::MAX_MODELS)));
                }
            }
        }
        let mut seen: Vec<&Path> = Vec::new();
        for m in &self.models {
            if seen.contains(&m.path.as_path()) {
                return Err(MergeError::Config {
                    file: self.file.clone(),
                    line: m.line,
                    reason: format!("model {} is listed twice", m.path.display()),
                });
            }
            seen.push(&m.path);
        }
        Ok(())
    }

    /// A parameter for one tensor: the model's own setting first, then the global
    /// one, as mergekit resolves it; `t` places the tensor among the layers.
    pub fn parameter(&self, name: &str, model: Option<usize>, tensor: &str, t: f64) -> Option<Value> {
        model
            .and_then(|i| self.models[i].parameters.get(name))
            .and_then(|s| s.evaluate(tensor, t))
            .or_else(|| self.parameters.get(name).and_then(|s| s.evaluate(tensor, t)))
    }
}

fn line_of(s: &MarkedScalarNode) -> usize {
    s.span().start().map_or(0, |m| m.line())
}

fn node_line(n: &Node) -> usize {
    n.span().start().map_or(0, |m| m.line())
}

fn load_error_line(e: &marked_yaml::LoadError) -> usize {
    use marked_yaml::LoadError as L;
    let m = match e {
        L::TopLevelMustBeMapping(m)
        | L::TopLevelMustBeSequence(m)
        | L::UnexpectedAnchor(m)
        | L::MappingKeyMustBeScalar(m)
        | L::UnexpectedTag(m)
        | L::ScanError(m, _) => Some(m),
        L::DuplicateKey(_) => None,
    };
    m.map_or(0, |m| m.line())
}

/// A model reference: a folder path. mergekit's `model+lora` and hub names are
/// refused by the folder check later (`+` may be part of a real path).
fn model_path(file: &Path, n: &Node) -> Result<PathBuf, MergeError> {
    let err = |reason: &str| MergeError::Config { file: file.to_path_buf(), line: node_line(n), reason: reason.to_string() };
    match n {
        Node::Scalar(s) if !s.as_str().is_empty() => Ok(PathBuf::from(s.as_str())),
        Node::Mapping(_) => Err(err("a model given as a mapping (mergekit's LoRA or override form) is not supported: give a folder path")),
        _ => Err(err("a model must be a folder path")),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Global,
    Model,
}

fn parse_parameters(file: &Path, node: &Node, method: Method, level: Level) -> Result<Parameters, MergeError> {
    let at = |line: usize, reason: String| MergeError::Config { file: file.to_path_buf(), line, reason };
    let map = node.as_mapping().ok_or_else(|| at(node_line(node), "`parameters` must be a mapping".into()))?;
    let mut out = Vec::new();
    for (key, value) in map.iter() {
        let name = key.as_str();
        let global = method.global_parameters().contains(&name);
        let per_model = method.model_parameters().contains(&name);
        let allowed = match level {
            // mergekit reads a per-model parameter from the global level too.
            Level::Global => global || per_model,
            Level::Model => per_model,
        };
        if !allowed {
            let reason = if level == Level::Model && global {
                format!("`{name}` is a parameter of the whole {} merge: set it under the top-level `parameters`", method.name())
            } else {
                let mut names: Vec<&str> = method.model_parameters().to_vec();
                if level == Level::Global {
                    names.extend(method.global_parameters());
                }
                format!("{} has no parameter `{name}` here (it reads: {})", method.name(), names.join(", "))
            };
            return Err(at(line_of(key), reason));
        }
        out.push((name.to_string(), parse_setting(file, value)?, line_of(key)));
    }
    Ok(Parameters(out))
}

fn parse_scalar(s: &MarkedScalarNode) -> Option<Value> {
    if let Some(b) = s.as_bool() {
        return Some(Value::Bool(b));
    }
    s.as_f64().filter(|v| v.is_finite()).map(Value::Number)
}

fn parse_setting(file: &Path, node: &Node) -> Result<Setting, MergeError> {
    let at = |line: usize, reason: String| MergeError::Config { file: file.to_path_buf(), line, reason };
    match node {
        Node::Scalar(s) => parse_scalar(s)
            .map(Setting::Scalar)
            .ok_or_else(|| at(line_of(s), format!("`{}` is not a finite number or a boolean", s.as_str()))),
        Node::Sequence(seq) if seq.is_empty() => Err(at(node_line(node), "an empty list is not a parameter value".into())),
        Node::Sequence(seq) if seq.iter().all(|n| n.as_scalar().is_some()) => {
            let mut g = Vec::new();
            for n in seq.iter() {
                let s = n.as_scalar().expect("checked above");
                match parse_scalar(s) {
                    Some(Value::Number(v)) => g.push(v),
                    _ => return Err(at(line_of(s), format!("a gradient holds numbers only; `{}` is not one", s.as_str()))),
                }
            }
            Ok(Setting::Gradient(g))
        }
        Node::Sequence(seq) => {
            let mut conds = Vec::new();
            for n in seq.iter() {
                let m = n.as_mapping().ok_or_else(|| {
                    at(node_line(n), "a list of conditions holds only `{filter: NAME, value: V}` mappings".into())
                })?;
                for (key, _) in m.iter() {
                    if !["filter", "value"].contains(&key.as_str()) {
                        return Err(at(line_of(key), format!("unknown key `{}` in a condition (allowed: filter, value)", key.as_str())));
                    }
                }
                let filter = match m.get_node("filter") {
                    None => None,
                    Some(Node::Scalar(s)) => Some(s.as_str().to_string()),
                    Some(other) => return Err(at(node_line(other), "`filter` must be a string".into())),
                };
                let value = m.get_node("value").ok_or_else(|| at(node_line(n), "a condition has no `value`".into()))?;
                let setting = parse_setting(file, value)?;
                if matches!(setting, Setting::Conditions(_)) {
                    return Err(at(node_line(value), "a condition's value is a scalar or a gradient, not more conditions".into()));
                }
                conds.push((filter, setting));
            }
            Ok(Setting::Conditions(conds))
        }
        Node::Mapping(_) => Err(at(
            node_line(node),
            "a parameter is a number, a boolean, a list of numbers (gradient) or a list of {filter, value}".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> MergeConfig {
        MergeConfig::parse(Path::new("t.yml"), text).unwrap()
    }

    #[test]
    fn precedence_is_model_then_global_and_unmatched_conditions_fall_through() {
        let c = parse(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      density:\n        - filter: mlp\n          value: 0.3\n      weight: 2\n\
             parameters:\n  density: 0.9\n  weight: [1, 3]\n",
        );
        assert_eq!(c.parameter("density", Some(0), "model.layers.0.mlp.up_proj.weight", 0.0), Some(Value::Number(0.3)));
        // No condition matches: the global setting applies.
        assert_eq!(c.parameter("density", Some(0), "model.layers.0.self_attn.q_proj.weight", 0.0), Some(Value::Number(0.9)));
        assert_eq!(c.parameter("weight", Some(0), "x", 0.5), Some(Value::Number(2.0)));
        assert_eq!(c.parameter("weight", None, "x", 0.25), Some(Value::Number(1.5)));
        assert_eq!(c.parameter("lambda", Some(0), "x", 0.0), None);
    }

    #[test]
    fn gradients_interpolate_over_layers_as_mergekit_does() {
        let s = Setting::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        let at = |t| match s.evaluate("x", t) {
            Some(Value::Number(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(1.0), 1.0);
        assert!((at(0.5) - 0.3).abs() < 1e-15);
        assert!((at(0.375) - 0.4).abs() < 1e-12, "halfway between entries 1 and 2: {}", at(0.375));
        assert_eq!(crate::merge::layer_t("model.layers.2.mlp.up_proj.weight", 5), 0.5);
        assert_eq!(crate::merge::layer_t("model.norm.weight", 5), 0.0);
        assert_eq!(crate::merge::layer_t("model.layers.0.mlp.up_proj.weight", 1), 0.0);
    }

    #[test]
    fn refusals_name_the_line() {
        let e = MergeConfig::parse(Path::new("t.yml"), "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    lora: x\n").unwrap_err();
        assert_eq!(e.to_string(), "t.yml:5: unknown key `lora` in a `models` entry (allowed: model, parameters)");
        let e = MergeConfig::parse(Path::new("t.yml"), "merge_method: ties\nmodels:\n  - model: a\n").unwrap_err();
        assert!(e.to_string().contains("ties needs `base_model`"), "{e}");
        let e = MergeConfig::parse(Path::new("t.yml"), "merge_method: slerp\nbase_model: b\nmodels:\n  - model: a\n  - model: c\n").unwrap_err();
        assert!(e.to_string().contains("slerp merges exactly two models"), "{e}");
        let e = MergeConfig::parse(Path::new("t.yml"), "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\ndtype: int8\n").unwrap_err();
        assert_eq!(e.to_string(), "t.yml:5: `dtype` must be float32, bfloat16 or float16 (got `int8`)");
        let e = MergeConfig::parse(Path::new("t.yml"), "merge_method: [ties\n").unwrap_err();
        assert!(e.to_string().starts_with("t.yml:"), "{e}");
    }
}
