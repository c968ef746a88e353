//! Clients that record what they saw: each operation's invoke and completion, in the history
//! format of DESIGN.md §7, and a follower per node recording its deliveries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tob_client::{Client, ClientConfig, ClientError};
use tob_proto::{ErrorCode, Outcome, ReadConsistency, Seq};
use tob_sim::history::{Event, History};

use crate::nemesis::Rng;

const NAMESPACE: &str = "faults";
const KEYS: u64 = 4;

/// Shared by every worker.
pub struct Recorder {
    started: Instant,
    history: Mutex<History>,
    /// The highest acknowledged append, so the end can wait for every follower to reach it.
    pub highest_acked_seq: AtomicU64,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            started: Instant::now(),
            history: Mutex::new(History::default()),
            highest_acked_seq: AtomicU64::new(0),
        }
    }

    pub fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn push(&self, event: Event) {
        self.history.lock().unwrap().push(event);
    }

    /// The highest `seq` each of nodes n1..n{nodes} has delivered.
    pub fn delivered_up_to(&self, nodes: usize) -> Vec<u64> {
        let history = self.history.lock().unwrap();
        (1..=nodes)
            .map(|i| {
                let name = format!("n{i}");
                history
                    .events
                    .iter()
                    .filter(|e| e.kind == "deliver" && e.node.as_deref() == Some(name.as_str()))
                    .filter_map(|e| e.seq)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The history so far, sorted, leaving it in place.
    pub fn snapshot(&self) -> History {
        let mut history = self.history.lock().unwrap().clone();
        history.sort();
        history
    }

    pub fn take(&self) -> History {
        let mut history = std::mem::take(&mut *self.history.lock().unwrap());
        history.sort();
        history
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

fn client(nodes: Vec<String>, stop: Option<Arc<AtomicBool>>) -> Client {
    let mut config = ClientConfig::new(nodes, 1);
    config.connect_timeout = Duration::from_millis(300);
    config.request_timeout = Duration::from_secs(3);
    let mut client = Client::new(config);
    if let Some(stop) = stop {
        client.set_interrupt(move || stop.load(Ordering::Relaxed));
    }
    client
}

/// `ok` with its value, `fail` (it definitely did not happen) or `info` (unknown).
fn completion(result: Result<Value, ClientError>) -> (&'static str, Value) {
    match result {
        Ok(value) => ("ok", value),
        Err(ClientError::Refused { code, .. })
            if matches!(
                code,
                ErrorCode::Malformed
                    | ErrorCode::TooLarge
                    | ErrorCode::Empty
                    | ErrorCode::UnknownSession
                    | ErrorCode::SessionRequired
            ) =>
        {
            ("fail", json!({"error": code.name()}))
        }
        // Timeouts, lost connections, refusals after retries: it may have happened.
        Err(e) => ("info", json!({"error": e.to_string()})),
    }
}

/// One client process: claims, releases and reads on a few hot keys (`claims`), appends
/// (`appends`) or a counter (`counter`), until `stop`.
pub fn worker(
    process: u64,
    kind: &'static str,
    nodes: Vec<String>,
    seed: u64,
    think: Duration,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed ^ process.wrapping_mul(0x517c_c1b7_2722_0a95));
    let mut client = client(nodes.clone(), None);
    let owner = format!("p{process}");
    let mut serial = 0u64;
    if !matches!(kind, "appends" | "counter") {
        // Claims need their namespace declared (idempotent; retried through any fault).
        while !stop.load(Ordering::Relaxed) && client.create_namespace(NAMESPACE).is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    while !stop.load(Ordering::Relaxed) {
        // Think time (0–2× the mean) keeps long runs' histories a checkable size.
        let think_us = think.as_micros() as u64;
        if think_us > 0 {
            std::thread::sleep(Duration::from_micros(rng.range(0, 2 * think_us)));
        }
        serial += 1;
        let key = format!("k{}", rng.range(0, KEYS));
        let (f, history_key, invoke, mode): (&str, Value, Value, Option<&str>) = match kind {
            "appends" => (
                "append",
                Value::Null,
                json!({"id": format!("{owner}-{serial}"), "payload": format!("{owner}-{serial}")}),
                None,
            ),
            "counter" => ("next", json!("c"), Value::Null, None),
            _ => match rng.range(0, 10) {
                0..=3 => ("claim", json!(key), json!({"owner": owner}), None),
                4..=5 => ("release", json!(key), json!({"owner": owner}), None),
                n => (
                    "read",
                    json!(key),
                    Value::Null,
                    Some(["index", "lease", "log", "index"][n as usize - 6]),
                ),
            },
        };
        let mut event =
            Event::op(process, "invoke", f, history_key.clone(), invoke.clone(), recorder.now());
        event.mode = mode.map(str::to_owned);
        recorder.push(event);
        let result = match f {
            "append" => {
                let id = invoke["id"].as_str().unwrap_or_default().to_owned();
                client.append(None, id.as_bytes()).map(|seq| {
                    recorder.highest_acked_seq.fetch_max(seq.0, Ordering::Relaxed);
                    json!({"seq": seq.0})
                })
            }
            "next" => client.next("c").map(|value| json!({"value": value})),
            "claim" => client.claim(NAMESPACE, &key, &owner).and_then(|outcome| match outcome {
                Outcome::Claimed { token } => Ok(json!({"result": "claimed", "token": token.0})),
                Outcome::Taken { current } => {
                    Ok(json!({"result": "taken", "owner": current.owner}))
                }
                Outcome::Error { code } => {
                    Err(ClientError::Refused { code, message: code.name().into() })
                }
                other => Err(ClientError::Protocol(format!("{other:?}"))),
            }),
            "release" => {
                client.release(NAMESPACE, &key, &owner).and_then(|outcome| match outcome {
                    Outcome::Released => Ok(json!({"result": "released"})),
                    Outcome::NotOwner => Ok(json!({"result": "not_owner"})),
                    Outcome::Error { code } => {
                        Err(ClientError::Refused { code, message: code.name().into() })
                    }
                    other => Err(ClientError::Protocol(format!("{other:?}"))),
                })
            }
            _ => {
                let consistency = ReadConsistency::parse(mode.unwrap_or("index")).expect("a mode");
                client
                    .owner(NAMESPACE, &key, consistency)
                    .map(|owner| json!({"owner": owner.map(|o| o.owner)}))
            }
        };
        let (outcome, value) = completion(result);
        let mut event = Event::op(process, outcome, f, history_key, value, recorder.now());
        event.mode = mode.map(str::to_owned);
        recorder.push(event);
        if outcome == "info" {
            // A fresh client id: the old one's request may still be in flight somewhere.
            client = self::client(nodes.clone(), None);
        }
    }
}

/// Follows the total order at one node, recording each delivery, until `stop`.
pub fn follower(node: String, address: String, recorder: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut next = Seq(1);
    while !stop.load(Ordering::Relaxed) {
        let mut client = client(vec![address.clone()], Some(stop.clone()));
        let _ = client.follow(next, None, |m| {
            let id = String::from_utf8_lossy(&m.payload).into_owned();
            recorder.push(Event::deliver(&node, m.seq.0, &id, recorder.now()));
            next = Seq(m.seq.0 + 1);
            !stop.load(Ordering::Relaxed)
        });
        std::thread::sleep(Duration::from_millis(50));
    }
}
