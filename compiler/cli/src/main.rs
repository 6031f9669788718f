//! `wcc`: the command-line front of `wcc-driver`. Exit codes: 0 ok, 1 fidelity gate failed,
//! 2 bad input or usage. No command ends in a panic: backends run behind the driver's guard, and
//! anything else that panics is reported here as an internal error (exit 2).

mod cli;
mod commands;

use std::process::ExitCode;
use std::sync::Mutex;

use clap::Parser;

/// The message of a panic on the main thread, recorded by the hook instead of printed.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some("main") {
            return previous(info);
        }
        let msg = wcc_driver::describe_panic(info);
        if let Ok(mut p) = PANIC.lock() {
            *p = Some(msg);
        }
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let result = std::panic::catch_unwind(|| commands::dispatch(cli::Cli::parse()));
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            if let wcc_driver::Error::Gate {
                details: Some(d), ..
            } = &e
            {
                eprint!("{d}");
            }
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
        Err(_) => {
            let msg = PANIC
                .lock()
                .ok()
                .and_then(|mut p| p.take())
                .unwrap_or_else(|| "(no message)".into());
            eprintln!("error: internal error (a bug in wcc): {msg}");
            ExitCode::from(2)
        }
    }
}
