//! The driver's errors and the exit code each one means: 1 for a failed fidelity gate or
//! verification (nothing written), 2 for bad input or usage, or a model that cannot be run.

use wcc_ir::IrError;

#[derive(Debug)]
pub enum Error {
    /// Bad usage: conflicting options, an unknown pass (exit 2).
    Usage(String),
    /// An unreadable or invalid model (exit 2).
    Ir(IrError),
    /// Bad input other than the model: an inputs file, an adapter, a rules file (exit 2).
    Input(String),
    /// A model could not be run, so nothing could be checked (exit 2).
    Run(String),
    /// The result failed the fidelity gate or verification: it does not compute what the
    /// original does within the budget, or cannot be run where the original can (exit 1).
    /// `details` is what was measured, rendered for the terminal.
    Gate {
        message: String,
        details: Option<String>,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(s) | Error::Input(s) | Error::Run(s) => f.write_str(s),
            Error::Ir(e) => write!(f, "{e}"),
            Error::Gate { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Gate { .. } => 1,
            _ => 2,
        }
    }

    /// A gate failure without details.
    pub fn gate(message: impl Into<String>) -> Self {
        Error::Gate {
            message: message.into(),
            details: None,
        }
    }
}

impl From<IrError> for Error {
    fn from(e: IrError) -> Self {
        Error::Ir(e)
    }
}
