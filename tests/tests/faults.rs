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
    let mut cluster = Cluster::start(&sequencer_binary(), &dir, 3, &[]).unwrap();
    let addresses = cluster.client_addresses().join(",");
    let pg1 = Postgres::start(&addresses, &["cluster_name = 'one'"]);
    let pg2 = Postgres::start(&addresses, &["cluster_name = 'two'"]);
    for pg in [&pg1, &pg2] {
        pg.create_app_database("app").await;
        // No local unique index: within a database too, only tob keeps names unique.
        wait_until_ready(&pg.connect("app").await).await;
    }

    let until = Instant::now() + RUN;
    let schedule = nemesis::random_schedule(5, RUN, 3);
    let nemesis = std::thread::spawn(move || {
        let started = Instant::now();
        for (at, action) in &schedule {
            if let Some(wait) = at.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            tob_faults::apply(&mut cluster, action).unwrap();
        }
        cluster.heal().unwrap();
        cluster
    });
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
