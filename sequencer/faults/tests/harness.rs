//! The fault harness against real `tob-sequencer` processes: a short random schedule passes,
//! and the same harness catches a bug planted in the real binary.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tob_faults::{RunConfig, run};
use tob_sim::checkers::check_history;
use tob_sim::history::History;

/// The sequencer built with the `planted-bugs` feature (bugs stay off unless asked for).
fn sequencer() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "tob-server", "--bin", "tob-sequencer", "--features", "planted-bugs"])
        .status()
        .unwrap();
    assert!(status.success());
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("tob-sequencer")
}

fn config(name: &str, seconds: u64, seed: u64, flags: &[&str]) -> RunConfig {
    let out = std::env::temp_dir().join(format!("tob-faults-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    RunConfig {
        sequencer: sequencer(),
        out,
        duration: Duration::from_secs(seconds),
        seed,
        workload: "mixed".into(),
        schedule: None,
        nodes: 3,
        sequencer_flags: flags.iter().map(|f| f.to_string()).collect(),
        think: Duration::from_millis(1),
    }
}

fn reread(config: &RunConfig) -> History {
    History::from_jsonl(&std::fs::read_to_string(config.out.join("history.jsonl")).unwrap())
        .unwrap()
}

#[test]
fn a_short_random_schedule_passes_every_check() {
    let config = config("clean", 45, 11, &[]);
    let summary = run(&config).unwrap();
    assert!(summary.anomalies.is_empty(), "{:#}", summary.json);
    let faults = summary.json["faults"].as_object().unwrap();
    assert!(faults.values().map(|v| v.as_u64().unwrap()).sum::<u64>() >= 8, "{faults:?}");
    for f in ["append", "claim", "release", "read", "next"] {
        let ok = summary.json["operations_by_f"][f]["ok"].as_u64().unwrap_or(0);
        assert!(ok > 100, "{f}: only {ok} ok");
    }
    assert!(summary.json["deliveries"].as_u64().unwrap() > 0);
    // The files on disk say the same to an independent reading.
    let history = reread(&config);
    assert!(check_history(&history, &["n1".into(), "n2".into(), "n3".into()]).is_empty());
    assert!(config.out.join("nemesis.log").exists() && config.out.join("summary.json").exists());
    let _ = std::fs::remove_dir_all(&config.out);
}

/// A node that applies a retried request again instead of answering it from the
/// de-duplication table: leader kills and pauses make clients retry, and the history shows
/// the same append delivered twice or a counter skipping values.
#[test]
fn a_planted_bug_in_the_real_binary_is_caught() {
    let config = config("planted", 30, 11, &["--planted-bug", "apply-retries-twice"]);
    let summary = run(&config).unwrap();
    assert!(!summary.anomalies.is_empty(), "the planted bug went unnoticed: {:#}", summary.json);
    let history = reread(&config);
    let violations = check_history(&history, &["n1".into(), "n2".into(), "n3".into()]);
    assert!(!violations.is_empty(), "the recorded history alone shows it");
    println!("caught: {}", violations[0]);
    let _ = std::fs::remove_dir_all(&config.out);
}

#[test]
fn leader_targeted_faults_hit_whichever_node_leads() {
    use tob_faults::cluster::Cluster;
    use tob_faults::nemesis::{Action, LEADER};
    let dir = std::env::temp_dir().join(format!("tob-faults-test-{}-leader", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster::start(&sequencer(), &dir, 3, &[]).unwrap();
    let until = |what: &str, check: &mut dyn FnMut(&Cluster) -> bool, cluster: &Cluster| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !check(cluster) {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("a first leader", &mut |c| c.leader().is_some(), &cluster);
    let first = cluster.leader().unwrap();
    tob_faults::apply(&mut cluster, &Action::Isolate(LEADER)).unwrap();
    // Cut off from its peers, the old leader is replaced by one of the others.
    until("a new leader", &mut |c| c.leader().is_some_and(|l| l != first), &cluster);
    tob_faults::apply(&mut cluster, &Action::Heal).unwrap();
    let second = cluster.leader().unwrap();
    tob_faults::apply(&mut cluster, &Action::Kill(LEADER)).unwrap();
    assert!(!cluster.is_running(second), "the leader at the time was killed");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_that_cannot_start_fails_the_cluster_start_with_its_log() {
    use tob_faults::cluster::Cluster;
    let dir = std::env::temp_dir().join(format!("tob-faults-test-{}-nostart", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Every node refuses this flag and exits at once: each attempt fails, then the start does,
    // where a lost port used to surface only as a cluster that never elects a leader.
    let flags = ["--messages-retained".to_string(), "0".to_string()];
    let error = match Cluster::start(&sequencer(), &dir, 3, &flags) {
        Ok(_) => panic!("a cluster of nodes that cannot start started"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("exited at start"), "{error}");
    let log = std::fs::read_to_string(dir.join("nodes.log")).unwrap();
    assert_eq!(log.matches("starting the cluster again").count(), 2, "{log}");
    assert!(log.contains("messages_retained must be at least 1"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
