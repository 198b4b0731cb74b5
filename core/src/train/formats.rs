//! Dataset files and the row formats they hold: JSONL (one object per line), JSON (an array
//! of objects, the usual shape of an Alpaca set) and Parquet (one object per row, the usual
//! shape of a dataset on the Hugging Face hub); each object is chat `messages`, ShareGPT
//! `conversations`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion` (or their
//! token ids), or `text`. Rows that fit none are counted and listed with file and row.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{DataReport, Example};
use crate::error::{Error, Result};
use crate::tokenizer::ChatMessage;

/// The format detected for a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Chat: objects with `messages` (`role`, `content`).
    Chat,
    /// ShareGPT: objects with `conversations` (`from`: human / gpt / system, `value`).
    ShareGpt,
    /// Alpaca: objects with `instruction`, optional `input`, `output`.
    Alpaca,
    /// Objects with `prompt` and `completion` (or `prompt_ids` and `completion_ids`).
    PromptCompletion,
    /// Objects with `text`, text files, folders.
    Text,
    /// Several of the above.
    Mixed,
}

impl DataFormat {
    /// Combine the formats of two parts of one dataset.
    pub fn join(self, other: DataFormat) -> DataFormat {
        if self == other { self } else { DataFormat::Mixed }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Chat => "chat (messages)",
            DataFormat::ShareGpt => "ShareGPT (conversations)",
            DataFormat::Alpaca => "Alpaca (instruction, input, output)",
            DataFormat::PromptCompletion => "prompt/completion",
            DataFormat::Text => "text",
            DataFormat::Mixed => "mixed",
        })
    }
}

/// A row that could not be read: the file, the line (JSONL) or row (JSON array, Parquet)
/// counted from 1, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    /// The file, as given.
    pub file: String,
    /// `line` for JSONL files, `row` for JSON arrays and Parquet files.
    pub unit: String,
    /// Its number, from 1.
    pub number: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}: {}", self.file, self.unit, self.number, self.reason)
    }
}

/// How many bad rows are listed one by one (all are counted).
const LISTED_BAD_ROWS: usize = 5;

/// Parse one object into an example and the format it was written in.
pub fn parse_row(v: &Value) -> std::result::Result<(Example, DataFormat), String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(messages) = obj.get("messages") {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(messages.clone()).map_err(|e| format!("`messages`: {e}"))?;
        if let Some(m) = messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
            return Err(format!("unknown role `{}`", m.role));
        }
        return chat(messages, DataFormat::Chat);
    }
    if let Some(turns) = obj.get("conversations") {
        return sharegpt(turns, obj.get("system")).and_then(|m| chat(m, DataFormat::ShareGpt));
    }
    if obj.contains_key("instruction") {
        return alpaca(obj).and_then(|m| chat(m, DataFormat::Alpaca));
    }
    if let (Some(p), Some(c)) = (obj.get("prompt_ids"), obj.get("completion_ids")) {
        let ids = |v: &Value, name: &str| -> std::result::Result<Vec<i64>, String> {
            let ids: Vec<i64> = serde_json::from_value(v.clone()).map_err(|e| format!("`{name}`: {e}"))?;
            match ids.iter().find(|&&i| i < 0) {
                Some(i) => Err(format!("`{name}`: negative token id {i}")),
                None => Ok(ids),
            }
        };
        let (prompt_ids, completion_ids) = (ids(p, "prompt_ids")?, ids(c, "completion_ids")?);
        if prompt_ids.is_empty() || completion_ids.is_empty() {
            return Err("`prompt_ids` and `completion_ids` must not be empty".into());
        }
        return Ok((Example::Tokens { prompt_ids, completion_ids }, DataFormat::PromptCompletion));
    }
    match (obj.get("prompt"), obj.get("completion"), obj.get("text")) {
        (Some(Value::String(p)), Some(Value::String(c)), _) => {
            Ok((Example::PromptCompletion { prompt: p.clone(), completion: c.clone() }, DataFormat::PromptCompletion))
        }
        (Some(_), Some(_), _) => Err("`prompt` and `completion` must be strings".into()),
        (_, _, Some(Value::String(t))) if !t.is_empty() => Ok((Example::Text { text: t.clone() }, DataFormat::Text)),
        _ => Err("needs `messages`, `conversations`, `instruction` + `output`, `prompt` + `completion`, or a \
                  non-empty `text`"
            .into()),
    }
}

/// A conversation as an example: not empty, with at least one assistant turn.
fn chat(messages: Vec<ChatMessage>, format: DataFormat) -> std::result::Result<(Example, DataFormat), String> {
    if messages.is_empty() {
        return Err("the conversation is empty".into());
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant message".into());
    }
    Ok((Example::Chat { messages }, format))
}

/// ShareGPT turns (`from` + `value`, or `role` + `content`) as chat messages, after the
/// row's `system` text when it has one.
fn sharegpt(turns: &Value, system: Option<&Value>) -> std::result::Result<Vec<ChatMessage>, String> {
    let turns = turns.as_array().ok_or("`conversations` is not a list")?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    match system {
        Some(Value::String(s)) if !s.is_empty() => messages.push(ChatMessage::new("system", s)),
        Some(Value::String(_) | Value::Null) | None => {}
        Some(_) => return Err("`system` is not a string".into()),
    }
    for (i, turn) in turns.iter().enumerate() {
        let field = |a: &str, b: &str| turn.get(a).or_else(|| turn.get(b)).and_then(Value::as_str);
        let (Some(from), Some(value)) = (field("from", "role"), field("value", "content")) else {
            return Err(format!("`conversations` turn {}: needs string `from` and `value`", i + 1));
        };
        let role = match from {
            "human" | "user" => "user",
            "gpt" | "assistant" | "chatgpt" | "model" => "assistant",
            "system" => "system",
            other => return Err(format!("`conversations` turn {}: unsupported speaker `{other}`", i + 1)),
        };
        messages.push(ChatMessage::new(role, value));
    }
    Ok(messages)
}

/// An Alpaca row as chat messages: the optional `system`, the `history` pairs, then the
/// user turn (`instruction`, and `input` after a blank line when it is not empty) and the
/// assistant turn (`output`).
fn alpaca(obj: &serde_json::Map<String, Value>) -> std::result::Result<Vec<ChatMessage>, String> {
    let text = |name: &str| -> std::result::Result<Option<&str>, String> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("`{name}` is not a string")),
        }
    };
    let instruction = text("instruction")?.ok_or("`instruction` is missing")?;
    let output = text("output")?.ok_or("`output` is missing (an Alpaca row needs `instruction` and `output`)")?;
    let mut messages = Vec::new();
    if let Some(system) = text("system")?.filter(|s| !s.is_empty()) {
        messages.push(ChatMessage::new("system", system));
    }
    if let Some(history) = obj.get("history").filter(|h| !h.is_null()) {
        let pairs: Vec<(String, String)> =
            serde_json::from_value(history.clone()).map_err(|e| format!("`history` (pairs of strings): {e}"))?;
        for (user, assistant) in pairs {
            messages.push(ChatMessage::new("user", &user));
            messages.push(ChatMessage::new("assistant", &assistant));
        }
    }
    let user = match text("input")?.filter(|s| !s.trim().is_empty()) {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction.to_owned(),
    };
    messages.push(ChatMessage::new("user", &user));
    messages.push(ChatMessage::new("assistant", output));
    Ok(messages)
}

/// A parser of one row: what it makes, and the format it was written in.
pub type RowParser<'a, T> = &'a dyn Fn(&Value) -> std::result::Result<(T, DataFormat), String>;

/// Rows of one file being read: what they made, the formats seen, bad rows.
struct Rows<'a, T> {
    file: &'a Path,
    unit: &'static str,
    strict: bool,
    items: Vec<T>,
    format: Option<DataFormat>,
    report: DataReport,
}

impl<'a, T> Rows<'a, T> {
    fn new(file: &'a Path, unit: &'static str, strict: bool) -> Self {
        Self { file, unit, strict, items: Vec::new(), format: None, report: DataReport::empty(1) }
    }

    /// Take row `number` (from 1), parsed or not.
    fn push(&mut self, number: usize, parsed: std::result::Result<(T, DataFormat), String>) -> Result<()> {
        match parsed {
            Ok((item, format)) => {
                self.format = Some(self.format.map_or(format, |f| f.join(format)));
                self.items.push(item);
            }
            Err(reason) => {
                let bad = BadRow { file: self.file.display().to_string(), unit: self.unit.into(), number, reason };
                if self.strict {
                    return Err(Error::Invalid(bad.to_string()));
                }
                self.report.malformed += 1;
                if self.report.malformed_rows.len() < LISTED_BAD_ROWS {
                    self.report.malformed_rows.push(bad);
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> (Vec<T>, DataReport) {
        self.report.examples = self.items.len();
        self.report.format = self.format.unwrap_or(DataFormat::Text);
        if self.report.malformed > 0 {
            tracing::warn!("{}: skipped {} malformed {}s", self.file.display(), self.report.malformed, self.unit);
        }
        (self.items, self.report)
    }
}

/// The files rows are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFile {
    /// One object per line, blank lines ignored.
    Jsonl,
    /// An array of objects (or, as some datasets name their JSONL files, one object per
    /// line).
    Json,
    /// One object per row, its columns as the fields.
    Parquet,
}

/// Read every row of `path` with `parse`. Bad rows are skipped and reported (with `strict`,
/// the first is an error naming the file and the line or row).
pub fn read_rows<T>(path: &Path, file: RowFile, strict: bool, parse: RowParser<T>) -> Result<(Vec<T>, DataReport)> {
    match file {
        RowFile::Jsonl => read_jsonl(path, strict, parse),
        RowFile::Json => read_json(path, strict, parse),
        RowFile::Parquet => read_parquet(path, strict, parse),
    }
}

fn read_jsonl<T>(path: &Path, strict: bool, parse: RowParser<T>) -> Result<(Vec<T>, DataReport)> {
    let text = crate::error::read_to_string(path)?;
    let mut rows = Rows::new(path, "line", strict);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line).map_err(|e| e.to_string()).and_then(|v| parse(&v));
        rows.push(i + 1, parsed)?;
    }
    Ok(rows.finish())
}

fn read_json<T>(path: &Path, strict: bool, parse: RowParser<T>) -> Result<(Vec<T>, DataReport)> {
    let text = crate::error::read_to_string(path)?;
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        // Not one JSON document: JSON Lines under a .json name.
        Err(_) if text.lines().filter(|l| !l.trim().is_empty()).count() > 1 => {
            return read_jsonl(path, strict, parse);
        }
        Err(e) => return Err(Error::Invalid(format!("{}: not valid JSON: {e}", path.display()))),
    };
    let Value::Array(items) = value else {
        return Err(Error::Invalid(format!(
            "{}: expected a JSON array of examples (one object per example), found {}",
            path.display(),
            kind_of(&value)
        )));
    };
    let mut rows = Rows::new(path, "row", strict);
    for (i, item) in items.iter().enumerate() {
        rows.push(i + 1, parse(item))?;
    }
    Ok(rows.finish())
}

fn read_parquet<T>(path: &Path, strict: bool, parse: RowParser<T>) -> Result<(Vec<T>, DataReport)> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| {
        Error::Invalid(format!("{}: not a readable Parquet file: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let mut rows = Rows::new(path, "row", strict);
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(bad)?;
        rows.push(i + 1, parse(&row.to_json_value()))?;
    }
    Ok(rows.finish())
}

/// The questions a conversation asks: the conversation up to each assistant turn that
/// follows something, and the whole of it when it ends with a user turn.
pub fn conversation_questions(messages: Vec<ChatMessage>) -> Vec<Vec<ChatMessage>> {
    let mut out: Vec<Vec<ChatMessage>> =
        (1..messages.len()).filter(|&i| messages[i].role == "assistant").map(|i| messages[..i].to_vec()).collect();
    if messages.last().is_some_and(|m| m.role == "user") {
        out.push(messages);
    }
    out
}

/// The questions of one row, for chat distillation: a conversation up to each of its
/// assistant turns (or the whole of it when it ends with a user turn), an Alpaca
/// instruction, or a `prompt`, as a user turn. Rows with no question (`text`, token ids)
/// give none.
pub fn parse_questions(v: &Value) -> std::result::Result<(Vec<Vec<ChatMessage>>, DataFormat), String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(messages) = obj.get("messages") {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(messages.clone()).map_err(|e| format!("`messages`: {e}"))?;
        return Ok((conversation_questions(messages), DataFormat::Chat));
    }
    if let Some(turns) = obj.get("conversations") {
        return Ok((conversation_questions(sharegpt(turns, obj.get("system"))?), DataFormat::ShareGpt));
    }
    if obj.contains_key("instruction") {
        let mut with_answer = obj.clone();
        with_answer.entry("output").or_insert_with(|| Value::String(String::new()));
        let mut messages = alpaca(&with_answer)?;
        messages.pop();
        return Ok((vec![messages], DataFormat::Alpaca));
    }
    if let Some(Value::String(p)) = obj.get("prompt") {
        return Ok((vec![vec![ChatMessage::new("user", p)]], DataFormat::PromptCompletion));
    }
    parse_row(v).map(|(_, format)| (Vec::new(), format))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "an object",
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(ex: &Example) -> Vec<(String, String)> {
        match ex {
            Example::Chat { messages } => messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect(),
            other => panic!("not a chat example: {other:?}"),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn alpaca_rows_become_conversations() -> std::result::Result<(), String> {
        let (ex, f) = parse_row(&json!({"instruction": "Add.", "input": "2 and 3", "output": "5"}))?;
        assert_eq!(f, DataFormat::Alpaca);
        assert_eq!(messages(&ex), pairs(&[("user", "Add.\n\n2 and 3"), ("assistant", "5")]));
        let (ex, _) = parse_row(&json!({"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief",
            "history": [["a", "b"]]}))?;
        assert_eq!(
            messages(&ex),
            pairs(&[("system", "Be brief"), ("user", "a"), ("assistant", "b"), ("user", "Hi"), ("assistant", "Hello")])
        );
        Ok(())
    }

    #[test]
    fn alpaca_without_output_is_a_bad_row() {
        let err = parse_row(&json!({"instruction": "no output"})).expect_err("no output");
        assert!(err.contains("output"), "{err}");
        assert!(parse_row(&json!({"instruction": 3, "output": "x"})).is_err());
    }

    #[test]
    fn sharegpt_rows_become_conversations() -> std::result::Result<(), String> {
        let row = json!({"system": "S", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"}]});
        let (ex, f) = parse_row(&row)?;
        assert_eq!(f, DataFormat::ShareGpt);
        assert_eq!(
            messages(&ex),
            pairs(&[("system", "S"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")])
        );
        for bad in [
            json!({"conversations": [{"from": "human", "value": "q"}]}),
            json!({"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "a"}]}),
            json!({"conversations": "nope"}),
            json!({"conversations": [{"from": "human"}]}),
        ] {
            assert!(parse_row(&bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
