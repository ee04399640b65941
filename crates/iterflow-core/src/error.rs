//! Errors raised by the core. Each variant has a stable `code()` matching the Python
//! package's error codes (`iterflow.errors.Code`).

/// An error from the core; `code()` is the stable contract, the message is for humans.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The database refused, failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
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
            CoreError::Database(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}
