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

/// Variables a chat template reads besides the conversation, as transformers'
/// `apply_chat_template(..., **kwargs)` passes them: Qwen3's `enable_thinking`, Llama 3.x's
/// `date_string` (today's date when absent), and the like.
pub type TemplateVars = std::collections::BTreeMap<String, Value>;

/// One template variable from `KEY=VALUE`: the value as JSON where it is JSON (`false`,
/// `3`, `"x"`, `[1, 2]`), Python's `True`, `False` and `None` as the keyword arguments
/// transformers users write them, else as text (`26 Jul 2024`).
pub fn parse_template_var(text: &str) -> Result<(String, Value)> {
    let bad = |why: &str| Error::Invalid(format!("template variable `{text}`: {why}"));
    let (key, value) = text.split_once('=').ok_or_else(|| bad("write it KEY=VALUE"))?;
    let key = key.trim();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if key.is_empty() || !key.chars().all(word) || key.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(bad("its name must be letters, digits and underscores, not starting with a digit"));
    }
    if ["messages", "add_generation_prompt", "bos_token", "eos_token"].contains(&key) {
        return Err(bad("the conversation and its special tokens are set for each rendering"));
    }
    let value = value.trim();
    let value = serde_json::from_str(value).unwrap_or_else(|_| match value {
        "True" => Value::Bool(true),
        "False" => Value::Bool(false),
        "None" => Value::Null,
        text => Value::String(text.to_owned()),
    });
    Ok((key.to_owned(), value))
}

/// `KEY=VALUE, ...` as the variables would be typed (text unquoted).
pub fn describe_template_vars(vars: &TemplateVars) -> String {
    let value = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    vars.iter().map(|(k, v)| format!("{k}={}", value(v))).collect::<Vec<_>>().join(", ")
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
    /// Variables the chat template reads besides the conversation.
    template_vars: TemplateVars,
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
        Ok(Self { inner, path, bos, eos_text, eos_ids, chat_template, template_vars: TemplateVars::new() })
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
            template_vars: TemplateVars::new(),
        }
    }

    /// Give the chat template these variables from now on (replacing any given before).
    pub fn set_template_vars(&mut self, vars: TemplateVars) {
        self.template_vars = vars;
    }

    /// The variables the chat template is given besides the conversation.
    pub fn template_vars(&self) -> &TemplateVars {
        &self.template_vars
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
        self.render_chat_template(template, messages, add_generation_prompt, chrono::Local::now().fixed_offset())
    }

    /// [`TextTokenizer::apply_chat_template`] with the clock read as `now`.
    fn render_chat_template(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        now: chrono::DateTime<chrono::FixedOffset>,
    ) -> Result<String> {
        let err = |e: minijinja::Error| Error::ChatTemplate { path: template.path.clone(), reason: format!("{e:#}") };
        let env = chat_environment(now);
        let tmpl = env.template_from_str(&template.source).map_err(err)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_ref().map(|(t, _)| t.clone()).unwrap_or_default(),
            eos_token => self.eos_text.clone().unwrap_or_default(),
            ..minijinja::Value::from_serialize(&self.template_vars)
        };
        tmpl.render(ctx).map_err(err)
    }
}

/// The Jinja environment transformers renders chat templates in: `trim_blocks` and
/// `lstrip_blocks`, loop controls (`{% break %}`, `{% continue %}`), Python's string and
/// dict methods, `raise_exception`, `strftime_now` (the date at `now`: Llama 3.x
/// templates write it into every system header) and its own `tojson` (Python's
/// `json.dumps`, not Jinja's HTML-safe filter).
fn chat_environment(now: chrono::DateTime<chrono::FixedOffset>) -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", move |format: String| strftime(&now, &format));
    env.add_filter("tojson", python_json);
    env
}

/// Python's `datetime.now().strftime(format)` at `at`, through chrono: Python's directives
/// as chrono writes them (`%f` as six digits of microseconds, `%z` and `%Z` empty as for
/// Python's naive local time, `%%`); a directive chrono does not know is an error naming it,
/// not an empty date.
fn strftime(at: &chrono::DateTime<chrono::FixedOffset>, format: &str) -> std::result::Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let bad =
        |what: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("strftime_now: {what}"));
    let mut chrono_format = String::with_capacity(format.len());
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            chrono_format.push(c);
            continue;
        }
        let directive = match chars.next() {
            Some('-') => chars.next().map(|d| format!("-{d}")),
            d => d.map(String::from),
        }
        .ok_or_else(|| bad(format!("`{format}` ends inside a directive")))?;
        match directive.as_str() {
            "f" => chrono_format.push_str("%6f"),
            "z" | "Z" => {}
            "%" => chrono_format.push_str("%%"),
            d if StrftimeItems::new(&format!("%{d}")).any(|i| i == Item::Error) => {
                return Err(bad(format!("the directive `%{d}` of `{format}` is not supported")));
            }
            d => {
                chrono_format.push('%');
                chrono_format.push_str(d);
            }
        }
    }
    Ok(at.format(&chrono_format).to_string())
}

/// transformers' `tojson` filter: Python's `json.dumps(value, ensure_ascii=False)` with the
/// keyword arguments it passes on: `indent`, `ensure_ascii`, `sort_keys` and `separators`
/// (Python's defaults: `", "` and `": "` on one line, `","` and `": "` with an indent); a
/// map's keys otherwise in their order (a message's `role` before its `content`).
fn python_json(
    value: &minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let bad = |what: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_separator, key_separator) = match separators.as_deref() {
        None => (if indent.is_some() { "," } else { ", " }, ": "),
        Some([item, key]) => (item.as_str(), key.as_str()),
        Some(other) => return Err(bad(format!("separators must be two strings, not {}", other.len()))),
    };
    let indent = indent.map(|n| " ".repeat(n).into_bytes());
    let mut out = Vec::new();
    let formatter = PythonJson {
        indent: indent.as_deref(),
        item_separator: item_separator.as_bytes(),
        key_separator: key_separator.as_bytes(),
        depth: 0,
        has_value: false,
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    let written = if sort_keys.unwrap_or(false) {
        serde::Serialize::serialize(&SortedKeys(value), &mut ser)
    } else {
        serde::Serialize::serialize(value, &mut ser)
    };
    written.map_err(|e| bad(e.to_string()))?;
    String::from_utf8(out).map_err(|e| bad(e.to_string()))
}

/// A template value serialized with every map's keys sorted (`sort_keys=True`).
struct SortedKeys<'a>(&'a minijinja::Value);

impl serde::Serialize for SortedKeys<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use minijinja::value::ValueKind;
        use serde::ser::{SerializeMap, SerializeSeq};
        let items = || self.0.try_iter().map_err(serde::ser::Error::custom);
        match self.0.kind() {
            ValueKind::Map => {
                let mut keys: Vec<minijinja::Value> = items()?.collect();
                keys.sort_by_key(|k| k.to_string());
                let mut map = serializer.serialize_map(Some(keys.len()))?;
                for key in &keys {
                    let value = self.0.get_item(key).map_err(serde::ser::Error::custom)?;
                    map.serialize_entry(key, &SortedKeys(&value))?;
                }
                map.end()
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let values: Vec<minijinja::Value> = items()?.collect();
                let mut seq = serializer.serialize_seq(Some(values.len()))?;
                for value in &values {
                    seq.serialize_element(&SortedKeys(value))?;
                }
                seq.end()
            }
            _ => self.0.serialize(serializer),
        }
    }
}

/// Python's `json.dumps` layout for serde_json (see [`python_json`]).
struct PythonJson<'a> {
    indent: Option<&'a [u8]>,
    item_separator: &'a [u8],
    key_separator: &'a [u8],
    depth: usize,
    /// Whether the innermost open array or object has an item yet.
    has_value: bool,
    ensure_ascii: bool,
}

impl PythonJson<'_> {
    fn item<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(self.item_separator)?;
        }
        match self.indent {
            Some(indent) => {
                w.write_all(b"\n")?;
                (0..self.depth).try_for_each(|_| w.write_all(indent))
            }
            None => Ok(()),
        }
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if let (Some(indent), true) = (self.indent, self.has_value) {
            w.write_all(b"\n")?;
            (0..self.depth).try_for_each(|_| w.write_all(indent))?;
        }
        w.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PythonJson<'_> {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key_separator)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, w: &mut W, fragment: &str) -> std::io::Result<()> {
        if !self.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        // Python escapes every character outside `' '..='~'` (serde_json has escaped the
        // control characters, quotes and backslashes already).
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> chrono::DateTime<chrono::FixedOffset> {
        use chrono::TimeZone;
        chrono::FixedOffset::east_opt(0)
            .and_then(|tz| tz.with_ymd_and_hms(y, mo, d, h, mi, s).single())
            .expect("a valid instant")
    }

    fn render(source: &str, now: chrono::DateTime<chrono::FixedOffset>, ctx: minijinja::Value) -> String {
        chat_environment(now).render_str(source, ctx).unwrap_or_else(|e| format!("error: {e:#}"))
    }

    /// `strftime_now` formats as Python's `datetime.strftime` does (the expected strings
    /// are Python's for the same instant); a directive chrono lacks is an error.
    #[test]
    fn strftime_now_formats_as_python() {
        let now = at(2026, 12, 8, 9, 5, 7);
        let cases = [
            ("%d %b %Y", "08 Dec 2026"),
            ("%d %B %Y", "08 December 2026"),
            ("%Y-%m-%d %H:%M:%S", "2026-12-08 09:05:07"),
            ("%A %a %j %p", "Tuesday Tue 342 AM"),
        ];
        for (format, python) in cases {
            assert_eq!(render(&format!("{{{{ strftime_now('{format}') }}}}"), now, minijinja::context! {}), python);
        }
        // Microseconds as six digits, no zone for naive local time, `%%`, glibc's `%-d`.
        use chrono::Timelike;
        let micro = now.with_nanosecond(123_456_789).expect("a valid instant");
        assert_eq!(render("{{ strftime_now('%f|%z|%Z|%%|%-d') }}", micro, minijinja::context! {}), "123456|||%|8");
        let error = render("{{ strftime_now('%Y %Q') }}", now, minijinja::context! {});
        assert!(error.starts_with("error:") && error.contains("`%Q`"), "{error}");
        assert!(render("{{ strftime_now('%Y %') }}", now, minijinja::context! {}).starts_with("error:"));
    }

    /// A Llama 3.x-style header takes the date from `strftime_now` (it was rendered empty),
    /// and loop controls, which transformers' Jinja environment enables, work.
    #[test]
    fn date_header_and_loop_controls_render() {
        let source = "{%- if not date_string is defined %}{%- if strftime_now is defined %}\
            {%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"none\" %}\
            {%- endif %}{%- endif %}Today Date: {{ date_string }}|\
            {%- for m in messages %}{%- if m.role == 'stop' %}{% break %}{% endif %}\
            {%- if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }};{%- endfor %}";
        let messages = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("skip", "b"),
            ChatMessage::new("assistant", "c"),
            ChatMessage::new("stop", "d"),
            ChatMessage::new("user", "e"),
        ];
        let out = render(source, at(2026, 12, 8, 23, 59, 0), minijinja::context! { messages => messages });
        assert_eq!(out, "Today Date: 08 Dec 2026|a;c;");
    }

    /// `tojson` writes what Python's `json.dumps(..., ensure_ascii=False)` writes (the
    /// expected strings are Python's), with its `indent` and `ensure_ascii` arguments, not
    /// Jinja's HTML-escaped compact form.
    #[test]
    fn tojson_is_pythons_json_dumps() {
        let value = serde_json::json!({"a": "é<", "b": [1, {"x": null}], "c": {}, "d": []});
        let ctx = minijinja::context! { v => minijinja::Value::from_serialize(&value), s => "é😀" };
        let now = at(2026, 1, 1, 0, 0, 0);
        assert_eq!(
            render("{{ v | tojson }}", now, ctx.clone()),
            r#"{"a": "é<", "b": [1, {"x": null}], "c": {}, "d": []}"#
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}", now, ctx.clone()),
            "{\n  \"a\": \"é<\",\n  \"b\": [\n    1,\n    {\n      \"x\": null\n    }\n  ],\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(render("{{ s | tojson(ensure_ascii=true) }}", now, ctx.clone()), r#""\u00e9\ud83d\ude00""#);
        assert!(render("{{ v | tojson(colour=1) }}", now, ctx.clone()).starts_with("error:"));
        // Python's `sort_keys` and `separators`, with and without an indent; DEL escaped.
        let ctx = minijinja::context! { m => minijinja::Value::from_serialize(serde_json::json!({"b": 1, "a": [2, {"d": 3, "c": 4}]})), del => "\u{7f}" };
        assert_eq!(
            render("{{ m | tojson(sort_keys=true, separators=(',', ':')) }}", now, ctx.clone()),
            r#"{"a":[2,{"c":4,"d":3}],"b":1}"#
        );
        assert_eq!(
            render("{{ [1, {'a': 2}] | tojson(indent=2, separators=(',', ' = ')) }}", now, ctx.clone()),
            "[\n  1,\n  {\n    \"a\" = 2\n  }\n]"
        );
        assert_eq!(render("{{ del | tojson(ensure_ascii=true) }}", now, ctx.clone()), r#""\u007f""#);
        assert!(render("{{ m | tojson(separators=(',',)) }}", now, ctx).starts_with("error:"));
        // A message's keys in their order, as a Python dict read from JSON keeps them.
        let ctx = minijinja::context! { m => ChatMessage::new("user", "hi") };
        assert_eq!(render("{{ m | tojson }}", now, ctx), r#"{"role": "user", "content": "hi"}"#);
    }

    /// Template variables reach the template as transformers' keyword arguments do (a
    /// `date_string` in place of today's date, Qwen3's `enable_thinking`); a bad one is an
    /// error naming it, and the conversation cannot be replaced by one.
    #[test]
    fn template_variables_reach_the_template() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama3-tied");
        std::fs::copy(fixture.join("tokenizer.json"), dir.path().join("tokenizer.json"))?;
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}")?;
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}\
             {{ date_string }}|{{ messages | length }}\
             {%- if enable_thinking is defined and enable_thinking is false %}|no thinking{% endif %}",
        )?;
        let mut tok = TextTokenizer::from_folder(dir.path(), None, &[])?;
        let hi = [ChatMessage::new("user", "hi")];
        let vars: TemplateVars = ["date_string=26 Jul 2024", "enable_thinking=false"]
            .iter()
            .map(|v| parse_template_var(v))
            .collect::<Result<_>>()?;
        assert_eq!(vars.get("enable_thinking"), Some(&Value::Bool(false)));
        assert_eq!(vars.get("date_string"), Some(&Value::String("26 Jul 2024".into())));
        tok.set_template_vars(vars);
        assert_eq!(tok.apply_chat_template(&hi, true)?, "26 Jul 2024|1|no thinking");
        tok.set_template_vars(TemplateVars::from([("enable_thinking".to_string(), Value::Bool(true))]));
        let today = tok.apply_chat_template(&hi, true)?;
        assert!(today.ends_with("|1") && !today.starts_with("26 Jul 2024"), "{today}");
        for bad in ["enable_thinking", "=1", "two words=1", "1st=2", "messages=[]"] {
            let error = parse_template_var(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(&format!("template variable `{bad}`")), "{bad}: {error}");
        }
        assert_eq!(parse_template_var(" n = 3 ")?, ("n".to_string(), Value::from(3)));
        // Python's spellings, as transformers' keyword arguments are written.
        for (text, value) in [("a=False", Value::Bool(false)), ("a=True", Value::Bool(true)), ("a=None", Value::Null)] {
            assert_eq!(parse_template_var(text)?.1, value, "{text}");
        }
        let vars: TemplateVars = ["date_string=26 Jul 2024", "enable_thinking=False"]
            .iter()
            .map(|v| parse_template_var(v))
            .collect::<Result<_>>()?;
        assert_eq!(describe_template_vars(&vars), "date_string=26 Jul 2024, enable_thinking=false");
        // Variables given directly cannot replace the conversation either: its keys win.
        tok.set_template_vars(TemplateVars::from([("messages".to_string(), Value::from(Vec::<i64>::new()))]));
        assert!(tok.apply_chat_template(&hi, true)?.ends_with("|1"));
        Ok(())
    }

    /// A model folder's template renders today's date through `apply_chat_template`.
    #[test]
    fn chat_template_reads_the_clock() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama3-tied");
        std::fs::copy(fixture.join("tokenizer.json"), dir.path().join("tokenizer.json"))?;
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>", "eos_token": "</s>"}"#)?;
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{{ m.content }}{% endfor %}",
        )?;
        let tok = TextTokenizer::from_folder(dir.path(), None, &[])?;
        let today = || chrono::Local::now().format("%d %b %Y").to_string();
        let before = today();
        let rendered = tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true)?;
        let after = today();
        assert!(rendered == format!("{before}|hi") || rendered == format!("{after}|hi"), "{rendered}");
        Ok(())
    }
}
