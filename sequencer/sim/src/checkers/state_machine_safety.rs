//! State-machine safety: every replica applies the same entry at each index, and replicas at
//! the same applied index hold byte-identical state.

use std::collections::BTreeMap;

use super::{EntrySummary, Violation, violation};

#[derive(Debug, Default)]
pub struct StateMachineSafety {
    applied: BTreeMap<u64, (u64, EntrySummary)>,
    states: BTreeMap<u64, (u64, u64)>,
    pub violations: Vec<Violation>,
}

impl StateMachineSafety {
    pub fn observe_applied(&mut self, node: u64, entry: EntrySummary) {
        let (first_node, first) = *self.applied.entry(entry.index).or_insert((node, entry));
        if first != entry {
            self.violations.push(violation(
                "state_machine_safety",
                format!(
                    "index {}: n{first_node} applied term {} digest {:x}, n{node} applied term {} digest {:x}",
                    entry.index, first.term, first.digest, entry.term, entry.digest
                ),
            ));
        }
    }

    /// The hash of a replica's whole state (its snapshot bytes) at `applied_index`.
    pub fn observe_state(&mut self, node: u64, applied_index: u64, state_hash: u64) {
        let (first_node, first) = *self.states.entry(applied_index).or_insert((node, state_hash));
        if first != state_hash {
            self.violations.push(violation(
                "state_machine_safety",
                format!("state at index {applied_index} differs between n{first_node} and n{node}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_entries_or_states_at_one_index_are_caught() {
        let mut c = StateMachineSafety::default();
        let e = EntrySummary { index: 5, term: 2, digest: 1 };
        c.observe_applied(1, e);
        c.observe_applied(2, e);
        c.observe_state(1, 5, 42);
        c.observe_state(2, 5, 42);
        assert!(c.violations.is_empty());
        c.observe_applied(3, EntrySummary { digest: 2, ..e });
        c.observe_state(3, 5, 43);
        assert_eq!(c.violations.len(), 2);
    }
}
