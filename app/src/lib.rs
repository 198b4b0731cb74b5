//! MTP Workbench's front ends over `mtp-core`: the `mtp` command line and the
//! `mtp-workbench` desktop app.

pub mod cli;
pub mod gui;
