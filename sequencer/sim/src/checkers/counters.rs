//! Counters (`next`): gap-free and linearizable increment-and-get. Acknowledged values are
//! unique; values only grow in real time; and no value is skipped — the highest value seen is
//! at most the number of increments that were acknowledged or may have happened.

use std::collections::BTreeMap;

use serde_json::Value;

use super::total_order::real_time_order;
use super::{Violation, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "counters";

pub fn check(ops: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_counter: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.f == "next" && op.outcome != Outcome::Fail) {
        by_counter.entry(op.key.as_deref().unwrap_or("")).or_default().push(op);
    }
    for (counter, ops) in by_counter {
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        let mut valued = Vec::new();
        for op in ops.iter().filter(|op| op.outcome == Outcome::Ok) {
            let Some(value) = op.result.get("value").and_then(Value::as_u64) else {
                out.push(violation(
                    NAME,
                    format!("next on {counter} by process {} has no value", op.process),
                ));
                continue;
            };
            if let Some(other) = seen.insert(value, op.process) {
                out.push(violation(
                    NAME,
                    format!(
                        "{counter}: value {value} returned to processes {other} and {}",
                        op.process
                    ),
                ));
            }
            if value == 0 {
                out.push(violation(NAME, format!("{counter}: value 0 returned")));
            }
            valued.push((*op, value));
        }
        let possible = ops.len() as u64;
        if let Some((&max, _)) = seen.iter().next_back()
            && max > possible
        {
            out.push(violation(
                    NAME,
                    format!("{counter}: value {max} seen but only {possible} increments could have happened (a gap)"),
                ));
        }
        out.extend(real_time_order(NAME, &valued, &format!("next on {counter}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, History};
    use serde_json::json;

    fn next(h: &mut History, p: u64, t0: u64, t1: u64, value: Option<u64>) {
        h.push(Event::op(p, "invoke", "next", json!("c"), Value::Null, t0));
        if let Some(v) = value {
            h.push(Event::op(p, "ok", "next", json!("c"), json!({"value": v}), t1));
        }
    }

    #[test]
    fn gapless_increasing_values_pass() {
        let mut h = History::default();
        next(&mut h, 1, 0, 1, Some(1));
        next(&mut h, 2, 2, 10, None); // took 2, answer lost
        next(&mut h, 1, 3, 4, Some(3));
        assert_eq!(check(&h.operations().unwrap()), vec![]);
    }

    #[test]
    fn duplicates_gaps_and_reordering_are_caught() {
        let mut dup = History::default();
        next(&mut dup, 1, 0, 1, Some(1));
        next(&mut dup, 2, 0, 2, Some(1));
        assert!(!check(&dup.operations().unwrap()).is_empty());
        let mut gap = History::default();
        next(&mut gap, 1, 0, 1, Some(1));
        next(&mut gap, 1, 2, 3, Some(3));
        assert!(!check(&gap.operations().unwrap()).is_empty());
        let mut backwards = History::default();
        next(&mut backwards, 1, 0, 1, Some(2));
        next(&mut backwards, 2, 2, 3, Some(1));
        assert!(!check(&backwards.operations().unwrap()).is_empty());
    }
}
