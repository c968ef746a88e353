//! Log matching: if two logs hold an entry with the same index and term, they are identical in
//! every entry up to that index.

use std::collections::BTreeMap;

use super::{EntrySummary, Violation, violation};

/// Compares every pair of logs. Each log lists the entries a node holds, in index order
/// (a compacted prefix is simply absent).
pub fn check(logs: &[(u64, Vec<EntrySummary>)]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (i, (node_a, log_a)) in logs.iter().enumerate() {
        let by_index: BTreeMap<u64, &EntrySummary> = log_a.iter().map(|e| (e.index, e)).collect();
        for (node_b, log_b) in &logs[i + 1..] {
            // The highest index at which both hold the same term...
            let Some(agree) = log_b
                .iter()
                .rev()
                .find(|b| by_index.get(&b.index).is_some_and(|a| a.term == b.term))
            else {
                continue;
            };
            // ...implies identical entries at and below it.
            for b in log_b.iter().take_while(|b| b.index <= agree.index) {
                if let Some(a) = by_index.get(&b.index)
                    && *a != b
                {
                    out.push(violation(
                            "log_matching",
                            format!(
                                "n{node_a} and n{node_b} agree at index {} term {} but differ at index {}",
                                agree.index, agree.term, b.index
                            ),
                        ));
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64, digest: u64) -> EntrySummary {
        EntrySummary { index, term, digest }
    }

    #[test]
    fn divergent_prefix_is_caught() {
        let good_a = vec![e(1, 1, 10), e(2, 1, 11), e(3, 2, 12)];
        let good_b = vec![e(1, 1, 10), e(2, 1, 11), e(3, 3, 99)];
        assert!(check(&[(1, good_a.clone()), (2, good_b)]).is_empty());
        let bad_b = vec![e(1, 1, 10), e(2, 2, 77), e(3, 2, 12)];
        assert_eq!(check(&[(1, good_a.clone()), (2, bad_b)]).len(), 1);
        let bad_digest = vec![e(1, 1, 66), e(2, 1, 11)];
        assert_eq!(check(&[(1, good_a), (2, bad_digest)]).len(), 1);
    }
}
