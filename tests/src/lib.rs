//! Harness for the end-to-end tests: a 3-node `tob-sequencer` cluster on OS-chosen loopback
//! ports and throwaway PostgreSQL 15 servers (run as the `postgres` user, since PostgreSQL
//! refuses root) with `tob` preloaded. Everything started is stopped and removed on drop, also
//! when a test fails. Needs the extension installed (`scripts/test.sh` does it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use tob_faults::pg::{APP_SCHEMA, Server};
pub use tokio_postgres::{Client, Error};

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

pub fn scratch_dir(kind: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(format!("/tmp/tob-e2e-{}-{kind}{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The `tob-sequencer` binary of this build, (re)built once per test run so a stale binary
/// from an older checkout is never tested against a newer extension.
pub fn sequencer_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let status = Command::new(env!("CARGO"))
            // The same features as the fault harness's build, so neither rebuilds the other's
            // binary; planted bugs stay off unless a node is started with --planted-bug.
            .args([
                "build",
                "-p",
                "tob-server",
                "--bin",
                "tob-sequencer",
                "--features",
                "planted-bugs",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "building tob-sequencer failed");
    });
    target_dir().join("tob-sequencer")
}

struct Node {
    id: u64,
    peer: String,
    client: String,
    metrics: String,
    child: Option<Child>,
}

/// A 3-node sequencer cluster.
pub struct Sequencers {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Flags every node gets beside its identity and peers.
    flags: Vec<String>,
}

impl Sequencers {
    pub fn start() -> Sequencers {
        Sequencers::start_with(&[])
    }

    /// Every node also gets `flags` (e.g. `--messages-retained 5`).
    pub fn start_with(flags: &[&str]) -> Sequencers {
        let dir = scratch_dir("seq");
        let nodes = (1..)
            .zip(tob_faults::ports::node_ports(3))
            .map(|(id, ports)| Node {
                id,
                peer: ports.peer.to_string(),
                client: ports.client.to_string(),
                metrics: ports.metrics.to_string(),
                child: None,
            })
            .collect();
        let flags = flags.iter().map(|f| f.to_string()).collect();
        let mut cluster = Sequencers { dir, nodes, flags };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let peers: Vec<String> =
            self.nodes.iter().map(|n| format!("{}={},{}", n.id, n.peer, n.client)).collect();
        let node = &self.nodes[i];
        let mut cmd = Command::new(sequencer_binary());
        cmd.arg("--node-id").arg(node.id.to_string()).arg("--cluster-id").arg("1");
        cmd.arg("--data-dir").arg(self.dir.join(format!("n{}", node.id)));
        cmd.arg("--metrics-listen").arg(&node.metrics);
        for p in &peers {
            cmd.arg("--peer").arg(p);
        }
        cmd.args(&self.flags);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        self.nodes[i].child = Some(cmd.spawn().unwrap());
    }

    /// Client addresses, comma-separated: the value of `tob.cluster`.
    pub fn addresses(&self) -> String {
        self.nodes.iter().map(|n| n.client.clone()).collect::<Vec<_>>().join(",")
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to every node.
    pub fn signal_all(&self, signal: &str) {
        for node in &self.nodes {
            if let Some(child) = &node.child {
                let _ = Command::new("kill")
                    .arg(format!("-{signal}"))
                    .arg(child.id().to_string())
                    .status();
            }
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    pub fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
    }

    /// The index of the node whose pid `tob_status` reports as leader, by asking PostgreSQL.
    pub async fn leader_index(&self, db: &Client) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows =
                db.query("SELECT node FROM tob_status() WHERE role = 'leader'", &[]).await.unwrap();
            if let Some(row) = rows.first() {
                let node: String = row.get(0);
                return self.nodes.iter().position(|n| n.client == node).unwrap();
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sequencers {
    fn drop(&mut self) {
        self.signal_all("CONT");
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway PostgreSQL 15 server with `tob` preloaded and pointed at a cluster (the fault
/// harness's [`Server`], with async connections for the tests).
pub struct Postgres {
    server: Server,
    pub port: u16,
}

impl Postgres {
    /// `extra` lines are appended to postgresql.conf.
    pub fn start(cluster: &str, extra: &[&str]) -> Postgres {
        let server = Server::start(&scratch_dir("pg"), "", cluster, extra)
            .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
        Postgres { port: server.port, server }
    }

    /// `pg_ctl stop -m immediate`: no shutdown checkpoint, like a crash.
    pub fn stop_immediate(&self) {
        self.server.stop_immediate().unwrap();
    }

    /// A streaming standby of this server (tob preloaded, the same settings).
    pub fn start_standby(&self) -> Postgres {
        let server = Server::start_standby(&scratch_dir("standby"), &self.server)
            .unwrap_or_else(|e| panic!("starting a standby: {e}"));
        Postgres { port: server.port, server }
    }

    pub fn promote(&self) {
        self.server.promote().unwrap_or_else(|e| panic!("promoting: {e}\n{}", self.log()));
    }

    pub fn restart_after_crash(&self) {
        self.server.restart_after_crash().unwrap();
    }

    /// Starts the stopped server; an error if it does not come up.
    pub fn try_restart(&self) -> std::io::Result<()> {
        self.server.restart_after_crash()
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        self.server.log()
    }

    pub fn socket_dir(&self) -> &Path {
        self.server.socket_dir()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.server.data()
    }

    /// Connects to `database` as the superuser.
    pub async fn connect(&self, database: &str) -> Client {
        self.connect_as(database, "postgres").await
    }

    pub async fn connect_as(&self, database: &str, user: &str) -> Client {
        let mut config = tokio_postgres::Config::new();
        config.host_path(self.socket_dir()).port(self.port).user(user).dbname(database);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Creates a database with the extension and a `users` table whose `name` is kept
    /// unique across every database on the cluster by the `tob_unique` trigger.
    pub async fn create_app_database(&self, database: &str) -> Client {
        let admin = self.connect("postgres").await;
        admin.batch_execute(&format!("CREATE DATABASE {database}")).await.unwrap();
        let db = self.connect(database).await;
        db.batch_execute(APP_SCHEMA).await.unwrap();
        db
    }
}

/// Waits until the cluster answers, and declares the namespace of [`APP_SCHEMA`]'s trigger
/// (claims need it; declaring is idempotent), as whoever sets up the application does once.
pub async fn wait_until_ready(db: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sql = "SELECT tob_sync(), tob_create_namespace('usernames')";
        let ok = db.query_one(sql, &[]).await.is_ok();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "cluster not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The SQLSTATE of an error, or "" if it has none.
pub fn sqlstate(error: &Error) -> String {
    error.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// Polls `check` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
