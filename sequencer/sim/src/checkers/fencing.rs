//! Fencing tokens: each token names one grant (one key, one owner), and a grant that was
//! acknowledged before another claim was invoked has a smaller token than anything that claim
//! returns as a new grant — across all keys, since tokens are log indexes. Locks taken with
//! `tob_lock` (operations `lock`, same values as `claim`) follow the same rule.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Violation, tokens_gone_backwards, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "fencing";

pub fn check(ops: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    // token -> (key, owner, earliest completion, earliest invocation)
    let mut grants: BTreeMap<u64, (&str, &str, u64, u64)> = BTreeMap::new();
    // A `tob_lock` is a claim too: the same tokens, from the same log.
    let is_grant = |op: &&Operation| op.f == "claim" || op.f == "lock";
    for op in ops.iter().filter(is_grant).filter(|op| op.outcome == Outcome::Ok) {
        if op.result.get("result").and_then(Value::as_str) != Some("claimed") {
            continue;
        }
        let (Some(token), Some(owner), Some(key)) = (
            op.result.get("token").and_then(Value::as_u64),
            op.invoke_value.get("owner").and_then(Value::as_str),
            op.key.as_deref(),
        ) else {
            out.push(violation(
                NAME,
                format!("claim by process {} lacks token, owner or key", op.process),
            ));
            continue;
        };
        let grant = grants.entry(token).or_insert((key, owner, op.complete_time, op.invoke_time));
        if (grant.0, grant.1) != (key, owner) {
            out.push(violation(
                NAME,
                format!(
                    "token {token} granted to {} on {} and to {owner} on {key}",
                    grant.1, grant.0
                ),
            ));
        }
        grant.2 = grant.2.min(op.complete_time);
        grant.3 = grant.3.min(op.invoke_time);
    }
    // Grant g happened before its earliest acknowledgement and after the invocation of the
    // claim that made it, which is no earlier than the earliest invocation returning g.
    let ops: Vec<(u64, u64, u64)> = grants.iter().map(|(t, g)| (g.3, g.2, *t)).collect();
    for (token, newer) in tokens_gone_backwards(&ops) {
        out.push(violation(
            NAME,
            format!("token {token} granted after token {newer} was already acknowledged"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, History};
    use serde_json::json;

    fn grant(h: &mut History, f: &str, p: u64, key: &str, owner: &str, t: (u64, u64), token: u64) {
        h.push(Event::op(p, "invoke", f, json!(key), json!({"owner": owner}), t.0));
        let value = json!({"result": "claimed", "token": token});
        h.push(Event::op(p, "ok", f, json!(key), value, t.1));
    }

    fn claim(h: &mut History, p: u64, key: &str, owner: &str, t0: u64, t1: u64, token: u64) {
        grant(h, "claim", p, key, owner, (t0, t1), token);
    }

    #[test]
    fn increasing_unique_tokens_pass() {
        let mut h = History::default();
        claim(&mut h, 1, "a", "u1", 0, 1, 3);
        claim(&mut h, 2, "b", "u2", 2, 3, 7);
        claim(&mut h, 1, "a", "u1", 4, 5, 3); // re-claim keeps its token
        assert_eq!(check(&h.operations().unwrap()), vec![]);
    }

    #[test]
    fn reused_or_decreasing_tokens_are_caught() {
        let mut reused = History::default();
        claim(&mut reused, 1, "a", "u1", 0, 1, 3);
        claim(&mut reused, 2, "b", "u2", 2, 3, 3);
        assert_eq!(check(&reused.operations().unwrap()).len(), 1);
        let mut decreasing = History::default();
        claim(&mut decreasing, 1, "a", "u1", 0, 1, 9);
        claim(&mut decreasing, 2, "b", "u2", 2, 3, 4);
        assert_eq!(check(&decreasing.operations().unwrap()).len(), 1);
    }

    #[test]
    fn lock_tokens_follow_the_same_rule() {
        let mut h = History::default();
        grant(&mut h, "lock", 1, "job", "w1", (0, 1), 9);
        grant(&mut h, "lock", 2, "job", "w2", (2, 3), 4);
        assert_eq!(check(&h.operations().unwrap()).len(), 1);
    }
}
