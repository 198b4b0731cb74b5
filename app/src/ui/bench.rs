//! The Bench view: the paper's table (tokens per forward by domain and masks) plus
//! wall-clock speedup, a chart of tokens per forward against masks per domain, and exports.

use egui_plot::{Legend, Line, Plot, PlotPoints};
use mtp_core::decode::{MaskCount, Mode};

use super::{busy_line, theme};
use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};
use crate::worker::Job;

/// What is wrong with the Masks field (counts separated by commas, each 1 to the adapter's
/// `k`, or `auto`), in words; `None` when nothing is.
fn masks_problem(text: &str, k: Option<usize>) -> Option<String> {
    let range = k.map_or("at least 1".to_string(), |k| format!("1 to {k}"));
    for part in text.split(',') {
        match part.trim().parse::<MaskCount>() {
            Err(_) => {
                return Some(format!("Masks: \"{}\" is not a mask count (use {range}, or auto)", part.trim()));
            }
            Ok(MaskCount::Fixed(n)) if n == 0 || k.is_some_and(|k| n > k) => {
                return Some(format!("Masks: {n} is out of range (use {range}, or auto)"));
            }
            Ok(_) => {}
        }
    }
    None
}

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
            ui.add(
                egui::DragValue::new(&mut b.max_new_tokens)
                    .range(1..=super::max_new_tokens(rt, 2048))
                    .prefix("tokens "),
            ),
            egui::Role::SpinButton,
            "New tokens per prompt",
        );
        super::named(
            ui.add(egui::DragValue::new(&mut b.repeats).range(1..=10).prefix("runs ")).on_hover_text(
                "Each generation runs this many times, AR's and each mode's in turn, and the fastest counts: \
                 one run on a shared or busy machine can be off by tens of percent",
            ),
            egui::Role::SpinButton,
            "Runs of each generation",
        );
        ui.add_enabled(
            rt.model.as_ref().is_some_and(|m| m.chat_template),
            egui::Checkbox::new(&mut b.chat, "Chat template"),
        )
        .on_hover_text("Text prompts as a user's turn through the model's chat template, as an instruct model is used");
        let k = rt.adapter.as_ref().map(|a| a.config.k);
        let problem = masks_problem(&b.masks, k);
        let why = super::not_ready(rt, true).map(str::to_owned).or(problem.clone());
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
            .on_hover_text("A picture of this view (not the sidebar or the status bar), saved in the project folder")
            .clicked()
        {
            commands.push(Command::ScreenshotRace);
        }
    });
    if let Some(problem) = masks_problem(&p.bench.masks, rt.adapter.as_ref().map(|a| a.config.k)) {
        ui.colored_label(theme::ERROR, problem);
    }
    super::adapter_line(ui, rt);
    busy_line(ui, rt, Job::Bench);
    let Some(report) = &rt.bench else {
        ui.label(if rt.job == Some(Job::Bench) {
            "The table fills in when the benchmark ends (Stop shows the prompts measured so far)."
        } else {
            "Run the benchmark to fill the table."
        });
        return;
    };
    ui.separator();
    super::measured_with(ui, report.adapter.as_deref());
    if let Some(n) = report.stopped_after {
        ui.colored_label(
            theme::NOTICE,
            format!("Stopped after {n} of {} prompts: the table covers those {n}.", report.prompts),
        );
    }
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
    paper_tables(ui, rt, report);
    egui::CollapsingHeader::new("Every row: tokens/s, speedup, step cost").default_open(false).show(ui, |ui| {
        rows_table(ui, rt, report);
    });
    findings(ui, report);
    chart(ui, report);
}

/// Why the acceptance is what it is: the report's findings, one line each.
fn findings(ui: &mut egui::Ui, report: &mtp_core::decode::bench::BenchReport) {
    if report.findings.is_empty() {
        return;
    }
    egui::CollapsingHeader::new("Why this acceptance").default_open(true).show(ui, |ui| {
        for f in &report.findings {
            ui.horizontal_wrapped(|ui| {
                ui.label("•");
                ui.label(&f.text);
            });
        }
    });
}

/// The paper's tables, one per mode: tokens per forward by domain (rows) and mask count
/// (columns), with the wall-clock speedup over AR after each.
fn paper_tables(ui: &mut egui::Ui, rt: &Runtime, report: &mtp_core::decode::bench::BenchReport) {
    let mtp_core::decode::bench::PaperAxes { modes, masks, domains } = report.paper_axes();
    ui.horizontal_top(|ui| {
        for mode in modes {
            ui.vertical(|ui| {
                ui.strong(format!("{mode}: tokens per forward (speedup over AR)"));
                egui::Grid::new(("paper-table", mode.name())).striped(true).show(ui, |ui| {
                    ui.strong("domain");
                    for m in &masks {
                        ui.strong(if *m == MaskCount::Fixed(1) { "1 mask".to_string() } else { format!("{m} masks") });
                    }
                    ui.end_row();
                    for d in &domains {
                        ui.label(*d);
                        for m in &masks {
                            match report.row(d, mode, *m) {
                                Some(r) => {
                                    let speedup = super::timing(rt, format!("{:.2}×", r.speedup));
                                    let text = format!("{:.2} ({speedup})", r.tokens_per_forward);
                                    if r.identical {
                                        ui.label(text);
                                    } else {
                                        ui.colored_label(theme::BAD, format!("{text} MISMATCH"));
                                    }
                                }
                                None => {
                                    ui.label("-");
                                }
                            }
                        }
                        ui.end_row();
                    }
                });
            });
            ui.add_space(16.0);
        }
    });
}

/// Every row of the report: each domain, mode and mask count with its speeds.
fn rows_table(ui: &mut egui::Ui, rt: &Runtime, report: &mtp_core::decode::bench::BenchReport) {
    egui::Grid::new("bench-table").striped(true).show(ui, |ui| {
        for h in ["domain", "mode", "masks", "tokens/forward", "tokens/s", "speedup", "step cost vs AR", "identical"] {
            ui.strong(h);
        }
        ui.end_row();
        for r in &report.rows {
            ui.label(&r.domain);
            ui.label(r.mode.name());
            ui.label(match r.masks {
                _ if r.mode == Mode::Ar => "-".to_string(),
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
}

/// Tokens per forward against the mask count, a line per domain and mode.
fn chart(ui: &mut egui::Ui, report: &mtp_core::decode::bench::BenchReport) {
    let domains = report.paper_axes().domains;
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_masks_field_says_what_is_wrong() {
        assert_eq!(super::masks_problem("1, 2,auto", Some(4)), None);
        assert!(super::masks_problem("1,abc", Some(4)).is_some_and(|p| p.contains("\"abc\"") && p.contains("1 to 4")));
        assert!(super::masks_problem("9", Some(4)).is_some_and(|p| p.contains("9 is out of range")));
        assert!(super::masks_problem("0", None).is_some_and(|p| p.contains("at least 1")));
        assert!(super::masks_problem("1,,2", Some(4)).is_some());
    }
}
