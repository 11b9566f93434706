//! The `chaperone` binary.

fn main() -> std::process::ExitCode {
    // The sandbox launcher is this same executable; it must take over before any thread
    // (tokio, tracing) exists.
    chaperone_sandbox::run_launcher_if_requested();
    chaperone::cli::main()
}
