//! The Probe view: the paper's Figure 1 on your model: for a prompt and its true
//! continuation, the rank of each future token at each mask slot before tuning, after
//! tuning, and after the sampler.

use egui_plot::{Bar, BarChart, Legend, Plot};

use super::{busy_line, theme};
use crate::app::Command;
use crate::state::{Persisted, Runtime};
use crate::worker::Job;

/// Draw the Probe view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Probe: does the model know the future?");
    let label = ui.label("Prompt");
    ui.add(egui::TextEdit::multiline(&mut p.probe.prompt).desired_rows(2).desired_width(f32::INFINITY))
        .labelled_by(label.id);
    let label = ui.label("True continuation").on_hover_text("The tokens the masks should predict");
    ui.add(egui::TextEdit::multiline(&mut p.probe.continuation).desired_rows(2).desired_width(f32::INFINITY))
        .labelled_by(label.id);
    ui.horizontal(|ui| {
        let why = super::not_ready(rt, true);
        let run = ui.add_enabled(why.is_none(), egui::Button::new("Run probe"));
        if run.on_disabled_hover_text(why.unwrap_or_default()).clicked() {
            commands.push(Command::StartProbe);
        }
        super::adapter_line(ui, rt);
        busy_line(ui, rt, Job::Probe);
    });
    let (prompt, continuation) = (&p.probe.prompt, &p.probe.continuation);
    if !continuation.is_empty()
        && !continuation.starts_with(char::is_whitespace)
        && !prompt.ends_with(char::is_whitespace)
    {
        ui.weak("The continuation follows the prompt directly: start it with a space if it begins a new word.");
    }
    let Some((report, texts)) = &rt.probe else { return };
    ui.separator();
    super::measured_with(ui, rt.probe_adapter.as_deref());
    let k = rt.adapter.as_ref().map_or(0, |a| a.config.k);
    let probed = report.slots.len().saturating_sub(1);
    if probed < k {
        ui.weak(format!(
            "The continuation has {} tokens: it covers {probed} of the adapter's {k} mask slots (one more token each).",
            report.continuation_ids.len()
        ));
    }
    egui::Grid::new("probe").striped(true).show(ui, |ui| {
        for h in ["position", "true token", "base + placeholders", "tuned", "tuned + sampler"] {
            ui.strong(h);
        }
        ui.end_row();
        for (s, t) in report.slots.iter().zip(texts) {
            ui.label(if s.slot == 0 {
                "next token".to_string()
            } else {
                format!("mask {} (token +{})", s.slot, s.slot + 1)
            });
            ui.label(egui::RichText::new(format!("{t:?}")).monospace());
            ui.label(s.rank_base.to_string());
            ui.label(s.rank_tuned.to_string());
            ui.label(s.rank_sampler.map_or("-".into(), |r| r.to_string()));
            ui.end_row();
        }
    });
    // log10(rank) per slot: lower is better; rank 1 is 0, drawn as a sliver so that the
    // best result does not read as a missing one.
    let bars = |f: &dyn Fn(&mtp_core::mtp::probe::SlotRank) -> Option<usize>, offset: f64| -> Vec<Bar> {
        report
            .slots
            .iter()
            .filter_map(|s| {
                f(s).map(|r| {
                    Bar::new(s.slot as f64 + offset, (r as f64).log10().max(0.03)).width(0.25).name(format!("rank {r}"))
                })
            })
            .collect()
    };
    Plot::new("probe-ranks")
        // Top left: the next token's bars are short (it is the model's own prediction).
        .legend(Legend::default().position(egui_plot::Corner::LeftTop))
        .height(220.0)
        .x_axis_label("slot (0 = next token)")
        .y_axis_label("log10 rank (0: rank 1, the best)")
        .show(ui, |pu| {
            pu.bar_chart(
                BarChart::new("base + placeholders", bars(&|s| Some(s.rank_base), -0.27)).color(theme::series(1)),
            );
            pu.bar_chart(BarChart::new("tuned", bars(&|s| Some(s.rank_tuned), 0.0)).color(theme::series(0)));
            pu.bar_chart(BarChart::new("tuned + sampler", bars(&|s| s.rank_sampler, 0.27)).color(theme::series(2)));
        });
}
