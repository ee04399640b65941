//! `iterflow._core`: thin PyO3 bindings over `iterflow-core`.
//!
//! Every call runs as a Rust future on ONE process-wide tokio runtime (see [`runtime`]) and
//! crosses the boundary through one bridge, the [`Pump`]: a call takes a ticket and returns at
//! once, its result is queued there, and the Python side (python/iterflow/cores/rust.py
//! `_Pump`) drains finished calls on its event loop, so runtime threads never take the GIL.
//! Each call crosses once: arguments in, one Python value out, made by its [`Answer`] impl
//! (rows.rs): named frozen pyclasses for rows, JSON columns decoded with `json.loads`,
//! timestamps as aware `datetime`. The typed face of this module is python/iterflow/_core.pyi.

// The methods mirror the Python protocol's signatures (plus the pump and its ticket).
#![allow(clippy::too_many_arguments)]

mod rows;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use iterflow_core::core::{Filter, InsertChunk, StepWrite};
use iterflow_core::value::Param;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDateTime, PyDict, PyList, PyString};

use crate::rows::{Answer, Changed, FirstRow, Pruned, QueryRows};

create_exception!(
    iterflow._core,
    CoreError,
    PyException,
    "An error from the Rust core; `code` is stable (e.g. DATABASE_ERROR), `message` is for \
     humans (PostgreSQL's own text for a database error), `sqlstate` is PostgreSQL's code when \
     the server sent one, `detail` its DETAIL, and `transient` says whether retrying the call \
     later may succeed (the connection was lost or refused, the server is restarting, ...)."
);

/// The process-wide runtime and the pid of the process that created it.
struct OwnedRuntime {
    runtime: tokio::runtime::Runtime,
    pid: u32,
}

static RUNTIME: OnceLock<Result<OwnedRuntime, String>> = OnceLock::new();

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
    Ok(&owned.runtime)
}

/// Turn a core error into `iterflow._core.CoreError` with attributes `code`, `message`,
/// `sqlstate`, `detail` and `transient` (what `iterflow.faults` classifies and converts by).
/// `str()` of the exception is `"<code>: <the error's Display>"`; `message` is the text
/// alone: PostgreSQL's message (with detail and hint) for a database error, whose SQLSTATE
/// is in `sqlstate`.
fn to_py_err(err: iterflow_core::CoreError) -> PyErr {
    let code = err.code();
    let text = err.to_string();
    let message = match &err {
        iterflow_core::CoreError::Database(fault) => fault.text(),
        iterflow_core::CoreError::SchemaMismatch(m) => m.clone(),
        other => other.to_string(),
    };
    let sqlstate = err.sqlstate().map(str::to_string);
    let detail = err.fault().and_then(|f| f.detail.clone());
    let transient = err.is_transient();
    Python::attach(|py| {
        let py_err = CoreError::new_err(format!("{code}: {text}"));
        let value = py_err.value(py);
        // Setting attributes on a fresh exception instance cannot reasonably fail; if it
        // does, the exception still carries the code in its text.
        let _ = value.setattr("code", code);
        let _ = value.setattr("message", message);
        let _ = value.setattr("sqlstate", sqlstate);
        let _ = value.setattr("detail", detail);
        let _ = value.setattr("transient", transient);
        py_err
    })
}

/// `value` as a count in `1..=max`, or INVALID_ARGUMENT naming `what` (so an absurd size is
/// refused at the boundary instead of exhausting memory or panicking deep in the core).
fn bounded(what: &str, value: usize, max: usize) -> PyResult<usize> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(to_py_err(iterflow_core::CoreError::InvalidArgument(
            format!("{what} must be between 1 and {max}, got {value}"),
        )))
    }
}

/// Most group-commit writer tasks one core may run.
const MAX_WRITER_SHARDS: usize = 1024;
/// Most ops in one group-commit transaction.
const MAX_BATCH: usize = 1_000_000;

/// A finished call waiting for the loop thread: its value is converted there, holding the GIL.
type Done = Box<dyn for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>> + Send>;

/// A call started by Python, not yet handed to the runtime.
type Queued = Pin<Box<dyn Future<Output = ()> + Send>>;

struct PumpInner {
    done: Mutex<Vec<(u64, Done)>>,
    /// Write end of the pipe the event loop watches (`loop.add_reader`); owned from here on.
    fd: i32,
    aborts: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// Calls made since the last `flush`: spawning each one from the loop thread would wake a
    /// runtime thread per call (a futex syscall, ~10us on the loop's critical path).
    queued: Mutex<Vec<Queued>>,
}

impl Drop for PumpInner {
    fn drop(&mut self) {
        // the write end was handed over by Python; nothing can write to it any more
        drop(unsafe { std::fs::File::from_raw_fd(self.fd) });
    }
}

impl PumpInner {
    fn push(&self, ticket: u64, done: Done) {
        let was_empty = {
            let mut q = self.done.lock().expect("pump lock");
            q.push((ticket, done));
            q.len() == 1
        };
        if was_empty {
            // one byte per batch of completions; a full (non-blocking) pipe already has one
            // pending, so a failed write loses nothing
            let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.fd) });
            let _ = (&*file).write(&[1u8]);
        }
    }
}

/// Completion pump of one event loop: calls take a ticket and return at once; results queue
/// here and the loop thread drains them in batches after one pipe wake-up. Runtime threads
/// never take the GIL, and the loop pays one wake-up per batch, not per call.
#[pyclass(frozen, module = "iterflow._core")]
struct Pump {
    inner: Arc<PumpInner>,
}

#[pymethods]
impl Pump {
    #[new]
    fn new(fd: i32) -> Self {
        Pump {
            inner: Arc::new(PumpInner {
                done: Mutex::new(Vec::new()),
                fd,
                aborts: Mutex::new(HashMap::new()),
                queued: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Every finished call since the last drain: `[(ticket, ok, value_or_exception)]`.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let done = std::mem::take(&mut *self.inner.done.lock().expect("pump lock"));
        let out = PyList::empty(py);
        for (ticket, finish) in done {
            match finish(py) {
                Ok(value) => out.append((ticket, true, value))?,
                Err(err) => out.append((ticket, false, err.into_value(py)))?,
            }
        }
        Ok(out)
    }

    /// Start every call queued since the last flush, as one runtime task. Python calls this
    /// once per event-loop turn in which it made calls.
    fn flush(&self) -> PyResult<()> {
        let queued = std::mem::take(&mut *self.inner.queued.lock().expect("pump lock"));
        if queued.is_empty() {
            return Ok(());
        }
        let rt = runtime()?;
        rt.spawn(async move {
            let mut calls: FuturesUnordered<Queued> = queued.into_iter().collect();
            while calls.next().await.is_some() {}
        });
        Ok(())
    }

    /// Abort a cancellable call (the waits) whose awaiting task was cancelled.
    fn cancel(&self, ticket: u64) {
        if let Some(handle) = self.inner.aborts.lock().expect("pump lock").remove(&ticket) {
            handle.abort();
        }
    }
}

/// The result of a call as the pump's finished entry: converted by its [`Answer`] on the
/// loop thread.
fn done<T: Answer>(result: Result<T, iterflow_core::CoreError>) -> Done {
    Box::new(move |py| match result {
        Ok(value) => value.answer(py),
        Err(err) => Err(to_py_err(err)),
    })
}

/// Queue `fut` to run on the runtime at the pump's next `flush`; its answer is delivered
/// through `pump` under `ticket`.
fn spawn<F, T>(pump: &Pump, ticket: u64, fut: F) -> PyResult<()>
where
    F: Future<Output = Result<T, iterflow_core::CoreError>> + Send + 'static,
    T: Answer,
{
    runtime()?;
    let inner = pump.inner.clone();
    let call: Queued = Box::pin(async move {
        let result = fut.await;
        inner.push(ticket, done(result));
    });
    pump.inner.queued.lock().expect("pump lock").push(call);
    Ok(())
}

/// `spawn` for calls Python may cancel (waits): the task is aborted on `Pump.cancel`.
fn spawn_cancellable<F, T>(pump: &Pump, ticket: u64, fut: F) -> PyResult<()>
where
    F: Future<Output = Result<T, iterflow_core::CoreError>> + Send + 'static,
    T: Answer,
{
    let rt = runtime()?;
    let inner = pump.inner.clone();
    // hold the map while spawning: the task removes its entry when done, never before it exists
    let mut aborts = pump.inner.aborts.lock().expect("pump lock");
    let task = rt.spawn(async move {
        let result = fut.await;
        inner.aborts.lock().expect("pump lock").remove(&ticket);
        inner.push(ticket, done(result));
    });
    aborts.insert(ticket, task.abort_handle());
    Ok(())
}

/// One binding: run `$call` (an expression over `$core`, a clone of this binding's core,
/// giving a future of a `Result<impl Answer, CoreError>`) on the runtime through `$pump`.
/// Arguments the call borrows are moved into the future first.
macro_rules! call {
    ($self:ident, $pump:ident, $ticket:ident, |$core:ident| $call:expr) => {{
        let $core = $self.core.clone();
        spawn($pump, $ticket, async move { $call.await })
    }};
}

fn utc(ob: &Bound<'_, PyAny>) -> PyResult<DateTime<Utc>> {
    ob.extract::<DateTime<Utc>>()
        .map_err(|_| PyTypeError::new_err("expected a datetime in UTC (datetime.timezone.utc)"))
}

fn opt_utc(ob: Option<&Bound<'_, PyAny>>) -> PyResult<Option<DateTime<Utc>>> {
    match ob {
        Some(o) if !o.is_none() => utc(o).map(Some),
        _ => Ok(None),
    }
}

/// Already-encoded JSON, for the generic `query` (sent as jsonb).
#[pyclass(frozen, module = "iterflow._core")]
struct Json {
    text: String,
}

#[pymethods]
impl Json {
    #[new]
    fn new(text: String) -> Self {
        Json { text }
    }
}

fn param(ob: &Bound<'_, PyAny>) -> PyResult<Param> {
    if ob.is_none() {
        return Ok(Param::Null);
    }
    if let Ok(j) = ob.cast::<Json>() {
        return Ok(Param::Json(j.get().text.clone()));
    }
    if let Ok(b) = ob.cast::<pyo3::types::PyBool>() {
        return Ok(Param::Bool(b.is_true()));
    }
    if let Ok(i) = ob.extract::<i64>() {
        if ob.cast::<pyo3::types::PyInt>().is_ok() {
            return Ok(Param::Int(i));
        }
    }
    if let Ok(f) = ob.cast::<pyo3::types::PyFloat>() {
        return Ok(Param::Float(f.value()));
    }
    if let Ok(s) = ob.cast::<PyString>() {
        return Ok(Param::Text(s.to_str()?.to_string()));
    }
    if ob.cast::<PyDateTime>().is_ok() {
        return Ok(Param::Ts(utc(ob)?));
    }
    if let Ok(items) = ob.extract::<Vec<String>>() {
        return Ok(Param::TextArray(items));
    }
    if let Ok(items) = ob.extract::<Vec<i64>>() {
        return Ok(Param::IntArray(items));
    }
    Err(PyTypeError::new_err(format!(
        "cannot send {} as a query parameter",
        ob.get_type().name()?
    )))
}

fn chunks(items: Vec<(String, String, usize)>) -> Vec<InsertChunk> {
    items
        .into_iter()
        .map(|(rows_json, find_json, len)| InsertChunk {
            rows_json,
            find_json,
            len,
        })
        .collect()
}

fn filter(
    name: Option<String>,
    statuses: Option<Vec<String>>,
    tag: Option<String>,
    since: Option<&Bound<'_, PyAny>>,
    until: Option<&Bound<'_, PyAny>>,
) -> PyResult<Filter> {
    Ok(Filter {
        name,
        statuses,
        tag,
        since: opt_utc(since)?,
        until: opt_utc(until)?,
    })
}

/// A timeout in seconds as a Duration: negative means none, NaN too (`Duration` panics on
/// it), and anything beyond ~31 years is capped.
fn secs(timeout: f64) -> Duration {
    if timeout.is_nan() {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(timeout.clamp(0.0, 1e9))
}

/// The Rust core of one engine: a pool, a group-commit writer and a listener.
#[pyclass(frozen, module = "iterflow._core")]
struct Core {
    core: iterflow_core::Core,
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (dsn, schema, pool_size=10, notify=true, application_name="iterflow".to_string(), writer_shards=1, max_batch=256, listen_dsn=None, prepared_statements=true))]
    fn new(
        dsn: String,
        schema: String,
        pool_size: usize,
        notify: bool,
        application_name: String,
        writer_shards: usize,
        max_batch: usize,
        listen_dsn: Option<String>,
        prepared_statements: bool,
    ) -> PyResult<Self> {
        let rt = runtime()?;
        let _entered = rt.enter();
        let mut opts = iterflow_core::CoreOptions::new(dsn, schema);
        opts.pool_size = bounded("pool_size", pool_size, iterflow_core::pool::MAX_POOL_SIZE)?;
        opts.notify = notify;
        opts.application_name = application_name;
        opts.writer_shards = bounded("writer_shards", writer_shards, MAX_WRITER_SHARDS)?;
        opts.max_batch = bounded("max_batch", max_batch, MAX_BATCH)?;
        opts.listen_dsn = listen_dsn;
        opts.prepared_statements = prepared_statements;
        let core = iterflow_core::Core::open(opts).map_err(to_py_err)?;
        Ok(Core { core })
    }

    /// Counters: writer batching, listener state and pool (for tests and benches).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let w = self.core.writer_stats();
        let d = PyDict::new(py);
        d.set_item("writes", w.ops)?;
        d.set_item("write_statements", w.statements)?;
        d.set_item("write_transactions", w.transactions)?;
        d.set_item("write_batches", w.batches)?;
        d.set_item("write_splits", w.split)?;
        d.set_item("max_batch", w.max_batch)?;
        d.set_item("listening", self.core.listening())?;
        d.set_item("pool_size", self.core.pool().size())?;
        d.set_item("pool_idle", self.core.pool().idle_count())?;
        d.set_item(
            "notifications",
            self.core
                .hub()
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
        )?;
        Ok(d)
    }

    fn close(&self, pump: &Pump, ticket: u64) -> PyResult<()> {
        call!(self, pump, ticket, |core| async {
            core.close().await;
            Ok(())
        })
    }

    fn check_schema(&self, pump: &Pump, ticket: u64, need: i64) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.check_schema(need))
    }

    /// `chunks`: [(rows_json, find_json, n)], `wake`: flow names of runs ready now.
    fn insert_runs(
        &self,
        pump: &Pump,
        ticket: u64,
        chunks_: Vec<(String, String, usize)>,
        wake: Vec<String>,
    ) -> PyResult<()> {
        let chunks = chunks(chunks_);
        call!(self, pump, ticket, |core| core.insert_runs(&chunks, wake))
    }

    #[pyo3(signature = (pump, ticket, run_id, name, payload, key))]
    fn deliver_signal(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        name: String,
        payload: Option<String>,
        key: Option<String>,
    ) -> PyResult<()> {
        call!(self, pump, ticket, |core| core
            .deliver_signal(&run_id, &name, payload, key))
    }

    fn cancel(&self, pump: &Pump, ticket: u64, run_id: String, reason: String) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.cancel(&run_id, &reason))
    }

    fn retry(&self, pump: &Pump, ticket: u64, run_id: String) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.retry(&run_id))
    }

    fn get_run(&self, pump: &Pump, ticket: u64, run_id: String) -> PyResult<()> {
        call!(self, pump, ticket, |core| async {
            Ok(core.get_run(&run_id).await?.map(FirstRow))
        })
    }

    fn run_detail(&self, pump: &Pump, ticket: u64, run_id: String) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.run_detail(&run_id))
    }

    #[pyo3(signature = (pump, ticket, name, statuses, tag, since, until, cursor_at, cursor_id, limit))]
    fn list_runs(
        &self,
        pump: &Pump,
        ticket: u64,
        name: Option<String>,
        statuses: Option<Vec<String>>,
        tag: Option<String>,
        since: Option<&Bound<'_, PyAny>>,
        until: Option<&Bound<'_, PyAny>>,
        cursor_at: Option<&Bound<'_, PyAny>>,
        cursor_id: Option<String>,
        limit: i64,
    ) -> PyResult<()> {
        let flt = filter(name, statuses, tag, since, until)?;
        let cursor = match (opt_utc(cursor_at)?, cursor_id) {
            (Some(at), Some(id)) => Some((at, id)),
            _ => None,
        };
        call!(self, pump, ticket, |core| core
            .list_runs(&flt, limit, cursor))
    }

    #[pyo3(signature = (pump, ticket, name, statuses, tag, since, until, limit))]
    fn select_runs(
        &self,
        pump: &Pump,
        ticket: u64,
        name: Option<String>,
        statuses: Option<Vec<String>>,
        tag: Option<String>,
        since: Option<&Bound<'_, PyAny>>,
        until: Option<&Bound<'_, PyAny>>,
        limit: i64,
    ) -> PyResult<()> {
        let flt = filter(name, statuses, tag, since, until)?;
        call!(self, pump, ticket, |core| core.select_runs(&flt, limit))
    }

    fn purge(&self, pump: &Pump, ticket: u64, run_ids: Vec<String>) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.purge(&run_ids))
    }

    /// -> `ChangedRuns`; waits up to `timeout` seconds for a change. Cancellable.
    fn changed_runs(&self, pump: &Pump, ticket: u64, timeout: f64) -> PyResult<()> {
        let core = self.core.clone();
        spawn_cancellable(pump, ticket, async move {
            let (changes, listening) = core.changed_runs(secs(timeout)).await;
            Ok(Changed { changes, listening })
        })
    }

    /// -> `Woken`: up to `limit` runs `owner` holds in its sticky cache that other processes
    /// woke, announced ones claimed by id as their wake-ups arrive, handed ones as their
    /// notices say (`iterflow_core::Core::claim_woken`); waits up to `timeout` seconds for one.
    /// Cancellable while it waits; a claim that started reports the runs it leased.
    fn claim_woken(
        &self,
        pump: &Pump,
        ticket: u64,
        owner: String,
        lease_ms: i64,
        limit: usize,
        timeout: f64,
    ) -> PyResult<()> {
        let core = self.core.clone();
        spawn_cancellable(pump, ticket, async move {
            core.claim_woken(&owner, lease_ms, limit.max(1), secs(timeout))
                .await
        })
    }

    /// The stamp of the last release of step-limit channel `channel` heard (0: none).
    fn limit_seen(&self, channel: &str) -> u64 {
        self.core.limit_seen(channel)
    }

    /// -> None once a release of `channel` after stamp `seen` is heard, or after `timeout`
    /// seconds. Cancellable.
    fn wait_limit(
        &self,
        pump: &Pump,
        ticket: u64,
        channel: String,
        seen: u64,
        timeout: f64,
    ) -> PyResult<()> {
        let core = self.core.clone();
        spawn_cancellable(pump, ticket, async move {
            core.wait_limit(&channel, seen, secs(timeout)).await;
            Ok(())
        })
    }

    /// The `wait_runs` rows (one per id, in one statement) as dicts.
    fn wait_runs(&self, pump: &Pump, ticket: u64, run_ids: Vec<String>) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.wait_runs(&run_ids))
    }

    /// -> [`ClaimedRun`]; with `wait` (seconds), first waits until new work may be ready
    /// (`iterflow_core::Core::claim_when_ready`). Not cancellable: a claim that started
    /// always reports the runs it leased.
    #[pyo3(signature = (pump, ticket, names, limit, owner, lease_ms, wait=None))]
    fn claim(
        &self,
        pump: &Pump,
        ticket: u64,
        names: Vec<String>,
        limit: i64,
        owner: String,
        lease_ms: i64,
        wait: Option<f64>,
    ) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.claim_when_ready(
            &names,
            limit,
            &owner,
            lease_ms,
            wait.map(secs)
        ))
    }

    /// -> list of [`ClaimedRun`]: the runs held in the sticky cache that could be claimed by
    /// id, with only the records of their waits (`iterflow_core::Core::claim_runs`).
    /// `run_ids` and `expected` (the lease tokens they are held under) are parallel.
    fn claim_runs(
        &self,
        pump: &Pump,
        ticket: u64,
        run_ids: Vec<String>,
        owner: String,
        lease_ms: i64,
        expected: Vec<i64>,
    ) -> PyResult<()> {
        if run_ids.len() != expected.len() {
            return Err(PyValueError::new_err(
                "claim_runs: run_ids and expected must be as long",
            ));
        }
        let held: Vec<(String, i64)> = run_ids.into_iter().zip(expected).collect();
        call!(self, pump, ticket, |core| core
            .claim_runs(&held, &owner, lease_ms))
    }

    /// -> `StoredStep`
    #[pyo3(signature = (pump, ticket, run_id, key, seq, kind, name, status, result, error, attempts, deadline, child_id))]
    fn record_step(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        key: String,
        seq: i64,
        kind: String,
        name: String,
        status: String,
        result: Option<String>,
        error: Option<String>,
        attempts: i64,
        deadline: Option<&Bound<'_, PyAny>>,
        child_id: Option<String>,
    ) -> PyResult<()> {
        let rec = StepWrite {
            key,
            seq,
            kind,
            name,
            status,
            result,
            error,
            attempts,
            deadline: opt_utc(deadline)?,
            child_id,
        };
        spawn(pump, ticket, self.core.record_step(&run_id, &rec))
    }

    /// `records`: [(key, seq, kind, name)] waiting records, one per child, in order.
    fn spawn_children(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        records: Vec<(String, i64, String, String)>,
        chunks_: Vec<(String, String, usize)>,
        wake: Vec<String>,
    ) -> PyResult<()> {
        let recs: Vec<StepWrite> = records
            .into_iter()
            .map(|(key, seq, kind, name)| StepWrite {
                key,
                seq,
                kind,
                name,
                status: "waiting".into(),
                ..Default::default()
            })
            .collect();
        let chunks = chunks(chunks_);
        call!(self, pump, ticket, |core| core
            .spawn_children(&run_id, &recs, &chunks, wake))
    }

    /// -> `Resolved`
    fn resolve_signal(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        key: String,
        seq: i64,
        name: String,
        deadline_passed: bool,
        timeout_error: String,
    ) -> PyResult<()> {
        let fut =
            self.core
                .resolve_signal(&run_id, &key, seq, &name, deadline_passed, &timeout_error);
        spawn(pump, ticket, fut)
    }

    #[pyo3(signature = (pump, ticket, run_id, token, status, waiting, wake_at, attempts_delta))]
    fn suspend(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        token: i64,
        status: String,
        waiting: String,
        wake_at: Option<&Bound<'_, PyAny>>,
        attempts_delta: Option<i64>,
    ) -> PyResult<()> {
        let wake_at = opt_utc(wake_at)?;
        let fut = self
            .core
            .suspend(&run_id, token, &status, &waiting, wake_at, attempts_delta);
        spawn(pump, ticket, fut)
    }

    #[pyo3(signature = (pump, ticket, run_id, token, status, output, error))]
    fn finish(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        token: Option<i64>,
        status: String,
        output: Option<String>,
        error: Option<String>,
    ) -> PyResult<()> {
        let fut = self.core.finish(&run_id, token, &status, output, error);
        spawn(pump, ticket, fut)
    }

    /// -> bool; `ctx.continue_as_new` (`iterflow_core::Core::continue_run`).
    fn continue_run(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        token: i64,
        new_id: String,
        input: String,
    ) -> PyResult<()> {
        call!(self, pump, ticket, |core| core
            .continue_run(&run_id, token, &new_id, input))
    }

    #[pyo3(signature = (pump, ticket, run_id, kind, data))]
    fn add_event(
        &self,
        pump: &Pump,
        ticket: u64,
        run_id: String,
        kind: String,
        data: Option<String>,
    ) -> PyResult<()> {
        spawn(pump, ticket, self.core.add_event(&run_id, &kind, data))
    }

    /// -> [`LeaseState`]
    fn heartbeat(
        &self,
        pump: &Pump,
        ticket: u64,
        leases: Vec<(String, i64)>,
        lease_ms: i64,
    ) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.heartbeat(&leases, lease_ms))
    }

    fn expire_leases(&self, pump: &Pump, ticket: u64, limit: i64) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.expire_leases(limit))
    }

    fn next_due(&self, pump: &Pump, ticket: u64, names: Vec<String>) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.next_due(&names))
    }

    fn requeue_parked(&self, pump: &Pump, ticket: u64, names: Vec<String>) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.requeue_parked(&names))
    }

    /// Open the LISTEN connection now rather than at the first wait (a worker calls this as
    /// it starts, so wake-ups sent meanwhile are heard).
    fn listen(&self) -> PyResult<()> {
        let _entered = runtime()?.enter();
        self.core.listen();
        Ok(())
    }

    /// New work may be ready (this process knows it): a waiting `claim` claims now.
    fn nudge(&self) {
        self.core.hub().wake_work();
    }

    /// -> {"lost", "parents", "orphans"} or None when another process holds the lock.
    fn reconcile(&self, pump: &Pump, ticket: u64, stale_ms: i64) -> PyResult<()> {
        call!(self, pump, ticket, |core| core.reconcile(stale_ms))
    }

    /// -> {"events", "runs"} or None when another process holds the retention lock.
    #[pyo3(signature = (pump, ticket, events_ms, runs_ms, batch))]
    fn prune(
        &self,
        pump: &Pump,
        ticket: u64,
        events_ms: Option<i64>,
        runs_ms: Option<i64>,
        batch: i64,
    ) -> PyResult<()> {
        call!(self, pump, ticket, |core| async {
            let pruned = core.prune(events_ms, runs_ms, batch).await?;
            Ok(pruned.map(|(events, runs)| Pruned { events, runs }))
        })
    }

    #[pyo3(signature = (pump, ticket, names))]
    fn pending_work(&self, pump: &Pump, ticket: u64, names: Option<Vec<String>>) -> PyResult<()> {
        call!(self, pump, ticket, |core| core
            .pending_work(names.as_deref()))
    }

    /// Any named statement -> `QueryResult`.
    fn query(
        &self,
        pump: &Pump,
        ticket: u64,
        name: String,
        params: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let params = params.iter().map(param).collect::<PyResult<Vec<_>>>()?;
        call!(self, pump, ticket, |core| async {
            Ok(QueryRows(core.query(&name, &params).await?))
        })
    }
}

/// Connect to `dsn`, run `SHOW server_version` and answer it (through `pump`, like a call).
#[pyfunction]
fn check_connection(pump: &Pump, ticket: u64, dsn: String) -> PyResult<()> {
    spawn(pump, ticket, async move {
        iterflow_core::pool::check_connection(&dsn).await
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add_class::<Core>()?;
    m.add_class::<Json>()?;
    m.add_class::<Pump>()?;
    rows::register(m)?;
    m.add_function(wrap_pyfunction!(check_connection, m)?)?;
    Ok(())
}
