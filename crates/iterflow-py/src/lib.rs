//! `iterflow._core`: thin PyO3 bindings over `iterflow-core`.
//!
//! Every awaitable returned here is a Rust future driven by ONE process-wide tokio runtime
//! (see [`runtime`]); Python awaits it through pyo3-async-runtimes without holding the GIL
//! while it waits.

use std::sync::{Once, OnceLock};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::prelude::*;

create_exception!(
    iterflow._core,
    CoreError,
    PyException,
    "An error from the Rust core; `code` is stable (e.g. DATABASE_ERROR), `message` is for humans."
);

/// The process-wide runtime and the pid of the process that created it.
struct OwnedRuntime {
    runtime: tokio::runtime::Runtime,
    pid: u32,
}

static RUNTIME: OnceLock<Result<OwnedRuntime, String>> = OnceLock::new();
static HANDED_TO_PYO3: Once = Once::new();

/// The one tokio runtime of this process, created on first use.
///
/// A forked child inherits the `OnceLock` but not the runtime's worker threads, so any
/// use there would hang; the pid recorded at creation detects that and we refuse with
/// `RuntimeError` instead. Create engines (and so the runtime) after forking.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    let owned = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("iterflow-core")
            .build()
            .map(|runtime| OwnedRuntime {
                runtime,
                pid: std::process::id(),
            })
            .map_err(|e| e.to_string())
    });
    let owned = match owned {
        Ok(owned) => owned,
        Err(e) => {
            return Err(PyRuntimeError::new_err(format!(
                "iterflow: cannot start the tokio runtime: {e}"
            )))
        }
    };
    if owned.pid != std::process::id() {
        return Err(PyRuntimeError::new_err(format!(
            "iterflow: the Rust core's runtime was created in process {} and cannot be used after \
             fork() (this is process {}); create the engine in the child process instead",
            owned.pid,
            std::process::id()
        )));
    }
    // pyo3-async-runtimes drives `future_into_py` futures on its own global runtime; make
    // that ours. This is the only code in this library that touches its runtime, so the
    // hand-over cannot lose a race against its lazily built default.
    HANDED_TO_PYO3.call_once(|| {
        let handed = pyo3_async_runtimes::tokio::init_with_runtime(&owned.runtime);
        debug_assert!(
            handed.is_ok(),
            "pyo3-async-runtimes built its own runtime first"
        );
    });
    Ok(&owned.runtime)
}

/// Turn a core error into `iterflow._core.CoreError` with `code` and `message` attributes.
fn to_py_err(err: iterflow_core::CoreError) -> PyErr {
    let code = err.code();
    let message = err.to_string();
    Python::attach(|py| {
        let py_err = CoreError::new_err(format!("{code}: {message}"));
        let value = py_err.value(py);
        // Setting attributes on a fresh exception instance cannot reasonably fail; if it
        // does, the exception still carries the code in its text.
        let _ = value.setattr("code", code);
        let _ = value.setattr("message", message);
        py_err
    })
}

/// `await check_connection(dsn) -> str`: connect, run `SHOW server_version`, return it.
#[pyfunction]
fn check_connection(py: Python<'_>, dsn: String) -> PyResult<Bound<'_, PyAny>> {
    runtime()?;
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        iterflow_core::pool::check_connection(&dsn)
            .await
            .map_err(to_py_err)
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add_function(wrap_pyfunction!(check_connection, m)?)?;
    Ok(())
}
