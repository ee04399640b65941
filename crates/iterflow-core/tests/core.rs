//! The core against a real PostgreSQL ($DATABASE_URL; skipped when unset), each test on its
//! own scratch schema migrated with python/iterflow/migrations/.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use iterflow_core::core::{Filter, InsertChunk, StepWrite};
use iterflow_core::queries::MIGRATIONS;
use iterflow_core::value::{Param, Val};
use iterflow_core::{Core, CoreError, CoreOptions};
use serde_json::json;

use common::{admin, database_url, drop_schema};

fn open(url: &str, schema: &str, notify: bool) -> Core {
    open_with(url, schema, notify, true)
}

/// `named`: named prepared statements (the default) or unnamed ones (see pool.rs).
fn open_with(url: &str, schema: &str, notify: bool, named: bool) -> Core {
    let mut opts = CoreOptions::new(url, schema);
    opts.notify = notify;
    opts.pool_size = 6;
    opts.application_name = "iterflow-test".into();
    opts.prepared_statements = named;
    Core::open(opts).expect("open core")
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

struct Spec {
    id: String,
    name: String,
    key: Option<String>,
    delay_ms: i64,
    parent: Option<String>,
}

fn spec(name: &str) -> Spec {
    Spec {
        id: new_id(),
        name: name.into(),
        key: None,
        delay_ms: 0,
        parent: None,
    }
}

fn chunk(specs: &[Spec]) -> InsertChunk {
    let rows: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"ord": i, "id": s.id, "name": s.name, "version": 1, "idempotency_key": s.key,
                   "tags": ["t"], "priority": 0, "parent_id": s.parent,
                   "parent_key": s.parent.as_ref().map(|_| format!("c{i}")),
                   "depth": if s.parent.is_some() { 2 } else { 1 },
                   "delay_ms": s.delay_ms, "input": {"n": i}})
        })
        .collect();
    let find: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"ord": i, "name": s.name, "version": 1, "idempotency_key": s.key,
                   "parent_id": s.parent, "parent_key": s.parent.as_ref().map(|_| format!("c{i}"))})
        })
        .collect();
    InsertChunk {
        rows_json: serde_json::to_string(&rows).unwrap(),
        find_json: serde_json::to_string(&find).unwrap(),
        len: specs.len(),
    }
}

fn names(n: &str) -> Vec<String> {
    vec![n.to_string()]
}

fn done_step(key: &str, result: &str) -> StepWrite {
    StepWrite {
        key: key.into(),
        seq: 0,
        kind: "step".into(),
        name: key.into(),
        status: "done".into(),
        result: Some(result.into()),
        attempts: 1,
        ..Default::default()
    }
}

// -- the SQL of each operation -------------------------------------------------------------

#[tokio::test]
async fn client_operations() {
    client_operations_with(true).await;
}

#[tokio::test]
async fn client_operations_with_unnamed_statements() {
    client_operations_with(false).await;
}

/// The version the last migration records (its `schema_version` insert): migration numbers
/// may have gaps on a branch, so the count of migrations is not the version.
fn latest_version() -> i64 {
    let last = MIGRATIONS.last().expect("migrations");
    let tail = last
        .rsplit("VALUES (")
        .next()
        .expect("a schema_version insert");
    tail.split(')')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a version number")
}

async fn client_operations_with(named: bool) {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open_with(&url, &schema, false, named);
    let latest = latest_version();
    core.check_schema(latest).await.expect("schema is current");
    let err = core.check_schema(latest + 1).await.unwrap_err();
    assert_eq!(err.code(), "SCHEMA_MISMATCH");
    assert!(
        err.to_string().contains(&format!("is at version {latest}")),
        "{err}"
    );
    let missing = open_with(&url, "rt_does_not_exist", false, named);
    let err = missing.check_schema(1).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(err
        .to_string()
        .contains("iterflow migrate --schema rt_does_not_exist"));

    // insert, with an idempotent repeat
    let mut a = spec("flow");
    a.key = Some("k1".into());
    let b = spec("flow");
    let made = core
        .insert_runs(&[chunk(&[a, b])], names("flow"))
        .await
        .unwrap();
    assert!(made.iter().all(|c| c.created && c.status == "pending"));
    let mut again = spec("flow");
    again.key = Some("k1".into());
    let repeat = core
        .insert_runs(&[chunk(&[again, spec("flow")])], vec![])
        .await
        .unwrap();
    assert_eq!(repeat[0].run_id, made[0].run_id);
    assert!(!repeat[0].created);
    assert!(repeat[1].created);

    // reads
    let run = core.get_run(&made[0].run_id).await.unwrap().unwrap();
    let [id, status, input] = run
        .columns_of("get_run", ["id", "status", "input"])
        .unwrap();
    assert_eq!(run.rows[0][status], Val::Text("pending".into()));
    assert_eq!(run.rows[0][input], Val::Json("{\"n\": 0}".into()));
    assert!(matches!(run.rows[0][id], Val::Uuid(_)));
    assert!(core.get_run(&new_id()).await.unwrap().is_none());
    assert!(core.get_run("nope").await.is_err());
    let detail = core.run_detail(&made[1].run_id).await.unwrap().unwrap();
    assert_eq!(detail.run.rows.len(), 1);
    assert_eq!(detail.timer.rows.len(), 1, "one queue row");
    assert!(core.run_detail(&new_id()).await.unwrap().is_none());
    let page = core.list_runs(&Filter::default(), 2, None).await.unwrap();
    assert_eq!(page.rows.len(), 2);
    let last = &page.rows[1];
    let cursor = (last[6].as_ts().unwrap(), last[0].id_string().unwrap());
    let rest = core
        .list_runs(&Filter::default(), 10, Some(cursor))
        .await
        .unwrap();
    assert_eq!(rest.rows.len(), 1);
    let flt = Filter {
        statuses: Some(vec!["pending".into()]),
        tag: Some("t".into()),
        ..Default::default()
    };
    assert_eq!(core.select_runs(&flt, 10).await.unwrap().len(), 3);
    assert_eq!(core.pending_work(None).await.unwrap(), 3);
    assert_eq!(core.pending_work(Some(&names("other"))).await.unwrap(), 0);

    // signals, cancel, retry, purge
    let id = made[1].run_id.clone();
    assert_eq!(
        core.deliver_signal(&id, "s", Some("{\"x\":1}".into()), Some("sk".into()))
            .await
            .unwrap(),
        "buffered"
    );
    assert_eq!(
        core.deliver_signal(&id, "s", None, Some("sk".into()))
            .await
            .unwrap(),
        "duplicate"
    );
    assert_eq!(
        core.deliver_signal(&new_id(), "s", None, None)
            .await
            .unwrap(),
        "not_found"
    );
    assert_eq!(core.cancel(&id, "stop").await.unwrap(), 1);
    assert_eq!(core.retry(&id).await.unwrap(), "not_failed");
    assert_eq!(core.retry(&new_id()).await.unwrap(), "missing");
    assert_eq!(
        core.purge(&[id.clone(), made[0].run_id.clone()])
            .await
            .unwrap(),
        1
    );
    assert!(core.get_run(&id).await.unwrap().is_none());

    // generic statements (crons)
    let rows = core.query("list_crons", &[]).await.unwrap();
    assert!(rows.rows.is_empty());
    assert!(rows.columns.contains(&"next_fire_at".to_string()));
    let deleted = core
        .query("delete_cron", &[Param::text("none")])
        .await
        .unwrap();
    assert_eq!(deleted.affected, 0);

    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn worker_operations() {
    worker_operations_with(true).await;
}

#[tokio::test]
async fn worker_operations_with_unnamed_statements() {
    worker_operations_with(false).await;
}

async fn worker_operations_with(named: bool) {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open_with(&url, &schema, false, named);
    let made = core
        .insert_runs(&[chunk(&[spec("w"), spec("w")])], names("w"))
        .await
        .unwrap();
    assert_eq!(
        core.next_due(&names("w")).await.unwrap().map(|s| s <= 0.0),
        Some(true)
    );
    assert_eq!(core.next_due(&names("none")).await.unwrap(), None);

    let claimed = core.claim(&names("w"), 10, "me", 30_000).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let run = claimed.iter().find(|r| r.run_id == made[0].run_id).unwrap();
    assert_eq!(run.attempts, 1);
    assert!(run.history.is_empty());
    assert_eq!(run.input.as_deref(), Some("{\"n\": 0}"));
    assert!(core
        .claim(&names("w"), 10, "me", 30_000)
        .await
        .unwrap()
        .is_empty());

    // records: first final writer wins
    let s1 = core
        .record_step(&run.run_id, &done_step("a", "1"))
        .await
        .unwrap();
    assert!(s1.written);
    assert_eq!(s1.result.as_deref(), Some("1"));
    assert!(s1.finished_at.is_some());
    let s2 = core
        .record_step(&run.run_id, &done_step("a", "2"))
        .await
        .unwrap();
    assert!(!s2.written);
    assert_eq!(s2.result.as_deref(), Some("1"));
    core.add_event(&run.run_id, "note", Some("{\"m\":1}".into()))
        .await
        .unwrap();

    // leases
    let states = core
        .heartbeat(
            &[
                (run.run_id.clone(), run.lease_token),
                (made[1].run_id.clone(), 0),
            ],
            30_000,
        )
        .await
        .unwrap();
    assert!(states.iter().any(|s| s.run_id == run.run_id && s.held));
    assert!(states.iter().any(|s| s.run_id == made[1].run_id && !s.held));

    // signal wait: none, then delivered and consumed
    let timeout_err =
        "{\"code\":\"SIGNAL_TIMEOUT\",\"message\":\"t\",\"traceback\":null,\"cause\":null}";
    let r = core
        .resolve_signal(&run.run_id, "signal:go", 1, "go", false, timeout_err)
        .await
        .unwrap();
    assert_eq!(r.outcome, "none");
    assert_eq!(
        core.deliver_signal(&run.run_id, "go", Some("7".into()), None)
            .await
            .unwrap(),
        "buffered"
    );
    let r = core
        .resolve_signal(&run.run_id, "signal:go", 1, "go", false, timeout_err)
        .await
        .unwrap();
    assert_eq!(
        (r.outcome.as_str(), r.payload.as_deref()),
        ("signal", Some("7"))
    );

    // suspend until soon (woken by the signal delivered while leased: requeued at once)
    let wake = Utc::now() + chrono::Duration::milliseconds(200);
    assert!(core
        .suspend(
            &run.run_id,
            run.lease_token,
            "sleeping",
            "{\"kind\":\"sleep\"}",
            Some(wake),
            None
        )
        .await
        .unwrap());
    assert!(
        !core
            .suspend(
                &run.run_id,
                run.lease_token,
                "sleeping",
                "{}",
                Some(wake),
                None
            )
            .await
            .unwrap(),
        "the lease is gone: fenced"
    );
    let again = core.claim(&names("w"), 10, "me", 30_000).await.unwrap();
    assert_eq!(again.len(), 1, "woken run is ready at once");
    let run = &again[0];
    assert_eq!(run.history.len(), 2);
    let a = run.history.iter().find(|s| s.key == "a").unwrap();
    assert_eq!(
        (a.status.as_str(), a.result.as_deref()),
        ("done", Some("1"))
    );

    // a sleep: not due before its wake-up, due after it (the worker's own timer claims it then)
    let wake = Utc::now() + chrono::Duration::milliseconds(150);
    assert!(core
        .suspend(
            &run.run_id,
            run.lease_token,
            "sleeping",
            "{\"kind\":\"sleep\"}",
            Some(wake),
            Some(0)
        )
        .await
        .unwrap());
    let early = core.claim(&names("w"), 10, "me", 30_000).await.unwrap();
    assert!(early.is_empty(), "claimed before its wake-up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let due = core.claim(&names("w"), 10, "me", 30_000).await.unwrap();
    assert_eq!(due.len(), 1, "the sleeping run is due after its wake-up");
    let run = &due[0];

    // finish (fenced), retry of a failed run
    assert!(!core
        .finish(
            &run.run_id,
            Some(run.lease_token + 1000),
            "done",
            Some("1".into()),
            None
        )
        .await
        .unwrap());
    assert!(core
        .finish(
            &run.run_id,
            Some(run.lease_token),
            "failed",
            None,
            Some("{\"code\":\"X\"}".into())
        )
        .await
        .unwrap());
    assert_eq!(core.retry(&run.run_id).await.unwrap(), "queued");
    assert_eq!(core.requeue_parked(&names("w")).await.unwrap(), 0);

    // leases expire, the reconciler and retention run
    let other = core.claim(&names("w"), 10, "me", 1).await.unwrap();
    assert_eq!(
        other.len(),
        1,
        "the retried run (the other one is still leased)"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(core.expire_leases(100).await.unwrap(), 1);
    let rec = core.reconcile(0).await.unwrap().expect("lock is free");
    assert_eq!(rec.lost, 0);
    let pruned = core
        .prune(Some(0), Some(0), 1)
        .await
        .unwrap()
        .expect("lock is free");
    assert!(pruned.0 >= 1, "events pruned: {pruned:?}");

    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn spawn_children_writes_children_and_waiting_records_together() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open(&url, &schema, false);
    let made = core
        .insert_runs(&[chunk(&[spec("parent")])], vec![])
        .await
        .unwrap();
    let parent = &made[0].run_id;
    let rows: Vec<_> = (0..3)
        .map(|i| {
            json!({"ord": i, "id": new_id(), "name": "child", "version": 1, "idempotency_key": null,
                   "tags": [], "priority": 0, "parent_id": parent, "parent_key": format!("invoke:child@1:{i}"),
                   "depth": 2, "delay_ms": 0, "input": null})
        })
        .collect();
    let find: Vec<_> = (0..3)
        .map(|i| {
            json!({"ord": i, "name": "child", "version": 1, "idempotency_key": null,
                   "parent_id": parent, "parent_key": format!("invoke:child@1:{i}")})
        })
        .collect();
    let chunk = InsertChunk {
        rows_json: serde_json::to_string(&rows).unwrap(),
        find_json: serde_json::to_string(&find).unwrap(),
        len: 3,
    };
    let recs: Vec<StepWrite> = (0..3)
        .map(|i| StepWrite {
            key: format!("invoke:child@1:{i}"),
            seq: i,
            kind: "invoke".into(),
            name: "child@1".into(),
            ..Default::default()
        })
        .collect();
    let kids = core
        .spawn_children(parent, &recs, std::slice::from_ref(&chunk), names("child"))
        .await
        .unwrap();
    assert_eq!(kids.len(), 3);
    // a replay spawning the same keys gets the same children back
    let again = core
        .spawn_children(parent, &recs, &[chunk], vec![])
        .await
        .unwrap();
    let ids =
        |v: &[iterflow_core::core::Created]| v.iter().map(|c| c.run_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&kids), ids(&again));
    assert!(kids.iter().all(|c| c.created) && again.iter().all(|c| !c.created));
    let detail = core.run_detail(parent).await.unwrap().unwrap();
    assert_eq!(detail.steps.rows.len(), 3, "waiting records");
    assert_eq!(detail.children.rows.len(), 3, "children");
    core.close().await;
    drop_schema(&url, &schema).await;
}

// -- group commit ----------------------------------------------------------------------------

#[tokio::test]
async fn group_commit_batches_concurrent_writes_durably() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open(&url, &schema, false);
    let n = 300;
    let specs: Vec<Spec> = (0..n).map(|_| spec("g")).collect();
    let made = core.insert_runs(&[chunk(&specs)], vec![]).await.unwrap();
    let before = core.writer_stats();
    let mut tasks = Vec::new();
    for (i, c) in made.iter().enumerate() {
        let core = core.clone();
        let id = c.run_id.clone();
        tasks.push(tokio::spawn(async move {
            core.record_step(&id, &done_step("s", &i.to_string())).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().written);
    }
    let after = core.writer_stats();
    let txs = after.transactions - before.transactions;
    assert_eq!(after.ops - before.ops, n as u64);
    assert!(txs < n as u64 / 4, "{txs} transactions for {n} writes");
    assert!(after.max_batch > 1);
    // durable: a fresh connection sees every record
    let count: i64 = admin(&url)
        .await
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".steps"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, n as i64);
    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn group_commit_keeps_per_run_order_and_first_writer_wins() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open(&url, &schema, false);
    let made = core
        .insert_runs(&[chunk(&[spec("o"), spec("o")])], vec![])
        .await
        .unwrap();
    // many writers of the same key, submitted in order without awaiting: the first wins
    let id = made[0].run_id.clone();
    let futs: Vec<_> = (0..50)
        .map(|i| {
            let core = core.clone();
            let id = id.clone();
            async move { core.record_step(&id, &done_step("k", &i.to_string())).await }
        })
        .collect();
    let results = futures_util::future::join_all(futs).await;
    let stored: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert!(stored[0].written);
    assert!(stored[1..].iter().all(|s| !s.written));
    assert!(stored.iter().all(|s| s.result.as_deref() == Some("0")));
    // one bad op (an unknown run: foreign key violation) fails alone
    let good = made[1].run_id.clone();
    let bad = new_id();
    let split_before = core.writer_stats().split;
    let (x, y) = (done_step("x", "1"), done_step("y", "2"));
    let (a, b, c) = tokio::join!(
        core.record_step(&good, &x),
        core.record_step(&bad, &x),
        core.record_step(&good, &y),
    );
    assert!(a.unwrap().written);
    assert!(matches!(b.unwrap_err(), CoreError::Database(_)));
    assert!(c.unwrap().written);
    assert!(core.writer_stats().split >= split_before);
    // a client-side bad parameter is refused without touching the batch
    let err = core
        .record_step(
            &good,
            &StepWrite {
                status: "done".into(),
                result: Some("1".into()),
                seq: i64::MAX,
                ..done_step("z", "1")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "INVALID_ARGUMENT");
    core.close().await;
    drop_schema(&url, &schema).await;
}

/// Claim every ready run of flow `name`; lease tokens by run id.
async fn claim_all(core: &Core, name: &str) -> std::collections::HashMap<String, i64> {
    core.claim(&names(name), 100, "me", 60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.run_id, r.lease_token))
        .collect()
}

#[tokio::test]
async fn group_commit_shares_statements_and_keeps_per_op_results() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let mut opts = CoreOptions::new(&url, &schema);
    opts.notify = false;
    opts.writer_shards = 1; // every op below lands in one batch
    let core = Core::open(opts).expect("open core");
    let made = core
        .insert_runs(
            &[chunk(&[spec("m"), spec("m"), spec("m"), spec("m")])],
            vec![],
        )
        .await
        .unwrap();
    // in batch order (the writer sorts a batch by run id): how ops share statements depends
    // on it, and the statement count below is the one for this order
    let mut ids: Vec<String> = made.iter().map(|c| c.run_id.clone()).collect();
    ids.sort();
    let tokens = claim_all(&core, "m").await;
    let (a, b, c, d) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    assert!(
        core.record_step(a, &done_step("old", "0"))
            .await
            .unwrap()
            .written
    );
    let attempt = StepWrite {
        status: "attempt".into(),
        result: None,
        error: Some("{\"code\":\"E\"}".into()),
        ..done_step("x", "")
    };
    let failed = "{\"code\":\"E\",\"message\":\"no\",\"traceback\":null,\"cause\":null}";
    let before = core.writer_stats();
    // queued in this order before the writer runs (a current-thread runtime): one batch
    let steps = vec![
        core.record_step(a, &done_step("old", "9")), // stale writer: the stored row back
        core.record_step(a, &done_step("x", "1")),
        core.record_step(a, &done_step("x", "2")), // same key again: the first one won
        core.record_step(b, &done_step("x", "3")),
        core.record_step(c, &attempt), // not final: the next write replaces it
        core.record_step(c, &done_step("x", "4")),
    ];
    let finishes = vec![
        core.finish(a, Some(tokens[a]), "done", Some("\"A\"".into()), None),
        core.finish(
            b,
            Some(tokens[b] + 1000),
            "done",
            Some("\"B\"".into()),
            None,
        ), // fenced
        core.finish(c, Some(tokens[c]), "done", Some("\"C\"".into()), None),
        core.finish(d, Some(tokens[d]), "failed", None, Some(failed.into())),
    ];
    let (steps, finishes) = tokio::join!(
        futures_util::future::join_all(steps),
        futures_util::future::join_all(finishes)
    );
    let got: Vec<(bool, String, Option<String>)> = steps
        .into_iter()
        .map(|s| s.unwrap())
        .map(|s| (s.written, s.status, s.result))
        .collect();
    let want =
        |w: bool, status: &str, r: Option<&str>| (w, status.to_string(), r.map(String::from));
    assert_eq!(
        got,
        vec![
            want(false, "done", Some("0")),
            want(true, "done", Some("1")),
            want(false, "done", Some("1")),
            want(true, "done", Some("3")),
            want(true, "attempt", None),
            want(true, "done", Some("4")),
        ]
    );
    let finished: Vec<bool> = finishes.into_iter().map(|f| f.unwrap()).collect();
    assert_eq!(finished, vec![true, false, true, true]);
    let after = core.writer_stats();
    assert_eq!(after.ops - before.ops, 10);
    assert_eq!(after.transactions - before.transactions, 1, "one batch");
    assert!(
        after.statements - before.statements <= 6,
        "{} statements for 10 ops",
        after.statements - before.statements
    );
    // what the database holds
    let db = admin(&url).await;
    for (id, status, output) in [
        (a, "done", Some("\"A\"")),
        (b, "running", None),
        (c, "done", Some("\"C\"")),
        (d, "failed", None),
    ] {
        let row = db
            .query_one(
                &format!(
                    "SELECT status, output::text FROM \"{schema}\".runs WHERE id = $1::text::uuid"
                ),
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), status, "{id}");
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), output, "{id}");
    }
    let queued: i64 = db
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".queue"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1, "only the fenced-out run keeps its queue row");
    core.close().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn children_finishing_together_wake_their_parent_once() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let mut opts = CoreOptions::new(&url, &schema);
    opts.notify = false;
    opts.writer_shards = 1;
    let core = Core::open(opts).expect("open core");
    let parent = core
        .insert_runs(&[chunk(&[spec("p")])], vec![])
        .await
        .unwrap()
        .remove(0)
        .run_id;
    let token = claim_all(&core, "p").await[&parent];
    let kids: Vec<Spec> = (0..3)
        .map(|_| Spec {
            parent: Some(parent.clone()),
            ..spec("k")
        })
        .collect();
    core.insert_runs(&[chunk(&kids)], vec![]).await.unwrap();
    assert!(core
        .suspend(
            &parent,
            token,
            "awaiting_child",
            "{\"kind\":\"child\"}",
            None,
            Some(0)
        )
        .await
        .unwrap());
    let leases = claim_all(&core, "k").await;
    let before = core.writer_stats();
    let done: Vec<_> = leases
        .iter()
        .map(|(id, t)| core.finish(id, Some(*t), "done", Some("1".into()), None))
        .collect();
    let done = futures_util::future::join_all(done).await;
    assert!(done.into_iter().all(|r| r.unwrap()));
    let after = core.writer_stats();
    assert_eq!(
        after.statements - before.statements,
        1,
        "one statement for 3 finishes"
    );
    let again = core.claim(&names("p"), 10, "me", 60_000).await.unwrap();
    assert_eq!(again.len(), 1, "the parent is queued (once) and ready");
    assert_eq!(again[0].parent_status, None);
    core.close().await;
    drop_schema(&url, &schema).await;
}

// -- claims ----------------------------------------------------------------------------------

#[tokio::test]
async fn two_claimers_never_claim_the_same_run() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let one = open(&url, &schema, false);
    let two = open(&url, &schema, false);
    let n = 600;
    let specs: Vec<Spec> = (0..n).map(|_| spec("c")).collect();
    one.insert_runs(&[chunk(&specs)], vec![]).await.unwrap();
    let claim_all = |core: Core, owner: &'static str| async move {
        let mut got = Vec::new();
        loop {
            let batch = core.claim(&names("c"), 7, owner, 60_000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch.into_iter().map(|r| r.run_id));
        }
        got
    };
    let (a, b) = tokio::join!(
        tokio::spawn(claim_all(one.clone(), "one")),
        tokio::spawn(claim_all(two.clone(), "two"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let all: HashSet<_> = a.iter().chain(&b).cloned().collect();
    assert_eq!(a.len() + b.len(), n, "claimed {} + {}", a.len(), b.len());
    assert_eq!(all.len(), n, "a run was claimed twice");
    assert!(!a.is_empty() && !b.is_empty(), "both claimers got work");
    one.close().await;
    two.close().await;
    drop_schema(&url, &schema).await;
}

// -- LISTEN fan-out --------------------------------------------------------------------------

#[tokio::test]
async fn listen_wakes_waiters_across_cores() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let worker = open(&url, &schema, true);
    let client = open(&url, &schema, true);
    // nothing listens until asked to (or until a wait)
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!worker.listening() && !client.listening());
    worker.listen();
    client.listen();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(worker.listening() && client.listening()) {
        assert!(Instant::now() < deadline, "LISTEN did not come up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.wait_for_work(Duration::from_millis(1)).await; // consume the connect wake-up
                                                          // work started by another process wakes the worker
    let waiter = {
        let worker = worker.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            worker.wait_for_work(Duration::from_secs(5)).await;
            t.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let made = client
        .insert_runs(&[chunk(&[spec("l")])], names("l"))
        .await
        .unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    // a run finished by another process wakes its result() waiter
    let run = worker
        .claim(&names("l"), 1, "w", 30_000)
        .await
        .unwrap()
        .remove(0);
    let id = made[0].run_id.clone();
    // drain whatever the listener's connect announced (it asks for a full re-read)
    let _ = client.changed_runs(Duration::from_millis(10)).await;
    let result_waiter = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            loop {
                let (changes, listening) = client.changed_runs(Duration::from_secs(5)).await;
                assert!(listening);
                if changes.ids.contains(&id) || t.elapsed() > Duration::from_secs(5) {
                    return t.elapsed();
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(worker
        .finish(
            &run.run_id,
            Some(run.lease_token),
            "done",
            Some("1".into()),
            None
        )
        .await
        .unwrap());
    let waited = result_waiter.await.unwrap();
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    // the finishing process logs its own finish without a round trip, and a change announced
    // while nobody waits is kept for the next call
    let t = Instant::now();
    let (mine, _) = worker.changed_runs(Duration::from_secs(5)).await;
    assert!(mine.ids.contains(&id), "{mine:?}");
    assert!(t.elapsed() < Duration::from_millis(100));
    // the batched read: one row per id, a missing run with no status
    let missing = "00000000-0000-4000-8000-000000000000".to_string();
    let rows = client.wait_runs(&[id.clone(), missing]).await.unwrap();
    assert_eq!(rows.rows.len(), 2);
    worker.close().await;
    client.close().await;
    drop_schema(&url, &schema).await;
}

/// Not a test: `cargo test --release -p iterflow-core --test core -- --ignored --nocapture`
/// prints the group-commit writer's throughput and latency with N concurrent writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn writer_throughput_probe() {
    let Some(url) = database_url() else { return };
    let schema = common::scratch(&url, "rt").await;
    let core = open(&url, &schema, false);
    let n = 2000;
    let specs: Vec<Spec> = (0..n).map(|_| spec("p")).collect();
    let made = core.insert_runs(&[chunk(&specs)], vec![]).await.unwrap();
    for writers in [1usize, 8, 32] {
        let before = core.writer_stats();
        let t0 = Instant::now();
        let per = n / writers;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let core = core.clone();
            let ids: Vec<String> = made[w * per..(w + 1) * per]
                .iter()
                .map(|c| c.run_id.clone())
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for id in ids {
                    let t = Instant::now();
                    core.record_step(&id, &done_step(&format!("k{writers}"), "1"))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        lat.sort();
        let dt = t0.elapsed();
        let after = core.writer_stats();
        println!(
            "writers={writers}: {:.0} writes/s, p50 {:?} p99 {:?}, {} transactions for {} writes, {}us per transaction",
            (per * writers) as f64 / dt.as_secs_f64(),
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            after.transactions - before.transactions,
            after.ops - before.ops,
            (after.busy_us - before.busy_us) / (after.transactions - before.transactions).max(1)
        );
    }
    core.close().await;
    drop_schema(&url, &schema).await;
}

/// Not a test: does pipelining work on this machine (50 prepared SELECTs at once vs one by one)?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn pipelining_probe() {
    let Some(url) = database_url() else { return };
    let client = admin(&url).await;
    let stmt = client.prepare("SELECT $1::int").await.unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..50i32 {
            client.query(&stmt, &[&i]).await.unwrap();
        }
        let seq = t.elapsed();
        let t = Instant::now();
        let futs: Vec<_> = (0..50i32)
            .map(|i| {
                let client = &client;
                let stmt = &stmt;
                async move { client.query(stmt, &[&i]).await.unwrap() }
            })
            .collect();
        futures_util::future::join_all(futs).await;
        println!(
            "50 queries: one by one {seq:?}, pipelined {:?}",
            t.elapsed()
        );
    }
}
