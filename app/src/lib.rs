//! MTP Workbench's front ends over `mtp-core`: the `mtp` command line and the
//! `mtp-workbench` desktop app (eframe/egui). The app's pieces follow one rule: views draw
//! state and collect commands; one worker thread owns every tensor.

pub mod app;
pub mod cli;
pub mod commands;
pub mod requests;
pub mod settings;
pub mod state;
pub mod ui;
pub mod worker;

/// An error and its causes on one line, `outer: inner: ...`, each cause once: core's errors
/// show their cause in their own message (a file and the system's reason), so a cause that
/// a message already ends with is not repeated.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let line = cause.to_string();
        if text.is_empty() {
            text = line;
        } else if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
    }
    text
}

/// `n` things, in the singular for one: "1 example", "3 examples".
pub fn counted(n: usize, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

#[cfg(test)]
mod tests {
    /// A cause an error's message already ends with is not repeated; other causes are.
    #[test]
    fn error_text_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(mtp_core::Error::io("/nope/a.safetensors", io)).context("loading the adapter");
        assert_eq!(
            super::error_text(&e),
            "loading the adapter: /nope/a.safetensors: No such file or directory (os error 2)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner");
    }
}
