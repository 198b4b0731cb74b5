//! The Data view: pick a dataset (JSONL, text file, folder, or a built-in set), see its
//! format, counts and malformed lines, and a few examples exactly as trained: prompt and
//! response in different colours and the mask blocks drawn between tokens.

use super::{busy_line, theme};
use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};
use crate::worker::Job;

/// Draw the Data view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Data");
    ui.horizontal(|ui| {
        let label = ui.label("Dataset").on_hover_text(
            "JSONL or a JSON array (messages, ShareGPT, Alpaca, prompt + completion, or text), Parquet, a text \
             file, a folder, a hub dataset owner/name[@revision], or builtin:NAME[:COUNT]",
        );
        ui.add(egui::TextEdit::singleline(&mut p.data.source).desired_width(320.0)).labelled_by(label.id);
        if ui.button("File…").on_hover_text("A .jsonl, .json, .parquet or text file").clicked() {
            commands.push(Command::Pick(Pick::DataFile));
        }
        if ui.button("Folder…").on_hover_text("A folder of text or source files").clicked() {
            commands.push(Command::Pick(Pick::DataFolder));
        }
        let builtin = egui::ComboBox::from_id_salt("builtin").selected_text("Built-in").show_ui(ui, |ui| {
            for (name, tip) in [
                ("builtin:arith", "arithmetic word problems with worked solutions"),
                ("builtin:code", "small Python functions"),
            ] {
                if ui.selectable_label(p.data.source == name, name).on_hover_text(tip).clicked() {
                    p.data.source = name.into();
                    commands.push(Command::PreviewData);
                }
            }
        });
        builtin.response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Built-in dataset"));
    });
    ui.horizontal(|ui| {
        ui.checkbox(&mut p.data.strict, "Strict")
            .on_hover_text("Fail on the first malformed line instead of skipping it");
        if ui.add_enabled(rt.job != Some(Job::Data), egui::Button::new("Preview")).clicked() {
            commands.push(Command::PreviewData);
        }
        busy_line(ui, rt, Job::Data);
    });
    ui.horizontal(|ui| {
        let tip = "Record the loaded model's own greedy continuations of prompts cut from this dataset, \
                   and make that file the dataset. Speculative decoding accepts a draft only when it equals \
                   the model's own choice, so masks trained on what the model writes are accepted more often \
                   than masks trained on text it only read.";
        let ready = !rt.busy() && rt.model.is_some();
        if ui.add_enabled(ready, egui::Button::new("Self-distill")).on_hover_text(tip).clicked() {
            commands.push(Command::Distill);
        }
        let label = ui.label("sequences").on_hover_text("Prompts to continue");
        ui.add(super::drag_usize(&mut p.data.distill_sequences, 1..=1_000_000)).labelled_by(label.id);
        let label =
            ui.label("new tokens").on_hover_text("Greedy tokens per prompt (fewer when the model ends the text)");
        ui.add(super::drag_usize(&mut p.data.distill_new_tokens, 1..=4096)).labelled_by(label.id);
        let has_template = rt.model.as_ref().is_some_and(|m| m.chat_template);
        ui.add_enabled(has_template, egui::Checkbox::new(&mut p.data.distill_chat, "chat")).on_hover_text(
            "An instruct model: take the dataset's questions (conversations up to each assistant turn, \
             Alpaca instructions, prompts) through the model's chat template and record each answer to its \
             end-of-turn token, as the model is used",
        );
        busy_line(ui, rt, Job::Distill);
    });
    ui.separator();
    let Some(d) = &rt.data else {
        ui.label("Pick a dataset and press Preview.");
        return;
    };
    let r = &d.report;
    // A built-in set is read from no file: no count of them.
    let files = if r.files == 0 { String::new() } else { format!(" · {}", crate::counted(r.files, "file", "files")) };
    ui.label(format!(
        "Format: {} · {}{files} · {}",
        r.format,
        crate::counted(r.examples, "example", "examples"),
        crate::counted(r.malformed, "malformed row", "malformed rows")
    ));
    for bad in &r.malformed_rows {
        ui.colored_label(theme::ERROR, bad.to_string());
    }
    if d.examples.is_empty() {
        ui.label("Load a model to see examples formatted with its tokenizer and chat template.");
        return;
    }
    let k = p.train.recipe.method.k;
    ui.horizontal(|ui| {
        ui.colored_label(theme::PROMPT, "prompt / context");
        ui.colored_label(theme::RESPONSE, "response / target");
        mask_block(ui, k);
        ui.colored_label(theme::MASK, format!("block of k = {k} masks (set k in Train)"));
    });
    for (n, example) in d.examples.iter().enumerate() {
        ui.separator();
        ui.strong(format!("Example {}", n + 1));
        let example = match example {
            Ok(tokens) => tokens,
            Err(e) => {
                ui.colored_label(theme::ERROR, format!("cannot be trained on with this model: {e}"));
                continue;
            }
        };
        ui.horizontal_wrapped(|ui| {
            ui.spacing_mut().item_spacing.x = 0.0;
            for t in example {
                let colour = if t.target { theme::RESPONSE } else { theme::PROMPT };
                super::token_run(ui, &t.text, |r| r.monospace().color(colour), &format!("{:?}", t.text));
                if t.masks_after {
                    mask_block(ui, k)
                        .on_hover_text(format!("{k} mask tokens here in training: they learn the next {k} tokens"));
                }
            }
        });
    }
}

/// A block of `k` masks: `k` thin bars between two tokens.
fn mask_block(ui: &mut egui::Ui, k: usize) -> egui::Response {
    let bar = 2.0;
    let gap = 1.0;
    let width = k as f32 * (bar + gap) + 2.0;
    let (rect, response) = ui.allocate_exact_size(egui::vec2(width, 12.0), egui::Sense::hover());
    for j in 0..k {
        let x = rect.min.x + 1.0 + j as f32 * (bar + gap);
        let r = egui::Rect::from_min_size(egui::pos2(x, rect.min.y + 1.0), egui::vec2(bar, rect.height() - 2.0));
        ui.painter().rect_filled(r, 0.0, theme::MASK);
    }
    response
}
