//! MTP Workbench's front ends over `mtp-core`: the `mtp` command line and the
//! `mtp-workbench` desktop app (eframe/egui). The app's pieces follow one rule: views draw
//! state and collect commands; one worker thread owns every tensor.

pub mod app;
pub mod cli;
pub mod commands;
pub mod requests;
pub mod state;
pub mod ui;
pub mod worker;
