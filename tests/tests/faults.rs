//! The PostgreSQL workloads under faults (issue 5), run exactly as `tob-faults run --workload
//! usernames|fencing` runs them: two PostgreSQL servers with the extension, a random nemesis
//! attacking the proxied sequencer nodes, PostgreSQL-side faults (a terminated backend and a
//! server stopped with `-m immediate`; a background worker paused past its lease), every
//! statement recorded in `history.jsonl` and checked, then the end state checked exactly.

use std::time::Duration;

use serde_json::Value;
use tob_e2e::{scratch_dir, sequencer_binary};
use tob_faults::{RunConfig, run};

fn config(workload: &str, seconds: u64, seed: u64) -> RunConfig {
    RunConfig {
        sequencer: sequencer_binary(),
        out: scratch_dir(workload),
        duration: Duration::from_secs(seconds),
        seed,
        workload: workload.into(),
        schedule: None,
        nodes: 3,
        sequencer_flags: Vec::new(),
        think: Duration::from_millis(5),
    }
}

/// How many `f` operations completed with `outcome`, from the summary.
fn count(summary: &Value, f: &str, outcome: &str) -> u64 {
    summary["operations_by_f"][f][outcome].as_u64().unwrap_or(0)
}

/// Runs `workload` like `tob-faults run` does; no checker may find an anomaly.
fn run_without_anomalies(workload: &str, seconds: u64, seed: u64) -> (RunConfig, Value) {
    let config = config(workload, seconds, seed);
    let summary = run(&config).unwrap();
    println!("{}", serde_json::to_string_pretty(&summary.json).unwrap());
    assert_eq!(summary.anomalies, Vec::<String>::new());
    (config, summary.json)
}

fn faults_named(summary: &Value, what: &str) -> usize {
    let faults = summary["postgres"]["postgres_faults"].as_array().cloned().unwrap_or_default();
    faults.iter().filter(|f| f["fault"].as_str().is_some_and(|s| s.starts_with(what))).count()
}

#[test]
fn usernames_stay_unique_and_claims_exact_under_faults() {
    let (config, json) = run_without_anomalies("usernames", 40, 5);
    let json = &json;
    assert!(count(json, "insert", "ok") > 100, "the workload got through");
    assert!(count(json, "insert", "fail") > 0, "names were contended (23505)");
    let bulk = &json["postgres"]["bulk_statements"];
    assert!(bulk["insert ok"].as_u64().unwrap_or(0) > 0, "bulk inserts got through: {bulk}");
    assert_eq!(faults_named(json, "terminate-backend (done)"), 1);
    assert_eq!(faults_named(json, "crash-immediate (restarted)"), 1);
    assert!(json["faults"].as_object().is_some_and(|f| !f.is_empty()), "the nemesis acted");
    // The history on disk is what was checked, one event a line.
    let history = std::fs::read_to_string(config.out.join("history.jsonl")).unwrap();
    assert!(history.lines().any(|l| l.contains("\"f\":\"insert\"")));
    let _ = std::fs::remove_dir_all(&config.out);
}

#[test]
fn fenced_writes_never_go_backwards_under_faults() {
    let (config, json) = run_without_anomalies("fencing", 30, 17);
    let json = &json;
    assert!(count(json, "fenced_write", "ok") > 20, "the workload got through");
    assert!(count(json, "lock", "ok") > 4, "locks changed hands");
    assert_eq!(faults_named(json, "pause-background-worker"), 3);
    // Every acknowledged fenced write is in the ledger, plus at most those of unknown outcome.
    let rows = json["postgres"]["ledger_rows"].as_u64().unwrap();
    let (ok, unknown) = (count(json, "fenced_write", "ok"), count(json, "fenced_write", "info"));
    assert!(ok <= rows && rows <= ok + unknown, "{rows} rows for {ok} (+{unknown}) writes");
    let _ = std::fs::remove_dir_all(&config.out);
}
