//! Simulated clients. Each is one sequential process doing a random mix of operations — appends,
//! claims on a few hot keys (deliberate contention), releases, reads in all three modes,
//! counters, transactions (session, pending claim, prepare/finalize or release), and messages
//! staged under a transaction and then settled as committed or aborted (`Stage`, `Settle`:
//! what `tob_append_on_commit` does) — and retrying each request with the same request id
//! until it is answered or given up.

use serde_json::{Value, json};
use tob_proto::{
    ClaimKey, ClaimKind, ClientId, Command, ErrorCode, Outcome, Request, RequestId, SessionId,
    StagedMessage,
};
use tob_raft::{ReadMode, SplitMix64};

use crate::network::CallBody;

pub const NAMESPACE: &str = "users";
/// The contended usernames every client fights over.
pub const KEYS: [&str; 4] = ["alice", "bob", "carol", "dave"];
pub const SESSION_TTL_MS: u64 = 1_500;

/// How a `read` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    Log,
    Index,
    Lease,
}

impl ReadKind {
    pub fn name(self) -> &'static str {
        match self {
            ReadKind::Log => "log",
            ReadKind::Index => "index",
            ReadKind::Lease => "lease",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    Append {
        topic: Option<String>,
        id: String,
    },
    Claim {
        key: String,
        owner: String,
        kind: ClaimKind,
    },
    Release {
        key: String,
        owner: String,
        holder: Option<String>,
    },
    Read {
        key: String,
        mode: ReadKind,
    },
    Next {
        counter: String,
    },
    OpenSession,
    KeepAlive,
    Prepare {
        key: String,
        holder: String,
    },
    Finalize {
        key: String,
        holder: String,
    },
    CreateNamespace,
    /// Stage messages `ids` under `holder` (not recorded: retried until answered).
    Stage {
        holder: String,
        topic: Option<String>,
        ids: Vec<String>,
    },
    /// Settle `holder` as committed or aborted: the history's `append_on_commit`.
    SettleStaged {
        holder: String,
        ids: Vec<String>,
        commit: bool,
    },
}

impl Op {
    /// The history's `f`, for operations the history records.
    pub fn f(&self) -> Option<&'static str> {
        match self {
            Op::Append { .. } => Some("append"),
            Op::Claim { .. } => Some("claim"),
            Op::Release { .. } => Some("release"),
            Op::Read { .. } => Some("read"),
            Op::Next { .. } => Some("next"),
            Op::SettleStaged { .. } => Some("append_on_commit"),
            _ => None,
        }
    }

    pub fn history_key(&self) -> Value {
        match self {
            Op::Append { topic, .. } => topic.clone().map(Value::String).unwrap_or(Value::Null),
            Op::Claim { key, .. } | Op::Release { key, .. } | Op::Read { key, .. } => json!(key),
            Op::Next { counter } => json!(counter),
            _ => Value::Null,
        }
    }

    pub fn invoke_value(&self) -> Value {
        match self {
            Op::Append { id, .. } => json!({"id": id, "payload": id}),
            Op::Claim { owner, .. } | Op::Release { owner, .. } => json!({"owner": owner}),
            Op::SettleStaged { ids, commit, .. } => json!({"ids": ids, "commit": commit}),
            _ => Value::Null,
        }
    }

    pub fn read_mode(&self) -> Option<&'static str> {
        match self {
            Op::Read { mode, .. } => Some(mode.name()),
            _ => None,
        }
    }
}

fn claim_key(key: &str) -> ClaimKey {
    ClaimKey { namespace: NAMESPACE.into(), key: key.into() }
}

/// The operation in flight.
#[derive(Debug, Clone)]
pub struct Current {
    pub op: Op,
    pub request_id: RequestId,
    pub invoke_ns: u64,
    pub give_up_ns: u64,
    /// Bumped on every send so a stale timer can be told from the live one.
    pub attempt: u64,
}

#[derive(Debug, Clone)]
struct Txn {
    key: String,
    owner: String,
    kind: ClaimKind,
    prepared: bool,
}

pub struct SimClient {
    pub index: usize,
    /// History process id; replaced by a fresh one after an `info`, as Jepsen does, because
    /// the abandoned request may still take effect concurrently with later ones.
    pub process: u64,
    client_id: ClientId,
    next_request: u64,
    pub current: Option<Current>,
    pub target: usize,
    session: Option<SessionId>,
    keepalive_due_ns: u64,
    txn: Option<Txn>,
    /// Messages staged and not settled yet: `(holder, ids)`.
    staged: Option<(String, Vec<String>)>,
    serial: u64,
    pub completed: u64,
    /// This client's `CreateNamespace` was acknowledged: from then on the namespace must
    /// exist on every node, through crashes, elections and snapshots.
    namespace_created: bool,
}

/// How a completed operation goes into the history.
pub enum Completion {
    Ok(Value),
    Fail(Value),
    NotRecorded,
}

impl SimClient {
    pub fn new(index: usize, seed: u64, nodes: usize) -> SimClient {
        SimClient {
            index,
            process: index as u64 + 1,
            client_id: ClientId((u128::from(seed) << 32) | index as u128),
            next_request: 1,
            current: None,
            target: index % nodes,
            session: None,
            keepalive_due_ns: 0,
            txn: None,
            staged: None,
            serial: 0,
            completed: 0,
            namespace_created: false,
        }
    }

    /// Picks the next operation.
    pub fn choose(&mut self, rng: &mut SplitMix64, now: u64) -> Op {
        self.serial += 1;
        let p = self.process;
        if !self.namespace_created {
            // Claims need a declared namespace: every client declares it first (idempotent).
            return Op::CreateNamespace;
        }
        if let Some((holder, ids)) = self.staged.take() {
            // Most transactions commit.
            return Op::SettleStaged { holder, ids, commit: rng.chance(800_000) };
        }
        if let Some(txn) = &self.txn {
            let holder = txn.owner.clone();
            match txn.kind {
                ClaimKind::Transactional if txn.prepared => {
                    return Op::Finalize { key: txn.key.clone(), holder };
                }
                ClaimKind::Transactional if rng.chance(700_000) => {
                    return Op::Prepare { key: txn.key.clone(), holder };
                }
                ClaimKind::Transactional => {
                    let (key, owner) = (txn.key.clone(), txn.owner.clone());
                    return Op::Release { key, owner, holder: Some(holder) };
                }
                _ if rng.chance(300_000) => {
                    let (key, owner) = (txn.key.clone(), txn.owner.clone());
                    return Op::Release { key, owner, holder: Some(holder) };
                }
                _ => {}
            }
        }
        if self.session.is_some() && now >= self.keepalive_due_ns {
            return Op::KeepAlive;
        }
        if self.session.is_some() && rng.chance(10_000) {
            // The client dies without cleaning up: its session must expire on its own.
            self.session = None;
            self.txn = None;
        }
        let key = KEYS[rng.range(0, KEYS.len() as u64) as usize].to_owned();
        // Odd clients only read: they keep reading while writers beside the same node are
        // stuck, so they are the ones that see a stale read if a deposed leader answers one.
        let roll = if self.index % 2 == 1 { 60 } else { rng.range(0, 100) };
        match roll {
            0..=4 => {
                let topic = Some(format!("t{}", rng.range(1, 3)));
                let ids =
                    (0..rng.range(1, 4)).map(|k| format!("m{p}-{}-{k}", self.serial)).collect();
                Op::Stage { holder: format!("p{p}x{}", self.serial), topic, ids }
            }
            5..=24 => {
                let topic = match rng.range(0, 3) {
                    0 => None,
                    t => Some(format!("t{t}")),
                };
                Op::Append { topic, id: format!("m{p}-{}", self.serial) }
            }
            25..=41 => Op::Claim { key, owner: format!("p{p}"), kind: ClaimKind::Held },
            42..=51 => Op::Release { key, owner: format!("p{p}"), holder: None },
            52..=71 => {
                // Readers skip log reads, which wait with the writers when the log is stuck.
                let first_mode = if self.index % 2 == 1 { 1 } else { 0 };
                let mode = match rng.range(first_mode, 3) {
                    0 => ReadKind::Log,
                    1 => ReadKind::Index,
                    _ => ReadKind::Lease,
                };
                Op::Read { key, mode }
            }
            72..=79 => Op::Next { counter: format!("c{}", rng.range(0, 2)) },
            _ if self.session.is_none() => Op::OpenSession,
            80..=93 => Op::Claim {
                key,
                owner: format!("p{p}t{}", self.serial),
                kind: ClaimKind::Transactional,
            },
            _ => Op::Claim {
                key,
                owner: format!("p{p}l{}", self.serial),
                kind: ClaimKind::Ephemeral,
            },
        }
    }

    /// Starts `op`; returns its request id.
    pub fn start(&mut self, op: Op, now: u64, give_up_ns: u64) -> RequestId {
        let request_id = RequestId(self.next_request);
        self.next_request += 1;
        self.current = Some(Current { op, request_id, invoke_ns: now, give_up_ns, attempt: 0 });
        request_id
    }

    /// The call to send for the current operation.
    pub fn call(&self) -> CallBody {
        let current = self.current.as_ref().expect("an operation in flight");
        let command = match &current.op {
            Op::Read { key, mode: ReadKind::Index } => {
                return CallBody::Read { key: claim_key(key), mode: ReadMode::Index };
            }
            Op::Read { key, mode: ReadKind::Lease } => {
                return CallBody::Read { key: claim_key(key), mode: ReadMode::Lease };
            }
            Op::Read { key, mode: ReadKind::Log } => Command::Read { key: claim_key(key) },
            Op::Append { topic, id } => {
                Command::Append { topic: topic.clone(), payload: id.as_bytes().to_vec() }
            }
            Op::Claim { key, owner, kind } => Command::Claim {
                key: claim_key(key),
                owner: owner.clone(),
                holder: owner.clone(),
                kind: *kind,
                session: if *kind == ClaimKind::Held { None } else { self.session },
            },
            Op::Release { key, owner, holder } => Command::Release {
                key: claim_key(key),
                owner: owner.clone(),
                holder: holder.clone(),
            },
            Op::Next { counter } => Command::Next { counter: counter.clone() },
            Op::OpenSession => Command::OpenSession { ttl_ms: SESSION_TTL_MS },
            Op::KeepAlive => Command::KeepAlive { session: self.session.unwrap_or(SessionId(0)) },
            Op::Prepare { key, holder } => {
                Command::Prepare { holder: holder.clone(), keys: vec![claim_key(key)] }
            }
            Op::Finalize { key, holder } => {
                Command::Finalize { holder: holder.clone(), keys: vec![claim_key(key)] }
            }
            Op::CreateNamespace => Command::CreateNamespace { name: NAMESPACE.into() },
            Op::Stage { holder, topic, ids } => Command::Stage {
                holder: holder.clone(),
                messages: ids
                    .iter()
                    .map(|id| StagedMessage {
                        topic: topic.clone(),
                        payload: id.as_bytes().to_vec(),
                    })
                    .collect(),
            },
            Op::SettleStaged { holder, commit, .. } => {
                let holders = vec![holder.clone()];
                if *commit {
                    Command::Settle { committed: holders, aborted: vec![] }
                } else {
                    Command::Settle { committed: vec![], aborted: holders }
                }
            }
        };
        CallBody::Command(Request {
            client: Some(self.client_id),
            request_id: current.request_id,
            // One request at a time: everything before this one is answered or abandoned.
            first_incomplete: current.request_id,
            command,
        })
    }

    /// The current operation was answered. Returns what to record, or an error describing an
    /// answer that makes no sense for the operation.
    pub fn complete(&mut self, outcome: Outcome, now: u64) -> Result<Completion, String> {
        let current = self.current.take().expect("an operation in flight");
        self.completed += 1;
        let unexpected = |o: &Outcome| Err(format!("{:?} answered with {o:?}", current.op));
        if let Outcome::Error { code } = outcome {
            match code {
                ErrorCode::UnknownSession => {
                    self.session = None;
                    self.txn = None;
                }
                ErrorCode::RequestForgotten => {
                    return Err(format!("{:?}: request forgotten while in flight", current.op));
                }
                ErrorCode::UnknownNamespace if self.namespace_created => {
                    return Err(format!("{:?}: the namespace created earlier is gone", current.op));
                }
                _ => {}
            }
            let completion = match current.op.f() {
                Some(_) => Completion::Fail(json!({"error": code.name()})),
                None => Completion::NotRecorded,
            };
            return Ok(completion);
        }
        let value = match (&current.op, &outcome) {
            (Op::Append { .. }, Outcome::Appended { seq }) => json!({"seq": seq.0}),
            (Op::Claim { key, owner, kind }, Outcome::Claimed { token }) => {
                if *kind != ClaimKind::Held {
                    let txn = Txn {
                        key: key.clone(),
                        owner: owner.clone(),
                        kind: *kind,
                        prepared: false,
                    };
                    self.txn = Some(txn);
                }
                json!({"result": "claimed", "token": token.0})
            }
            (Op::Claim { .. }, Outcome::Taken { current }) => {
                json!({"result": "taken", "owner": current.owner})
            }
            (Op::Release { holder, .. }, Outcome::Released | Outcome::NotOwner) => {
                if holder.is_some() {
                    self.txn = None;
                }
                let result = if outcome == Outcome::Released { "released" } else { "not_owner" };
                json!({"result": result})
            }
            (Op::Read { .. }, Outcome::Owner { current }) => {
                json!({"owner": current.as_ref().map(|c| c.owner.clone())})
            }
            (Op::Next { .. }, Outcome::Counter { value }) => json!({"value": value}),
            (Op::OpenSession, Outcome::SessionOpened { session }) => {
                self.session = Some(*session);
                self.keepalive_due_ns = now + SESSION_TTL_MS * 1_000_000 / 3;
                return Ok(Completion::NotRecorded);
            }
            (Op::KeepAlive, Outcome::KeptAlive) => {
                self.keepalive_due_ns = now + SESSION_TTL_MS * 1_000_000 / 3;
                return Ok(Completion::NotRecorded);
            }
            (Op::Prepare { .. }, Outcome::Prepared) => {
                if let Some(txn) = &mut self.txn {
                    txn.prepared = true;
                }
                return Ok(Completion::NotRecorded);
            }
            (Op::Stage { holder, ids, .. }, Outcome::Staged { .. }) => {
                self.staged = Some((holder.clone(), ids.clone()));
                return Ok(Completion::NotRecorded);
            }
            (Op::SettleStaged { .. }, Outcome::Settled { .. }) => json!({"result": "settled"}),
            (Op::CreateNamespace, Outcome::NamespaceCreated { .. }) => {
                self.namespace_created = true;
                return Ok(Completion::NotRecorded);
            }
            (Op::Prepare { .. }, Outcome::Lost { .. })
            | (Op::Finalize { .. }, Outcome::Finalized) => {
                self.txn = None;
                return Ok(Completion::NotRecorded);
            }
            (_, other) => return unexpected(other),
        };
        Ok(Completion::Ok(value))
    }

    /// The current operation is abandoned with its outcome unknown.
    pub fn give_up(&mut self, clients: usize) -> Current {
        let current = self.current.take().expect("an operation in flight");
        if current.op.f().is_some() {
            self.process += clients as u64;
        }
        current
    }
}
