//! The Model view: pick a source, load it, see its summary.

use mtp_core::inspect::human_bytes;

use crate::app::{Command, ModelState, UiState};

/// Draw the Model view.
pub fn show(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Vec<Command>) {
    egui::CentralPanel::default().show(ui, |ui| {
        ui.heading("MTP Workbench");
        if let Some(p) = &state.project {
            ui.label(format!("Project: {}", p.name));
        }
        ui.horizontal(|ui| {
            ui.label("Model");
            ui.text_edit_singleline(&mut state.source_text)
                .on_hover_text("A model folder, a hub repo id (owner/name[@revision]) or `demo`");
            let busy = matches!(state.model, ModelState::Loading(_));
            if ui.add_enabled(!busy, egui::Button::new("Load")).clicked() {
                commands.push(Command::LoadModel);
            }
        });
        ui.separator();
        for (i, e) in state.errors.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.colored_label(ui.visuals().error_fg_color, e);
                if ui.small_button("dismiss").clicked() {
                    commands.push(Command::DismissError(i));
                }
            });
        }
        match &state.model {
            ModelState::None => {
                ui.label("No model loaded.");
            }
            ModelState::Loading(what) => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(what);
                });
                if let Some((msg, _)) = &state.progress {
                    ui.label(msg);
                }
            }
            ModelState::Ready(s) => {
                egui::Grid::new("model-summary").num_columns(2).striped(true).show(ui, |ui| {
                    let i = &s.info;
                    let rows = [
                        ("Source", s.source.to_string()),
                        ("Folder", s.dir.display().to_string()),
                        ("Family", i.model_type.clone()),
                        ("Parameters", format!("{} ({:.2} M)", i.num_parameters, i.num_parameters as f64 / 1e6)),
                        ("Hidden size", i.hidden_size.to_string()),
                        ("Layers", i.num_layers.to_string()),
                        ("Heads", format!("{} query / {} key-value", i.num_heads, i.num_kv_heads)),
                        ("Vocabulary", i.vocab_size.to_string()),
                        ("Context", i.context_length.to_string()),
                        ("Stored as", format!("{} ({})", i.stored_dtype, human_bytes(i.stored_bytes))),
                        ("Running on", format!("{} in {}", s.device, s.dtype)),
                        ("Chat template", if s.chat_template { "yes" } else { "no" }.into()),
                        ("Loaded in", format!("{:.2} s", s.load_seconds)),
                    ];
                    for (k, v) in rows {
                        ui.strong(k);
                        ui.label(v);
                        ui.end_row();
                    }
                });
            }
        }
    });
}
