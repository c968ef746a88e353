//! Checkers. Each safety property has its own module with unit tests on histories or
//! observations that are known to be wrong: a check that cannot fail is a defect.
//!
//! Protocol checkers (`election_safety`, `log_matching`, `leader_completeness`,
//! `state_machine_safety`) are fed observations by the simulator while it runs. History
//! checkers (`total_order`, `linearizability`, `fencing`, `counters`, and for the PostgreSQL
//! workloads `unique_rows` and `fenced_writes`) read only the client history, so they can also
//! check a history file recorded elsewhere (`tob-sim check FILE`). `outbox` reads the history
//! and the messages a run left in the total order.

pub mod counters;
pub mod election_safety;
pub mod fenced_writes;
pub mod fencing;
pub mod leader_completeness;
pub mod linearizability;
pub mod log_matching;
pub mod outbox;
pub mod state_machine_safety;
pub mod total_order;
pub mod unique_rows;

use crate::history::History;

/// A broken guarantee, named by the checker that found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub checker: &'static str,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.checker, self.message)
    }
}

pub(crate) fn violation(checker: &'static str, message: impl Into<String>) -> Violation {
    Violation { checker, message: message.into() }
}

/// Real-time order of tokens: for operations given as `(invoke, complete, token)`, every
/// `(token, newer)` where an operation returning `token` was invoked after one returning the
/// larger `newer` had completed.
pub(crate) fn tokens_gone_backwards(ops: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
    let mut by_invoke: Vec<(u64, u64)> = ops.iter().map(|&(i, _, t)| (i, t)).collect();
    by_invoke.sort_unstable();
    let mut by_complete: Vec<(u64, u64)> = ops.iter().map(|&(_, c, t)| (c, t)).collect();
    by_complete.sort_unstable();
    let (mut done, mut newest) = (0, 0);
    let mut out = Vec::new();
    for (invoke, token) in by_invoke {
        while done < by_complete.len() && by_complete[done].0 < invoke {
            newest = newest.max(by_complete[done].1);
            done += 1;
        }
        if token < newest {
            out.push((token, newest));
        }
    }
    out
}

/// Identifies a log entry's contents without keeping them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntrySummary {
    pub index: u64,
    pub term: u64,
    pub digest: u64,
}

/// Runs every history checker. `final_nodes` lists the nodes that must have delivered every
/// acknowledged append by the end (all of them after a heal phase).
pub fn check_history(history: &History, final_nodes: &[String]) -> Vec<Violation> {
    let ops = match history.operations() {
        Ok(ops) => ops,
        Err(e) => return vec![violation("history", e)],
    };
    let mut out = Vec::new();
    out.extend(total_order::check(history, &ops, final_nodes));
    out.extend(linearizability::check(&ops));
    out.extend(fencing::check(&ops));
    out.extend(counters::check(&ops));
    out.extend(unique_rows::check(&ops));
    out.extend(fenced_writes::check(&ops));
    out
}

/// FNV-1a, used for digests and the trace hash (stable across platforms and runs).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn of(bytes: &[u8]) -> u64 {
        let mut h = Fnv::default();
        h.bytes(bytes);
        h.0
    }
}

/// Histories of the PostgreSQL workloads for the checkers' tests: complete operations.
#[cfg(test)]
pub(crate) mod sql_history {
    use serde_json::{Value, json};

    use crate::history::{Event, History, Operation};

    #[derive(Default)]
    pub(crate) struct H(pub(crate) History);

    /// The invoke value of a statement in database `db`.
    pub(crate) fn db(db: &str) -> Value {
        json!({"database": db})
    }

    impl H {
        /// Process `p`'s `f` of `name`, invoked with `invoke` at `t.0`, ended `end` at `t.1`.
        pub(crate) fn op(
            mut self,
            p: u64,
            f: &str,
            name: &str,
            invoke: Value,
            t: (u64, u64),
            end: (&str, Value),
        ) -> H {
            self.0.push(Event::op(p, "invoke", f, json!(name), invoke, t.0));
            self.0.push(Event::op(p, end.0, f, json!(name), end.1, t.1));
            self.0.sort();
            self
        }

        pub(crate) fn insert(self, p: u64, name: &str, invoke: Value, t: (u64, u64)) -> H {
            self.op(p, "insert", name, invoke, t, ("ok", json!({"result": "inserted"})))
        }

        pub(crate) fn delete(self, p: u64, name: &str, db: &str, t: (u64, u64), rows: u64) -> H {
            self.op(p, "delete", name, self::db(db), t, ("ok", json!({"rows": rows})))
        }

        pub(crate) fn ops(&self) -> Vec<Operation> {
            self.0.operations().unwrap()
        }
    }
}
