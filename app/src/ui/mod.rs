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
use crate::worker::protocol::LIVE_REFRESH;

/// Errors (dismissable, in red) and notices, drawn in a box floating over the views.
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

/// The most new tokens a generation of the loaded model can ask for: its context less a
/// position for the prompt (the worker checks the prompt's real length); `fallback`
/// without a model.
pub fn max_new_tokens(rt: &Runtime, fallback: usize) -> usize {
    rt.model.as_ref().map_or(fallback, |m| m.config.max_position_embeddings.saturating_sub(1).max(1))
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

/// A token's text as drawn in a run of tokens: a newline as ¶, a tab as →, another control
/// character by its escape, no text (a piece of a character) as ∅: an empty label in a
/// wrapping row puts the next one back at the row's start, over the tokens before it.
pub fn token_text(text: &str) -> String {
    if text.is_empty() {
        return "∅".into();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('¶'),
            '\t' => out.push('→'),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Draw a token in a wrapping row of tokens (item spacing 0), styled by `style`, with
/// `hover` on each piece: a newline inside it ends the row (drawn as ¶), so what follows the
/// newline in the same token, code's indentation, starts the next row as it does in the text.
pub fn token_run(ui: &mut egui::Ui, text: &str, style: impl Fn(egui::RichText) -> egui::RichText, hover: &str) {
    if text.is_empty() {
        ui.label(style(egui::RichText::new(token_text(text)))).on_hover_text(hover);
        return;
    }
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let ends_row = lines.peek().is_some();
        let mut shown = if line.is_empty() { String::new() } else { token_text(line) };
        if ends_row {
            shown.push('¶');
        }
        if !shown.is_empty() {
            ui.label(style(egui::RichText::new(shown))).on_hover_text(hover);
        }
        if ends_row {
            ui.end_row();
        }
    }
}

/// How the window names an adapter: its folder and file (`full/adapter.safetensors`: a
/// run's adapters share the file name), whatever `hide_timings` says (run names are stable).
pub fn adapter_name(path: &std::path::Path) -> String {
    let part = |p: Option<&std::path::Path>| p.and_then(|p| p.file_name()).and_then(|n| n.to_str()).map(str::to_owned);
    match (part(path.parent()), part(Some(path))) {
        (Some(dir), Some(file)) => format!("{dir}/{file}"),
        (None, Some(file)) => file,
        _ => path.display().to_string(),
    }
}

/// Next to a button that decodes with the adapter: which adapter it uses, or how to get one.
pub fn adapter_line(ui: &mut egui::Ui, rt: &Runtime) {
    match &rt.adapter {
        Some(a) => {
            ui.weak(format!("adapter {} (k = {})", adapter_name(&a.path), a.config.k))
                .on_hover_text(a.path.display().to_string());
        }
        None => {
            ui.weak("needs an adapter: train one, or load one in the Model tab");
        }
    }
}

/// Above a result: the adapter it was measured with, when there was one.
pub fn measured_with(ui: &mut egui::Ui, adapter: Option<&std::path::Path>) {
    if let Some(path) = adapter {
        ui.weak(format!("measured with adapter {}", adapter_name(path))).on_hover_text(path.display().to_string());
    }
}

/// A busy indicator that turns in steps, one every [`LIVE_REFRESH`] (when the live
/// numbers are redrawn anyway). egui's own spinner asks for a new frame every frame, so a
/// window that shows one draws as many frames as it can for as long as a job runs: with a
/// software renderer, up to one of two cores taken from the job it shows (benchmarks, races
/// and training runs included); with a GPU, sixty frames a second through hours of training.
pub fn spinner(ui: &mut egui::Ui) -> egui::Response {
    let size = ui.style().spacing.interact_size.y;
    let (rect, response) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    response.widget_info(|| egui::WidgetInfo::new(egui::Role::ProgressIndicator));
    if ui.is_rect_visible(rect) {
        let period = LIVE_REFRESH.as_secs_f64();
        let step = (ui.input(|i| i.time) / period).floor();
        // A quarter-turn arc that moves an eighth of a turn each step.
        let start = step * std::f64::consts::TAU / 8.0;
        let radius = rect.height() * 0.5 - 2.0;
        let points: Vec<egui::Pos2> = (0..=16)
            .map(|i| {
                let angle = start + std::f64::consts::FRAC_PI_2 * f64::from(i) / 16.0;
                rect.center() + radius * egui::vec2(angle.cos() as f32, angle.sin() as f32)
            })
            .collect();
        let color = ui.visuals().strong_text_color();
        ui.painter().add(egui::Shape::line(points, egui::Stroke::new(3.0, color)));
        ui.ctx().request_repaint_after(LIVE_REFRESH);
    }
    response
}

/// Busy indicator: a spinner and the job's progress when `busy`.
pub fn busy_line(ui: &mut egui::Ui, rt: &Runtime, job: crate::worker::Job) {
    if rt.job == Some(job) {
        ui.horizontal(|ui| {
            spinner(ui);
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

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_drawn_without_control_characters() {
        assert_eq!(super::token_text("a\nb\tc\u{2}d\r"), "a¶b→c\\u{2}d\\u{d}");
        assert_eq!(super::token_text(" héllo"), " héllo");
        assert_eq!(super::token_text(""), "∅");
    }

    #[test]
    fn adapters_are_named_by_folder_and_file() {
        let name = super::adapter_name(std::path::Path::new("/p/runs/full/adapter.safetensors"));
        assert_eq!(name, "full/adapter.safetensors");
        assert_eq!(super::adapter_name(std::path::Path::new("a.safetensors")), "a.safetensors");
    }
}
