//! Prometheus metrics: lock-free counters and histograms updated by the node actor, and a
//! minimal HTTP endpoint (`GET /metrics`) that renders them in the text exposition format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds of the latency buckets, in seconds (50 µs … 2 s).
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 2.0,
];
/// Upper bounds of the batch-size buckets, in entries.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A histogram with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in millionths of the unit, to stay in integers.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add((value * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Operations whose request latency is measured separately.
pub const OPERATIONS: [&str; 9] =
    ["append", "claim", "release", "read", "next", "session", "namespace", "sync", "other"];

/// Everything a node exports.
pub struct Metrics {
    pub node_id: u64,
    pub term: AtomicU64,
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    pub role: AtomicU64,
    /// 1 while the node rejoins after starting without its storage.
    pub rejoining: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    /// Claims and scheduled releases of transactions not settled yet, in this node's state.
    pub claims_in_flight: AtomicU64,
    /// Messages staged by transactions not settled yet, in this node's state.
    pub staged_messages: AtomicU64,
    pub leader_changes: AtomicU64,
    pub proposals: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_latency: Histogram,
    pub batch_entries: Histogram,
    pub request_latency: Vec<Histogram>,
    pub refused_frames: AtomicU64,
}

impl Metrics {
    pub fn new(node_id: u64) -> Arc<Metrics> {
        Arc::new(Metrics {
            node_id,
            term: AtomicU64::new(0),
            role: AtomicU64::new(0),
            rejoining: AtomicU64::new(0),
            commit_index: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            claims_in_flight: AtomicU64::new(0),
            staged_messages: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            proposals: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_latency: Histogram::new(&LATENCY_BUCKETS),
            batch_entries: Histogram::new(&BATCH_BUCKETS),
            request_latency: OPERATIONS.iter().map(|_| Histogram::new(&LATENCY_BUCKETS)).collect(),
            refused_frames: AtomicU64::new(0),
        })
    }

    /// Latency histogram of one operation (see [`OPERATIONS`]).
    pub fn request(&self, operation: &str) -> &Histogram {
        let i = OPERATIONS.iter().position(|o| *o == operation).unwrap_or(OPERATIONS.len() - 1);
        &self.request_latency[i]
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauges = [
            ("tob_term", "Current Raft term.", "gauge", self.term.load(Relaxed)),
            (
                "tob_role",
                "0 follower, 1 pre-candidate, 2 candidate, 3 leader.",
                "gauge",
                self.role.load(Relaxed),
            ),
            (
                "tob_rejoining",
                "1 while this node, started without its storage, may not vote yet.",
                "gauge",
                self.rejoining.load(Relaxed),
            ),
            (
                "tob_claims_in_flight",
                "Claims pending or prepared and releases scheduled by transactions not settled yet.",
                "gauge",
                self.claims_in_flight.load(Relaxed),
            ),
            (
                "tob_staged_messages",
                "Messages staged by transactions not settled yet (tob_append_on_commit).",
                "gauge",
                self.staged_messages.load(Relaxed),
            ),
            (
                "tob_commit_index",
                "Highest log index known committed.",
                "gauge",
                self.commit_index.load(Relaxed),
            ),
            (
                "tob_applied_index",
                "Highest log index applied here.",
                "gauge",
                self.applied_index.load(Relaxed),
            ),
            (
                "tob_leader_changes_total",
                "Times the known leader changed.",
                "counter",
                self.leader_changes.load(Relaxed),
            ),
            (
                "tob_proposals_total",
                "Entries proposed by this node as leader.",
                "counter",
                self.proposals.load(Relaxed),
            ),
            (
                "tob_fsyncs_total",
                "Group commits made durable.",
                "counter",
                self.fsyncs.load(Relaxed),
            ),
            (
                "tob_refused_frames_total",
                "Connections closed for bad frames.",
                "counter",
                self.refused_frames.load(Relaxed),
            ),
        ];
        for (name, help, kind, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(out, "# HELP tob_fsync_latency_seconds Time of one group commit's fsync.");
        let _ = writeln!(out, "# TYPE tob_fsync_latency_seconds histogram");
        self.fsync_latency.render(&mut out, "tob_fsync_latency_seconds", "");
        let _ = writeln!(out, "# HELP tob_batch_entries Entries made durable by one group commit.");
        let _ = writeln!(out, "# TYPE tob_batch_entries histogram");
        self.batch_entries.render(&mut out, "tob_batch_entries", "");
        let _ = writeln!(
            out,
            "# HELP tob_request_latency_seconds Client request latency at the leader."
        );
        let _ = writeln!(out, "# TYPE tob_request_latency_seconds histogram");
        for (operation, histogram) in OPERATIONS.iter().zip(&self.request_latency) {
            histogram.render(
                &mut out,
                "tob_request_latency_seconds",
                &format!("operation=\"{operation}\""),
            );
        }
        out
    }
}

/// Serves `GET /metrics` forever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        actix::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            // Read the request head, bounded in size and time.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            });
            if read.await.is_err() {
                return;
            }
            let response = if request.starts_with(b"GET /metrics") {
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
