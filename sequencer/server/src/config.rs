//! Node configuration: a TOML file, overridden by flags and `TOB_*` environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// The default CPU slice (see [`crate::sched`]): the shortest the kernel grants. On the
/// development machine (two cores) it took the single-append p50 from 545–579 µs to 498–505 µs
/// and gave the SQL benchmark about 4% more transactions (median of twelve interleaved pairs).
pub const CPU_SLICE_US: u64 = 100;

/// One cluster member as every node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    pub peer_address: SocketAddr,
    pub client_address: SocketAddr,
}

/// The file format (all fields optional so flags can supply them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    cluster_id: Option<u64>,
    data_dir: Option<PathBuf>,
    peer_listen: Option<SocketAddr>,
    client_listen: Option<SocketAddr>,
    tick_ms: Option<u64>,
    election_ticks: Option<u32>,
    heartbeat_ticks: Option<u32>,
    max_frame_bytes: Option<usize>,
    metrics_listen: Option<SocketAddr>,
    snapshot_entries: Option<u64>,
    messages_retained: Option<usize>,
    max_requests_in_flight: Option<usize>,
    unsafe_no_fsync: Option<bool>,
    cpu_slice_us: Option<u64>,
    #[serde(default)]
    peers: Vec<PeerConfig>,
}

/// `tob-sequencer`: one node of a tob cluster.
#[derive(Debug, Parser)]
#[command(name = "tob-sequencer", version)]
pub struct Flags {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, env = "TOB_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "TOB_NODE_ID")]
    pub node_id: Option<u64>,
    #[arg(long, env = "TOB_CLUSTER_ID")]
    pub cluster_id: Option<u64>,
    #[arg(long, env = "TOB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "TOB_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    #[arg(long, env = "TOB_CLIENT_LISTEN")]
    pub client_listen: Option<SocketAddr>,
    /// A member: `ID=PEER_ADDRESS,CLIENT_ADDRESS` (repeat for each, including this node).
    #[arg(long = "peer", env = "TOB_PEERS", value_delimiter = ';')]
    pub peers: Vec<String>,
    #[arg(long, env = "TOB_TICK_MS")]
    pub tick_ms: Option<u64>,
    #[arg(long, env = "TOB_ELECTION_TICKS")]
    pub election_ticks: Option<u32>,
    #[arg(long, env = "TOB_HEARTBEAT_TICKS")]
    pub heartbeat_ticks: Option<u32>,
    #[arg(long, env = "TOB_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Address of the Prometheus `/metrics` endpoint (port 0: any free port, logged).
    #[arg(long, env = "TOB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Snapshot the state and compact the log after this many applied entries.
    #[arg(long, env = "TOB_SNAPSHOT_ENTRIES")]
    pub snapshot_entries: Option<u64>,
    /// Messages kept for reads (default 1,000,000); a read of an older seq is refused
    /// `compacted`. Give every node the same value: each trims its own copy.
    #[arg(long, env = "TOB_MESSAGES_RETAINED")]
    pub messages_retained: Option<usize>,
    /// Requests one client connection may have in flight before it gets `overloaded`.
    #[arg(long, env = "TOB_MAX_REQUESTS_IN_FLIGHT")]
    pub max_requests_in_flight: Option<usize>,
    /// The CPU time slice the node's threads ask the scheduler for, in microseconds (100 to
    /// 100000; 0 keeps the kernel's default). Needs Linux 6.12 or later; older kernels ignore it.
    #[arg(long, env = "TOB_CPU_SLICE_US")]
    pub cpu_slice_us: Option<u64>,
    /// BENCHMARK ONLY: never fsync. Acknowledged writes are lost on power failure.
    #[arg(long, env = "TOB_UNSAFE_NO_FSYNC")]
    pub unsafe_no_fsync: bool,
    /// TESTING ONLY (builds with the `planted-bugs` feature): a deliberate bug, to show that
    /// the fault harness catches it. read-without-quorum, vote-without-log-check,
    /// append-without-prev-check or apply-retries-twice.
    #[arg(long)]
    pub planted_bug: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u64,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    pub peer_listen: SocketAddr,
    pub client_listen: SocketAddr,
    pub peers: BTreeMap<u64, PeerConfig>,
    pub tick_ms: u64,
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    pub max_frame_bytes: usize,
    pub metrics_listen: SocketAddr,
    pub snapshot_entries: u64,
    pub messages_retained: usize,
    pub max_requests_in_flight: usize,
    pub unsafe_no_fsync: bool,
    /// `None`: the kernel's default slice.
    pub cpu_slice: Option<std::time::Duration>,
    pub planted_bug: Option<String>,
}

impl Config {
    /// Merges file, environment and flags, and checks the result. Errors name what is wrong.
    pub fn load(flags: Flags) -> Result<Config, String> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut peers: Vec<PeerConfig> = file.peers;
        if !flags.peers.is_empty() {
            peers = flags.peers.iter().map(|p| parse_peer(p)).collect::<Result<_, _>>()?;
        }
        let node_id = flags.node_id.or(file.node_id).ok_or("node_id is required (--node-id)")?;
        let by_id: BTreeMap<u64, PeerConfig> = peers.iter().map(|p| (p.id, p.clone())).collect();
        if by_id.len() != peers.len() {
            return Err("two peers share an id".into());
        }
        let me =
            by_id.get(&node_id).ok_or_else(|| format!("node {node_id} is not among the peers"))?;
        if node_id == 0 {
            return Err("node ids start at 1".into());
        }
        let config = Config {
            node_id,
            cluster_id: flags
                .cluster_id
                .or(file.cluster_id)
                .ok_or("cluster_id is required (--cluster-id)")?,
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .ok_or("data_dir is required (--data-dir)")?,
            peer_listen: flags.peer_listen.or(file.peer_listen).unwrap_or(me.peer_address),
            client_listen: flags.client_listen.or(file.client_listen).unwrap_or(me.client_address),
            peers: by_id,
            tick_ms: flags.tick_ms.or(file.tick_ms).unwrap_or(10),
            election_ticks: flags.election_ticks.or(file.election_ticks).unwrap_or(10),
            heartbeat_ticks: flags.heartbeat_ticks.or(file.heartbeat_ticks).unwrap_or(2),
            max_frame_bytes: flags
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(8 * 1024 * 1024),
            metrics_listen: flags
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            snapshot_entries: flags
                .snapshot_entries
                .or(file.snapshot_entries)
                .unwrap_or(10_000)
                .max(1),
            messages_retained: flags
                .messages_retained
                .or(file.messages_retained)
                .unwrap_or(tob_machine::MachineConfig::default().messages_retained_max),
            max_requests_in_flight: flags
                .max_requests_in_flight
                .or(file.max_requests_in_flight)
                .unwrap_or(10_000)
                .max(1),
            unsafe_no_fsync: flags.unsafe_no_fsync || file.unsafe_no_fsync.unwrap_or(false),
            cpu_slice: match flags.cpu_slice_us.or(file.cpu_slice_us).unwrap_or(CPU_SLICE_US) {
                0 => None,
                us => Some(std::time::Duration::from_micros(us)),
            },
            planted_bug: flags.planted_bug.clone(),
        };
        if let Some(bug) = &config.planted_bug {
            if !cfg!(feature = "planted-bugs") {
                return Err("--planted-bug needs a build with the planted-bugs feature".into());
            }
            const BUGS: [&str; 4] = [
                "read-without-quorum",
                "vote-without-log-check",
                "append-without-prev-check",
                "apply-retries-twice",
            ];
            if !BUGS.contains(&bug.as_str()) {
                return Err(format!("unknown planted bug {bug:?}; known: {}", BUGS.join(", ")));
            }
        }
        if config.tick_ms == 0 {
            return Err("tick_ms must be at least 1".into());
        }
        if config.heartbeat_ticks == 0 || config.heartbeat_ticks >= config.election_ticks {
            return Err("heartbeat_ticks must be at least 1 and below election_ticks".into());
        }
        if config.messages_retained == 0 {
            return Err("messages_retained must be at least 1".into());
        }
        if config.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
        }
        if let Some(slice) = config.cpu_slice
            && !(crate::sched::SLICE_MIN..=crate::sched::SLICE_MAX).contains(&slice)
        {
            return Err("cpu_slice_us must be 0 (the kernel's default) or 100 to 100000".into());
        }
        Ok(config)
    }
}

fn parse_peer(text: &str) -> Result<PeerConfig, String> {
    let bad = || format!("bad --peer {text:?}: expected ID=PEER_ADDRESS,CLIENT_ADDRESS");
    let (id, addresses) = text.split_once('=').ok_or_else(bad)?;
    let (peer, client) = addresses.split_once(',').ok_or_else(bad)?;
    Ok(PeerConfig {
        id: id.trim().parse().map_err(|_| bad())?,
        peer_address: peer.trim().parse().map_err(|_| bad())?,
        client_address: client.trim().parse().map_err(|_| bad())?,
    })
}
