//! `wcc`: the command-line driver. Exit codes: 0 ok, 1 fidelity gate failed, 2 bad input or usage.

mod cli;
mod commands;
mod compress;
mod exec;
mod table;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
