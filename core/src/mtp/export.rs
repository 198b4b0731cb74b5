//! An adapter written for other tools: a PEFT LoRA folder, which SGLang's and vLLM's UNO
//! speculative decoding load as a draft-only gated LoRA (the base weights on the seed row,
//! base + LoRA on the rows of random token ids), or our own file as it is.
//!
//! Only an adapter of the UNO recipe can be served that way: the paper's learned mask
//! embeddings and sampler head have no place in a PEFT LoRA, and the engines' strict
//! loading refuses any tensor but the LoRA factors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::adapter::{MtpAdapter, Recipe};
use crate::checkpoint::{SafetensorsFile, save};
use crate::error::{Error, Result};
use crate::model::{Proj, ProjGroup};

/// The PEFT file of the LoRA factors.
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
/// The PEFT file of the LoRA's configuration.
pub const PEFT_CONFIG: &str = "adapter_config.json";

/// `adapter_config.json` of a PEFT LoRA, with the fields PEFT, SGLang and vLLM read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftConfig {
    /// Always `LORA`.
    pub peft_type: &'static str,
    /// Always `CAUSAL_LM`.
    pub task_type: &'static str,
    /// The base model the adapter was trained on (our name for it: a folder, a repo id).
    pub base_model_name_or_path: String,
    /// LoRA rank.
    pub r: usize,
    /// PEFT scales the delta by `lora_alpha / r`, as we scale it by `alpha / rank`: the same
    /// number.
    pub lora_alpha: f64,
    /// The adapted modules (`q_proj`, ...), sorted.
    pub target_modules: Vec<String>,
    /// No dropout at inference.
    pub lora_dropout: f64,
    /// No bias terms.
    pub bias: &'static str,
    /// Weights stored `[out, in]`, as PyTorch's Linear.
    pub fan_in_fan_out: bool,
    /// The plain `alpha / r` scaling.
    pub use_rslora: bool,
    /// Loaded for inference.
    pub inference_mode: bool,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftExport {
    /// The folder.
    pub dir: PathBuf,
    /// LoRA tensors written (A and B of every adapted projection of every layer).
    pub tensors: usize,
    /// Its configuration.
    pub config: PeftConfig,
    /// The adapter's mask count k: UNO drafts k + 1 tokens a pass with it (the seed row's
    /// next token and one per random row).
    pub masks: usize,
}

/// The PEFT key of one of our LoRA tensors (`lora.layers.N.q_proj.A` ->
/// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), or `None` for a
/// tensor that is not a LoRA factor.
pub fn peft_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("lora.layers.")?;
    let mut parts = rest.split('.');
    let (layer, module, factor) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || layer.parse::<usize>().is_err() {
        return None;
    }
    let proj = Proj::ALL.into_iter().find(|p| p.module() == module)?;
    let block = match proj.group() {
        ProjGroup::Qkv | ProjGroup::O => "self_attn",
        ProjGroup::GateUp | ProjGroup::Down => "mlp",
    };
    let factor = match factor {
        "A" => "lora_A",
        "B" => "lora_B",
        _ => return None,
    };
    Some(format!("base_model.model.model.layers.{layer}.{block}.{module}.{factor}.weight"))
}

/// The base model as a serving engine or PEFT finds it: the built-in demo by its folder
/// (no hub knows "demo"), anything else (a repo id, a folder) as the adapter recorded it.
fn serving_name(recorded: &str) -> String {
    match recorded.parse::<crate::ModelSource>() {
        Ok(crate::ModelSource::Demo) => crate::source::demo_model_dir().display().to_string(),
        _ => recorded.to_owned(),
    }
}

/// Write the adapter in `adapter` as a PEFT LoRA folder `out` (created when missing; each
/// file written to a temporary name and renamed). An adapter of the paper's recipe is
/// refused with what it has that UNO cannot serve.
pub fn export_peft(adapter: &Path, out: &Path) -> Result<PeftExport> {
    let (config, base) = MtpAdapter::read_header(adapter)?;
    let mut missing = Vec::new();
    if config.recipe != Recipe::Uno {
        missing.push("its mask rows read learned mask embeddings, not random token ids");
    }
    if config.sampler {
        missing.push("it drafts through a sampler head");
    }
    if !config.gated {
        missing.push("its LoRA is not gated (it changes the next-token rows too)");
    }
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: UNO decoding (SGLang, vLLM) cannot serve this adapter: {}. Train one with the UNO recipe instead \
             (`mtp train --recipe uno`, or Recipe: uno in the Train view: random token ids on the mask rows, no \
             sampler head)",
            adapter.display(),
            missing.join("; ")
        )));
    }
    let file = SafetensorsFile::open(adapter)?;
    let mut tensors = Vec::new();
    for name in file.names() {
        if let Some(key) = peft_key(&name) {
            tensors.push((key, file.read(&name)?));
        }
    }
    if tensors.is_empty() {
        return Err(Error::Invalid(format!("{}: the adapter holds no LoRA factors", adapter.display())));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut targets: Vec<String> = config.lora.targets.iter().map(|p| p.module().to_owned()).collect();
    targets.sort();
    let peft = PeftConfig {
        peft_type: "LORA",
        task_type: "CAUSAL_LM",
        base_model_name_or_path: serving_name(&base.name),
        r: config.lora.rank,
        lora_alpha: config.lora.alpha,
        target_modules: targets,
        lora_dropout: 0.0,
        bias: "none",
        fan_in_fan_out: false,
        use_rslora: false,
        inference_mode: true,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save(&out.join(PEFT_WEIGHTS), &tensors, Some(meta))?;
    crate::fsutil::write_json_atomic(&out.join(PEFT_CONFIG), &peft)?;
    Ok(PeftExport { dir: out.to_owned(), tensors: tensors.len(), config: peft, masks: config.k })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo is named by its folder in the PEFT config (what SGLang and vLLM load);
    /// repo ids and folders stay as recorded.
    #[test]
    fn the_demo_base_is_named_by_its_folder() {
        assert_eq!(serving_name("demo"), crate::source::demo_model_dir().display().to_string());
        assert_eq!(serving_name("HuggingFaceTB/SmolLM2-135M-Instruct"), "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(serving_name("/models/llama"), "/models/llama");
    }

    #[test]
    fn our_names_map_to_peft_keys() {
        assert_eq!(
            peft_key("lora.layers.3.q_proj.A").as_deref(),
            Some("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
        );
        assert_eq!(
            peft_key("lora.layers.0.down_proj.B").as_deref(),
            Some("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        );
        for other in ["mask_embeddings", "sampler.fc1.weight", "lora.layers.x.q_proj.A", "lora.layers.1.q_proj.C"] {
            assert_eq!(peft_key(other), None, "{other}");
        }
    }
}
