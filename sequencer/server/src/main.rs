//! `tob-sequencer`: one node of a tob cluster.

use std::collections::BTreeMap;
use std::process::ExitCode;

use actix::prelude::*;
use clap::Parser;
use tob_wal::{SyncMode, Wal, WalConfig};
use tokio::net::TcpListener;

use tob_server::codec::FrameCodec;
use tob_server::config::{Config, Flags};
use tob_server::metrics::Metrics;
use tob_server::net::{ListenerKind, PeerLink, serve};
use tob_server::node::{NodeActor, peer_frame_bytes_max};

/// mimalloc instead of the system allocator: under load glibc's malloc and free (with its
/// chunk consolidation) were a fifth of the leader's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(Flags::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tob-sequencer: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(slice) = config.cpu_slice {
        // Before any thread starts: they inherit it.
        if let Err(e) = tob_server::sched::request_cpu_slice(slice) {
            tracing::warn!(error = %e, "the scheduler refused the CPU slice; keeping its default");
        }
    }
    let system = System::new();
    let started = system.block_on(start(config));
    if let Err(e) = started {
        eprintln!("tob-sequencer: {e}");
        return ExitCode::from(e.exit_code());
    }
    match system.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tob-sequencer: {e}");
            ExitCode::from(1)
        }
    }
}

enum StartError {
    Bind(String),
    Storage(tob_wal::WalError),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Bind(_) => 2,
            StartError::Storage(tob_wal::WalError::Corrupt { .. }) => 3,
            StartError::Storage(_) => 4,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(e) => write!(f, "{e}"),
            StartError::Storage(e) => write!(f, "{e}"),
        }
    }
}

async fn start(config: Config) -> Result<(), StartError> {
    let bind = |what: &str, address| {
        let what = what.to_owned();
        async move {
            TcpListener::bind(address).await.map_err(|e| {
                StartError::Bind(format!("cannot listen for {what} on {address}: {e}"))
            })
        }
    };
    let peer_listener = bind("peers", config.peer_listen).await?;
    let client_listener = bind("clients", config.client_listen).await?;
    let metrics_listener = bind("metrics", config.metrics_listen).await?;
    let metrics_address = metrics_listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let metrics = Metrics::new(config.node_id);
    let sync = if config.unsafe_no_fsync {
        tracing::warn!(
            "--unsafe-no-fsync: BENCHMARK MODE, acknowledged writes can be lost on power failure"
        );
        SyncMode::UnsafeNoSync
    } else {
        SyncMode::Fsync
    };
    let (wal, recovered) = Wal::open(&config.data_dir, WalConfig { sync, ..WalConfig::default() })
        .map_err(StartError::Storage)?;
    tracing::info!(
        node = config.node_id,
        entries = recovered.entries.len(),
        snapshot = recovered.snapshot.as_ref().map(|s| s.index.0).unwrap_or(0),
        "recovered from {}",
        config.data_dir.display()
    );
    if recovered.rejoining {
        tracing::warn!(
            "starting without earlier storage (a new cluster, or a lost data directory): this \
             node votes for nobody until it has heard from every other member and caught up"
        );
    }
    let codec = FrameCodec { cluster_id: config.cluster_id, max_payload: config.max_frame_bytes };
    // Snapshots travel in pieces, so peer frames stay within a bound of their own (a single
    // 9.5 MB InstallSnapshot once met the 8 MiB client limit and a lagging node could never
    // catch up).
    let peer_codec = FrameCodec { max_payload: peer_frame_bytes_max(&config), ..codec };
    let peers: BTreeMap<u64, Addr<PeerLink>> = config
        .peers
        .values()
        .filter(|p| p.id != config.node_id)
        .map(|p| (p.id, PeerLink::new(p.peer_address, peer_codec).start()))
        .collect();
    // The node shares this thread with the connections and peer links; only the fsync runs
    // elsewhere (see `wal_writer`).
    let node = NodeActor::new(
        config.clone(),
        wal,
        recovered,
        peers,
        metrics.clone(),
        metrics_address.clone(),
    )
    .start();
    actix::spawn(tob_server::metrics::serve(metrics_listener, metrics.clone()));
    let limit = config.max_requests_in_flight;
    actix::spawn(serve(
        peer_listener,
        ListenerKind::Peer,
        node.clone(),
        peer_codec,
        metrics.clone(),
        limit,
    ));
    actix::spawn(serve(client_listener, ListenerKind::Client, node, codec, metrics, limit));
    tracing::info!(
        node = config.node_id,
        peers = %config.peer_listen,
        clients = %config.client_listen,
        metrics = %format!("http://{metrics_address}/metrics"),
        "tob-sequencer started"
    );
    actix::spawn(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        System::current().stop();
    });
    Ok(())
}
