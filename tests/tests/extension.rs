//! The `tob` extension against real PostgreSQL servers and a real 3-node cluster.

use std::time::{Duration, Instant};

use tob_e2e::{Postgres, Sequencers, eventually, sqlstate, wait_until_ready};

async fn names(db: &tob_e2e::Client) -> Vec<String> {
    let rows = db.query("SELECT name FROM users ORDER BY name", &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn read_events(db: &tob_e2e::Client) -> Vec<(i64, String)> {
    db.query("SELECT seq, payload FROM tob_read(1, 100, 'events')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

/// Each statement fails with its SQLSTATE.
async fn fails_with(db: &tob_e2e::Client, cases: &[(&str, &str)]) {
    for (sql, code) in cases {
        let err = db.query_one(*sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), *code, "{sql}");
    }
}

/// The process id of the server's process of `backend_type` (`pg_stat_activity`).
async fn process_of(db: &tob_e2e::Client, backend_type: &str) -> i32 {
    let sql = "SELECT pid FROM pg_stat_activity WHERE backend_type = $1";
    db.query_one(sql, &[&backend_type]).await.unwrap().get(0)
}

/// `kill -SIGNAL pid` (the test runs as root, the server as `postgres`).
fn send_signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
    assert!(status.unwrap().success(), "kill {signal} {pid}");
}

async fn owner_state(db: &tob_e2e::Client, key: &str) -> Option<String> {
    let rows = db.query("SELECT state FROM tob_owner('usernames', $1)", &[&key]).await.unwrap();
    rows.first().map(|r| r.get(0))
}

/// Whether `key`'s claim state in `usernames` becomes `expected` (None: free) within `secs`.
async fn state_becomes(db: &tob_e2e::Client, key: &str, expected: Option<&str>, secs: u64) -> bool {
    eventually(Duration::from_secs(secs), || async {
        owner_state(db, key).await.as_deref() == expected
    })
    .await
}

/// A 3-node cluster and one PostgreSQL server with two databases, `app` and `other`, once the
/// cluster answers. Keep the first two alive: dropped, they stop.
async fn one_server_two_databases() -> (Sequencers, Postgres, tob_e2e::Client, tob_e2e::Client) {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    let other = pg.create_app_database("other").await;
    wait_until_ready(&db).await;
    (cluster, pg, db, other)
}

/// Two servers, two databases each racing to insert the same usernames through the trigger:
/// every name ends up in exactly one database, and its claim is held.
#[tokio::test]
async fn concurrent_inserts_across_databases_keep_each_name_once() {
    let cluster = Sequencers::start();
    let pg1 = Postgres::start(&cluster.addresses(), &[]);
    let pg2 = Postgres::start(&cluster.addresses(), &[]);
    let a = pg1.create_app_database("app").await;
    let b = pg2.create_app_database("app").await;
    wait_until_ready(&a).await;
    wait_until_ready(&b).await;

    let mut tasks = Vec::new();
    for (server, offset) in [(&pg1, 0), (&pg1, 1), (&pg2, 2), (&pg2, 3)] {
        let db = server.connect("app").await;
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for i in 0..40 {
                // Each name is wanted by all four clients, in different orders.
                let name = format!("user{}", (i * 7 + offset * 13) % 40);
                match db.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await {
                    Ok(_) => won += 1,
                    Err(e) => assert_eq!(sqlstate(&e), "23505", "{e:?}"),
                }
            }
            won
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let mut all = names(&a).await;
    all.extend(names(&b).await);
    all.sort();
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(all, expected, "every name exactly once across both databases");
    assert_eq!(total, 40);
    // Claims become held once the worker settles the committed transactions.
    for name in ["user0", "user17", "user39"] {
        let held = state_becomes(&a, name, Some("held"), 10).await;
        assert!(held, "{name} held");
    }
}

/// Rollback and savepoint rollback release; a committed delete releases; an aborted delete
/// keeps the name.
#[tokio::test]
async fn rollback_savepoint_and_delete_release() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let mut db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    let other = pg.connect("app").await;

    // Rolled back: free again.
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO users (name) VALUES ('rolled')", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    other.execute("INSERT INTO users (name) VALUES ('rolled')", &[]).await.unwrap();

    // A savepoint rolled back releases what it claimed, and only that.
    db.batch_execute(
        "BEGIN;
         INSERT INTO users (name) VALUES ('kept');
         SAVEPOINT s;
         INSERT INTO users (name) VALUES ('undone');
         ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(owner_state(&db, "undone").await, None);
    assert!(owner_state(&db, "kept").await.is_some());
    let err = other.execute("INSERT INTO users (name) VALUES ('kept')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");

    // An aborted DELETE keeps the claim; a committed one releases it.
    db.batch_execute("BEGIN; DELETE FROM users WHERE name = 'kept'; ROLLBACK;").await.unwrap();
    assert!(state_becomes(&db, "kept", Some("held"), 5).await);
    let err = other.execute("INSERT INTO users (name) VALUES ('kept')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    db.execute("DELETE FROM users WHERE name = 'kept'", &[]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { owner_state(&db, "kept").await.is_none() })
            .await
    );
    other.execute("INSERT INTO users (name) VALUES ('kept')", &[]).await.unwrap();

    // UPDATE moves the claim.
    db.execute("INSERT INTO users (name) VALUES ('old_name')", &[]).await.unwrap();
    db.execute("UPDATE users SET name = 'new_name' WHERE name = 'old_name'", &[]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            owner_state(&db, "old_name").await.is_none()
                && owner_state(&db, "new_name").await.as_deref() == Some("held")
        })
        .await
    );

    // A savepoint that deleted a row and was rolled back keeps the name.
    db.batch_execute(
        "BEGIN;
         SAVEPOINT s;
         DELETE FROM users WHERE name = 'new_name';
         ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(owner_state(&db, "new_name").await.as_deref(), Some("held"));
}

/// A claimer waits for a pending claim: it gets the name when the holder aborts, and 23505
/// when the holder commits; and for a held name whose DELETE is not committed yet: 23505 if
/// the deleter rolls back, the name if it commits. `nowait` fails at once with 55P03.
#[tokio::test]
async fn waiting_claimer_follows_the_holders_fate() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let holder = pg.create_app_database("app").await;
    wait_until_ready(&holder).await;

    // `holder` inserts the name in an open transaction.
    for (outcome, expected) in [("ROLLBACK", None), ("COMMIT", Some("23505"))] {
        let name = format!("contested_{outcome}");
        holder.batch_execute("BEGIN").await.unwrap();
        holder.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await.unwrap();
        insert_waits_for(&pg, &holder, &name, outcome, expected).await;
    }
    // `holder` deletes the name (committed earlier) in an open transaction: the deleter's
    // fate decides (free if it commits, 23505 if it rolls back), as with a unique index.
    for (outcome, expected) in [("ROLLBACK", Some("23505")), ("COMMIT", None)] {
        let name = format!("deleted_{outcome}");
        holder.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await.unwrap();
        holder.batch_execute("BEGIN").await.unwrap();
        holder.execute("DELETE FROM users WHERE name = $1", &[&name]).await.unwrap();
        insert_waits_for(&pg, &holder, &name, outcome, expected).await;
    }
}

/// While `holder`'s transaction is open, an insert of `name` fails at once with `nowait` and
/// otherwise waits; `holder` ends with `outcome`; the insert then succeeds or fails with
/// `expected`, promptly.
async fn insert_waits_for(
    pg: &Postgres,
    holder: &tob_e2e::Client,
    name: &str,
    outcome: &str,
    expected: Option<&str>,
) {
    let nowait = pg.connect("app").await;
    nowait.batch_execute("SET tob.claim_wait = nowait").await.unwrap();
    let err = nowait.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55P03");
    let why = if name.starts_with("deleted") { "being released by" } else { "pending in" };
    let message = err.as_db_error().unwrap().message();
    assert!(message.contains(&format!("is {why} another transaction")), "{message}");

    let started = Instant::now();
    let wait_client = pg.connect("app").await;
    let name = name.to_owned();
    let waiting = tokio::spawn(async move {
        wait_client.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "the claimer waits while the other transaction is open");
    holder.batch_execute(outcome).await.unwrap();
    let result = waiting.await.unwrap();
    match expected {
        None => assert!(result.is_ok(), "{result:?}"),
        Some(code) => assert_eq!(sqlstate(&result.unwrap_err()), code),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A waiting claimer gives up after tob.claim_wait_timeout with 55P03; statement_timeout
/// and pg_cancel_backend interrupt a wait with 57014; of two transactions waiting for each
/// other's names, the first to give up fails with 55P03 and the other gets on.
#[tokio::test]
async fn waits_end_on_timeouts_and_cancel() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let holder = pg.create_app_database("app").await;
    wait_until_ready(&holder).await;
    holder.batch_execute("BEGIN; INSERT INTO users (name) VALUES ('busy');").await.unwrap();

    let db = pg.connect("app").await;
    db.batch_execute("SET tob.claim_wait_timeout = '300ms'").await.unwrap();
    let started = Instant::now();
    let err = db.execute("INSERT INTO users (name) VALUES ('busy')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55P03");
    assert!(started.elapsed() < Duration::from_secs(5));

    db.batch_execute("SET tob.claim_wait_timeout = '60s'; SET statement_timeout = '300ms'")
        .await
        .unwrap();
    let started = Instant::now();
    let err = db.execute("INSERT INTO users (name) VALUES ('busy')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));

    db.batch_execute("SET statement_timeout = 0").await.unwrap();
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let canceller = pg.connect("app").await;
    let waiting =
        tokio::spawn(
            async move { db.execute("INSERT INTO users (name) VALUES ('busy')", &[]).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    canceller.execute("SELECT pg_cancel_backend($1)", &[&pid]).await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(2), "cancel acts promptly");
    holder.batch_execute("ROLLBACK").await.unwrap();

    // Two transactions that each wait for the other's name: a deadlock PostgreSQL cannot see
    // (the waits are on the cluster, as between two servers). The one with the shorter
    // tob.claim_wait_timeout gives up with 55P03; its failed statement aborts its transaction
    // at once (PostgreSQL aborts on the error, before the ROLLBACK), which releases its name,
    // and the other gets it without waiting out its own timeout.
    let mut sides = Vec::new();
    for (mine, timeout) in [("deadlock_a", "1s"), ("deadlock_b", "20s")] {
        let side = pg.connect("app").await;
        side.batch_execute(&format!("SET tob.claim_wait_timeout = '{timeout}'")).await.unwrap();
        side.batch_execute("BEGIN").await.unwrap();
        side.execute("INSERT INTO users (name) VALUES ($1)", &[&mine]).await.unwrap();
        sides.push(side);
    }
    let started = Instant::now();
    let waits: Vec<_> = sides
        .into_iter()
        .zip(["deadlock_b", "deadlock_a"])
        .map(|(side, theirs)| {
            tokio::spawn(async move {
                let result = side.execute("INSERT INTO users (name) VALUES ($1)", &[&theirs]).await;
                (side, result, started.elapsed())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for wait in waits {
        outcomes.push(wait.await.unwrap());
    }
    let (gave_up, a_result, a_waited) = &outcomes[0];
    let (got_it, b_result, b_waited) = &outcomes[1];
    assert_eq!(sqlstate(a_result.as_ref().unwrap_err()), "55P03", "{a_result:?}");
    assert!(*a_waited >= Duration::from_secs(1), "{a_waited:?}");
    assert!(b_result.is_ok(), "{b_result:?}");
    assert!(*b_waited < Duration::from_secs(10), "not its own timeout: {b_waited:?}");
    gave_up.batch_execute("ROLLBACK").await.unwrap();
    got_it.batch_execute("COMMIT").await.unwrap();
    let rows: i64 = holder
        .query_one("SELECT count(*) FROM users WHERE name LIKE 'deadlock_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "the second transaction has both names");
    for name in ["deadlock_a", "deadlock_b"] {
        assert!(owner_state(&holder, name).await.is_some(), "{name} held");
    }
}

/// A cluster that hangs (every node stopped with SIGSTOP) holds a call on the network:
/// statement_timeout and pg_cancel_backend still end it promptly with 57014.
#[tokio::test]
async fn cancel_interrupts_a_call_to_a_hung_cluster() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    cluster.signal_all("STOP");
    db.batch_execute("SET statement_timeout = '300ms'").await.unwrap();
    let started = Instant::now();
    let err = db.query_one("SELECT tob_append('t', 'x')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    db.batch_execute("SET statement_timeout = 0").await.unwrap();
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let canceller = pg.connect("app").await;
    let call = tokio::spawn(async move { db.query_one("SELECT tob_sync()", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the call waits on the hung cluster");
    let started = Instant::now();
    canceller.execute("SELECT pg_cancel_backend($1)", &[&pid]).await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    cluster.signal_all("CONT");
}

/// pg_terminate_backend in the middle of a transaction releases its claims.
#[tokio::test]
async fn terminated_backend_releases_its_claims() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let admin = pg.create_app_database("app").await;
    wait_until_ready(&admin).await;
    let victim = pg.connect("app").await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    victim.batch_execute("BEGIN; INSERT INTO users (name) VALUES ('orphan');").await.unwrap();
    assert_eq!(owner_state(&admin, "orphan").await.as_deref(), Some("pending"));
    admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    assert!(state_becomes(&admin, "orphan", None, 10).await);
    admin.execute("INSERT INTO users (name) VALUES ('orphan')", &[]).await.unwrap();
}

/// Fencing: tokens grow; tob_fence accepts the newest and rejects an older one (TB001).
#[tokio::test]
async fn stale_fencing_token_is_rejected() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let a = pg.create_app_database("app").await;
    wait_until_ready(&a).await;
    let b = pg.connect("app").await;

    let old: i64 = a.query_one("SELECT tob_lock('report')", &[]).await.unwrap().get(0);
    b.batch_execute("SET tob.claim_wait = nowait").await.unwrap();
    let err = b.query_one("SELECT tob_lock('report')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55P03");
    a.query_one("SELECT tob_fence('report', $1)", &[&old]).await.unwrap();
    let unlocked: bool = a.query_one("SELECT tob_unlock('report')", &[]).await.unwrap().get(0);
    assert!(unlocked);
    let new: i64 = b.query_one("SELECT tob_lock('report')", &[]).await.unwrap().get(0);
    assert!(new > old, "tokens grow: {new} > {old}");
    b.query_one("SELECT tob_fence('report', $1)", &[&new]).await.unwrap();
    let err = a.query_one("SELECT tob_fence('report', $1)", &[&old]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "TB001");
}

/// The cluster down: 08006 within the connect timeout, and nothing else breaks.
#[tokio::test]
async fn cluster_down_is_a_clear_error() {
    let mut cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    cluster.kill_all();
    db.batch_execute("SET tob.connect_timeout = '200ms'; SET tob.request_timeout = '1s'")
        .await
        .unwrap();
    let started = Instant::now();
    let err = db.query_one("SELECT tob_append('t', 'x')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = db.execute("INSERT INTO users (name) VALUES ('nobody')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(names(&db).await.is_empty(), "the failed insert left nothing");
    // Bad arguments are refused before any network call.
    fails_with(
        &db,
        &[
            ("SELECT tob_claim('ns', '')", "22023"),
            ("SELECT tob_claim('ns', NULL)", "22023"),
            ("SELECT tob_claim('ns', repeat('x', 2000))", "22001"),
            ("SELECT tob_append('t', repeat('x', 1048577))", "22001"),
            ("SELECT tob_next('')", "22023"),
            // NULL bounds: 22023, not pgrx's XX000 "argument 0 must not be null".
            ("SELECT * FROM tob_read(NULL)", "22023"),
            ("SELECT * FROM tob_read(1, NULL)", "22023"),
            ("SELECT * FROM tob_read(0)", "22023"),
        ],
    )
    .await;
    // Back up: works again.
    cluster.restart_all();
    // A namespace nobody created (a typo in a trigger, say): 42704 naming it, with a hint, and
    // nothing written; declared once, it works, from any database.
    db.batch_execute("SET tob.connect_timeout = '2s'; SET tob.request_timeout = '10s'")
        .await
        .unwrap();
    wait_until_ready(&db).await;
    db.batch_execute(
        "CREATE TABLE typo (name text NOT NULL);
         CREATE TRIGGER typo_unique AFTER INSERT OR DELETE ON typo
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usrenames', 'name');",
    )
    .await
    .unwrap();
    for sql in [
        "INSERT INTO typo VALUES ('alice')",
        "SELECT tob_claim('usrenames', 'alice')",
        "SELECT * FROM tob_owner('usrenames', 'alice')",
        "SELECT tob_release('usrenames', 'alice')",
    ] {
        let err = db.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42704", "{sql}: {err:?}");
        let error = err.as_db_error().unwrap();
        assert_eq!(error.message(), "tob: namespace \"usrenames\" does not exist");
        assert!(error.hint().unwrap().contains("tob_create_namespace('usrenames')"), "{error:?}");
    }
    let count: i64 = db.query_one("SELECT count(*) FROM typo", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
    let create = "SELECT tob_create_namespace('usrenames')";
    assert!(db.query_one(create, &[]).await.unwrap().get::<_, bool>(0), "created");
    assert!(!db.query_one(create, &[]).await.unwrap().get::<_, bool>(0), "exists already");
    let listed = db.query_one("SELECT array_agg(n) FROM tob_namespaces() n", &[]).await.unwrap();
    assert_eq!(listed.get::<_, Vec<String>>(0), ["usernames", "usrenames"]);
    db.execute("INSERT INTO typo VALUES ('alice')", &[]).await.unwrap();
    let err = db.query_one("SELECT tob_create_namespace('')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    // The rest, as before the outage.
    db.execute("INSERT INTO users (name) VALUES ('somebody')", &[]).await.unwrap();
}

/// Messages appended from two databases read back in the same total order from both.
#[tokio::test]
async fn reads_from_two_databases_agree_on_the_order() {
    let cluster = Sequencers::start();
    let pg1 = Postgres::start(&cluster.addresses(), &[]);
    let pg2 = Postgres::start(&cluster.addresses(), &[]);
    let a = pg1.create_app_database("app").await;
    let b = pg2.create_app_database("app").await;
    let mut seqs = Vec::new();
    for i in 0..10 {
        let (db, who) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        let seq: i64 = db
            .query_one("SELECT tob_append('events', $1)", &[&format!("{who}{i}")])
            .await
            .unwrap()
            .get(0);
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let from_a = read_events(&a).await;
    let from_b = read_events(&b).await;
    assert_eq!(from_a.len(), 10);
    assert_eq!(from_a, from_b);
    let position: i64 = b.query_one("SELECT tob_sync()", &[]).await.unwrap().get(0);
    assert!(position >= *seqs.last().unwrap());
    let n1: i64 = a.query_one("SELECT tob_next('orders')", &[]).await.unwrap().get(0);
    let n2: i64 = b.query_one("SELECT tob_next('orders')", &[]).await.unwrap().get(0);
    assert_eq!(n2, n1 + 1, "a gap-free global counter");

    // More than one reply holds (about 4 MiB of payloads): tob_read still returns every
    // message asked for, page after page — it used to stop after the first page, 4 of 12,
    // as if the log ended there — and a LIMIT takes only what it needs.
    let big_from: i64 = a
        .query_one(
            "SELECT min(tob_append('big', repeat('x', 1000000))) FROM generate_series(1, 12)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for db in [&a, &b] {
        let row = db
            .query_one(
                "SELECT count(*), min(seq), max(seq), sum(length(payload))
                 FROM tob_read($1, 100, 'big')",
                &[&big_from],
            )
            .await
            .unwrap();
        let (count, first, last, bytes): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!((count, first, last, bytes), (12, big_from, big_from + 11, 12_000_000));
    }
    let limited: i64 = a
        .query_one("SELECT count(*) FROM (SELECT * FROM tob_read($1, 100) LIMIT 5) r", &[&big_from])
        .await
        .unwrap()
        .get(0);
    assert_eq!(limited, 5);
    let capped: i64 = a
        .query_one("SELECT count(*) FROM tob_read($1, 7, 'big')", &[&big_from])
        .await
        .unwrap()
        .get(0);
    assert_eq!(capped, 7);
}

/// A transaction with more claims than the cluster takes in one batch (10,000 keys) commits:
/// its claims are prepared in batches. (Sent whole, its COMMIT failed with 22001 after every
/// claim had been made.) Deleting the rows in one transaction releases them all.
/// A read from before the oldest message the cluster keeps fails with 22003, naming where
/// to read on; from there on the kept messages come whole.
#[tokio::test]
async fn a_read_of_trimmed_messages_names_the_oldest_kept() {
    let cluster = Sequencers::start_with(&["--messages-retained", "5"]);
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    let mut seqs = Vec::new();
    for i in 0..8 {
        let sql = "SELECT tob_append('events', $1)";
        seqs.push(db.query_one(sql, &[&format!("e{i}")]).await.unwrap().get::<_, i64>(0));
    }
    let oldest_kept = seqs[3];
    for from in [seqs[0], oldest_kept - 1] {
        let err = db.query("SELECT * FROM tob_read($1)", &[&from]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "22003", "{err:?}");
        let report = err.as_db_error().unwrap();
        let named = format!("before seq {oldest_kept} are no longer kept");
        assert!(report.message().contains(&named), "{}", report.message());
        let hint = report.hint().unwrap_or_default();
        assert!(hint.contains(&format!("tob_read({oldest_kept}, ...)")), "{hint}");
    }
    let sql = "SELECT seq, payload FROM tob_read($1, 100, 'events')";
    let rows = db.query(sql, &[&oldest_kept]).await.unwrap();
    let kept: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: Vec<(i64, String)> =
        seqs[3..].iter().zip(3..).map(|(&seq, i)| (seq, format!("e{i}"))).collect();
    assert_eq!(kept, expected);
}

#[tokio::test]
async fn a_transaction_with_more_claims_than_one_batch_commits() {
    let (_cluster, _pg, db, other) = one_server_two_databases().await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO users (name) SELECT 'many' || i FROM generate_series(1, 10050) AS i;
         COMMIT;",
    )
    .await
    .unwrap();
    for name in ["many1", "many5000", "many10050"] {
        assert!(state_becomes(&other, name, Some("held"), 10).await, "{name}");
    }
    let err = other.execute("INSERT INTO users (name) VALUES ('many10001')", &[]).await;
    assert_eq!(sqlstate(&err.unwrap_err()), "23505");
    db.batch_execute("BEGIN; DELETE FROM users WHERE name LIKE 'many%'; COMMIT;").await.unwrap();
    for name in ["many1", "many10050"] {
        assert!(state_becomes(&other, name, None, 10).await, "{name}");
    }
    other.execute("INSERT INTO users (name) VALUES ('many10001')", &[]).await.unwrap();
}

/// PostgreSQL stopped with `-m immediate` after the claims were prepared and before the
/// commit record: after the restart the reconciler sees the transaction aborted and releases
/// the claim. A PREPAREd transaction's claims survive the crash and follow COMMIT PREPARED or
/// ROLLBACK PREPARED.
#[tokio::test]
async fn crash_between_prepare_and_commit_is_reconciled() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;

    db.batch_execute(
        "BEGIN;
         INSERT INTO users (name) VALUES ('two_phase_commit');
         PREPARE TRANSACTION 'p_commit';
         BEGIN;
         INSERT INTO users (name) VALUES ('two_phase_rollback');
         PREPARE TRANSACTION 'p_rollback';",
    )
    .await
    .unwrap();
    assert_eq!(owner_state(&db, "two_phase_commit").await.as_deref(), Some("prepared"));

    // Both ways a claim gets prepared: at once (a statement outside a transaction block) and
    // by Prepare at COMMIT (inside one).
    let mut pending = Vec::new();
    for sql in [
        "INSERT INTO users (name) VALUES ('crashed')",
        "BEGIN; INSERT INTO users (name) VALUES ('crashed_block'); COMMIT;",
    ] {
        let committing = pg.connect("app").await;
        committing.batch_execute("SET tob.test_pause_after_prepare = '30s'").await.unwrap();
        pending.push(tokio::spawn(async move { committing.batch_execute(sql).await }));
    }
    for name in ["crashed", "crashed_block"] {
        assert!(
            state_becomes(&db, name, Some("prepared"), 10).await,
            "{name}: state {:?}\n{}",
            owner_state(&db, name).await,
            pg.log()
        );
    }
    pg.stop_immediate();
    for task in pending {
        assert!(task.await.unwrap().is_err(), "the connection died with the server");
    }
    pg.restart_after_crash();

    let db = pg.connect("app").await;
    for name in ["crashed", "crashed_block"] {
        assert!(
            state_becomes(&db, name, None, 15).await,
            "the reconciler released {name}, whose transaction never committed\n{}",
            pg.log()
        );
        assert!(names(&db).await.iter().all(|n| n != name));
    }
    // The PREPAREd transactions stayed prepared across the crash, and so did their claims.
    assert_eq!(owner_state(&db, "two_phase_commit").await.as_deref(), Some("prepared"));
    db.batch_execute("COMMIT PREPARED 'p_commit'").await.unwrap();
    db.batch_execute("ROLLBACK PREPARED 'p_rollback'").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            owner_state(&db, "two_phase_commit").await.as_deref() == Some("held")
                && owner_state(&db, "two_phase_rollback").await.is_none()
        })
        .await
    );
    db.execute("INSERT INTO users (name) VALUES ('crashed')", &[]).await.unwrap();
}

/// A claim prepared at once (outside a transaction block) whose transaction had written nothing to the WAL
/// when PostgreSQL crashed: after the restart its transaction id is handed out again, and the
/// new transaction with that id commits. The reconciler must still see the claim's own
/// transaction as aborted (its start is over and the id lies past where the next start
/// began) and release it, not take the reused id's commit for the claim's.
#[tokio::test]
async fn a_claim_whose_transaction_id_is_reused_after_a_crash_is_released() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    // tob_claim itself, not an INSERT through the trigger: a row (and a serial column's
    // sequence) would carry the claimer's id to the WAL, which the WAL writer flushes within
    // 200 ms, and then the id is not handed out again.
    let claiming = pg.connect("app").await;
    claiming.batch_execute("SET tob.test_pause_after_claim = '60s'").await.unwrap();
    let pending = tokio::spawn(async move {
        claiming.execute("SELECT tob_claim('usernames', 'reused')", &[]).await
    });
    assert!(
        state_becomes(&db, "reused", Some("prepared"), 10).await,
        "state {:?}\n{}",
        owner_state(&db, "reused").await,
        pg.log()
    );
    // The claimer's transaction id (read without taking one: nothing after it reaches the WAL).
    let claimer: i64 = db
        .query_one(
            "SELECT backend_xid::text::bigint FROM pg_stat_activity
             WHERE query LIKE 'SELECT tob_claim%' AND backend_xid IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    pg.stop_immediate();
    assert!(pending.await.unwrap().is_err(), "the connection died with the server");
    pg.restart_after_crash();

    let db = pg.connect("app").await;
    // Hand the ids out again and commit them, the claimer's id among them.
    let mut handed_out = Vec::new();
    while handed_out.last().is_none_or(|&id| id <= claimer) {
        handed_out.push(db.query_one("SELECT txid_current()", &[]).await.unwrap().get::<_, i64>(0));
    }
    // Ids only grow: starting at or below the claimer's, it was handed out again (to us or to
    // another transaction of the new start).
    assert!(handed_out[0] <= claimer, "id {claimer} was handed out again: {handed_out:?}");
    assert!(
        state_becomes(&db, "reused", None, 15).await,
        "the claim of a transaction that never committed is released, not finalized by the id's \
         new owner: state {:?}\n{}",
        owner_state(&db, "reused").await,
        pg.log()
    );
    // Several reconciler rounds later it is still free, and the name can be taken.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(owner_state(&db, "reused").await, None);
    db.execute("INSERT INTO users (name) VALUES ('reused')", &[]).await.unwrap();
    assert!(state_becomes(&db, "reused", Some("held"), 10).await);
    let boots = std::fs::read_to_string(pg.data_dir().join("tob_boots")).unwrap();
    let starts: Vec<&str> = boots.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(starts.len(), 2, "{boots}");
    assert!(starts[0].ends_with(" final") && starts[1].ends_with(" final"), "{boots}");

    // A damaged registry stops the server with a message naming the file and line, rather
    // than letting it make claims it could not settle after the next crash.
    pg.stop_immediate();
    let path = pg.data_dir().join("tob_boots");
    std::fs::write(&path, format!("{boots}3 damaged\n")).unwrap();
    assert!(pg.try_restart().is_err(), "started with a damaged start registry");
    let log = pg.log();
    assert!(
        log.contains("tob: cannot record this start of the server")
            && log.contains("tob_boots: line 5: expected four fields"),
        "{log}"
    );
    std::fs::write(&path, &boots).unwrap();
    pg.restart_after_crash();
    let boots = std::fs::read_to_string(&path).unwrap();
    assert_eq!(boots.lines().filter(|l| !l.starts_with('#')).count(), 3, "{boots}");
    let db = pg.connect("app").await;
    wait_until_ready(&db).await;
    db.execute("INSERT INTO users (name) VALUES ('after the repair')", &[]).await.unwrap();
}

/// The sequencer leader killed with kill -9 during a claim storm from two servers: no name
/// in two databases, and every committed row's claim is held by its database.
#[tokio::test]
async fn leader_killed_during_claim_storm_loses_nothing() {
    let mut cluster = Sequencers::start();
    let pg1 = Postgres::start(&cluster.addresses(), &["cluster_name = 'one'"]);
    let pg2 = Postgres::start(&cluster.addresses(), &["cluster_name = 'two'"]);
    let a = pg1.create_app_database("app").await;
    let b = pg2.create_app_database("app").await;
    wait_until_ready(&a).await;
    wait_until_ready(&b).await;

    let mut tasks = Vec::new();
    for (server, client) in [(&pg1, 0), (&pg1, 1), (&pg2, 2), (&pg2, 3)] {
        let db = server.connect("app").await;
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                let name = format!("storm{}", (i * 5 + client * 11) % 60);
                if let Err(e) = db.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await {
                    // Refusals and failover errors are fine; a duplicate would not be.
                    let code = sqlstate(&e);
                    assert!(
                        ["23505", "40001", "08006", "57014", "55P03"].contains(&code.as_str()),
                        "{e:?}"
                    );
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = cluster.leader_index(&a).await;
    cluster.kill(leader);
    for task in tasks {
        task.await.unwrap();
    }
    cluster.restart(leader);

    let in_a = names(&a).await;
    let in_b = names(&b).await;
    for name in &in_a {
        assert!(!in_b.contains(name), "{name} in both databases");
    }
    assert!(!in_a.is_empty() && !in_b.is_empty());
    for (db, rows, owner) in [(&a, &in_a, "one/app"), (&b, &in_b, "two/app")] {
        for name in rows.iter() {
            let held = eventually(Duration::from_secs(15), || async {
                let row = db
                    .query("SELECT owner, state FROM tob_owner('usernames', $1)", &[name])
                    .await
                    .unwrap();
                row.first().is_some_and(|r| {
                    r.get::<_, String>(0) == owner && r.get::<_, String>(1) == "held"
                })
            })
            .await;
            assert!(held, "committed {name} is held by {owner}");
        }
    }
}

/// Nothing is granted to PUBLIC; the tob_user role grants use. Read-only transactions do not
/// claim.
#[tokio::test]
async fn privileges_need_the_tob_user_role() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let admin = pg.create_app_database("app").await;
    admin.batch_execute("CREATE ROLE app_login LOGIN").await.unwrap();
    let user = pg.connect_as("app", "app_login").await;
    let err = user.query_one("SELECT tob_next('c')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    admin.batch_execute("GRANT tob_user TO app_login").await.unwrap();
    let value: i64 = user.query_one("SELECT tob_next('c')", &[]).await.unwrap().get(0);
    assert_eq!(value, 1);
    // Declaring namespaces belongs to whoever defines the schema, not to every user; listing
    // them is for every user.
    let listed = user.query("SELECT * FROM tob_namespaces()", &[]).await.unwrap();
    assert!(listed.is_empty(), "none declared in this test");
    let err = user.query_one("SELECT tob_create_namespace('x')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501");

    // A read-only transaction (and so a hot standby) may not claim, release or append on
    // commit: 25006, as for nextval. Plain appends and reads do not touch the database.
    wait_until_ready(&admin).await;
    for call in [
        "SELECT tob_claim('usernames', 'read_only')",
        "SELECT tob_release('usernames', 'read_only')",
        "SELECT tob_append_on_commit('t', 'read_only')",
    ] {
        admin.batch_execute("BEGIN READ ONLY").await.unwrap();
        let err = admin.batch_execute(call).await.unwrap_err();
        assert_eq!(sqlstate(&err), "25006", "{call}: {err:?}");
        admin.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(owner_state(&admin, "read_only").await, None);
    admin
        .batch_execute("BEGIN READ ONLY; SELECT tob_append('t', 'x'), tob_sync(); COMMIT")
        .await
        .unwrap();
}

/// A DELETE whose transaction ended but whose end the background worker has not yet told the
/// cluster leaves a release scheduled; deleting the same row again must wait for it to settle
/// and then release the claim — not commit while the claim stays held for good (found by a
/// 30-minute fault run). If the wait runs out, the DELETE fails with 55P03 and the row stays.
#[tokio::test]
async fn a_second_delete_waits_for_an_unsettled_one_and_releases() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    db.batch_execute("INSERT INTO users (name) VALUES ('alice'), ('bob')").await.unwrap();
    let worker = process_of(&db, "tob").await;
    let signal = |name: &str| send_signal(worker, name);
    let other = pg.connect("app").await;
    for (name, wait, deleted) in [("alice", "10s", true), ("bob", "300ms", false)] {
        // The worker stopped: the rolled-back DELETE's end stays unsettled in the cluster.
        signal("-STOP");
        other
            .batch_execute(&format!("BEGIN; DELETE FROM users WHERE name = '{name}'; ROLLBACK"))
            .await
            .unwrap();
        db.batch_execute(&format!("SET tob.claim_wait_timeout = '{wait}'")).await.unwrap();
        let started = Instant::now();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&name];
        let delete = db.execute("DELETE FROM users WHERE name = $1", &params);
        let result = if deleted {
            // The worker resumes while the DELETE waits.
            let resume = async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                signal("-CONT");
            };
            tokio::join!(delete, resume).0
        } else {
            let result = delete.await;
            signal("-CONT");
            result
        };
        if deleted {
            assert_eq!(result.unwrap(), 1);
            assert!(started.elapsed() >= Duration::from_millis(700), "it waited for the worker");
            let released = state_becomes(&db, name, None, 10).await;
            assert!(released, "{name}: deleted, so its claim must be released");
        } else {
            assert_eq!(sqlstate(&result.unwrap_err()), "55P03");
            assert!(names(&db).await.contains(&name.to_owned()), "the failed DELETE kept the row");
            let held = state_becomes(&db, name, Some("held"), 10).await;
            assert!(held, "{name}: the row stays, so does its claim");
        }
    }
}

/// `tob.settle_delay`: the worker gathers finished transactions and settles them together
/// (each settle is an entry in the cluster's log). Counted from the log: 40 transactions one
/// after another take 40 claims and, with a delay, a handful of settles; with `0` they took
/// one settle each (the test fails there).
#[tokio::test]
async fn finished_transactions_are_settled_together_after_the_settle_delay() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &["tob.settle_delay = '500ms'"]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    let commit_index = || async {
        let row = db
            .query_one("SELECT max(commit_index) FROM tob_status() WHERE role = 'leader'", &[])
            .await
            .unwrap();
        row.get::<_, Option<i64>>(0).expect("a leader")
    };
    let names: Vec<String> = (0..40).map(|i| format!("settled{i}")).collect();
    let before = commit_index().await;
    for name in &names {
        db.execute("INSERT INTO users (name) VALUES ($1)", &[name]).await.unwrap();
    }
    let held = eventually(Duration::from_secs(10), || async {
        let rows = db
            .query(
                "SELECT count(*) FROM unnest($1::text[]) n, tob_owner('usernames', n) o \
                 WHERE o.state = 'held'",
                &[&names],
            )
            .await
            .unwrap();
        rows[0].get::<_, i64>(0) == names.len() as i64
    })
    .await;
    assert!(held, "every committed claim is settled");
    // 40 claims; the rest are settles, keep-alives of the instance session (one per
    // `tob.session_ttl` / 4) and at most one settle per reconciler round (one a second).
    let entries = commit_index().await - before;
    assert!(entries >= 40, "{entries} entries for 40 claims");
    assert!(
        entries <= 40 + 12,
        "{} entries besides the claims: not settled together",
        entries - 40
    );
}

/// Every message of `topic`, in order, read a page at a time (a node answers at most 10,000
/// per read).
async fn payloads_of(db: &tob_e2e::Client, topic: &str) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut from = 1i64;
    loop {
        let page = db
            .query(
                "SELECT seq, payload FROM tob_read($1, 10000, $2) ORDER BY seq",
                &[&from, &topic],
            )
            .await
            .unwrap();
        let Some(last) = page.last() else { return payloads };
        from = last.get::<_, i64>(0) + 1;
        payloads.extend(page.iter().map(|r| r.get::<_, String>(1)));
    }
}

/// The reconciler, like the worker's queue, flushes the WAL before it settles a transaction it
/// found committed, so a `synchronous_commit = off` transaction's claim is never held after a
/// crash lost its commit. Made deterministic by overflowing the settle queue (8,192 entries)
/// while the worker is stopped: the worker then drops the queue and leaves all settling to the
/// reconciler, and nothing else flushes the WAL (the WAL writer is stopped too).
#[tokio::test]
async fn the_reconciler_flushes_a_commit_before_settling_it() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &[]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    let worker = process_of(&db, "tob").await;
    let wal_writer = process_of(&db, "walwriter").await;
    send_signal(worker, "-STOP");
    let mut fillers = Vec::new();
    for connection in 0..8 {
        let filler = pg.connect("app").await;
        fillers.push(tokio::spawn(async move {
            for i in 0..1030 {
                let key = format!("filler_{connection}_{i}");
                filler.execute("SELECT tob_claim('usernames', $1)", &[&key]).await.unwrap();
            }
        }));
    }
    for filler in fillers {
        filler.await.unwrap();
    }
    send_signal(wal_writer, "-STOP");
    // Two statements, not one string: a query string of several statements is one transaction
    // block, whose claim would need the instance session, which may have expired meanwhile.
    db.batch_execute("SET synchronous_commit = off").await.unwrap();
    db.batch_execute("INSERT INTO users (name) VALUES ('reconciled_async')").await.unwrap();
    send_signal(worker, "-CONT");
    let watch = pg.connect("app").await;
    assert!(
        state_becomes(&watch, "reconciled_async", Some("held"), 30).await,
        "settled by the reconciler\n{}",
        pg.log()
    );
    let (db, rows) = crash_and_count_rows(&pg, wal_writer, "reconciled_async").await;
    assert_eq!(
        (rows, owner_state(&db, "reconciled_async").await),
        (1, Some("held".to_owned())),
        "the settled transaction survived the crash with its row"
    );
}

/// A claim or a lock made after the instance session expired (the background worker stalled
/// past `tob.session_ttl`) waits for the worker's new session and then goes through; it used
/// to fail at once with XX000 `unknown_session`. If no new session comes within the connect
/// and request timeouts: 08006.
#[tokio::test]
async fn a_claim_after_the_instance_session_expired_waits_for_a_new_one() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &["tob.session_ttl = '1s'"]);
    let db = pg.create_app_database("app").await;
    wait_until_ready(&db).await;
    db.batch_execute("BEGIN; SELECT tob_claim('usernames', 'before_expiry'); COMMIT;")
        .await
        .unwrap();
    let worker = process_of(&db, "tob").await;
    send_signal(worker, "-STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the TTL: the session expired
    let claiming = pg.connect("app").await;
    let claim = tokio::spawn(async move {
        claiming
            .batch_execute("BEGIN; SELECT tob_claim('usernames', 'after_expiry'); COMMIT;")
            .await
    });
    let locking = pg.connect("app").await;
    let lock = tokio::spawn(async move {
        locking.query_one("SELECT tob_lock('after_expiry')", &[]).await.map(|r| r.get::<_, i64>(0))
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!claim.is_finished() && !lock.is_finished(), "both wait for a new session");
    send_signal(worker, "-CONT");
    claim.await.unwrap().expect("the claim went through with the new session");
    assert!(lock.await.unwrap().expect("so did the lock") > 0);
    assert!(state_becomes(&db, "after_expiry", Some("held"), 10).await);
    assert_eq!(owner_state(&db, "before_expiry").await.as_deref(), Some("held"));

    // No new session at all: 08006 after the connect and request timeouts.
    send_signal(worker, "-STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let err = db
        .batch_execute(
            "SET tob.connect_timeout = '1s'; SET tob.request_timeout = '1s';
             BEGIN; SELECT tob_claim('usernames', 'never_session'); COMMIT;",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    db.batch_execute("ROLLBACK").await.unwrap();
    // A lock, likewise. (The settings above were rolled back with the transaction block
    // they ran in.)
    db.batch_execute("SET tob.connect_timeout = '1s'; SET tob.request_timeout = '1s'")
        .await
        .unwrap();
    let started = Instant::now();
    let err = db.query_one("SELECT tob_lock('never_session')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?} {err:?}", started.elapsed());
    send_signal(worker, "-CONT");
    assert_eq!(owner_state(&db, "never_session").await, None);
}

/// `tob_append_on_commit`: a committed transaction's messages enter the total order together
/// and in order, after the commit and never before; a rolled-back transaction's or savepoint's
/// never; a PREPAREd transaction's follow COMMIT/ROLLBACK PREPARED; a transaction cut off by a
/// crash before its commit record leaves none; large transactions are split and bounded.
#[tokio::test]
async fn messages_appended_on_commit_follow_their_transaction() {
    let cluster = Sequencers::start();
    let pg = Postgres::start(&cluster.addresses(), &["tob.settle_delay = '1s'"]);
    let db = pg.create_app_database("app").await;
    let other = pg.create_app_database("other").await;
    wait_until_ready(&db).await;
    let staged = |topic: &'static str| {
        let other = &other;
        move |expected: Vec<&'static str>| async move {
            eventually(Duration::from_secs(10), || async {
                payloads_of(other, topic).await == expected
            })
            .await
        }
    };

    // Committed: visible only after the commit, contiguous, in order; then a plain append.
    db.batch_execute(
        "BEGIN;
         SELECT tob_append_on_commit('outbox', 'a1');
         SELECT tob_append('plain', 'during');
         SELECT tob_append_on_commit('outbox', 'a2');
         SAVEPOINT s1; SELECT tob_append_on_commit('outbox', 'a3'); RELEASE s1;
         SAVEPOINT s2; SELECT tob_append_on_commit('outbox', 'dropped'); ROLLBACK TO s2;",
    )
    .await
    .unwrap();
    assert!(payloads_of(&other, "outbox").await.is_empty(), "nothing before the commit");
    db.batch_execute("COMMIT").await.unwrap();
    assert!(
        staged("outbox")(vec!["a1", "a2", "a3"]).await,
        "{:?}",
        payloads_of(&db, "outbox").await
    );
    let seqs: Vec<i64> = other
        .query("SELECT seq FROM tob_read(1, 100, 'outbox')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, vec![seqs[0], seqs[0] + 1, seqs[0] + 2], "one transaction's are contiguous");
    let plain: i64 =
        other.query_one("SELECT seq FROM tob_read(1, 10, 'plain')", &[]).await.unwrap().get(0);
    assert!(plain < seqs[0], "the plain append went in at once, the others at commit");

    // Rolled back, or failed later in the transaction: never.
    db.batch_execute("BEGIN; SELECT tob_append_on_commit('outbox', 'rolled back'); ROLLBACK;")
        .await
        .unwrap();
    let err = db
        .batch_execute(
            "BEGIN; SELECT tob_append_on_commit('outbox', 'failed'); SELECT 1/0; COMMIT;",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    db.batch_execute("ROLLBACK").await.unwrap();
    // Outside a transaction block the statement's transaction commits at once.
    db.batch_execute("SELECT tob_append_on_commit('outbox', 'autocommit')").await.unwrap();
    assert!(staged("outbox")(vec!["a1", "a2", "a3", "autocommit"]).await);

    // PREPARE TRANSACTION: staged, then settled by the reconciler from the commit log.
    db.batch_execute(
        "BEGIN; SELECT tob_append_on_commit('two_phase', 'kept'); PREPARE TRANSACTION 'p1';
         BEGIN; SELECT tob_append_on_commit('two_phase', 'gone'); PREPARE TRANSACTION 'p2';",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(payloads_of(&other, "two_phase").await.is_empty(), "nothing before COMMIT PREPARED");
    db.batch_execute("ROLLBACK PREPARED 'p2'").await.unwrap();
    db.batch_execute("COMMIT PREPARED 'p1'").await.unwrap();
    assert!(staged("two_phase")(vec!["kept"]).await, "{:?}", payloads_of(&db, "two_phase").await);

    // Many messages (more than one request may carry, by count and by bytes): all, in order.
    db.batch_execute(
        "BEGIN;
         SELECT tob_append_on_commit('bulk', i::text) FROM generate_series(1, 12000) i;
         SELECT tob_append_on_commit('big', repeat(i::text, 700000)) FROM generate_series(1, 3) i;
         COMMIT;",
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            payloads_of(&other, "bulk").await.len() == 12000
        })
        .await
    );
    let bulk = payloads_of(&other, "bulk").await;
    assert!(bulk.iter().enumerate().all(|(i, p)| *p == (i + 1).to_string()), "in order");
    let big = payloads_of(&other, "big").await;
    assert_eq!(big.len(), 3);
    assert!(
        big.iter()
            .enumerate()
            .all(|(i, p)| p.len() == 700000 && p.starts_with(&(i + 1).to_string()))
    );

    // Bad input: refused at the call, with nothing staged.
    fails_with(
        &db,
        &[
            ("SELECT tob_append_on_commit('t', NULL)", "22023"),
            ("SELECT tob_append_on_commit('', 'x')", "22023"),
            ("SELECT tob_append_on_commit(repeat('t', 300), 'x')", "22001"),
            ("SELECT tob_append_on_commit('t', repeat('x', 1048577))", "22001"),
        ],
    )
    .await;
    let err = db
        .batch_execute(
            "BEGIN;
             SELECT tob_append_on_commit('huge', repeat('x', 1048576)) FROM generate_series(1, 65);",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "54000", "{err:?}");
    db.batch_execute("ROLLBACK").await.unwrap();

    // A crash right after commits, before the worker settled them (`tob.settle_delay` is 1 s
    // here): after the restart the reconciler finishes each as committed — nothing lost. These
    // transactions wrote no WAL of their own, so PostgreSQL would not flush their commit
    // records before COMMIT returns (the WAL writer does it soon after: stopped here, so that
    // the crash finds them unflushed); tob makes it flush them (found by this test).
    db.batch_execute("SELECT tob_claim('usernames', 'released_alone')").await.unwrap();
    assert!(state_becomes(&db, "released_alone", Some("held"), 10).await);
    let wal_writer = process_of(&db, "walwriter").await;
    let signal = |name: &str| send_signal(wal_writer, name);
    // Each call once first: a backend's first call looks the function up in pg_proc, which
    // may prune that page and so write WAL, which would flush the commit by chance.
    db.batch_execute("SELECT tob_release('usernames', 'nobody_holds_this')").await.unwrap();
    signal("-STOP");
    db.batch_execute("SELECT tob_append_on_commit('crash', 'committed')").await.unwrap();
    db.batch_execute("SELECT tob_claim('usernames', 'claimed_alone')").await.unwrap();
    db.batch_execute("SELECT tob_release('usernames', 'released_alone')").await.unwrap();
    assert!(payloads_of(&other, "crash").await.is_empty(), "not settled yet");
    assert_eq!(owner_state(&other, "claimed_alone").await.as_deref(), Some("prepared"));
    // A child killed: the postmaster ends every other process and drops shared memory, WAL
    // buffers included (a crash); then stopped and started as in the other crash tests.
    signal("-KILL");
    pg.stop_immediate();
    pg.restart_after_crash();
    let db = pg.connect("app").await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            payloads_of(&db, "crash").await == ["committed"]
                && owner_state(&db, "claimed_alone").await.as_deref() == Some("held")
                && owner_state(&db, "released_alone").await.is_none()
        })
        .await,
        "{:?} {:?} {:?}\n{}",
        payloads_of(&db, "crash").await,
        owner_state(&db, "claimed_alone").await,
        owner_state(&db, "released_alone").await,
        pg.log()
    );

    // With synchronous_commit = off, COMMIT returns before the commit record is on disk and a
    // crash may lose the transaction; its tob effects must never outlive it. Before settling,
    // the worker flushes the WAL up to the commit record (found by this test: it settled the
    // transaction while the WAL writer had not flushed it yet, and after the crash the name
    // was held with no row and the message stayed in the order).
    let watch = pg.connect("other").await;
    let wal_writer = process_of(&db, "walwriter").await;
    send_signal(wal_writer, "-STOP");
    db.batch_execute(
        "SET synchronous_commit = off;
         BEGIN; INSERT INTO users (name) VALUES ('async_row');
         SELECT tob_append_on_commit('crash', 'async'); COMMIT;",
    )
    .await
    .unwrap();
    assert!(
        state_becomes(&watch, "async_row", Some("held"), 10).await,
        "settled after tob.settle_delay"
    );
    let (db, rows) = crash_and_count_rows(&pg, wal_writer, "async_row").await;
    assert_eq!(
        (rows, owner_state(&db, "async_row").await, payloads_of(&db, "crash").await),
        (1, Some("held".to_owned()), vec!["committed".to_owned(), "async".to_owned()]),
        "the settled transaction survived the crash with its row"
    );

    // A crash after staging, before the commit record: the transaction never committed, so its
    // message never appears. Its claim, prepared after the messages were staged, shows when.
    let committing = pg.connect("app").await;
    committing.batch_execute("SET tob.test_pause_after_prepare = '30s'").await.unwrap();
    let pending = tokio::spawn(async move {
        committing
            .batch_execute(
                "BEGIN; SELECT tob_append_on_commit('crash', 'never');
                 SELECT tob_claim('usernames', 'crash_witness'); COMMIT;",
            )
            .await
    });
    assert!(state_becomes(&db, "crash_witness", Some("prepared"), 10).await);
    pg.stop_immediate();
    assert!(pending.await.unwrap().is_err(), "the connection died with the server");
    pg.restart_after_crash();
    let db = pg.connect("app").await;
    assert!(
        state_becomes(&db, "crash_witness", None, 15).await,
        "the reconciler settled the transaction as aborted\n{}",
        pg.log()
    );
    assert_eq!(payloads_of(&db, "crash").await, ["committed", "async"]);
}

/// A name deleted and written again in one transaction stays claimed, as a unique index
/// allows: insert, delete and insert again; delete and insert again; an UPDATE there and back;
/// and savepoints rolled back in between. Each name ends claimed exactly when its row exists.
#[tokio::test]
async fn a_name_deleted_and_written_again_in_one_transaction_stays_claimed() {
    let (_cluster, _pg, db, other) = one_server_two_databases().await;
    for name in ["alice", "dave", "erin", "frank", "hank"] {
        db.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await.unwrap();
    }
    for sql in [
        // Claimed, deleted and claimed again by one transaction.
        "BEGIN; INSERT INTO users (name) VALUES ('carol'); DELETE FROM users WHERE name = 'carol';
         INSERT INTO users (name) VALUES ('carol'); COMMIT;",
        // Deleted and inserted again (a committed name).
        "BEGIN; DELETE FROM users WHERE name = 'alice'; INSERT INTO users (name) VALUES ('alice');
         COMMIT;",
        // Deleted; inserted again in a savepoint that is rolled back: deleted.
        "BEGIN; DELETE FROM users WHERE name = 'dave'; SAVEPOINT s;
         INSERT INTO users (name) VALUES ('dave'); ROLLBACK TO s; COMMIT;",
        // Deleted and inserted again; deleted again in a savepoint that is rolled back: there.
        "BEGIN; DELETE FROM users WHERE name = 'erin'; INSERT INTO users (name) VALUES ('erin');
         SAVEPOINT s; DELETE FROM users WHERE name = 'erin'; ROLLBACK TO s; COMMIT;",
        // Renamed and renamed back.
        "BEGIN; UPDATE users SET name = 'gina' WHERE name = 'frank';
         UPDATE users SET name = 'frank' WHERE name = 'gina'; COMMIT;",
        // Deleted and inserted again, then rolled back: there, as before.
        "BEGIN; DELETE FROM users WHERE name = 'hank'; INSERT INTO users (name) VALUES ('hank');
         ROLLBACK;",
    ] {
        db.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let rows = names(&db).await;
    assert_eq!(rows, ["alice", "carol", "erin", "frank", "hank"]);
    let names = ["alice", "carol", "dave", "erin", "frank", "gina", "hank"];
    claims_follow_rows(&db, &other, &names, &rows).await;
}

/// Each of `names` is held (settled) exactly when `rows` has it, and `other` can insert it
/// exactly when it is not there (23505 otherwise).
async fn claims_follow_rows(
    db: &tob_e2e::Client,
    other: &tob_e2e::Client,
    names: &[&str],
    rows: &[String],
) {
    for &name in names {
        let there = rows.iter().any(|r| r == name);
        assert!(
            eventually(Duration::from_secs(10), || async {
                let state = owner_state(db, name).await;
                if there { state.as_deref() == Some("held") } else { state.is_none() }
            })
            .await,
            "{name}: row {there}, claim {:?}",
            owner_state(db, name).await
        );
        let taken = other.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await;
        match taken {
            Err(e) => assert!(there && sqlstate(&e) == "23505", "{name}: {e:?}"),
            Ok(_) => assert!(!there, "{name} is in both databases"),
        }
    }
}

/// One transaction cannot write a name twice, as a unique index refuses it: two rows of one
/// INSERT, two INSERTs, an UPDATE giving two rows one name, a second table sharing the
/// namespace, a savepoint's row. The cluster grants a holder's claim again (so `tob_claim`
/// twice returns one token), and before the fix all of these wrote the name twice. A trigger
/// declared twice fires twice for one row: that is one row, not two.
#[tokio::test]
async fn one_transaction_cannot_write_a_name_twice() {
    let (_cluster, _pg, db, other) = one_server_two_databases().await;
    db.batch_execute(
        "CREATE TABLE admins (id bigserial PRIMARY KEY, name text NOT NULL);
         CREATE TRIGGER admins_unique AFTER INSERT OR UPDATE OR DELETE ON admins
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
         CREATE TRIGGER admins_unique_again AFTER INSERT OR UPDATE OR DELETE ON admins
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
         INSERT INTO users (name) VALUES ('cy'), ('dee');",
    )
    .await
    .unwrap();
    for sql in [
        // Outside a transaction block (claims prepared at once) and inside one.
        "INSERT INTO users (name) VALUES ('ann'), ('ann')",
        "BEGIN; INSERT INTO users (name) VALUES ('bob'); INSERT INTO users (name) VALUES ('bob');",
        "UPDATE users SET name = 'eve' WHERE name IN ('cy', 'dee')",
        "BEGIN; INSERT INTO users (name) VALUES ('fay'); SAVEPOINT s;
         INSERT INTO users (name) VALUES ('fay');",
        "BEGIN; INSERT INTO users (name) VALUES ('gus'); INSERT INTO admins (name) VALUES ('gus');",
        "INSERT INTO admins (name) VALUES ('oz'), ('oz')",
        // Deleted in a savepoint that is rolled back: the row is there again.
        "BEGIN; INSERT INTO users (name) VALUES ('kim'); SAVEPOINT s;
         DELETE FROM users WHERE name = 'kim'; ROLLBACK TO s; INSERT INTO users (name) VALUES ('kim');",
    ] {
        let err = db.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "23505", "{sql}: {err:?}");
        let detail = err.as_db_error().and_then(|e| e.detail()).unwrap_or_default().to_owned();
        assert!(detail.contains("this transaction"), "{sql}: {detail}");
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    for sql in [
        // Deleted and written again, the second time inside a savepoint rolled back.
        "BEGIN; INSERT INTO users (name) VALUES ('hal'); SAVEPOINT s;
         DELETE FROM users WHERE name = 'hal'; INSERT INTO users (name) VALUES ('hal');
         ROLLBACK TO s; COMMIT;",
        // Claimed by tob_claim first: the row's claim is that claim.
        "BEGIN; SELECT tob_claim('usernames', 'ivy'); INSERT INTO users (name) VALUES ('ivy');
         COMMIT;",
        // Written in a savepoint that is rolled back, then written again.
        "BEGIN; SAVEPOINT s; INSERT INTO users (name) VALUES ('jo'); ROLLBACK TO s;
         INSERT INTO users (name) VALUES ('jo'); COMMIT;",
        // Moved to another name and back, then the first name's old value written anew.
        "BEGIN; UPDATE users SET name = 'lu' WHERE name = 'cy'; UPDATE users SET name = 'cy'
         WHERE name = 'lu'; INSERT INTO users (name) VALUES ('lu'); COMMIT;",
        // Both triggers of admins fire for each row.
        "INSERT INTO admins (name) VALUES ('max')",
        "UPDATE admins SET name = 'ned' WHERE name = 'max'",
    ] {
        db.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let rows = names(&db).await;
    assert_eq!(rows, ["cy", "dee", "hal", "ivy", "jo", "lu"]);
    let admins = db.query("SELECT name FROM admins", &[]).await.unwrap();
    let admins: Vec<String> = admins.iter().map(|r| r.get(0)).collect();
    assert_eq!(admins, ["ned"]);
    let names = [
        "ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo", "kim", "lu", "max",
        "ned", "oz",
    ];
    let written: Vec<String> = rows.iter().chain(&admins).cloned().collect();
    claims_follow_rows(&db, &other, &names, &written).await;
}

async fn count(db: &tob_e2e::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// The rows of one statement (a multi-row INSERT, a COPY, an UPDATE, a DELETE) have their
/// claims and releases sent together at the end of the statement, 1,000 at a time, and stay
/// exact: a name of the statement held elsewhere fails it with 23505 and leaves none of its
/// claims behind (also in a savepoint rolled back in a transaction that commits, and in a
/// PL/pgSQL block that catches the error), a name pending in another transaction is waited
/// for, as for a single row, and a rolled-back DELETE keeps its names.
#[tokio::test]
async fn the_rows_of_one_statement_are_claimed_together_and_exactly() {
    let (_cluster, pg, db, other) = one_server_two_databases().await;
    let names_a = "INSERT INTO users (name) SELECT 'a' || g FROM generate_series(1, 2500) g";
    other.batch_execute("INSERT INTO users (name) VALUES ('a1700')").await.unwrap();
    let err = db.batch_execute(names_a).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    db.batch_execute("BEGIN; INSERT INTO users (name) VALUES ('kept'); SAVEPOINT s;")
        .await
        .unwrap();
    let err = db.batch_execute(names_a).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    db.batch_execute("ROLLBACK TO s; COMMIT").await.unwrap();
    // Outside a transaction block (claims prepared at once), in a block that catches the error.
    let caught =
        format!("DO $$ BEGIN {names_a}; EXCEPTION WHEN unique_violation THEN NULL; END $$");
    db.batch_execute(&caught).await.unwrap();
    // None of the failed statements' names stayed claimed: the other database takes them all.
    let rest = "INSERT INTO users (name) SELECT 'a' || g FROM generate_series(1, 2500) g
                WHERE g <> 1700";
    other.batch_execute(rest).await.unwrap();
    // COPY fires its triggers outside the executor.
    db.batch_execute("COPY users (name) FROM PROGRAM 'seq -f b%g 1 1500'").await.unwrap();
    // A name pending in another transaction is waited for; that transaction rolls back.
    other.batch_execute("BEGIN; INSERT INTO users (name) VALUES ('c600')").await.unwrap();
    let waiter = pg.connect("app").await;
    let insert = tokio::spawn(async move {
        let sql = "INSERT INTO users (name) SELECT 'c' || g FROM generate_series(1, 1200) g";
        waiter.batch_execute(sql).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!insert.is_finished(), "the INSERT must wait for the pending c600");
    other.batch_execute("ROLLBACK").await.unwrap();
    insert.await.unwrap().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 1 + 1_500 + 1_200);
    assert_eq!(count(&other, "SELECT count(*) FROM users").await, 2_500);
    // Every row's name is held by its database, and the other database takes none of them.
    let held = "SELECT count(*) FROM users u, tob_owner('usernames', u.name) o
                WHERE o.state = 'held' AND o.owner LIKE '%/' || current_database()";
    for (db, rows) in [(&db, 2_701), (&other, 2_500)] {
        assert!(
            eventually(Duration::from_secs(10), || async { count(db, held).await == rows }).await,
            "{} of {rows} held",
            count(db, held).await
        );
    }
    for sql in [
        "INSERT INTO users (name) SELECT 'b' || g FROM generate_series(1, 1500) g",
        "INSERT INTO users (name) SELECT 'c' || g FROM generate_series(1, 1200) g",
        "INSERT INTO users (name) VALUES ('kept')",
    ] {
        let err = other.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "23505", "{sql}: {err:?}");
    }
    // Releases are sent together too: an UPDATE of 1,500 rows moves their claims, a DELETE of
    // 1,200 rolled back keeps them, committed frees them.
    db.batch_execute("UPDATE users SET name = 'r' || name WHERE name LIKE 'b%'").await.unwrap();
    db.batch_execute("BEGIN; DELETE FROM users WHERE name LIKE 'c%'; ROLLBACK").await.unwrap();
    let names_c = "INSERT INTO users (name) SELECT 'c' || g FROM generate_series(1, 1200) g";
    let err = other.batch_execute(names_c).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    db.batch_execute("DELETE FROM users WHERE name LIKE 'c%'").await.unwrap();
    other.batch_execute(names_c).await.unwrap();
    other
        .batch_execute("INSERT INTO users (name) SELECT 'b' || g FROM generate_series(1, 1500) g")
        .await
        .unwrap();
    let err = other
        .batch_execute("INSERT INTO users (name) SELECT 'rb' || g FROM generate_series(1, 1500) g")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 1 + 1_500);
    assert_eq!(count(&other, "SELECT count(*) FROM users").await, 2_500 + 1_200 + 1_500);
}

/// `tob_unique` declared wrongly fails every write with a clear error rather than silently
/// claiming nothing; any column type works (the key is the value's text form); and as a
/// BEFORE TRUNCATE trigger it releases every value of the table when the TRUNCATE commits.
#[tokio::test]
async fn tob_unique_is_declared_right_or_refused_and_truncate_releases() {
    let (_cluster, _pg, db, other) = one_server_two_databases().await;

    // Each wrong declaration, on a table of its own: the first write says what is wrong.
    let wrong = [
        ("AFTER INSERT", "FOR EACH ROW", "tob_unique('usernames')", "09000", "needs two arguments"),
        ("AFTER INSERT", "FOR EACH ROW", "tob_unique('usernames', 'nme')", "42703", "\"nme\""),
        (
            "AFTER INSERT",
            "FOR EACH STATEMENT",
            "tob_unique('usernames', 'name')",
            "09000",
            "STATEMENT",
        ),
        (
            "BEFORE INSERT",
            "FOR EACH ROW",
            "tob_unique('usernames', 'name')",
            "09000",
            "declare it AFTER",
        ),
    ];
    for (i, (when, level, call, code, says)) in wrong.into_iter().enumerate() {
        db.batch_execute(&format!(
            "CREATE TABLE wrong{i} (name text, folded text GENERATED ALWAYS AS (lower(name)) STORED);
             CREATE TRIGGER t {when} ON wrong{i} {level} EXECUTE FUNCTION {call};"
        ))
        .await
        .unwrap();
        let err = db
            .execute(&format!("INSERT INTO wrong{i} (name) VALUES ('wrong{i}')"), &[])
            .await
            .unwrap_err();
        let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert_eq!(sqlstate(&err), code, "{when} {level} {call}: {err:?}");
        assert!(message.starts_with("tob_unique: ") && message.contains(says), "{message}");
        let rows: i64 =
            db.query_one(&format!("SELECT count(*) FROM wrong{i}"), &[]).await.unwrap().get(0);
        assert_eq!(rows, 0);
        assert_eq!(owner_state(&db, &format!("wrong{i}")).await, None, "nothing claimed");
    }

    // What is claimed is what was written. A BEFORE ROW trigger (refused above) saw rows that
    // were then not written as it saw them, and claimed or released names for them:
    // - INSERT ... ON CONFLICT DO NOTHING: the skipped row's name stayed claimed, no row;
    // - ON CONFLICT DO UPDATE: the proposed row's name stayed claimed, the updated row's
    //   name was not moved;
    // - a later BEFORE trigger skipping a DELETE: the name was released, the row stayed, and
    //   another database could take the name too;
    // - a later BEFORE trigger changing the column: the name claimed was not the one stored.
    db.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text);
         CREATE TRIGGER accounts_unique AFTER INSERT OR UPDATE OR DELETE ON accounts
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
         -- Fires after nothing: BEFORE triggers run in name order, AFTER ones after all.
         CREATE FUNCTION keep_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF TG_OP = 'DELETE' THEN
                 RETURN CASE WHEN OLD.name LIKE 'frozen%' THEN NULL ELSE OLD END;
             END IF;
             NEW.name := replace(NEW.name, 'draft_', 'final_');
             RETURN NEW;
         END $$;
         CREATE TRIGGER zz_keep_frozen BEFORE INSERT OR DELETE ON accounts
             FOR EACH ROW EXECUTE FUNCTION keep_frozen();
         INSERT INTO accounts VALUES (1, 'acc_one'), (2, 'frozen_two');
         INSERT INTO accounts VALUES (1, 'acc_skipped') ON CONFLICT DO NOTHING;
         INSERT INTO accounts VALUES (1, 'acc_proposed')
             ON CONFLICT (id) DO UPDATE SET name = 'acc_moved';
         DELETE FROM accounts WHERE id = 2;
         INSERT INTO accounts VALUES (3, 'draft_three');",
    )
    .await
    .unwrap();
    let stored: Vec<String> = db
        .query("SELECT name FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["acc_moved", "frozen_two", "final_three"]);
    for name in ["acc_moved", "frozen_two", "final_three"] {
        assert!(state_becomes(&other, name, Some("held"), 10).await, "{name}: row stored");
        let err = other.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await;
        assert_eq!(sqlstate(&err.unwrap_err()), "23505", "{name}");
    }
    for name in ["acc_one", "acc_skipped", "acc_proposed", "draft_three"] {
        assert!(state_becomes(&other, name, None, 10).await, "{name}: no row, nothing held");
    }
    db.batch_execute("DROP TRIGGER zz_keep_frozen ON accounts; DELETE FROM accounts")
        .await
        .unwrap();
    assert!(state_becomes(&other, "frozen_two", None, 10).await);

    // Case-insensitive names: a trigger on a generated lower-cased column (AFTER triggers see
    // generated values).
    in_both(
        [&db, &other],
        "CREATE TABLE handles (name text, folded text GENERATED ALWAYS AS (lower(name)) STORED);
         CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON handles
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'folded');",
    )
    .await;
    db.execute("INSERT INTO handles (name) VALUES ('Zed')", &[]).await.unwrap();
    let err = other.execute("INSERT INTO handles (name) VALUES ('zED')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    assert!(owner_state(&other, "zed").await.is_some());

    // In replica mode (a restore with triggers off, a logical replication subscriber) the
    // trigger does not fire: nothing is claimed.
    db.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO users (name) VALUES ('restored_row');
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    assert_eq!(owner_state(&db, "restored_row").await, None);
    db.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM users WHERE name = 'restored_row';
         RESET session_replication_role;",
    )
    .await
    .unwrap();

    // Any column type: the key is the value's text form, the same in every database.
    in_both(
        [&db, &other],
        "CREATE TABLE badges (number bigint, issued uuid);
         CREATE TRIGGER number AFTER INSERT OR UPDATE OR DELETE ON badges
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'number');",
    )
    .await;
    db.execute("INSERT INTO badges VALUES (4711, gen_random_uuid())", &[]).await.unwrap();
    assert!(owner_state(&other, "4711").await.is_some(), "claimed (prepared or held)");
    let err = other
        .execute("INSERT INTO badges VALUES (4711, gen_random_uuid())", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    db.execute("UPDATE badges SET number = 4712 WHERE number = 4711", &[]).await.unwrap();
    other.execute("INSERT INTO badges VALUES (4711, gen_random_uuid())", &[]).await.unwrap();
    assert!(owner_state(&db, "4712").await.is_some());

    // A type whose text form depends on session settings: the key is taken under fixed ones
    // (ISO dates, UTC, ...). Under the session's, the same instant had two keys in Tokyo and
    // in UTC (both inserts succeeded), and a DELETE under another DateStyle released nothing.
    in_both(
        [&db, &other],
        "CREATE TABLE meetings (at timestamptz, length interval);
         CREATE TRIGGER at AFTER INSERT OR UPDATE OR DELETE ON meetings
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'at');",
    )
    .await;
    db.batch_execute(
        "SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY';
         INSERT INTO meetings VALUES ('2026-01-01 00:00:00+00', '1 hour');",
    )
    .await
    .unwrap();
    assert!(owner_state(&other, "2026-01-01 00:00:00+00").await.is_some(), "the fixed form");
    let err = other
        .batch_execute(
            "SET TimeZone = 'Asia/Tokyo';
             INSERT INTO meetings VALUES ('2026-01-01 09:00:00+09', '2 hours');",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    let shown: String = db.query_one("SELECT at::text FROM meetings", &[]).await.unwrap().get(0);
    assert_eq!(shown, "31/12/2025 19:00:00 EST", "the session's own settings are back");
    db.batch_execute(
        "SET DateStyle = 'German'; SET TimeZone = 'Europe/Berlin'; DELETE FROM meetings",
    )
    .await
    .unwrap();
    assert!(state_becomes(&other, "2026-01-01 00:00:00+00", None, 10).await, "released");

    // TRUNCATE: without a statement trigger it would leave every name claimed; with one, a
    // rolled-back TRUNCATE keeps them and a committed one frees them all.
    db.batch_execute(
        "CREATE TRIGGER users_truncate BEFORE TRUNCATE ON users
             FOR EACH STATEMENT EXECUTE FUNCTION tob_unique('usernames', 'name');",
    )
    .await
    .unwrap();
    // Its own statement: in one query string with the BEGIN below it would be rolled back too.
    db.batch_execute("INSERT INTO users (name) VALUES ('t_ann'), ('t_bob'), ('t_cid')")
        .await
        .unwrap();
    db.batch_execute("BEGIN; TRUNCATE users; ROLLBACK;").await.unwrap();
    let claimed = |db| async move {
        let mut claimed = Vec::new();
        for name in ["t_ann", "t_bob", "t_cid"] {
            claimed.push(owner_state(db, name).await.is_some());
        }
        claimed
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // the rollback settled
    assert_eq!(claimed(&other).await, [true; 3]);
    assert_eq!(names(&db).await.len(), 3, "{:?}", names(&db).await);
    db.batch_execute("TRUNCATE users").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { claimed(&other).await == [false; 3] }).await,
        "{:?}",
        claimed(&other).await
    );
    other.execute("INSERT INTO users (name) VALUES ('t_bob')", &[]).await.unwrap();

    // A partitioned table: the row trigger is cloned to the partitions; the TRUNCATE trigger
    // on the parent releases the partitions' rows.
    db.batch_execute(
        "CREATE TABLE parted (name text) PARTITION BY HASH (name);
         CREATE TABLE parted_0 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON parted
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
         CREATE TRIGGER t_truncate BEFORE TRUNCATE ON parted
             FOR EACH STATEMENT EXECUTE FUNCTION tob_unique('usernames', 'name');
         INSERT INTO parted SELECT 'part_' || i FROM generate_series(1, 6) AS i;",
    )
    .await
    .unwrap();
    let spread: i64 = db.query_one("SELECT count(*) FROM parted_0", &[]).await.unwrap().get(0);
    assert!(spread > 0 && spread < 6, "rows in both partitions: {spread} in the first");
    assert!(owner_state(&other, "part_3").await.is_some());
    db.batch_execute("TRUNCATE parted").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let mut free = true;
            for i in 1..=6 {
                free &= owner_state(&other, &format!("part_{i}")).await.is_none();
            }
            free
        })
        .await
    );

    // Types whose cast to text is not their output: `char(n)` keeps its padding in the key,
    // `inet` has no netmask in it. The TRUNCATE releases the keys the rows claimed (it
    // released `t_pad` and `10.0.0.1/32`, and the names stayed claimed for good).
    for (column_type, value, key) in
        [("char(6)", "t_pad", "t_pad "), ("inet", "10.0.0.1", "10.0.0.1"), ("bool", "true", "t")]
    {
        db.batch_execute(&format!(
            "CREATE TABLE typed (v {column_type});
             CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON typed
                 FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'v');
             CREATE TRIGGER t_truncate BEFORE TRUNCATE ON typed
                 FOR EACH STATEMENT EXECUTE FUNCTION tob_unique('usernames', 'v');
             INSERT INTO typed VALUES ('{value}');"
        ))
        .await
        .unwrap();
        assert!(owner_state(&other, key).await.is_some(), "{column_type}: {key:?} claimed");
        db.batch_execute("TRUNCATE typed; DROP TABLE typed").await.unwrap();
        assert!(state_becomes(&other, key, None, 10).await, "{column_type}: {key:?} released");
    }
}

/// Rows in a table before its `tob_unique` trigger are claimed by `tob_unique_claim_rows`,
/// under the keys the trigger gives them, as one transaction: pending until it commits,
/// released if it rolls back, refused whole for a value two rows share or another database
/// holds, and harmless to run again.
#[tokio::test]
async fn rows_already_in_a_table_are_claimed_by_tob_unique_claim_rows() {
    let (_cluster, pg, db, other) = one_server_two_databases().await;
    db.batch_execute(
        "CREATE TABLE legacy (name text, code char(6));
         INSERT INTO legacy SELECT 'old_' || i, 'c' || i FROM generate_series(1, 2500) AS i;
         INSERT INTO legacy VALUES (NULL, NULL);",
    )
    .await
    .unwrap();
    fails_with(
        &db,
        &[
            ("SELECT tob_unique_claim_rows('legacy')", "55000"),
            ("SELECT tob_unique_claim_rows(NULL)", "22023"),
            ("SELECT tob_unique_claim_rows('no_such_table')", "42P01"),
        ],
    )
    .await;
    db.batch_execute(
        "CREATE TRIGGER legacy_name AFTER INSERT OR UPDATE OR DELETE ON legacy
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
         CREATE TRIGGER legacy_code AFTER INSERT OR UPDATE OR DELETE ON legacy
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'code');
         INSERT INTO legacy VALUES ('new_1', 'n1');",
    )
    .await
    .unwrap();
    assert!(owner_state(&other, "new_1").await.is_some(), "the trigger claims new rows");
    assert!(owner_state(&other, "old_7").await.is_none(), "and not the rows before it");

    // In a transaction: pending for everyone else until it ends; rolled back, released.
    let claim_rows = "SELECT tob_unique_claim_rows('legacy')";
    db.batch_execute("BEGIN").await.unwrap();
    let claimed: i64 = db.query_one(claim_rows, &[]).await.unwrap().get(0);
    assert_eq!(claimed, 2 * 2501, "two triggers, 2,501 rows with values");
    assert_eq!(owner_state(&other, "old_7").await.as_deref(), Some("pending"));
    // Writers wait for it (`LOCK ... IN SHARE MODE`): no row slips in unclaimed.
    let writer = pg.connect("app").await;
    let sql = "SET lock_timeout = '200ms'; INSERT INTO legacy VALUES ('during', 'd1')";
    let err = writer.batch_execute(sql).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55P03", "{err:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    assert!(state_becomes(&other, "old_7", None, 10).await, "released with the rollback");
    assert!(owner_state(&other, "new_1").await.is_some(), "a row's own claim stays");

    // Committed: every value held, under the trigger's key (`char(6)` keeps its padding);
    // run again, nothing changes. The rows then live as if written since the trigger.
    let claimed: i64 = db.query_one(claim_rows, &[]).await.unwrap().get(0);
    assert_eq!(claimed, 2 * 2501);
    for key in ["old_1", "old_2500", "c1    ", "c2500 ", "new_1", "n1    "] {
        assert!(state_becomes(&other, key, Some("held"), 10).await, "{key:?} held");
    }
    let err = other.execute("INSERT INTO users (name) VALUES ('old_42')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    let again: i64 = db.query_one(claim_rows, &[]).await.unwrap().get(0);
    assert_eq!(again, claimed, "a key this database holds counts as claimed");
    db.batch_execute("DELETE FROM legacy WHERE name = 'old_5'").await.unwrap();
    assert!(state_becomes(&other, "old_5", None, 10).await, "a deleted row's name is freed");

    // A value two rows share, or one another database holds: 23505, nothing claimed.
    let without_trigger = |sql: &str| {
        format!(
            "ALTER TABLE legacy DISABLE TRIGGER legacy_name; ALTER TABLE legacy DISABLE TRIGGER legacy_code;
             {sql};
             ALTER TABLE legacy ENABLE TRIGGER legacy_name; ALTER TABLE legacy ENABLE TRIGGER legacy_code;"
        )
    };
    db.batch_execute(&without_trigger("INSERT INTO legacy VALUES ('old_9', 'dup_a')"))
        .await
        .unwrap();
    let err = db.query_one(claim_rows, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("old_9"), "{message}");
    assert!(state_becomes(&other, "dup_a ", None, 10).await, "nothing of the failed call stays");
    other.execute("INSERT INTO users (name) VALUES ('elsewhere')", &[]).await.unwrap();
    db.batch_execute(&without_trigger(
        "DELETE FROM legacy WHERE code = 'dup_a'; INSERT INTO legacy VALUES ('elsewhere', 'e1')",
    ))
    .await
    .unwrap();
    let err = db.query_one(claim_rows, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505", "{err:?}");
    let detail = err.as_db_error().and_then(|e| e.detail()).unwrap_or_default().to_owned();
    assert!(detail.contains("/other"), "names the holder: {detail}");
    assert!(state_becomes(&other, "e1    ", None, 10).await, "nothing of the failed call stays");

    // A partitioned table: its partitions' rows, each under its partition's row id (a DELETE
    // through the cloned trigger then frees the name).
    db.batch_execute(
        "CREATE TABLE parted (name text) PARTITION BY HASH (name);
         CREATE TABLE parted_0 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO parted SELECT 'part_' || i FROM generate_series(1, 20) AS i;
         CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON parted
             FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');",
    )
    .await
    .unwrap();
    let sql = "SELECT tob_unique_claim_rows('parted')";
    assert_eq!(db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0), 20);
    assert!(state_becomes(&other, "part_17", Some("held"), 10).await);
    db.batch_execute("DELETE FROM parted WHERE name = 'part_17'").await.unwrap();
    assert!(state_becomes(&other, "part_17", None, 10).await, "freed through the partition");
}

/// Crashes the server whose WAL writer is stopped (killed first, so nothing more reaches the
/// disk), restarts it, and returns a new connection to `app` with how many of its `users` rows
/// hold `name`.
async fn crash_and_count_rows(
    pg: &Postgres,
    wal_writer: i32,
    name: &str,
) -> (tob_e2e::Client, i64) {
    send_signal(wal_writer, "-KILL");
    pg.stop_immediate();
    pg.restart_after_crash();
    let db = pg.connect("app").await;
    let sql = "SELECT count(*) FROM users WHERE name = $1";
    let rows = db.query_one(sql, &[&name]).await.unwrap().get(0);
    (db, rows)
}

/// Runs the same statements in each database (a table and its trigger in both, say).
async fn in_both(dbs: [&tob_e2e::Client; 2], sql: &str) {
    for db in dbs {
        db.batch_execute(sql).await.unwrap();
    }
}

/// A hot standby with tob preloaded leaves the primary's claims alone (its transactions claim
/// nothing: 25006); promoted after the primary crashed, it finishes what the old primary left
/// in flight — committed rows' names stay held (and its DELETEs release them: the same owner),
/// a claim prepared for a commit the standby never saw is released — and claims anew.
#[tokio::test]
async fn a_standby_leaves_the_primarys_claims_alone_and_takes_over_when_promoted() {
    let cluster = Sequencers::start();
    let primary = Postgres::start(&cluster.addresses(), &[]);
    let db = primary.create_app_database("app").await;
    wait_until_ready(&db).await;
    db.execute("INSERT INTO users (name) VALUES ('before_standby')", &[]).await.unwrap();
    let standby = primary.start_standby();
    let replica = standby.connect("app").await;
    let replicated = |name: &'static str| {
        let replica = &replica;
        async move {
            eventually(Duration::from_secs(15), || async {
                replica.query("SELECT 1 FROM users WHERE name = $1", &[&name]).await.unwrap().len()
                    == 1
            })
            .await
        }
    };
    assert!(replicated("before_standby").await);
    let err = replica.query_one("SELECT tob_claim('usernames', 'on_standby')", &[]).await;
    assert_eq!(sqlstate(&err.unwrap_err()), "25006");
    let started = Instant::now();
    let err = replica.query_one("SELECT tob_lock('on_standby')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "25006", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "at once, not after the timeouts");

    // A transaction on the primary stays open for seconds with the standby running: its claim
    // must survive and its commit succeed. (The standby's holders are the primary's, under the
    // same system identifier, and its own start would make them look cut off by a restart;
    // its background worker, which would reconcile them, starts only once it is promoted.)
    db.batch_execute("BEGIN; INSERT INTO users (name) VALUES ('in_flight')").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    db.batch_execute("COMMIT").await.unwrap();
    assert!(state_becomes(&db, "in_flight", Some("held"), 10).await);
    assert!(replicated("in_flight").await);
    assert!(!standby.log().contains("tob worker started"), "{}", standby.log());

    // Failover: a claim prepared for a commit that never happens, then the primary crashes
    // and the standby is promoted.
    let committing = primary.connect("app").await;
    committing.batch_execute("SET tob.test_pause_after_prepare = '60s'").await.unwrap();
    let lost = tokio::spawn(async move {
        committing.execute("INSERT INTO users (name) VALUES ('lost_in_failover')", &[]).await
    });
    assert!(state_becomes(&db, "lost_in_failover", Some("prepared"), 10).await);
    primary.stop_immediate();
    assert!(lost.await.unwrap().is_err(), "the connection died with the server");
    standby.promote();
    assert!(
        eventually(Duration::from_secs(10), || async {
            standby.log().contains("tob worker started")
        })
        .await
    );
    let new_primary = standby.connect("app").await;
    assert!(
        state_becomes(&new_primary, "lost_in_failover", None, 15).await,
        "the promoted server's reconciler released it\n{}",
        standby.log()
    );
    assert_eq!(owner_state(&new_primary, "before_standby").await.as_deref(), Some("held"));
    assert_eq!(owner_state(&new_primary, "in_flight").await.as_deref(), Some("held"));
    new_primary.execute("INSERT INTO users (name) VALUES ('after_failover')", &[]).await.unwrap();
    new_primary.execute("DELETE FROM users WHERE name = 'in_flight'", &[]).await.unwrap();
    assert!(
        state_becomes(&new_primary, "in_flight", None, 10).await,
        "the same owner: its DELETE released the name"
    );
    assert!(owner_state(&new_primary, "after_failover").await.is_some());
}
