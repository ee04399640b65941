mod common;

use common::database_url;
use iterflow_core::{pool::check_connection, CoreError};

#[tokio::test]
async fn returns_the_server_version() {
    let Some(url) = database_url() else { return };
    let version = check_connection(&url).await.expect("connect");
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "unexpected server_version {version:?}"
    );
}

#[tokio::test]
async fn a_malformed_dsn_is_an_invalid_argument() {
    let err = check_connection("postgresql://[::1").await.unwrap_err();
    assert!(matches!(err, CoreError::InvalidArgument(_)), "{err:?}");
    assert_eq!(err.code(), "INVALID_ARGUMENT");
}

#[tokio::test]
async fn an_unreachable_server_is_a_database_error() {
    // Port 1 on loopback: nothing listens there, the connect is refused at once.
    let err = check_connection("host=127.0.0.1 port=1 user=postgres connect_timeout=5")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "DATABASE_ERROR");
}

#[test]
fn version_is_the_package_version() {
    assert_eq!(iterflow_core::version(), env!("CARGO_PKG_VERSION"));
    assert!(!iterflow_core::version().is_empty());
}
