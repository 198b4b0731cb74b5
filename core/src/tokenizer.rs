//! Text in and out: `tokenizer.json` through the `tokenizers` crate, the special tokens from
//! the config files, and the chat template rendered with `minijinja` the way transformers
//! renders it (Jinja2 with `trim_blocks` and `lstrip_blocks`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result, read_json, read_to_string};
use crate::model::config::token_ids;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A chat template and the file it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    path: PathBuf,
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Beginning-of-sequence token text and id, when the model has one.
    pub bos: Option<(String, i64)>,
    /// End-of-sequence token text, for chat templates.
    pub eos_text: Option<String>,
    /// Ids that end generation (from generation_config.json, else config.json, else the
    /// tokenizer's `eos_token`).
    pub eos_ids: Vec<i64>,
    chat_template: Option<ChatTemplate>,
}

/// A special token as tokenizer_config.json spells it: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load the tokenizer of model folder `dir`: `tokenizer.json` (required),
    /// `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja` (optional).
    /// `config_eos` and `config_bos` are the ids config.json gives.
    pub fn from_folder(dir: &Path, config_bos: Option<i64>, config_eos: &[i64]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer { path, reason: "file not found".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), reason: e.to_string() })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.exists() { read_json(&tc_path)? } else { Value::Null };
        let gc_path = dir.join("generation_config.json");
        let gc: Value = if gc_path.exists() { read_json(&gc_path)? } else { Value::Null };

        let id_of = |text: &str| inner.token_to_id(text).map(i64::from);
        let bos_text = token_text(tc.get("bos_token"));
        let bos = match (&bos_text, config_bos) {
            (Some(t), _) if id_of(t).is_some() => id_of(t).map(|id| (t.clone(), id)),
            (_, Some(id)) => inner.id_to_token(id as u32).map(|t| (t, id)),
            _ => None,
        };
        let eos_text = token_text(tc.get("eos_token"));
        let mut eos_ids = token_ids(gc.get("eos_token_id"));
        if eos_ids.is_empty() {
            eos_ids = config_eos.to_vec();
        }
        if eos_ids.is_empty() {
            eos_ids.extend(eos_text.as_deref().and_then(id_of));
        }

        let chat_template = Self::find_template(dir, &tc_path, &tc)?;
        Ok(Self { inner, path, bos, eos_text, eos_ids, chat_template })
    }

    /// The chat template: `chat_template.jinja` when present, else `chat_template` in
    /// tokenizer_config.json (a string, or a list of named templates where `default` wins).
    fn find_template(dir: &Path, tc_path: &Path, tc: &Value) -> Result<Option<ChatTemplate>> {
        let file = dir.join("chat_template.jinja");
        if file.exists() {
            return Ok(Some(ChatTemplate { source: read_to_string(&file)?, path: file }));
        }
        let source = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| named.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        Ok(source.map(|source| ChatTemplate { source, path: tc_path.to_owned() }))
    }

    /// Wrap an in-memory tokenizer (for models this project creates).
    pub fn from_parts(inner: tokenizers::Tokenizer, bos: Option<(String, i64)>, eos: Option<(String, i64)>) -> Self {
        Self {
            inner,
            path: PathBuf::from("tokenizer.json"),
            bos,
            eos_text: eos.as_ref().map(|(t, _)| t.clone()),
            eos_ids: eos.map(|(_, id)| id).into_iter().collect(),
            chat_template: None,
        }
    }

    /// Where the chat template comes from (`chat_template.jinja`, or `tokenizer_config.json`
    /// and its `chat_template` key), when the model has one.
    pub fn chat_template_origin(&self) -> Option<String> {
        self.chat_template.as_ref().map(|t| t.path.display().to_string())
    }

    /// The `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token count including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encode `text` as the tokenizer file says, including any special tokens its
    /// post-processor adds (a BOS only if the tokenizer adds one).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, true)
    }

    /// Encode `text`, with or without the post-processor's special tokens.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Decode ids to text. Ids outside the tokenizer's vocabulary are an error.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })
    }

    /// The text of one token as it appears in running text (`None` for ids without text).
    pub fn token_text(&self, id: i64) -> Option<String> {
        let piece = self.inner.id_to_token(id as u32)?;
        self.inner.decode(&[id as u32], false).ok().or(Some(piece))
    }

    /// An incremental decoder: feed ids one by one, get the text they complete.
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            inner: self.inner.decode_stream(skip_special_tokens),
            ids: Vec::new(),
            emitted: 0,
            skip_special_tokens,
        }
    }

    /// True when the model folder has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Render `messages` with the chat template, as transformers' `apply_chat_template(...,
    /// tokenize=False)` does.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| Error::ChatTemplate {
            path: self.path.with_file_name("tokenizer_config.json"),
            reason: "the model has no chat template".into(),
        })?;
        let err = |e: minijinja::Error| Error::ChatTemplate { path: template.path.clone(), reason: format!("{e:#}") };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| String::new());
        let tmpl = env.template_from_str(&template.source).map_err(err)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_ref().map(|(t, _)| t.clone()).unwrap_or_default(),
            eos_token => self.eos_text.clone().unwrap_or_default(),
        };
        tmpl.render(ctx).map_err(err)
    }
}

/// Incremental detokenisation (`tokenizers`' decode stream): feed ids one by one and get the
/// text each completes; a character split over several tokens comes out with its last one.
pub struct TokenStream<'a> {
    tokenizer: &'a TextTokenizer,
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    ids: Vec<i64>,
    emitted: usize,
    skip_special_tokens: bool,
}

impl TokenStream<'_> {
    /// Add `id`; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: i64) -> String {
        self.ids.push(id);
        let text = self.inner.step(id as u32).ok().flatten().unwrap_or_default();
        self.emitted += text.len();
        text
    }

    /// The text still held back at the end (bytes of an unfinished character, shown as
    /// replacement characters, as a one-shot decode shows them).
    pub fn finish(&mut self) -> String {
        let all = self.tokenizer.decode(&self.ids, self.skip_special_tokens).unwrap_or_default();
        let rest = all.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = all.len();
        rest
    }
}
