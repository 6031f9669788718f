//! The guard backends run behind: a panic inside tract or ONNX Runtime's bindings while loading,
//! optimizing or running a model is caught and becomes a [`RunError::Panic`] naming the backend,
//! instead of ending the process. The default panic hook would still print the panic on stderr,
//! so a hook installed once records the message of a panic raised inside a guard (on that thread)
//! and defers to the previous hook for every other panic.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::sync::Once;

use crate::backend::RunError;

thread_local! {
    /// How many guards are active on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The message of the last panic caught inside a guard on this thread.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// A panic's message and where it was raised.
pub fn describe(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    match info.location() {
        Some(l) => format!("{msg} (at {}:{})", l.file(), l.line()),
        None => msg,
    }
}

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if DEPTH.with(Cell::get) > 0 {
                CAUGHT.with(|c| *c.borrow_mut() = Some(describe(info)));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it becomes `RunError::Panic` for `backend`, and nothing is printed.
pub fn guarded<T>(backend: &str, f: impl FnOnce() -> Result<T, RunError>) -> Result<T, RunError> {
    install_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    match r {
        Ok(r) => r,
        Err(payload) => {
            let message = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into())
            });
            Err(RunError::Panic {
                backend: backend.to_string(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_guard_is_an_error_naming_the_backend() {
        let r: Result<(), RunError> = guarded("tract", || panic!("index out of bounds"));
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("tract crashed"), "{e}");
        assert!(e.contains("index out of bounds"), "{e}");
        assert!(e.contains("guard.rs"), "{e}");
        // Nested guards and later successes are unaffected.
        assert_eq!(guarded("tract", || guarded("ort", || Ok(3))).unwrap(), 3);
    }
}
