//! `tob`: the command line for a tob cluster.
//!
//! Exit codes: 0 done; 1 refused (a claim taken, a release by a non-owner); 2 bad usage;
//! 3 cluster unavailable or timed out; 4 any other error.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use tob_client::{Client, ClientConfig, ClientError};
use tob_proto::{ErrorCode, Outcome, ReadConsistency, Seq};

#[derive(Parser)]
#[command(name = "tob", version, about = "Command line for a tob sequencer cluster")]
struct Cli {
    /// Client addresses of the cluster's nodes, comma-separated.
    #[arg(long, env = "TOB_CLUSTER", global = true)]
    cluster: Option<String>,
    #[arg(long, env = "TOB_CLUSTER_ID", default_value_t = 1, global = true)]
    cluster_id: u64,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of each request, retries included.
    #[arg(long, default_value_t = 10_000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local development cluster on loopback until Ctrl-C.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Role, term, positions and process of every node.
    Status,
    /// Append a message; prints its seq.
    Append {
        /// Messages are read back by topic (`tob read --topic`).
        topic: String,
        /// The message, as given (at most 1 MiB).
        payload: String,
    },
    /// Read messages from a seq on.
    Read {
        /// The first seq to read (seqs start at 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        from: u64,
        /// At most this many messages (read page by page).
        #[arg(long, default_value_t = 100)]
        max: u32,
        /// Only messages of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Keep printing new messages as they commit.
        #[arg(long)]
        follow: bool,
    },
    /// Declare a namespace: claims need one (a misspelt namespace is then an error rather
    /// than a second uniqueness domain). Prints "created", or "exists" if it did already.
    CreateNamespace { name: String },
    /// The declared namespaces, one per line.
    Namespaces,
    /// Claim a key; prints the fencing token, or who holds it (exit 1).
    Claim { namespace: String, key: String, owner: String },
    /// Release a key held by OWNER (exit 1 if OWNER does not hold it).
    Release { namespace: String, key: String, owner: String },
    /// Who holds a key.
    Owner {
        namespace: String,
        key: String,
        #[arg(long, default_value = "index")]
        consistency: String,
    },
    /// A linearizable position of the log.
    Sync,
    /// Next value of a gap-free counter.
    Next { counter: String },
}

#[derive(Subcommand)]
enum ClusterAction {
    Up {
        #[arg(long, default_value = "tob-cluster")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
        /// Start a node that exited again after this many seconds (say, after `kill -9` to
        /// try a failover); without it a node that exits stays down.
        #[arg(long, value_name = "SECS")]
        restart_after: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Cluster { action: ClusterAction::Up { dir, nodes, base_port, restart_after } } => {
            let restart_after = restart_after.map(Duration::from_secs);
            cluster_up(dir, *nodes, *base_port, cli.cluster_id, restart_after)
        }
        _ => run(&cli),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = match &e {
                ClientError::Unavailable(_) | ClientError::Timeout => 3,
                ClientError::Refused {
                    code: ErrorCode::TooLarge | ErrorCode::Empty | ErrorCode::UnknownNamespace,
                    ..
                } => 2,
                _ => 4,
            };
            let message = match (&cli.command, e.code()) {
                (
                    Cmd::Claim { namespace, .. }
                    | Cmd::Release { namespace, .. }
                    | Cmd::Owner { namespace, .. },
                    ErrorCode::UnknownNamespace,
                ) => format!(
                    "namespace {namespace:?} does not exist; create it with: tob create-namespace {namespace}"
                ),
                _ => e.to_string(),
            };
            if cli.json {
                println!("{}", json!({"error": e.code().name(), "message": message}));
            } else {
                eprintln!("tob: {message}");
            }
            ExitCode::from(code)
        }
    }
}

fn client(cli: &Cli) -> Result<Client, ClientError> {
    let Some(cluster) = &cli.cluster else {
        eprintln!("tob: no cluster given: use --cluster ADDRS or set TOB_CLUSTER");
        std::process::exit(2);
    };
    let nodes: Vec<String> =
        cluster.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    let mut config = ClientConfig::new(nodes, cli.cluster_id);
    config.request_timeout = Duration::from_millis(cli.timeout_ms);
    Ok(Client::new(config))
}

fn run(cli: &Cli) -> Result<ExitCode, ClientError> {
    let mut c = client(cli)?;
    let say = |text: String, value: serde_json::Value| {
        if cli.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    };
    match &cli.command {
        Cmd::Cluster { .. } => unreachable!("handled in main"),
        Cmd::Status => {
            let addresses: Vec<&str> = cli.cluster.as_deref().unwrap_or("").split(',').collect();
            let statuses: Vec<_> = (0..addresses.len()).map(|i| c.status_of(i)).collect();
            let leader_commit =
                statuses.iter().flatten().map(|s| s.commit_index).max().unwrap_or(0);
            for (i, status) in statuses.iter().enumerate() {
                match status {
                    Ok(s) => say(
                        format!(
                            "node {}  {:<12} term {:<4} commit {:<8} applied {:<8} lag {:<6} leader {:<4} pid {}",
                            s.node_id,
                            s.role,
                            s.term,
                            s.commit_index,
                            s.applied_index,
                            leader_commit.saturating_sub(s.applied_index),
                            s.leader.map(|l| l.to_string()).unwrap_or("-".into()),
                            s.pid
                        ),
                        json!({"node": s.node_id, "role": s.role, "term": s.term, "commit": s.commit_index,
                               "applied": s.applied_index, "lag": leader_commit.saturating_sub(s.applied_index),
                               "leader": s.leader, "pid": s.pid, "metrics": s.metrics_address}),
                    ),
                    Err(e) => say(
                        format!("{}  unreachable: {e}", addresses[i].trim()),
                        json!({"index": i, "address": addresses[i].trim(), "error": e.to_string()}),
                    ),
                }
            }
            // Every node listed, reachable or not; but none reachable is "unavailable" (3).
            if statuses.iter().all(Result::is_err) {
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Append { topic, payload } => {
            let seq = c.append(Some(topic), payload.as_bytes())?;
            say(seq.0.to_string(), json!({"seq": seq.0}));
        }
        Cmd::Read { from, max, topic, follow } => {
            let print = |m: tob_proto::MessageRecord| {
                let payload = String::from_utf8_lossy(&m.payload);
                say(
                    format!("{}\t{}\t{payload}", m.seq.0, m.topic.as_deref().unwrap_or("-")),
                    json!({"seq": m.seq.0, "topic": m.topic, "payload": payload}),
                );
            };
            if *follow {
                c.follow(Seq(*from), topic.as_deref(), |m| {
                    print(m);
                    true
                })?;
            } else {
                for m in c.read_messages(Seq(*from), *max, topic.as_deref())? {
                    print(m);
                }
            }
        }
        Cmd::CreateNamespace { name } => {
            let created = c.create_namespace(name)?;
            let result = if created { "created" } else { "exists" };
            say(result.into(), json!({"result": result}));
        }
        Cmd::Namespaces => {
            let names = c.namespaces()?;
            say(names.join("\n"), json!({"namespaces": names}));
        }
        Cmd::Claim { namespace, key, owner } => match c.claim(namespace, key, owner)? {
            Outcome::Claimed { token } => {
                say(token.0.to_string(), json!({"result": "claimed", "token": token.0}))
            }
            Outcome::Taken { current } => {
                say(
                    format!(
                        "taken by {} (token {}, {})",
                        current.owner,
                        current.token.0,
                        current.state.as_str()
                    ),
                    json!({"result": "taken", "owner": current.owner, "token": current.token.0, "state": current.state.as_str()}),
                );
                return Ok(ExitCode::from(1));
            }
            Outcome::Releasing { current, releasing } => {
                say(
                    format!(
                        "taken by {} (token {}, {}), being released by {releasing} (not settled yet)",
                        current.owner,
                        current.token.0,
                        current.state.as_str()
                    ),
                    json!({"result": "releasing", "owner": current.owner, "token": current.token.0, "state": current.state.as_str(), "releasing": releasing}),
                );
                return Ok(ExitCode::from(1));
            }
            other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        },
        Cmd::Release { namespace, key, owner } => match c.release(namespace, key, owner)? {
            Outcome::Released => say("released".into(), json!({"result": "released"})),
            _ => {
                say(format!("{owner} does not hold {key}"), json!({"result": "not_owner"}));
                return Ok(ExitCode::from(1));
            }
        },
        Cmd::Owner { namespace, key, consistency } => {
            let Some(consistency) = ReadConsistency::parse(consistency) else {
                eprintln!("tob: --consistency must be index, log or lease");
                return Ok(ExitCode::from(2));
            };
            match c.owner(namespace, key, consistency)? {
                Some(o) => say(
                    format!("{} (token {}, {})", o.owner, o.token.0, o.state.as_str()),
                    json!({"owner": o.owner, "token": o.token.0, "state": o.state.as_str()}),
                ),
                None => say("free".into(), json!({"owner": null})),
            }
        }
        Cmd::Sync => {
            let position = c.sync()?;
            say(position.to_string(), json!({"position": position}));
        }
        Cmd::Next { counter } => {
            let value = c.next(counter)?;
            say(value.to_string(), json!({"value": value}));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `nodes` tob-sequencer processes on loopback under `dir` and waits for them.
/// Makes the child receive SIGTERM when `tob cluster up` dies, even by SIGKILL, so a killed
/// development cluster does not leave nodes behind.
fn stop_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

fn cluster_up(
    dir: &std::path::Path,
    nodes: u64,
    base_port: u16,
    cluster_id: u64,
    restart_after: Option<Duration>,
) -> Result<ExitCode, ClientError> {
    // Three ports per node: peer and client ports in pairs from the base, then the metrics
    // ports. Explicit metrics ports, not any free one: a restarted node's metrics endpoint
    // could otherwise take the peer or client port of a node that is down.
    if nodes == 0 || nodes > MAX_DEV_NODES {
        eprintln!("tob: cluster up takes 1 to {MAX_DEV_NODES} nodes, not {nodes}");
        return Ok(ExitCode::from(2));
    }
    let last_port = u64::from(base_port) + 3 * nodes - 1;
    if base_port == 0 || last_port > 65_535 {
        eprintln!(
            "tob: cluster up needs 3 ports per node from the base port: {base_port}..{last_port} \
             is not within 1..65535"
        );
        return Ok(ExitCode::from(2));
    }
    let port = |offset: u64| format!("127.0.0.1:{}", u64::from(base_port) + offset);
    let peers: Vec<String> =
        (1..=nodes).map(|id| format!("{id}={},{}", port(2 * (id - 1)), port(2 * id - 1))).collect();
    let binary = sibling_binary("tob-sequencer");
    let command = |id: u64| {
        let mut cmd = Command::new(&binary);
        cmd.arg("--node-id").arg(id.to_string());
        cmd.arg("--cluster-id").arg(cluster_id.to_string());
        cmd.arg("--data-dir").arg(dir.join(format!("n{id}")));
        cmd.arg("--metrics-listen").arg(port(2 * nodes + id - 1));
        for p in &peers {
            cmd.arg("--peer").arg(p);
        }
        stop_with_parent(&mut cmd);
        cmd
    };
    let mut children: Vec<Child> = Vec::new();
    for id in 1..=nodes {
        match command(id).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("tob: cannot start {}: {e}", binary.display());
                for mut c in children {
                    let _ = c.kill();
                }
                return Ok(ExitCode::from(4));
            }
        }
    }
    let clients: Vec<String> = (1..=nodes).map(|id| port(2 * id - 1)).collect();
    println!("TOB_CLUSTER={}", clients.join(","));
    let restarts = match restart_after {
        Some(after) => format!("a node that exits starts again after {} s", after.as_secs()),
        None => "a node that exits stays down".to_owned(),
    };
    println!("# {nodes} nodes, data under {}; {restarts}; Ctrl-C stops them all", dir.display());
    // Wait for Ctrl-C or SIGTERM, then stop every node gracefully with SIGTERM. A node that
    // dies meanwhile (say, killed to try a failover) leaves the others running.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let mut states = vec![NodeState::Running; children.len()];
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Registered once, before the loop: a signal arriving between two polls is kept.
        let mut interrupt = signal(SignalKind::interrupt()).expect("signal handler");
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut watch = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = term.recv() => break,
                _ = watch.tick() => {}
            }
            for ((id, child), state) in (1..).zip(children.iter_mut()).zip(states.iter_mut()) {
                match *state {
                    NodeState::Running => {
                        let Ok(Some(status)) = child.try_wait() else { continue };
                        eprintln!("tob: node {id} (pid {}) exited: {status}", child.id());
                        *state = NodeState::Down { since: std::time::Instant::now() };
                        // Bad configuration (2) or a corrupt log (3) does not heal by waiting.
                        if restart_after.is_some() && matches!(status.code(), Some(2 | 3)) {
                            eprintln!("tob: node {id} refused to start; not starting it again");
                            *state = NodeState::GivenUp;
                        }
                    }
                    NodeState::Down { since } => {
                        let Some(after) = restart_after else { continue };
                        if since.elapsed() < after {
                            continue;
                        }
                        match command(id).spawn() {
                            Ok(restarted) => {
                                eprintln!("tob: node {id} started again (pid {})", restarted.id());
                                *child = restarted;
                                *state = NodeState::Running;
                            }
                            Err(e) => {
                                eprintln!("tob: cannot start node {id} again: {e}; trying later");
                                *state = NodeState::Down { since: std::time::Instant::now() };
                            }
                        }
                    }
                    NodeState::GivenUp => {}
                }
            }
        }
    });
    for (child, state) in children.iter().zip(&states) {
        // A node that exited was reaped: its pid may belong to another process by now.
        if matches!(state, NodeState::Running) {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
    Ok(ExitCode::SUCCESS)
}

/// A node of `tob cluster up`, as its supervisor sees it.
#[derive(Clone, Copy)]
enum NodeState {
    Running,
    /// Exited; started again after `--restart-after`, if given.
    Down {
        since: std::time::Instant,
    },
    /// Refused to start: left down.
    GivenUp,
}

/// At most this many nodes in a development cluster (Raft would take more; one machine's
/// loopback cluster has no use for them).
const MAX_DEV_NODES: u64 = 9;

/// `tob-sequencer` beside this executable, else from `PATH`.
fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}
