//! `mtp-workbench [PROJECT_DIR | MODEL]`: the desktop app. Without an argument it reopens
//! the last project (or the built-in demo).

fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    let target = std::env::args().nth(1);
    match mtp_app::app::run(target) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
