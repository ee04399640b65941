//! Database faults against a real PostgreSQL ($DATABASE_URL; skipped when unset): errors carry
//! PostgreSQL's own text and SQLSTATE, a lost connection is transient and costs one call, and
//! a writer batch whose connection dies answers all its ops at once.
//!
//! A call is caught "in flight" deterministically: an admin transaction holds an ACCESS
//! EXCLUSIVE lock on the table the call needs, the test waits until the core's backend waits
//! on that lock, then terminates the core's backends (found by `application_name`).

mod common;

use std::time::{Duration, Instant};

use iterflow_core::core::InsertChunk;
use iterflow_core::pool::check_connection;
use iterflow_core::{Core, CoreOptions};
use serde_json::json;

use common::{admin, database_url, drop_schema, schema_name};

const APP: &str = "iterflow-faults";

fn open(url: &str, schema: &str, notify: bool) -> Core {
    let mut opts = CoreOptions::new(url, schema);
    opts.notify = notify;
    opts.pool_size = 4;
    opts.application_name = APP.into();
    Core::open(opts).expect("open core")
}

/// The `application_name` of the pool's connections of a core on `schema`.
fn pool_name(schema: &str) -> String {
    format!("{APP}:{schema}")
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `n` new runs of flow "f".
fn runs(n: usize) -> InsertChunk {
    let rows: Vec<_> = (0..n)
        .map(|i| {
            json!({"ord": i, "id": new_id(), "name": "f", "version": 1, "idempotency_key": null,
                   "tags": [], "priority": 0, "parent_id": null, "parent_key": null,
                   "depth": 1, "delay_ms": 0, "input": {"n": i}})
        })
        .collect();
    let find: Vec<_> = (0..n)
        .map(|i| {
            json!({"ord": i, "name": "f", "version": 1, "idempotency_key": null,
                   "parent_id": null, "parent_key": null})
        })
        .collect();
    InsertChunk {
        rows_json: serde_json::to_string(&rows).unwrap(),
        find_json: serde_json::to_string(&find).unwrap(),
        len: n,
    }
}

/// An admin transaction holding an ACCESS EXCLUSIVE lock on `schema.table` until dropped
/// (the connection closes, the server rolls back).
async fn lock_table(url: &str, schema: &str, table: &str) -> tokio_postgres::Client {
    let client = admin(url).await;
    client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{schema}\".{table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .expect("lock");
    client
}

/// Wait until a backend named `app` waits on a lock.
async fn wait_for_lock_wait(url: &str, app: &str) {
    let client = admin(url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no backend of {app} waits on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Terminate every backend named `app`; returns how many were.
async fn terminate(url: &str, app: &str) -> i64 {
    admin(url)
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_statement_error_carries_postgres_text_and_sqlstate() {
    let Some(url) = database_url() else { return };
    // never migrated: every statement names a relation that does not exist
    let schema = schema_name("rf");
    let core = open(&url, &schema, false);
    let err = core.get_run(&new_id()).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(err.code(), "DATABASE_ERROR");
    assert_eq!(err.sqlstate(), Some("42P01"), "{err:?}");
    assert!(text.starts_with("database error 42P01: "), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains(&schema), "{text}");
    assert!(!err.is_transient());
    // the pool is still usable after an error (the connection that saw it was replaced)
    let again = core.get_run(&new_id()).await.unwrap_err();
    assert_eq!(again.sqlstate(), Some("42P01"));
    core.close().await;
}

#[tokio::test]
async fn a_refused_connection_is_transient_and_names_the_server() {
    // Port 1 on loopback: nothing listens there, the connect is refused at once.
    let started = Instant::now();
    let err = check_connection("host=127.0.0.1 port=1 user=postgres")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot connect to 127.0.0.1:1: "),
        "{text}"
    );
    assert!(!text.contains("db error"), "{text}");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.sqlstate(), None);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_server_error_at_connect_keeps_postgres_words() {
    let Some(url) = database_url() else { return };
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.dbname("iterflow_no_such_database");
    // rebuild a key=value DSN from the parsed URL's parts
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let dsn = format!("host={host} port={port} user={user} dbname=iterflow_no_such_database");
    let err = check_connection(&dsn).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("3D000"), "{err:?}");
    assert!(
        err.to_string().contains("iterflow_no_such_database"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_terminated_connection_fails_one_call_transiently_then_the_pool_reconnects() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rf").await;
    let core = open(&url, &schema, false);
    let id = new_id();
    assert!(core.get_run(&id).await.unwrap().is_none()); // a pooled connection exists
    let lock = lock_table(&url, &schema, "runs").await;
    let call = tokio::spawn({
        let core = core.clone();
        let id = id.clone();
        async move { core.get_run(&id).await }
    });
    wait_for_lock_wait(&url, &pool_name(&schema)).await;
    assert!(terminate(&url, &pool_name(&schema)).await >= 1);
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(!err.to_string().contains("db error"), "{err}");
    drop(lock);
    // the dead connection is not reused: the next call connects anew and succeeds
    assert!(core.get_run(&id).await.unwrap().is_none());
    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn a_writer_batch_whose_connection_dies_answers_every_op_transiently() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rf").await;
    let core = open(&url, &schema, false);
    let made = core.insert_runs(&[runs(8)], vec![]).await.unwrap();
    core.add_event(&made[0].run_id, "warm", None).await.unwrap();
    let before = core.writer_stats();
    let lock = lock_table(&url, &schema, "events").await;
    // queued together before the writer task runs (current-thread runtime): one batch
    let pending: Vec<_> = made
        .iter()
        .map(|c| core.add_event(&c.run_id, "e", None))
        .collect();
    let batch = tokio::spawn(futures_util::future::join_all(pending));
    wait_for_lock_wait(&url, &pool_name(&schema)).await;
    assert!(terminate(&url, &pool_name(&schema)).await >= 1);
    let terminated = Instant::now();
    // (split one by one, each op would wait on the lock again: answered only once it is gone)
    let results = tokio::time::timeout(Duration::from_secs(5), batch)
        .await
        .expect("the batch's ops were not answered promptly")
        .unwrap();
    let answered = terminated.elapsed();
    drop(lock);
    assert_eq!(results.len(), made.len());
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(!err.to_string().contains("db error"), "{err}");
    }
    assert!(
        answered < Duration::from_secs(2),
        "answered after {answered:?}"
    );
    let after = core.writer_stats();
    assert_eq!(
        after.split, before.split,
        "a dead connection's batch is not split"
    );
    assert_eq!(after.unavailable, before.unavailable + 1);
    // the writer recovers on a new connection
    core.add_event(&made[1].run_id, "after", None)
        .await
        .unwrap();
    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn the_listener_reconnects_and_asks_waiters_to_re_read_after_its_connection_dies() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rf").await;
    let core = open(&url, &schema, true);
    core.listen();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !core.listening() {
        assert!(Instant::now() < deadline, "the listener never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // drain what the first connect announced
    let _ = core.changed_runs(Duration::from_millis(10)).await;
    let waiter = tokio::spawn({
        let core = core.clone();
        async move {
            let started = Instant::now();
            let (changes, _) = core.changed_runs(Duration::from_secs(30)).await;
            assert!(
                changes.everything,
                "a reconnect must ask for a full re-read"
            );
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listen_name = format!("{APP}-listen:{schema}");
    assert_eq!(terminate(&url, &listen_name).await, 1);
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter was not woken by the reconnect")
        .unwrap();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(core.listening());
    core.close().await;
    drop_schema(&url, &schema).await;
}
