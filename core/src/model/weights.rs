//! Where a model's tensors come from: a checkpoint on disk, fresh initialisation for
//! pretraining, or a dry run that only checks names and shapes. Layers ask for tensors by
//! their Hugging Face key, built one component at a time.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::Display;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::device::DType;
use crate::error::Result;

/// A supplier of named tensors.
pub trait WeightSource {
    /// The tensor called `name` (a full Hugging Face key such as
    /// `model.layers.0.self_attn.q_proj.weight`), which must have `shape`.
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor>;

    /// True when the tensors are not trained (the default), so that layers may copy them
    /// into stacked buffers; a source of trainable leaf tensors says false.
    fn frozen(&self) -> bool {
        true
    }
}

/// A position in the key tree of a [`WeightSource`]: `model` / `layers` / `0` / ...
#[derive(Clone)]
pub struct Weights<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The root of `source`'s key tree.
    pub fn new(source: &'a dyn WeightSource) -> Self {
        Self { source, prefix: String::new() }
    }

    /// The subtree under one more key component.
    pub fn pp(&self, component: impl Display) -> Self {
        let prefix =
            if self.prefix.is_empty() { component.to_string() } else { format!("{}.{component}", self.prefix) };
        Self { source: self.source, prefix }
    }

    /// See [`WeightSource::frozen`].
    pub fn frozen(&self) -> bool {
        self.source.frozen()
    }

    /// The tensor `name` under this prefix.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.source.get(&self.pp(name).prefix, shape)
    }
}

/// Tensors read from a checkpoint, converted to `dtype` on `device`. Records which names
/// were read so that [`CheckpointSource::finish`] can report the ones nobody asked for.
pub struct CheckpointSource<'a> {
    checkpoint: &'a Checkpoint,
    kind: Kind,
    device: Device,
    used: RefCell<BTreeSet<String>>,
}

impl<'a> CheckpointSource<'a> {
    /// Read from `checkpoint` into `dtype` on `device`.
    pub fn new(checkpoint: &'a Checkpoint, dtype: DType, device: Device) -> Self {
        Self { checkpoint, kind: dtype.kind(), device, used: RefCell::default() }
    }

    /// Fail if the checkpoint holds tensors that were not read, other than those for which
    /// `ignorable` is true.
    pub fn finish(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.borrow();
        let unexpected: Vec<String> =
            self.checkpoint.names().filter(|n| !used.contains(*n) && !ignorable(n)).map(str::to_owned).collect();
        if unexpected.is_empty() { Ok(()) } else { Err(self.checkpoint.unexpected(unexpected)) }
    }
}

impl WeightSource for CheckpointSource<'_> {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.checkpoint.load(name, shape, self.kind, self.device)?;
        self.used.borrow_mut().insert(name.to_owned());
        Ok(t)
    }
}

/// What a dry run learned about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Hugging Face key.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Stored dtype, when checked against a checkpoint.
    pub stored: Option<DType>,
}

/// A dry run: checks each requested tensor against a checkpoint's header (name, shape,
/// dtype) without reading data, and records the specs. Returns empty placeholders.
pub struct SpecSource<'a> {
    checkpoint: Option<&'a Checkpoint>,
    specs: RefCell<Vec<TensorSpec>>,
}

impl<'a> SpecSource<'a> {
    /// Check against `checkpoint`, or only record shapes when `None`.
    pub fn new(checkpoint: Option<&'a Checkpoint>) -> Self {
        Self { checkpoint, specs: RefCell::default() }
    }

    /// The tensors requested, in order.
    pub fn into_specs(self) -> Vec<TensorSpec> {
        self.specs.into_inner()
    }
}

impl WeightSource for SpecSource<'_> {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let stored = match self.checkpoint {
            Some(c) => {
                c.check(name, shape)?;
                c.stored_dtype(name)
            }
            None => None,
        };
        self.specs.borrow_mut().push(TensorSpec { name: name.into(), shape: shape.to_vec(), stored });
        Ok(Tensor::zeros([0], (Kind::Float, Device::Cpu)))
    }
}
