//! The Step view: quadratic decoding one forward pass at a time on the loaded model: the
//! (k+1)^2 input layout, the attention pattern, each row's top-5, and what was accepted
//! and why.

use super::theme;
use crate::app::Command;
use crate::state::{Persisted, Runtime};
use crate::worker::{Job, StepView};

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
        ui.label(format!(
            "Prefill done: first token {:?}; first drafts {:?}. Press Next step.",
            view.next_text, view.next_drafts_text
        ));
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
            "draft {} {:?} vs the model's choice after row r{g} {:?}: {}",
            g + 1,
            d,
            top,
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
    ui.label(format!(
        "Emitted {} token(s): {} accepted draft(s) + the model's own next token {:?}. Next drafts: {:?}",
        v.accepted + 1,
        v.accepted,
        v.next_text,
        v.next_drafts_text
    ));
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
    ui.strong("Attention among the step's rows (every row also sees the whole cache)");
    let cell = (ui.available_width().min(420.0) / n.max(1) as f32).clamp(4.0, 18.0);
    let (rect, response) = ui.allocate_exact_size(egui::vec2(cell * n as f32, cell * n as f32), egui::Sense::hover());
    let painter = ui.painter_at(rect);
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
    if let Some(pos) = response.hover_pos() {
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
        egui::Grid::new("regular-top").striped(true).show(&mut cols[0], |ui| {
            for (g, c) in d.regular_top.iter().enumerate() {
                ui.label(format!("r{g}"));
                for (i, p) in c.probs.iter().enumerate() {
                    let t = v.regular_top_text.get(g).and_then(|t| t.get(i)).cloned().unwrap_or_default();
                    ui.label(format!("{:?} {:.2}", t, p));
                }
                ui.end_row();
            }
        });
        cols[1].strong("Top-5 of each mask slot after the last accepted row (the next drafts)");
        egui::Grid::new("draft-top").striped(true).show(&mut cols[1], |ui| {
            for (j, c) in d.draft_top.iter().enumerate() {
                ui.colored_label(theme::slot(j + 1), format!("m{}", j + 1));
                for (i, p) in c.probs.iter().enumerate() {
                    let t = v.draft_top_text.get(j).and_then(|t| t.get(i)).cloned().unwrap_or_default();
                    ui.label(format!("{:?} {:.2}", t, p));
                }
                ui.end_row();
            }
        });
    });
}
