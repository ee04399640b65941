//! iterflow-core: the Rust hot path of iterflow (durable workflows on PostgreSQL).
//!
//! Pure Rust, no PyO3: everything here is testable with `cargo test`. The Python
//! bindings live in the `iterflow-py` crate and stay thin.
//!
//! - [`pool`]: a bounded tokio-postgres pool with per-connection prepared statements;
//! - [`queries`]: the named statements of `python/iterflow/sql/queries.sql`, rendered per schema;
//! - [`writer`]: group commit of step records, suspensions, completions and events;
//! - [`listener`]: one LISTEN connection fanned out to every waiter in the process;
//! - [`outbox`]: wake-up notifications sent after the commits they announce;
//! - [`core`]: the core protocol (`python/iterflow/cores/base.py`) on top of them.

pub mod core;
pub mod error;
pub mod listener;
pub mod outbox;
pub mod pool;
pub mod queries;
pub mod value;
pub mod writer;

pub use crate::core::{Core, CoreOptions};
pub use error::CoreError;

/// The crate version (kept equal to the Python package version).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
