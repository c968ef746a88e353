//! Fenced writes: a downstream resource (a ledger guarded by `tob_fence`) must never accept a
//! write with an older token once a write with a newer token was accepted. Operations:
//! `fenced_write`, key = the resource, invoke value `{"token": T}`, `ok` with
//! `{"result": "accepted"}` or `fail` (e.g. `{"sqlstate": "TB001"}` for a stale token).
//!
//! From the history: an accepted write invoked after another accepted write on the same
//! resource completed has a token at least as large. With the ledger's final contents in
//! commit order ([`check_ledger`]): tokens never decrease, and every row is accounted for —
//! each acknowledged write is there, and no row exists that no write could have made.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Violation, tokens_gone_backwards, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "fenced_writes";

fn token(op: &Operation) -> Option<u64> {
    op.invoke_value.get("token").and_then(Value::as_u64)
}

pub fn check(ops: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_resource: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.f == "fenced_write" && op.outcome == Outcome::Ok) {
        match (op.key.as_deref(), token(op)) {
            (Some(key), Some(_)) => by_resource.entry(key).or_default().push(op),
            _ => out.push(violation(
                NAME,
                format!("fenced write by process {} lacks a resource or token", op.process),
            )),
        }
    }
    for (resource, writes) in by_resource {
        let ops: Vec<(u64, u64, u64)> = writes
            .iter()
            .map(|w| (w.invoke_time, w.complete_time, token(w).unwrap_or(0)))
            .collect();
        for (token, newer) in tokens_gone_backwards(&ops) {
            out.push(violation(
                NAME,
                format!(
                    "{resource}: a write with token {token} was accepted after one with token \
                     {newer} had been"
                ),
            ));
        }
    }
    out
}

/// Checks a ledger's tokens in commit order against the history's writes to `resource`.
pub fn check_ledger(ops: &[Operation], resource: &str, ledger: &[u64]) -> Vec<Violation> {
    let mut out = Vec::new();
    if let Some(pair) = ledger.windows(2).find(|pair| pair[1] < pair[0]) {
        out.push(violation(
            NAME,
            format!("{resource}: the ledger has token {} after token {}", pair[1], pair[0]),
        ));
    }
    // token -> (acknowledged writes, writes of unknown outcome)
    let mut writes: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.f == "fenced_write" && op.key.as_deref() == Some(resource))
    {
        let entry = writes.entry(token(op).unwrap_or(0)).or_default();
        match op.outcome {
            Outcome::Ok => entry.0 += 1,
            Outcome::Info => entry.1 += 1,
            Outcome::Fail => {}
        }
    }
    let mut rows: BTreeMap<u64, u64> = BTreeMap::new();
    for &t in ledger {
        *rows.entry(t).or_default() += 1;
    }
    for (&t, &(acked, unknown)) in &writes {
        let n = rows.get(&t).copied().unwrap_or(0);
        if n < acked || n > acked + unknown {
            out.push(violation(
                NAME,
                format!(
                    "{resource}: {n} ledger rows with token {t}, but {acked} writes were \
                     acknowledged and {unknown} more may have happened"
                ),
            ));
        }
    }
    for (&t, &n) in &rows {
        if !writes.contains_key(&t) {
            out.push(violation(
                NAME,
                format!("{resource}: {n} ledger rows with token {t} that no write made"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, History};
    use serde_json::json;

    fn write(h: &mut History, p: u64, token: u64, t: (u64, u64), accepted: bool) {
        h.push(Event::op(p, "invoke", "fenced_write", json!("job"), json!({"token": token}), t.0));
        let (kind, value) = if accepted {
            ("ok", json!({"result": "accepted"}))
        } else {
            ("fail", json!({"sqlstate": "TB001"}))
        };
        h.push(Event::op(p, kind, "fenced_write", json!("job"), value, t.1));
        h.sort();
    }

    #[test]
    fn newer_tokens_after_older_pass() {
        let mut h = History::default();
        write(&mut h, 1, 5, (0, 10), true);
        write(&mut h, 2, 9, (20, 30), true);
        write(&mut h, 1, 5, (40, 50), false); // stale, refused
        write(&mut h, 2, 9, (60, 70), true);
        let ops = h.operations().unwrap();
        assert_eq!(check(&ops), vec![]);
        assert_eq!(check_ledger(&ops, "job", &[5, 9, 9]), vec![]);
    }

    #[test]
    fn an_older_token_accepted_after_a_newer_one_is_caught() {
        let mut h = History::default();
        write(&mut h, 1, 9, (0, 10), true);
        write(&mut h, 2, 5, (20, 30), true);
        let ops = h.operations().unwrap();
        assert_eq!(check(&ops).len(), 1);
        assert_eq!(check_ledger(&ops, "job", &[9, 5]).len(), 1);
    }

    #[test]
    fn lost_or_invented_ledger_rows_are_caught() {
        let mut h = History::default();
        write(&mut h, 1, 5, (0, 10), true);
        write(&mut h, 2, 9, (20, 30), true);
        let ops = h.operations().unwrap();
        assert_eq!(check_ledger(&ops, "job", &[5]).len(), 1, "an acknowledged write lost");
        assert_eq!(check_ledger(&ops, "job", &[5, 7, 9]).len(), 1, "a row no write made");
    }
}
