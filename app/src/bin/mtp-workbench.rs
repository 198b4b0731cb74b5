//! `mtp-workbench`: the desktop app.

fn main() {}
