//! Jepsen-style fault testing of real clusters: `tob-sequencer` processes on loopback with a
//! fault-injecting proxy on every peer link ([`proxy`]), process faults ([`cluster`]), a
//! seeded or scripted nemesis ([`nemesis`]), clients that record a history ([`workload`];
//! through PostgreSQL servers with the extension in [`sql`], on throwaway [`pg`]
//! servers), and the project's history checkers (from `tob-sim`) plus a final heal phase that
//! requires every operation to complete, every follower to deliver every acknowledged message
//! and the PostgreSQL end state to be exact.

pub mod cluster;
pub mod nemesis;
pub mod pg;
pub mod ports;
pub mod proxy;
pub mod sql;
pub mod workload;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use cluster::Cluster;
use nemesis::Action;
use workload::Recorder;

/// What to run.
pub struct RunConfig {
    pub sequencer: PathBuf,
    pub out: PathBuf,
    pub duration: Duration,
    pub seed: u64,
    /// `mixed` (claims, appends and a counter), `claims`, `appends` or `counter` against the
    /// cluster; `usernames` or `fencing` through PostgreSQL (see [`sql`]).
    pub workload: String,
    /// A schedule file's steps, or `None` for a random schedule from the seed.
    pub schedule: Option<Vec<(Duration, Action)>>,
    pub nodes: usize,
    /// Extra `tob-sequencer` flags for every node (e.g. `--planted-bug NAME`).
    pub sequencer_flags: Vec<String>,
    /// Mean pause of each client between operations.
    pub think: Duration,
}

/// What happened, as written to `summary.json`.
pub struct Summary {
    pub json: serde_json::Value,
    pub anomalies: Vec<String>,
}

pub fn run(config: &RunConfig) -> std::io::Result<Summary> {
    std::fs::create_dir_all(&config.out)?;
    let data = config.out.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let mut cluster =
        Cluster::start(&config.sequencer, &data, config.nodes, &config.sequencer_flags)?;
    let addresses = cluster.client_addresses();
    let recorder = Arc::new(Recorder::new());
    let stop_workers = Arc::new(AtomicBool::new(false));
    let stop_followers = Arc::new(AtomicBool::new(false));

    let sql_run = if sql::is_sql_workload(&config.workload) {
        let (seed, duration, think) = (config.seed, config.duration, config.think);
        Some(sql::SqlRun::start(
            &config.workload,
            &addresses,
            seed,
            duration,
            think,
            recorder.clone(),
        )?)
    } else {
        None
    };
    let mut followers = Vec::new();
    // The PostgreSQL workloads append nothing: no followers.
    let follow: &[String] = if sql_run.is_some() { &[] } else { &addresses };
    for (i, address) in follow.iter().enumerate() {
        let (node, address) = (cluster.name(i), address.clone());
        let (recorder, stop) = (recorder.clone(), stop_followers.clone());
        followers
            .push(std::thread::spawn(move || workload::follower(node, address, recorder, stop)));
    }
    let kinds: &[&'static str] = match config.workload.as_str() {
        "claims" => &["claims", "claims", "claims", "claims"],
        "appends" => &["appends", "appends", "appends"],
        "counter" => &["counter", "counter"],
        "usernames" | "fencing" => &[],
        _ => &["claims", "claims", "claims", "appends", "appends", "counter"],
    };
    let mut workers = Vec::new();
    for (process, kind) in kinds.iter().enumerate() {
        let (nodes, recorder, stop) = (addresses.clone(), recorder.clone(), stop_workers.clone());
        let (seed, think) = (config.seed, config.think);
        workers.push(std::thread::spawn(move || {
            workload::worker(process as u64, kind, nodes, seed, think, recorder, stop)
        }));
    }

    // The nemesis.
    let schedule = config
        .schedule
        .clone()
        .unwrap_or_else(|| nemesis::random_schedule(config.seed, config.duration, config.nodes));
    let mut log = std::fs::File::create(config.out.join("nemesis.log"))?;
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let started = Instant::now();
    for (at, action) in &schedule {
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        if action.kind() != "heal" && action.kind() != "resume" && action.kind() != "restart" {
            *faults.entry(action.kind()).or_default() += 1;
        }
        // In the schedule-file format, so a run's log can be replayed with --schedule.
        writeln!(log, "{} {action}", started.elapsed().as_millis())?;
        apply(&mut cluster, action)?;
    }
    // Heal, then every operation must complete and every follower catch up.
    cluster.heal()?;
    writeln!(
        log,
        "# {} final heal; then every operation completes",
        started.elapsed().as_millis()
    )?;
    std::thread::sleep(Duration::from_secs(2));
    stop_workers.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let ending = match sql_run {
        Some(sql_run) => Some(sql_run.finish()?),
        None => None,
    };
    let target = recorder.highest_acked_seq.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !all_delivered(&recorder, cluster.size(), target) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_followers.store(true, Ordering::Relaxed);
    for f in followers {
        let _ = f.join();
    }
    drop(cluster);

    let history = recorder.take();
    std::fs::write(config.out.join("history.jsonl"), history.to_jsonl())?;
    let names: Vec<String> = (1..=config.nodes).map(|i| format!("n{i}")).collect();
    let mut anomalies: Vec<String> =
        tob_sim::checkers::check_history(&history, &names).iter().map(|v| v.to_string()).collect();
    if let Some(ending) = &ending {
        anomalies.extend(ending.anomalies.iter().cloned());
    }
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_f: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for event in &history.events {
        if event.kind == "invoke" || event.process.is_none() {
            continue;
        }
        *by_outcome.entry(event.kind.clone()).or_default() += 1;
        let f = event.f.clone().unwrap_or_default();
        *by_f.entry(f).or_default().entry(event.kind.clone()).or_default() += 1;
    }
    let deliveries = history.events.iter().filter(|e| e.kind == "deliver").count();
    let json = json!({
        "seed": config.seed,
        "duration_s": config.duration.as_secs_f64(),
        "workload": config.workload,
        "nodes": config.nodes,
        "sequencer_flags": config.sequencer_flags,
        "think_ms": config.think.as_millis() as u64,
        "operations": by_outcome,
        "operations_by_f": by_f,
        "deliveries": deliveries,
        "highest_acknowledged_seq": target,
        "faults": faults,
        "anomalies": anomalies,
        "postgres": ending.map(|e| e.facts),
        "history": "history.jsonl",
        "nemesis_log": "nemesis.log",
    });
    std::fs::write(config.out.join("summary.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(Summary { json, anomalies })
}

fn all_delivered(recorder: &Recorder, nodes: usize, target: u64) -> bool {
    recorder.delivered_up_to(nodes).iter().all(|&d| d >= target)
}

/// Applies one nemesis step to the cluster.
pub fn apply(cluster: &mut Cluster, action: &Action) -> std::io::Result<()> {
    let size = cluster.size();
    // `leader` resolves now; with no leader (mid-election) the fault hits node 0.
    let leader = if matches!(
        action,
        Action::Kill(nemesis::LEADER)
            | Action::Pause(nemesis::LEADER)
            | Action::Isolate(nemesis::LEADER)
    ) {
        cluster.leader().unwrap_or(0)
    } else {
        0
    };
    let node = |n: usize| if n == nemesis::LEADER { leader } else { n % size };
    match action {
        Action::Kill(n) => cluster.kill(node(*n)),
        Action::Wipe(n) => cluster.wipe(node(*n))?,
        Action::Restart(n) => cluster.restart(node(*n))?,
        Action::Pause(n) => cluster.pause(node(*n)),
        Action::Resume(n) => cluster.resume(node(*n)),
        Action::Isolate(n) => cluster.isolate(node(*n)),
        Action::Cut(a, b) => cluster.cut(node(*a), node(*b)),
        Action::CutClients(n) => cluster.cut_clients(node(*n)),
        Action::Bridge(n) => cluster.bridge(node(*n)),
        Action::Partition(side) => {
            cluster.partition(&side.iter().map(|n| node(*n)).collect::<Vec<_>>())
        }
        Action::Delay(ms) => cluster.delay_all(Duration::from_millis(*ms)),
        Action::Reset => cluster.reset_all(),
        Action::RestartAll => {
            for i in 0..size {
                cluster.kill(i);
            }
            for i in 0..size {
                cluster.restart(i)?;
            }
        }
        Action::Skew(n, tick_ms) => {
            cluster.restart_with(node(*n), vec!["--tick-ms".into(), tick_ms.to_string()])?
        }
        Action::Heal => cluster.heal()?,
    }
    Ok(())
}

/// The `tob-sequencer` next to this executable (target/<profile>/), as cargo builds it.
pub fn default_sequencer() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = dir.join("tob-sequencer");
    if beside.exists() {
        beside
    } else {
        dir.parent().map(|p| p.join("tob-sequencer")).unwrap_or(beside)
    }
}
