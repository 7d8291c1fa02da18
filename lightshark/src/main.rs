//! lightshark-mini: see README.md. This file only wires flags, logging and
//! the exit status around `agent::run`.

use lightshark::{agent, config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(if config.quiet { "warn" } else { "info" }),
    )
    .format_target(false)
    .init();
    match agent::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints the error with its chain of causes (`{:#}`, no backtrace); a
/// closed stderr is no reason to panic.
fn report(e: &anyhow::Error) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "lightshark-mini: error: {e:#}");
}
