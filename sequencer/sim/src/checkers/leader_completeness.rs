//! Leader completeness: a committed entry is in the log of every leader of a later term.

use std::collections::BTreeMap;

use super::{EntrySummary, Violation, violation};

#[derive(Debug, Default)]
pub struct LeaderCompleteness {
    committed: BTreeMap<u64, EntrySummary>,
    pub violations: Vec<Violation>,
}

impl LeaderCompleteness {
    /// An entry some node applied (so it was committed).
    pub fn observe_committed(&mut self, entry: EntrySummary) {
        self.committed.entry(entry.index).or_insert(entry);
    }

    /// A node became leader of `term`, holding `log` after a snapshot at `snapshot_index`.
    pub fn observe_new_leader(
        &mut self,
        node: u64,
        term: u64,
        snapshot_index: u64,
        log: &[EntrySummary],
    ) {
        let first = log.first().map(|e| e.index).unwrap_or(snapshot_index + 1);
        for (index, entry) in self.committed.range(snapshot_index + 1..) {
            let held = index.checked_sub(first).and_then(|i| log.get(i as usize));
            if held != Some(entry) {
                self.violations.push(violation(
                    "leader_completeness",
                    format!(
                        "n{node} became leader of term {term} without committed entry {index} (term {})",
                        entry.term
                    ),
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64) -> EntrySummary {
        EntrySummary { index, term, digest: index * 100 + term }
    }

    #[test]
    fn leader_missing_a_committed_entry_is_caught() {
        let mut c = LeaderCompleteness::default();
        c.observe_committed(e(1, 1));
        c.observe_committed(e(2, 1));
        c.observe_new_leader(2, 2, 0, &[e(1, 1), e(2, 1), e(3, 2)]);
        c.observe_new_leader(3, 3, 1, &[e(2, 1)]);
        assert!(c.violations.is_empty());
        c.observe_new_leader(1, 4, 0, &[e(1, 1), e(2, 3)]);
        c.observe_new_leader(1, 5, 0, &[e(1, 1)]);
        assert_eq!(c.violations.len(), 2);
    }
}
