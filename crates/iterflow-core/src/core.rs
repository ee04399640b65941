//! The core protocol (python/iterflow/cores/base.py `Core`) on tokio-postgres: every
//! database round trip and every wait of an engine.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::task::JoinHandle;

use crate::listener::{Changes, HeldWakeup, Hub, Listener};
use crate::outbox::{relay, Outbox};
use crate::pool::{parse_dsn, run, Pool, Prepared};
use crate::queries::Queries;
use crate::value::{Param, Rows, Val};
use crate::writer::{Coalesce, Writer, WriterCounts};
use crate::CoreError;

/// How a core is opened.
#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub dsn: String,
    pub schema: String,
    /// Connections in the pool (the LISTEN connection is extra).
    pub pool_size: usize,
    /// LISTEN for wake-ups and NOTIFY new work; off behind PgBouncer in transaction mode.
    /// The LISTEN connection opens on first need ([`Core::listen`]), so a process that only
    /// starts runs and sends signals never holds one nor hears every wake-up of the schema.
    pub notify: bool,
    /// Connections are named `<application_name>:<schema>`, the listener
    /// `<application_name>-listen:<schema>` (visible in `pg_stat_activity`).
    pub application_name: String,
    /// Group-commit writer tasks (ops of one run always go to the same one). One by default:
    /// each shard commits on its own, so more shards mean smaller batches, and the database
    /// pays per transaction (a WAL flush, BEGIN/COMMIT, one execution per statement).
    pub writer_shards: usize,
    /// Most ops in one group-commit transaction.
    pub max_batch: usize,
    /// Where the LISTEN connection goes (None: `dsn`). Behind a pooler in transaction mode,
    /// `dsn` is the pooler and this the server itself (docs/operations.md, "Behind PgBouncer").
    pub listen_dsn: Option<String>,
    /// Named server-side prepared statements (the default); false sends every statement as
    /// the unnamed one, which a transaction-mode pooler does not break (see `pool.rs`).
    pub prepared_statements: bool,
}

impl CoreOptions {
    pub fn new(dsn: impl Into<String>, schema: impl Into<String>) -> Self {
        CoreOptions {
            dsn: dsn.into(),
            schema: schema.into(),
            pool_size: 10,
            notify: true,
            application_name: "iterflow".into(),
            writer_shards: 1,
            max_batch: 256,
            listen_dsn: None,
            prepared_statements: true,
        }
    }
}

/// A run to create, already encoded by the caller in chunks: `rows_json` is the
/// `insert_runs` array (ords 0..len within the chunk), `find_json` the `find_existing_runs`
/// array for the same specs.
#[derive(Debug, Clone)]
pub struct InsertChunk {
    pub rows_json: String,
    pub find_json: String,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub run_id: String,
    pub status: String,
    pub created: bool,
}

/// A step record to write (`record_step`).
#[derive(Debug, Clone, Default)]
pub struct StepWrite {
    pub key: String,
    pub seq: i64,
    pub kind: String,
    pub name: String,
    pub status: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    pub deadline: Option<DateTime<Utc>>,
    pub child_id: Option<String>,
}

/// What `record_step` left in the database (JSON as text).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub status: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub written: bool,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step record of a claimed run's history (JSON as text).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub key: String,
    pub seq: i64,
    pub kind: String,
    pub name: String,
    pub status: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    pub deadline: Option<DateTime<Utc>>,
    pub child_id: Option<String>,
    pub child_status: Option<String>,
    pub child_output: Option<String>,
    pub child_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A leased run with its history.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub run_id: String,
    pub lease_token: i64,
    pub name: String,
    pub version: i64,
    pub input: Option<String>,
    pub attempts: i64,
    pub cancel_reason: Option<String>,
    pub parent_id: Option<String>,
    pub depth: i64,
    pub created_at: DateTime<Utc>,
    pub parent_status: Option<String>,
    pub db_now: DateTime<Utc>,
    /// The lease token under which a worker holds the run in its sticky cache, if any.
    pub held_token: Option<i64>,
    pub history: Vec<StepRow>,
}

/// What [`Core::claim_woken`] got: held runs claimed by id, and held runs handed off (their
/// wake-ups, each with its claim as JSON text in `handoff`).
#[derive(Debug, Default)]
pub struct Woken {
    pub claimed: Vec<Claimed>,
    pub handed: Vec<HeldWakeup>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseState {
    pub run_id: String,
    pub held: bool,
    pub cancel_reason: Option<String>,
}

/// Listing / bulk filter (all None = everything).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub name: Option<String>,
    pub statuses: Option<Vec<String>>,
    pub tag: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    fn params(&self) -> Vec<Param> {
        vec![
            Param::opt_text(self.name.clone()),
            self.statuses
                .as_ref()
                .map_or(Param::Null, |s| Param::TextArray(s.clone())),
            Param::opt_text(self.tag.clone()),
            Param::opt_ts(self.since),
            Param::opt_ts(self.until),
        ]
    }
}

/// The outcome of `resolve_signal`: ("signal" | "timeout" | "none", payload JSON, at).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub outcome: String,
    pub payload: Option<String>,
    pub at: DateTime<Utc>,
}

/// Everything `run_detail` shows of one run, read in one snapshot: the run's row and the
/// rows of its steps, signals, children, events and timer.
#[derive(Debug, Clone)]
pub struct RunDetail {
    pub run: Rows,
    pub steps: Rows,
    pub signals: Rows,
    pub children: Rows,
    pub events: Rows,
    pub timer: Rows,
}

/// Counts of one reconcile sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconciled {
    pub lost: u64,
    pub parents: u64,
    pub orphans: u64,
}

struct Inner {
    queries: Arc<Queries>,
    pool: Pool,
    writer: Writer,
    /// The claim lane: claims commit without a WAL flush, so they get a writer of their own
    /// rather than waiting behind the durable batch in flight (see [`Core::claim`]).
    claimer: Writer,
    hub: Arc<Hub>,
    /// What the LISTEN connection connects with (None when `notify` is off).
    listen_config: Option<tokio_postgres::Config>,
    listener: OnceLock<Listener>,
    /// Set by `close`: no listener starts after it.
    closed: AtomicBool,
    outbox: Arc<Outbox>,
    outbox_task: Option<JoinHandle<()>>,
    notify: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = &self.outbox_task {
            task.abort();
        }
        self.pool.close();
    }
}

/// The Rust core. Cheap to clone (an `Arc`); every method is `&self` and may run concurrently.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

fn text(v: &Val) -> Option<String> {
    match v {
        Val::Null => None,
        Val::Uuid(u) => Some(u.to_string()),
        Val::Text(s) | Val::Json(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

fn json(v: &Val) -> Option<String> {
    match v {
        Val::Json(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Val) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// The claimed runs of a `claim_with_history` or `claim_runs` answer (the same columns):
/// 'run' rows, each followed by the 'step' rows of its records.
fn claimed_runs(query: &str, rows: &Rows) -> Result<Vec<Claimed>, CoreError> {
    let [kind, run_id, lease_token, name, version, input, attempts, cancel_reason, parent_id, depth, created_at, parent_status, db_now, held_token, key, seq, step_kind, status, result, error, step_attempts, deadline, child_id, child_status, child_output, child_error, finished_at] =
        rows.columns_of(query, CLAIM_COLUMNS)?;
    let mut runs: Vec<Claimed> = Vec::new();
    let mut steps: Vec<(String, StepRow)> = Vec::new();
    for r in &rows.rows {
        let id = text(&r[run_id]).unwrap_or_default();
        if r[kind].as_str() == Some("run") {
            runs.push(Claimed {
                run_id: id,
                lease_token: int(&r[lease_token]),
                name: text(&r[name]).unwrap_or_default(),
                version: int(&r[version]),
                input: json(&r[input]),
                attempts: int(&r[attempts]),
                cancel_reason: text(&r[cancel_reason]),
                parent_id: text(&r[parent_id]),
                depth: int(&r[depth]),
                created_at: r[created_at].as_ts().unwrap_or_default(),
                parent_status: text(&r[parent_status]),
                db_now: r[db_now].as_ts().unwrap_or_default(),
                held_token: r[held_token].as_i64(),
                history: Vec::new(),
            });
        } else {
            steps.push((
                id,
                StepRow {
                    key: text(&r[key]).unwrap_or_default(),
                    seq: int(&r[seq]),
                    kind: text(&r[step_kind]).unwrap_or_default(),
                    name: text(&r[name]).unwrap_or_default(),
                    status: text(&r[status]).unwrap_or_default(),
                    result: json(&r[result]),
                    error: json(&r[error]),
                    attempts: int(&r[step_attempts]),
                    deadline: r[deadline].as_ts(),
                    child_id: text(&r[child_id]),
                    child_status: text(&r[child_status]),
                    child_output: json(&r[child_output]),
                    child_error: json(&r[child_error]),
                    finished_at: r[finished_at].as_ts(),
                },
            ));
        }
    }
    let index: HashMap<String, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.run_id.clone(), i))
        .collect();
    for (run_id, step) in steps {
        if let Some(&i) = index.get(&run_id) {
            runs[i].history.push(step);
        }
    }
    Ok(runs)
}

fn check_uuid(what: &str, s: &str) -> Result<(), CoreError> {
    uuid::Uuid::parse_str(s)
        .map(|_| ())
        .map_err(|_| CoreError::InvalidArgument(format!("{what}: {s:?} is not a UUID")))
}

/// The columns of `claim_with_history` that [`Core::claim`] reads, named in the order it
/// binds their positions.
const CLAIM_COLUMNS: [&str; 27] = [
    "kind",
    "run_id",
    "lease_token",
    "name",
    "version",
    "input",
    "attempts",
    "cancel_reason",
    "parent_id",
    "depth",
    "created_at",
    "parent_status",
    "db_now",
    "held_token",
    "key",
    "seq",
    "step_kind",
    "status",
    "result",
    "error",
    "step_attempts",
    "deadline",
    "child_id",
    "child_status",
    "child_output",
    "child_error",
    "finished_at",
];

/// The writes the group-commit writer sends many at a time (see queries.sql).
const COALESCE: &[Coalesce] = &[
    Coalesce {
        single: "record_step",
        many: "record_step_many",
        accepts: any_params,
    },
    Coalesce {
        single: "finish_run",
        many: "finish_run_many",
        accepts: leased_done,
    },
];

fn any_params(_: &[Param]) -> bool {
    true
}

/// A `finish_run` by the lease holder ending in `done`, the common finish, is what the writer
/// batches into `finish_run_many` (both are the function `finish_runs`); rarer ones go alone.
fn leased_done(params: &[Param]) -> bool {
    matches!(params, [_, Param::Int(_), Param::Text(status), ..] if status == "done")
}

type BoxFut<'a> = Pin<Box<dyn Future<Output = Result<Rows, CoreError>> + Send + 'a>>;

/// Makes a transaction's reads agree with each other (one snapshot).
const SNAPSHOT: &str = "read_snapshot";

/// Run several prepared statements on one connection, pipelined (one round trip); results in
/// order.
async fn pipeline<'a>(
    client: &'a tokio_postgres::Client,
    work: &'a [(Prepared, Vec<Param>)],
) -> Vec<Result<Rows, CoreError>> {
    let mut futs: FuturesOrdered<BoxFut<'a>> = FuturesOrdered::new();
    for (stmt, params) in work {
        futs.push_back(Box::pin(run(client, stmt, params)));
    }
    let mut out = Vec::with_capacity(work.len());
    while let Some(r) = futs.next().await {
        out.push(r);
    }
    out
}

impl Core {
    /// Open a core: nothing connects until first use. Must be called inside a tokio runtime.
    pub fn open(opts: CoreOptions) -> Result<Core, CoreError> {
        let queries = Arc::new(Queries::new(&opts.schema)?);
        let mut config = parse_dsn(&opts.dsn)?;
        // one name per schema (and so per test schema): pg_stat_activity tells engines apart;
        // an application_name given in the DSN is the caller's choice and kept as is
        let named_by_dsn = config.get_application_name().is_some();
        let listen_base = match &opts.listen_dsn {
            Some(dsn) => {
                parse_dsn(dsn).map_err(|e| CoreError::InvalidArgument(format!("listen_{e}")))?
            }
            None => config.clone(),
        };
        if !named_by_dsn {
            config.application_name(format!("{}:{}", opts.application_name, opts.schema));
        }
        let pool = Pool::new(
            config.clone(),
            queries.clone(),
            opts.pool_size,
            opts.prepared_statements,
        );
        let outbox = Outbox::new();
        let writer = Writer::spawn(
            pool.clone(),
            opts.writer_shards,
            opts.max_batch,
            COALESCE,
            opts.notify.then(|| outbox.clone()),
        );
        let claimer = Writer::spawn(pool.clone(), 1, opts.max_batch, &[], None);
        let hub = Hub::new();
        let listen_config = opts.notify.then(|| {
            let mut lconfig = listen_base;
            if lconfig.get_application_name().is_none() {
                lconfig
                    .application_name(format!("{}-listen:{}", opts.application_name, opts.schema));
            }
            lconfig
        });
        let outbox_task = opts
            .notify
            .then(|| tokio::spawn(relay(pool.clone(), outbox.clone())));
        Ok(Core {
            inner: Arc::new(Inner {
                queries,
                pool,
                writer,
                claimer,
                hub,
                listen_config,
                listener: OnceLock::new(),
                closed: AtomicBool::new(false),
                outbox,
                outbox_task,
                notify: opts.notify,
            }),
        })
    }

    /// Stop the listener and relay, let queued writes finish, close pooled connections.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(listener) = self.inner.listener.get() {
            listener.stop();
        }
        self.inner.claimer.close();
        self.inner.writer.close();
        self.inner.claimer.join().await;
        self.inner.writer.join().await;
        // flush pending NOTIFYs so other processes still hear about work started just now
        if self.inner.notify {
            self.inner.outbox.flush(&self.inner.pool).await;
        }
        if let Some(task) = &self.inner.outbox_task {
            task.abort();
        }
        self.inner.pool.close();
    }

    pub fn queries(&self) -> &Queries {
        &self.inner.queries
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    pub fn writer_stats(&self) -> WriterCounts {
        self.inner.writer.stats()
    }

    /// Start the LISTEN connection (when `notify` is on and it is not started yet); it stays
    /// up, reconnecting, until `close`. Waiting for work or for a run calls this first. Must
    /// be called inside a tokio runtime.
    pub fn listen(&self) {
        if self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        let listen = self.inner.queries.get("listen");
        if let (Some(config), Ok(listen)) = (&self.inner.listen_config, listen) {
            self.inner.listener.get_or_init(|| {
                Listener::spawn(config.clone(), listen.to_string(), self.inner.hub.clone())
            });
        }
    }

    /// Whether the LISTEN connection is up.
    pub fn listening(&self) -> bool {
        self.inner.listener.get().is_some() && self.inner.hub.connected()
    }

    /// Run any named statement of queries.sql (for the generic cron statements and tests).
    pub async fn query(&self, name: &str, params: &[Param]) -> Result<Rows, CoreError> {
        self.inner.pool.query(name, params).await
    }

    fn wake_local_and_notify(&self, names: impl IntoIterator<Item = String>) {
        let mut names = names.into_iter().map(|n| format!("q {n}")).peekable();
        let any = if self.inner.notify {
            self.inner.outbox.push(names)
        } else {
            names.peek().is_some()
        };
        if any {
            self.inner.hub.wake_work();
        }
    }

    // -- schema ---------------------------------------------------------------------------

    /// The schema version in the database (0 when the schema does not exist).
    pub async fn schema_version(&self) -> Result<i64, CoreError> {
        let mut conn = self.inner.pool.get().await?;
        let table = format!("\"{}\".schema_version", self.inner.queries.schema());
        let exists = conn
            .query("schema_exists", &[Param::Text(table)])
            .await?
            .scalar();
        if exists.as_bool() != Some(true) {
            return Ok(0);
        }
        Ok(int(&conn.query("schema_version", &[]).await?.scalar()))
    }

    /// SCHEMA_MISMATCH (with the command that fixes it) when the database is behind `need`.
    pub async fn check_schema(&self, need: i64) -> Result<(), CoreError> {
        let found = self.schema_version().await?;
        if found < need {
            let schema = self.inner.queries.schema();
            let state = if found == 0 {
                "does not exist".to_string()
            } else {
                format!("is at version {found}")
            };
            return Err(CoreError::SchemaMismatch(format!(
                "iterflow schema '{schema}' {state}; this engine needs version {need}. \
                 Run `iterflow migrate --schema {schema}` (or `await iterflow.migrate(dsn, schema='{schema}')`)."
            )));
        }
        Ok(())
    }

    // -- client side ----------------------------------------------------------------------

    async fn insert_chunks(
        conn: &mut crate::pool::Conn,
        chunks: &[InsertChunk],
    ) -> Result<Vec<Created>, CoreError> {
        let mut out = Vec::new();
        for chunk in chunks {
            let rows = conn
                .query("insert_runs", &[Param::Json(chunk.rows_json.clone())])
                .await?;
            let [ord, id] = rows.columns_of("insert_runs", ["ord", "id"])?;
            let mut made: HashMap<i64, Created> = HashMap::new();
            for r in &rows.rows {
                made.insert(
                    int(&r[ord]),
                    Created {
                        run_id: text(&r[id]).unwrap_or_default(),
                        status: "pending".into(),
                        created: true,
                    },
                );
            }
            if made.len() < chunk.len {
                let found = conn
                    .query(
                        "find_existing_runs",
                        &[Param::Json(chunk.find_json.clone())],
                    )
                    .await?;
                let [ord, id, status] =
                    found.columns_of("find_existing_runs", ["ord", "id", "status"])?;
                for r in &found.rows {
                    made.entry(int(&r[ord])).or_insert_with(|| Created {
                        run_id: text(&r[id]).unwrap_or_default(),
                        status: text(&r[status]).unwrap_or_default(),
                        created: false,
                    });
                }
            }
            for i in 0..chunk.len {
                match made.remove(&(i as i64)) {
                    Some(c) => out.push(c),
                    None => {
                        return Err(CoreError::InvalidArgument(format!(
                            "run #{i} of the batch was neither created nor found"
                        )))
                    }
                }
            }
        }
        Ok(out)
    }

    /// Create runs (one transaction for all chunks); `wake` names the flows of runs that are
    /// ready now (local workers are woken, other processes notified after the commit).
    pub async fn insert_runs(
        &self,
        chunks: &[InsertChunk],
        wake: Vec<String>,
    ) -> Result<Vec<Created>, CoreError> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.pool.get().await?;
        let created = if chunks.len() == 1 {
            // one chunk: the insert and the lookup of existing runs need no shared snapshot
            Self::insert_chunks(&mut conn, chunks).await?
        } else {
            conn.begin().await?;
            let r = Self::insert_chunks(&mut conn, chunks).await;
            conn.end(r).await?
        };
        drop(conn);
        self.wake_local_and_notify(wake);
        Ok(created)
    }

    pub async fn deliver_signal(
        &self,
        run_id: &str,
        name: &str,
        payload: Option<String>,
        key: Option<String>,
    ) -> Result<String, CoreError> {
        // Group-committed like the worker's writes: a burst of deliveries shares one commit,
        // and their wake-ups go out through the relay after it.
        let params = check_uuid("run_id", run_id).map(|()| {
            vec![
                Param::text(run_id),
                Param::text(name),
                Param::opt_json(payload),
                Param::opt_text(key),
            ]
        });
        let rows = self.write(run_id, "deliver_signal", params).await?;
        let [answer] = rows.columns_of("deliver_signal", ["deliver_signal"])?;
        Ok(rows
            .first()
            .and_then(|r| text(&r[answer]))
            .unwrap_or_default())
    }

    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<i64, CoreError> {
        check_uuid("run_id", run_id)?;
        let rows = self
            .inner
            .pool
            .query("cancel_tree", &[Param::text(run_id), Param::text(reason)])
            .await?;
        Ok(int(&rows.scalar()))
    }

    pub async fn retry(&self, run_id: &str) -> Result<String, CoreError> {
        check_uuid("run_id", run_id)?;
        let rows = self
            .inner
            .pool
            .query("retry_run", &[Param::text(run_id)])
            .await?;
        Ok(text(&rows.scalar()).unwrap_or_default())
    }

    /// The `get_run` row (columns as in queries.sql), or None.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<Rows>, CoreError> {
        check_uuid("run_id", run_id)?;
        let rows = self
            .inner
            .pool
            .query("get_run", &[Param::text(run_id)])
            .await?;
        Ok((!rows.rows.is_empty()).then_some(rows))
    }

    /// The `wait_runs` rows for `run_ids`, one per id, in one statement (the waiters'
    /// batched read).
    pub async fn wait_runs(&self, run_ids: &[String]) -> Result<Rows, CoreError> {
        for id in run_ids {
            check_uuid("run_ids", id)?;
        }
        self.inner
            .pool
            .query("wait_runs", &[Param::texts(run_ids)])
            .await
    }

    /// The run and its steps, signals, children, events and timer, pipelined in one round
    /// trip; None when the run does not exist.
    pub async fn run_detail(&self, run_id: &str) -> Result<Option<RunDetail>, CoreError> {
        check_uuid("run_id", run_id)?;
        let names = [
            "get_run",
            "run_steps",
            "run_signals",
            "run_children",
            "run_events",
            "run_timer",
        ];
        let mut conn = self.inner.pool.get().await?;
        conn.prepare_all(&names).await?;
        let mut work = Vec::new();
        for n in names {
            work.push((conn.stmt(n).await?, vec![Param::text(run_id)]));
        }
        // one snapshot for every part: a run claimed between two of these reads (which consumes
        // its signals as it leases it) must not show up as still waiting with consumed signals
        conn.begin_dirty();
        let begin = format!("BEGIN; {}", self.inner.queries.get(SNAPSHOT)?);
        conn.client.batch_execute(&begin).await?;
        let results = pipeline(&conn.client, &work).await;
        if results.iter().any(Result::is_err) {
            conn.discard(); // a connection that saw an error is not reused
        }
        conn.client.batch_execute("COMMIT").await?;
        conn.clean();
        let [run, steps, signals, children, events, timer]: [Rows; 6] = results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .try_into()
            .map_err(|_| CoreError::InvalidArgument("run_detail: one result per part".into()))?;
        if run.rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(RunDetail {
            run,
            steps,
            signals,
            children,
            events,
            timer,
        }))
    }

    pub async fn list_runs(
        &self,
        flt: &Filter,
        limit: i64,
        cursor: Option<(DateTime<Utc>, String)>,
    ) -> Result<Rows, CoreError> {
        let mut params = flt.params();
        match cursor {
            Some((at, id)) => {
                check_uuid("cursor", &id)?;
                params.push(Param::Ts(at));
                params.push(Param::Text(id));
            }
            None => {
                params.push(Param::Null);
                params.push(Param::Null);
            }
        }
        params.push(Param::Int(limit));
        self.inner.pool.query("list_runs", &params).await
    }

    pub async fn select_runs(&self, flt: &Filter, limit: i64) -> Result<Vec<String>, CoreError> {
        let mut params = flt.params();
        params.push(Param::Int(limit));
        let rows = self
            .inner
            .pool
            .query("select_runs_by_filter", &params)
            .await?;
        let [id] = rows.columns_of("select_runs_by_filter", ["id"])?;
        Ok(rows.rows.iter().filter_map(|r| text(&r[id])).collect())
    }

    pub async fn purge(&self, run_ids: &[String]) -> Result<u64, CoreError> {
        for id in run_ids {
            check_uuid("run_ids", id)?;
        }
        let rows = self
            .inner
            .pool
            .query("purge_runs", &[Param::texts(run_ids)])
            .await?;
        Ok(rows.affected)
    }

    /// Run ids that may have changed since the last call (terminal, or a watched run's
    /// progress), waiting up to `timeout` for one; see [`Hub::next_changes`]. Without a
    /// LISTEN connection only this process's own finishes arrive, so `listening` tells the
    /// caller to fall back to reading everything it waits for on a short interval.
    pub async fn changed_runs(&self, timeout: Duration) -> (Changes, bool) {
        self.listen();
        let listening = self.listening();
        let wait = if listening {
            timeout
        } else {
            timeout.min(Duration::from_millis(250))
        };
        (self.inner.hub.next_changes(wait).await, listening)
    }

    // -- worker side ----------------------------------------------------------------------

    /// Queue a write on the group-commit writer now; the future resolves once committed.
    fn write(
        &self,
        key: &str,
        query: &'static str,
        params: Result<Vec<Param>, CoreError>,
    ) -> impl Future<Output = Result<Rows, CoreError>> + Send + 'static {
        let pending = params.map(|p| self.inner.writer.enqueue(key, query, p));
        async move { pending?.await }
    }

    /// Lease up to `limit` ready runs of `names` with their history, in one statement.
    ///
    /// On the claim lane, not the group-commit writer: a claim need not be durable (a lost
    /// one is claimed again) and commits without waiting for the WAL flush, so it must not
    /// queue behind a durable batch and its flush; a woken run then resumes one round trip
    /// after its wake-up. It only sees committed state, so a run suspending in the writer's
    /// batch in flight is claimed only once that suspension committed.
    pub fn claim(
        &self,
        names: &[String],
        limit: i64,
        owner: &str,
        lease_ms: i64,
    ) -> impl Future<Output = Result<Vec<Claimed>, CoreError>> + Send + 'static {
        let pending = self.inner.claimer.enqueue(
            "",
            "claim_with_history",
            vec![
                Param::texts(names),
                Param::Int(limit),
                Param::text(owner),
                Param::Int(lease_ms),
            ],
        );
        async move { claimed_runs("claim_with_history", &pending.await?) }
    }

    /// Lease the runs held in this process's sticky cache, each given as its id and the lease
    /// token it suspended under, if it is ready and no one claimed it since; the answer
    /// carries only the current records of the keys its held body waits on and the signals
    /// the claim consumed, not the history (`claim_runs` in `queries.sql`). A run that cannot
    /// be resumed that way is left out. On the claim lane, like [`Core::claim`].
    pub fn claim_runs(
        &self,
        held: &[(String, i64)],
        owner: &str,
        lease_ms: i64,
    ) -> impl Future<Output = Result<Vec<Claimed>, CoreError>> + Send + 'static {
        let pending = held
            .iter()
            .try_for_each(|(run_id, _)| check_uuid("run_id", run_id))
            .map(|()| {
                self.inner.claimer.enqueue(
                    "",
                    "claim_runs",
                    vec![
                        Param::TextArray(held.iter().map(|(r, _)| r.clone()).collect()),
                        Param::text(owner),
                        Param::Int(lease_ms),
                        Param::IntArray(held.iter().map(|(_, t)| *t).collect()),
                    ],
                )
            });
        async move { claimed_runs("claim_runs", &pending?.await?) }
    }

    /// The runs `owner` holds in its sticky cache that other processes woke ([`Hub::next_held`]),
    /// at most `limit`: those announced (`h`) are claimed by id ([`Core::claim_runs`]) the
    /// moment their wake-ups arrive, on the runtime, with no round trip through Python between
    /// the notification and the claim; those handed off (`H`) were leased to `owner` by the
    /// waking transaction and come back as their notices' claims. Waits up to `timeout` for a
    /// wake-up; empty when none came. A failed claim of the announced runs is an error only
    /// when no handoff came with them (the handoffs are leased already and must not be lost).
    pub async fn claim_woken(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: usize,
        timeout: Duration,
    ) -> Result<Woken, CoreError> {
        self.listen();
        let (handed, announced): (Vec<HeldWakeup>, Vec<HeldWakeup>) = self
            .inner
            .hub
            .next_held(owner, limit, timeout)
            .await
            .into_iter()
            .partition(|w| w.handoff.is_some());
        let claimed = if announced.is_empty() {
            Vec::new()
        } else {
            let held: Vec<(String, i64)> =
                announced.into_iter().map(|w| (w.run_id, w.token)).collect();
            match self.claim_runs(&held, owner, lease_ms).await {
                Ok(claimed) => claimed,
                Err(err) if handed.is_empty() => return Err(err),
                Err(_) => Vec::new(),
            }
        };
        Ok(Woken { claimed, handed })
    }

    /// [`Core::claim`], after first waiting up to `wait` until new work may be ready (see
    /// [`Core::wait_for_work`]): the claim starts on the runtime the moment the wake-up
    /// arrives. Not cancellable in effect: a claim that started reports the runs it leased.
    pub async fn claim_when_ready(
        &self,
        names: &[String],
        limit: i64,
        owner: &str,
        lease_ms: i64,
        wait: Option<Duration>,
    ) -> Result<Vec<Claimed>, CoreError> {
        if let Some(wait) = wait {
            self.wait_for_work(wait).await;
        }
        self.claim(names, limit, owner, lease_ms).await
    }

    fn step_params(run_id: &str, rec: &StepWrite) -> Vec<Param> {
        vec![
            Param::text(run_id),
            Param::text(rec.key.clone()),
            Param::Int(rec.seq),
            Param::text(rec.kind.clone()),
            Param::text(rec.name.clone()),
            Param::text(rec.status.clone()),
            Param::opt_json(rec.result.clone()),
            Param::opt_json(rec.error.clone()),
            Param::Int(rec.attempts),
            Param::opt_ts(rec.deadline),
            Param::opt_text(rec.child_id.clone()),
        ]
    }

    /// Write a step record through the group-commit writer (first final writer wins).
    pub fn record_step(
        &self,
        run_id: &str,
        rec: &StepWrite,
    ) -> impl Future<Output = Result<Stored, CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id).map(|()| Self::step_params(run_id, rec));
        let pending = self.write(run_id, "record_step", params);
        async move {
            let rows = pending.await?;
            let r = rows
                .first()
                .ok_or_else(|| CoreError::InvalidArgument("record_step returned no row".into()))?;
            let [status, result, error, written, finished_at] = rows.columns_of(
                "record_step",
                ["status", "result", "error", "written", "finished_at"],
            )?;
            Ok(Stored {
                status: text(&r[status]).unwrap_or_default(),
                result: json(&r[result]),
                error: json(&r[error]),
                written: r[written].as_bool().unwrap_or(false),
                finished_at: r[finished_at].as_ts(),
            })
        }
    }

    /// Insert children and the parent's waiting records in one transaction.
    pub async fn spawn_children(
        &self,
        run_id: &str,
        records: &[StepWrite],
        chunks: &[InsertChunk],
        wake: Vec<String>,
    ) -> Result<Vec<Created>, CoreError> {
        check_uuid("run_id", run_id)?;
        let mut conn = self.inner.pool.get().await?;
        conn.begin().await?;
        let result = async {
            let created = Self::insert_chunks(&mut conn, chunks).await?;
            if created.len() != records.len() {
                return Err(CoreError::InvalidArgument(
                    "one waiting record per child is needed".into(),
                ));
            }
            let stmt = conn.stmt("record_step").await?;
            let work: Vec<_> = records
                .iter()
                .zip(&created)
                .map(|(rec, made)| {
                    let mut rec = rec.clone();
                    rec.status = "waiting".into();
                    rec.result = None;
                    rec.error = None;
                    rec.attempts = 0;
                    rec.deadline = None;
                    rec.child_id = Some(made.run_id.clone());
                    (stmt.clone(), Self::step_params(run_id, &rec))
                })
                .collect();
            for r in pipeline(&conn.client, &work).await {
                r?;
            }
            Ok(created)
        }
        .await;
        let created = conn.end(result).await?;
        drop(conn);
        self.wake_local_and_notify(wake);
        Ok(created)
    }

    /// Consume a signal or record its timeout (group-committed).
    pub fn resolve_signal(
        &self,
        run_id: &str,
        key: &str,
        seq: i64,
        name: &str,
        deadline_passed: bool,
        timeout_error: &str,
    ) -> impl Future<Output = Result<Resolved, CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id).map(|()| {
            vec![
                Param::text(run_id),
                Param::text(key),
                Param::Int(seq),
                Param::text(name),
                Param::Bool(deadline_passed),
                Param::Json(timeout_error.to_string()),
            ]
        });
        let pending = self.write(run_id, "resolve_signal", params);
        async move {
            let rows = pending.await?;
            let r = rows.first().ok_or_else(|| {
                CoreError::InvalidArgument("resolve_signal returned no row".into())
            })?;
            let [outcome, payload, at] =
                rows.columns_of("resolve_signal", ["outcome", "payload", "at"])?;
            Ok(Resolved {
                outcome: text(&r[outcome]).unwrap_or_default(),
                payload: json(&r[payload]),
                at: r[at].as_ts().unwrap_or_default(),
            })
        }
    }

    /// Park a leased run (fenced by its token). Its wake-up is the database's `ready_at`; the
    /// worker that suspended it wakes itself for a near one (docs/architecture.md §4).
    pub fn suspend(
        &self,
        run_id: &str,
        token: i64,
        status: &str,
        waiting: &str,
        wake_at: Option<DateTime<Utc>>,
        attempts_delta: Option<i64>,
    ) -> impl Future<Output = Result<bool, CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id).map(|()| {
            vec![
                Param::text(run_id),
                Param::Int(token),
                Param::text(status),
                Param::Json(waiting.to_string()),
                Param::opt_ts(wake_at),
                Param::opt_int(attempts_delta),
            ]
        });
        let pending = self.write(run_id, "suspend_run", params);
        async move { Ok(pending.await?.scalar().as_bool().unwrap_or(false)) }
    }

    /// Make a run terminal (fenced by `token` when given).
    pub fn finish(
        &self,
        run_id: &str,
        token: Option<i64>,
        status: &str,
        output: Option<String>,
        error: Option<String>,
    ) -> impl Future<Output = Result<bool, CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id).map(|()| {
            vec![
                Param::text(run_id),
                Param::opt_int(token),
                Param::text(status),
                Param::opt_json(output),
                Param::opt_json(error),
            ]
        });
        let pending = self.write(run_id, "finish_run", params);
        let hub = self.inner.hub.clone();
        let run_id = run_id.to_string();
        async move {
            let ok = pending.await?.scalar().as_bool().unwrap_or(false);
            if ok {
                hub.run_changed(&run_id);
            }
            Ok(ok)
        }
    }

    /// End the leased run `run_id` and start its successor `new_id` with `input`, in one
    /// transaction of the group-commit writer (`continue_run` in queries.sql); false when the
    /// lease was lost. Waiters of this process hear of the end at once, local workers of the
    /// successor too.
    pub fn continue_run(
        &self,
        run_id: &str,
        token: i64,
        new_id: &str,
        input: String,
    ) -> impl Future<Output = Result<bool, CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id)
            .and_then(|()| check_uuid("new_id", new_id))
            .map(|()| {
                vec![
                    Param::text(run_id),
                    Param::Int(token),
                    Param::text(new_id),
                    Param::Json(input),
                ]
            });
        let pending = self.write(run_id, "continue_run", params);
        let hub = self.inner.hub.clone();
        let run_id = run_id.to_string();
        async move {
            let ok = pending.await?.scalar().as_bool().unwrap_or(false);
            if ok {
                hub.run_changed(&run_id);
                hub.wake_work();
            }
            Ok(ok)
        }
    }

    pub fn add_event(
        &self,
        run_id: &str,
        kind: &str,
        data: Option<String>,
    ) -> impl Future<Output = Result<(), CoreError>> + Send + 'static {
        let params = check_uuid("run_id", run_id).map(|()| {
            vec![
                Param::text(run_id),
                Param::text(kind),
                Param::opt_json(data),
            ]
        });
        let pending = self.write(run_id, "add_event", params);
        async move {
            pending.await?;
            Ok(())
        }
    }

    pub async fn heartbeat(
        &self,
        leases: &[(String, i64)],
        lease_ms: i64,
    ) -> Result<Vec<LeaseState>, CoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        for (id, _) in leases {
            check_uuid("run_id", id)?;
        }
        let rows = self
            .inner
            .pool
            .query(
                "heartbeat",
                &[
                    Param::TextArray(leases.iter().map(|(r, _)| r.clone()).collect()),
                    Param::IntArray(leases.iter().map(|(_, t)| *t).collect()),
                    Param::Int(lease_ms),
                ],
            )
            .await?;
        let [run_id, held, cancel_reason] =
            rows.columns_of("heartbeat", ["run_id", "held", "cancel_reason"])?;
        Ok(rows
            .rows
            .iter()
            .map(|r| LeaseState {
                run_id: text(&r[run_id]).unwrap_or_default(),
                held: r[held].as_bool().unwrap_or(false),
                cancel_reason: text(&r[cancel_reason]),
            })
            .collect())
    }

    pub async fn expire_leases(&self, limit: i64) -> Result<u64, CoreError> {
        let rows = self
            .inner
            .pool
            .query("expire_leases", &[Param::Int(limit)])
            .await?;
        if !rows.rows.is_empty() {
            self.inner.hub.wake_work();
        }
        Ok(rows.rows.len() as u64)
    }

    /// Seconds until the earliest unleased queued run of `names` is ready (<= 0: now).
    pub async fn next_due(&self, names: &[String]) -> Result<Option<f64>, CoreError> {
        let rows = self
            .inner
            .pool
            .query("next_due", &[Param::texts(names)])
            .await?;
        Ok(match rows.scalar() {
            Val::Interval(secs) => Some(secs),
            _ => None,
        })
    }

    pub async fn requeue_parked(&self, names: &[String]) -> Result<u64, CoreError> {
        let rows = self
            .inner
            .pool
            .query("requeue_parked", &[Param::texts(names)])
            .await?;
        Ok(rows.affected)
    }

    /// The stamp of the last release of step-limit channel `channel` heard (0: none).
    pub fn limit_seen(&self, channel: &str) -> u64 {
        self.inner.hub.limit_seen(channel)
    }

    /// Until a release of `channel` after stamp `seen` is heard, or `timeout` (a quarter
    /// second at most while not listening: releases are not heard then).
    pub async fn wait_limit(&self, channel: &str, seen: u64, timeout: Duration) {
        self.listen();
        let wait = if self.listening() {
            timeout
        } else {
            timeout.min(Duration::from_millis(250))
        };
        self.inner.hub.wait_limit(channel, seen, wait).await;
    }

    /// Return when new work may be ready (NOTIFY, local start, timer), or after `timeout`.
    pub async fn wait_for_work(&self, timeout: Duration) {
        self.listen();
        self.inner.hub.wait_work(timeout).await;
    }

    /// Re-drive stranded runs in one transaction; None when another process holds the lock.
    pub async fn reconcile(&self, stale_ms: i64) -> Result<Option<Reconciled>, CoreError> {
        let lock = format!("iterflow.reconcile.{}", self.inner.queries.schema());
        let mut conn = self.inner.pool.get().await?;
        conn.begin().await?;
        let result = async {
            let got = conn.query("try_lock", &[Param::Text(lock)]).await?.scalar();
            if got.as_bool() != Some(true) {
                return Ok(None);
            }
            let lost = conn
                .query("reconcile_lost", &[Param::Int(stale_ms)])
                .await?
                .rows
                .len() as u64;
            let parents = conn
                .query("reconcile_parents", &[Param::Int(stale_ms)])
                .await?
                .rows
                .len() as u64;
            let orphans = conn.query("reconcile_orphans", &[]).await?.rows.len() as u64;
            Ok(Some(Reconciled {
                lost,
                parents,
                orphans,
            }))
        }
        .await;
        let out = conn.end(result).await?;
        if out.is_some_and(|r| r.lost + r.parents > 0) {
            self.inner.hub.wake_work();
        }
        Ok(out)
    }

    /// Retention: delete events / terminal runs older than the cutoffs in batches of short
    /// transactions; None when another process is pruning this schema. The lock is a
    /// transaction-level advisory lock held by a transaction of its own, open (idle: no
    /// snapshot, no rows) on one connection while the batches run on a second one. Nothing
    /// lives in the session, so a pooler in transaction mode keeps it (docs/operations.md,
    /// "Behind PgBouncer").
    pub async fn prune(
        &self,
        events_ms: Option<i64>,
        runs_ms: Option<i64>,
        batch: i64,
    ) -> Result<Option<(u64, u64)>, CoreError> {
        let lock = format!("iterflow.retention.{}", self.inner.queries.schema());
        let mut holder = self.inner.pool.get().await?;
        holder.begin().await?;
        let result = async {
            let got = holder
                .query("try_lock", &[Param::Text(lock)])
                .await?
                .scalar();
            if got.as_bool() != Some(true) {
                return Ok(None);
            }
            let mut conn = self.inner.pool.get().await?;
            let mut counts = (0u64, 0u64);
            for (part, cutoff) in [("prune_events", events_ms), ("prune_runs", runs_ms)] {
                let Some(cutoff) = cutoff else { continue };
                loop {
                    let n = conn
                        .query(part, &[Param::Int(cutoff), Param::Int(batch)])
                        .await?
                        .affected;
                    if part == "prune_events" {
                        counts.0 += n;
                    } else {
                        counts.1 += n;
                    }
                    if (n as i64) < batch {
                        break;
                    }
                }
            }
            Ok(Some(counts))
        }
        .await;
        holder.end(result).await
    }

    /// Claimable work now (ready queue rows + due crons) for `names` (None = all flows).
    pub async fn pending_work(&self, names: Option<&[String]>) -> Result<i64, CoreError> {
        let rows = self
            .inner
            .pool
            .query("pending_work", &[names.map_or(Param::Null, Param::texts)])
            .await?;
        Ok(int(&rows.scalar()))
    }
}
