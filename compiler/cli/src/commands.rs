//! The subcommands: call the driver, print what it returns.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use wcc_driver::{render, Error, Stage};

use crate::cli::{Cli, Command, OptimizeArgs};

/// `wcc optimize`'s progress on a terminal (nothing otherwise): a bar for a stage that counts
/// (weights quantized, the planner's weights), a spinner for the others.
struct Progress {
    bar: Option<(ProgressBar, bool)>,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None }
    }

    fn stage(&mut self, stage: Stage) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let counted = stage.count();
        if self
            .bar
            .as_ref()
            .is_some_and(|(_, c)| *c != counted.is_some())
        {
            self.done();
        }
        let (bar, _) = self.bar.get_or_insert_with(|| {
            let bar = match counted {
                Some(_) => ProgressBar::new(0).with_style(
                    ProgressStyle::with_template(
                        "[wcc] {msg} [{bar:30}] {pos}/{len} ({elapsed}, about {eta} left)",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("[wcc] {spinner} {msg} ({elapsed})")
                        .expect("a valid template"),
                ),
            };
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            (bar, counted.is_some())
        });
        if let Some((done, of)) = counted {
            bar.set_length(of as u64);
            bar.set_position(done as u64);
        }
        bar.set_message(stage.to_string());
    }

    fn done(&mut self) {
        if let Some((bar, _)) = self.bar.take() {
            bar.finish_and_clear();
        }
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
    let mut p = Progress::new();
    let result = wcc_driver::optimize(opts, &mut |s| p.stage(s));
    p.done();
    let done = result?;
    eprint!("{}", render::optimize(&done.report));
    if let Some(rp) = &a.report {
        std::fs::write(rp, json!(&done.report) + "\n")
            .map_err(|e| Error::Input(format!("cannot write report {}: {e}", rp.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}
