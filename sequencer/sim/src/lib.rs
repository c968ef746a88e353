//! A deterministic simulator of a tob cluster.
//!
//! Many nodes of the real consensus core and state machine run in one thread against a
//! simulated network, disk and clock, driven by one seeded generator: the same seed replays
//! the same run exactly. Faults are injected by a nemesis; clients record a Jepsen-style
//! history; checkers look for broken guarantees.

pub mod checkers;
pub mod client;
pub mod disk;
pub mod history;
pub mod network;
pub mod node;
pub mod world;

pub use world::{Report, SimConfig, Stats, run};

/// The deliberately planted bugs, by the name `--bug` takes.
pub const PLANTED_BUGS: &[(&str, &str)] = &[
    ("vote-without-log-check", "grant votes without the log up-to-date check (§5.4.1)"),
    ("read-without-quorum", "answer ReadIndex reads without confirming leadership"),
    ("append-without-prev-check", "accept Appends whose previous entry has another term"),
    (
        "forget-lost-storage",
        "let a node whose disk was wiped vote at once, as if the cluster were new",
    ),
    (
        "apply-retries-twice",
        "apply a retried request again instead of answering from the dedup table",
    ),
    (
        "forget-namespaces-on-restore",
        "restore a snapshot without its declared namespaces (claims in them then fail)",
    ),
];

/// Switches on a planted bug by name. Without the `planted-bugs` feature the switches exist but
/// the code ignores them, so this refuses instead.
pub fn plant_bug(config: &mut SimConfig, name: &str) -> Result<(), String> {
    if !cfg!(feature = "planted-bugs") {
        return Err("this tob-sim was built without the `planted-bugs` feature".into());
    }
    match name {
        "vote-without-log-check" => config.bugs.vote_without_log_check = true,
        "read-without-quorum" => config.bugs.read_without_quorum = true,
        "append-without-prev-check" => config.bugs.append_without_prev_check = true,
        "forget-lost-storage" => config.bugs.forget_lost_storage = true,
        "apply-retries-twice" => config.machine_bugs.apply_retries_twice = true,
        "forget-namespaces-on-restore" => {
            config.machine_bugs.forget_namespaces_on_restore = true;
        }
        other => return Err(format!("unknown bug {other}; see --list-bugs")),
    }
    Ok(())
}
