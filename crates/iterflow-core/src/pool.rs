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
//!
//! Statements ([`Prepared`]) reach the server in one of two ways, chosen per pool:
//!
//! - **named** (the default): each connection prepares a query once, by name, and then only
//!   binds and executes it. Fastest, but the statement lives in the server session, so a
//!   pooler in transaction mode (PgBouncer before 1.21) breaks it: the next transaction may
//!   run on a server connection that never saw the statement, or that holds another client's
//!   statement of the same name.
//! - **unnamed** (`CoreOptions::prepared_statements = false`, docs/operations.md "Behind
//!   PgBouncer"): every execution sends Parse (the unnamed statement), Bind, Describe, Execute
//!   and Sync in one message, with the parameter types given up front, so no statement
//!   outlives its round trip. The contract: the types are the ones the server infers for the
//!   query, learnt once per pool and query name ([`Shape`]) by preparing the query by name
//!   and closing it again *inside one transaction*, which pins one server connection for the
//!   whole exchange even behind a transaction-mode pooler. [`Param`] therefore encodes exactly
//!   as on the named path. A statement pipelined with others must run inside an explicit
//!   transaction (every pipeline of this crate does: the writer's batches, `run_detail`,
//!   `spawn_children`), since a pooler may hand autocommit statements of one pipeline to
//!   different server connections.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::Host;
use tokio_postgres::types::Type;
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

/// What the server inferred for one query: the parameter types its unnamed executions are
/// sent with, and its column names (an execution that returns no row reports none).
#[derive(Debug)]
pub struct Shape {
    text: String,
    params: Vec<Type>,
    columns: Vec<String>,
}

/// The shapes one unnamed-statement pool has learnt, by query name.
type Shapes = Mutex<HashMap<String, Arc<Shape>>>;

/// A statement ready to execute (see the module doc).
#[derive(Clone)]
pub enum Prepared {
    /// Prepared by name on the connection it came from.
    Named(Statement),
    /// Sent as the unnamed statement at each execution.
    Unnamed(Arc<Shape>),
}

impl Prepared {
    /// The parameter types the server expects.
    pub fn params(&self) -> &[Type] {
        match self {
            Prepared::Named(stmt) => stmt.params(),
            Prepared::Unnamed(shape) => &shape.params,
        }
    }

    fn columns(&self) -> Vec<String> {
        match self {
            Prepared::Named(stmt) => stmt
                .columns()
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
            Prepared::Unnamed(shape) => shape.columns.clone(),
        }
    }
}

/// One pooled connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    stmts: HashMap<String, Statement>,
    /// Some: the unnamed-statement mode, with the pool's shared shapes.
    shapes: Option<Arc<Shapes>>,
    queries: Arc<Queries>,
    /// A database error was seen here: the connection is closed instead of reused.
    broken: bool,
    /// Possibly inside a transaction: closed instead of reused if it goes back like this.
    dirty: bool,
}

impl Conn {
    fn new(client: Client, queries: Arc<Queries>, shapes: Option<Arc<Shapes>>) -> Conn {
        Conn {
            client,
            stmts: HashMap::new(),
            shapes,
            queries,
            broken: false,
            dirty: false,
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

    /// The statement for query `name`: prepared on first use on this connection, or (unnamed
    /// mode) its shape, described on first use in this pool.
    pub async fn stmt(&mut self, name: &str) -> Result<Prepared, CoreError> {
        if let Some(shapes) = self.shapes.clone() {
            if let Some(shape) = shape_of(&shapes, name) {
                return Ok(Prepared::Unnamed(shape));
            }
            self.describe(&shapes, &[name]).await?;
            return shape_of(&shapes, name)
                .map(Prepared::Unnamed)
                .ok_or_else(|| CoreError::InvalidArgument(format!("unknown query {name}")));
        }
        if let Some(stmt) = self.stmts.get(name) {
            return Ok(Prepared::Named(stmt.clone()));
        }
        let text = self.queries.get(name)?;
        let prepared = self.client.prepare(text).await.map_err(CoreError::from);
        let stmt = self.seen(prepared)?;
        self.stmts.insert(name.to_string(), stmt.clone());
        Ok(Prepared::Named(stmt))
    }

    /// Prepare (or, unnamed, describe) every statement in `names` not known yet, pipelined.
    pub async fn prepare_all(&mut self, names: &[&str]) -> Result<(), CoreError> {
        let known = |n: &str| match &self.shapes {
            Some(shapes) => shape_of(shapes, n).is_some(),
            None => self.stmts.contains_key(n),
        };
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !known(n))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(shapes) = self.shapes.clone() {
            return self.describe(&shapes, &missing).await;
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

    /// Learn the shapes of `names`: prepare them by name (pipelined) and close them again, in
    /// one transaction so that a pooler keeps one server connection for all of it (the
    /// caller's own when it is already in one). The Close messages go out before `COMMIT`.
    async fn describe(&mut self, shapes: &Shapes, names: &[&str]) -> Result<(), CoreError> {
        let texts = names
            .iter()
            .map(|n| self.queries.get(n))
            .collect::<Result<Vec<_>, _>>()?;
        let own_transaction = !self.dirty;
        let client = &self.client;
        let described = async {
            if own_transaction {
                client.batch_execute("BEGIN").await?;
            }
            let stmts =
                futures_util::future::try_join_all(texts.iter().map(|t| client.prepare(t))).await?;
            let learnt: Vec<Shape> = stmts
                .iter()
                .zip(&texts)
                .map(|(stmt, text)| Shape {
                    text: text.to_string(),
                    params: stmt.params().to_vec(),
                    columns: stmt
                        .columns()
                        .iter()
                        .map(|c| c.name().to_string())
                        .collect(),
                })
                .collect();
            drop(stmts);
            if own_transaction {
                client.batch_execute("COMMIT").await?;
            }
            Ok::<_, tokio_postgres::Error>(learnt)
        }
        .await
        .map_err(CoreError::from);
        let learnt = self.seen(described)?;
        if let Ok(mut known) = shapes.lock() {
            for (name, shape) in names.iter().zip(learnt) {
                known.insert(name.to_string(), Arc::new(shape));
            }
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

fn shape_of(shapes: &Shapes, name: &str) -> Option<Arc<Shape>> {
    shapes
        .lock()
        .ok()
        .and_then(|known| known.get(name).cloned())
}

/// Execute a statement and collect every row as [`Val`]s.
pub async fn run(client: &Client, stmt: &Prepared, params: &[Param]) -> Result<Rows, CoreError> {
    let stream = match stmt {
        Prepared::Named(named) => client.query_raw(named, params.iter()).await?,
        Prepared::Unnamed(shape) => {
            if shape.params.len() != params.len() {
                return Err(CoreError::InvalidArgument(format!(
                    "statement expects {} parameters, got {}",
                    shape.params.len(),
                    params.len()
                )));
            }
            let typed = params.iter().zip(shape.params.iter().cloned());
            client.query_typed_raw(&shape.text, typed).await?
        }
    };
    let mut stream = pin!(stream);
    let columns = stmt.columns();
    let width = columns.len();
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
        columns,
        rows,
        affected,
    })
}

struct PoolInner {
    config: Config,
    queries: Arc<Queries>,
    /// Some: unnamed statements (see the module doc).
    shapes: Option<Arc<Shapes>>,
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
    /// A pool of `size` connections (clamped to 1..=[`MAX_POOL_SIZE`]); `named` chooses how
    /// statements are sent (see the module doc).
    pub fn new(config: Config, queries: Arc<Queries>, size: usize, named: bool) -> Pool {
        let size = size.clamp(1, MAX_POOL_SIZE);
        Pool {
            inner: Arc::new(PoolInner {
                config,
                queries,
                shapes: (!named).then(|| Arc::new(Shapes::default())),
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
                    })
                }
                None => break,
            }
        }
        let client = connect(&self.inner.config).await?;
        Ok(PooledConn {
            conn: Some(Conn::new(
                client,
                self.inner.queries.clone(),
                self.inner.shapes.clone(),
            )),
            pool: self.inner.clone(),
            _permit: permit,
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
            if !conn.dirty && conn.reusable() && !self.pool.permits.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                }
            }
        }
    }
}
