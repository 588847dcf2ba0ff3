//! safetensors read and written one tensor at a time, so a merge holds a few
//! tensors in memory, never a model.
//!
//! Reading parses only the header (8-byte length, then JSON) of each file, checks
//! every tensor's byte range against the file, and later reads one tensor's bytes
//! with a positioned read. Writing knows every output tensor's name, dtype and
//! shape before the first byte of data, so each shard's header is written first
//! and the data is appended in header order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use merge_core::dtype::{Dst, Dtype, Src};
use serde_json::Value;

use super::MergeError;
use crate::hf::{CONFIG_FILE, WEIGHTS_FILE};

/// safetensors caps its JSON header at 100 MB; so do we, before allocating it.
const MAX_HEADER_BYTES: u64 = 100_000_000;

pub use crate::hf::INDEX_FILE;

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub file: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in `file`.
    pub start: u64,
    pub len: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of one model folder (single-file or sharded), by name.
#[derive(Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub tensors: BTreeMap<String, TensorEntry>,
}

fn st_dtype(path: &Path, tensor: &str, s: &str) -> Result<Dtype, MergeError> {
    match s {
        "F32" => Ok(Dtype::F32),
        "BF16" => Ok(Dtype::Bf16),
        "F16" => Ok(Dtype::F16),
        other => Err(MergeError::Tensor {
            file: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: format!("dtype {other}: merges take F32, BF16 or F16 tensors"),
        }),
    }
}

pub fn st_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::Bf16 => "BF16",
        Dtype::F16 => "F16",
    }
}

pub fn dtype_bytes(d: Dtype) -> u64 {
    match d {
        Dtype::F32 => 4,
        Dtype::Bf16 | Dtype::F16 => 2,
    }
}

/// Reads and checks one safetensors header: every tensor's range lies inside the
/// file, matches its shape and dtype, and no two ranges overlap.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorEntry>, MergeError> {
    let bad = |reason: String| MergeError::Safetensors { file: path.to_path_buf(), reason };
    let mut f = File::open(path).map_err(|e| MergeError::io("opening", path, e))?;
    let file_len = f.metadata().map_err(|e| MergeError::io("reading", path, e))?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|_| bad(format!("{file_len} bytes: too short for the 8-byte header length")))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(bad(format!("header length {n} exceeds the file ({file_len} bytes) or the 100 MB limit")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| MergeError::io("reading", path, e))?;
    let json: Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut out = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let tbad = |reason: String| MergeError::Tensor { file: path.to_path_buf(), tensor: name.clone(), reason };
        let dtype_s = info.get("dtype").and_then(Value::as_str).ok_or_else(|| tbad("no `dtype` string".into()))?;
        let dtype = st_dtype(path, name, dtype_s)?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>())
            .ok_or_else(|| tbad("`shape` is not a list of sizes".into()))?;
        let offsets = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| tbad("`data_offsets` is not [begin, end]".into()))?;
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let want = numel.and_then(|n| n.checked_mul(dtype_bytes(dtype)));
        if offsets.0 > offsets.1 || offsets.1 > data_len || Some(offsets.1 - offsets.0) != want {
            return Err(tbad(format!(
                "data_offsets {:?} do not hold shape {shape:?} of {dtype_s} inside the {data_len} data bytes",
                offsets
            )));
        }
        ranges.push((offsets.0, offsets.1, name.clone()));
        out.insert(
            name.clone(),
            TensorEntry { file: path.to_path_buf(), dtype, shape, start: data_start + offsets.0, len: offsets.1 - offsets.0 },
        );
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2)));
        }
    }
    Ok(out)
}

impl ModelFiles {
    /// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<ModelFiles, MergeError> {
        if !dir.is_dir() {
            return Err(MergeError::Model {
                dir: dir.to_path_buf(),
                reason: "is not a folder (models are local Hugging Face folders; hub names and `model+lora` are not supported)".into(),
            });
        }
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        let tensors = if single.is_file() {
            read_header(&single)?
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| MergeError::io("reading", &index, e))?;
            let bad = |reason: String| MergeError::Safetensors { file: index.clone(), reason };
            let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut shards: BTreeMap<String, BTreeMap<String, TensorEntry>> = BTreeMap::new();
            let mut tensors = BTreeMap::new();
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| bad(format!("`weight_map` entry `{name}` is not a file name")))?;
                if shard.contains('/') || shard.contains('\\') || shard == ".." {
                    return Err(bad(format!("shard `{shard}` is not a file name inside the folder")));
                }
                if !shards.contains_key(shard) {
                    shards.insert(shard.to_string(), read_header(&dir.join(shard))?);
                }
                let entry = shards[shard].get(name).ok_or_else(|| MergeError::Tensor {
                    file: dir.join(shard),
                    tensor: name.clone(),
                    reason: format!("named in {INDEX_FILE} but not in this shard"),
                })?;
                tensors.insert(name.clone(), entry.clone());
            }
            tensors
        } else {
            return Err(MergeError::Model { dir: dir.to_path_buf(), reason: format!("has neither {WEIGHTS_FILE} nor {INDEX_FILE}") });
        };
        if tensors.is_empty() {
            return Err(MergeError::Model { dir: dir.to_path_buf(), reason: "holds no tensors".into() });
        }
        Ok(ModelFiles { dir: dir.to_path_buf(), tensors })
    }

    /// `num_hidden_layers` from config.json, which places each layer's tensors for
    /// gradient parameters.
    pub fn num_layers(&self) -> Result<usize, MergeError> {
        let path = self.dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| MergeError::io("reading", &path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| MergeError::Safetensors { file: path.clone(), reason: format!("not JSON: {e}") })?;
        json.get("num_hidden_layers")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| MergeError::Model { dir: self.dir.clone(), reason: format!("{CONFIG_FILE} has no positive `num_hidden_layers`") })
    }
}

/// Reads one tensor's little-endian bytes into `buf` (exactly `e.len` bytes).
fn read_into(e: &TensorEntry, buf: &mut [u8]) -> Result<(), MergeError> {
    let mut f = File::open(&e.file).map_err(|err| MergeError::io("opening", &e.file, err))?;
    f.seek(SeekFrom::Start(e.start)).map_err(|err| MergeError::io("reading", &e.file, err))?;
    f.read_exact(buf).map_err(|err| MergeError::io("reading", &e.file, err))
}

/// One tensor's raw little-endian bytes.
pub fn read_tensor(e: &TensorEntry) -> Result<Vec<u8>, MergeError> {
    let mut buf = vec![0u8; e.len as usize];
    read_into(e, &mut buf)?;
    Ok(buf)
}

/// A tensor's elements in their stored dtype: f32 values, or bf16/f16 bits.
pub enum Elements {
    F32(Vec<f32>),
    U16(Dtype, Vec<u16>),
}

impl Elements {
    /// Reads a tensor straight into its element buffer (no byte copy beside it).
    pub fn read(e: &TensorEntry) -> Result<Elements, MergeError> {
        let mut out = Elements::zeros(e.dtype, e.numel());
        read_into(e, out.bytes_mut())?;
        out.swap_le();
        Ok(out)
    }

    pub fn zeros(dtype: Dtype, n: usize) -> Elements {
        match dtype {
            Dtype::F32 => Elements::F32(vec![0.0; n]),
            d => Elements::U16(d, vec![0; n]),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Elements::F32(v) => bytemuck::cast_slice_mut(v),
            Elements::U16(_, v) => bytemuck::cast_slice_mut(v),
        }
    }

    /// Between the file's little-endian order and the machine's (nothing to do on
    /// little-endian machines).
    fn swap_le(&mut self) {
        if cfg!(target_endian = "big") {
            match self {
                Elements::F32(v) => v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes())),
                Elements::U16(_, v) => v.iter_mut().for_each(|x| *x = x.swap_bytes()),
            }
        }
    }

    /// The little-endian bytes to write, converting in place.
    pub fn into_le(mut self) -> Elements {
        self.swap_le();
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Elements::F32(v) => bytemuck::cast_slice(v),
            Elements::U16(_, v) => bytemuck::cast_slice(v),
        }
    }

    pub fn src(&self) -> Src<'_> {
        match self {
            Elements::F32(v) => Src::F32(v),
            Elements::U16(Dtype::Bf16, v) => Src::Bf16(v),
            Elements::U16(_, v) => Src::F16(v),
        }
    }

    /// The output split into `chunk`-element pieces, each with its first index.
    pub fn dst_chunks(&mut self, chunk: usize) -> Vec<(u64, Dst<'_>)> {
        let offsets = |i: usize| (i * chunk) as u64;
        match self {
            Elements::F32(v) => v.chunks_mut(chunk).enumerate().map(|(i, c)| (offsets(i), Dst::F32(c))).collect(),
            Elements::U16(Dtype::Bf16, v) => v.chunks_mut(chunk).enumerate().map(|(i, c)| (offsets(i), Dst::Bf16(c))).collect(),
            Elements::U16(_, v) => v.chunks_mut(chunk).enumerate().map(|(i, c)| (offsets(i), Dst::F16(c))).collect(),
        }
    }

    pub fn dst(&mut self) -> Dst<'_> {
        match self {
            Elements::F32(v) => Dst::F32(v),
            Elements::U16(Dtype::Bf16, v) => Dst::Bf16(v),
            Elements::U16(_, v) => Dst::F16(v),
        }
    }

    /// Element `i`'s stored bits, for bit-for-bit comparisons.
    pub fn bits(&self, i: usize) -> u32 {
        match self {
            Elements::F32(v) => v[i].to_bits(),
            Elements::U16(_, v) => u32::from(v[i]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::U16(_, v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One output tensor as the writer lays it out.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * dtype_bytes(self.dtype)
    }
}

/// Tensors split into shards of at most `max_shard_bytes` each
/// ([`model_folder::plan_shards`](crate::model_folder::plan_shards)'s rule).
pub fn plan_shards(tensors: &[OutTensor], max_shard_bytes: u64) -> Vec<Vec<OutTensor>> {
    let sizes: Vec<u64> = tensors.iter().map(OutTensor::bytes).collect();
    crate::model_folder::plan_shards(&sizes, max_shard_bytes)
        .into_iter()
        .map(|shard| shard.into_iter().map(|i| tensors[i].clone()).collect())
        .collect()
}

/// Writes one shard: the header up front, then each tensor's bytes in order
/// through [`ShardWriter::write`], checked against the planned size.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    pending: std::vec::IntoIter<OutTensor>,
}

impl ShardWriter {
    pub fn create(path: &Path, tensors: &[OutTensor]) -> Result<ShardWriter, MergeError> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut offset = 0u64;
        for t in tensors {
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": st_dtype_name(t.dtype),
                    "shape": t.shape,
                    "data_offsets": [offset, offset + t.bytes()],
                }),
            );
            offset += t.bytes();
        }
        let mut text = serde_json::to_string(&Value::Object(header)).expect("a JSON map serializes");
        // The data starts 8-byte aligned, as the safetensors writer pads it.
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let file = File::create(path).map_err(|e| MergeError::io("creating", path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let io = |e| MergeError::io("writing", path, e);
        out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        Ok(ShardWriter { path: path.to_path_buf(), out, pending: Vec::from(tensors).into_iter() })
    }

    /// Appends the next tensor's bytes; `name` must be the next planned tensor.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), MergeError> {
        let next = self.pending.next();
        assert!(
            next.as_ref().is_some_and(|t| t.name == name && t.bytes() == bytes.len() as u64),
            "shard writer: `{name}` ({} bytes) written out of plan order",
            bytes.len()
        );
        self.out.write_all(bytes).map_err(|e| MergeError::io("writing", &self.path, e))
    }

    /// Flushes and syncs; every planned tensor must have been written.
    pub fn finish(self) -> Result<(), MergeError> {
        assert!(self.pending.len() == 0, "shard writer: {} planned tensors not written", self.pending.len());
        let path = self.path;
        let file = self.out.into_inner().map_err(|e| MergeError::io("writing", &path, e.into_error()))?;
        file.sync_all().map_err(|e| MergeError::io("syncing", &path, e))
    }
}
