//! `mtp-workbench [PROJECT_DIR | MODEL]`: the desktop app. Without an argument it reopens
//! the last project (or the built-in demo).

fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    // CPU decoding's thread count follows what the machine leaves free: the window's own
    // frames (a software renderer draws on the same cores) included. OMP_NUM_THREADS fixes it.
    mtp_core::model::threads::adapt();
    let target = std::env::args().nth(1);
    match mtp_app::app::run(target) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
