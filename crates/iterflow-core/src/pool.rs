//! Connections to PostgreSQL (tokio-postgres). For now only a connectivity check; the
//! pool used by the hot path will live here.

use tokio_postgres::NoTls;

use crate::CoreError;

/// Connect to `dsn`, run `SHOW server_version` and return it (e.g. `"15.19 (Debian ...)"`).
pub async fn check_connection(dsn: &str) -> Result<String, CoreError> {
    let config: tokio_postgres::Config = dsn
        .parse()
        .map_err(|e| CoreError::InvalidArgument(format!("dsn: {e}")))?;
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let result = client.query_one("SHOW server_version", &[]).await;
    drop(client);
    // The connection task ends once the client is dropped; its own error (if any) is
    // secondary to the query's.
    let _ = driver.await;
    Ok(result?.get(0))
}
