//! tob's replicated state machine.
//!
//! Every replica applies the same committed log entries in the same order and so reaches the
//! same state: the total order of messages (dense `seq`), claims with fencing tokens, gap-free
//! counters, sessions with leases, and the client de-duplication table. Nothing here reads a
//! clock: session expiry is itself a command (`Expire`) that the leader proposes, and it only
//! takes effect if no keep-alive was applied in between.
//!
//! Snapshots are the `postcard` encoding of [`MachineState`], whose collections are all ordered
//! (`BTreeMap`, `VecDeque`, and claims by a fixed hash of their key), so replicas at the same
//! index produce byte-identical snapshots.
//!
//! Claims need a declared namespace (`CreateNamespace`), so that a misspelt namespace is an
//! error rather than a second uniqueness domain. The rule starts at a log position: a state
//! machine starts without it and takes it on when it applies `RequireNamespaces`, which a
//! leader proposes when it finds it missing. A log written before namespaces existed is so
//! applied with the rules it was written under, and no acknowledged claim changes its fate.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod claim_table;
mod expiry;

pub use expiry::ExpiryWatch;

use serde::{Deserialize, Serialize};
use tob_proto::{
    ClaimKey, ClaimKind, ClaimState, ClientId, Command, ErrorCode, FencingToken, Limits, Outcome,
    OwnerInfo, RESERVED_NAMESPACE_PREFIX, ReleasedClaim, Request, RequestId, Seq, SessionId,
    StagedMessage,
};

use crate::claim_table::ClaimTable;

/// Deliberately wrong behaviour for the simulator's self-tests (`planted-bugs` feature only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineBugs {
    /// Apply a retried request again instead of answering from the de-duplication table.
    pub apply_retries_twice: bool,
    /// Restore a snapshot without its declared namespaces (the rule stays in force).
    pub forget_namespaces_on_restore: bool,
}

/// Settings that must be identical on every replica (they change what commands do).
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub limits: Limits,
    /// Remembered answers per client; older ones are forgotten (a retry of one gets
    /// [`ErrorCode::RequestForgotten`], never a second application).
    pub dedup_per_client_max: usize,
    /// Clients remembered; the least recently active is forgotten beyond this.
    pub dedup_clients_max: usize,
    /// Messages kept for `read`; older ones are trimmed (reads of them get `Compacted`).
    pub messages_retained_max: usize,
    pub bugs: MachineBugs,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            limits: Limits::default(),
            dedup_per_client_max: 1024,
            dedup_clients_max: 100_000,
            messages_retained_max: 1_000_000,
            bugs: MachineBugs::default(),
        }
    }
}

/// A message in the total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub seq: Seq,
    pub topic: Option<String>,
    pub payload: Vec<u8>,
}

/// What [`Machine::messages_page`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesPage {
    pub messages: Vec<StoredMessage>,
    /// No further message of the read existed: the page is all of it.
    pub complete: bool,
}

/// What a message is counted as beyond its payload when pages are cut to a byte budget (its
/// seq, topic and framing in a reply).
pub const MESSAGE_OVERHEAD_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClaimRecord {
    owner: String,
    holder: String,
    state: ClaimState,
    token: FencingToken,
    /// The session whose expiry releases this claim (pending or ephemeral claims only).
    session: Option<SessionId>,
    /// A transaction whose commit releases this claim (`ReleaseOnCommit`).
    releasing: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub ttl_ms: u64,
    /// Keep-alives applied so far; `Expire` must name this count to take effect.
    pub keepalives: u64,
    claims: BTreeSet<ClaimKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRecord {
    /// Requests below this id are answered and forgotten.
    floor: RequestId,
    answers: BTreeMap<RequestId, Outcome>,
    last_active_index: u64,
}

/// Everything replicated. Its encoding is the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    applied_index: u64,
    last_seq: u64,
    messages: VecDeque<StoredMessage>,
    claims: ClaimTable<ClaimRecord>,
    /// `(holder, key)` of every claim a transaction has in flight: pending or prepared by that
    /// holder, or scheduled for release at its commit. What `Settle` and reconcilers walk.
    in_flight: BTreeSet<(String, ClaimKey)>,
    counters: BTreeMap<String, u64>,
    sessions: BTreeMap<SessionId, SessionRecord>,
    clients: BTreeMap<ClientId, ClientRecord>,
    /// `(last_active_index, client)` of every client, to find the idlest in O(log n).
    clients_by_activity: BTreeSet<(u64, ClientId)>,
    /// Encoded after the fields above (see [`Machine::snapshot`]): a snapshot written before
    /// namespaces existed ends where they end.
    #[serde(skip)]
    namespaces: Namespaces,
    /// Messages of transactions not settled yet (`Stage`), by holder. Encoded after the
    /// namespaces: a snapshot written before staging existed ends with them.
    #[serde(skip)]
    staged: BTreeMap<String, Staged>,
}

/// One holder's staged messages, in the order staged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    payload_bytes: u64,
    messages: Vec<StagedMessage>,
}

/// Declared namespaces, and whether claims need one yet (see the crate docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Namespaces {
    required: bool,
    declared: BTreeSet<String>,
}

/// A leader's part in starting the namespace rule: it proposes `RequireNamespaces` once per
/// term while its state machine lacks the rule (the entry may be in its log, not applied yet;
/// a second one is harmless). Pure, like [`ExpiryWatch`]; the caller checks it leads.
#[derive(Debug, Default)]
pub struct NamespaceRuleWatch {
    proposed_in: Option<u64>,
}

impl NamespaceRuleWatch {
    /// The request to propose now, as leader of `term`, if any.
    pub fn due(&mut self, machine: &Machine, term: u64) -> Option<Request> {
        if machine.namespaces_required() || self.proposed_in == Some(term) {
            return None;
        }
        self.proposed_in = Some(term);
        Some(Request {
            client: None,
            request_id: RequestId(0),
            first_incomplete: RequestId(0),
            command: Command::RequireNamespaces,
        })
    }
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub request: Request,
    pub outcome: Outcome,
    /// The answer came from the de-duplication table: nothing changed.
    pub duplicate: bool,
}

/// A replica of the state machine.
#[derive(Debug, Clone)]
pub struct Machine {
    config: MachineConfig,
    state: MachineState,
    /// Messages staged in `state`, all holders together: read by the node's metrics after
    /// every batch, so counted as they come and go rather than summed each time.
    staged_messages: u64,
}

impl Machine {
    pub fn new(config: MachineConfig) -> Machine {
        Machine { config, state: MachineState::default(), staged_messages: 0 }
    }

    /// The last log index applied (including no-ops).
    pub fn applied_index(&self) -> u64 {
        self.state.applied_index
    }

    /// Marks a log entry that carries no command (a leader's no-op) as applied.
    pub fn apply_noop(&mut self, index: u64) {
        self.advance_to(index);
    }

    /// Applies the command bytes of the entry at `index`. Returns `None` only for bytes that do
    /// not decode (nobody can be answered; the entry is skipped identically everywhere).
    pub fn apply(&mut self, index: u64, bytes: &[u8]) -> Option<Applied> {
        self.advance_to(index);
        let request = Request::decode(bytes).ok()?;
        let Some(client) = request.client else {
            let outcome = self.execute(index, &request.command);
            return Some(Applied { request, outcome, duplicate: false });
        };
        if let Some(answer) = self.dedup_lookup(client, &request, index) {
            return Some(Applied { request, outcome: answer, duplicate: true });
        }
        let outcome = self.execute(index, &request.command);
        self.remember(client, request.request_id, outcome.clone());
        Some(Applied { request, outcome, duplicate: false })
    }

    fn advance_to(&mut self, index: u64) {
        assert!(index > self.state.applied_index, "entries applied out of order");
        self.state.applied_index = index;
    }

    /// The remembered answer to a retried request, or an error if it was forgotten.
    fn dedup_lookup(&mut self, client: ClientId, request: &Request, index: u64) -> Option<Outcome> {
        let record = self.state.clients.entry(client).or_insert_with(|| ClientRecord {
            floor: RequestId(0),
            answers: BTreeMap::new(),
            last_active_index: index,
        });
        self.state.clients_by_activity.remove(&(record.last_active_index, client));
        record.last_active_index = index;
        self.state.clients_by_activity.insert((index, client));
        if request.first_incomplete > record.floor {
            record.floor = request.first_incomplete;
            // Usually zero or one answer to drop: pop them rather than split the tree.
            while record.answers.first_key_value().is_some_and(|(id, _)| *id < record.floor) {
                record.answers.pop_first();
            }
        }
        if cfg!(feature = "planted-bugs") && self.config.bugs.apply_retries_twice {
            return None;
        }
        if let Some(answer) = record.answers.get(&request.request_id) {
            return Some(answer.clone());
        }
        if request.request_id < record.floor {
            return Some(Outcome::Error { code: ErrorCode::RequestForgotten });
        }
        None
    }

    fn remember(&mut self, client: ClientId, request_id: RequestId, outcome: Outcome) {
        let per_client_max = self.config.dedup_per_client_max;
        let record = self.state.clients.get_mut(&client).expect("created by dedup_lookup");
        record.answers.insert(request_id, outcome);
        while record.answers.len() > per_client_max {
            let (&oldest, _) = record.answers.iter().next().expect("non-empty");
            record.answers.remove(&oldest);
            record.floor = record.floor.max(RequestId(oldest.0 + 1));
        }
        if self.state.clients.len() > self.config.dedup_clients_max {
            let (_, idlest) = self.state.clients_by_activity.pop_first().expect("non-empty");
            self.state.clients.remove(&idlest);
        }
    }

    fn execute(&mut self, index: u64, command: &Command) -> Outcome {
        if let Err(refused) = self.config.limits.check(command) {
            return Outcome::Error { code: refused.code };
        }
        match command {
            Command::Append { topic, payload } => self.append(topic.clone(), payload.clone()),
            Command::Claim { key, owner, holder, kind, session } => {
                if let Err(code) = self.check_namespace(&key.namespace) {
                    return Outcome::Error { code };
                }
                self.claim(index, key, owner, holder, *kind, *session)
            }
            Command::Prepare { holder, keys } => self.prepare(holder, keys),
            Command::Finalize { holder, keys } => self.finalize(holder, keys),
            Command::Release { key, .. }
            | Command::ReleaseOnCommit { key, .. }
            | Command::Read { key }
                if self.check_namespace(&key.namespace).is_err() =>
            {
                Outcome::Error { code: ErrorCode::UnknownNamespace }
            }
            Command::Release { key, owner, holder } => self.release(key, owner, holder.as_deref()),
            Command::ReleaseOnCommit { key, owner, holder } => {
                self.release_on_commit(key, owner, holder)
            }
            Command::KeepOnCommit { key, holder } => self.keep_on_commit(key, holder),
            Command::Settle { committed, aborted } => {
                let settled = committed.iter().map(|h| self.settle(h, true)).sum::<u64>()
                    + aborted.iter().map(|h| self.settle(h, false)).sum::<u64>();
                for holder in committed {
                    self.settle_staged(holder, true);
                }
                for holder in aborted {
                    self.settle_staged(holder, false);
                }
                Outcome::Settled { claims: settled }
            }
            Command::Read { key } => Outcome::Owner { current: self.owner(key) },
            Command::Next { counter } => {
                let value = self.state.counters.entry(counter.clone()).or_insert(0);
                *value += 1;
                Outcome::Counter { value: *value }
            }
            Command::OpenSession { ttl_ms } => {
                let session = SessionId(index);
                let record =
                    SessionRecord { ttl_ms: *ttl_ms, keepalives: 0, claims: BTreeSet::new() };
                self.state.sessions.insert(session, record);
                Outcome::SessionOpened { session }
            }
            Command::KeepAlive { session } => match self.state.sessions.get_mut(session) {
                Some(record) => {
                    record.keepalives += 1;
                    Outcome::KeptAlive
                }
                None => Outcome::Error { code: ErrorCode::UnknownSession },
            },
            Command::Expire { session, keepalives_seen } => self.expire(*session, *keepalives_seen),
            Command::CreateNamespace { name } => {
                let created = !name.starts_with(RESERVED_NAMESPACE_PREFIX)
                    && self.state.namespaces.declared.insert(name.clone());
                Outcome::NamespaceCreated { created }
            }
            Command::RequireNamespaces => self.require_namespaces(),
            Command::Stage { holder, messages } => self.stage(holder, messages),
        }
    }

    /// Stages `messages` under `holder` until it settles; refused as a whole if the holder's
    /// staged payloads would pass `staged_bytes_max`.
    fn stage(&mut self, holder: &str, messages: &[StagedMessage]) -> Outcome {
        let staged = self.state.staged.get(holder);
        let adding: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        let before = staged.map_or(0, |s| s.payload_bytes);
        if before + adding > self.config.limits.staged_bytes_max as u64 {
            return Outcome::Error { code: ErrorCode::TooLarge };
        }
        let staged = self.state.staged.entry(holder.to_owned()).or_default();
        staged.payload_bytes += adding;
        staged.messages.extend_from_slice(messages);
        self.staged_messages += messages.len() as u64;
        Outcome::Staged { messages: staged.messages.len() as u64 }
    }

    /// From here on claims need a declared namespace; those already in use are declared.
    fn require_namespaces(&mut self) -> Outcome {
        if self.state.namespaces.required {
            return Outcome::NamespacesRequired { declared: Vec::new() };
        }
        let in_use: BTreeSet<&str> = self
            .state
            .claims
            .iter()
            .map(|(key, _)| key.namespace.as_str())
            .filter(|n| !n.starts_with(RESERVED_NAMESPACE_PREFIX))
            .collect();
        let namespaces = &mut self.state.namespaces;
        let declared: Vec<String> = in_use
            .into_iter()
            .filter(|n| !namespaces.declared.contains(*n))
            .map(str::to_owned)
            .collect();
        namespaces.declared.extend(declared.iter().cloned());
        namespaces.required = true;
        Outcome::NamespacesRequired { declared }
    }

    /// `Ok` if claims in `namespace` are accepted: declared, tob's own, or no rule yet.
    pub fn check_namespace(&self, namespace: &str) -> Result<(), ErrorCode> {
        let namespaces = &self.state.namespaces;
        if !namespaces.required
            || namespace.starts_with(RESERVED_NAMESPACE_PREFIX)
            || namespaces.declared.contains(namespace)
        {
            Ok(())
        } else {
            Err(ErrorCode::UnknownNamespace)
        }
    }

    /// Whether `RequireNamespaces` has been applied (a leader proposes it when not).
    pub fn namespaces_required(&self) -> bool {
        self.state.namespaces.required
    }

    /// The declared namespaces, in order.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.state.namespaces.declared.iter().map(String::as_str)
    }

    fn append(&mut self, topic: Option<String>, payload: Vec<u8>) -> Outcome {
        self.state.last_seq += 1;
        let seq = Seq(self.state.last_seq);
        self.state.messages.push_back(StoredMessage { seq, topic, payload });
        while self.state.messages.len() > self.config.messages_retained_max {
            self.state.messages.pop_front();
        }
        Outcome::Appended { seq }
    }

    fn claim(
        &mut self,
        index: u64,
        key: &ClaimKey,
        owner: &str,
        holder: &str,
        kind: ClaimKind,
        session: Option<SessionId>,
    ) -> Outcome {
        let session = match (kind, session) {
            (ClaimKind::Held | ClaimKind::Prepared, _) => None,
            (_, None) => {
                return Outcome::Error { code: ErrorCode::SessionRequired };
            }
            (_, Some(s)) if !self.state.sessions.contains_key(&s) => {
                return Outcome::Error { code: ErrorCode::UnknownSession };
            }
            (_, Some(s)) => Some(s),
        };
        if let Some(existing) = self.state.claims.get(key) {
            if existing.owner == owner && existing.holder == holder {
                return Outcome::Claimed { token: existing.token };
            }
            if let Some(releasing) = existing.releasing.as_ref().filter(|r| *r != holder) {
                let releasing = releasing.clone();
                return Outcome::Releasing { current: info(existing), releasing };
            }
            return Outcome::Taken { current: info(existing) };
        }
        let state = match kind {
            ClaimKind::Transactional => ClaimState::Pending,
            ClaimKind::Prepared => ClaimState::Prepared,
            ClaimKind::Held | ClaimKind::Ephemeral => ClaimState::Held,
        };
        let token = FencingToken(index);
        if let Some(s) = session {
            self.session_mut(s).claims.insert(key.clone());
        }
        if matches!(state, ClaimState::Pending | ClaimState::Prepared) {
            self.state.in_flight.insert((holder.into(), key.clone()));
        }
        let record = ClaimRecord {
            owner: owner.into(),
            holder: holder.into(),
            state,
            token,
            session,
            releasing: None,
        };
        self.state.claims.insert(key.clone(), record);
        Outcome::Claimed { token }
    }

    fn prepare(&mut self, holder: &str, keys: &[ClaimKey]) -> Outcome {
        let lost: Vec<ClaimKey> = keys
            .iter()
            .filter(|key| {
                !self.state.claims.get(key).is_some_and(|c| {
                    c.holder == holder
                        && matches!(c.state, ClaimState::Pending | ClaimState::Prepared)
                })
            })
            .cloned()
            .collect();
        if !lost.is_empty() {
            return Outcome::Lost { keys: lost };
        }
        for key in keys {
            let claim = self.state.claims.get_mut(key).expect("checked above");
            claim.state = ClaimState::Prepared;
            // A prepared claim never expires: its fate is the transaction's.
            if let Some(session) = claim.session.take() {
                self.session_mut(session).claims.remove(key);
            }
        }
        Outcome::Prepared
    }

    fn finalize(&mut self, holder: &str, keys: &[ClaimKey]) -> Outcome {
        for key in keys {
            if let Some(claim) = self.state.claims.get_mut(key)
                && claim.holder == holder
                && claim.state == ClaimState::Prepared
            {
                claim.state = ClaimState::Held;
                self.state.in_flight.remove(&(holder.to_owned(), key.clone()));
            }
        }
        Outcome::Finalized
    }

    fn release(&mut self, key: &ClaimKey, owner: &str, holder: Option<&str>) -> Outcome {
        let owned = self
            .state
            .claims
            .get(key)
            .is_some_and(|c| c.owner == owner && holder.is_none_or(|h| c.holder == h));
        if !owned {
            return Outcome::NotOwner;
        }
        self.remove_claim(key);
        Outcome::Released
    }

    /// Removes a claim and everything that points at it.
    fn remove_claim(&mut self, key: &ClaimKey) -> Option<ClaimRecord> {
        let claim = self.state.claims.remove(key)?;
        if let Some(session) = claim.session {
            self.session_mut(session).claims.remove(key);
        }
        self.state.in_flight.remove(&(claim.holder.clone(), key.clone()));
        if let Some(releasing) = &claim.releasing {
            self.state.in_flight.remove(&(releasing.clone(), key.clone()));
        }
        Some(claim)
    }

    fn release_on_commit(&mut self, key: &ClaimKey, owner: &str, holder: &str) -> Outcome {
        let Some(claim) = self.state.claims.get_mut(key) else { return Outcome::NotOwner };
        // One transaction at a time may schedule a release, as one may delete a row.
        if claim.owner != owner || claim.releasing.as_deref().is_some_and(|r| r != holder) {
            return Outcome::NotOwner;
        }
        claim.releasing = Some(holder.into());
        self.state.in_flight.insert((holder.into(), key.clone()));
        Outcome::ReleaseScheduled
    }

    fn keep_on_commit(&mut self, key: &ClaimKey, holder: &str) -> Outcome {
        if let Some(claim) = self.state.claims.get_mut(key)
            && claim.releasing.as_deref() == Some(holder)
        {
            claim.releasing = None;
            // The holder may still have the claim itself in flight.
            if claim.holder != holder
                || !matches!(claim.state, ClaimState::Pending | ClaimState::Prepared)
            {
                self.state.in_flight.remove(&(holder.to_owned(), key.clone()));
            }
        }
        Outcome::ReleaseScheduled
    }

    /// Resolves every in-flight claim of `holder`; returns how many claims changed.
    fn settle(&mut self, holder: &str, committed: bool) -> u64 {
        let start = (holder.to_owned(), ClaimKey { namespace: String::new(), key: String::new() });
        let keys: Vec<ClaimKey> = self
            .state
            .in_flight
            .range(start..)
            .take_while(|(h, _)| h == holder)
            .map(|(_, key)| key.clone())
            .collect();
        let mut changed = 0;
        for key in keys {
            self.state.in_flight.remove(&(holder.to_owned(), key.clone()));
            let Some(claim) = self.state.claims.get_mut(&key) else { continue };
            let ours = claim.holder == holder
                && matches!(claim.state, ClaimState::Pending | ClaimState::Prepared);
            let releasing = claim.releasing.as_deref() == Some(holder);
            if committed && (releasing || (ours && claim.state == ClaimState::Pending)) {
                // Deleted by the transaction, or claimed but never prepared (a rolled-back
                // savepoint whose release did not get through): not part of what committed.
                self.remove_claim(&key);
            } else if committed && ours {
                claim.state = ClaimState::Held;
            } else if ours {
                self.remove_claim(&key);
            } else if releasing {
                claim.releasing = None;
            } else {
                continue;
            }
            changed += 1;
        }
        changed
    }

    /// Appends `holder`'s staged messages (contiguous, in the order staged) if it committed;
    /// drops them if not. A committed holder's messages follow the claims settled with it.
    fn settle_staged(&mut self, holder: &str, committed: bool) {
        let Some(staged) = self.state.staged.remove(holder) else { return };
        self.staged_messages -= staged.messages.len() as u64;
        if committed {
            for message in staged.messages {
                self.append(message.topic, message.payload);
            }
        }
    }

    fn expire(&mut self, session: SessionId, keepalives_seen: u64) -> Outcome {
        match self.state.sessions.get(&session) {
            None => Outcome::Error { code: ErrorCode::UnknownSession },
            Some(record) if record.keepalives != keepalives_seen => Outcome::KeptAlive,
            Some(_) => {
                let record = self.state.sessions.remove(&session).expect("checked above");
                let mut released = Vec::with_capacity(record.claims.len());
                for key in record.claims {
                    // The session is gone already: unlink it before removing the claim.
                    if let Some(claim) = self.state.claims.get_mut(&key) {
                        claim.session = None;
                    }
                    if let Some(claim) = self.remove_claim(&key) {
                        released.push(ReleasedClaim { key, owner: claim.owner });
                    }
                }
                Outcome::Expired { released }
            }
        }
    }

    fn session_mut(&mut self, session: SessionId) -> &mut SessionRecord {
        self.state.sessions.get_mut(&session).expect("claim bound to a live session")
    }

    // ----- local reads (after ReadIndex or under a lease) -----------------------------------

    /// The current owner of a key.
    pub fn owner(&self, key: &ClaimKey) -> Option<OwnerInfo> {
        self.state.claims.get(key).map(info)
    }

    /// The last `seq` assigned.
    pub fn last_seq(&self) -> Seq {
        Seq(self.state.last_seq)
    }

    /// Up to `max` messages with `seq >= from`, optionally of one topic.
    pub fn messages(
        &self,
        from: Seq,
        max: usize,
        topic: Option<&str>,
    ) -> Result<Vec<StoredMessage>, ErrorCode> {
        Ok(self.messages_page(from, max, topic, usize::MAX)?.messages)
    }

    /// The oldest message kept for reads (the next seq to be given if none is kept): reads
    /// from before it get [`ErrorCode::Compacted`].
    pub fn first_kept_seq(&self) -> Seq {
        Seq(self.state.messages.front().map_or(self.state.last_seq + 1, |m| m.seq.0))
    }

    /// Up to `max` messages from `from` on (optionally of one topic), and no more than fit in
    /// `budget` bytes (each counted as its payload plus [`MESSAGE_OVERHEAD_BYTES`]; at least
    /// one), and whether the page is the whole read: no further message of it exists now.
    ///
    /// Only the messages taken are copied: a node used to copy up to `max` before cutting the
    /// page to a frame's size, which for 10,000 messages of 1 MiB is 10 GB.
    pub fn messages_page(
        &self,
        from: Seq,
        max: usize,
        topic: Option<&str>,
        budget: usize,
    ) -> Result<MessagesPage, ErrorCode> {
        let first = self.first_kept_seq().0;
        if from.0 < first && from.0 <= self.state.last_seq {
            return Err(ErrorCode::Compacted);
        }
        let skip = (from.0.saturating_sub(first) as usize).min(self.state.messages.len());
        let mut page = MessagesPage { messages: Vec::new(), complete: true };
        let mut bytes = 0usize;
        let matching = self
            .state
            .messages
            .range(skip..)
            .filter(|m| topic.is_none_or(|t| m.topic.as_deref() == Some(t)));
        for message in matching {
            bytes = bytes.saturating_add(message.payload.len() + MESSAGE_OVERHEAD_BYTES);
            if page.messages.len() == max || (!page.messages.is_empty() && bytes > budget) {
                page.complete = false;
                break;
            }
            page.messages.push(message.clone());
        }
        Ok(page)
    }

    /// Holders starting with `prefix` that have claims or staged messages in flight, in
    /// order, after `after`, at most `max`.
    pub fn in_flight_holders(&self, prefix: &str, after: Option<&str>, max: usize) -> Vec<String> {
        let empty = ClaimKey { namespace: String::new(), key: String::new() };
        let start = after.filter(|a| *a >= prefix).unwrap_or(prefix);
        let mut claiming = self.state.in_flight.range((start.to_owned(), empty)..).map(|(h, _)| h);
        let mut staging = self
            .state
            .staged
            .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            .map(|(h, _)| h);
        // Both sources are in order: the first `max` of each, merged, are the first `max`.
        let first = |holders: &mut dyn Iterator<Item = &String>| -> Vec<String> {
            let mut taken: Vec<String> = Vec::new();
            for holder in holders.take_while(|h| h.starts_with(prefix)) {
                if taken.len() >= max {
                    break;
                }
                if Some(holder.as_str()) != after && taken.last() != Some(holder) {
                    taken.push(holder.clone());
                }
            }
            taken
        };
        let mut holders = first(&mut claiming);
        holders.extend(first(&mut staging));
        holders.sort();
        holders.dedup();
        holders.truncate(max);
        holders
    }

    /// `(holder, key)` pairs in flight: claims pending or prepared, releases scheduled.
    pub fn claims_in_flight(&self) -> u64 {
        self.state.in_flight.len() as u64
    }

    /// Messages staged by transactions not settled yet.
    pub fn staged_messages(&self) -> u64 {
        self.staged_messages
    }

    /// The current value of a counter (0 if never incremented).
    pub fn counter(&self, name: &str) -> u64 {
        self.state.counters.get(name).copied().unwrap_or(0)
    }

    /// Live sessions: what the leader's expiry timer watches.
    pub fn sessions(&self) -> impl Iterator<Item = (SessionId, &SessionRecord)> {
        self.state.sessions.iter().map(|(id, r)| (*id, r))
    }

    // ----- snapshots ------------------------------------------------------------------------

    /// The whole state, byte-identical on every replica at the same applied index: the
    /// state's fields, then the namespaces, then the staged messages.
    pub fn snapshot(&self) -> Vec<u8> {
        let bytes = postcard::to_allocvec(&self.state).expect("serialising cannot fail");
        let bytes =
            postcard::to_extend(&self.state.namespaces, bytes).expect("serialising cannot fail");
        postcard::to_extend(&self.state.staged, bytes).expect("serialising cannot fail")
    }

    /// Replaces the state with a snapshot. One that ends after the state's fields was written
    /// before namespaces existed: claims need none until `RequireNamespaces` is applied. One
    /// that ends after the namespaces was written before staging existed: nothing is staged.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), ErrorCode> {
        let (mut state, rest) =
            postcard::take_from_bytes::<MachineState>(bytes).map_err(|_| ErrorCode::Malformed)?;
        let mut rest = rest;
        if !rest.is_empty() {
            (state.namespaces, rest) =
                postcard::take_from_bytes::<Namespaces>(rest).map_err(|_| ErrorCode::Malformed)?;
        }
        if !rest.is_empty() {
            (state.staged, rest) = postcard::take_from_bytes::<BTreeMap<String, Staged>>(rest)
                .map_err(|_| ErrorCode::Malformed)?;
        }
        if !rest.is_empty() {
            return Err(ErrorCode::Malformed);
        }
        if cfg!(feature = "planted-bugs") && self.config.bugs.forget_namespaces_on_restore {
            state.namespaces.declared.clear();
        }
        self.staged_messages = state.staged.values().map(|s| s.messages.len() as u64).sum();
        self.state = state;
        Ok(())
    }
}

fn info(record: &ClaimRecord) -> OwnerInfo {
    OwnerInfo {
        owner: record.owner.clone(),
        holder: record.holder.clone(),
        token: record.token,
        state: record.state,
    }
}

#[cfg(test)]
mod tests;
