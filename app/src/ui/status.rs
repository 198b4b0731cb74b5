//! The status bar: device, model, adapter, the running job, frame rate.

use crate::app::{Command, WorkbenchApp};

/// Draw the status bar.
pub fn show(ui: &mut egui::Ui, app: &WorkbenchApp, commands: &mut Vec<Command>) {
    let rt = &app.runtime;
    ui.horizontal(|ui| {
        match &rt.model {
            Some(m) => ui.label(format!("{} · {} · {}", super::path_text(rt, &m.dir), m.device, m.dtype)),
            None => ui.label("no model"),
        };
        ui.separator();
        match &rt.adapter {
            Some(a) => ui
                .label(format!("adapter {} · k = {}", super::adapter_name(&a.path), a.config.k))
                .on_hover_text(a.path.display().to_string()),
            None => ui.label("no adapter"),
        };
        ui.separator();
        match app.job() {
            Some(job) => {
                // A step-through session waits for clicks between steps: nothing spins.
                if rt.busy() && !app.runtime.paused {
                    super::spinner(ui);
                }
                let paused = if app.runtime.paused { " (paused)" } else { "" };
                ui.label(format!("{}{paused}", job.name()));
                if let Some((msg, frac)) = &rt.progress {
                    match frac {
                        Some(f) => ui
                            .add(egui::ProgressBar::new(*f).desired_width(320.0).text(msg.as_str()))
                            .on_hover_text(msg.as_str()),
                        None => ui.label(msg),
                    };
                }
                if ui
                    .small_button("Stop job")
                    .on_hover_text("Stop the running job (training saves a checkpoint)")
                    .clicked()
                {
                    commands.push(Command::Cancel);
                }
            }
            None => {
                ui.label("idle");
            }
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let n = rt.frame_times.len();
            if n > 0 && !rt.hide_timings {
                let worst = rt.frame_times.iter().copied().fold(0.0f32, f32::max);
                ui.weak(format!("UI {:.1} ms/frame", worst * 1000.0)).on_hover_text(
                    "The slowest of the last frames' drawing time (the UI thread never waits on the worker)",
                );
            }
        });
    });
}
