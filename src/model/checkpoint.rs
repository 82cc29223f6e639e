//! Checkpoint files: reading tensors by name from `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and writing them back.
//!
//! Owns the safetensors container, dtype decoding (f32 / f16 / bf16 vectors; linear weights in
//! bf16, f16, f32, int8 with a per-row `<name>_scale`, or FP8 E4M3 with DeepSeek-V3's 128x128
//! `<name>_scale_inv`), and shape checks whose errors name the tensor. It must not know which
//! tensors a model needs (see `weights`), kernels or devices.
//!
//! Files are read into memory once (`std::fs::read`), not memory-mapped: mapping needs `unsafe`,
//! which this module does not use, and the npu's [`LinearWeight`] owns its storage anyway, so
//! every weight is decoded into device-format memory exactly once either way.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors, View};

use super::error::{ModelError, Result, io_err};
use crate::npu::format::FP8_BLOCK;
use crate::npu::{LinearWeight, WeightData};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
    header_len: usize,
    meta: Metadata,
}

/// All tensors of a checkpoint, addressable by name.
pub struct TensorStore {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

fn bad(name: &str, detail: impl Into<String>) -> ModelError {
    ModelError::BadTensor {
        name: name.to_string(),
        detail: detail.into(),
    }
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl TensorStore {
    /// Opens the checkpoint of a model directory: the shard index if present, else
    /// `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ckpt_err(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ckpt_err(&index_path, "no `weight_map` object"))?;
            let mut names: Vec<&str> = Vec::new();
            for (tensor, file) in map {
                let f = file.as_str().ok_or_else(|| {
                    ckpt_err(
                        &index_path,
                        format!("weight_map[`{tensor}`] is not a string"),
                    )
                })?;
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(ckpt_err(
                        &index_path,
                        format!("weight_map[`{tensor}`] = `{f}` is not a file name"),
                    ));
                }
                if !names.contains(&f) {
                    names.push(f);
                }
            }
            names.sort_unstable();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join(SINGLE_FILE)]
        };
        let mut shards = Vec::with_capacity(files.len());
        for path in files {
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&bytes)
                .map_err(|e| ckpt_err(&path, format!("invalid safetensors: {e}")))?;
            shards.push(Shard {
                path,
                bytes,
                header_len,
                meta,
            });
        }
        let mut index = HashMap::new();
        for (i, s) in shards.iter().enumerate() {
            for name in s.meta.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(ckpt_err(
                        &s.path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
        }
        Ok(Self { shards, index })
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint has no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Dtype, shape and raw little-endian bytes of a tensor.
    fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let s = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let info = s.meta.info(name).ok_or_else(missing)?;
        let (a, b) = info.data_offsets;
        let base = 8 + s.header_len;
        // `read_metadata` validated the offsets against the buffer length.
        let data = s
            .bytes
            .get(base + a..base + b)
            .ok_or_else(|| ckpt_err(&s.path, format!("tensor `{name}` offsets out of range")))?;
        Ok((info.dtype, &info.shape, data))
    }

    fn check_shape(name: &str, shape: &[usize], expected: &[usize]) -> Result<()> {
        // A per-row scale may be stored as [out] or [out, 1].
        let squeeze =
            |s: &[usize]| -> Vec<usize> { s.iter().copied().filter(|&d| d != 1).collect() };
        if shape == expected || squeeze(shape) == squeeze(expected) {
            Ok(())
        } else {
            Err(bad(name, format!("shape {shape:?}, expected {expected:?}")))
        }
    }

    /// A float tensor (f32, f16 or bf16) of exactly `shape`, as f32.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (dtype, s, data) = self.raw(name)?;
        Self::check_shape(name, s, shape)?;
        decode_float(name, dtype, data)
    }

    /// A linear weight `[out, in]` in its stored format (int8 and FP8 with their scales).
    pub fn linear(&self, name: &str, out: usize, inp: usize) -> Result<LinearWeight> {
        let (dtype, s, data) = self.raw(name)?;
        Self::check_shape(name, s, &[out, inp])?;
        let wd = match dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => match dtype {
                Dtype::F16 => WeightData::F16(
                    data.chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                Dtype::BF16 => WeightData::Bf16(
                    data.chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                _ => WeightData::F32(decode_float(name, dtype, data)?),
            },
            Dtype::I8 => {
                let scale_name = format!("{name}_scale");
                let scales = self.f32_tensor(&scale_name, &[out])?;
                WeightData::Int8 {
                    q: data.iter().map(|&b| b as i8).collect(),
                    scales,
                }
            }
            Dtype::F8_E4M3 => {
                let scale_name = format!("{name}_scale_inv");
                let shape = [out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)];
                let scale_inv = self.f32_tensor(&scale_name, &shape)?;
                WeightData::Fp8E4m3 {
                    q: data.to_vec(),
                    scale_inv,
                }
            }
            other => {
                return Err(bad(
                    name,
                    format!("dtype {other:?} is not a supported weight format"),
                ));
            }
        };
        LinearWeight::new(out, inp, wd).map_err(|e| bad(name, e.to_string()))
    }
}

fn decode_float(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(
                name,
                format!("dtype {other:?}, expected a float (F32, F16 or BF16)"),
            ));
        }
    })
}

/// One tensor ready to be written.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Float storage dtype for vectors and unquantised weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    Bf16,
}

impl OwnedTensor {
    /// A float tensor stored as `dtype`.
    pub fn float(values: &[f32], shape: Vec<usize>, dtype: FloatDtype) -> Self {
        let (dtype, data) = match dtype {
            FloatDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            FloatDtype::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            FloatDtype::Bf16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        Self { dtype, shape, data }
    }
}

/// Adds a linear weight (and its scale tensor, for int8 / FP8) under `name`.
pub fn push_linear(out: &mut BTreeMap<String, OwnedTensor>, name: &str, w: &LinearWeight) {
    let shape = vec![w.out_features(), w.in_features()];
    let main = match w.data() {
        WeightData::F32(v) => OwnedTensor::float(v, shape, FloatDtype::F32),
        WeightData::F16(v) => OwnedTensor {
            dtype: Dtype::F16,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        WeightData::Bf16(v) => OwnedTensor {
            dtype: Dtype::BF16,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        WeightData::Int8 { q, scales } => {
            out.insert(
                format!("{name}_scale"),
                OwnedTensor::float(scales, vec![w.out_features()], FloatDtype::F32),
            );
            OwnedTensor {
                dtype: Dtype::I8,
                shape,
                data: q.iter().map(|&v| v as u8).collect(),
            }
        }
        WeightData::Fp8E4m3 { q, scale_inv } => {
            out.insert(
                format!("{name}_scale_inv"),
                OwnedTensor::float(
                    scale_inv,
                    vec![
                        w.out_features().div_ceil(FP8_BLOCK),
                        w.in_features().div_ceil(FP8_BLOCK),
                    ],
                    FloatDtype::F32,
                ),
            );
            OwnedTensor {
                dtype: Dtype::F8_E4M3,
                shape,
                data: q.clone(),
            }
        }
    };
    out.insert(name.to_string(), main);
}

/// Writes tensors to one safetensors file.
pub fn write_file(path: &Path, tensors: &BTreeMap<String, OwnedTensor>) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(tensors.iter(), Some(meta), path)
        .map_err(|e| ckpt_err(path, format!("cannot write: {e}")))
}

/// Writes tensors as `shards` files plus `model.safetensors.index.json` (tensors are split in
/// name order); with `shards <= 1` writes `model.safetensors`.
pub fn write_dir(dir: &Path, tensors: &BTreeMap<String, OwnedTensor>, shards: usize) -> Result<()> {
    if shards <= 1 {
        return write_file(&dir.join(SINGLE_FILE), tensors);
    }
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards).max(1);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let part: BTreeMap<String, OwnedTensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        write_file(&dir.join(&file), &part)?;
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, index.to_string()).map_err(|e| io_err(&path, e))
}
