//! The PostgreSQL workload under faults (issue 5): two PostgreSQL servers insert overlapping
//! usernames through `tob_unique` while the nemesis kills, pauses and cuts off sequencer
//! nodes behind fault-injecting proxies, a backend is terminated and one PostgreSQL server is
//! stopped with `-m immediate` mid-run. The end state must be exact: every name in at most one
//! database, every committed row's claim held by its database, no claim left for a name no
//! database holds.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tob_e2e::{Postgres, eventually, scratch_dir, sequencer_binary, wait_until_ready};
use tob_faults::cluster::Cluster;
use tob_faults::nemesis;

const NAMES: u64 = 60;
const RUN: Duration = Duration::from_secs(40);

/// Runs a random nemesis schedule on its own thread; the cluster comes back healed.
fn run_nemesis(mut cluster: Cluster, seed: u64, run: Duration) -> std::thread::JoinHandle<Cluster> {
    let schedule = nemesis::random_schedule(seed, run, cluster.size());
    std::thread::spawn(move || {
        let started = Instant::now();
        for (at, action) in &schedule {
            if let Some(wait) = at.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            tob_faults::apply(&mut cluster, action).unwrap();
        }
        cluster.heal().unwrap();
        cluster
    })
}

async fn names(db: &tob_e2e::Client) -> BTreeSet<String> {
    db.query("SELECT name FROM users", &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Inserts (and now and then deletes) random names until `until`, reconnecting when the
/// server goes away. Errors are expected; the end state is what is checked.
async fn client(pg_socket: std::path::PathBuf, port: u16, seed: u64, until: Instant) -> (u64, u64) {
    let mut rng = nemesis::Rng::new(seed);
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < until {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&pg_socket).port(port).user("postgres").dbname("app");
        config.application_name("faults-worker").connect_timeout(Duration::from_secs(1));
        let Ok((db, connection)) = config.connect(tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let _ = db
            .batch_execute("SET tob.request_timeout = '3s'; SET tob.claim_wait_timeout = '2s'")
            .await;
        while Instant::now() < until && !db.is_closed() {
            let name = format!("u{}", rng.range(0, NAMES));
            let sql = if rng.range(0, 8) == 0 {
                "DELETE FROM users WHERE name = $1"
            } else {
                "INSERT INTO users (name) VALUES ($1)"
            };
            match db.execute(sql, &[&name]).await {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
    }
    (ok, failed)
}

#[tokio::test]
async fn usernames_stay_unique_and_claims_exact_under_faults() {
    let dir = scratch_dir("faults");
    let cluster = Cluster::start(&sequencer_binary(), &dir, 3, &[]).unwrap();
    let addresses = cluster.client_addresses().join(",");
    let pg1 = Postgres::start(&addresses, &["cluster_name = 'one'"]);
    let pg2 = Postgres::start(&addresses, &["cluster_name = 'two'"]);
    for pg in [&pg1, &pg2] {
        pg.create_app_database("app").await;
        // No local unique index: within a database too, only tob keeps names unique.
        wait_until_ready(&pg.connect("app").await).await;
    }

    let until = Instant::now() + RUN;
    let nemesis = run_nemesis(cluster, 5, RUN);
    let mut tasks = Vec::new();
    for (i, pg) in [&pg1, &pg1, &pg1, &pg2, &pg2, &pg2].into_iter().enumerate() {
        let socket = pg.socket_dir().to_path_buf();
        tasks.push(tokio::spawn(client(socket, pg.port, 100 + i as u64, until)));
    }
    // PostgreSQL faults: a terminated backend, then a server crash and restart.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let admin = pg1.connect("postgres").await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'faults-worker' LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg2.stop_immediate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg2.restart_after_crash();
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed += f;
    }
    println!("statements: {ok} ok, {failed} failed");
    assert!(ok > 100, "the workload got through: {ok} ok, {failed} failed");
    let cluster = nemesis.join().unwrap();

    // End state.
    let one = pg1.connect("app").await;
    let two = pg2.connect("app").await;
    wait_until_ready(&one).await;
    wait_until_ready(&two).await;
    let in_one = names(&one).await;
    let in_two = names(&two).await;
    let both: Vec<_> = in_one.intersection(&in_two).collect();
    assert!(both.is_empty(), "names in both databases: {both:?}");
    assert!(!in_one.is_empty() && !in_two.is_empty(), "the workload got through at all");
    for n in 0..NAMES {
        let name = format!("u{n}");
        let expected = if in_one.contains(&name) {
            Some("one/app")
        } else if in_two.contains(&name) {
            Some("two/app")
        } else {
            None
        };
        // Settling and reconciling finish shortly after the faults end.
        let exact = eventually(Duration::from_secs(20), || async {
            let rows = one
                .query("SELECT owner, state FROM tob_owner('usernames', $1)", &[&name])
                .await
                .unwrap();
            match (rows.first(), expected) {
                (None, None) => true,
                (Some(r), Some(owner)) => {
                    r.get::<_, String>(0) == owner && r.get::<_, String>(1) == "held"
                }
                _ => false,
            }
        })
        .await;
        let actual = one
            .query("SELECT owner, state FROM tob_owner('usernames', $1)", &[&name])
            .await
            .unwrap()
            .first()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
        assert!(exact, "{name}: expected {expected:?}, cluster says {actual:?}");
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Locks with fencing tokens under faults: workers on two PostgreSQL servers take the same
/// `tob_lock` and write to one ledger guarded by `tob_fence`, while the nemesis attacks the
/// sequencer nodes and the second server's background worker is paused past its session
/// lease (its locks are freed while their holders still believe in them). The downstream
/// resource must never accept a write with an older token after one with a newer token.
#[tokio::test]
async fn fenced_writes_never_go_backwards_under_faults() {
    let dir = scratch_dir("fence");
    let cluster = Cluster::start(&sequencer_binary(), &dir, 3, &[]).unwrap();
    let addresses = cluster.client_addresses().join(",");
    let pg1 = Postgres::start(&addresses, &["cluster_name = 'one'"]);
    // A short lease on the second server: pausing its background worker loses its session,
    // and with it the locks its backends still believe they hold.
    let pg2 = Postgres::start(&addresses, &["cluster_name = 'two'", "tob.session_ttl = '1s'"]);
    let ledger = pg1.create_app_database("app").await;
    ledger
        .batch_execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, token bigint, writer text)")
        .await
        .unwrap();
    wait_until_ready(&ledger).await;
    pg2.create_app_database("app").await;
    wait_until_ready(&pg2.connect("app").await).await;

    let run = Duration::from_secs(30);
    let until = Instant::now() + run;
    let nemesis = run_nemesis(cluster, 17, run);
    let admin = pg2.connect("postgres").await;
    let worker_pid: i32 = admin
        .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'tob'", &[])
        .await
        .unwrap()
        .get(0);
    let pauses = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(7)).await;
            let pid = worker_pid.to_string();
            let _ = std::process::Command::new("kill").args(["-STOP", &pid]).status();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
        }
    });
    let mut tasks = Vec::new();
    for (i, pg) in [&pg1, &pg1, &pg2, &pg2].into_iter().enumerate() {
        let lock_db = pg.connect("app").await;
        let write_db = pg1.connect("app").await;
        lock_db
            .batch_execute("SET tob.claim_wait_timeout = '1s'; SET tob.request_timeout = '2s'")
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut accepted, mut stale) = (0u64, 0u64);
            let writer = format!("w{i}");
            while Instant::now() < until {
                let Ok(row) = lock_db.query_one("SELECT tob_lock('job')", &[]).await else {
                    continue;
                };
                let token: i64 = row.get(0);
                // Hold the lock for a few writes; a fault may take it away meanwhile.
                for _ in 0..5 {
                    let write = async {
                        write_db.batch_execute("BEGIN").await?;
                        write_db.query_one("SELECT tob_fence('job', $1)", &[&token]).await?;
                        write_db
                            .execute(
                                "INSERT INTO ledger (token, writer) VALUES ($1, $2)",
                                &[&token, &writer],
                            )
                            .await?;
                        write_db.batch_execute("COMMIT").await
                    };
                    match write.await {
                        Ok(()) => accepted += 1,
                        Err(e) => {
                            stale += u64::from(tob_e2e::sqlstate(&e) == "TB001");
                            let _ = write_db.batch_execute("ROLLBACK").await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = lock_db.query_one("SELECT tob_unlock('job')", &[]).await;
            }
            (accepted, stale)
        }));
    }
    let (mut accepted, mut stale) = (0, 0);
    for task in tasks {
        let (a, s) = task.await.unwrap();
        accepted += a;
        stale += s;
    }
    pauses.await.unwrap();
    let cluster = nemesis.join().unwrap();
    let tokens: Vec<i64> = ledger
        .query("SELECT token FROM ledger ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tokens.len() as u64, accepted);
    assert!(accepted > 20, "the workload got through: {accepted} fenced writes");
    for pair in tokens.windows(2) {
        assert!(pair[0] <= pair[1], "a write with token {} after one with {}", pair[1], pair[0]);
    }
    let distinct: BTreeSet<i64> = tokens.iter().copied().collect();
    println!(
        "fenced writes: {accepted} accepted with {} distinct tokens, {stale} refused as stale",
        distinct.len()
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
