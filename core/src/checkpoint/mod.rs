//! Safetensors checkpoints: locate the files of a model folder (one `model.safetensors` or a
//! sharded set with `model.safetensors.index.json`), read tensors from memory-mapped files
//! with their shape and dtype checked, and write tensors back atomically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::device::DType;
use crate::error::{Error, Result, read_json};

/// One memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Map `path` and parse its header. A truncated file, a header that does not parse, or
    /// offsets past the end of the file give [`Error::Safetensors`] naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mmap = map(&file).map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::Safetensors { path: path.to_owned(), reason: e.to_string() })?;
        Ok(Self { path: path.to_owned(), mmap, data_start: 8 + header_len, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// The header entry of one tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The free-form string metadata of the header (`__metadata__`).
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Read one tensor onto the CPU in its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let info =
            self.info(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.to_owned() })?;
        let kind = kind_of(info.dtype).ok_or_else(|| Error::TensorDtype {
            path: self.path.clone(),
            name: name.into(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(bytes, &shape, kind)?)
    }
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to this process. A checkpoint modified by
    // another process while we read it is outside what any loader can defend against.
    unsafe { memmap2::Mmap::map(file) }
}

/// The tch kind for a stored dtype, for the dtypes models are stored in.
fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype for a tch kind.
fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// All safetensors files of a model folder, with an index from tensor name to file.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: BTreeMap<String, usize>,
}

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open the checkpoint of model folder `dir`: the sharded index when there is one, else
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, index) = if index_path.exists() {
            let shard_index: ShardIndex = read_json(&index_path)?;
            let shard_names: BTreeSet<&String> = shard_index.weight_map.values().collect();
            let mut files = Vec::new();
            let mut file_of = HashMap::new();
            for shard in shard_names {
                if shard.contains('/') || shard.contains("..") {
                    return Err(Error::config(
                        &index_path,
                        "weight_map",
                        format!("shard name `{shard}` is not a file name"),
                    ));
                }
                file_of.insert(shard.clone(), files.len());
                files.push(SafetensorsFile::open(&dir.join(shard))?);
            }
            let mut index = BTreeMap::new();
            for (name, shard) in &shard_index.weight_map {
                let i = file_of[shard];
                if files[i].info(name).is_none() {
                    return Err(Error::MissingTensor { path: files[i].path.clone(), name: name.clone() });
                }
                index.insert(name.clone(), i);
            }
            (files, index)
        } else if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let index = file.names().into_iter().map(|n| (n, 0)).collect();
            (vec![file], index)
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in the folder"),
                ),
            ));
        };
        Ok(Self { dir: dir.to_owned(), files, index })
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The file holding `name` and its header entry.
    pub fn locate(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let file = &self.files[*self.index.get(name)?];
        Some((file, file.info(name)?))
    }

    /// Path to name in errors about a tensor: its file, or the folder when it is in none.
    fn path_for(&self, name: &str) -> PathBuf {
        self.locate(name).map_or_else(|| self.dir.clone(), |(f, _)| f.path.clone())
    }

    /// Check that `name` exists with `shape` and a floating dtype, without reading it.
    pub fn check(&self, name: &str, shape: &[i64]) -> Result<&TensorInfo> {
        let (file, info) =
            self.locate(name).ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.to_owned() })?;
        let actual: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if actual != shape {
            return Err(Error::TensorShape {
                path: file.path.clone(),
                name: name.into(),
                expected: shape.to_vec(),
                actual,
            });
        }
        if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::TensorDtype {
                path: file.path.clone(),
                name: name.into(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        Ok(info)
    }

    /// Read `name`, check its shape, and convert it to `kind` on `device`.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.check(name, shape)?;
        let (file, _) =
            self.locate(name).ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.into() })?;
        let t = file.read(name)?;
        let t = t.f_to_device(device)?.f_to_kind(kind)?;
        Ok(t)
    }

    /// The stored dtype of a tensor, if it is one we run.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.locate(name).and_then(|(_, info)| kind_of(info.dtype)).and_then(DType::from_kind)
    }

    /// An error listing `names` as unexpected in this checkpoint.
    pub fn unexpected(&self, names: Vec<String>) -> Error {
        let path = names.first().map_or_else(|| self.dir.clone(), |n| self.path_for(n));
        Error::UnexpectedTensors { path, names }
    }
}

/// Write `tensors` (name -> tensor, any device) to a safetensors file, atomically: the data
/// goes to `path.tmp`, is synced, and is renamed over `path`. Names are written sorted.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    struct View {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &View {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut views = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let kind = t.kind();
        let dtype = dtype_of(kind).ok_or_else(|| Error::TensorDtype {
            path: path.to_owned(),
            name: name.clone(),
            dtype: format!("{kind:?}"),
        })?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.insert(name.clone(), View { dtype, shape, data });
    }
    let bytes = safetensors::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), metadata)
        .map_err(|e| Error::Safetensors { path: path.to_owned(), reason: e.to_string() })?;
    crate::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        let meta = HashMap::from([("k".to_string(), "4".to_string())]);
        save(
            &dir.path().join(SINGLE_FILE),
            &[("b".into(), b.shallow_clone()), ("a".into(), a.shallow_clone())],
            Some(meta),
        )?;
        let ck = Checkpoint::open(dir.path())?;
        assert_eq!(ck.names().collect::<Vec<_>>(), ["a", "b"]);
        assert!(ck.load("a", &[2, 3], Kind::Float, Device::Cpu)?.equal(&a));
        assert_eq!(ck.stored_dtype("b"), Some(DType::Bf16));
        assert!(ck.load("b", &[2], Kind::Float, Device::Cpu)?.equal(&b.to_kind(Kind::Float)));
        let err = ck.load("a", &[3, 2], Kind::Float, Device::Cpu).expect_err("shape").to_string();
        assert!(err.contains("`a`") && err.contains("[3, 2]") && err.contains("model.safetensors"), "{err}");
        let file = SafetensorsFile::open(&dir.path().join(SINGLE_FILE))?;
        assert_eq!(file.metadata().and_then(|m| m.get("k")).map(String::as_str), Some("4"));
        Ok(())
    }
}
