//! The PostgreSQL workloads: clients in two PostgreSQL servers with the `tob` extension, every
//! statement recorded in the history, PostgreSQL-side faults on their own thread (beside the
//! nemesis attacking the sequencer nodes), and end-state checks once the cluster is healed.
//!
//! - `usernames`: three clients per server insert (and one time in three delete) 60 overlapping
//!   names through the `tob_unique` trigger; a backend is terminated and a server is stopped
//!   with `-m immediate` (then restarted) in turn. Checked: `unique_rows` over the history,
//!   then the tables (no name twice, within or across databases; every acknowledged insert
//!   still there unless a delete may have removed it) and the cluster's claims (each name
//!   held by exactly the database that has the row, no claim without a row). Every other
//!   statement also appends a message naming it with `tob_append_on_commit` if it changed a
//!   row; checked (`outbox`) against the messages the run left in the total order: each
//!   acknowledged change's exactly once, in commit order within a database, no other.
//!   Beside them, one client per server inserts and deletes 2–20 names at a time, in one
//!   statement, from a pool of 2,000 names of their own (`b0`…), whose claims and releases
//!   `tob_unique` sends together at the end of the statement: not in the history, but checked
//!   at the end against what that client knows of its own table (every name of an
//!   acknowledged statement as it left it, unless a later statement of unknown outcome touched
//!   it) and by the same checks of the tables and the claims.
//! - `fencing`: two clients per server take `tob_lock('job')` and write to one ledger (on the
//!   first server) guarded by `tob_fence`, while the second server's background worker is
//!   paused past its session lease, so its backends lose locks they still believe in.
//!   Checked: lock tokens (`fencing`), accepted writes (`fenced_writes`), and the ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tob_sim::checkers::{fenced_writes, outbox, unique_rows};
use tob_sim::history::Event;

use crate::nemesis::Rng;
use crate::pg::{self, Server};
use crate::workload::Recorder;

/// Names contended for by the `usernames` workload.
pub const NAMES: u64 = 60;
/// Names the `usernames` workload's bulk clients contend for, many in one statement.
const BULK_NAMES: u64 = 2_000;
/// An insert (or delete) that also appends a message naming it, if it changed a row.
const OUTBOX_INSERT: &str = "WITH i AS (INSERT INTO users (name) VALUES ($1) RETURNING 1) \
                             SELECT tob_append_on_commit('outbox', $2) FROM i";
const OUTBOX_DELETE: &str = "WITH d AS (DELETE FROM users WHERE name = $1 RETURNING 1) \
                             SELECT tob_append_on_commit('outbox', $2) FROM d";
/// The `usernames` clients' settings: claims give up well within the run's statement timeout.
const CLIENT_SETTINGS: &str = "SET tob.request_timeout = '3s'; SET tob.claim_wait_timeout = '2s'";
/// The one resource of the `fencing` workload.
const RESOURCE: &str = "job";
const DATABASE: &str = "app";
/// Settling and reconciling finish shortly after the faults end; allow this much.
const SETTLE: Duration = Duration::from_secs(30);

static NEXT_SERVER: AtomicU32 = AtomicU32::new(0);

/// What a finished workload found beyond its history's checkers.
pub struct Ending {
    pub anomalies: Vec<String>,
    pub facts: Value,
}

/// A running PostgreSQL workload.
pub struct SqlRun {
    workload: String,
    servers: Arc<Vec<Server>>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
    /// The bulk clients (`usernames` only): the server each wrote to, and what it knows.
    bulk: Vec<(usize, JoinHandle<Bulk>)>,
    faults: JoinHandle<Vec<Value>>,
}

/// What a bulk client knows of its server's table at the end, and what it did.
#[derive(Default)]
struct Bulk {
    /// For each of its names it touched: Some(whether the row is there), or None when a
    /// statement of unknown outcome touched it last.
    known: BTreeMap<String, Option<bool>>,
    statements: BTreeMap<String, u64>,
}

/// Whether `workload` is one of this module's.
pub fn is_sql_workload(workload: &str) -> bool {
    workload == "usernames" || workload == "fencing"
}

/// `fail` for an ERROR (the statement's transaction rolled back, so it did not happen);
/// `info` for anything else — a FATAL or a lost connection may come after the commit.
fn statement_error(e: &postgres::Error) -> (&'static str, Value) {
    match e.as_db_error() {
        Some(db) if db.severity() == "ERROR" => {
            let mut value = json!({"sqlstate": db.code().code()});
            // DETAIL: Owner "two/app" holds it with fencing token 123 (state held).
            if let Some(owner) = db.detail().and_then(|d| d.split('"').nth(1)) {
                value["owner"] = json!(owner);
            }
            ("fail", value)
        }
        _ => ("info", json!({"error": e.to_string()})),
    }
}

fn think(rng: &mut Rng, mean: Duration) {
    let mean_us = mean.as_micros() as u64;
    if mean_us > 0 {
        std::thread::sleep(Duration::from_micros(rng.range(0, 2 * mean_us)));
    }
}

/// Sleeps until `at` after `started`, unless `stop` comes first; returns whether to go on.
fn sleep_until(started: Instant, at: Duration, stop: &AtomicBool) -> bool {
    while started.elapsed() < at {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn connect(server: &Server, settings: &str) -> Option<postgres::Client> {
    let mut db = server.connect(DATABASE).ok()?;
    db.batch_execute(&format!(
        "SET application_name = 'tob-faults'; SET statement_timeout = '10s'; {settings}"
    ))
    .ok()?;
    Some(db)
}

impl SqlRun {
    /// Starts two PostgreSQL servers pointed at `addresses`, the clients and the PostgreSQL
    /// faults for a run of `duration`.
    pub fn start(
        workload: &str,
        addresses: &[String],
        seed: u64,
        duration: Duration,
        mean_think: Duration,
        recorder: Arc<Recorder>,
    ) -> io::Result<SqlRun> {
        if !pg::extension_installed() {
            return Err(io::Error::other(format!(
                "the {workload} workload needs the tob extension in PostgreSQL 15 \
                 (run ./scripts/install-extension.sh)"
            )));
        }
        let cluster = addresses.join(",");
        let server = |name: &str, extra: &[&str]| {
            let n = NEXT_SERVER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("tob-faults-{}-{n}", std::process::id()));
            Server::start(&dir, name, &cluster, extra)
        };
        let one = server("one", &[])?;
        // In the fencing run, a short lease: pausing the second server's worker for 2.5 s
        // loses its session and with it the locks its backends hold.
        let two_extra: &[&str] =
            if workload == "fencing" { &["tob.session_ttl = '1s'"] } else { &[] };
        let two = server("two", two_extra)?;
        let mut ledger = one.create_app_database(DATABASE)?;
        two.create_app_database(DATABASE)?;
        if workload == "fencing" {
            ledger
                .batch_execute(
                    "CREATE TABLE ledger (id bigserial PRIMARY KEY, token bigint, writer text)",
                )
                .map_err(io::Error::other)?;
        }
        let servers = Arc::new(vec![one, two]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for process in 0..6u64 {
            let (servers, recorder, stop) = (servers.clone(), recorder.clone(), stop.clone());
            let fencing = workload == "fencing";
            if fencing && process >= 4 {
                break;
            }
            let rng = Rng::new(seed ^ (process + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            clients.push(std::thread::spawn(move || {
                let side = if fencing { process as usize / 2 } else { process as usize / 3 };
                let client = Client { process, rng, mean_think, recorder: &recorder, stop: &stop };
                if fencing {
                    client.fenced_writes(&servers[side], &servers[0]);
                } else {
                    client.usernames(&servers[side]);
                }
            }));
        }
        let mut bulk = Vec::new();
        if workload == "usernames" {
            for side in 0..2usize {
                let (servers, recorder, stop) = (servers.clone(), recorder.clone(), stop.clone());
                let process = 6 + side as u64;
                let rng = Rng::new(seed ^ (process + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let handle = std::thread::spawn(move || {
                    let client =
                        Client { process, rng, mean_think, recorder: &recorder, stop: &stop };
                    client.bulk(&servers[side])
                });
                bulk.push((side, handle));
            }
        }
        let faults = {
            let (servers, stop) = (servers.clone(), stop.clone());
            if workload == "fencing" {
                std::thread::spawn(move || pause_worker(&servers[1], duration, &stop))
            } else {
                std::thread::spawn(move || terminate_and_crash(&servers, duration, &stop))
            }
        };
        Ok(SqlRun { workload: workload.to_owned(), servers, recorder, stop, clients, bulk, faults })
    }

    /// Stops the clients, then checks the end state (the cluster must be healed and running).
    pub fn finish(self) -> io::Result<Ending> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            let _ = client.join();
        }
        let bulk: Vec<(usize, Bulk)> =
            self.bulk.into_iter().map(|(side, h)| (side, h.join().unwrap_or_default())).collect();
        let pg_faults = self.faults.join().unwrap_or_default();
        let ops = self.recorder.snapshot().operations().map_err(io::Error::other)?;
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        for op in ops.iter().filter(|op| op.outcome == tob_sim::history::Outcome::Fail) {
            let sqlstate = op.result.get("sqlstate").and_then(Value::as_str).unwrap_or("?");
            *failed.entry(format!("{} {sqlstate}", op.f)).or_default() += 1;
        }
        let mut facts = json!({"postgres_faults": pg_faults, "failures_by_sqlstate": failed});
        let mut anomalies = Vec::new();
        if self.workload == "fencing" {
            let mut db = reconnect(&self.servers[0])?;
            let tokens: Vec<u64> = db
                .query("SELECT token FROM ledger ORDER BY id", &[])
                .map_err(io::Error::other)?
                .iter()
                .map(|r| r.get::<_, i64>(0) as u64)
                .collect();
            let distinct: BTreeSet<u64> = tokens.iter().copied().collect();
            facts["ledger_rows"] = json!(tokens.len());
            facts["ledger_tokens"] = json!(distinct.len());
            let found = fenced_writes::check_ledger(&ops, RESOURCE, &tokens);
            anomalies.extend(found.iter().map(ToString::to_string));
        } else {
            let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for server in self.servers.iter() {
                let mut db = reconnect(server)?;
                let rows = db
                    .query("SELECT name, count(*) FROM users GROUP BY name", &[])
                    .map_err(io::Error::other)?;
                let owner = server.owner(DATABASE);
                for row in rows {
                    let (name, count): (String, i64) = (row.get(0), row.get(1));
                    if count > 1 {
                        anomalies.push(format!("unique_rows: {name} is {count} times in {owner}"));
                    }
                    tables.entry(owner.clone()).or_default().insert(name);
                }
            }
            facts["rows"] =
                json!(tables.iter().map(|(d, n)| (d.clone(), n.len())).collect::<BTreeMap<_, _>>());
            let mut statements: BTreeMap<String, u64> = BTreeMap::new();
            for (side, report) in &bulk {
                let owner = self.servers[*side].owner(DATABASE);
                let empty = BTreeSet::new();
                let rows = tables.get(&owner).unwrap_or(&empty);
                anomalies.extend(bulk_anomalies(&report.known, rows, &owner));
                for (what, n) in &report.statements {
                    *statements.entry(what.clone()).or_default() += n;
                }
            }
            facts["bulk_statements"] = json!(statements);
            // The history's checker knows the single-name clients' names only.
            let single: BTreeMap<String, BTreeSet<String>> = tables
                .iter()
                .map(|(db, names)| {
                    (db.clone(), names.iter().filter(|n| n.starts_with('u')).cloned().collect())
                })
                .collect();
            let found = unique_rows::check_final(&ops, &single);
            anomalies.extend(found.iter().map(ToString::to_string));
            // Across databases for the bulk names too (the checker saw only the others).
            let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
            for (db, names) in &tables {
                for name in names.iter().filter(|n| n.starts_with('b')) {
                    if let Some(other) = seen.insert(name, db) {
                        anomalies.push(format!("bulk: {name} is in both {other} and {db}"));
                    }
                }
            }
            anomalies.extend(claims_match_rows(&self.servers[0], &tables)?);
            let (messages, found) = outbox_matches(&self.servers[0], &ops)?;
            facts["outbox_messages"] = json!(messages);
            anomalies.extend(found);
        }
        Ok(Ending { anomalies, facts })
    }
}

/// Where a bulk client's table differs from what it knows: a name its last statement on it,
/// acknowledged, inserted or deleted, that is now gone or there. Names last touched by a
/// statement of unknown outcome are not judged.
fn bulk_anomalies(
    known: &BTreeMap<String, Option<bool>>,
    rows: &BTreeSet<String>,
    owner: &str,
) -> Vec<String> {
    known
        .iter()
        .filter_map(|(name, known)| {
            let there = rows.contains(name);
            let expected = (*known)?;
            (expected != there).then(|| {
                let should = if expected { "" } else { "not " };
                let is = if there { "there" } else { "gone" };
                format!(
                    "bulk: {name} should {should}be in {owner} after its last statement, which \
                     was acknowledged, but is {is}"
                )
            })
        })
        .collect()
}

/// Connects to a server that may still be restarting after a crash.
fn reconnect(server: &Server) -> io::Result<postgres::Client> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match server.connect(DATABASE) {
            Ok(db) => return Ok(db),
            Err(e) if Instant::now() > deadline => {
                return Err(io::Error::other(format!("{}: {e}", server.name)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Every name is held by exactly the database that has the row, and no name without a row is
/// held — allowing [`SETTLE`] for the background workers to settle and reconcile.
fn claims_match_rows(
    server: &Server,
    tables: &BTreeMap<String, BTreeSet<String>>,
) -> io::Result<Vec<String>> {
    let mut db = reconnect(server)?;
    let deadline = Instant::now() + SETTLE;
    let mut anomalies = Vec::new();
    let names = (0..NAMES).map(|n| format!("u{n}")).chain((0..BULK_NAMES).map(|n| format!("b{n}")));
    for name in names {
        let expected = tables.iter().find(|(_, names)| names.contains(&name)).map(|(db, _)| db);
        loop {
            let actual = db
                .query("SELECT owner, state FROM tob_owner('usernames', $1)", &[&name])
                .map_err(io::Error::other)?
                .first()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
            let exact = match (&actual, expected) {
                (None, None) => true,
                (Some((owner, state)), Some(db)) => owner == db && state == "held",
                _ => false,
            };
            if exact {
                break;
            }
            if Instant::now() > deadline {
                anomalies.push(format!(
                    "claims: {name} is in {expected:?} but the cluster says {actual:?}"
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(anomalies)
}

/// The messages appended on commit, checked (`outbox`) against the history — allowing
/// [`SETTLE`] for the background workers to settle and reconcile. Returns how many there were.
fn outbox_matches(
    server: &Server,
    ops: &[tob_sim::history::Operation],
) -> io::Result<(usize, Vec<String>)> {
    let mut db = reconnect(server)?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut messages: Vec<(u64, String)> = Vec::new();
        loop {
            let from = messages.last().map_or(1, |(seq, _)| *seq as i64 + 1);
            let page = db
                .query("SELECT seq, payload FROM tob_read($1, 10000, 'outbox')", &[&from])
                .map_err(io::Error::other)?;
            if page.is_empty() {
                break;
            }
            messages.extend(page.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get(1))));
        }
        let found = outbox::check(ops, &messages);
        if found.is_empty() || Instant::now() > deadline {
            return Ok((messages.len(), found.iter().map(ToString::to_string).collect()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One client thread's state.
struct Client<'a> {
    process: u64,
    rng: Rng,
    mean_think: Duration,
    recorder: &'a Recorder,
    stop: &'a AtomicBool,
}

impl Client<'_> {
    fn invoke(&self, f: &str, key: &str, value: Value) {
        self.recorder.push(Event::op(
            self.process,
            "invoke",
            f,
            json!(key),
            value,
            self.recorder.now(),
        ));
    }

    fn complete(&self, f: &str, key: &str, outcome: &str, value: Value) {
        self.recorder.push(Event::op(
            self.process,
            outcome,
            f,
            json!(key),
            value,
            self.recorder.now(),
        ));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Inserts and deletes names in `server`, one autocommit statement each, reconnecting
    /// after a statement of unknown outcome.
    fn usernames(mut self, server: &Server) {
        let database = server.owner(DATABASE);
        let mut events = 0u64;
        while !self.stopped() {
            let Some(mut db) = connect(server, CLIENT_SETTINGS) else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            while !self.stopped() {
                think(&mut self.rng, self.mean_think);
                let name = format!("u{}", self.rng.range(0, NAMES));
                // One delete in three keeps names changing hands rather than all taken.
                let f = if self.rng.range(0, 3) == 0 { "delete" } else { "insert" };
                // Every other one also appends a message naming it if it changed a row.
                let outbox = self.rng.range(0, 2) == 0;
                events += 1;
                let event = format!("{database}#{}#{events}", self.process);
                let sql = match (f, outbox) {
                    ("delete", false) => "DELETE FROM users WHERE name = $1",
                    (_, false) => "INSERT INTO users (name) VALUES ($1)",
                    ("delete", true) => OUTBOX_DELETE,
                    (_, true) => OUTBOX_INSERT,
                };
                let mut invoke = json!({"database": database});
                if outbox {
                    invoke["event"] = json!(event);
                }
                self.invoke(f, &name, invoke);
                let done = if outbox {
                    db.execute(sql, &[&name, &event])
                } else {
                    db.execute(sql, &[&name])
                };
                let (outcome, value) = match done {
                    Ok(_) if f == "insert" => ("ok", json!({"result": "inserted"})),
                    Ok(rows) => ("ok", json!({"rows": rows})),
                    Err(e) => statement_error(&e),
                };
                self.complete(f, &name, outcome, value);
                if outcome == "info" {
                    break;
                }
            }
        }
    }

    /// Inserts (two times in three) or deletes 2–20 names of its own pool in one autocommit
    /// statement each, keeping what it knows of its table; reconnects after a statement of
    /// unknown outcome.
    fn bulk(mut self, server: &Server) -> Bulk {
        let mut report = Bulk::default();
        while !self.stopped() {
            let Some(mut db) = connect(server, CLIENT_SETTINGS) else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            while !self.stopped() {
                think(&mut self.rng, self.mean_think * 4);
                let size = self.rng.range(2, 21);
                let names: BTreeSet<String> =
                    (0..size).map(|_| format!("b{}", self.rng.range(0, BULK_NAMES))).collect();
                let names: Vec<String> = names.into_iter().collect();
                let insert = self.rng.range(0, 3) != 0;
                let sql = if insert {
                    "INSERT INTO users (name) SELECT unnest($1::text[])"
                } else {
                    "DELETE FROM users WHERE name = ANY($1)"
                };
                let done = db.execute(sql, &[&names]);
                let (outcome, what) = match &done {
                    Ok(_) => ("ok", "ok".to_owned()),
                    Err(e) => match statement_error(e) {
                        ("fail", value) => {
                            ("fail", value["sqlstate"].as_str().unwrap_or("?").to_owned())
                        }
                        _ => ("info", "unknown".to_owned()),
                    },
                };
                let kind = if insert { "insert" } else { "delete" };
                *report.statements.entry(format!("{kind} {what}")).or_default() += 1;
                for name in &names {
                    match outcome {
                        "ok" => drop(report.known.insert(name.clone(), Some(insert))),
                        "fail" => drop(report.known.entry(name.clone()).or_insert(Some(false))),
                        _ => drop(report.known.insert(name.clone(), None)),
                    }
                }
                if outcome == "info" {
                    break;
                }
            }
        }
        report
    }

    /// Takes the lock through `lock_server`, makes five fenced writes to the ledger on
    /// `ledger_server`, unlocks; again until stopped.
    fn fenced_writes(mut self, lock_server: &Server, ledger_server: &Server) {
        let owner = lock_server.owner(DATABASE);
        let writer = format!("w{}", self.process);
        let settings = "SET tob.request_timeout = '2s'; SET tob.claim_wait_timeout = '1s'";
        while !self.stopped() {
            let (Some(mut lock_db), Some(mut write_db)) =
                (connect(lock_server, settings), connect(ledger_server, ""))
            else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            'session: while !self.stopped() {
                think(&mut self.rng, self.mean_think);
                self.invoke("lock", RESOURCE, json!({"owner": owner}));
                let token = match lock_db.query_one("SELECT tob_lock($1)", &[&RESOURCE]) {
                    Ok(row) => row.get::<_, i64>(0),
                    Err(e) => {
                        let (outcome, value) = statement_error(&e);
                        self.complete("lock", RESOURCE, outcome, value);
                        if outcome == "info" {
                            break 'session;
                        }
                        continue;
                    }
                };
                let granted = json!({"result": "claimed", "token": token});
                self.complete("lock", RESOURCE, "ok", granted);
                // Hold the lock for a few writes; a fault may take it away meanwhile.
                for _ in 0..5 {
                    self.invoke(
                        "fenced_write",
                        RESOURCE,
                        json!({"token": token, "writer": writer}),
                    );
                    let write = write_db.transaction().and_then(|mut tx| {
                        tx.query_one("SELECT tob_fence($1, $2)", &[&RESOURCE, &token])?;
                        tx.execute(
                            "INSERT INTO ledger (token, writer) VALUES ($1, $2)",
                            &[&token, &writer],
                        )?;
                        tx.commit()
                    });
                    let (outcome, value) = match write {
                        Ok(()) => ("ok", json!({"result": "accepted"})),
                        Err(e) => statement_error(&e),
                    };
                    self.complete("fenced_write", RESOURCE, outcome, value);
                    if outcome == "info" {
                        break 'session;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = lock_db.query_one("SELECT tob_unlock($1)", &[&RESOURCE]);
            }
        }
    }
}

/// The `usernames` run's PostgreSQL faults, every 15 s from 10 s in, while at least 5 s of the
/// run remain: a terminated backend and a crash (`-m immediate`, 2 s down), alternating
/// between the servers.
fn terminate_and_crash(servers: &[Server], duration: Duration, stop: &AtomicBool) -> Vec<Value> {
    let started = Instant::now();
    let mut done = Vec::new();
    for k in 0u64.. {
        let at = Duration::from_secs(10 + 15 * k);
        if at + Duration::from_secs(5) > duration || !sleep_until(started, at, stop) {
            break;
        }
        let server = &servers[((k / 2 + k % 2) % 2) as usize];
        let fault = if k % 2 == 0 {
            let terminated = server.connect("postgres").and_then(|mut admin| {
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'tob-faults' LIMIT 1",
                    &[],
                )
            });
            format!("terminate-backend ({})", if terminated.is_ok() { "done" } else { "failed" })
        } else {
            let _ = server.stop_immediate();
            std::thread::sleep(Duration::from_secs(2));
            // A restart can race the previous instance's last exit; try a few times.
            let restarted = (0..5).any(|_| {
                let ok = server.restart_after_crash().is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(500));
                }
                ok
            });
            format!("crash-immediate ({})", if restarted { "restarted" } else { "restart failed" })
        };
        done.push(json!({"at_ms": started.elapsed().as_millis() as u64, "server": server.name, "fault": fault}));
    }
    done
}

/// The `fencing` run's PostgreSQL fault: the second server's background worker stopped with
/// SIGSTOP for 2.5 s (past its 1 s session lease) every 7 s while 3 s of the run remain.
fn pause_worker(server: &Server, duration: Duration, stop: &AtomicBool) -> Vec<Value> {
    let started = Instant::now();
    let mut done = Vec::new();
    for k in 1u64.. {
        let at = Duration::from_secs(7 * k);
        if at + Duration::from_secs(3) > duration || !sleep_until(started, at, stop) {
            break;
        }
        let pid = server.connect("postgres").ok().and_then(|mut admin| {
            let row = admin
                .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'tob'", &[])
                .ok()??;
            Some(row.get::<_, i32>(0))
        });
        let Some(pid) = pid else { continue };
        let signal = |name: &str| {
            let _ = std::process::Command::new("kill").arg(name).arg(pid.to_string()).status();
        };
        signal("-STOP");
        std::thread::sleep(Duration::from_millis(2500));
        signal("-CONT");
        done.push(json!({"at_ms": started.elapsed().as_millis() as u64, "server": server.name, "fault": "pause-background-worker 2.5s"}));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_client_finds_its_table_wrong_where_it_is_and_only_there() {
        let known: BTreeMap<String, Option<bool>> = [
            ("b1", Some(true)),  // inserted, acknowledged
            ("b2", Some(false)), // deleted, acknowledged
            ("b3", None),        // last touched by a statement of unknown outcome
            ("b4", None),
            ("b5", Some(true)),
            ("b6", Some(false)),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect();
        let right: BTreeSet<String> = ["b1", "b3", "b5"].map(String::from).into();
        assert!(bulk_anomalies(&known, &right, "one/app").is_empty());
        // b1 lost, b2 back; b3 and b4 may be either way.
        let wrong: BTreeSet<String> = ["b2", "b4", "b5"].map(String::from).into();
        let found = bulk_anomalies(&known, &wrong, "one/app");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("bulk: b1 should be in one/app") && found[0].ends_with("gone")
        );
        assert!(found[1].starts_with("bulk: b2 should not be in") && found[1].ends_with("there"));
    }
}
