//! Unique rows across databases: the PostgreSQL workload inserts and deletes usernames in
//! several databases whose `tob_unique` trigger claims each name cluster-wide, one autocommit
//! statement per operation. Operations: `insert` and `delete`, key = the name, invoke value
//! `{"database": D}`; an `insert` completes `ok` with `{"result": "inserted"}` or `fail` with
//! `{"sqlstate": S, "owner": O}` (owner only for 23505); a `delete` completes `ok` with
//! `{"rows": N}`. A statement that ended with an ERROR rolled back (`fail`); a lost connection
//! or a FATAL may have come after the commit (`info`).
//!
//! From the history alone: two acknowledged inserts of one name need a delete of it in
//! between, and a 23505 must name a database that tried to insert that name. With the final
//! table contents ([`check_final`]): no name in two databases, every acknowledged insert not
//! possibly deleted afterwards still there, and no row that no insert could have made.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Violation, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "unique_rows";

fn database(op: &Operation) -> &str {
    op.invoke_value.get("database").and_then(Value::as_str).unwrap_or("")
}

/// A delete that may have removed a row: acknowledged with rows, or of unknown outcome.
fn may_have_deleted(op: &Operation) -> bool {
    op.f == "delete"
        && match op.outcome {
            Outcome::Ok => op.result.get("rows").and_then(Value::as_u64).unwrap_or(0) > 0,
            Outcome::Info => true,
            Outcome::Fail => false,
        }
}

fn by_key(ops: &[Operation]) -> BTreeMap<&str, Vec<&Operation>> {
    let mut keys: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.f == "insert" || op.f == "delete") {
        if let Some(key) = op.key.as_deref() {
            keys.entry(key).or_default().push(op);
        }
    }
    keys
}

pub fn check(ops: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (key, key_ops) in by_key(ops) {
        let mut inserted: Vec<&Operation> = key_ops
            .iter()
            .copied()
            .filter(|op| op.f == "insert" && op.outcome == Outcome::Ok)
            .collect();
        inserted.sort_by_key(|op| op.complete_time);
        let deletes: Vec<&Operation> =
            key_ops.iter().copied().filter(|op| may_have_deleted(op)).collect();
        // Both commits fall inside [earliest invoke, latest completion]; the first one's row
        // must have been deleted by a transaction committing between them.
        for pair in inserted.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (low, high) = (a.invoke_time.min(b.invoke_time), b.complete_time);
            let explained = deletes.iter().any(|d| {
                (database(d) == database(a) || database(d) == database(b))
                    && d.invoke_time < high
                    && d.complete_time > low
            });
            if !explained {
                out.push(violation(
                    NAME,
                    format!(
                        "{key} inserted in {} (process {}, done at {}) and in {} (process {}, \
                         done at {}) with no delete in between",
                        database(a),
                        a.process,
                        a.complete_time,
                        database(b),
                        b.process,
                        b.complete_time
                    ),
                ));
            }
        }
        for op in key_ops.iter().filter(|op| op.f == "insert" && op.outcome == Outcome::Fail) {
            let Some(owner) = op.result.get("owner").and_then(Value::as_str) else { continue };
            let tried = key_ops.iter().any(|other| {
                other.f == "insert"
                    && database(other) == owner
                    && other.invoke_time < op.complete_time
            });
            if !tried {
                out.push(violation(
                    NAME,
                    format!(
                        "{key}: process {} was told {owner} holds it, but {owner} never tried \
                         to insert it before then",
                        op.process
                    ),
                ));
            }
        }
    }
    out
}

/// Checks the tables' final contents (`database -> names`) against the history.
pub fn check_final(
    ops: &[Operation],
    tables: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut holder: BTreeMap<&str, &str> = BTreeMap::new();
    for (db, names) in tables {
        for name in names {
            if let Some(other) = holder.insert(name, db) {
                out.push(violation(NAME, format!("{name} is in both {other} and {db} at the end")));
            }
        }
    }
    let keys = by_key(ops);
    for (key, key_ops) in &keys {
        let last = key_ops
            .iter()
            .filter(|op| op.f == "insert" && op.outcome == Outcome::Ok)
            .max_by_key(|op| op.complete_time);
        if let Some(last) = last {
            let db = database(last);
            let maybe_deleted = key_ops.iter().any(|d| {
                may_have_deleted(d) && database(d) == db && d.complete_time > last.invoke_time
            });
            let present = tables.get(db).is_some_and(|names| names.contains(*key));
            if !maybe_deleted && !present {
                out.push(violation(
                    NAME,
                    format!(
                        "{key}: the insert into {db} acknowledged at {} is gone, and no delete \
                         could have removed it",
                        last.complete_time
                    ),
                ));
            }
        }
    }
    for (db, names) in tables {
        for name in names {
            let made = keys.get(name.as_str()).is_some_and(|key_ops| {
                key_ops
                    .iter()
                    .any(|op| op.f == "insert" && op.outcome != Outcome::Fail && database(op) == db)
            });
            if !made {
                out.push(violation(
                    NAME,
                    format!("{name} is in {db} at the end, but no insert there could have made it"),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::sql_history::{H, db};
    use serde_json::json;

    fn tables(rows: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
        let mut t: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (db, name) in rows {
            t.entry(db.to_string()).or_default().insert(name.to_string());
        }
        t
    }

    #[test]
    fn insert_delete_insert_elsewhere_passes() {
        let h = H::default()
            .insert(1, "alice", db("one"), (0, 10))
            .op(
                2,
                "insert",
                "alice",
                db("two"),
                (5, 12),
                ("fail", json!({"sqlstate": "23505", "owner": "one"})),
            )
            .delete(1, "alice", "one", (20, 30), 1)
            .insert(2, "alice", db("two"), (40, 50));
        assert_eq!(check(&h.ops()), vec![]);
        assert_eq!(check_final(&h.ops(), &tables(&[("two", "alice")])), vec![]);
    }

    #[test]
    fn a_name_acknowledged_twice_without_a_delete_is_caught() {
        let h = H::default()
            .insert(1, "alice", db("one"), (0, 10))
            .delete(1, "alice", "one", (11, 12), 0) // deleted nothing
            .insert(2, "alice", db("two"), (20, 30));
        assert_eq!(check(&h.ops()).len(), 1);
        // Concurrent inserts both acknowledged are just as wrong.
        let h =
            H::default().insert(1, "bob", db("one"), (0, 10)).insert(2, "bob", db("one"), (1, 9));
        assert_eq!(check(&h.ops()).len(), 1);
    }

    #[test]
    fn an_unknown_delete_may_explain_a_second_insert() {
        let h = H::default()
            .insert(1, "alice", db("one"), (0, 10))
            .op(1, "delete", "alice", db("one"), (11, 12), ("info", json!({"error": "closed"})))
            .insert(2, "alice", db("two"), (20, 30));
        assert_eq!(check(&h.ops()), vec![]);
    }

    #[test]
    fn a_taken_answer_must_name_a_database_that_tried() {
        let h = H::default().op(
            2,
            "insert",
            "alice",
            db("two"),
            (5, 12),
            ("fail", json!({"sqlstate": "23505", "owner": "three"})),
        );
        assert_eq!(check(&h.ops()).len(), 1);
    }

    #[test]
    fn final_tables_are_checked_against_the_history() {
        let h = H::default().insert(1, "alice", db("one"), (0, 10)).insert(
            2,
            "bob",
            db("two"),
            (0, 10),
        );
        // Lost: alice's acknowledged insert is gone.
        assert_eq!(check_final(&h.ops(), &tables(&[("two", "bob")])).len(), 1);
        // Twice: bob in both databases (and no insert into one could have made it).
        let twice =
            check_final(&h.ops(), &tables(&[("one", "alice"), ("one", "bob"), ("two", "bob")]));
        assert_eq!(twice.len(), 2, "{twice:?}");
        // A row from a failed insert.
        let h = H::default().op(
            1,
            "insert",
            "carol",
            db("one"),
            (0, 10),
            ("fail", json!({"sqlstate": "40001"})),
        );
        assert_eq!(check_final(&h.ops(), &tables(&[("one", "carol")])).len(), 1);
        // An acknowledged insert later (possibly) deleted may be gone.
        let h = H::default().insert(1, "dave", db("one"), (0, 10)).op(
            1,
            "delete",
            "dave",
            db("one"),
            (20, 30),
            ("info", json!({"error": "closed"})),
        );
        assert_eq!(check_final(&h.ops(), &tables(&[])), vec![]);
    }
}
