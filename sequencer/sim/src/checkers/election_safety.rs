//! Election safety: at most one leader per term.

use std::collections::BTreeMap;

use super::{Violation, violation};

#[derive(Debug, Default)]
pub struct ElectionSafety {
    leaders: BTreeMap<u64, u64>,
    pub violations: Vec<Violation>,
}

impl ElectionSafety {
    pub fn observe_leader(&mut self, term: u64, node: u64) {
        let first = *self.leaders.entry(term).or_insert(node);
        if first != node {
            self.violations.push(violation(
                "election_safety",
                format!("term {term} has two leaders: n{first} and n{node}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_leaders_in_one_term_are_caught() {
        let mut c = ElectionSafety::default();
        c.observe_leader(1, 1);
        c.observe_leader(1, 1);
        c.observe_leader(2, 2);
        assert!(c.violations.is_empty());
        c.observe_leader(2, 3);
        assert_eq!(c.violations.len(), 1);
    }
}
