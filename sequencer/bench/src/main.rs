//! `tob-bench`: measures a running cluster. A program that prints figures, not a test.
//!
//! `--concurrency N` runs N tasks sharing one async client: N requests in flight, pipelined on
//! one connection per node (as a busy application server would).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod etcd;

use clap::Parser;
use serde_json::json;
use tob_client::{AsyncClient, Client, ClientConfig};
use tob_proto::{Call, Outcome, ReadConsistency};

#[derive(Parser)]
#[command(name = "tob-bench", about = "Benchmark a tob cluster")]
struct Args {
    #[arg(long, env = "TOB_CLUSTER")]
    cluster: String,
    #[arg(long, env = "TOB_CLUSTER_ID", default_value_t = 1)]
    cluster_id: u64,
    /// append, claim, read or sync; all four when omitted.
    #[arg(long)]
    workload: Option<String>,
    /// Requests in flight; 1, 16, 64 and 256 when omitted.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// One JSON object per run.
    #[arg(long)]
    json: bool,
    /// Measure an etcd cluster instead (`--cluster` = its client host:port list): puts for
    /// append, create-if-absent transactions for claim, linearizable range reads for read and
    /// sync — for side-by-side figures on the same machine.
    #[arg(long)]
    etcd: bool,
}

fn main() {
    let args = Args::parse();
    let workloads: Vec<String> = match &args.workload {
        Some(w) => vec![w.clone()],
        None => ["append", "claim", "read", "sync"].iter().map(|s| s.to_string()).collect(),
    };
    for w in &workloads {
        if !["append", "claim", "read", "sync"].contains(&w.as_str()) {
            eprintln!("tob-bench: unknown workload {w} (append, claim, read, sync)");
            std::process::exit(2);
        }
    }
    let levels = args.concurrency.map(|c| vec![c]).unwrap_or_else(|| vec![1, 16, 64, 256]);
    let nodes: Vec<String> = args.cluster.split(',').map(|s| s.trim().to_owned()).collect();
    if !args.json {
        println!(
            "{:<8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>7} {:>14}",
            "workload", "conc", "ops/s", "p50 us", "p99 us", "p99.9 us", "errors", "fsync mean us"
        );
    }
    for workload in &workloads {
        for &concurrency in &levels {
            let duration = Duration::from_secs(args.duration);
            let (fsync_before, run, fsync_after) = if args.etcd {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                runtime.block_on(async {
                    let before = etcd::fsync_totals(&nodes).await;
                    let run = etcd::run(&nodes, workload, concurrency, duration).await;
                    (before, run, etcd::fsync_totals(&nodes).await)
                })
            } else {
                let before = fsync_totals(&nodes, args.cluster_id);
                let run = run(&nodes, args.cluster_id, workload, concurrency, duration);
                (before, run, fsync_totals(&nodes, args.cluster_id))
            };
            let fsync_mean_us = match (fsync_before, fsync_after) {
                (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => {
                    Some((s1 - s0) / (c1 - c0) as f64 * 1e6)
                }
                _ => None,
            };
            if args.json {
                println!(
                    "{}",
                    json!({"system": if args.etcd { "etcd" } else { "tob" },
                           "workload": workload, "concurrency": concurrency, "ops_per_s": run.ops_per_s,
                           "p50_us": run.p50_us, "p99_us": run.p99_us, "p999_us": run.p999_us,
                           "errors": run.errors, "fsync_mean_us": fsync_mean_us})
                );
            } else {
                println!(
                    "{:<8} {:>5} {:>10.0} {:>9} {:>9} {:>9} {:>7} {:>14}",
                    workload,
                    concurrency,
                    run.ops_per_s,
                    run.p50_us,
                    run.p99_us,
                    run.p999_us,
                    run.errors,
                    fsync_mean_us.map(|f| format!("{f:.0}")).unwrap_or("-".into())
                );
            }
        }
    }
}

struct RunResult {
    ops_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
}

impl RunResult {
    fn from_latencies(mut all: Vec<u64>, elapsed: Duration, errors: u64) -> RunResult {
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        RunResult {
            ops_per_s: all.len() as f64 / elapsed.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            errors,
        }
    }
}

fn run(
    nodes: &[String],
    cluster_id: u64,
    workload: &str,
    concurrency: usize,
    duration: Duration,
) -> RunResult {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run_async(nodes, cluster_id, workload, concurrency, duration))
}

/// `concurrency` tasks share one client, so their requests are pipelined on one connection.
async fn run_async(
    nodes: &[String],
    cluster_id: u64,
    workload: &str,
    concurrency: usize,
    duration: Duration,
) -> RunResult {
    let mut config = ClientConfig::new(nodes.to_vec(), cluster_id);
    config.request_timeout = Duration::from_secs(10);
    let client = AsyncClient::new(config);
    if workload == "claim"
        && let Err(e) = client.create_namespace("bench").await
    {
        eprintln!("tob-bench: could not create namespace \"bench\": {e}");
    }
    let Shared { stop, errors, last_claimed, run_id } = Shared::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (stop, errors, last_claimed, client) =
                (stop.clone(), errors.clone(), last_claimed.clone(), client.clone());
            let workload = workload.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let began = Instant::now();
                    let ok = match workload.as_str() {
                        "append" => client.append(Some("bench"), b"0123456789abcdef").await.is_ok(),
                        "claim" => {
                            let id = claim_id(&last_claimed, t, i);
                            let r = client
                                .claim("bench", &format!("{run_id}-{id}"), &format!("t{t}"))
                                .await;
                            if matches!(r, Ok(Outcome::Claimed { .. })) {
                                last_claimed.store(id, Ordering::Relaxed);
                            }
                            r.is_ok()
                        }
                        "read" => {
                            let key = tob_client::claim_key("bench", "hot");
                            client
                                .call(Call::Owner { key, consistency: ReadConsistency::Index })
                                .await
                                .is_ok()
                        }
                        _ => client.sync().await.is_ok(),
                    };
                    if ok {
                        latencies.push(began.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    RunResult::from_latencies(all, started.elapsed(), errors.load(Ordering::Relaxed))
}

/// What the tasks of one run share.
struct Shared {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    /// The last name a task claimed, so that other tasks can collide with it.
    last_claimed: Arc<AtomicU64>,
    /// Makes names unique across runs against the same cluster.
    run_id: u64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            stop: Arc::new(AtomicBool::new(false)),
            errors: Arc::new(AtomicU64::new(0)),
            last_claimed: Arc::new(AtomicU64::new(0)),
            run_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        }
    }
}

/// The name task `t` claims on its `i`th attempt: fresh, except that about one attempt in ten
/// goes for a name another task claimed just before.
fn claim_id(last_claimed: &AtomicU64, t: usize, i: u64) -> u64 {
    if i.is_multiple_of(10) { last_claimed.load(Ordering::Relaxed) } else { (t as u64) << 40 | i }
}

/// Sum (seconds) and count of fsyncs across the nodes, from their metrics endpoints.
fn fsync_totals(nodes: &[String], cluster_id: u64) -> Option<(f64, u64)> {
    let mut client = Client::new(ClientConfig::new(nodes.to_vec(), cluster_id));
    let (mut sum, mut count) = (0.0, 0);
    for i in 0..nodes.len() {
        let Ok(status) = client.status_of(i) else { continue };
        let mut stream = TcpStream::connect(&status.metrics_address).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).ok()?;
        let (s, c) = histogram_totals(&body, "tob_fsync_latency_seconds")?;
        sum += s;
        count += c;
    }
    Some((sum, count))
}

/// `_sum` and `_count` of a Prometheus histogram in a metrics page (tob's or etcd's).
fn histogram_totals(body: &str, name: &str) -> Option<(f64, u64)> {
    let (mut sum, mut count) = (0.0, 0);
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if let Some(v) = rest.strip_prefix("_sum ") {
            sum += v.parse::<f64>().ok()?;
        }
        if let Some(v) = rest.strip_prefix("_count ") {
            count += v.parse::<u64>().ok()?;
        }
    }
    Some((sum, count))
}
