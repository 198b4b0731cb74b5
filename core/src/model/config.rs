//! Model configuration in two layers: [`HfConfig`], a serde mirror of a Hugging Face
//! `config.json` with every field optional, and [`ModelConfig`], the validated plain struct
//! the model runs on.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result, read_json};

/// The supported architectures. Each is a Llama-style decoder; they differ in biases, norms
/// and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `model_type: llama` (Llama 1-3, SmolLM, TinyLlama, ...).
    Llama,
    /// `model_type: mistral`.
    Mistral,
    /// `model_type: qwen2`: bias on q, k, v.
    Qwen2,
    /// `model_type: qwen3`: RMSNorm on q and k per head, explicit `head_dim`.
    Qwen3,
}

impl Family {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }
}

/// A serde mirror of `config.json`: what the file says, nothing validated. Unknown keys are
/// ignored; keys that change the computation and that we do not implement are checked in
/// [`HfConfig::validate`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    /// transformers 4.x: the RoPE base.
    pub rope_theta: Option<f64>,
    /// transformers 4.x: RoPE scaling (`rope_type` or the older `type`, plus its factors).
    pub rope_scaling: Option<Value>,
    /// transformers 5.x: `rope_theta` and the scaling in one object.
    pub rope_parameters: Option<Value>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub layer_types: Option<Vec<String>>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub quantization_config: Option<Value>,
    pub pretraining_tp: Option<usize>,
}

/// How RoPE frequencies are rescaled for long context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelengths longer than `original_max / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

/// The validated configuration the model runs on: every value present and consistent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture.
    pub family: Family,
    /// Vocabulary size: rows of the embedding table and of the LM head.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence the model accepts, in positions.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm on q and k per head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Mistral's sliding attention window, when the model uses one.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id from config.json.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence token ids from config.json.
    pub eos_token_ids: Vec<i64>,
}

/// Token ids as config files spell them: a number, a list, or null.
pub fn token_ids(value: Option<&Value>) -> Vec<i64> {
    match value {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// Read `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// From a JSON value (configs this project writes).
    pub fn from_value(v: Value) -> Result<Self> {
        serde_json::from_value(v).map_err(|source| Error::Json { path: "config.json".into(), source })
    }

    /// Check every value and build the runtime config. `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<ModelConfig> {
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            match v {
                Some(0) => Err(Error::config(path, key, "must be positive")),
                Some(v) => Ok(v),
                None => Err(Error::config(path, key, "missing")),
            }
        };
        let unsupported = |what: String| Error::Unsupported { path: path.to_owned(), what };

        let model_type = self.model_type.as_deref().ok_or_else(|| Error::config(path, "model_type", "missing"))?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            unsupported(format!("model_type `{model_type}` (supported: llama, mistral, qwen2, qwen3)"))
        })?;
        if self.quantization_config.is_some() {
            return Err(unsupported("quantized checkpoint (`quantization_config`)".into()));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!("hidden_act `{act}` (only silu)")));
        }
        if self.pretraining_tp.is_some_and(|tp| tp != 1) {
            return Err(unsupported("pretraining_tp != 1".into()));
        }

        let hidden_size = need(self.hidden_size, "hidden_size")?;
        let num_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(self.num_key_value_heads.or(self.num_attention_heads), "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(h) => need(Some(h), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(Error::config(
                    path,
                    "num_attention_heads",
                    format!("{num_heads} does not divide hidden_size = {hidden_size} and head_dim is not given"),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(path, "head_dim", format!("{head_dim} is odd; RoPE needs an even width")));
        }

        let (rope_theta, rope_scaling) = self.rope(path)?;

        let sliding_window = match family {
            Family::Mistral => self.sliding_window,
            Family::Qwen2 | Family::Qwen3 if self.use_sliding_window == Some(true) => {
                return Err(unsupported("sliding-window attention (`use_sliding_window: true`)".into()));
            }
            _ => None,
        };
        if let Some(kinds) = &self.layer_types
            && let Some(other) = kinds.iter().find(|k| k.as_str() != "full_attention")
        {
            return Err(unsupported(format!("layer type `{other}` in `layer_types` (only full_attention)")));
        }

        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match family {
            Family::Llama => (attention_bias, attention_bias, false),
            Family::Mistral => (false, false, false),
            // Qwen2 hard-codes bias on q, k, v and none on o.
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 => (attention_bias, attention_bias, true),
        };

        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(Error::config(path, "rms_norm_eps", "must be a positive number"));
        }

        Ok(ModelConfig {
            family,
            vocab_size: need(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(self.intermediate_size, "intermediate_size")?,
            num_layers: need(self.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: need(self.max_position_embeddings.or(Some(2048)), "max_position_embeddings")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && self.mlp_bias.unwrap_or(false),
            qk_norm,
            sliding_window,
            bos_token_id: token_ids(self.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(self.eos_token_id.as_ref()),
        })
    }

    /// RoPE base and scaling from either spelling: `rope_theta` + `rope_scaling`
    /// (transformers 4.x) or `rope_parameters` (5.x).
    fn rope(&self, path: &Path) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let key = if self.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
        let theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(Error::config(path, "rope_theta", "must be a positive number"));
        }
        let Some(params) = params.filter(|p| !p.is_null()) else {
            return Ok((theta, RopeScaling::Default));
        };
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |name: &str| -> Result<f64> {
            params
                .get(name)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| Error::config(path, format!("{key}.{name}"), "missing or not a positive number"))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            },
            other => {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    what: format!("RoPE scaling `{key}.rope_type: {other}` (supported: default, linear, llama3)"),
                });
            }
        };
        Ok((theta, scaling))
    }
}

impl ModelConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        HfConfig::from_file(path)?.validate(path)
    }

    /// The longest sequence (prompt + generated tokens) the model handles correctly: the
    /// position limit, or Mistral's attention window when that is shorter (we attend to the
    /// whole sequence, which equals windowed attention only inside the window).
    pub fn context_length(&self) -> usize {
        self.sliding_window.map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The config as transformers 5.x writes it, for models this project creates.
    pub fn to_hf_json(&self) -> Value {
        let mut rope = serde_json::json!({ "rope_theta": self.rope_theta });
        if let Value::Object(extra) = serde_json::to_value(self.rope_scaling).unwrap_or(Value::Null)
            && let Value::Object(r) = &mut rope
        {
            r.extend(extra);
        }
        let architecture = match self.family {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.into(),
        };
        serde_json::json!({
            "architectures": [architecture],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        let hf: HfConfig = serde_json::from_value(v).map_err(|e| Error::Invalid(e.to_string()))?;
        hf.validate(Path::new("config.json"))
    }

    fn small() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32})
    }

    #[test]
    fn defaults_fill_in() -> Result<()> {
        let c = parse(small())?;
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope_theta), (2, 4, 10000.0));
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(!c.tie_word_embeddings && !c.qkv_bias);
        Ok(())
    }

    #[test]
    fn both_rope_spellings_agree() -> Result<()> {
        let mut v4 = small();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        let mut v5 = small();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                        "rope_theta": 500000.0});
        assert_eq!(parse(v4)?, parse(v5)?);
        Ok(())
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("model_type", json!("gpt2"), "model_type `gpt2`"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type: yarn"),
            ("rope_scaling", json!({"rope_type": "llama3", "factor": 4.0}), "rope_scaling.low_freq_factor"),
            ("hidden_size", json!(0), "hidden_size"),
        ];
        for (key, value, needle) in cases {
            let mut v = small();
            v[key] = value;
            let err = parse(v).expect_err(key).to_string();
            assert!(err.contains(needle), "{key}: `{err}` should mention `{needle}`");
            assert!(err.contains("config.json"), "{err}");
        }
        let mut v = small();
        v.as_object_mut().map(|o| o.remove("vocab_size"));
        assert!(parse(v).expect_err("missing").to_string().contains("vocab_size"));
    }

    #[test]
    fn hf_json_round_trips() -> Result<()> {
        let mut v = small();
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
        v["eos_token_id"] = json!([3, 4]);
        let c = parse(v)?;
        assert_eq!(parse(c.to_hf_json())?, c);
        Ok(())
    }
}
