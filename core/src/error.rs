//! The one error type of `mtp-core`: structured variants that name the file, the tensor or
//! the key at fault, so that a user can act on the message without reading code.

use std::path::PathBuf;

/// Everything that can go wrong in the core, by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },

    /// A JSON file (config, tokenizer config, dataset line) does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's reason, with line and column.
        source: serde_json::Error,
    },

    /// A config key is missing, has the wrong type, or a value out of range.
    #[error("{path}: key `{key}`: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The key, dotted for nested keys (`rope_scaling.factor`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The model asks for something this project does not implement.
    #[error("{path}: unsupported {what}")]
    Unsupported {
        /// The file that asks for it.
        path: PathBuf,
        /// The feature, with the key and value that select it.
        what: String,
    },

    /// A safetensors file is truncated, corrupt, or has an unusable header.
    #[error("{path}: corrupt safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },

    /// A tensor the model needs is in no checkpoint file.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint (file or folder) searched.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },

    /// A checkpoint holds tensors the model does not use (a loader must never skip them
    /// silently: they usually mean a wrong architecture).
    #[error("{path}: unexpected tensors {names:?}")]
    UnexpectedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// The unused names, sorted.
        names: Vec<String>,
    },

    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The shape in the file.
        actual: Vec<i64>,
    },

    /// A tensor is stored in a dtype we cannot run.
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The dtype as the file spells it.
        dtype: String,
    },

    /// The tokenizer files are missing or broken.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A chat template fails to parse or render.
    #[error("{path}: chat template: {reason}")]
    ChatTemplate {
        /// The file that holds the template.
        path: PathBuf,
        /// The template engine's reason.
        reason: String,
    },

    /// A sequence does not fit in the model's context.
    #[error("{what} needs {needed} positions but the model's context is {context}")]
    ContextLength {
        /// What was too long ("prompt of 300 tokens + 64 new tokens").
        what: String,
        /// Positions needed.
        needed: usize,
        /// Positions available.
        context: usize,
    },

    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenId {
        /// The id.
        id: i64,
        /// The vocabulary size.
        vocab: usize,
    },

    /// A model source cannot be resolved (not a folder, not a repo id, not in the cache).
    #[error("model source `{source_name}`: {reason}")]
    Source {
        /// The source as the user gave it.
        source_name: String,
        /// What went wrong.
        reason: String,
    },

    /// A request that is invalid on its face (bad option combination, bad value).
    #[error("{0}")]
    Invalid(String),

    /// An adapter trained on another checkpoint of the loaded model's architecture.
    #[error("{0}")]
    OtherBase(String),

    /// An operation was cancelled by the user.
    #[error("cancelled")]
    Cancelled,

    /// libtorch reported an error (device out of memory, bad device index, ...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// An [`Error::Config`] for `key` in `path`.
    pub fn config(path: impl Into<PathBuf>, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config { path: path.into(), key: key.into(), reason: reason.into() }
    }
}

/// An error naming the first of `counts` that is zero ("{what} must be at least 1", each
/// name with `prefix` before it), or `Ok`.
pub(crate) fn require_positive(counts: &[(&str, usize)], prefix: &str) -> Result<()> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(Error::Invalid(format!("{prefix}{name} must be at least 1"))),
        None => Ok(()),
    }
}

/// Read a whole file, naming it in the error.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Read and parse a JSON file, naming it in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_owned(), source })
}
