//! Client histories in the Jepsen-style JSON Lines format of DESIGN.md §7: one event a line,
//! `time` in integer nanoseconds from one monotonic clock.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub process: Option<u64>,
    /// `invoke`, `ok`, `fail`, `info`, `deliver` or `deliver_start`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub f: Option<String>,
    /// Present (possibly `null`) on operations; absent on deliveries.
    #[serde(skip_serializing_if = "Option::is_none", default, with = "present_null")]
    pub key: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default, with = "present_null")]
    pub value: Option<Value>,
    /// Read mode of a `read` (`log`, `index`, `lease`); informational.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    pub time: u64,
}

/// `Some(Value::Null)` is written as `null`; `None` is omitted.
mod present_null {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(value: &Option<Value>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serde::Serialize::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Ok(Some(Value::deserialize(d)?))
    }
}

impl Event {
    pub fn op(process: u64, kind: &str, f: &str, key: Value, value: Value, time: u64) -> Event {
        Event {
            process: Some(process),
            kind: kind.into(),
            f: Some(f.into()),
            key: Some(key),
            value: Some(value),
            mode: None,
            node: None,
            seq: None,
            id: None,
            time,
        }
    }

    pub fn deliver(node: &str, seq: u64, id: &str, time: u64) -> Event {
        Event {
            process: None,
            kind: "deliver".into(),
            f: None,
            key: None,
            value: None,
            mode: None,
            node: Some(node.into()),
            seq: Some(seq),
            id: Some(id.into()),
            time,
        }
    }

    pub fn deliver_start(node: &str, seq: u64, time: u64) -> Event {
        Event { kind: "deliver_start".into(), id: None, ..Event::deliver(node, seq, "", time) }
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key.as_ref().and_then(Value::as_str)
    }
}

/// A whole history.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Orders events by time; events recorded later at the same time stay after earlier ones.
    pub fn sort(&mut self) {
        self.events.sort_by_key(|e| e.time);
    }

    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for event in &self.events {
            out.push_str(&serde_json::to_string(event).expect("events serialise"));
            out.push('\n');
        }
        out
    }

    pub fn from_jsonl(text: &str) -> Result<History, String> {
        let mut events = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let event = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            events.push(event);
        }
        Ok(History { events })
    }

    /// Pairs each invoke with its completion. Operations with no completion are `info`
    /// (they may or may not have happened) and complete at `u64::MAX`.
    pub fn operations(&self) -> Result<Vec<Operation>, String> {
        let mut open: std::collections::BTreeMap<u64, usize> = Default::default();
        let mut ops: Vec<Operation> = Vec::new();
        for event in &self.events {
            let Some(process) = event.process else { continue };
            match event.kind.as_str() {
                "invoke" => {
                    if open.contains_key(&process) {
                        return Err(format!("process {process} invoked twice without completing"));
                    }
                    open.insert(process, ops.len());
                    ops.push(Operation {
                        process,
                        f: event.f.clone().unwrap_or_default(),
                        key: event.key_str().map(str::to_owned),
                        invoke_value: event.value.clone().unwrap_or(Value::Null),
                        outcome: Outcome::Info,
                        result: Value::Null,
                        invoke_time: event.time,
                        complete_time: u64::MAX,
                    });
                }
                "ok" | "fail" | "info" => {
                    let index = open
                        .remove(&process)
                        .ok_or_else(|| format!("process {process} completed without invoking"))?;
                    let op = &mut ops[index];
                    if event.f.as_deref() != Some(op.f.as_str()) {
                        return Err(format!("process {process}: completion f differs from invoke"));
                    }
                    op.outcome = match event.kind.as_str() {
                        "ok" => Outcome::Ok,
                        "fail" => Outcome::Fail,
                        _ => Outcome::Info,
                    };
                    op.result = event.value.clone().unwrap_or(Value::Null);
                    if op.outcome != Outcome::Info {
                        op.complete_time = event.time;
                    }
                }
                other => return Err(format!("unknown event type {other}")),
            }
        }
        Ok(ops)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// An invoke and its completion.
#[derive(Debug, Clone)]
pub struct Operation {
    pub process: u64,
    pub f: String,
    pub key: Option<String>,
    pub invoke_value: Value,
    pub outcome: Outcome,
    pub result: Value,
    pub invoke_time: u64,
    /// `u64::MAX` for operations whose effect is unknown.
    pub complete_time: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_the_design_format() {
        let e = Event::op(3, "invoke", "claim", json!("alice"), json!({"owner": "u1"}), 1200);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"process":3,"type":"invoke","f":"claim","key":"alice","value":{"owner":"u1"},"time":1200}"#
        );
        let append = Event::op(1, "invoke", "append", Value::Null, json!({"id": "m1"}), 5);
        assert!(serde_json::to_string(&append).unwrap().contains(r#""key":null"#));
        let d = Event::deliver("n1", 4, "m7", 9);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"type":"deliver","node":"n1","seq":4,"id":"m7","time":9}"#
        );
    }

    #[test]
    fn round_trips_and_pairs_operations() {
        let mut h = History::default();
        h.push(Event::op(1, "invoke", "read", json!("k"), Value::Null, 1));
        h.push(Event::op(2, "invoke", "claim", json!("k"), json!({"owner": "a"}), 2));
        h.push(Event::op(1, "ok", "read", json!("k"), json!({"owner": null}), 3));
        let back = History::from_jsonl(&h.to_jsonl()).unwrap();
        assert_eq!(back.events, h.events);
        let ops = back.operations().unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].outcome, Outcome::Ok);
        assert_eq!(ops[1].outcome, Outcome::Info);
        assert_eq!(ops[1].complete_time, u64::MAX);
    }
}
