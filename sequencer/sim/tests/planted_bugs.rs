//! Teeth: each planted bug must be caught by the simulator within a bounded number of seeds —
//! in the client history itself, re-read from JSON Lines, so that a checker that sees only the
//! history (not the simulator's insides) rejects it too — and the catching seed must pass every
//! checker without the bug.
#![cfg(feature = "planted-bugs")]

use tob_sim::checkers::check_history;
use tob_sim::history::History;
use tob_sim::{PLANTED_BUGS, SimConfig, plant_bug, run};

fn history_rejected(report: &tob_sim::Report) -> bool {
    let reread = History::from_jsonl(&report.history.to_jsonl()).expect("history parses");
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    !check_history(&reread, &nodes).is_empty()
}

fn caught_and_clean_without_it(bug: &str, bound: u64) {
    let seed = (0..bound)
        .find(|&seed| {
            let mut config = SimConfig::new(seed);
            plant_bug(&mut config, bug).unwrap();
            let report = run(config);
            !report.violations.is_empty() && history_rejected(&report)
        })
        .unwrap_or_else(|| panic!("planted bug {bug}: no rejected history within {bound} seeds"));
    let report = run(SimConfig::new(seed));
    assert!(
        report.violations.is_empty(),
        "seed {seed} fails even without {bug}: {:?}",
        report.violations
    );
    assert!(!history_rejected(&report));
}

#[test]
fn vote_without_log_check_is_caught() {
    caught_and_clean_without_it("vote-without-log-check", 20);
}

#[test]
fn append_without_prev_check_is_caught() {
    caught_and_clean_without_it("append-without-prev-check", 30);
}

#[test]
fn read_without_quorum_is_caught() {
    caught_and_clean_without_it("read-without-quorum", 300);
}

#[test]
fn apply_retries_twice_is_caught() {
    caught_and_clean_without_it("apply-retries-twice", 10);
}

/// This one shows in the simulator's own checks, not in the history, where a claim refused as
/// `unknown_namespace` is a legitimate `fail`: replicas' states differ at the same index, and a
/// client whose namespace was acknowledged is told it does not exist.
#[test]
fn forget_namespaces_on_restore_is_caught() {
    let bug = "forget-namespaces-on-restore";
    let seed = (0..10)
        .find(|&seed| {
            let mut config = SimConfig::new(seed);
            plant_bug(&mut config, bug).unwrap();
            let violations = run(config).violations;
            violations.iter().any(|v| v.message.contains("differs between"))
                && violations
                    .iter()
                    .any(|v| v.message.contains("namespace created earlier is gone"))
        })
        .unwrap_or_else(|| panic!("planted bug {bug}: not caught within 10 seeds"));
    let report = run(SimConfig::new(seed));
    assert!(report.violations.is_empty(), "seed {seed} fails without {bug}");
}

/// A node whose disk was wiped votes at once: the nemesis's lost-disk scenario (one follower
/// lagging, the other wiped, the leader down) then elects the lagging node, which lacks
/// committed entries — acknowledged appends, claims and counter values are lost.
#[test]
fn forget_lost_storage_is_caught() {
    caught_and_clean_without_it("forget-lost-storage", 60);
}

#[test]
fn every_listed_bug_has_a_test_and_unknown_names_are_refused() {
    let names: Vec<&str> = PLANTED_BUGS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "vote-without-log-check",
            "read-without-quorum",
            "append-without-prev-check",
            "forget-lost-storage",
            "apply-retries-twice",
            "forget-namespaces-on-restore"
        ]
    );
    let mut config = SimConfig::new(0);
    assert!(plant_bug(&mut config, "no-such-bug").is_err());
}
