//! The `tob` command line against a real cluster it starts itself (`tob cluster up`): output,
//! `--json` and the documented exit codes.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TOB: &str = env!("CARGO_BIN_EXE_tob");

/// Clusters this test process started so far: their data directories and port ranges must
/// not overlap, since the tests run in parallel.
static CLUSTERS_STARTED: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Nine consecutive free loopback ports (`tob cluster up` uses three per node, base..base+8
/// for three nodes), none of them in the range of a cluster this process started before.
fn free_base_port() -> u16 {
    let mut started = CLUSTERS_STARTED.lock().unwrap_or_else(|poison| poison.into_inner());
    for _ in 0..200 {
        let base = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if base > 65_000 || started.iter().any(|&other| base.abs_diff(other) < 9) {
            continue;
        }
        let all_free = (0..9).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            started.push(base);
            return base;
        }
    }
    panic!("no nine consecutive free ports");
}

struct DevCluster {
    up: Child,
    dir: PathBuf,
    addresses: String,
    base: u16,
    /// Where `tob cluster up` writes its stderr (its own messages and the nodes' logs).
    log: PathBuf,
}

impl DevCluster {
    fn start() -> DevCluster {
        DevCluster::start_with(&[])
    }

    /// With more arguments for `tob cluster up`.
    fn start_with(extra: &[&str]) -> DevCluster {
        let sequencer = PathBuf::from(TOB).with_file_name("tob-sequencer");
        if !sequencer.exists() {
            // `cargo test -p tob-cli` alone does not build the server binary.
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "tob-server", "--bin", "tob-sequencer"])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let base = free_base_port();
        // One directory per cluster: two tests with clusters run at the same time.
        let dir = std::env::temp_dir().join(format!("tob-cli-test-{}-{base}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = dir.with_extension("log");
        let up = Command::new(TOB)
            .args(["cluster", "up", "--dir"])
            .arg(&dir)
            .args(["--base-port", &base.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addresses =
            format!("127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}", base + 1, base + 3, base + 5);
        let cluster = DevCluster { up, dir, addresses, base, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !cluster.tob(&["--json", "status"]).stdout_text().contains("\"role\":\"leader\"") {
            assert!(Instant::now() < deadline, "no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn tob(&self, args: &[&str]) -> Output {
        Command::new(TOB).args(args).env("TOB_CLUSTER", &self.addresses).output().unwrap()
    }

    /// `tob --json status`: one object per node, in node order.
    fn status(&self) -> Vec<serde_json::Value> {
        let text = self.tob(&["--json", "status"]).stdout_text();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // SIGTERM lets `tob cluster up` stop its nodes gracefully.
        let _ = Command::new("kill").arg("-TERM").arg(self.up.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.up.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.up.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

trait Text {
    fn stdout_text(&self) -> String;
}

impl Text for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }
}

#[test]
fn commands_print_results_and_use_the_documented_exit_codes() {
    let c = DevCluster::start();
    let append = c.tob(&["append", "news", "hello"]);
    assert_eq!(append.status.code(), Some(0));
    assert_eq!(append.stdout_text(), "1");

    // Claims need a declared namespace: a misspelt one is refused (exit 2) and says how to
    // create it, for claims and reads alike.
    let unknown = c.tob(&["claim", "users", "alice", "u1"]);
    assert_eq!(unknown.status.code(), Some(2), "no namespace yet");
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("tob create-namespace users"), "{said}");
    let unknown = c.tob(&["--json", "owner", "users", "alice"]);
    assert_eq!(unknown.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(&unknown.stdout_text()).unwrap();
    assert_eq!(v["error"], "unknown_namespace");
    let created = c.tob(&["create-namespace", "users"]);
    assert_eq!((created.status.code(), created.stdout_text().as_str()), (Some(0), "created"));
    let again = c.tob(&["--json", "create-namespace", "users"]);
    assert_eq!(again.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&again.stdout_text()).unwrap();
    assert_eq!(v["result"], "exists");
    assert_eq!(c.tob(&["namespaces"]).stdout_text(), "users");
    let listed = c.tob(&["--json", "namespaces"]);
    let v: serde_json::Value = serde_json::from_str(&listed.stdout_text()).unwrap();
    assert_eq!(v["namespaces"], serde_json::json!(["users"]));
    assert_eq!(c.tob(&["claim", "usres", "alice", "u1"]).status.code(), Some(2), "a typo");

    let claimed = c.tob(&["claim", "users", "alice", "u1"]);
    assert_eq!(claimed.status.code(), Some(0));
    let token: u64 = claimed.stdout_text().parse().expect("a token");
    let taken = c.tob(&["--json", "claim", "users", "alice", "u2"]);
    assert_eq!(taken.status.code(), Some(1), "taken exits 1");
    let v: serde_json::Value = serde_json::from_str(&taken.stdout_text()).unwrap();
    assert_eq!(v["result"], "taken");
    assert_eq!(v["owner"], "u1");
    assert_eq!(v["token"], token);

    // A transaction in flight has scheduled alice's release (a DELETE not committed yet):
    // refused for now, saying so.
    let nodes = c.addresses.split(',').map(str::to_owned).collect();
    let mut client = tob_client::Client::new(tob_client::ClientConfig::new(nodes, 1));
    let alice = tob_client::claim_key("users", "alice");
    client.release_on_commit(alice.clone(), "u1", "pg:1:1:900").unwrap();
    let releasing = c.tob(&["--json", "claim", "users", "alice", "u2"]);
    assert_eq!(releasing.status.code(), Some(1), "exits 1 like taken");
    let v: serde_json::Value = serde_json::from_str(&releasing.stdout_text()).unwrap();
    assert_eq!(
        (v["result"].as_str(), v["releasing"].as_str()),
        (Some("releasing"), Some("pg:1:1:900"))
    );
    client.keep_on_commit(alice, "pg:1:1:900").unwrap();

    let owner = c.tob(&["--json", "owner", "users", "alice", "--consistency", "lease"]);
    let v: serde_json::Value = serde_json::from_str(&owner.stdout_text()).unwrap();
    assert_eq!(v["owner"], "u1");
    assert_eq!(c.tob(&["release", "users", "alice", "u2"]).status.code(), Some(1), "not the owner");
    assert_eq!(c.tob(&["release", "users", "alice", "u1"]).status.code(), Some(0));
    assert_eq!(c.tob(&["owner", "users", "alice"]).stdout_text(), "free");

    assert_eq!(c.tob(&["next", "orders"]).stdout_text(), "1");
    assert_eq!(c.tob(&["next", "orders"]).stdout_text(), "2");
    assert!(c.tob(&["sync"]).stdout_text().parse::<u64>().is_ok());
    let read = c.tob(&["--json", "read", "--from", "1"]);
    let v: serde_json::Value =
        serde_json::from_str(read.stdout_text().lines().next().unwrap()).unwrap();
    assert_eq!((v["seq"].as_u64(), v["payload"].as_str()), (Some(1), Some("hello")));

    // Over the limits: exit 2. Bad consistency: exit 2.
    let long = "k".repeat(5000);
    assert_eq!(c.tob(&["claim", "users", &long, "u1"]).status.code(), Some(2));
    assert_eq!(c.tob(&["owner", "users", "x", "--consistency", "eventual"]).status.code(), Some(2));
    // Seqs start at 1: seq 0 is a usage error (it was answered "compacted", exit 4).
    let zero = c.tob(&["read", "--from", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&zero.stderr).contains("'--from <FROM>'"));
}

#[test]
fn no_cluster_is_a_usage_error_and_a_dead_one_is_unavailable() {
    let none = Command::new(TOB).arg("status").env_remove("TOB_CLUSTER").output().unwrap();
    assert_eq!(none.status.code(), Some(2));
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = Command::new(TOB)
        .args(["--timeout-ms", "500", "append", "t", "x"])
        .env("TOB_CLUSTER", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(dead.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&dead.stderr).contains("unavailable"));
    // `status` names the node it cannot reach by its address.
    let status = Command::new(TOB)
        .args(["--timeout-ms", "500", "status"])
        .env("TOB_CLUSTER", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    let text = status.stdout_text();
    assert!(text.starts_with(&format!("127.0.0.1:{port}  unreachable: ")), "{text}");
    assert_eq!(status.status.code(), Some(3), "no node reachable: unavailable");
}

/// `tob cluster up` killed with SIGKILL takes its nodes with it (they get SIGTERM).
#[test]
fn killing_cluster_up_stops_its_nodes() {
    let mut c = DevCluster::start();
    let status = c.tob(&["--json", "status"]).stdout_text();
    let pids: Vec<u64> = status
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 3, "{status}");
    c.up.kill().unwrap(); // SIGKILL
    let _ = c.up.wait();
    let alive = |pid: u64| {
        std::path::Path::new(&format!("/proc/{pid}")).exists() && {
            // A zombie is dead already (its parent is gone; init reaps it).
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ")
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "nodes outlived a SIGKILLed `tob cluster up`");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With `--restart-after`, a node killed with `kill -9` comes back on its own, with its own
/// metrics port, and catches up with what was written while it was down.
#[test]
fn cluster_up_restarts_a_killed_node_when_asked() {
    let c = DevCluster::start_with(&["--restart-after", "1"]);
    let leader = c.status().into_iter().find(|n| n["role"] == "leader").expect("a leader");
    let (node, pid) = (leader["node"].as_u64().unwrap(), leader["pid"].as_u64().unwrap());
    let metrics = leader["metrics"].as_str().unwrap().to_owned();
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // Written while the old leader is down: the restarted node must catch up with it.
    let append = c.tob(&["append", "news", "while-down"]);
    assert_eq!(append.status.code(), Some(0), "{append:?}");
    let position: u64 = c.tob(&["sync"]).stdout_text().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let back = c.status().into_iter().find(|n| n["node"].as_u64() == Some(node));
        if let Some(back) = back.filter(|n| n["pid"].as_u64().is_some_and(|p| p != pid)) {
            assert_eq!(back["metrics"].as_str(), Some(metrics.as_str()), "same metrics port");
            if back["applied"].as_u64() >= Some(position) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "node {node} did not come back: {:?}", c.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cluster_up_refuses_impossible_layouts() {
    for args in [&["--nodes", "0"][..], &["--nodes", "10"], &["--base-port", "65530"]] {
        let out =
            Command::new(TOB).args(["cluster", "up", "--dir", "/nonexistent"]).args(args).output();
        let out = out.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cluster up"), "{args:?}: {stderr}");
    }
}

/// A node that refuses to start (here: its client port is taken) is not started again and
/// again: `tob cluster up` says so and leaves it down.
#[test]
fn cluster_up_gives_up_on_a_node_that_refuses_to_start() {
    let c = DevCluster::start_with(&["--restart-after", "1"]);
    let follower = c.status().into_iter().find(|n| n["role"] == "follower").expect("a follower");
    let (node, pid) = (follower["node"].as_u64().unwrap(), follower["pid"].as_u64().unwrap());
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // Its client port, taken by someone else before it comes back.
    let client_port = c.base + 2 * node as u16 - 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    let _squatter = loop {
        match TcpListener::bind(("127.0.0.1", client_port)) {
            Ok(listener) => break listener,
            Err(e) => assert!(Instant::now() < deadline, "port {client_port}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = || std::fs::read_to_string(&c.log).unwrap();
    let gave_up = format!("tob: node {node} refused to start; not starting it again");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log().contains(&gave_up) {
        assert!(Instant::now() < deadline, "no give-up message: {}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let started = format!("tob: node {node} started again");
    assert_eq!(log().matches(&started).count(), 1, "started once, then left down: {}", log());
}
