//! A deterministic simulator of a tob cluster.
//!
//! Many nodes of the real consensus core and state machine run in one thread against a
//! simulated network, disk and clock, driven by one seeded generator: the same seed replays
//! the same run exactly. Faults are injected by a nemesis; clients record a Jepsen-style
//! history; checkers look for broken guarantees.

pub mod checkers;
pub mod history;
