//! iterflow-core: the Rust hot path of iterflow (durable workflows on PostgreSQL).
//!
//! Pure Rust, no PyO3: everything here is testable with `cargo test`. The Python
//! bindings live in the `iterflow-py` crate and stay thin.

pub mod error;
pub mod pool;

pub use error::CoreError;

/// The crate version (kept equal to the Python package version).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
