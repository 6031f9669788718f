//! The subcommands: call the driver, print what it returns.

use std::io::IsTerminal;
use std::process::ExitCode;

use wcc_driver::{render, Error, Stage};

use crate::cli::{Cli, Command, OptimizeArgs};

fn progress(stage: Stage) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K[wcc] {stage}…");
    }
}

fn progress_done() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// A report as JSON (reports are plain data: serializing them cannot fail).
macro_rules! json {
    ($v:expr) => {
        serde_json::to_string_pretty($v).expect("reports serialize")
    };
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Optimize(a) => optimize(*a),
        Command::Print { model } => {
            print!("{}", wcc_driver::print(&model)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            model,
            json: as_json,
            structure: true,
        } => {
            let s = wcc_driver::structure(&model)?;
            if as_json {
                println!("{}", json!(&s));
            } else {
                print!("{}", render::structure(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            model,
            json: as_json,
            structure: false,
        } => {
            let r = wcc_driver::inspect(&model)?;
            if as_json {
                println!("{}", json!(&r));
            } else {
                print!("{}", render::inspect(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            reference,
            candidate,
            exec,
            gate,
        } => {
            match wcc_driver::verify_models(&reference, &candidate, &exec.options(), gate.gate()) {
                Ok(r) => {
                    print!("{}", render::verify(&r));
                    Ok(ExitCode::SUCCESS)
                }
                // The figures go to stdout, as they do when the gate holds.
                Err(Error::Gate {
                    message,
                    details: Some(d),
                }) => {
                    print!("{d}");
                    Err(Error::Gate {
                        message,
                        details: None,
                    })
                }
                Err(e) => Err(e),
            }
        }
        Command::Run {
            model,
            exec,
            output,
        } => {
            let outs = wcc_driver::run(&model, &exec.options())?;
            wcc_driver::write_npz(&output, &outs)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Passes => {
            print!("{}", render::passes(&wcc_driver::passes()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            model,
            exec,
            runs,
            warmup,
        } => {
            let r = wcc_driver::bench(&model, &exec.options(), warmup, runs)?;
            print!("{}", render::bench(&r));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn optimize(a: OptimizeArgs) -> Result<ExitCode, Error> {
    let mut opts = a.options();
    if let Some(d) = &a.dump_after {
        opts.dump_after = Some((
            d.clone(),
            Box::new(|pass: &str, text: &str| eprintln!("--- after {pass} ---\n{text}")),
        ));
    }
    let result = wcc_driver::optimize(opts, &mut progress);
    progress_done();
    let done = result?;
    eprint!("{}", render::optimize(&done.report));
    if let Some(rp) = &a.report {
        std::fs::write(rp, json!(&done.report) + "\n")
            .map_err(|e| Error::Input(format!("cannot write report {}: {e}", rp.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}
