//! Real `tob-sequencer` processes on loopback: elections, replication, kill -9, restarts,
//! WAL damage and bad input. Ports come from the OS; every process is killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tob_client::{Client, ClientConfig, ClientError};
use tob_proto::frame::{self, FrameKind};
use tob_proto::{ErrorCode, Outcome, ReadConsistency, Seq};

const CLUSTER_ID: u64 = 0x7ab;

/// A loopback port no other server of this test process was given.
fn free_port() -> u16 {
    tob_faults::ports::free_ports(1)[0].port()
}

struct Node {
    id: u64,
    peer: String,
    client: String,
    metrics: String,
    dir: PathBuf,
    child: Option<Child>,
}

struct Cluster {
    root: PathBuf,
    nodes: Vec<Node>,
    /// Flags every node gets.
    extra: Vec<String>,
}

impl Cluster {
    fn start(n: u64, name: &str) -> Cluster {
        Cluster::start_with(n, name, &[])
    }

    fn start_with(n: u64, name: &str, extra: &[&str]) -> Cluster {
        let root = std::env::temp_dir().join(format!("tob-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let nodes = (1..)
            .zip(tob_faults::ports::node_ports(n as usize))
            .map(|(id, ports)| Node {
                id,
                peer: ports.peer.to_string(),
                client: ports.client.to_string(),
                metrics: ports.metrics.to_string(),
                dir: root.join(format!("n{id}")),
                child: None,
            })
            .collect();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut cluster = Cluster { root, nodes, extra };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        cluster
    }

    fn command(&self, i: usize) -> Command {
        let node = &self.nodes[i];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tob-sequencer"));
        cmd.arg("--node-id").arg(node.id.to_string());
        cmd.arg("--cluster-id").arg(CLUSTER_ID.to_string());
        cmd.arg("--data-dir").arg(&node.dir);
        cmd.arg("--metrics-listen").arg(&node.metrics);
        for n in &self.nodes {
            cmd.arg("--peer").arg(format!("{}={},{}", n.id, n.peer, n.client));
        }
        cmd.args(&self.extra);
        cmd.env_remove("RUST_BACKTRACE");
        cmd
    }

    fn spawn(&mut self, i: usize) {
        let log =
            std::fs::File::create(self.root.join(format!("n{}.log", self.nodes[i].id))).unwrap();
        let child = self
            .command(i)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tob-sequencer starts");
        self.nodes[i].child = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    fn client(&self) -> Client {
        let mut config = ClientConfig::new(self.addresses(), CLUSTER_ID);
        config.request_timeout = Duration::from_secs(10);
        Client::new(config)
    }

    /// Kills every node with SIGKILL, starts them all again and waits for a leader.
    fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
        self.leader(Duration::from_secs(10));
    }

    /// Index of the node all live nodes agree leads, waiting up to `within`.
    fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut client = self.client();
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                if client.status_of(i).is_ok_and(|status| status.role == "leader") {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no leader within {within:?}\n{}", self.log_tails());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every node's log, for a failure message: a node that could not start
    /// (its port taken, say) says why there.
    fn log_tails(&self) -> String {
        let mut tails = String::new();
        for node in &self.nodes {
            let log = std::fs::read_to_string(self.root.join(format!("n{}.log", node.id)));
            let log = log.unwrap_or_else(|e| format!("(no log: {e})"));
            let lines: Vec<&str> = log.lines().collect();
            tails += &format!("--- n{} log, last lines:\n", node.id);
            for line in &lines[lines.len().saturating_sub(8)..] {
                tails += line;
                tails.push('\n');
            }
        }
        tails
    }

    /// Waits until every live node has applied at least `index`.
    fn converge(&self, index: u64, within: Duration) {
        let deadline = Instant::now() + within;
        let mut client = self.client();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            loop {
                let status = client.status_of(i);
                if status.as_ref().is_ok_and(|s| s.applied_index >= index) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "n{} did not apply {index}: {status:?}\n{}",
                    node.id,
                    self.log_tails()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("cluster logs kept in {}", self.root.display());
        }
    }
}

#[test]
fn acknowledged_appends_and_claims_survive_killing_the_leader() {
    let mut cluster = Cluster::start(3, "kill");
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let mut acked = Vec::new();
    for i in 0..50 {
        let payload = format!("m{i}");
        acked.push((client.append(Some("t"), payload.as_bytes()).unwrap(), payload));
    }
    assert!(client.create_namespace("users").unwrap());
    assert!(matches!(client.claim("users", "alice", "u1").unwrap(), Outcome::Claimed { .. }));
    match client.claim("users", "alice", "u2").unwrap() {
        Outcome::Taken { current } => assert_eq!(current.owner, "u1"),
        other => panic!("expected taken, got {other:?}"),
    }

    let old = cluster.leader(Duration::from_secs(1));
    let killed_at = Instant::now();
    cluster.kill(old);
    let new = cluster.leader(Duration::from_secs(5));
    assert_ne!(new, old);
    eprintln!("new leader after {:?}", killed_at.elapsed());

    for i in 50..80 {
        let payload = format!("m{i}");
        acked.push((client.append(Some("t"), payload.as_bytes()).unwrap(), payload));
    }
    let messages = client.read_messages(Seq(1), 1000, None).unwrap();
    for (seq, payload) in &acked {
        let m =
            messages.iter().find(|m| m.seq == *seq).unwrap_or_else(|| panic!("seq {} lost", seq.0));
        assert_eq!(m.payload, payload.as_bytes());
    }
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "dense and gap-free");
    let owner = client.owner("users", "alice", ReadConsistency::Index).unwrap().unwrap();
    assert_eq!(owner.owner, "u1");

    // The killed node comes back and catches up; all converge.
    cluster.spawn(old);
    let position = client.sync().unwrap();
    cluster.converge(position, Duration::from_secs(10));
}

/// A gauge from a node's metrics endpoint (its address from the node's metrics flag).
fn gauge(address: &str, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let line = body.lines().find(|l| l.starts_with(&format!("{name} ")))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// Waits until `path` exists or not, as `present` says.
fn wait_for_file(path: &std::path::Path, present: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while path.exists() != present {
        assert!(Instant::now() < deadline, "{} exists: {}", path.display(), path.exists());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_whose_data_directory_was_lost_votes_only_after_rejoining() {
    let mut cluster = Cluster::start(3, "wiped");
    let leader = cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    assert!(client.create_namespace("users").unwrap());
    assert!(matches!(client.claim("users", "alice", "u1").unwrap(), Outcome::Claimed { .. }));
    let seq = client.append(None, b"kept").unwrap();
    // A new cluster starts blank too: every node rejoined at once and deleted its marker.
    for node in &cluster.nodes {
        wait_for_file(&node.dir.join("rejoining"), false, Duration::from_secs(10));
    }
    // A follower loses its data directory, and the leader goes down.
    let (blank, other) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.kill(blank);
    std::fs::remove_dir_all(&cluster.nodes[blank].dir).unwrap();
    cluster.kill(leader);
    cluster.spawn(blank);
    wait_for_file(&cluster.nodes[blank].dir.join("rejoining"), true, Duration::from_secs(10));
    // `other` would need the blank node's vote, which it must not give before it has heard
    // from every member: whatever it acknowledged before may exist only on the old leader.
    let mut status = cluster.client();
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        for i in [blank, other] {
            let role = status.status_of(i).map(|s| s.role);
            assert!(!role.as_ref().is_ok_and(|r| r == "leader"), "n{} leads", i + 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gauge(&cluster.nodes[blank].metrics, "tob_rejoining"), Some(1.0));
    // The old leader returns: a leader again, nothing lost, and the blank node rejoined.
    cluster.spawn(leader);
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let owner = client.owner("users", "alice", ReadConsistency::Index).unwrap().unwrap();
    assert_eq!(owner.owner, "u1");
    assert_eq!(client.read_messages(seq, 1, None).unwrap()[0].payload, b"kept");
    let position = client.sync().unwrap();
    cluster.converge(position, Duration::from_secs(10));
    wait_for_file(&cluster.nodes[blank].dir.join("rejoining"), false, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge(&cluster.nodes[blank].metrics, "tob_rejoining") != Some(0.0) {
        assert!(Instant::now() < deadline, "tob_rejoining stays 1 after the marker went");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn restart_of_every_node_recovers_from_the_wal() {
    let mut cluster = Cluster::start(3, "restart");
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let seq = client.append(None, b"durable").unwrap();
    let value = client.next("orders").unwrap();
    cluster.restart_all();
    let mut client = cluster.client();
    let messages = client.read_messages(seq, 1, None).unwrap();
    assert_eq!(messages[0].payload, b"durable");
    assert_eq!(client.next("orders").unwrap(), value + 1);
}

#[test]
fn a_torn_wal_tail_is_truncated_and_a_corrupt_record_refuses_to_start() {
    let mut cluster = Cluster::start(3, "wal");
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    for i in 0..20 {
        client.append(None, format!("x{i}").as_bytes()).unwrap();
    }
    let victim = (cluster.leader(Duration::from_secs(1)) + 1) % 3;
    cluster.kill(victim);
    let wal = cluster.nodes[victim].dir.join("wal-00000001.log");
    let mut bytes = std::fs::read(&wal).unwrap();

    // Torn: a partial frame where the next one would have gone — after the last whole one,
    // inside the space the log reserved (zeros to the end of the file).
    let mut end = 0;
    while bytes.len() >= end + 12 && bytes[end..end + 4] == *b"TOBW" {
        end += 12 + u32::from_le_bytes(bytes[end + 4..end + 8].try_into().unwrap()) as usize;
    }
    assert!(end > 0, "the log holds frames");
    let mut torn = bytes.clone();
    torn.resize(torn.len().max(end + 11), 0);
    torn[end..end + 4].copy_from_slice(b"TOBW");
    torn[end + 4..end + 11].copy_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&wal, &torn).unwrap();
    cluster.spawn(victim);
    let mut client = cluster.client();
    let position = client.sync().unwrap();
    cluster.converge(position, Duration::from_secs(10));
    cluster.kill(victim);

    // Corrupt: flip a byte inside the first frame's payload; the node must refuse and say where.
    bytes = std::fs::read(&wal).unwrap();
    bytes[13] ^= 0xff; // WAL frame headers are 12 bytes: this is the first payload's second byte
    std::fs::write(&wal, &bytes).unwrap();
    let mut child =
        cluster.command(victim).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let status =
        wait_exit(&mut child, Duration::from_secs(10), "a node with a corrupt WAL kept running");
    assert_eq!(status.code(), Some(3), "exit code for corruption");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("wal-00000001.log") && stderr.contains("offset 0"), "{stderr}");
}

/// Waits for a process to exit; kills it and fails with `why` if it outlives `within`.
fn wait_exit(child: &mut Child, within: Duration, why: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{why}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn raw_call(address: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out); // the node answers (maybe) and closes
    out
}

#[test]
fn bad_input_is_refused_and_the_node_keeps_serving() {
    let cluster = Cluster::start(3, "bad");
    cluster.leader(Duration::from_secs(10));
    let address = cluster.nodes[0].client.clone();

    // Garbage: closed without an answer it could misread.
    let answer = raw_call(&address, &[0xde, 0xad, 0xbe, 0xef].repeat(10));
    assert!(frame::decode(&answer, CLUSTER_ID, 1 << 20).is_ok());
    // Wrong cluster id and oversized frames: an error naming the reason, then closed.
    for (bytes, code) in [
        (frame::encode(FrameKind::Request, 0x999, b"x"), ErrorCode::Malformed),
        (
            {
                let mut b = frame::encode(FrameKind::Request, CLUSTER_ID, b"x");
                b[16..20].copy_from_slice(&(64u32 << 20).to_le_bytes());
                b
            },
            ErrorCode::TooLarge,
        ),
        (frame::encode(FrameKind::Request, CLUSTER_ID, &[0xff; 16]), ErrorCode::Malformed),
        (
            {
                let mut b = frame::encode(FrameKind::Request, CLUSTER_ID, b"x");
                b[4] = frame::VERSION + 1; // a future protocol version
                b
            },
            ErrorCode::Malformed,
        ),
    ] {
        let answer = raw_call(&address, &bytes);
        let (_, payload, _) =
            frame::decode(&answer, CLUSTER_ID, 1 << 20).unwrap().expect("an error response");
        let response: tob_proto::ClientResponse = postcard::from_bytes(&payload).unwrap();
        match response.reply {
            tob_proto::Reply::Error { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // A well-framed request with an operation the node does not know (a newer client): the
    // error carries the request's id, so the client fails at once instead of retrying.
    let mut unknown = postcard::to_allocvec(&42u64).unwrap();
    unknown.extend_from_slice(&[0x7f; 8]);
    let answer = raw_call(&address, &frame::encode(FrameKind::Request, CLUSTER_ID, &unknown));
    let (_, payload, _) = frame::decode(&answer, CLUSTER_ID, 1 << 20).unwrap().expect("an answer");
    let response: tob_proto::ClientResponse = postcard::from_bytes(&payload).unwrap();
    assert_eq!(response.id, 42);
    assert!(matches!(response.reply, tob_proto::Reply::Error { code: ErrorCode::Malformed, .. }));
    // Oversized keys and payloads are refused by the cluster with a clear code and a message
    // naming what and by how much.
    let mut client = cluster.client();
    let err = client.claim("users", &"k".repeat(5000), "u1").unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { code: ErrorCode::TooLarge, message }
            if message == "key is 5000 bytes long; at most 1024 are allowed"),
        "{err:?}"
    );
    let err = client.append(None, &vec![b'x'; (1 << 20) + 1]).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { code: ErrorCode::TooLarge, message }
            if message == "payload is 1048577 bytes long; at most 1048576 are allowed"),
        "{err:?}"
    );
    // A namespace nobody created: refused for claims and for reads in every mode (a typo must
    // not start a second uniqueness domain, nor report its keys free).
    let unknown = |e: ClientError| {
        matches!(e, ClientError::Refused { code: ErrorCode::UnknownNamespace, .. })
    };
    assert!(unknown(client.claim("usres", "alice", "u1").unwrap_err()));
    assert!(unknown(client.release("usres", "alice", "u1").unwrap_err()));
    for consistency in [ReadConsistency::Index, ReadConsistency::Log, ReadConsistency::Lease] {
        assert!(unknown(client.owner("usres", "alice", consistency).unwrap_err()));
    }
    assert!(client.create_namespace("usres").unwrap());
    assert!(!client.create_namespace("usres").unwrap(), "exists");
    assert_eq!(client.namespaces().unwrap(), ["usres"]);
    assert!(matches!(client.claim("usres", "alice", "u1").unwrap(), Outcome::Claimed { .. }));
    // The leader proposes the rule itself; a client may not.
    let err = client.command(tob_proto::Command::RequireNamespaces).unwrap_err();
    assert!(matches!(err, ClientError::Refused { code: ErrorCode::Malformed, .. }), "{err:?}");
    // And everyone is still served.
    assert!(client.append(None, b"still here").is_ok());
}

#[test]
fn a_cluster_that_is_down_is_reported_unavailable() {
    let mut config = ClientConfig::new(vec![format!("127.0.0.1:{}", free_port())], CLUSTER_ID);
    config.request_timeout = Duration::from_secs(1);
    let err = Client::new(config).append(None, b"x").unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err:?}");
    assert_eq!(err.code(), ErrorCode::Unavailable);
}

#[test]
fn a_follow_stream_survives_a_leader_change_without_gap_or_duplicate() {
    let mut cluster = Cluster::start(3, "follow");
    let leader = cluster.leader(Duration::from_secs(10));
    // The stream starts at the node about to be killed, so it has to move.
    let mut addresses = cluster.addresses();
    addresses.rotate_left(leader);
    let (tx, rx) = std::sync::mpsc::channel();
    let follower = std::thread::spawn(move || {
        let mut config = ClientConfig::new(addresses, CLUSTER_ID);
        config.request_timeout = Duration::from_secs(10);
        let mut client = Client::new(config);
        let mut seen = Vec::new();
        client
            .follow(Seq(1), None, |m| {
                seen.push((m.seq.0, String::from_utf8(m.payload).unwrap()));
                seen.len() < 60
            })
            .expect("the stream keeps going");
        tx.send(seen).unwrap();
    });
    let mut client = cluster.client();
    for i in 0..30 {
        client.append(None, format!("f{i}").as_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200)); // let the stream catch up on the old leader
    cluster.kill(leader);
    for i in 30..60 {
        client.append(None, format!("f{i}").as_bytes()).unwrap();
    }
    let seen = rx.recv_timeout(Duration::from_secs(30)).expect("the follower saw everything");
    follower.join().unwrap();
    let expected: Vec<(u64, String)> = (0..60).map(|i| (i + 1, format!("f{i}"))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_follow_stream_far_behind_gets_every_message() {
    // More messages behind than one push carries (10,000), small enough that the push is not
    // cut by its byte budget: the stream used to go on after the last applied message and
    // skip everything past the first 10,000.
    let cluster = Cluster::start(1, "far_behind");
    cluster.leader(Duration::from_secs(10));
    let total = 10_050u64;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = tob_client::AsyncClient::new(ClientConfig::new(cluster.addresses(), CLUSTER_ID));
    runtime.block_on(async {
        let tasks: Vec<_> = (0..total)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.append(None, &i.to_le_bytes()).await.unwrap() })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let addresses = cluster.addresses();
    std::thread::spawn(move || {
        let mut client = Client::new(ClientConfig::new(addresses, CLUSTER_ID));
        let mut seen = Vec::new();
        let _ = client.follow(Seq(1), None, |m| {
            seen.push(m.seq.0);
            m.seq.0 < total
        });
        let _ = tx.send(seen);
    });
    let seen = rx.recv_timeout(Duration::from_secs(20)).expect("the stream reached the end");
    assert!(seen == (1..=total).collect::<Vec<_>>(), "{} messages, not 1..={total}", seen.len());
}

#[test]
fn a_paused_leader_is_replaced_and_rejoins_as_follower() {
    let cluster = Cluster::start(3, "pause");
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    client.create_namespace("locks").unwrap();
    client.claim("locks", "job", "worker-1").unwrap();
    let old = cluster.leader(Duration::from_secs(1));
    let pid = cluster.nodes[old].child.as_ref().unwrap().id().to_string();
    let signal =
        |sig: &str| assert!(Command::new("kill").arg(sig).arg(&pid).status().unwrap().success());
    signal("-STOP");
    // Longer than the election timeout: the others must elect a new leader and keep serving.
    std::thread::sleep(Duration::from_millis(600));
    let seq = client.append(None, b"while paused").unwrap();
    let new = cluster.leader(Duration::from_secs(5));
    assert_ne!(new, old);
    signal("-CONT");
    // The old leader steps down on hearing the new term, and catches up.
    let position = client.sync().unwrap();
    cluster.converge(position, Duration::from_secs(10));
    let mut status_client = cluster.client();
    let status = status_client.status_of(old).unwrap();
    assert_eq!(status.role, "follower");
    assert_eq!(client.read_messages(seq, 1, None).unwrap()[0].payload, b"while paused");
    assert_eq!(
        client.owner("locks", "job", ReadConsistency::Lease).unwrap().unwrap().owner,
        "worker-1"
    );
}

#[test]
fn every_node_serves_prometheus_metrics_on_loopback() {
    let cluster = Cluster::start(3, "metrics");
    let leader = cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    for _ in 0..5 {
        client.append(Some("m"), b"x").unwrap();
    }
    client.create_namespace("users").unwrap();
    client.claim("users", "alice", "u1").unwrap();
    // A transaction in flight: one prepared claim, two staged messages.
    let holder = "pg:1:1:700";
    let prepared = tob_proto::ClaimKind::Prepared;
    client.claim_with("users", "bob", "u2", holder, prepared, None).unwrap();
    let staged = |p: &[u8]| tob_proto::StagedMessage { topic: None, payload: p.to_vec() };
    client.stage(holder, vec![staged(b"a"), staged(b"b")]).unwrap();
    let status = client.status_of(leader).unwrap();
    assert!(status.metrics_address.starts_with("127.0.0.1:"), "{}", status.metrics_address);
    let mut stream = TcpStream::connect(&status.metrics_address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let value = |name: &str| -> f64 {
        let line = body
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{body}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("tob_role "), 3.0);
    assert_eq!(value("tob_rejoining "), 0.0, "a new cluster's nodes have all rejoined");
    assert_eq!(value("tob_claims_in_flight "), 1.0);
    assert_eq!(value("tob_staged_messages "), 2.0);
    assert!(value("tob_term ") >= 1.0);
    assert!(value("tob_proposals_total ") >= 6.0);
    assert!(value("tob_fsync_latency_seconds_count ") >= 1.0);
    assert!(value("tob_commit_index ") >= 7.0);
    assert!(value("tob_request_latency_seconds_count{operation=\"append\"} ") >= 5.0);
    assert!(value("tob_request_latency_seconds_count{operation=\"claim\"} ") >= 1.0);
}

#[test]
fn the_async_client_pipelines_many_requests_on_one_connection() {
    let cluster = Cluster::start(3, "async");
    cluster.leader(Duration::from_secs(10));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = tob_client::AsyncClient::new(ClientConfig::new(cluster.addresses(), CLUSTER_ID));
    let seqs: Vec<u64> = runtime.block_on(async {
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    client.append(None, format!("p{i}").as_bytes()).await.unwrap().0
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap());
        }
        seqs
    });
    runtime.block_on(async {
        assert!(client.create_namespace("users").await.unwrap());
        assert!(matches!(
            client.claim("users", "zed", "u1").await.unwrap(),
            Outcome::Claimed { .. }
        ));
        let owner = client.owner("users", "zed", ReadConsistency::Lease).await.unwrap().unwrap();
        assert_eq!(owner.owner, "u1");
        assert_eq!(client.release("users", "zed", "u1").await.unwrap(), Outcome::Released);
        assert_eq!(client.owner("users", "zed", ReadConsistency::Log).await.unwrap(), None);
        assert_eq!(client.next("c").await.unwrap(), 1);
        assert_eq!(client.read_messages(Seq(1), 5, None).await.unwrap().len(), 5);
    });
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=300).collect::<Vec<u64>>(), "300 appends, 300 distinct dense seqs");
    let mut blocking = cluster.client();
    let messages = blocking.read_messages(Seq(1), 1000, None).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        assert_eq!(messages[*seq as usize - 1].payload, format!("p{i}").as_bytes());
    }
}

#[test]
fn claims_of_an_expired_session_are_released_and_prepared_ones_survive() {
    use tob_proto::{ClaimKind, ClaimState};
    let cluster = Cluster::start(3, "session");
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    client.create_namespace("locks").unwrap();
    client.create_namespace("users").unwrap();
    let session = client.open_session(Duration::from_millis(300)).unwrap();
    let lock =
        client.claim_with("locks", "job", "w1", "w1", ClaimKind::Ephemeral, Some(session)).unwrap();
    assert!(matches!(lock, Outcome::Claimed { .. }));
    let pending = client
        .claim_with("users", "bob", "u9", "tx9", ClaimKind::Transactional, Some(session))
        .unwrap();
    assert!(matches!(pending, Outcome::Claimed { .. }));
    let prepared = client
        .claim_with("users", "eve", "u9", "tx9", ClaimKind::Transactional, Some(session))
        .unwrap();
    assert!(matches!(prepared, Outcome::Claimed { .. }));
    let eve = vec![tob_client::claim_key("users", "eve")];
    assert_eq!(client.prepare("tx9", eve).unwrap(), Outcome::Prepared);
    // Kept alive, the session and its claims live past the TTL.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        client.keep_alive(session).unwrap();
    }
    assert!(client.owner("locks", "job", ReadConsistency::Index).unwrap().is_some());
    // Left alone, it expires: the lock and the pending claim go, the prepared one stays.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(client.owner("locks", "job", ReadConsistency::Index).unwrap(), None);
    assert_eq!(client.owner("users", "bob", ReadConsistency::Index).unwrap(), None);
    let eve = client.owner("users", "eve", ReadConsistency::Index).unwrap().unwrap();
    assert_eq!(eve.state, ClaimState::Prepared);
    let err = client.keep_alive(session).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownSession);
    let bob = vec![tob_client::claim_key("users", "bob")];
    assert!(matches!(client.prepare("tx9", bob).unwrap(), Outcome::Lost { .. }));
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message_and_sigterm_stops_cleanly() {
    let bin = env!("CARGO_BIN_EXE_tob-sequencer");
    // Command lines split at spaces.
    let one_member = "--cluster-id 1 --data-dir /tmp/x --peer 1=127.0.0.1:1,127.0.0.1:2";
    let cases = [
        ("--cluster-id 1 --data-dir /tmp/x".to_owned(), "node_id is required"),
        (format!("--node-id 4 {one_member}"), "node 4 is not among the peers"),
        ("--node-id 1 --cluster-id 1 --data-dir /tmp/x --peer 1=nonsense".to_owned(), "bad --peer"),
        (format!("--node-id 1 {one_member} --cpu-slice-us 50"), "cpu_slice_us must be 0"),
        (format!("--node-id 1 {one_member} --messages-retained 0"), "messages_retained must be at"),
    ];
    let toml = std::env::temp_dir().join(format!("tob-bad-{}.toml", std::process::id()));
    std::fs::write(&toml, "node_id = 1\nnodeid = 2\n").unwrap();
    let with_file = [(format!("--config {}", toml.display()), "unknown field `nodeid`")];
    for (line, expected) in cases.into_iter().chain(with_file) {
        let args: Vec<&str> = line.split(' ').collect();
        let output = Command::new(bin).args(&args).env_remove("RUST_BACKTRACE").output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(&toml);
    let mut cluster = Cluster::start(1, "sigterm");
    cluster.leader(Duration::from_secs(10));
    let mut child = cluster.nodes[0].child.take().unwrap();
    assert!(
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success()
    );
    let status = wait_exit(&mut child, Duration::from_secs(5), "SIGTERM did not stop the node");
    assert!(status.success(), "graceful exit, got {status:?}");
}

#[test]
fn snapshots_compact_the_log_and_bring_a_lagging_node_back() {
    // Frames far smaller than the snapshot (2 KiB against about 15 KB of state): it travels in
    // 1 KiB pieces (once, a 9.5 MB snapshot sent whole met the 8 MiB frame limit in the
    // one-hour fault run, and the lagging node could never catch up).
    let mut cluster = Cluster::start_with(
        3,
        "snapshot",
        &["--snapshot-entries", "50", "--max-frame-bytes", "2048"],
    );
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let lagging = (cluster.leader(Duration::from_secs(1)) + 1) % 3;
    cluster.kill(lagging);
    let mut acked = Vec::new();
    for i in 0..400 {
        let payload = format!("s{i}-{}", "x".repeat(20));
        acked.push((client.append(None, payload.as_bytes()).unwrap(), payload));
    }
    // The leader has compacted far past what the lagging node holds: it needs a snapshot.
    let leader = cluster.leader(Duration::from_secs(1));
    let mut status_client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_client.status_of(leader).unwrap().snapshot_index < 300 {
        assert!(Instant::now() < deadline, "the leader never compacted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let segments_and_snapshots =
        |i: usize| std::fs::read_dir(&cluster.nodes[i].dir).unwrap().count();
    assert!(segments_and_snapshots(leader) < 10, "old files removed");
    // Written by a child process while the node went on serving, not by the fallback that
    // encodes in the node.
    let log_path = cluster.root.join(format!("n{}.log", cluster.nodes[leader].id));
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("snapshot written by a child process"), "{log}");
    assert!(!log.contains("encoding the snapshot in the node"), "{log}");
    assert!(!log.contains('\x1b'), "a log written to a file has no colour codes: {log}");
    cluster.spawn(lagging);
    let position = client.sync().unwrap();
    cluster.converge(position, Duration::from_secs(10));
    assert!(
        status_client.status_of(lagging).unwrap().snapshot_index >= 300,
        "installed a snapshot"
    );
    // And everything survives a restart of every node from snapshots plus WAL.
    cluster.restart_all();
    let mut client = cluster.client();
    let mut messages = Vec::new();
    while messages.len() < acked.len() {
        let from = Seq(messages.len() as u64 + 1);
        messages.extend(client.read_messages(from, 1000, None).unwrap());
    }
    for (seq, payload) in &acked {
        assert_eq!(messages[seq.0 as usize - 1].payload, payload.as_bytes());
    }
}

#[test]
fn a_read_larger_than_a_reply_comes_in_pages_and_whole() {
    // Replies hold about half a frame of payloads: with 4 KiB frames, about 2 KiB.
    let cluster = Cluster::start_with(1, "pages", &["--max-frame-bytes", "4096"]);
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let mut appended = Vec::new();
    for i in 0..36u32 {
        let topic = if i % 6 == 5 { "other" } else { "t" };
        let payload = format!("{i:03}-{}", "x".repeat(196));
        appended.push((client.append(Some(topic), payload.as_bytes()).unwrap(), topic, payload));
    }
    let first = appended[0].0;

    // One page stops short of what was asked for, and says so.
    let (page, complete) = client.read_messages_page(first, 100, None).unwrap();
    assert!(!page.is_empty() && page.len() < 36, "{} messages in a page", page.len());
    assert!(!complete, "more messages follow the page");
    // The whole read gathers every page, in order; so does one of a topic.
    let all = client.read_messages(first, 100, None).unwrap();
    let seqs: Vec<Seq> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, appended.iter().map(|(seq, ..)| *seq).collect::<Vec<_>>());
    assert!(all.iter().zip(&appended).all(|(m, (_, _, p))| m.payload == p.as_bytes()));
    let of_t = client.read_messages(first, 100, Some("t")).unwrap();
    assert_eq!(of_t.len(), 30);
    assert!(of_t.iter().all(|m| m.topic.as_deref() == Some("t")));
    // At most `max`, even across pages.
    assert_eq!(client.read_messages(first, 17, None).unwrap().len(), 17);
    // The end of the log: complete, also when the page is exactly what was left.
    let last = appended[35].0;
    let (page, complete) = client.read_messages_page(Seq(last.0 - 1), 100, None).unwrap();
    assert_eq!((page.len(), complete), (2, true));
    let (page, complete) = client.read_messages_page(Seq(last.0 - 1), 2, None).unwrap();
    assert_eq!((page.len(), complete), (2, true));
    let (page, complete) = client.read_messages_page(Seq(last.0 - 2), 2, None).unwrap();
    assert_eq!((page.len(), complete), (2, false), "one more exists after these two");
    let (page, complete) = client.read_messages_page(Seq(last.0 + 1), 100, None).unwrap();
    assert_eq!((page.len(), complete), (0, true));
    // The older call is still answered, with a page's messages and no word on the rest.
    let reply =
        client.call(tob_proto::Call::ReadMessages { from: first, max: 100, topic: None }).unwrap();
    match reply {
        tob_proto::Reply::Messages(records) => assert!(records.len() < 36 && records.len() > 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_read_of_trimmed_messages_is_refused_naming_the_oldest_kept() {
    let cluster = Cluster::start_with(3, "retention", &["--messages-retained", "5"]);
    cluster.leader(Duration::from_secs(10));
    let mut client = cluster.client();
    let seqs: Vec<Seq> =
        (0..8).map(|i| client.append(Some("t"), format!("m{i}").as_bytes()).unwrap()).collect();
    let oldest_kept = seqs[3];
    for from in [seqs[0], seqs[2]] {
        match client.read_messages(from, 100, None) {
            Err(ClientError::Refused { code: ErrorCode::Compacted, message }) => {
                assert_eq!(tob_proto::compacted_first_kept(&message), Some(oldest_kept.0));
            }
            other => panic!("a read from {from:?}: {other:?}"),
        }
    }
    // From the oldest kept on, the five kept come whole; past the end, nothing.
    let kept = client.read_messages(oldest_kept, 100, Some("t")).unwrap();
    assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs[3..].to_vec());
    assert_eq!(kept[0].payload, b"m3");
    assert!(client.read_messages(Seq(seqs[7].0 + 1), 100, None).unwrap().is_empty());
}

#[test]
fn a_connection_with_too_many_requests_in_flight_is_told_overloaded_and_loses_nothing() {
    let cluster = Cluster::start_with(1, "overload", &["--max-requests-in-flight", "4"]);
    cluster.leader(Duration::from_secs(10));
    // 50 pipelined appends in one write: the node takes 4 and pushes back on the rest.
    let mut bytes = Vec::new();
    for id in 1..=50u64 {
        let request = tob_proto::Request {
            client: Some(tob_proto::ClientId(99)),
            request_id: tob_proto::RequestId(id),
            first_incomplete: tob_proto::RequestId(1),
            command: tob_proto::Command::Append { topic: None, payload: vec![id as u8] },
        };
        let payload = postcard::to_allocvec(&tob_proto::ClientRequest {
            id,
            call: tob_proto::Call::Command(request),
        })
        .unwrap();
        bytes.extend(frame::encode(FrameKind::Request, CLUSTER_ID, &payload));
    }
    let mut stream = TcpStream::connect(&cluster.nodes[0].client).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(&bytes).unwrap();
    let (mut appended, mut overloaded) = (0, 0);
    let mut buffer = Vec::new();
    while appended + overloaded < 50 {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("an answer for every request");
        buffer.extend_from_slice(&chunk[..n]);
        while let Some((_, payload, used)) = frame::decode(&buffer, CLUSTER_ID, 1 << 20).unwrap() {
            buffer.drain(..used);
            match postcard::from_bytes::<tob_proto::ClientResponse>(&payload).unwrap().reply {
                tob_proto::Reply::Outcome(Outcome::Appended { .. }) => appended += 1,
                tob_proto::Reply::Error { code: ErrorCode::Overloaded, .. } => overloaded += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(appended >= 4 && overloaded > 0, "appended {appended}, overloaded {overloaded}");
    // The client library backs off and retries: many concurrent callers all get through.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = tob_client::AsyncClient::new(ClientConfig::new(cluster.addresses(), CLUSTER_ID));
    runtime.block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.append(None, format!("o{i}").as_bytes()).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().expect("retried past overloaded");
        }
    });
}

#[test]
fn every_thread_of_a_node_asks_for_the_short_cpu_slice() {
    let cluster = Cluster::start(1, "slice");
    cluster.leader(Duration::from_secs(10));
    let pid = cluster.nodes[0].child.as_ref().unwrap().id();
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let sched = std::fs::read_to_string(task.unwrap().path().join("sched")).unwrap();
        // Kernels without EEVDF report no slice (and ignore the request).
        let Some(line) = sched.lines().find(|l| l.starts_with("se.slice")) else { return };
        assert_eq!(line.split_whitespace().last(), Some("100000"), "{line}");
        threads += 1;
    }
    assert!(threads >= 2, "the node's thread and its log writer");
}

/// The blocking client's `pipeline`: 1,500 claims in flight on one connection are applied in
/// the order sent (tokens rising, the second claim of a key taken by the first), sending the
/// same claims again grants them again with the same tokens (a repeat is safe), and a
/// follower's `not_leader` fails the whole call and points the next one at the leader.
#[test]
fn the_blocking_client_pipelines_claims_in_order() {
    let cluster = Cluster::start(3, "pipeline");
    let leader = cluster.leader(Duration::from_secs(10));
    assert!(cluster.client().create_namespace("users").unwrap());
    let mut addresses = cluster.addresses();
    addresses.rotate_left((leader + 1) % 3); // a follower first
    let mut config = ClientConfig::new(addresses, CLUSTER_ID);
    config.request_timeout = Duration::from_secs(10);
    let mut client = Client::new(config);
    let claim = |key: usize, owner: &str| tob_proto::Command::Claim {
        key: tob_client::claim_key("users", &format!("k{key}")),
        owner: owner.into(),
        holder: owner.into(),
        kind: tob_proto::ClaimKind::Held,
        session: None,
    };
    let commands: Vec<_> =
        (0..1_000).map(|k| claim(k, "first")).chain((0..500).map(|k| claim(k, "second"))).collect();
    match client.pipeline(commands.clone()) {
        Err(ClientError::Refused { code: ErrorCode::NotLeader, .. }) => {}
        other => panic!("a follower must refuse the pipeline: {other:?}"),
    }
    let outcomes = client.pipeline(commands.clone()).unwrap();
    assert_eq!(outcomes.len(), 1_500);
    let tokens: Vec<u64> = outcomes[..1_000]
        .iter()
        .map(|o| match o {
            Outcome::Claimed { token } => token.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "applied in the order sent");
    for (k, outcome) in outcomes[1_000..].iter().enumerate() {
        match outcome {
            Outcome::Taken { current } => {
                assert_eq!((current.owner.as_str(), current.token.0), ("first", tokens[k]))
            }
            other => panic!("k{k} claimed twice: {other:?}"),
        }
    }
    let again = client.pipeline(commands[..1_000].to_vec()).unwrap();
    let tokens_again: Vec<u64> = again
        .iter()
        .map(|o| match o {
            Outcome::Claimed { token } => token.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(tokens_again, tokens);
    assert!(client.pipeline(Vec::new()).unwrap().is_empty());
}
