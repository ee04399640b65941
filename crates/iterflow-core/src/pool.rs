//! A small bounded pool of tokio-postgres connections, each with a cache of the named
//! statements it has prepared. Hand-written (instead of deadpool) because the hot path needs
//! exactly this: per-connection prepared statements keyed by query name, an
//! `application_name` on every connection, connections that left a transaction open dropped
//! instead of reused, and a permit count that bounds connections to the database.
//!
//! Faults: a connection that saw a database error, that was left inside a transaction, or
//! whose server went away is closed instead of going back to the pool, so one dead
//! connection costs one failed call, and the next checkout connects anew. Connecting fails
//! fast (see [`CONNECT_TIMEOUT`]) with an error that names the server it tried.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::error::DbFault;
use crate::queries::Queries;
use crate::value::{Param, Rows, Val};
use crate::CoreError;

/// Most connections one pool may hold (a larger pool is a configuration mistake, and a
/// semaphore of absurd size would panic).
pub const MAX_POOL_SIZE: usize = 10_000;

/// How long one connection attempt may take when the DSN sets no `connect_timeout`: a server
/// that is down or unreachable must fail the call promptly (the caller retries with backoff),
/// not hang it on the operating system's TCP timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parse a DSN (URL or key=value) into a config, with [`CONNECT_TIMEOUT`] unless the DSN
/// sets its own.
pub fn parse_dsn(dsn: &str) -> Result<Config, CoreError> {
    let mut config: Config = dsn
        .parse()
        .map_err(|e| CoreError::InvalidArgument(format!("dsn: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// The servers `config` connects to, for error messages: `host:port`, comma separated.
pub fn target(config: &Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| match ports {
        [] => 5432,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(5432),
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        "the database server".to_string()
    } else {
        hosts.join(", ")
    }
}

/// Connect one client, driving its connection on a spawned task.
pub async fn connect(config: &Config) -> Result<Client, CoreError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| CoreError::Database(DbFault::connecting(&target(config), &e)))?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped or the server goes away; callers see
        // the failure on their next query.
        let _ = connection.await;
    });
    Ok(client)
}

/// Connect to `dsn`, run `SHOW server_version` and return it (e.g. `"15.19 (Debian ...)"`).
pub async fn check_connection(dsn: &str) -> Result<String, CoreError> {
    let config = parse_dsn(dsn)?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| CoreError::Database(DbFault::connecting(&target(&config), &e)))?;
    let driver = tokio::spawn(connection);
    let result = client.query_one("SHOW server_version", &[]).await;
    drop(client);
    // The connection task ends once the client is dropped; its own error (if any) is
    // secondary to the query's.
    let _ = driver.await;
    Ok(result?.get(0))
}

/// One pooled connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    stmts: HashMap<String, Statement>,
    queries: Arc<Queries>,
    /// A database error was seen here: the connection is closed instead of reused.
    broken: bool,
}

impl Conn {
    fn new(client: Client, queries: Arc<Queries>) -> Conn {
        Conn {
            client,
            stmts: HashMap::new(),
            queries,
            broken: false,
        }
    }

    /// Never reuse this connection: it is closed when its checkout ends. For a caller that
    /// saw a database error on it through `client` directly.
    pub fn discard(&mut self) {
        self.broken = true;
    }

    /// Pass `result` on, discarding the connection if it is a database error: whether the
    /// server failed the statement or the connection died, its state is no longer known for
    /// sure (and a dead connection may not report `is_closed` yet).
    fn seen<T>(&mut self, result: Result<T, CoreError>) -> Result<T, CoreError> {
        if let Err(CoreError::Database(_)) = &result {
            self.broken = true;
        }
        result
    }

    /// Whether this connection may go back to the pool.
    fn reusable(&self) -> bool {
        !self.broken && !self.client.is_closed()
    }

    /// The prepared statement for query `name` (prepared on first use on this connection).
    pub async fn stmt(&mut self, name: &str) -> Result<Statement, CoreError> {
        if let Some(stmt) = self.stmts.get(name) {
            return Ok(stmt.clone());
        }
        let text = self.queries.get(name)?;
        let prepared = self.client.prepare(text).await.map_err(CoreError::from);
        let stmt = self.seen(prepared)?;
        self.stmts.insert(name.to_string(), stmt.clone());
        Ok(stmt)
    }

    /// Prepare every statement in `names` that is not cached yet, pipelined.
    pub async fn prepare_all(&mut self, names: &[&str]) -> Result<(), CoreError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.stmts.contains_key(*n))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let texts = missing
            .iter()
            .map(|n| self.queries.get(n))
            .collect::<Result<Vec<_>, _>>()?;
        let client = &self.client;
        let prepared = futures_util::future::try_join_all(texts.iter().map(|t| client.prepare(t)))
            .await
            .map_err(CoreError::from);
        let prepared = self.seen(prepared)?;
        for (name, stmt) in missing.into_iter().zip(prepared) {
            self.stmts.insert(name.to_string(), stmt);
        }
        Ok(())
    }

    /// Run query `name` with `params` and collect its rows.
    pub async fn query(&mut self, name: &str, params: &[Param]) -> Result<Rows, CoreError> {
        let stmt = self.stmt(name).await?;
        let rows = run(&self.client, &stmt, params).await;
        self.seen(rows)
    }
}

/// Execute a prepared statement and collect every row as [`Val`]s.
pub async fn run(client: &Client, stmt: &Statement, params: &[Param]) -> Result<Rows, CoreError> {
    let stream = client.query_raw(stmt, params.iter()).await?;
    let mut stream = pin!(stream);
    let width = stmt.columns().len();
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        let mut vals = Vec::with_capacity(width);
        for i in 0..width {
            vals.push(row.try_get::<_, Val>(i)?);
        }
        rows.push(vals);
    }
    let affected = stream.rows_affected().unwrap_or(0);
    Ok(Rows {
        columns: stmt
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect(),
        rows,
        affected,
    })
}

struct PoolInner {
    config: Config,
    queries: Arc<Queries>,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    size: usize,
}

/// A bounded pool: at most `size` connections exist at once; they are opened lazily.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// A pool of `size` connections (clamped to 1..=[`MAX_POOL_SIZE`]).
    pub fn new(config: Config, queries: Arc<Queries>, size: usize) -> Pool {
        let size = size.clamp(1, MAX_POOL_SIZE);
        Pool {
            inner: Arc::new(PoolInner {
                config,
                queries,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size)),
                size,
            }),
        }
    }

    pub fn size(&self) -> usize {
        self.inner.size
    }

    pub fn queries(&self) -> &Arc<Queries> {
        &self.inner.queries
    }

    /// Connections currently open and idle in the pool.
    pub fn idle_count(&self) -> usize {
        self.inner.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Check out a connection (waits while `size` are in use). Idle connections whose
    /// server went away are dropped here; with none left, a new one is opened.
    pub async fn get(&self) -> Result<PooledConn, CoreError> {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CoreError::Closed)?;
        loop {
            let conn = self.inner.idle.lock().ok().and_then(|mut idle| idle.pop());
            match conn {
                Some(conn) if !conn.reusable() => continue,
                Some(conn) => {
                    return Ok(PooledConn {
                        conn: Some(conn),
                        pool: self.inner.clone(),
                        _permit: permit,
                        dirty: false,
                    })
                }
                None => break,
            }
        }
        let client = connect(&self.inner.config).await?;
        Ok(PooledConn {
            conn: Some(Conn::new(client, self.inner.queries.clone())),
            pool: self.inner.clone(),
            _permit: permit,
            dirty: false,
        })
    }

    /// Close idle connections and refuse new checkouts.
    pub fn close(&self) {
        self.inner.permits.close();
        if let Ok(mut idle) = self.inner.idle.lock() {
            idle.clear();
        }
    }

    /// Run one statement on a pooled connection (autocommit).
    pub async fn query(&self, name: &str, params: &[Param]) -> Result<Rows, CoreError> {
        let mut conn = self.get().await?;
        conn.query(name, params).await
    }
}

/// A checked-out connection; back to the pool on drop unless it saw a database error, its
/// server went away, or it was left mid-transaction.
pub struct PooledConn {
    conn: Option<Conn>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
    dirty: bool,
}

impl PooledConn {
    /// Mark the connection as possibly inside a transaction: if dropped before
    /// [`PooledConn::clean`], it is closed instead of reused.
    pub fn begin_dirty(&mut self) {
        self.dirty = true;
    }

    pub fn clean(&mut self) {
        self.dirty = false;
    }

    /// `BEGIN`; pair with [`PooledConn::end`].
    pub async fn begin(&mut self) -> Result<(), CoreError> {
        self.begin_dirty();
        let begun = self
            .client
            .batch_execute("BEGIN")
            .await
            .map_err(CoreError::from);
        self.seen(begun)
    }

    /// `COMMIT` if `result` is Ok, else `ROLLBACK`; returns `result` (or the commit's error).
    /// A database error in `result` (or from `COMMIT`) discards the connection.
    pub async fn end<T>(&mut self, result: Result<T, CoreError>) -> Result<T, CoreError> {
        match result {
            Ok(value) => {
                let committed = self
                    .client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(CoreError::from);
                self.seen(committed)?;
                self.clean();
                Ok(value)
            }
            Err(err) => {
                if self.client.batch_execute("ROLLBACK").await.is_ok() {
                    self.clean();
                }
                self.seen(Err(err))
            }
        }
    }
}

impl std::ops::Deref for PooledConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !self.dirty && conn.reusable() && !self.pool.permits.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                }
            }
        }
    }
}
