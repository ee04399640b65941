//! Errors raised by the core. Each variant has a stable `code()` matching the Python
//! package's error codes (`iterflow.errors.Code`).
//!
//! A database failure is captured as a [`DbFault`] the moment it leaves tokio-postgres: the
//! server's own words (SQLSTATE, message, detail, hint) or, when the server never answered,
//! a sentence built from the error's `source()` chain, plus the one decision callers need,
//! [`DbFault::transient`]. Capturing (instead of keeping the `tokio_postgres::Error`) makes
//! the error `Clone`, so the group-commit writer can hand one failure to every op of a batch.

use std::error::Error as _;
use std::fmt;

/// SQLSTATE classes that mean "try again": the connection itself failed.
const TRANSIENT_CLASSES: &[&str] = &[
    "08", // connection exception
];
/// SQLSTATEs that mean "try again": the statement failed because of the server's or the
/// network's state, not because of what it asked. Kept equal to `iterflow/faults.py`.
const TRANSIENT_STATES: &[&str] = &[
    "57P01", // admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now (starting up, shutting down, in recovery)
    "57P05", // idle_session_timeout
    "53300", // too_many_connections
    "53400", // configuration_limit_exceeded
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available
    "25P03", // idle_in_transaction_session_timeout
];

/// Whether a statement that failed with SQLSTATE `state` may succeed if retried later.
pub fn is_transient_state(state: &str) -> bool {
    TRANSIENT_STATES.contains(&state) || TRANSIENT_CLASSES.iter().any(|c| state.starts_with(c))
}

/// A database failure, captured: what PostgreSQL said, or what happened to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFault {
    /// PostgreSQL's SQLSTATE; None when the server sent no error (connection lost or refused).
    pub sqlstate: Option<String>,
    /// PostgreSQL's message, or a sentence saying what happened to the connection.
    pub message: String,
    /// PostgreSQL's DETAIL, if any.
    pub detail: Option<String>,
    /// PostgreSQL's HINT, if any.
    pub hint: Option<String>,
    /// Whether retrying the same call later may succeed (an infrastructure fault).
    pub transient: bool,
}

impl DbFault {
    /// Capture `err`. Without a server error, a fault of the connection (closed, io, refused,
    /// timed out) is transient; a client-side one (encoding, decoding, configuration) is not.
    pub fn from_pg(err: &tokio_postgres::Error) -> DbFault {
        if let Some(db) = err.as_db_error() {
            let state = db.code().code();
            return DbFault {
                sqlstate: Some(state.to_string()),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
                transient: is_transient_state(state),
            };
        }
        let transient = is_connection_fault(err);
        let chain = chain(err);
        let message = if err.is_closed() {
            "connection lost: the server closed the connection".to_string()
        } else if transient {
            format!("connection lost: {chain}")
        } else {
            chain
        };
        DbFault {
            sqlstate: None,
            message,
            detail: None,
            hint: None,
            transient,
        }
    }

    /// Capture a failure to connect to `target` (e.g. `127.0.0.1:5432`): a server error
    /// (too many clients, starting up, bad password) keeps PostgreSQL's words; anything else
    /// reads "cannot connect to <target>: <reason>".
    pub fn connecting(target: &str, err: &tokio_postgres::Error) -> DbFault {
        let mut fault = DbFault::from_pg(err);
        if fault.sqlstate.is_none() {
            let reason = innermost(err);
            fault.message = format!("cannot connect to {target}: {reason}");
        }
        fault
    }

    /// The message with PostgreSQL's detail and hint, without the SQLSTATE (for Python's
    /// `message` attribute, which carries the SQLSTATE apart).
    pub fn text(&self) -> String {
        let mut text = self.message.clone();
        if let Some(detail) = &self.detail {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = &self.hint {
            text.push_str(&format!(" (hint: {hint})"));
        }
        text
    }
}

impl fmt::Display for DbFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(state) => write!(f, "database error {state}: {}", self.text()),
            None => f.write_str(&self.text()),
        }
    }
}

/// tokio-postgres keeps its error kind private; a connection fault is told apart by what it
/// carries: the client's channel is closed, or an io error (reset, refused, timed out) is in
/// the chain. Encoding and decoding errors carry neither.
fn is_connection_fault(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    let mut source = err.source();
    while let Some(e) = source {
        if e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `err` and its sources, joined by ": " (tokio-postgres' own Display says only the kind).
fn chain(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The deepest cause of `err` (e.g. "Connection refused (os error 111)"), or `err` itself.
fn innermost(err: &tokio_postgres::Error) -> String {
    let mut last: &dyn std::error::Error = err;
    while let Some(e) = last.source() {
        last = e;
    }
    last.to_string()
}

/// An error from the core; `code()` is the stable contract, the message is for humans.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    /// The database refused, failed or could not be reached.
    #[error("{0}")]
    Database(DbFault),
    /// A caller passed a malformed value (bad DSN, bad schema name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The database schema is missing or older than this engine needs.
    #[error("{0}")]
    SchemaMismatch(String),
    /// The core was closed (or never opened) when the call was made.
    #[error("the core is closed")]
    Closed,
}

impl From<tokio_postgres::Error> for CoreError {
    fn from(err: tokio_postgres::Error) -> CoreError {
        CoreError::Database(DbFault::from_pg(&err))
    }
}

impl CoreError {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::Database(_) => "DATABASE_ERROR",
            CoreError::InvalidArgument(_) => "INVALID_ARGUMENT",
            CoreError::SchemaMismatch(_) => "SCHEMA_MISMATCH",
            CoreError::Closed => "CORE_CLOSED",
        }
    }

    /// The SQLSTATE of a database error, if the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            CoreError::Database(fault) => fault.sqlstate.as_deref(),
            _ => None,
        }
    }

    /// Whether retrying the same call later may succeed: the connection was lost or refused,
    /// or the server failed the statement for its own state (see [`is_transient_state`]).
    /// Never true for a refused argument, a schema mismatch or a closed core.
    pub fn is_transient(&self) -> bool {
        matches!(self, CoreError::Database(fault) if fault.transient)
    }

    /// The captured database failure, if this is one.
    pub fn fault(&self) -> Option<&DbFault> {
        match self {
            CoreError::Database(fault) => Some(fault),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(state: Option<&str>, transient: bool) -> DbFault {
        DbFault {
            sqlstate: state.map(str::to_string),
            message: "sorry, too many clients already".into(),
            detail: None,
            hint: None,
            transient,
        }
    }

    #[test]
    fn transient_states_are_those_of_faults_py() {
        for state in [
            "08000", "08006", "08P01", "57P01", "57P02", "57P03", "57P05", "53300", "53400",
            "40001", "40P01", "55P03", "25P03",
        ] {
            assert!(is_transient_state(state), "{state}");
        }
        for state in [
            "42P01", "23505", "22P02", "57014", "53100", "40002", "25P02", "XX000",
        ] {
            assert!(!is_transient_state(state), "{state}");
        }
    }

    #[test]
    fn a_server_error_shows_its_sqlstate_message_detail_and_hint() {
        let plain = CoreError::Database(fault(Some("53300"), true));
        assert_eq!(
            plain.to_string(),
            "database error 53300: sorry, too many clients already"
        );
        assert_eq!(plain.sqlstate(), Some("53300"));
        assert!(plain.is_transient());
        let full = DbFault {
            detail: Some("Key (id)=(1) already exists.".into()),
            hint: Some("Try another.".into()),
            ..fault(Some("23505"), false)
        };
        assert_eq!(
            full.to_string(),
            "database error 23505: sorry, too many clients already \
             (detail: Key (id)=(1) already exists.) (hint: Try another.)"
        );
    }

    #[test]
    fn only_database_faults_are_transient() {
        assert!(!CoreError::Database(fault(Some("42P01"), false)).is_transient());
        assert!(CoreError::Database(fault(None, true)).is_transient());
        assert!(!CoreError::Closed.is_transient());
        assert!(!CoreError::InvalidArgument("x".into()).is_transient());
        assert_eq!(CoreError::Database(fault(None, true)).sqlstate(), None);
    }
}
