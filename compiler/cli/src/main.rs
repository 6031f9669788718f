//! `wcc`: the command-line front of `wcc-driver`. Exit codes: 0 ok, 1 fidelity gate failed,
//! 2 bad input or usage. No command ends in a panic: backends run behind the driver's guard, and
//! anything else that panics is reported here as an internal error (exit 2).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod alloc;
mod cli;
mod commands;

use std::process::ExitCode;
use std::sync::Mutex;

use clap::Parser;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

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

/// Keeps freed memory for reuse instead of handing large blocks back to the kernel at once.
///
/// glibc serves every allocation over 32 MiB with its own mmap and unmaps it when freed, so each
/// weight-sized buffer (a folded weight's pieces aside, verification serializes, parses and loads
/// the weights of each group of regions) costs page faults and zeroing again; on a VM that hands
/// freed pages back to its host, several times more. Served from the heap and kept there, the
/// next group reuses the last one's pages: the 2.27 GB scale benchmark's default run (26 weights
/// rewritten and verified) took 18-20 s before, 6-12 s after, in 0.55-0.75 GB. What is kept is
/// bounded: region-by-region verification hands freed memory back past a share of
/// `--verify-memory` (see `wcc_driver::regions`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
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
