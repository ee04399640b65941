//! The named values that cross from the Rust core to Python, and [`Answer`]: how each core
//! result becomes the Python value of the protocol (python/iterflow/cores/base.py).
//!
//! Rows are frozen pyclasses with named fields, read by attribute in cores/rust.py; each has a
//! Python counterpart of the same field names (cores/base.py `ClaimedRun`, `StepRecord`,
//! `StoredStep`, `Resolved`, `Created`, `LeaseState`, `ChangedRuns`) or is typed in
//! python/iterflow/_core.pyi only (`QueryResult`). tests/test_seam.py compares all three sides.
//! JSON columns are decoded here, on the loop thread, so Python receives ready values.

use iterflow_core::core::{self as core, RunDetail};
use iterflow_core::listener::Changes;
use iterflow_core::value::{Rows, Val};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString};
use pyo3::IntoPyObjectExt;

/// A finished call's value as the Python value the protocol wants; built on the loop thread
/// (holding the GIL) when the pump is drained, never on a runtime thread.
pub(crate) trait Answer: Send + 'static {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>>;
}

/// Values that already are what Python wants.
macro_rules! as_is {
    ($($t:ty),*) => {$(
        impl Answer for $t {
            fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
                self.into_bound_py_any(py)
            }
        }
    )*};
}
as_is!((), bool, i64, u64, f64, String);

impl<T: Answer> Answer for Option<T> {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        match self {
            Some(v) => v.answer(py),
            None => Ok(py.None().into_bound(py)),
        }
    }
}

impl<T: Answer> Answer for Vec<T> {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let out = PyList::empty(py);
        for v in self {
            out.append(v.answer(py)?)?;
        }
        Ok(out.into_any())
    }
}

static JSON_LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn json_loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let loads = JSON_LOADS.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("json")?.getattr("loads")?.unbind())
    })?;
    loads.bind(py).call1((text,))
}

/// A JSON column as its Python value (None for SQL NULL and JSON `null`).
fn opt_json(py: Python<'_>, text: Option<String>) -> PyResult<Py<PyAny>> {
    match text.as_deref() {
        // most step results are `null`: skip the json.loads call
        Some("null") | None => Ok(py.None()),
        Some(t) => Ok(json_loads(py, t)?.unbind()),
    }
}

/// One column value as Python (uuids as `uuid.UUID`, like the psycopg core's rows).
fn val<'py>(py: Python<'py>, v: &Val) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Val::Null => py.None().into_bound(py),
        Val::Bool(b) => b.into_bound_py_any(py)?,
        Val::Int(i) => i.into_bound_py_any(py)?,
        Val::Float(f) => f.into_bound_py_any(py)?,
        Val::Text(s) => PyString::new(py, s).into_any(),
        Val::Json(s) => json_loads(py, s)?,
        Val::Ts(t) => t.into_bound_py_any(py)?,
        Val::Uuid(u) => u.into_bound_py_any(py)?,
        Val::Interval(secs) => {
            chrono::Duration::microseconds((secs * 1e6) as i64).into_bound_py_any(py)?
        }
        Val::TextArray(items) => PyList::new(py, items)?.into_any(),
    })
}

/// Rows as a list of dicts keyed by column name (like the psycopg core's rows).
pub(crate) fn dicts<'py>(py: Python<'py>, rows: &Rows) -> PyResult<Bound<'py, PyList>> {
    let keys: Vec<Bound<'py, PyString>> =
        rows.columns.iter().map(|c| PyString::new(py, c)).collect();
    let out = PyList::empty(py);
    for row in &rows.rows {
        let d = PyDict::new(py);
        for (k, v) in keys.iter().zip(row) {
            d.set_item(k, val(py, v)?)?;
        }
        out.append(d)?;
    }
    Ok(out)
}

impl Answer for Rows {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        Ok(dicts(py, &self)?.into_any())
    }
}

/// The first row of a result as a dict (None when there is none): `get_run`.
pub(crate) struct FirstRow(pub Rows);

impl Answer for FirstRow {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let rows = dicts(py, &self.0)?;
        match rows.len() {
            0 => Ok(py.None().into_bound(py)),
            _ => rows.get_item(0),
        }
    }
}

/// `run_detail` as the protocol's dict: `run` (one row) and the lists of rows of its parts.
impl Answer for RunDetail {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let d = PyDict::new(py);
        d.set_item("run", FirstRow(self.run).answer(py)?)?;
        d.set_item("steps", dicts(py, &self.steps)?)?;
        d.set_item("signals", dicts(py, &self.signals)?)?;
        d.set_item("children", dicts(py, &self.children)?)?;
        d.set_item("events", dicts(py, &self.events)?)?;
        d.set_item("timer", dicts(py, &self.timer)?)?;
        Ok(d.into_any())
    }
}

/// `reconcile`'s counts as the protocol's dict.
impl Answer for core::Reconciled {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let d = PyDict::new(py);
        d.set_item("lost", self.lost)?;
        d.set_item("parents", self.parents)?;
        d.set_item("orphans", self.orphans)?;
        Ok(d.into_any())
    }
}

/// What one `prune` pass deleted, as the protocol's dict.
pub(crate) struct Pruned {
    pub events: u64,
    pub runs: u64,
}

impl Answer for Pruned {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let d = PyDict::new(py);
        d.set_item("events", self.events)?;
        d.set_item("runs", self.runs)?;
        Ok(d.into_any())
    }
}

/// Answer with a pyclass built from a core value.
macro_rules! pyclass_answer {
    ($($core:ty => $class:ident),*) => {$(
        impl Answer for $core {
            fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
                Ok(Bound::new(py, $class::build(py, self)?)?.into_any())
            }
        }
    )*};
}
pyclass_answer!(
    core::Claimed => ClaimedRun,
    core::Woken => Woken,
    core::Stored => StoredStep,
    core::Resolved => Resolved,
    core::Created => Created,
    core::LeaseState => LeaseState,
    Changed => ChangedRuns
);

/// A string as Python, made once: fields holding Python objects are read by plain member
/// descriptors, so a read in cores/rust.py converts nothing.
fn pystr(py: Python<'_>, s: &str) -> Py<PyString> {
    PyString::new(py, s).unbind()
}

/// An optional value as Python (`None` when absent), made once (see [`pystr`]).
fn pyobj<'py, T: IntoPyObject<'py>>(py: Python<'py>, v: T) -> PyResult<Py<PyAny>> {
    v.into_py_any(py)
}

/// One memoized ctx call of a claimed run's history (cores/base.py `StepRecord`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct StepRecord {
    key: Py<PyString>,
    seq: i64,
    kind: Py<PyString>,
    name: Py<PyString>,
    status: Py<PyString>,
    result: Py<PyAny>,
    error: Py<PyAny>,
    attempts: i64,
    /// `datetime | None`, like every optional field below
    deadline: Py<PyAny>,
    child_id: Py<PyAny>,
    child_status: Py<PyAny>,
    child_output: Py<PyAny>,
    child_error: Py<PyAny>,
    finished_at: Py<PyAny>,
}

impl StepRecord {
    fn build(py: Python<'_>, s: core::StepRow) -> PyResult<Self> {
        Ok(StepRecord {
            key: pystr(py, &s.key),
            seq: s.seq,
            kind: pystr(py, &s.kind),
            name: pystr(py, &s.name),
            status: pystr(py, &s.status),
            result: opt_json(py, s.result)?,
            error: opt_json(py, s.error)?,
            attempts: s.attempts,
            deadline: pyobj(py, s.deadline)?,
            child_id: pyobj(py, s.child_id)?,
            child_status: pyobj(py, s.child_status)?,
            child_output: opt_json(py, s.child_output)?,
            child_error: opt_json(py, s.child_error)?,
            finished_at: pyobj(py, s.finished_at)?,
        })
    }
}

/// A leased run with its history (cores/base.py `ClaimedRun`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct ClaimedRun {
    run_id: Py<PyString>,
    lease_token: i64,
    name: Py<PyString>,
    version: i64,
    input: Py<PyAny>,
    attempts: i64,
    cancel_reason: Py<PyAny>,
    parent_id: Py<PyAny>,
    depth: i64,
    created_at: Py<PyAny>,
    parent_status: Py<PyAny>,
    db_now: Py<PyAny>,
    /// `int | None`
    held_token: Py<PyAny>,
    /// `list[StepRecord]`
    history: Py<PyList>,
}

/// `items` as a Python list of the pyclass values `build` makes of them.
fn pylist<T, C: pyo3::PyClass + Into<pyo3::PyClassInitializer<C>>>(
    py: Python<'_>,
    items: Vec<T>,
    build: impl Fn(Python<'_>, T) -> PyResult<C>,
) -> PyResult<Py<PyList>> {
    let list = PyList::empty(py);
    for item in items {
        list.append(Bound::new(py, build(py, item)?)?)?;
    }
    Ok(list.unbind())
}

impl ClaimedRun {
    fn build(py: Python<'_>, r: core::Claimed) -> PyResult<Self> {
        let history = pylist(py, r.history, StepRecord::build)?;
        Ok(ClaimedRun {
            run_id: pystr(py, &r.run_id),
            lease_token: r.lease_token,
            name: pystr(py, &r.name),
            version: r.version,
            input: opt_json(py, r.input)?,
            attempts: r.attempts,
            cancel_reason: pyobj(py, r.cancel_reason)?,
            parent_id: pyobj(py, r.parent_id)?,
            depth: r.depth,
            created_at: pyobj(py, r.created_at)?,
            parent_status: pyobj(py, r.parent_status)?,
            db_now: pyobj(py, r.db_now)?,
            held_token: pyobj(py, r.held_token)?,
            history,
        })
    }
}

/// Held runs other processes woke (cores/base.py `Woken`; cores/rust.py decodes `handed`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct Woken {
    /// `list[ClaimedRun]`: announced, claimed by id
    claimed: Py<PyList>,
    /// `list[HandedRun]`: leased to this worker by the waking transaction
    handed: Py<PyList>,
}

impl Woken {
    fn build(py: Python<'_>, w: core::Woken) -> PyResult<Self> {
        Ok(Woken {
            claimed: pylist(py, w.claimed, ClaimedRun::build)?,
            handed: pylist(py, w.handed, |py, h| {
                Ok(HandedRun {
                    run_id: pystr(py, &h.run_id),
                    held_token: h.token,
                    notice: pystr(py, h.handoff.as_deref().unwrap_or("")),
                })
            })?,
        })
    }
}

/// A held run handed to this worker: the `H` notice's parts, its claim still JSON text
/// (decoded by cores/base.py `Handoff.from_notice`, the same for both cores).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct HandedRun {
    run_id: Py<PyString>,
    held_token: i64,
    notice: Py<PyString>,
}

/// What `record_step` left in the database (cores/base.py `StoredStep`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct StoredStep {
    status: Py<PyString>,
    result: Py<PyAny>,
    error: Py<PyAny>,
    written: bool,
    finished_at: Py<PyAny>,
}

impl StoredStep {
    fn build(py: Python<'_>, s: core::Stored) -> PyResult<Self> {
        Ok(StoredStep {
            status: pystr(py, &s.status),
            result: opt_json(py, s.result)?,
            error: opt_json(py, s.error)?,
            written: s.written,
            finished_at: pyobj(py, s.finished_at)?,
        })
    }
}

/// The outcome of `resolve_signal`: `outcome` is "signal", "timeout" or "none".
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct Resolved {
    outcome: Py<PyString>,
    payload: Py<PyAny>,
    at: Py<PyAny>,
}

impl Resolved {
    fn build(py: Python<'_>, r: core::Resolved) -> PyResult<Self> {
        Ok(Resolved {
            outcome: pystr(py, &r.outcome),
            payload: opt_json(py, r.payload)?,
            at: pyobj(py, r.at)?,
        })
    }
}

/// One run of an insert: found (`created` false) or written by it (cores/base.py `Created`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct Created {
    run_id: String,
    status: String,
    created: bool,
}

impl Created {
    fn build(_py: Python<'_>, c: core::Created) -> PyResult<Self> {
        Ok(Created {
            run_id: c.run_id,
            status: c.status,
            created: c.created,
        })
    }
}

/// Whether a lease is still held, and a pending cancel (cores/base.py `LeaseState`).
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct LeaseState {
    run_id: String,
    held: bool,
    cancel_reason: Option<String>,
}

impl LeaseState {
    fn build(_py: Python<'_>, s: core::LeaseState) -> PyResult<Self> {
        Ok(LeaseState {
            run_id: s.run_id,
            held: s.held,
            cancel_reason: s.cancel_reason,
        })
    }
}

/// `Core::changed_runs`'s answer: the changes and whether LISTEN is up.
pub(crate) struct Changed {
    pub changes: Changes,
    pub listening: bool,
}

/// The runs that may have changed; `everything`: re-read them all; `listening`: LISTEN is up.
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct ChangedRuns {
    run_ids: Vec<String>,
    everything: bool,
    listening: bool,
}

impl ChangedRuns {
    fn build(_py: Python<'_>, c: Changed) -> PyResult<Self> {
        Ok(ChangedRuns {
            run_ids: c.changes.ids,
            everything: c.changes.everything,
            listening: c.listening,
        })
    }
}

/// A generic statement's result: its rows as dicts, the rows it affected, and whether it
/// returns rows at all.
#[pyclass(frozen, get_all, module = "iterflow._core")]
pub(crate) struct QueryResult {
    rows: Py<PyList>,
    rowcount: u64,
    has_columns: bool,
}

/// The rows of a generic statement, answered as a [`QueryResult`].
pub(crate) struct QueryRows(pub Rows);

impl Answer for QueryRows {
    fn answer(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        let result = QueryResult {
            rows: dicts(py, &self.0)?.unbind(),
            rowcount: self.0.affected,
            has_columns: !self.0.columns.is_empty(),
        };
        Ok(Bound::new(py, result)?.into_any())
    }
}

/// Register the row classes on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ClaimedRun>()?;
    m.add_class::<Woken>()?;
    m.add_class::<HandedRun>()?;
    m.add_class::<StepRecord>()?;
    m.add_class::<StoredStep>()?;
    m.add_class::<Resolved>()?;
    m.add_class::<Created>()?;
    m.add_class::<LeaseState>()?;
    m.add_class::<ChangedRuns>()?;
    m.add_class::<QueryResult>()?;
    Ok(())
}
