//! The Bench view: the paper's table (tokens per forward by domain and masks) plus
//! wall-clock speedup, a chart of tokens per forward against masks per domain, and exports.

use egui_plot::{Legend, Line, Plot, PlotPoints};
use mtp_core::decode::{MaskCount, Mode};

use super::{busy_line, theme};
use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};
use crate::worker::Job;

/// Draw the Bench view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Benchmark");
    let b = &mut p.bench;
    ui.horizontal(|ui| {
        let label = ui
            .label("Prompts")
            .on_hover_text("JSONL with `prompt` and `domain` per line; empty: the demo's prompt sets");
        ui.add(egui::TextEdit::singleline(&mut b.prompts).hint_text("built-in demo prompts").desired_width(300.0))
            .labelled_by(label.id);
        if ui.button("File…").clicked() {
            commands.push(Command::Pick(Pick::PromptsFile));
        }
    });
    ui.horizontal(|ui| {
        let label = ui.label("Masks");
        ui.add(egui::TextEdit::singleline(&mut b.masks).desired_width(80.0))
            .labelled_by(label.id)
            .on_hover_text("Comma-separated, each 1..k, or auto (chosen each step from the acceptance)");
        ui.checkbox(&mut b.linear, "linear");
        ui.checkbox(&mut b.quadratic, "quadratic");
        super::named(
            ui.add(egui::DragValue::new(&mut b.max_new_tokens).range(1..=2048).prefix("tokens ")),
            egui::Role::SpinButton,
            "New tokens per prompt",
        );
        let masks_ok = b.masks.split(',').all(|s| s.parse::<MaskCount>().is_ok());
        let why = super::not_ready(rt, true)
            .or((!masks_ok).then_some("Masks: counts separated by commas (1 to the adapter's k), or auto"));
        let run = ui.add_enabled(why.is_none(), egui::Button::new("Run benchmark"));
        if run.on_disabled_hover_text(why.unwrap_or_default()).clicked() {
            commands.push(Command::StartBench);
        }
        if rt.job == Some(Job::Bench) && ui.button("Stop").clicked() {
            commands.push(Command::Cancel);
        }
        if ui
            .add_enabled(rt.bench.is_some(), egui::Button::new("Export…"))
            .on_hover_text("CSV, JSON or Markdown by the file's extension")
            .clicked()
        {
            commands.push(Command::Pick(Pick::SaveBench));
        }
        if ui
            .add_enabled(rt.bench.is_some(), egui::Button::new("Export PNG"))
            .on_hover_text("A picture of the window, saved in the project folder")
            .clicked()
        {
            commands.push(Command::ScreenshotRace);
        }
    });
    super::adapter_line(ui, rt);
    busy_line(ui, rt, Job::Bench);
    let Some(report) = &rt.bench else {
        ui.label(if rt.job == Some(Job::Bench) {
            "The table fills in when the benchmark ends."
        } else {
            "Run the benchmark to fill the table."
        });
        return;
    };
    ui.separator();
    super::measured_with(ui, report.adapter.as_deref());
    if !report.divergences.is_empty() {
        for d in &report.divergences {
            ui.colored_label(
                theme::BAD,
                format!(
                    "mismatch: prompt {} ({}), {} {} masks, at token {}: AR top-2 margin {:.1e}",
                    d.prompt + 1,
                    d.domain,
                    d.mode,
                    d.masks,
                    d.position,
                    d.margin
                ),
            );
        }
    }
    egui::Grid::new("bench-table").striped(true).show(ui, |ui| {
        for h in ["domain", "mode", "masks", "tokens/forward", "tokens/s", "speedup", "step cost vs AR", "identical"] {
            ui.strong(h);
        }
        ui.end_row();
        for r in &report.rows {
            ui.label(&r.domain);
            ui.label(r.mode.name());
            ui.label(match r.masks {
                MaskCount::Auto => format!("auto ({:.2})", r.mean_masks),
                m => m.to_string(),
            })
            .on_hover_text("auto: the mean number of masks per step it chose");
            ui.label(format!("{:.2}", r.tokens_per_forward));
            ui.label(super::timing(rt, format!("{:.1}", r.tokens_per_second)));
            ui.label(super::timing(rt, format!("{:.2}×", r.speedup)));
            ui.label(super::timing(rt, format!("{:.2}", r.step_cost_vs_ar)));
            if r.identical {
                ui.colored_label(theme::GOOD, "yes");
            } else {
                ui.colored_label(theme::BAD, "NO");
            }
            ui.end_row();
        }
    });
    let mut domains: Vec<&str> = report.rows.iter().map(|r| r.domain.as_str()).collect();
    domains.dedup();
    ui.horizontal_wrapped(|ui| {
        ui.strong("Tokens per forward by mask count");
        ui.weak("solid: quadratic · dashed: linear · one colour per domain");
    });
    Plot::new("tpf-by-masks")
        .legend(Legend::default().text_style(egui::TextStyle::Small).follow_insertion_order(true).background_alpha(0.9))
        .height(240.0)
        .x_axis_label("masks")
        .y_axis_label("tokens per forward")
        // Mask counts are whole numbers: no ticks between them.
        .x_axis_formatter(|mark, _| if mark.value.fract() == 0.0 { format!("{}", mark.value) } else { String::new() })
        .include_y(1.0)
        .show(ui, |pu| {
            for (i, d) in domains.iter().enumerate() {
                for mode in [Mode::Quadratic, Mode::Linear] {
                    let points: PlotPoints = report
                        .rows
                        .iter()
                        .filter(|r| r.domain == *d && r.mode == mode)
                        .filter_map(|r| match r.masks {
                            MaskCount::Fixed(m) => Some([m as f64, r.tokens_per_forward]),
                            MaskCount::Auto => None,
                        })
                        .collect();
                    // One legend entry per domain: its two lines share the name.
                    let line = Line::new(d.to_string(), points).color(theme::series(i));
                    pu.line(if mode == Mode::Linear { line.style(egui_plot::LineStyle::dashed_loose()) } else { line });
                }
            }
        });
}
