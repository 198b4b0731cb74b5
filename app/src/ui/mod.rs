//! One file per view. Views draw the state and push [`crate::app::Command`]s; they never
//! touch the worker, the disk or a tensor.

pub mod bench;
pub mod compare;
pub mod data;
pub mod model;
pub mod probe;
pub mod sidebar;
pub mod status;
pub mod step;
pub mod theme;
pub mod train;

use crate::app::Command;
use crate::state::Runtime;

/// Errors (dismissable, in red) and notices above every view.
pub fn messages(ui: &mut egui::Ui, rt: &Runtime, commands: &mut Vec<Command>) {
    for (i, e) in rt.errors.iter().enumerate() {
        ui.horizontal_wrapped(|ui| {
            ui.colored_label(theme::ERROR, format!("Error: {e}"));
            if ui.small_button("Dismiss").clicked() {
                commands.push(Command::DismissError(i));
            }
        });
    }
    if !rt.notices.is_empty() {
        ui.horizontal_wrapped(|ui| {
            ui.colored_label(theme::NOTICE, rt.notices.join("  ·  "));
            if ui.small_button("OK").clicked() {
                commands.push(Command::DismissNotices);
            }
        });
    }
}

/// A labelled row in a two-column form grid, with a tooltip on the label and the widget.
pub fn form_row(
    ui: &mut egui::Ui,
    label: &str,
    tip: &str,
    add: impl FnOnce(&mut egui::Ui) -> egui::Response,
) -> egui::Response {
    let name = ui.label(label).on_hover_text(tip);
    let r = add(ui).on_hover_text(tip).labelled_by(name.id);
    ui.end_row();
    r
}

/// Give a widget with no visible label of its own an accessible name (for screen readers
/// and the UI tests' accessibility check).
pub fn named(response: egui::Response, kind: egui::Role, name: &str) -> egui::Response {
    response.widget_info(|| egui::WidgetInfo::labeled(kind, response.enabled(), name));
    response
}

/// A `DragValue` for a usize in a range.
pub fn drag_usize(value: &mut usize, range: std::ops::RangeInclusive<usize>) -> egui::DragValue<'_> {
    egui::DragValue::new(value).range(range)
}

/// Why an action that needs a model (and an adapter) cannot start now, for the hover text
/// of its disabled button; `None` when it can.
pub fn not_ready(rt: &Runtime, adapter: bool) -> Option<&'static str> {
    if rt.busy() {
        Some("Waits for the running job (the status bar shows it; Stop job ends it)")
    } else if rt.model.is_none() {
        Some("Load a model first (Model tab)")
    } else if adapter && rt.adapter.is_none() {
        Some("Load an adapter first (Model tab), or train one (Train tab)")
    } else {
        None
    }
}

/// Busy indicator: a spinner and the job's progress when `busy`.
pub fn busy_line(ui: &mut egui::Ui, rt: &Runtime, job: crate::worker::Job) {
    if rt.job == Some(job) {
        ui.horizontal(|ui| {
            ui.spinner();
            match &rt.progress {
                Some((msg, Some(f))) => {
                    ui.add(egui::ProgressBar::new(*f).text(msg.as_str()).desired_width(360.0));
                }
                Some((msg, None)) => {
                    ui.label(msg);
                }
                None => {
                    ui.label(job.name());
                }
            }
        });
    }
}

/// `text` for a wall-clock number, or "…" when timings are hidden (reproducible
/// screenshots).
pub fn timing(rt: &Runtime, text: String) -> String {
    if rt.hide_timings { "…".into() } else { text }
}

/// A path as shown: in full, or only its last component for reproducible screenshots.
pub fn path_text(rt: &Runtime, path: &std::path::Path) -> String {
    if rt.hide_timings {
        path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned()
    } else {
        path.display().to_string()
    }
}
