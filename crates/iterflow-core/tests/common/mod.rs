//! What every database test of the crate shares: the test database, an admin connection,
//! and scratch schemas migrated with python/iterflow/migrations/.

#![allow(dead_code)] // each test binary uses its own subset

use iterflow_core::queries::{render, MIGRATIONS};
use tokio_postgres::NoTls;

/// `$DATABASE_URL`, or None (the calling test then skips, saying so).
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("DATABASE_URL is not set: skipping the database test");
            None
        }
    }
}

/// A plain connection for setting up and inspecting, outside any core.
pub async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// A fresh schema name starting with `prefix`.
pub fn schema_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A migrated scratch schema named with `prefix`, dropped by `drop_schema`.
pub async fn scratch(url: &str, prefix: &str) -> String {
    let schema = schema_name(prefix);
    let client = admin(url).await;
    for migration in MIGRATIONS {
        client
            .batch_execute(&render(migration, &schema))
            .await
            .expect("migrate");
    }
    schema
}

pub async fn drop_schema(url: &str, schema: &str) {
    let _ = admin(url)
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await;
}
