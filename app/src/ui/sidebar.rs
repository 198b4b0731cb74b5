//! The projects sidebar: the open project, recent ones, open and create.

use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};

/// Draw the sidebar.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("Projects");
    match (&rt.project, &p.project_dir) {
        (Some(project), Some(dir)) => {
            ui.strong(&project.name).on_hover_text(dir.display().to_string());
            ui.label(crate::counted(rt.runs.len(), "run", "runs"));
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
        .on_hover_text(
            "A name: a new project under projects/ with the current model. A folder path (with /): that \
             project opened",
        );
        let text = p.new_project.trim();
        // A path opens the project there (where no file dialog can open, this is how).
        let path = text.contains(['/', '\\']);
        let label = if path { "Open" } else { "Create" };
        if ui.add_enabled(!text.is_empty(), egui::Button::new(label)).clicked() {
            commands.push(if path { Command::OpenProject(text.into()) } else { Command::NewProject });
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
