//! `mtp`: the headless command line of MTP Workbench.

fn main() -> std::process::ExitCode {
    mtp_app::cli::main()
}
