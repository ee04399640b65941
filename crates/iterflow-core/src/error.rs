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
}

impl CoreError {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::Database(_) => "DATABASE_ERROR",
            CoreError::InvalidArgument(_) => "INVALID_ARGUMENT",
        }
    }
}
