//! The Step view: quadratic decoding one forward pass at a time on the loaded model: the
//! (k+1)^2 input layout, the attention pattern, each row's top-5, and what was accepted
//! and why.

use super::theme;
use crate::app::Command;
use crate::state::{Persisted, Runtime};
use crate::worker::{Job, StepView};
use mtp_core::decode::speculative::Candidates;

/// Draw the Step view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Step through quadratic decoding");
    let k = rt.adapter.as_ref().map_or(0, |a| a.config.k);
    super::named(
        ui.add(egui::TextEdit::multiline(&mut p.step.prompt).desired_rows(2).desired_width(f32::INFINITY)),
        egui::Role::MultilineTextInput,
        "Prompt",
    );
    ui.horizontal(|ui| {
        let label = ui.label("masks");
        ui.add(egui::DragValue::new(&mut p.step.masks).range(1..=k.max(1)))
            .labelled_by(label.id)
            .on_hover_text("k per step: the input has (k+1)^2 rows");
        let why = super::not_ready(rt, true);
        if ui
            .add_enabled(why.is_none(), egui::Button::new("Start"))
            .on_hover_text("Prefill the prompt and one mask block")
            .on_disabled_hover_text(why.unwrap_or_default())
            .clicked()
        {
            commands.push(Command::StartStep);
        }
        let stepping = rt.job == Some(Job::Step) && !rt.steps.is_empty();
        if ui.add_enabled(stepping, egui::Button::new("Next step")).on_hover_text("One forward pass").clicked() {
            commands.push(Command::NextStep);
        }
        super::adapter_line(ui, rt);
    });
    let Some(view) = rt.steps.last() else {
        ui.label("Press Start.");
        return;
    };
    ui.separator();
    ui.label(egui::RichText::new(format!("Generated: {}", view.generated)).monospace());
    let accepted: usize = rt.steps.iter().skip(1).map(|s| s.accepted + 1).sum();
    ui.label(format!(
        "{} so far, {} after the first: {:.2} tokens per forward",
        crate::counted(rt.steps.len() - 1, "step", "steps"),
        crate::counted(accepted, "token", "tokens"),
        if rt.steps.len() > 1 { accepted as f64 / (rt.steps.len() - 1) as f64 } else { 0.0 }
    ));
    if view.step == 0 {
        let drafts = if view.next_drafts_text.is_empty() {
            "no drafts".to_string()
        } else {
            format!("the mask block after the prompt drafts {}", tokens(&view.next_drafts_text))
        };
        ui.label(format!(
            "Prefill done: the first token is {}, from the prompt's last row; {drafts}. Press Next step.",
            shown(&view.next_text)
        ));
        slot_top(ui, view, &view.prefill_top, "Top-5 of each mask slot after the prompt (the first drafts)");
        return;
    }
    verdict(ui, view);
    ui.separator();
    ui.columns(2, |cols| {
        layout_table(&mut cols[0], view);
        attention_grid(&mut cols[1], view);
    });
    ui.separator();
    candidates(ui, view);
}

fn verdict(ui: &mut egui::Ui, v: &StepView) {
    ui.heading(format!("Step {}", v.step));
    for (g, d) in v.drafts_text.iter().enumerate() {
        let top = v.regular_top_text.get(g).and_then(|c| c.first()).cloned().unwrap_or_default();
        let ok = g < v.accepted;
        let text = format!(
            "draft {} {} vs the model's choice after row r{g} {}: {}",
            g + 1,
            shown(d),
            shown(&top),
            if ok {
                "accepted"
            } else if g == v.accepted {
                "rejected (first mismatch)"
            } else {
                "discarded"
            }
        );
        ui.colored_label(if ok { theme::slot(g + 1) } else { theme::REJECTED }, text);
    }
    let next = if v.next_drafts_text.is_empty() { "none".to_string() } else { tokens(&v.next_drafts_text) };
    ui.label(format!(
        "Emitted {}: {} + the model's own next token {}. Next drafts: {next}",
        crate::counted(v.accepted + 1, "token", "tokens"),
        crate::counted(v.accepted, "accepted draft", "accepted drafts"),
        shown(&v.next_text),
    ));
}

/// A token as the step view writes it: control characters escaped, spaces as · (a leading
/// space is part of the token).
fn shown(text: &str) -> String {
    super::token_text(text).replace(' ', "·")
}

/// Tokens as a list.
fn tokens(texts: &[String]) -> String {
    texts.iter().map(|t| shown(t)).collect::<Vec<_>>().join(" ")
}

fn layout_table(ui: &mut egui::Ui, v: &StepView) {
    let Some(d) = &v.detail else { return };
    ui.strong(format!("Input: {} rows after {} cached", d.inputs.len(), d.past));
    egui::Grid::new("step-layout").num_columns(4).striped(true).show(ui, |ui| {
        for h in ["row", "input", "block g / slot j", "position"] {
            ui.strong(h);
        }
        ui.end_row();
        for r in 0..d.inputs.len() {
            ui.label(r.to_string());
            let text = super::token_text(v.input_text.get(r).map_or("", String::as_str));
            let colour = if d.slot[r] > 0 { theme::MASK } else { theme::VERIFIED };
            ui.label(egui::RichText::new(text).monospace().color(colour));
            ui.label(format!("{} / {}", d.block[r], d.slot[r]));
            ui.label(d.positions[r].to_string());
            ui.end_row();
        }
    });
}

fn attention_grid(ui: &mut egui::Ui, v: &StepView) {
    let Some(d) = &v.detail else { return };
    let n = d.attention.len();
    ui.strong("Attention among the step's rows (row attends column; every row also sees the whole cache)");
    // Row numbers down the left, column numbers along the top (every one where they fit,
    // else every fifth), in a margin of the grid's own.
    let margin = 18.0;
    let cell = ((ui.available_width().min(420.0) - margin) / n.max(1) as f32).clamp(4.0, 18.0);
    let side = margin + cell * n as f32;
    let (outer, response) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
    let rect = egui::Rect::from_min_max(outer.min + egui::vec2(margin, margin), outer.max);
    let painter = ui.painter_at(outer);
    let every = if cell >= 12.0 { 1 } else { 5 };
    let font = egui::FontId::monospace(9.0);
    let ink = ui.visuals().weak_text_color();
    for i in (0..n).step_by(every) {
        let mid = (i as f32 + 0.5) * cell - 0.5;
        let left = egui::pos2(outer.min.x + margin - 3.0, rect.min.y + mid);
        painter.text(left, egui::Align2::RIGHT_CENTER, i.to_string(), font.clone(), ink);
        let top = egui::pos2(rect.min.x + mid, outer.min.y + margin - 2.0);
        painter.text(top, egui::Align2::CENTER_BOTTOM, i.to_string(), font.clone(), ink);
    }
    for (r, row) in d.attention.iter().enumerate() {
        for (c, &on) in row.iter().enumerate() {
            let min = rect.min + egui::vec2(c as f32 * cell, r as f32 * cell);
            let cell_rect = egui::Rect::from_min_size(min, egui::vec2(cell - 1.0, cell - 1.0));
            let colour = match (on, d.slot[r] > 0) {
                (false, _) => egui::Color32::from_gray(40),
                (true, true) => theme::MASK,
                (true, false) => theme::VERIFIED,
            };
            painter.rect_filled(cell_rect, 0.0, colour);
        }
    }
    if let Some(pos) = response.hover_pos().filter(|p| rect.contains(*p)) {
        let (c, r) = (((pos.x - rect.min.x) / cell) as usize, ((pos.y - rect.min.y) / cell) as usize);
        if r < n && c < n {
            response.on_hover_text(format!(
                "row {r} {} row {c}",
                if d.attention[r][c] { "attends" } else { "does not attend" }
            ));
        }
    }
}

fn candidates(ui: &mut egui::Ui, v: &StepView) {
    let Some(d) = &v.detail else { return };
    ui.columns(2, |cols| {
        cols[0].strong("Model's top-5 after each regular row (verification)");
        // A narrow window scrolls the lists rather than cutting them.
        egui::ScrollArea::horizontal().id_salt("regular-top-scroll").show(&mut cols[0], |ui| {
            egui::Grid::new("regular-top").striped(true).show(ui, |ui| {
                for (g, c) in d.regular_top.iter().enumerate() {
                    ui.label(format!("r{g}"));
                    for (i, p) in c.probs.iter().enumerate() {
                        let t = v.regular_top_text.get(g).and_then(|t| t.get(i)).cloned().unwrap_or_default();
                        ui.label(format!("{} {:.2}", shown(&t), p));
                    }
                    ui.end_row();
                }
            });
        });
        slot_top(
            &mut cols[1],
            v,
            &d.draft_top,
            "Top-5 of each mask slot after the last accepted row (the next drafts)",
        );
    });
}

/// Each mask slot's top-5 candidates (`top`, their texts in the view's `draft_top_text`)
/// under a heading.
fn slot_top(ui: &mut egui::Ui, v: &StepView, top: &[Candidates], heading: &str) {
    if top.is_empty() {
        return;
    }
    ui.strong(heading);
    egui::ScrollArea::horizontal().id_salt("draft-top-scroll").show(ui, |ui| {
        egui::Grid::new("draft-top").striped(true).show(ui, |ui| {
            for (j, c) in top.iter().enumerate() {
                ui.colored_label(theme::slot(j + 1), format!("m{}", j + 1));
                for (i, p) in c.probs.iter().enumerate() {
                    let t = v.draft_top_text.get(j).and_then(|t| t.get(i)).cloned().unwrap_or_default();
                    ui.label(format!("{} {:.2}", shown(&t), p));
                }
                ui.end_row();
            }
        });
    });
}
