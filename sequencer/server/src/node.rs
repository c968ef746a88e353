//! The node actor: owns the consensus core and the state machine, and carries out each `Ready`
//! in the order of the persistence contract. It runs on the I/O thread with the connections
//! and peer links; the write-ahead log runs on a thread of its own ([`WalWriter`]). While one
//! `Ready` is being made durable, requests and peer messages keep being stepped into the core,
//! and the next `Ready` carries them all — that is the group commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tob_machine::{ExpiryWatch, Machine, MachineConfig, NamespaceRuleWatch};
use tob_proto::{
    Call, ClientId, ClientResponse, Command, ErrorCode, MessageRecord, NodeStatus, Outcome,
    ReadConsistency, Reply, Request, RequestId,
};
use tob_raft::{
    Config as RaftConfig, EntryKind, LogIndex, Message, NodeId, Raft, ReadMode, ReadState, Ready,
    Role, Snapshot,
};
use tob_wal::Wal;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::net::{Outbound, PeerLink};
use crate::wal_writer::{Persisted, WalWriter};

/// Most messages one read returns (fewer if their bytes would not fit a frame).
const READ_MESSAGES_MAX: usize = 10_000;

/// A Raft message from a peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerMessage(pub Message);

/// A response to deliver on a client connection.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct SendResponse(pub ClientResponse);

/// A client's request, with where to send the answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientCall {
    pub connection: Recipient<SendResponse>,
    pub id: u64,
    pub call: Call,
}

/// Carry out pending work; queued behind already-received messages so they batch.
#[derive(Message)]
#[rtype(result = "()")]
struct Drive;

/// A `Follow` stream: pushes messages to a connection as they are applied here.
struct Subscription {
    connection: Recipient<SendResponse>,
    id: u64,
    next: tob_proto::Seq,
    topic: Option<String>,
}

struct Waiter {
    connection: Recipient<SendResponse>,
    id: u64,
    started: Instant,
    operation: &'static str,
}

enum ReadRequest {
    Owner(tob_proto::ClaimKey),
    /// `paged`: answered with `MessagesPage` (saying whether the read stopped short) rather
    /// than the older `Messages`.
    Messages {
        from: tob_proto::Seq,
        max: u32,
        topic: Option<String>,
        paged: bool,
    },
    Sync,
    Holders {
        prefix: String,
        after: Option<String>,
        max: u32,
    },
    Namespaces,
}

pub struct NodeActor {
    config: Config,
    raft: Raft,
    machine: Machine,
    /// The log until `started` hands it to the writer thread.
    wal: Option<Wal>,
    wal_writer: Option<WalWriter>,
    data_dir: std::path::PathBuf,
    /// The `Ready` whose durable parts the writer is working on: the rest of it (messages
    /// that wait for the fsync, committed entries, reads) is carried out on [`Persisted`].
    persisting: Option<Ready>,
    /// A durable local snapshot whose compaction waits for the Ready being persisted, so the
    /// log is never compacted between a Ready and its `advance`.
    compaction_due: Option<Snapshot>,
    peers: BTreeMap<u64, Addr<PeerLink>>,
    waiters: BTreeMap<(ClientId, RequestId), Vec<Waiter>>,
    reads: BTreeMap<u64, (Waiter, ReadRequest)>,
    ready_reads: Vec<ReadState>,
    next_read_context: u64,
    drive_scheduled: bool,
    ticks: u64,
    /// When the last tick was due. Ticks follow the monotonic clock, not the timer: after a
    /// pause (SIGSTOP, a long fsync, a stalled VM) the missed ticks are taken *before* any
    /// message is handled, so a lease can never outlive the time that really passed.
    last_tick_at: Instant,
    expiry: ExpiryWatch,
    metrics: Arc<Metrics>,
    metrics_address: String,
    known_leader: Option<u64>,
    snapshot_in_progress: bool,
    /// Encoded size of the latest snapshot, and command bytes applied since it was taken: a
    /// new snapshot waits until the log has grown by half the last one's size, so encoding
    /// the whole state (O(state) work on this thread) costs O(1) per applied byte however
    /// large the state grows. Without it, a state of a few hundred thousand claims was
    /// re-encoded every `snapshot_entries` entries: 12–25% of the node's CPU in a profile.
    last_snapshot_bytes: u64,
    applied_bytes_since_snapshot: u64,
    subscriptions: Vec<Subscription>,
    namespace_rule: NamespaceRuleWatch,
}

/// Snapshot bytes per InstallSnapshot piece: 1 MiB, or less when frames are configured smaller.
pub fn snapshot_chunk_bytes(config: &Config) -> usize {
    (config.max_frame_bytes / 2).clamp(1, 1 << 20)
}

/// The largest frame a peer may send: an Append holds at most 1 MiB of entries or a single
/// larger one (a client request, so within `max_frame_bytes`), a snapshot piece at most
/// [`snapshot_chunk_bytes`]; 64 KiB covers the message around them.
pub fn peer_frame_bytes_max(config: &Config) -> usize {
    config.max_frame_bytes.max(tob_raft::MAX_APPEND_BYTES_DEFAULT) + 64 * 1024
}

impl NodeActor {
    pub fn new(
        config: Config,
        wal: Wal,
        recovered: tob_raft::Recovered,
        peers: BTreeMap<u64, Addr<PeerLink>>,
        metrics: Arc<Metrics>,
        metrics_address: String,
    ) -> NodeActor {
        let voters = config.peers.keys().map(|&id| NodeId(id)).collect();
        let mut raft_config = RaftConfig::new(NodeId(config.node_id), voters, seed());
        raft_config.election_ticks = config.election_ticks;
        raft_config.heartbeat_ticks = config.heartbeat_ticks;
        raft_config.snapshot_chunk_bytes = snapshot_chunk_bytes(&config);
        let mut machine_config =
            MachineConfig { messages_retained_max: config.messages_retained, ..Default::default() };
        match config.planted_bug.as_deref() {
            Some("read-without-quorum") => raft_config.bugs.read_without_quorum = true,
            Some("vote-without-log-check") => raft_config.bugs.vote_without_log_check = true,
            Some("append-without-prev-check") => raft_config.bugs.append_without_prev_check = true,
            Some("apply-retries-twice") => machine_config.bugs.apply_retries_twice = true,
            _ => {}
        }
        let mut machine = Machine::new(machine_config);
        if let Some(snapshot) = &recovered.snapshot {
            machine.restore(&snapshot.data).expect("snapshot written by this node decodes");
        }
        let last_snapshot_bytes = recovered.snapshot.as_ref().map_or(0, |s| s.data.len() as u64);
        let raft = Raft::new(raft_config, recovered);
        NodeActor {
            config,
            raft,
            machine,
            data_dir: wal.dir().to_owned(),
            wal: Some(wal),
            wal_writer: None,
            persisting: None,
            compaction_due: None,
            peers,
            waiters: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: Vec::new(),
            next_read_context: 0,
            drive_scheduled: false,
            ticks: 0,
            last_tick_at: Instant::now(),
            expiry: ExpiryWatch::default(),
            metrics,
            metrics_address,
            known_leader: None,
            snapshot_in_progress: false,
            last_snapshot_bytes,
            applied_bytes_since_snapshot: 0,
            subscriptions: Vec::new(),
            namespace_rule: NamespaceRuleWatch::default(),
        }
    }

    fn catch_up_ticks(&mut self) {
        let tick = Duration::from_millis(self.config.tick_ms);
        let mut missed = 0;
        while self.last_tick_at.elapsed() >= tick {
            self.last_tick_at += tick;
            self.ticks += 1;
            self.raft.tick();
            self.watch_sessions();
            missed += 1;
            // Enough to expire any lease and run check-quorum; the rest is skipped.
            if missed >= 4 * u64::from(self.config.election_ticks) {
                self.last_tick_at = Instant::now();
                break;
            }
        }
    }

    fn schedule_drive(&mut self, ctx: &mut Context<Self>) {
        if !self.drive_scheduled {
            self.drive_scheduled = true;
            ctx.notify(Drive);
        }
    }

    fn send(&self, message: Message) {
        if let Some(peer) = self.peers.get(&message.to.0) {
            peer.do_send(Outbound(message));
        }
    }

    /// Carries out every Ready: send, persist (one fsync, on the writer thread), then on
    /// [`Persisted`] send after-persist, apply, advance. One Ready is persisted at a time.
    fn drive(&mut self) {
        while self.persisting.is_none() && self.raft.has_ready() {
            let mut ready = self.raft.ready();
            for message in std::mem::take(&mut ready.messages) {
                self.send(message);
            }
            if ready.must_persist() && ready.snapshot.is_none() && self.raft.role() != Role::Leader
            {
                // A follower's acknowledgements wait for this fsync in any case; writing here
                // saves two thread wake-ups on the leader's commit path. (A leader hands the
                // fsync over, so its Appends leave while it writes; so does a snapshot, which
                // may be large.)
                let writer = self.wal_writer.as_ref().expect("started");
                if let Err(e) = writer.persist_here(&ready.entries, ready.hard_state) {
                    tracing::error!(error = %e, "write-ahead log failed; stopping");
                    std::process::exit(70);
                }
                self.finish_ready(ready, None);
                continue;
            }
            if ready.must_persist() {
                let apply_now = self.raft.role() == Role::Leader && ready.snapshot.is_none();
                let entries = std::mem::take(&mut ready.entries);
                let writer = self.wal_writer.as_ref().expect("started");
                writer.persist(ready.snapshot.take(), entries, ready.hard_state);
                if apply_now {
                    // Committed is durable on a majority (see the persistence contract):
                    // answer them now rather than after this fsync, which covers only newer
                    // entries. Under load it saves each request a group-commit cycle.
                    self.apply_committed(std::mem::take(&mut ready.committed));
                }
                self.persisting = Some(ready);
                break;
            }
            self.finish_ready(ready, None);
        }
        if self.persisting.is_some() {
            // Followers may have committed entries while our fsync runs: answer them now.
            let committed = self.raft.take_committed();
            if !committed.is_empty() {
                self.apply_committed(committed);
            }
        }
        self.publish_metrics();
        self.push_to_subscribers();
        self.refuse_waiters_if_deposed();
    }

    /// The part of a Ready that follows its fsync: messages that needed it, the leader's
    /// snapshot restored, committed entries applied, reads served, then `advance`.
    fn finish_ready(&mut self, ready: Ready, snapshot: Option<Snapshot>) {
        if ready.rejoined {
            self.wal_writer.as_ref().expect("started").forget_rejoin();
        }
        for message in ready.messages_after_persist {
            self.send(message);
        }
        if let Some(snapshot) = &snapshot {
            self.machine.restore(&snapshot.data).expect("leader snapshot decodes");
            self.last_snapshot_bytes = snapshot.data.len() as u64;
            self.applied_bytes_since_snapshot = 0;
        }
        self.apply_committed(ready.committed);
        self.ready_reads.extend(ready.read_states);
        for context in ready.aborted_reads {
            if let Some((waiter, _)) = self.reads.remove(&context) {
                self.refuse(&waiter, ErrorCode::NotLeader, "leadership lost");
            }
        }
        self.serve_reads();
        self.raft.advance();
    }

    /// Applies committed entries in order and answers the clients waiting for them.
    fn apply_committed(&mut self, committed: Vec<tob_raft::Entry>) {
        for entry in committed {
            match entry.kind {
                EntryKind::Noop => self.machine.apply_noop(entry.index.0),
                EntryKind::Command(bytes) => {
                    self.applied_bytes_since_snapshot += bytes.len() as u64;
                    if let Some(applied) = self.machine.apply(entry.index.0, &bytes) {
                        self.answer(applied.request, applied.outcome);
                    }
                }
            }
        }
    }

    /// A node that is no longer leader answers every client still waiting on it with
    /// `not_leader`: the client retries at the new leader with the same request id, and the
    /// de-duplication table answers it whether or not the entry committed. Without this the
    /// waiters of a deposed leader would stay in memory forever.
    fn refuse_waiters_if_deposed(&mut self) {
        if self.raft.role() == Role::Leader || self.waiters.is_empty() {
            return;
        }
        for waiter in std::mem::take(&mut self.waiters).into_values().flatten() {
            self.refuse(&waiter, ErrorCode::NotLeader, "leadership lost");
        }
    }

    /// Sends every subscriber what was applied since its last push (bounded per push).
    fn push_to_subscribers(&mut self) {
        let last = self.machine.last_seq();
        let budget = self.config.max_frame_bytes / 2;
        let machine = &self.machine;
        self.subscriptions.retain_mut(|sub| {
            if !sub.connection.connected() {
                return false;
            }
            if sub.next > last {
                return true;
            }
            let page =
                machine.messages_page(sub.next, READ_MESSAGES_MAX, sub.topic.as_deref(), budget);
            let reply = match page {
                Ok(page) => {
                    // The rest, if the page stopped short, goes with the next push. (It used to
                    // go on after `last` even when the page had stopped at 10,000 messages:
                    // a subscriber more than 10,000 small messages behind skipped the rest.)
                    sub.next = match (page.complete, page.messages.last()) {
                        (false, Some(taken)) => tob_proto::Seq(taken.seq.0 + 1),
                        _ => tob_proto::Seq(last.0 + 1),
                    };
                    if page.messages.is_empty() {
                        return true;
                    }
                    Reply::Messages(page.messages.into_iter().map(record).collect())
                }
                Err(code) => refused_read(machine, code),
            };
            let ended = matches!(reply, Reply::Error { .. });
            sub.connection.do_send(SendResponse(ClientResponse { id: sub.id, reply }));
            !ended
        });
    }

    fn publish_metrics(&mut self) {
        let m = &self.metrics;
        m.term.store(self.raft.term().0, Relaxed);
        let role = match self.raft.role() {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        m.role.store(role, Relaxed);
        m.rejoining.store(u64::from(self.raft.is_rejoining()), Relaxed);
        m.commit_index.store(self.raft.commit_index().0, Relaxed);
        m.applied_index.store(self.machine.applied_index(), Relaxed);
        m.claims_in_flight.store(self.machine.claims_in_flight(), Relaxed);
        m.staged_messages.store(self.machine.staged_messages(), Relaxed);
        let leader = self.raft.leader().map(|l| l.0);
        if leader.is_some() && leader != self.known_leader {
            m.leader_changes.fetch_add(1, Relaxed);
            self.known_leader = leader;
        }
    }

    fn finish_request(&self, waiter: &Waiter) {
        self.metrics.request(waiter.operation).observe_duration(waiter.started.elapsed());
    }

    fn answer(&mut self, request: Request, outcome: Outcome) {
        let Some(client) = request.client else { return };
        for waiter in self.waiters.remove(&(client, request.request_id)).unwrap_or_default() {
            self.finish_request(&waiter);
            let response = ClientResponse { id: waiter.id, reply: Reply::Outcome(outcome.clone()) };
            waiter.connection.do_send(SendResponse(response));
        }
    }

    fn refuse(&self, waiter: &Waiter, code: ErrorCode, message: &str) {
        let leader = self
            .raft
            .leader()
            .filter(|l| l.0 != self.config.node_id || self.raft.role() == Role::Leader)
            .and_then(|l| self.config.peers.get(&l.0))
            .map(|p| p.client_address.to_string());
        let reply = Reply::Error { code, message: message.into(), leader };
        waiter.connection.do_send(SendResponse(ClientResponse { id: waiter.id, reply }));
    }

    fn serve_reads(&mut self) {
        let applied = self.machine.applied_index();
        let (ready, waiting): (Vec<ReadState>, Vec<ReadState>) =
            self.ready_reads.drain(..).partition(|r| r.index.0 <= applied);
        self.ready_reads = waiting;
        for read in ready {
            let Some((waiter, request)) = self.reads.remove(&read.context) else { continue };
            self.finish_request(&waiter);
            let reply = match request {
                ReadRequest::Owner(key) => match self.machine.check_namespace(&key.namespace) {
                    Ok(()) => Reply::Owner(self.machine.owner(&key)),
                    Err(code) => Reply::Error {
                        code,
                        message: format!("namespace {:?} does not exist", key.namespace),
                        leader: None,
                    },
                },
                ReadRequest::Sync => Reply::Synced { position: read.index.0 },
                ReadRequest::Namespaces => Reply::Namespaces(
                    self.machine
                        .namespaces()
                        .take(tob_proto::NAMESPACES_LISTED_MAX)
                        .map(str::to_owned)
                        .collect(),
                ),
                ReadRequest::Holders { prefix, after, max } => {
                    let max = (max as usize).min(tob_proto::HOLDERS_LISTED_MAX);
                    Reply::Holders(self.machine.in_flight_holders(&prefix, after.as_deref(), max))
                }
                ReadRequest::Messages { from, max, topic, paged } => {
                    let max = (max as usize).min(READ_MESSAGES_MAX);
                    // Keep the reply well inside one frame (at least one message); the caller
                    // reads on from the last seq it got.
                    let budget = self.config.max_frame_bytes / 2;
                    match self.machine.messages_page(from, max, topic.as_deref(), budget) {
                        Ok(page) => {
                            let records = page.messages.into_iter().map(record).collect();
                            if paged {
                                Reply::MessagesPage { records, complete: page.complete }
                            } else {
                                Reply::Messages(records)
                            }
                        }
                        Err(code) => refused_read(&self.machine, code),
                    }
                }
            };
            waiter.connection.do_send(SendResponse(ClientResponse { id: waiter.id, reply }));
        }
    }

    /// Every `snapshot_entries` applied entries — and once the log has grown by half the last
    /// snapshot's size — takes a snapshot without stopping the node: see [`encode_in_child`].
    /// The log is compacted when the snapshot file is durable.
    fn maybe_snapshot(&mut self, ctx: &mut Context<Self>) {
        let applied = LogIndex(self.machine.applied_index());
        if self.snapshot_in_progress
            || applied.0 < self.raft.snapshot_index().0 + self.config.snapshot_entries
            || self.applied_bytes_since_snapshot < self.last_snapshot_bytes / 2
        {
            return;
        }
        let Some(term) = self.raft.term_at(applied) else { return };
        let voters = self.raft.config().voters.clone();
        self.applied_bytes_since_snapshot = 0;
        self.snapshot_in_progress = true;
        let dir = self.data_dir.clone();
        let node = ctx.address();
        let started = Instant::now();
        match encode_in_child(&self.machine, &dir, applied, term, &voters) {
            Ok(child) => {
                let paused_ms = started.elapsed().as_millis() as u64;
                std::thread::spawn(move || {
                    let written = wait_for_child(child).and_then(|()| {
                        tob_wal::read_snapshot(&dir, applied.0).map_err(|e| e.to_string())
                    });
                    match written {
                        Ok(snapshot) => {
                            tracing::info!(
                                index = applied.0,
                                paused_ms,
                                total_ms = started.elapsed().as_millis() as u64,
                                "snapshot written by a child process"
                            );
                            node.do_send(SnapshotWritten {
                                snapshot: Some(snapshot),
                                written: Ok(()),
                            });
                        }
                        // Not fatal: the child may have been killed (by the OOM killer, say);
                        // the log stays uncompacted and the next snapshot is tried once it
                        // has grown again. A failing disk stops the node through its log.
                        Err(e) => {
                            tracing::error!(index = applied.0, error = %e, "snapshot failed; will try again");
                            node.do_send(SnapshotWritten { snapshot: None, written: Ok(()) });
                        }
                    }
                });
            }
            Err(e) => {
                // No child (out of processes or memory): encode here, the node paused meanwhile.
                tracing::warn!(error = %e, "fork failed; encoding the snapshot in the node");
                let snapshot =
                    Snapshot { index: applied, term, voters, data: self.machine.snapshot() };
                tracing::info!(
                    index = applied.0,
                    paused_ms = started.elapsed().as_millis() as u64,
                    "snapshot encoded in the node"
                );
                std::thread::spawn(move || {
                    let written =
                        tob_wal::write_snapshot(&dir, &snapshot).map_err(|e| e.to_string());
                    node.do_send(SnapshotWritten { snapshot: Some(snapshot), written });
                });
            }
        }
    }

    /// A leader whose state machine does not require namespaces yet (a new cluster, or a log
    /// written before they existed) proposes `RequireNamespaces` once per term, ahead of any
    /// client command it proposes.
    fn require_namespaces(&mut self) {
        if self.raft.role() != Role::Leader {
            return;
        }
        if let Some(request) = self.namespace_rule.due(&self.machine, self.raft.term().0) {
            let _ = self.raft.propose(request.encode());
        }
    }

    /// The leader proposes `Expire` for sessions without a keep-alive for their TTL.
    fn watch_sessions(&mut self) {
        self.require_namespaces();
        if self.raft.role() != Role::Leader {
            return self.expiry.reset();
        }
        for request in
            self.expiry.due(&self.machine, self.raft.term().0, self.ticks, self.config.tick_ms)
        {
            let _ = self.raft.propose(request.encode());
        }
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            node_id: self.config.node_id,
            role: format!("{:?}", self.raft.role()).to_lowercase(),
            term: self.raft.term().0,
            leader: self.raft.leader().map(|l| l.0),
            commit_index: self.raft.commit_index().0,
            applied_index: self.machine.applied_index(),
            last_index: self.raft.last_index().0,
            snapshot_index: self.raft.snapshot_index().0,
            last_seq: self.machine.last_seq().0,
            pid: std::process::id(),
            metrics_address: self.metrics_address.clone(),
        }
    }
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(100_000);
        let wal = self.wal.take().expect("a node starts once");
        let node = ctx.address().recipient();
        self.wal_writer = Some(WalWriter::spawn(wal, node, self.metrics.clone()));
        ctx.run_interval(Duration::from_millis(self.config.tick_ms), |node, ctx| {
            node.catch_up_ticks();
            node.schedule_drive(ctx);
        });
        self.drive();
    }
}

impl Handler<Drive> for NodeActor {
    type Result = ();
    fn handle(&mut self, _: Drive, ctx: &mut Context<Self>) {
        self.drive_scheduled = false;
        self.drive();
        self.maybe_snapshot(ctx);
    }
}

impl Handler<Persisted> for NodeActor {
    type Result = ();
    fn handle(&mut self, done: Persisted, ctx: &mut Context<Self>) {
        if let Err(e) = done.result {
            // Nothing after this point may be acknowledged: stop the node.
            tracing::error!(error = %e, "write-ahead log failed; stopping");
            std::process::exit(70);
        }
        let ready = self.persisting.take().expect("a Ready was being persisted");
        self.finish_ready(ready, done.snapshot);
        self.compact_if_due();
        self.drive();
        self.maybe_snapshot(ctx);
    }
}

/// A local snapshot file is durable (or failed).
#[derive(Message)]
#[rtype(result = "()")]
struct SnapshotWritten {
    /// What was written (read back, when a child wrote it); None when a child failed.
    snapshot: Option<Snapshot>,
    /// An error here stops the node (the node's own write failed).
    written: Result<(), String>,
}

impl Handler<SnapshotWritten> for NodeActor {
    type Result = ();
    fn handle(&mut self, done: SnapshotWritten, _: &mut Context<Self>) {
        self.snapshot_in_progress = false;
        if let Err(e) = done.written {
            tracing::error!(error = %e, "snapshot failed; stopping");
            std::process::exit(70);
        }
        let Some(snapshot) = done.snapshot else { return };
        self.last_snapshot_bytes = snapshot.data.len() as u64;
        self.compaction_due = Some(snapshot);
        if self.persisting.is_none() {
            self.compact_if_due();
        }
    }
}

impl NodeActor {
    /// Compacts the log up to a durable local snapshot (between Readies only).
    fn compact_if_due(&mut self) {
        let Some(snapshot) = self.compaction_due.take() else { return };
        let (index, term) = (snapshot.index, snapshot.term);
        // A snapshot from the leader may have replaced the log meanwhile.
        if self.raft.snapshot_index() >= index || self.raft.term_at(index) != Some(term) {
            return;
        }
        self.wal_writer.as_ref().expect("started").forget_covered(index.0);
        self.raft.compact(snapshot);
    }
}

impl Handler<PeerMessage> for NodeActor {
    type Result = ();
    fn handle(&mut self, message: PeerMessage, ctx: &mut Context<Self>) {
        self.catch_up_ticks();
        self.raft.step(message.0);
        self.schedule_drive(ctx);
    }
}

impl Handler<ClientCall> for NodeActor {
    type Result = ();
    fn handle(&mut self, call: ClientCall, ctx: &mut Context<Self>) {
        self.catch_up_ticks();
        let operation = match &call.call {
            Call::Command(request) => match request.command {
                Command::Append { .. } | Command::Stage { .. } => "append",
                Command::Claim { .. } | Command::Prepare { .. } | Command::Finalize { .. } => {
                    "claim"
                }
                Command::Release { .. }
                | Command::ReleaseOnCommit { .. }
                | Command::KeepOnCommit { .. }
                | Command::Settle { .. } => "release",
                Command::Read { .. } => "read",
                Command::Next { .. } => "next",
                Command::OpenSession { .. }
                | Command::KeepAlive { .. }
                | Command::Expire { .. } => "session",
                Command::CreateNamespace { .. } | Command::RequireNamespaces => "namespace",
            },
            Call::Owner { .. }
            | Call::ReadMessages { .. }
            | Call::ReadMessagesPage { .. }
            | Call::InFlightHolders { .. }
            | Call::Namespaces => "read",
            Call::Sync => "sync",
            Call::Status | Call::Follow { .. } => "other",
        };
        let waiter =
            Waiter { connection: call.connection, id: call.id, started: Instant::now(), operation };
        if let Call::Follow { from, topic } = call.call {
            // Any node serves a stream: its applied messages are a prefix of the total order.
            let connection = waiter.connection;
            self.subscriptions.push(Subscription { connection, id: waiter.id, next: from, topic });
            self.push_to_subscribers();
            return;
        }
        if let Call::Status = call.call {
            let reply = Reply::Status(self.status());
            waiter.connection.do_send(SendResponse(ClientResponse { id: waiter.id, reply }));
            return;
        }
        if self.raft.role() != Role::Leader {
            return self.refuse(&waiter, ErrorCode::NotLeader, "not the leader");
        }
        let (mode, request) = match call.call {
            Call::Status | Call::Follow { .. } => unreachable!("answered above"),
            Call::Command(request) => {
                let Some(client) = request.client else {
                    return self.refuse(
                        &waiter,
                        ErrorCode::Malformed,
                        "a client request needs a client id",
                    );
                };
                if let Err(refused) = self.machine_limits().check(&request.command) {
                    return self.refuse(&waiter, refused.code, &refused.message);
                }
                if matches!(request.command, Command::Expire { .. } | Command::RequireNamespaces) {
                    return self.refuse(
                        &waiter,
                        ErrorCode::Malformed,
                        "expiry and the namespace rule are proposed by the leader only",
                    );
                }
                self.require_namespaces();
                self.waiters.entry((client, request.request_id)).or_default().push(waiter);
                if self.raft.propose(request.encode()).is_err() {
                    unreachable!("checked leader");
                }
                self.metrics.proposals.fetch_add(1, Relaxed);
                return self.schedule_drive(ctx);
            }
            Call::Owner { key, consistency } => {
                let mode = if consistency == ReadConsistency::Lease {
                    ReadMode::Lease
                } else {
                    ReadMode::Index
                };
                (mode, ReadRequest::Owner(key))
            }
            Call::ReadMessages { from, max, topic } => {
                (ReadMode::Index, ReadRequest::Messages { from, max, topic, paged: false })
            }
            Call::ReadMessagesPage { from, max, topic } => {
                (ReadMode::Index, ReadRequest::Messages { from, max, topic, paged: true })
            }
            Call::Sync => (ReadMode::Index, ReadRequest::Sync),
            Call::Namespaces => (ReadMode::Index, ReadRequest::Namespaces),
            Call::InFlightHolders { prefix, after, max } => {
                (ReadMode::Index, ReadRequest::Holders { prefix, after, max })
            }
        };
        let context = self.next_read_context;
        self.next_read_context += 1;
        self.reads.insert(context, (waiter, request));
        if self.raft.read(context, mode).is_err() {
            unreachable!("checked leader");
        }
        self.schedule_drive(ctx);
    }
}

impl NodeActor {
    fn machine_limits(&self) -> tob_proto::Limits {
        tob_proto::Limits::default()
    }
}

/// A read of messages the machine refused; a `compacted` one names the oldest message kept.
fn refused_read(machine: &Machine, code: ErrorCode) -> Reply {
    let message = match code {
        ErrorCode::Compacted => tob_proto::compacted_message(machine.first_kept_seq().0),
        _ => code.name().into(),
    };
    Reply::Error { code, message, leader: None }
}

/// A stored message as a reply carries it.
fn record(message: tob_machine::StoredMessage) -> MessageRecord {
    MessageRecord { seq: message.seq, topic: message.topic, payload: message.payload }
}

/// Election timeouts must differ between nodes and runs; the core stays deterministic given it.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Encodes the state machine and writes the snapshot file in a child process, forked here: the
/// child sees the state exactly as it is at this instant (copy-on-write pages), while the node
/// goes on serving. Encoding a large state takes long — 0.5–0.8 s for 800,000 claims here, all
/// three nodes at about the same index — and a node encoding in place answers nothing
/// meanwhile; the fork itself pauses the node for the time the kernel takes to copy the page
/// tables (a few milliseconds per gigabyte). The same technique as Redis' background saves.
///
/// The child only encodes, writes and fsyncs the file, then leaves with `_exit`: no logging,
/// no locks other threads may have held at the fork (the allocator's are reset by libc), no
/// destructors. It dies with the node (`PR_SET_PDEATHSIG`), so a killed node never leaves a
/// writer behind that could race its successor.
fn encode_in_child(
    machine: &Machine,
    dir: &std::path::Path,
    index: LogIndex,
    term: tob_raft::Term,
    voters: &[NodeId],
) -> Result<libc::pid_t, String> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the child runs only the code below and ends with `_exit`, see above.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error().to_string()),
        0 => {
            // SAFETY: plain system calls in the child.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(3);
                }
                // Let go of the node's sockets and files (a peer must see a connection the
                // node closes as closed, not held open by this process).
                libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0);
            }
            let snapshot =
                Snapshot { index, term, voters: voters.to_vec(), data: machine.snapshot() };
            let code = match tob_wal::write_snapshot(dir, &snapshot) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(code) }
        }
        child => Ok(child),
    }
}

/// Waits for a snapshot child; Ok when it wrote the file.
fn wait_for_child(child: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        if waited == child {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waiting for the snapshot process: {error}"));
        }
    }
    if libc::WIFSIGNALED(status) {
        Err(format!("the snapshot process was killed by signal {}", libc::WTERMSIG(status)))
    } else if libc::WEXITSTATUS(status) != 0 {
        // 1: writing the file failed; 3: the node was gone before the child began.
        Err(format!("the snapshot process exited with status {}", libc::WEXITSTATUS(status)))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// A child that leaves at once, with `code`, or killed by SIGKILL when `code` is None.
    fn child(code: Option<i32>) -> libc::pid_t {
        // SAFETY: the child makes two system calls and ends.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if code.is_none() {
                    libc::raise(libc::SIGKILL);
                }
                libc::_exit(code.unwrap_or(0));
            }
            pid
        }
    }

    #[test]
    fn a_snapshot_child_is_judged_by_how_it_ended() {
        assert_eq!(super::wait_for_child(child(Some(0))), Ok(()));
        let failed = super::wait_for_child(child(Some(1))).unwrap_err();
        assert!(failed.contains("exited with status 1"), "{failed}");
        let killed = super::wait_for_child(child(None)).unwrap_err();
        assert!(killed.contains("killed by signal 9"), "{killed}");
    }
}
