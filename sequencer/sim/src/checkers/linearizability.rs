//! Linearizability of `claim`, `release` and `read` per key, by a Wing–Gong search with
//! Porcupine's memoisation (a set of (linearized operations, model state) already explored).
//!
//! The model is a register holding the key's owner (a pending or prepared claim counts as held):
//! - `claim(o)`: free → `claimed` with a token greater than every token granted before on this
//!   key; held by `o` → `claimed` with the same token; held by `p ≠ o` → `taken` by `p`;
//! - `release(o)`: held by `o` → `released` and free; otherwise `not_owner`;
//! - `read`: returns the owner or null.
//!
//! `fail` operations did not happen and are dropped. `info` operations may or may not have
//! happened: they may be linearized anywhere after their invocation, or never.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use super::{Violation, violation};
use crate::history::{Operation, Outcome};

const NAME: &str = "linearizability";
/// Bound on search steps per key; hitting it is reported, never taken as a pass.
const STEPS_MAX: u64 = 20_000_000;
const NIL: usize = usize::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Claim { owner: u32, result: ClaimResult },
    Release { owner: u32, result: Option<bool> },
    Read { owner: Option<u32> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClaimResult {
    Claimed(u64),
    Taken(u32),
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    owner: Option<u32>,
    /// `None` when granted by an operation whose answer is unknown.
    token: Option<u64>,
    max_token: u64,
}

impl State {
    fn step(&self, effect: &Effect) -> Option<State> {
        match effect {
            Effect::Claim { owner, result } => match (self.owner, result) {
                (None, ClaimResult::Claimed(t)) if *t > self.max_token => {
                    Some(State { owner: Some(*owner), token: Some(*t), max_token: *t })
                }
                (None, ClaimResult::Unknown) => {
                    Some(State { owner: Some(*owner), token: None, max_token: self.max_token })
                }
                (Some(o), ClaimResult::Claimed(t)) if o == *owner => match self.token {
                    Some(held) if held != *t => None,
                    _ => {
                        Some(State { token: Some(*t), max_token: self.max_token.max(*t), ..*self })
                    }
                },
                (Some(o), ClaimResult::Taken(by)) if o != *owner && o == *by => Some(self.clone()),
                (Some(_), ClaimResult::Unknown) => Some(self.clone()),
                _ => None,
            },
            Effect::Release { owner, result } => {
                let owns = self.owner == Some(*owner);
                match result {
                    Some(true) if owns => Some(State { owner: None, token: None, ..*self }),
                    Some(false) if !owns => Some(self.clone()),
                    None if owns => Some(State { owner: None, token: None, ..*self }),
                    None => Some(self.clone()),
                    _ => None,
                }
            }
            Effect::Read { owner } => (self.owner == *owner).then(|| self.clone()),
        }
    }
}

struct KeyOp<'a> {
    op: &'a Operation,
    effect: Effect,
    info: bool,
}

#[derive(Default)]
struct Owners(BTreeMap<String, u32>);

impl Owners {
    fn id(&mut self, name: &str) -> u32 {
        let next = self.0.len() as u32;
        *self.0.entry(name.to_owned()).or_insert(next)
    }
}

fn owner_of(value: &Value) -> Option<&str> {
    value.get("owner").and_then(Value::as_str)
}

fn parse<'a>(op: &'a Operation, owners: &mut Owners) -> Result<Option<KeyOp<'a>>, String> {
    if op.outcome == Outcome::Fail {
        return Ok(None);
    }
    let info = op.outcome == Outcome::Info;
    let bad = || format!("process {} {} at {}: malformed value", op.process, op.f, op.invoke_time);
    let effect = match op.f.as_str() {
        "claim" => {
            let owner = owners.id(owner_of(&op.invoke_value).ok_or_else(bad)?);
            let result = if info {
                ClaimResult::Unknown
            } else {
                match op.result.get("result").and_then(Value::as_str) {
                    Some("claimed") => ClaimResult::Claimed(
                        op.result.get("token").and_then(Value::as_u64).ok_or_else(bad)?,
                    ),
                    Some("taken") => {
                        ClaimResult::Taken(owners.id(owner_of(&op.result).ok_or_else(bad)?))
                    }
                    _ => return Err(bad()),
                }
            };
            Effect::Claim { owner, result }
        }
        "release" => {
            let owner = owners.id(owner_of(&op.invoke_value).ok_or_else(bad)?);
            let result = if info {
                None
            } else {
                match op.result.get("result").and_then(Value::as_str) {
                    Some("released") => Some(true),
                    Some("not_owner") => Some(false),
                    _ => return Err(bad()),
                }
            };
            Effect::Release { owner, result }
        }
        "read" => {
            if info {
                return Ok(None); // an unanswered read constrains nothing
            }
            let owner = match op.result.get("owner") {
                Some(Value::Null) => None,
                Some(Value::String(s)) => Some(owners.id(s)),
                _ => return Err(bad()),
            };
            Effect::Read { owner }
        }
        _ => return Ok(None),
    };
    Ok(Some(KeyOp { op, effect, info }))
}

/// Checks every key's claim/release/read operations.
pub fn check(ops: &[Operation]) -> Vec<Violation> {
    let mut owners = Owners::default();
    let mut by_key: BTreeMap<&str, Vec<KeyOp>> = BTreeMap::new();
    let mut out = Vec::new();
    for op in ops {
        let Some(key) = op.key.as_deref() else { continue };
        match parse(op, &mut owners) {
            Ok(Some(key_op)) => by_key.entry(key).or_default().push(key_op),
            Ok(None) => {}
            Err(e) => out.push(violation(NAME, e)),
        }
    }
    let names: BTreeMap<u32, &str> = owners.0.iter().map(|(n, id)| (*id, n.as_str())).collect();
    for (key, key_ops) in by_key {
        if let Err(e) = search(&key_ops, &names) {
            out.push(violation(NAME, format!("key {key}: {e}")));
        }
    }
    out
}

struct ListEntry {
    op: usize,
    is_call: bool,
    time: u64,
}

fn search(ops: &[KeyOp], names: &BTreeMap<u32, &str>) -> Result<(), String> {
    // Entries 0 and len+1 are the head and tail sentinels of a doubly linked list.
    let mut entries: Vec<ListEntry> = Vec::with_capacity(ops.len() * 2);
    for (i, k) in ops.iter().enumerate() {
        entries.push(ListEntry { op: i, is_call: true, time: k.op.invoke_time });
        let ret = if k.info { u64::MAX } else { k.op.complete_time };
        entries.push(ListEntry { op: i, is_call: false, time: ret });
    }
    // Calls before returns at the same instant: the more permissive reading of a tie.
    entries.sort_by_key(|e| (e.time, !e.is_call, e.op));
    let n = entries.len();
    let mut next: Vec<usize> = (0..n + 2).map(|i| i + 1).collect();
    let mut prev: Vec<usize> = (0..n + 2).map(|i| i.wrapping_sub(1)).collect();
    next[n + 1] = NIL;
    let mut return_of = vec![0usize; ops.len()];
    for (pos, e) in entries.iter().enumerate() {
        if !e.is_call {
            return_of[e.op] = pos + 1;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        next[prev[x]] = next[x];
        prev[next[x]] = prev[x];
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        next[prev[x]] = x;
        prev[next[x]] = x;
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = State { owner: None, token: None, max_token: 0 };
    let mut deepest = (0usize, 0usize);
    let mut cur = next[0];
    let mut steps = 0u64;
    while next[0] != n + 1 {
        steps += 1;
        if steps > STEPS_MAX {
            return Err(format!("search gave up after {STEPS_MAX} steps (too much concurrency)"));
        }
        let entry = &entries[cur - 1];
        let op = entry.op;
        if entry.is_call {
            if let Some(new_state) = state.step(&ops[op].effect) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), new_state.clone())) {
                    stack.push((cur, std::mem::replace(&mut state, new_state)));
                    unlink(&mut next, &mut prev, cur);
                    unlink(&mut next, &mut prev, return_of[op]);
                    cur = next[0];
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            cur = next[cur];
        } else {
            if ops[op].info {
                return Ok(()); // only operations that may never have happened remain
            }
            // This operation must take effect before anything still pending; remember the
            // deepest point where that was impossible, to name it in the report.
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), op);
            }
            let Some((call, previous)) = stack.pop() else {
                return Err(describe(ops, deepest, names));
            };
            state = previous;
            let call_op = entries[call - 1].op;
            linearized[call_op / 64] &= !(1 << (call_op % 64));
            relink(&mut next, &mut prev, return_of[call_op]);
            relink(&mut next, &mut prev, call);
            cur = next[call];
        }
    }
    Ok(())
}

fn describe(ops: &[KeyOp], deepest: (usize, usize), names: &BTreeMap<u32, &str>) -> String {
    let k = &ops[deepest.1];
    let effect = match &k.effect {
        Effect::Claim { owner, result } => format!("claim by {} -> {result:?}", names[owner]),
        Effect::Release { owner, result } => format!("release by {} -> {result:?}", names[owner]),
        Effect::Read { owner } => format!("read -> {:?}", owner.map(|o| names[&o])),
    };
    format!(
        "not linearizable: at best {} of {} operations take effect in some order, and then \
         process {} {effect} (invoked {} ns, completed {} ns) cannot",
        deepest.0,
        ops.len(),
        k.op.process,
        k.op.invoke_time,
        k.op.complete_time
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, History};
    use serde_json::json;

    struct H(History);
    impl H {
        fn new() -> H {
            H(History::default())
        }
        fn op(
            mut self,
            p: u64,
            f: &str,
            owner: Option<&str>,
            t0: u64,
            t1: Option<u64>,
            result: Value,
        ) -> H {
            let value = owner.map(|o| json!({"owner": o})).unwrap_or(Value::Null);
            self.0.push(Event::op(p, "invoke", f, json!("k"), value, t0));
            if let Some(t1) = t1 {
                self.0.push(Event::op(p, "ok", f, json!("k"), result, t1));
            }
            self.0.sort();
            self
        }
        fn check(&self) -> Vec<Violation> {
            check(&self.0.operations().unwrap())
        }
    }

    fn claimed(t: u64) -> Value {
        json!({"result": "claimed", "token": t})
    }

    #[test]
    fn sequential_valid_history_passes() {
        let h = H::new()
            .op(1, "claim", Some("a"), 0, Some(1), claimed(5))
            .op(2, "claim", Some("b"), 2, Some(3), json!({"result": "taken", "owner": "a"}))
            .op(1, "claim", Some("a"), 4, Some(5), claimed(5))
            .op(3, "read", None, 6, Some(7), json!({"owner": "a"}))
            .op(1, "release", Some("a"), 8, Some(9), json!({"result": "released"}))
            .op(2, "claim", Some("b"), 10, Some(11), claimed(9))
            .op(3, "read", None, 12, Some(13), json!({"owner": "b"}));
        assert_eq!(h.check(), vec![]);
    }

    #[test]
    fn two_winners_are_caught() {
        let h = H::new().op(1, "claim", Some("a"), 0, Some(1), claimed(5)).op(
            2,
            "claim",
            Some("b"),
            2,
            Some(3),
            claimed(6),
        );
        assert_eq!(h.check().len(), 1);
    }

    #[test]
    fn stale_read_is_caught() {
        let h = H::new().op(1, "claim", Some("a"), 0, Some(1), claimed(5)).op(
            3,
            "read",
            None,
            2,
            Some(3),
            json!({"owner": null}),
        );
        assert_eq!(h.check().len(), 1);
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        let h = H::new()
            .op(1, "claim", Some("a"), 0, Some(10), claimed(5))
            .op(3, "read", None, 1, Some(2), json!({"owner": null}))
            .op(4, "read", None, 3, Some(4), json!({"owner": "a"}));
        assert_eq!(h.check(), vec![]);
        // But not both orders at once: null after a was seen is stale.
        let h = H::new()
            .op(1, "claim", Some("a"), 0, Some(10), claimed(5))
            .op(4, "read", None, 1, Some(2), json!({"owner": "a"}))
            .op(3, "read", None, 3, Some(4), json!({"owner": null}));
        assert_eq!(h.check().len(), 1);
    }

    #[test]
    fn info_operations_may_or_may_not_happen() {
        let happened = H::new().op(1, "claim", Some("a"), 0, None, Value::Null).op(
            3,
            "read",
            None,
            5,
            Some(6),
            json!({"owner": "a"}),
        );
        assert_eq!(happened.check(), vec![]);
        let did_not = H::new().op(1, "claim", Some("a"), 0, None, Value::Null).op(
            3,
            "read",
            None,
            5,
            Some(6),
            json!({"owner": null}),
        );
        assert_eq!(did_not.check(), vec![]);
        // An unknown claim still cannot have happened before it was invoked.
        let too_early = H::new().op(3, "read", None, 0, Some(1), json!({"owner": "a"})).op(
            1,
            "claim",
            Some("a"),
            5,
            None,
            Value::Null,
        );
        assert_eq!(too_early.check().len(), 1);
    }

    #[test]
    fn tokens_must_grow_and_reclaims_keep_theirs() {
        let shrinking = H::new()
            .op(1, "claim", Some("a"), 0, Some(1), claimed(5))
            .op(1, "release", Some("a"), 2, Some(3), json!({"result": "released"}))
            .op(2, "claim", Some("b"), 4, Some(5), claimed(4));
        assert_eq!(shrinking.check().len(), 1);
        let changed = H::new().op(1, "claim", Some("a"), 0, Some(1), claimed(5)).op(
            1,
            "claim",
            Some("a"),
            2,
            Some(3),
            claimed(6),
        );
        assert_eq!(changed.check().len(), 1);
    }

    #[test]
    fn release_by_non_owner_cannot_free() {
        let h = H::new().op(1, "claim", Some("a"), 0, Some(1), claimed(5)).op(
            2,
            "release",
            Some("b"),
            2,
            Some(3),
            json!({"result": "released"}),
        );
        assert_eq!(h.check().len(), 1);
        let ok = H::new().op(1, "claim", Some("a"), 0, Some(1), claimed(5)).op(
            2,
            "release",
            Some("b"),
            2,
            Some(3),
            json!({"result": "not_owner"}),
        );
        assert_eq!(ok.check(), vec![]);
    }
}
