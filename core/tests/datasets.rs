//! The dataset formats users bring: Alpaca and ShareGPT rows in JSONL, JSON arrays and
//! Parquet files, and a dataset repository from the Hugging Face cache (its train split),
//! each detected on its own, with bad rows counted and named by file and row.

use std::path::Path;
use std::sync::Arc;

use mtp_core::source::HubOptions;
use mtp_core::train::data::{DataFormat, DataSource, Example, read_examples};

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    Ok(std::fs::write(path, text)?)
}

/// A Parquet file (snappy pages) with string columns `names` and one row per entry of `rows`.
fn write_parquet(path: &Path, names: &[&str], rows: &[Vec<&str>]) -> anyhow::Result<()> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: Vec<String> = names.iter().map(|n| format!("REQUIRED BYTE_ARRAY {n} (UTF8);")).collect();
    let schema =
        Arc::new(parquet::schema::parser::parse_message_type(&format!("message rows {{ {} }}", fields.join(" ")))?);
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path)?, schema, props)?;
    let mut group = writer.next_row_group()?;
    let mut column = 0;
    while let Some(mut col) = group.next_column()? {
        let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r[column])).collect();
        col.typed::<ByteArrayType>().write_batch(&values, None, None)?;
        col.close()?;
        column += 1;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}

fn roles(ex: &Example) -> Vec<String> {
    match ex {
        Example::Chat { messages } => messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect(),
        other => vec![format!("{other:?}")],
    }
}

#[test]
fn alpaca_json_array_is_detected_and_read_as_chat() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("alpaca.json");
    write(
        &path,
        r#"[{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Broken: no output"}]"#,
    )?;
    let source: DataSource = path.to_string_lossy().parse()?;
    assert_eq!(source, DataSource::Json { path: path.clone() });
    let (examples, report) = read_examples(&source, false)?;
    assert_eq!((report.format, report.examples, report.malformed), (DataFormat::Alpaca, 2, 1));
    assert_eq!(roles(&examples[0]), ["user: Add the numbers.\n\n2, 3", "assistant: 5"]);
    let bad = &report.malformed_rows[0];
    assert_eq!((bad.unit.as_str(), bad.number), ("row", 3));
    assert!(bad.to_string().contains("alpaca.json: row 3") && bad.reason.contains("output"), "{bad}");
    let err = read_examples(&source, true).expect_err("strict").to_string();
    assert!(err.contains("alpaca.json: row 3"), "{err}");
    // The same rows as JSONL (an Alpaca .jsonl used to be refused line by line).
    let jsonl = dir.path().join("alpaca.jsonl");
    write(
        &jsonl,
        "{\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}\n{\"instruction\": \"Q\", \"output\": \"A\"}\n",
    )?;
    let (examples, report) = read_examples(&jsonl.to_string_lossy().parse()?, true)?;
    assert_eq!((report.format, examples.len()), (DataFormat::Alpaca, 2));
    // A JSON file that is not an array says so.
    let object = dir.path().join("object.json");
    write(&object, r#"{"instruction": "x", "output": "y"}"#)?;
    let err = read_examples(&DataSource::Json { path: object }, false).expect_err("object").to_string();
    assert!(err.contains("object.json") && err.contains("JSON array"), "{err}");
    Ok(())
}

#[test]
fn sharegpt_jsonl_is_detected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("chats.jsonl");
    write(
        &path,
        concat!(
            r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]}"#,
            "\n",
            r#"{"conversations": [{"from": "observation", "value": "x"}]}"#,
            "\n"
        ),
    )?;
    let (examples, report) = read_examples(&path.to_string_lossy().parse()?, false)?;
    assert_eq!((report.format, report.examples, report.malformed), (DataFormat::ShareGpt, 2, 1));
    assert_eq!(roles(&examples[0]), ["system: Be brief.", "user: Hi", "assistant: Hello"]);
    assert_eq!(roles(&examples[1]).len(), 4);
    assert_eq!((report.malformed_rows[0].unit.as_str(), report.malformed_rows[0].number), ("line", 3));
    Ok(())
}

#[test]
fn parquet_rows_are_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("train-00000-of-00001.parquet");
    write_parquet(
        &path,
        &["instruction", "input", "output"],
        &[vec!["Add.", "1 and 2", "3"], vec!["Greet.", "", "Hello"], vec!["", "", ""]],
    )?;
    let source: DataSource = path.to_string_lossy().parse()?;
    assert_eq!(source, DataSource::Parquet { path: path.clone() });
    let (examples, report) = read_examples(&source, false)?;
    assert_eq!((report.format, report.examples), (DataFormat::Alpaca, 3));
    assert_eq!(roles(&examples[1]), ["user: Greet.", "assistant: Hello"]);
    let garbage = dir.path().join("garbage.parquet");
    write(&garbage, "not parquet at all")?;
    let err = read_examples(&DataSource::Parquet { path: garbage }, false).expect_err("garbage").to_string();
    assert!(err.contains("garbage.parquet") && err.contains("Parquet"), "{err}");
    Ok(())
}

/// A dataset repository laid out in a cache folder as the hub's libraries leave it:
/// `datasets--owner--name/refs/main` naming a snapshot with a train and a test file.
#[test]
fn hub_dataset_resolves_its_train_split_from_the_cache() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let repo = cache.path().join("datasets--someone--tiny-alpaca");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    write(&repo.join("refs").join("main"), commit)?;
    write_parquet(
        &snapshot.join("train-00000-of-00001.parquet"),
        &["instruction", "output"],
        &[vec!["Q1", "A1"], vec!["Q2", "A2"]],
    )?;
    write_parquet(&snapshot.join("test-00000-of-00001.parquet"), &["instruction", "output"], &[vec!["T", "X"]])?;
    let source: DataSource = "someone/tiny-alpaca".parse()?;
    assert_eq!(source, DataSource::Hub { repo_id: "someone/tiny-alpaca".into(), revision: "main".into() });
    assert_eq!(source.to_string(), "someone/tiny-alpaca");
    let hub = HubOptions { cache_dir: cache.path().to_owned(), offline: true };
    let local = source.resolve(&hub, &mut ())?;
    let DataSource::Parquet { path } = &local else { anyhow::bail!("resolved to {local:?}") };
    assert!(path.ends_with("data/train-00000-of-00001.parquet"), "{}", path.display());
    let (examples, report) = read_examples(&local, true)?;
    assert_eq!((report.format, examples.len()), (DataFormat::Alpaca, 2));
    // Another revision is not in the cache, and offline that is a clear error.
    let other: DataSource = "someone/tiny-alpaca@v2".parse()?;
    let err = other.resolve(&hub, &mut ()).expect_err("not cached").to_string();
    assert!(err.contains("someone/tiny-alpaca") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // A missing local file with a data extension stays a missing file, not a repo id.
    let missing = "no/such.jsonl".parse::<DataSource>().expect_err("missing").to_string();
    assert!(missing.contains("such.jsonl"), "{missing}");
    Ok(())
}

/// A run renders its conversations with its recipe's template variables, whatever the model
/// was loaded with (a resumed run renders as it started): the model's template writes the
/// variable into every prompt, and the training sequences hold what the recipe gave it.
#[test]
fn training_renders_conversations_with_its_recipes_template_variables() -> anyhow::Result<()> {
    use mtp_core::train::trainer::{TrainConfig, prepare_data};
    use mtp_core::{LoadOptions, LoadedModel, TemplateVars};
    let dir = tempfile::tempdir()?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    for entry in std::fs::read_dir(&fixture)? {
        let entry = entry?;
        std::fs::copy(entry.path(), model.join(entry.file_name()))?;
    }
    write(
        &model.join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'user' %}[{{ marker | default('none') }}] {{ m.content }}\n\
         {% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}",
    )?;
    let data = dir.path().join("chat.jsonl");
    let line =
        r#"{"messages": [{"role": "user", "content": "add two and two"}, {"role": "assistant", "content": "four"}]}"#;
    write(&data, &format!("{line}\n").repeat(8))?;
    let plain = LoadedModel::from_folder(&model, &LoadOptions::default())?;
    let marker = |m: &str| TemplateVars::from([("marker".to_string(), serde_json::Value::from(m))]);
    let with_vars =
        LoadedModel::from_folder(&model, &LoadOptions { template_vars: marker("loaded"), ..Default::default() })?;
    let rendered = |loaded: &LoadedModel, vars: TemplateVars| -> anyhow::Result<String> {
        let config = TrainConfig {
            data: data.display().to_string().parse()?,
            chat_template_vars: vars,
            training: mtp_core::train::LoopConfig { seq_len: 32, val_fraction: 0.0, ..Default::default() },
            ..TrainConfig::default()
        };
        let prepared = prepare_data(&config, loaded)?;
        let first = prepared.train.first().map(|t| t.ids.clone()).unwrap_or_default();
        Ok(loaded.tokenizer.decode(&first, false)?)
    };
    assert!(rendered(&plain, marker("zz"))?.contains("[zz] add two and two"), "the recipe's variable");
    assert!(rendered(&plain, TemplateVars::new())?.contains("[none] add two and two"), "no variable");
    // A model loaded with other variables (a run resumed in the window) renders the recipe's.
    assert!(rendered(&with_vars, TemplateVars::new())?.contains("[none] add two and two"), "the recipe's: none");
    assert!(rendered(&with_vars, marker("zz"))?.contains("[zz] add two and two"), "the recipe's, not the model's");
    assert!(rendered(&with_vars, marker("loaded"))?.contains("[loaded] add two and two"), "the same");
    assert!(plain.tokenizer.template_vars().is_empty() && with_vars.tokenizer.template_vars() == &marker("loaded"));
    Ok(())
}
