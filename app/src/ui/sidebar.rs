//! The projects sidebar: the open project, recent ones, open and create.

use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};

/// Draw the sidebar.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Projects");
    match (&rt.project, &p.project_dir) {
        (Some(project), Some(dir)) => {
            ui.strong(&project.name).on_hover_text(dir.display().to_string());
            ui.label(format!("{} runs", rt.runs.len()));
        }
        _ => {
            ui.weak("no project open");
        }
    }
    ui.separator();
    if ui.button("Open project…").on_hover_text("A folder with project.toml and runs/").clicked() {
        commands.push(Command::Pick(Pick::Project));
    }
    ui.horizontal(|ui| {
        super::named(
            ui.add(egui::TextEdit::singleline(&mut p.new_project).hint_text("new project name").desired_width(120.0)),
            egui::Role::TextInput,
            "New project name",
        )
        .on_hover_text("Created under projects/ with the current model");
        if ui.add_enabled(!p.new_project.trim().is_empty(), egui::Button::new("Create")).clicked() {
            commands.push(Command::NewProject);
        }
    });
    if !p.recent.is_empty() {
        ui.separator();
        ui.label("Recent");
        for dir in p.recent.clone() {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
            let current = p.project_dir.as_ref() == Some(&dir);
            if ui.selectable_label(current, name).on_hover_text(dir.display().to_string()).clicked() && !current {
                commands.push(Command::OpenProject(dir));
            }
        }
    }
}
