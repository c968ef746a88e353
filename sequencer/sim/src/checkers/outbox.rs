//! Messages appended on commit (`tob_append_on_commit`). Some inserts and deletes of the
//! PostgreSQL `usernames` workload append, in the same statement and only if a row was
//! inserted or deleted, a message whose payload is the operation's `event` (an id in its
//! invoke value, unique in the run). After the run the topic is read in order and given here
//! as `(seq, payload)`.
//!
//! Checked: no event twice; none that names no operation; an acknowledged operation that
//! changed a row exactly once; a failed one, or an acknowledged delete of no row, never; one
//! of unknown outcome at most once. And order within one database: an operation invoked after
//! another's was acknowledged has its message after the other's (a transaction that began
//! after another committed comes later in the total order).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::{Violation, tokens_gone_backwards, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "outbox";

fn event(op: &Operation) -> Option<&str> {
    op.invoke_value.get("event").and_then(Value::as_str)
}

fn database(op: &Operation) -> &str {
    op.invoke_value.get("database").and_then(Value::as_str).unwrap_or("")
}

/// Whether the operation's message must appear (`Some(true)`), must not (`Some(false)`), or
/// may (`None`, outcome unknown).
fn expected(op: &Operation) -> Option<bool> {
    match op.outcome {
        Outcome::Fail => Some(false),
        Outcome::Info => None,
        Outcome::Ok if op.f == "delete" => {
            Some(op.result.get("rows").and_then(Value::as_u64).unwrap_or(0) > 0)
        }
        Outcome::Ok => Some(true),
    }
}

pub fn check(ops: &[Operation], messages: &[(u64, String)]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut seqs: HashMap<&str, Vec<u64>> = HashMap::new();
    for (seq, payload) in messages {
        seqs.entry(payload.as_str()).or_default().push(*seq);
    }
    let mut by_event: HashMap<&str, &Operation> = HashMap::new();
    // Per database: (invoke, complete, seq) of the operations whose message is there.
    let mut ordered: BTreeMap<&str, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for op in ops {
        let Some(event) = event(op) else { continue };
        by_event.insert(event, op);
        let found = seqs.get(event).map_or(&[][..], Vec::as_slice);
        if found.len() > 1 {
            out.push(violation(
                NAME,
                format!("{event} appended {} times: seqs {found:?}", found.len()),
            ));
        }
        match (expected(op), found.first()) {
            (Some(true), None) => out.push(violation(
                NAME,
                format!("{event} ({} of {:?}, acknowledged) was never appended", op.f, op.key),
            )),
            (Some(false), Some(seq)) => out.push(violation(
                NAME,
                format!(
                    "{event} ({} of {:?}, {:?} with {}) was appended at seq {seq}",
                    op.f, op.key, op.outcome, op.result
                ),
            )),
            _ => {}
        }
        if let Some(&seq) = found.first() {
            ordered.entry(database(op)).or_default().push((op.invoke_time, op.complete_time, seq));
        }
    }
    for (payload, found) in &seqs {
        if !by_event.contains_key(payload) {
            out.push(violation(NAME, format!("{payload:?} at seqs {found:?} names no operation")));
        }
    }
    for (database, ops) in ordered {
        for (seq, newer) in tokens_gone_backwards(&ops) {
            out.push(violation(
                NAME,
                format!(
                    "in {database}, the message at seq {seq} is of an operation invoked after \
                     the one at seq {newer} had been acknowledged"
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::sql_history::H;
    use serde_json::json;

    /// A statement of `db` naming `event`, over `t` = (invoke, complete), ending `end`.
    fn change(h: H, f: &str, db: &str, event: &str, t: (u64, u64), end: (&str, Value)) -> H {
        let p = h.0.events.len() as u64;
        h.op(p, f, "u1", json!({"database": db, "event": event}), t, end)
    }

    fn insert(h: H, db: &str, event: &str, t: (u64, u64)) -> H {
        change(h, "insert", db, event, t, ("ok", json!({"result": "inserted"})))
    }

    fn log(payloads: &[&str]) -> Vec<(u64, String)> {
        payloads.iter().enumerate().map(|(i, p)| (i as u64 + 1, p.to_string())).collect()
    }

    fn found(ops: &[Operation], messages: &[(u64, String)]) -> Vec<String> {
        check(ops, messages).into_iter().map(|v| v.message).collect()
    }

    #[test]
    fn accepts_each_acknowledged_change_once_in_order() {
        let lost = ("info", json!({"error": "connection lost"}));
        let h = insert(H::default(), "a", "e1", (10, 20));
        let h = insert(h, "a", "e2", (30, 40));
        let h = change(h, "delete", "a", "e3", (50, 60), ("ok", json!({"rows": 0})));
        let h = change(h, "insert", "a", "e4", (70, 80), ("fail", json!({"sqlstate": "23505"})));
        let h = change(h, "insert", "b", "e5", (1, 100), lost.clone());
        let h = change(h, "insert", "b", "e6", (1, 100), lost);
        // e5 of unknown outcome made it, e6 did not; b's messages may precede a's.
        assert!(check(&h.ops(), &log(&["e5", "e1", "e2"])).is_empty());
    }

    #[test]
    fn finds_lost_duplicated_and_unwanted_messages() {
        let h = insert(H::default(), "a", "e1", (10, 20));
        let h = insert(h, "a", "e2", (30, 40));
        let h = change(h, "delete", "a", "e3", (50, 60), ("ok", json!({"rows": 0})));
        let h = change(h, "insert", "a", "e4", (70, 80), ("fail", json!({"sqlstate": "23505"})));
        let h = change(h, "insert", "b", "e5", (1, 100), ("info", json!({"error": "closed"})));
        let found = found(&h.ops(), &log(&["e1", "e1", "e3", "e4", "e5", "e5", "stray"]));
        let expect = [
            "e1 appended 2 times",
            "e2 (insert of Some(\"u1\"), acknowledged) was never appended",
            "e3 (delete",
            "e4 (insert",
            "e5 appended 2 times",
            "\"stray\" at seqs [7] names no operation",
        ];
        for expected in expect {
            assert!(found.iter().any(|f| f.starts_with(expected)), "{expected} in {found:?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:?}");
    }

    #[test]
    fn finds_a_later_transaction_before_an_earlier_one_of_the_same_database() {
        let h = insert(H::default(), "a", "e1", (10, 20));
        let h = insert(h, "a", "e2", (30, 40));
        let h = insert(h, "b", "e3", (5, 15));
        // b's e3 was acknowledged before a's e2 began, yet comes after it: another database.
        assert!(check(&h.ops(), &log(&["e1", "e2", "e3"])).is_empty());
        let found = found(&h.ops(), &log(&["e2", "e1", "e3"]));
        assert_eq!(found.len(), 1, "{found:?}");
        let expected =
            "in a, the message at seq 1 is of an operation invoked after the one at seq 2";
        assert!(found[0].contains(expected), "{found:?}");
    }
}
