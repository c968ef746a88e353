//! The simulator against the real core and state machine: many seeds must pass every checker,
//! a seed must replay exactly, and histories must survive a round trip through JSON Lines.

use tob_sim::checkers::check_history;
use tob_sim::history::History;
use tob_sim::{SimConfig, run};

fn assert_seeds_pass(seeds: std::ops::Range<u64>, nodes: usize) {
    for seed in seeds {
        let mut config = SimConfig::new(seed);
        config.nodes = nodes;
        let report = run(config);
        assert!(
            report.violations.is_empty(),
            "seed {seed} ({nodes} nodes) failed; replay with `tob-sim --seed {seed} --nodes {nodes} --verbose`:\n{}",
            report.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
        );
        assert!(report.stats.ops_ok > 100, "seed {seed}: too little progress: {:?}", report.stats);
    }
}

#[test]
fn three_node_seeds_pass_every_checker() {
    assert_seeds_pass(0..400, 3);
}

#[test]
fn five_node_seeds_pass_every_checker() {
    assert_seeds_pass(10_000..10_150, 5);
}

#[test]
fn a_seed_replays_to_the_same_trace_hash() {
    let a = run(SimConfig::new(77));
    let b = run(SimConfig::new(77));
    let c = run(SimConfig::new(78));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.history.to_jsonl(), b.history.to_jsonl());
    assert_ne!(a.trace_hash, c.trace_hash, "different seeds should differ");
}

#[test]
fn runs_exercise_the_faults_they_claim() {
    // Over a handful of seeds the nemesis must really crash, partition, elect, compact and
    // give up on operations; otherwise the passing seeds above would prove little.
    let mut totals = tob_sim::Stats::default();
    for seed in 0..20 {
        let s = run(SimConfig::new(seed)).stats;
        totals.crashes += s.crashes;
        totals.partitions += s.partitions;
        totals.elections += s.elections;
        totals.snapshots_installed += s.snapshots_installed;
        totals.ops_info += s.ops_info;
        totals.ops_fail += s.ops_fail;
    }
    assert!(totals.crashes > 10, "{totals:?}");
    assert!(totals.partitions > 40, "{totals:?}");
    assert!(totals.elections > 40, "{totals:?}");
    assert!(totals.snapshots_installed > 5, "{totals:?}");
    assert!(totals.ops_info > 10, "{totals:?}");
}

#[test]
fn written_history_is_well_formed_and_rechecks_clean() {
    let report = run(SimConfig::new(5));
    let text = report.history.to_jsonl();
    let mut fs = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert!(v["time"].is_u64(), "integer time: {line}");
        match v["type"].as_str().unwrap() {
            "invoke" | "ok" | "fail" | "info" => {
                assert!(
                    v["process"].is_u64() && v["f"].is_string() && v.get("key").is_some(),
                    "{line}"
                );
                fs.insert(v["f"].as_str().unwrap().to_owned());
            }
            "deliver" => assert!(v["node"].is_string() && v["seq"].is_u64() && v["id"].is_string()),
            "deliver_start" => assert!(v["node"].is_string() && v["seq"].is_u64()),
            other => panic!("unexpected type {other}"),
        }
    }
    for f in ["append", "claim", "release", "read", "next"] {
        assert!(fs.contains(f), "history has no {f}");
    }
    let reread = History::from_jsonl(&text).unwrap();
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    assert_eq!(check_history(&reread, &nodes), vec![]);
}

#[test]
fn a_tampered_history_is_rejected() {
    // Take a real history and make one acknowledged claim of a taken key succeed as well.
    let report = run(SimConfig::new(6));
    let mut history = report.history;
    let event = history
        .events
        .iter_mut()
        .find(|e| {
            e.kind == "ok"
                && e.f.as_deref() == Some("claim")
                && e.value.as_ref().unwrap()["result"] == "taken"
        })
        .expect("a contended claim");
    event.value = Some(serde_json::json!({"result": "claimed", "token": 1_000_000}));
    let violations = check_history(&history, &[]);
    assert!(violations.iter().any(|v| v.checker == "linearizability"), "{violations:?}");
}
