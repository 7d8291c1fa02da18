//! lightshark-mini: see README.md. This file only wires flags, logging and
//! the exit status around `agent::run`.

use lightshark::{agent, config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lightshark-mini: error: {e:#}");
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
            // `{:#}` prints the chain of causes without a backtrace.
            eprintln!("lightshark-mini: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
