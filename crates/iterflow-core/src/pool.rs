//! A small bounded pool of tokio-postgres connections, each with a cache of the named
//! statements it has prepared. Hand-written (instead of deadpool) because the hot path needs
//! exactly this: per-connection prepared statements keyed by query name, an
//! `application_name` on every connection, connections that left a transaction open dropped
//! instead of reused, and a permit count that bounds connections to the database.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::queries::Queries;
use crate::value::{Param, Rows, Val};
use crate::CoreError;

/// Parse a DSN (URL or key=value) into a config.
pub fn parse_dsn(dsn: &str) -> Result<Config, CoreError> {
    dsn.parse()
        .map_err(|e| CoreError::InvalidArgument(format!("dsn: {e}")))
}

/// Connect one client, driving its connection on a spawned task.
pub async fn connect(config: &Config) -> Result<Client, CoreError> {
    let (client, connection) = config.connect(NoTls).await?;
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
    let (client, connection) = config.connect(NoTls).await?;
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
}

impl Conn {
    /// The prepared statement for query `name` (prepared on first use on this connection).
    pub async fn stmt(&mut self, name: &str) -> Result<Statement, CoreError> {
        if let Some(stmt) = self.stmts.get(name) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(self.queries.get(name)?).await?;
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
        let prepared =
            futures_util::future::try_join_all(texts.iter().map(|t| client.prepare(t))).await?;
        for (name, stmt) in missing.into_iter().zip(prepared) {
            self.stmts.insert(name.to_string(), stmt);
        }
        Ok(())
    }

    /// Run query `name` with `params` and collect its rows.
    pub async fn query(&mut self, name: &str, params: &[Param]) -> Result<Rows, CoreError> {
        let stmt = self.stmt(name).await?;
        run(&self.client, &stmt, params).await
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
    pub fn new(config: Config, queries: Arc<Queries>, size: usize) -> Pool {
        let size = size.max(1);
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

    /// Check out a connection (waits while `size` are in use).
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
                Some(conn) if conn.client.is_closed() => continue,
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
            conn: Some(Conn {
                client,
                stmts: HashMap::new(),
                queries: self.inner.queries.clone(),
            }),
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

/// A checked-out connection; back to the pool on drop unless broken or left mid-transaction.
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
        self.client.batch_execute("BEGIN").await?;
        Ok(())
    }

    /// `COMMIT` if `result` is Ok, else `ROLLBACK`; returns `result` (or the commit's error).
    pub async fn end<T>(&mut self, result: Result<T, CoreError>) -> Result<T, CoreError> {
        match result {
            Ok(value) => {
                self.client.batch_execute("COMMIT").await?;
                self.clean();
                Ok(value)
            }
            Err(err) => {
                if self.client.batch_execute("ROLLBACK").await.is_ok() {
                    self.clean();
                }
                Err(err)
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
            if !self.dirty && !conn.client.is_closed() && !self.pool.permits.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                }
            }
        }
    }
}
