//! Total order broadcast, from a history's appends and deliveries:
//! - every node delivers a gap-free, duplicate-free run of `seq`s (restarting after a
//!   `deliver_start N` at `N + 1`);
//! - agreement: one message per `seq`, the same on every node;
//! - no duplicates: one `seq` per message id;
//! - validity: only appended messages are delivered, never a failed append, and an
//!   acknowledged append is delivered at the `seq` it was told;
//! - reliable delivery: every node named final delivers everything any node delivered;
//! - real-time order: an append acknowledged before another was invoked has a lower `seq`;
//! - messages appended on commit (`append_on_commit`: staged under a transaction, then that
//!   transaction settled; invoke value `{"ids": [...], "commit": bool}`): all of a
//!   transaction's or none, at consecutive `seq`s in the order staged; all of them if it
//!   settled as committed and the settle was acknowledged, none if it settled as aborted; and
//!   in real-time order with the other appends.

use std::collections::{BTreeMap, BTreeSet};

use super::{Violation, violation};
use crate::history::{History, Operation, Outcome};

const NAME: &str = "total_order";

pub fn check(history: &History, ops: &[Operation], final_nodes: &[String]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut next_by_node: BTreeMap<&str, u64> = BTreeMap::new();
    let mut id_at_seq: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    let mut seq_of_id: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &history.events {
        let (Some(node), Some(seq)) = (event.node.as_deref(), event.seq) else { continue };
        match event.kind.as_str() {
            "deliver_start" => {
                next_by_node.insert(node, seq + 1);
            }
            "deliver" => {
                let expected = next_by_node.entry(node).or_insert(1);
                if seq != *expected {
                    out.push(violation(
                        NAME,
                        format!("{node} delivered seq {seq} where seq {expected} was due"),
                    ));
                }
                *expected = seq + 1;
                let id = event.id.as_deref().unwrap_or("");
                let (first, first_node) = *id_at_seq.entry(seq).or_insert((id, node));
                if first != id {
                    out.push(violation(
                        NAME,
                        format!("seq {seq} is {first} on {first_node} but {id} on {node}"),
                    ));
                }
                let first_seq = *seq_of_id.entry(id).or_insert(seq);
                if first_seq != seq {
                    out.push(violation(
                        NAME,
                        format!("message {id} delivered at seq {first_seq} and {seq}"),
                    ));
                }
            }
            _ => {}
        }
    }

    let appends: Vec<&Operation> = ops.iter().filter(|op| op.f == "append").collect();
    let mut appended_ids = BTreeSet::new();
    for op in &appends {
        let Some(id) = op.invoke_value.get("id").and_then(|v| v.as_str()) else {
            out.push(violation(NAME, format!("append by process {} has no id", op.process)));
            continue;
        };
        appended_ids.insert(id);
        let delivered = seq_of_id.get(id).copied();
        match op.outcome {
            Outcome::Fail if delivered.is_some() => {
                out.push(violation(NAME, format!("failed append {id} was delivered")));
            }
            Outcome::Ok => {
                let told = op.result.get("seq").and_then(|v| v.as_u64());
                match (told, delivered) {
                    (None, _) => out.push(violation(NAME, format!("append {id} ok without a seq"))),
                    (Some(t), Some(d)) if t != d => out.push(violation(
                        NAME,
                        format!("append {id} was told seq {t} but delivered at {d}"),
                    )),
                    (Some(t), None) if !final_nodes.is_empty() => out.push(violation(
                        NAME,
                        format!("acknowledged append {id} (seq {t}) was never delivered"),
                    )),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let mut settled: Vec<(&Operation, u64)> = Vec::new();
    for op in ops.iter().filter(|op| op.f == "append_on_commit") {
        let ids: Vec<&str> = op
            .invoke_value
            .get("ids")
            .and_then(|v| v.as_array())
            .map(|ids| ids.iter().filter_map(|id| id.as_str()).collect())
            .unwrap_or_default();
        let commit = op.invoke_value.get("commit").and_then(|v| v.as_bool()).unwrap_or(false);
        appended_ids.extend(ids.iter().copied());
        let seqs: Vec<u64> = ids.iter().filter_map(|id| seq_of_id.get(id).copied()).collect();
        let first = ids.first().copied().unwrap_or("?");
        if !seqs.is_empty() && seqs.len() != ids.len() {
            out.push(violation(
                NAME,
                format!(
                    "transaction of {first}: {} of {} messages delivered",
                    seqs.len(),
                    ids.len()
                ),
            ));
        } else if seqs.windows(2).any(|w| w[1] != w[0] + 1) {
            out.push(violation(
                NAME,
                format!("transaction of {first}: messages at seqs {seqs:?}, not consecutive"),
            ));
        }
        match op.outcome {
            Outcome::Ok if commit && seqs.is_empty() && !final_nodes.is_empty() => out.push(
                violation(NAME, format!("committed transaction of {first} was never delivered")),
            ),
            _ if !commit && !seqs.is_empty() => out.push(violation(
                NAME,
                format!("aborted transaction of {first} was delivered at {seqs:?}"),
            )),
            _ => {}
        }
        if seqs.len() == ids.len() {
            settled.extend(seqs.iter().map(|&seq| (op, seq)));
        }
    }
    for id in seq_of_id.keys() {
        if !appended_ids.contains(id) {
            out.push(violation(NAME, format!("delivered message {id} was never appended")));
        }
    }
    let max_seq = id_at_seq.keys().next_back().copied().unwrap_or(0);
    for node in final_nodes {
        let delivered_to = next_by_node.get(node.as_str()).copied().unwrap_or(1) - 1;
        if delivered_to < max_seq {
            out.push(violation(
                NAME,
                format!("{node} delivered up to seq {delivered_to} but seq {max_seq} exists"),
            ));
        }
    }

    // Real-time order over appends whose seq is known.
    let seq_of = |op: &Operation| -> Option<u64> {
        match op.outcome {
            Outcome::Ok => op.result.get("seq").and_then(|v| v.as_u64()),
            Outcome::Info => {
                let id = op.invoke_value.get("id").and_then(|v| v.as_str())?;
                seq_of_id.get(id).copied()
            }
            Outcome::Fail => None,
        }
    };
    let mut known: Vec<(&Operation, u64)> =
        appends.iter().filter_map(|op| Some((*op, seq_of(op)?))).collect();
    // A transaction's messages are one event: each of them after whatever was acknowledged
    // before its settle began, before whatever began after the settle was acknowledged.
    known.extend(settled);
    out.extend(real_time_order(NAME, &known, "append"));
    out
}

/// For operations with a value that must grow in real time: if `a` completed before `b` was
/// invoked then `value(a) < value(b)`. Operations sharing a value are one event (skipped).
pub(crate) fn real_time_order(
    checker: &'static str,
    ops: &[(&Operation, u64)],
    what: &str,
) -> Vec<Violation> {
    let mut by_complete: Vec<(u64, u64)> =
        ops.iter().map(|(op, v)| (op.complete_time, *v)).collect();
    by_complete.sort_unstable();
    let mut by_invoke: Vec<(u64, u64, u64)> =
        ops.iter().map(|(op, v)| (op.invoke_time, *v, op.process)).collect();
    by_invoke.sort_unstable();
    let mut out = Vec::new();
    let mut done = 0;
    let mut max_done: Option<u64> = None;
    for (invoke, value, process) in by_invoke {
        while done < by_complete.len() && by_complete[done].0 < invoke {
            max_done = max_done.max(Some(by_complete[done].1));
            done += 1;
        }
        if let Some(max) = max_done
            && value < max
        {
            out.push(violation(
                checker,
                format!(
                    "{what} by process {process} invoked at {invoke} got {value}, \
                         but {max} was already acknowledged"
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Event;
    use serde_json::json;

    fn append(h: &mut History, p: u64, id: &str, t0: u64, t1: u64, seq: Option<u64>) {
        h.push(Event::op(
            p,
            "invoke",
            "append",
            serde_json::Value::Null,
            json!({"id": id, "payload": 0}),
            t0,
        ));
        if let Some(seq) = seq {
            h.push(Event::op(p, "ok", "append", serde_json::Value::Null, json!({"seq": seq}), t1));
        }
    }

    fn run(h: &History, nodes: &[&str]) -> Vec<Violation> {
        let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        check(h, &h.operations().unwrap(), &nodes)
    }

    fn good() -> History {
        let mut h = History::default();
        append(&mut h, 1, "m1", 0, 10, Some(1));
        append(&mut h, 2, "m2", 20, 30, Some(2));
        for node in ["n1", "n2"] {
            h.push(Event::deliver(node, 1, "m1", 40));
            h.push(Event::deliver(node, 2, "m2", 41));
        }
        h
    }

    #[test]
    fn a_correct_history_passes() {
        assert_eq!(run(&good(), &["n1", "n2"]), vec![]);
    }

    #[test]
    fn gaps_duplicates_disagreement_and_loss_are_caught() {
        let mut gap = good();
        gap.events.retain(|e| !(e.node.as_deref() == Some("n2") && e.seq == Some(1)));
        assert!(!run(&gap, &["n1", "n2"]).is_empty());

        let mut swapped = good();
        for e in swapped.events.iter_mut().filter(|e| e.node.as_deref() == Some("n2")) {
            e.id = Some(if e.seq == Some(1) { "m2" } else { "m1" }.into());
        }
        assert!(!run(&swapped, &["n1", "n2"]).is_empty());

        let mut dup = good();
        dup.push(Event::deliver("n1", 3, "m1", 50));
        assert!(!run(&dup, &["n1"]).is_empty());

        let mut lost = good();
        lost.events.retain(|e| e.node.as_deref() != Some("n2"));
        assert!(!run(&lost, &["n1", "n2"]).is_empty());

        let mut invented = good();
        invented.push(Event::deliver("n1", 3, "m9", 50));
        assert!(!run(&invented, &["n1"]).is_empty());
    }

    #[test]
    fn restart_from_snapshot_continues_the_run() {
        let mut h = good();
        h.push(Event::deliver_start("n2", 1, 60));
        h.push(Event::deliver("n2", 2, "m2", 61));
        assert_eq!(run(&h, &["n1", "n2"]), vec![]);
    }

    #[test]
    fn real_time_order_is_enforced() {
        let mut h = History::default();
        append(&mut h, 1, "m1", 0, 10, Some(2));
        append(&mut h, 2, "m2", 20, 30, Some(1));
        h.push(Event::deliver("n1", 1, "m2", 40));
        h.push(Event::deliver("n1", 2, "m1", 41));
        assert!(run(&h, &["n1"]).iter().any(|v| v.message.contains("already acknowledged")));
    }

    /// Process `p` settles a transaction that staged `ids`, over `t`, ending `end`.
    fn settle(h: &mut History, p: u64, ids: &[&str], commit: bool, t: (u64, u64), end: &str) {
        let invoke = json!({"ids": ids, "commit": commit});
        h.push(Event::op(p, "invoke", "append_on_commit", json!(null), invoke, t.0));
        if end != "info" {
            h.push(Event::op(p, end, "append_on_commit", json!(null), json!({}), t.1));
        }
    }

    /// `good()` and, after it, a committed transaction of `x1, x2` and an aborted one of `y1`.
    fn with_transactions() -> History {
        let mut h = good();
        settle(&mut h, 3, &["x1", "x2"], true, (50, 60), "ok");
        settle(&mut h, 4, &["y1"], false, (50, 60), "ok");
        h.push(Event::deliver("n1", 3, "x1", 61));
        h.push(Event::deliver("n1", 4, "x2", 62));
        h
    }

    #[test]
    fn messages_appended_on_commit_are_checked_as_one_transaction() {
        assert_eq!(run(&with_transactions(), &["n1"]), vec![]);

        let mut partial = with_transactions();
        partial.events.retain(|e| e.id.as_deref() != Some("x2"));
        let found = run(&partial, &[]);
        assert!(found.iter().any(|v| v.message.contains("1 of 2 messages")), "{found:?}");

        let mut apart = with_transactions();
        apart.events.retain(|e| e.id.as_deref() != Some("x2"));
        apart.push(Event::deliver("n1", 4, "m9", 62));
        apart.push(Event::deliver("n1", 5, "x2", 63));
        append(&mut apart, 5, "m9", 55, 70, Some(4));
        let found = run(&apart, &[]);
        assert!(found.iter().any(|v| v.message.contains("not consecutive")), "{found:?}");

        let mut lost = with_transactions();
        lost.events.retain(|e| !e.id.as_deref().is_some_and(|id| id.starts_with('x')));
        let found = run(&lost, &["n1"]);
        assert!(found.iter().any(|v| v.message.contains("never delivered")), "{found:?}");

        let mut aborted = with_transactions();
        aborted.push(Event::deliver("n1", 5, "y1", 63));
        let found = run(&aborted, &[]);
        assert!(found.iter().any(|v| v.message.contains("aborted transaction")), "{found:?}");

        // Settled after m2 was acknowledged, yet delivered before it.
        let mut early = History::default();
        append(&mut early, 1, "m1", 0, 10, Some(3));
        settle(&mut early, 2, &["x1"], true, (20, 30), "ok");
        early.push(Event::deliver("n1", 1, "x1", 31));
        early.push(Event::deliver("n1", 2, "m2", 32));
        early.push(Event::deliver("n1", 3, "m1", 33));
        append(&mut early, 3, "m2", 35, 36, Some(2));
        let found = run(&early, &[]);
        assert!(found.iter().any(|v| v.message.contains("already acknowledged")), "{found:?}");
    }

    #[test]
    fn failed_append_must_not_be_delivered() {
        let mut h = good();
        h.push(Event::op(3, "invoke", "append", serde_json::Value::Null, json!({"id": "m3"}), 50));
        h.push(Event::op(3, "fail", "append", serde_json::Value::Null, json!(null), 51));
        h.push(Event::deliver("n1", 3, "m3", 52));
        assert!(run(&h, &[]).iter().any(|v| v.message.contains("failed append")));
    }
}
