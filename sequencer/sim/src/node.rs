//! One simulated node: the real consensus core and state machine, driven the way the real node
//! runtime drives them (persistence contract, group commit, reads, session expiry), with a
//! simulated disk. Effects leave through [`Effects`] for the world to route and record.

use std::collections::{BTreeMap, BTreeSet};

use tob_machine::{ExpiryWatch, Machine, MachineBugs, MachineConfig, NamespaceRuleWatch};
use tob_proto::{
    ClaimKey, ClientId, Command, Outcome, ReleasedClaim, Request, RequestId, Seq, SessionId,
};
use tob_raft::{
    Config, Entry, EntryKind, LogIndex, PlantedBugs, Raft, ReadState, Ready, Role, Snapshot,
};

use crate::checkers::{EntrySummary, Fnv};
use crate::disk::Disk;
use crate::network::{Addr, CallBody, Packet, Refusal};

/// Snapshot and compact after this many applied entries.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 64;
/// Record a hash of the whole state machine every this many indexes.
pub const STATE_HASH_EVERY_ENTRIES: u64 = 16;
/// Logical milliseconds per tick, for session TTLs.
pub const TICK_MS: u64 = 10;

/// What handling one input produced.
#[derive(Debug, Default)]
pub struct Effects {
    pub send: Vec<(Addr, Packet)>,
    pub start_sync: bool,
    pub applied: Vec<EntrySummary>,
    pub deliveries: Vec<(u64, String)>,
    pub deliver_start: Option<u64>,
    pub state_hashes: Vec<(u64, u64)>,
    /// (log index, session, keep-alives named, claims released) of applied expiries.
    pub expired: Vec<(u64, SessionId, u64, Vec<ReleasedClaim>)>,
    pub expire_proposed: Vec<(SessionId, u64)>,
    pub snapshots_installed: u64,
}

pub struct SimNode {
    pub index: usize,
    pub name: String,
    pub up: bool,
    /// Its core panicked: it stays down.
    pub broken: bool,
    pub incarnation: u64,
    pub tick_ns: u64,
    pub raft: Raft,
    pub machine: Machine,
    pub disk: Disk,
    config: Config,
    machine_config: MachineConfig,
    /// A Ready whose writes await the fsync in flight.
    syncing: Option<Ready>,
    /// (client, request) -> client processes waiting for the answer.
    waiters: BTreeMap<(ClientId, RequestId), BTreeSet<(usize, RequestId)>>,
    reads: BTreeMap<u64, (usize, RequestId, ClaimKey)>,
    ready_reads: Vec<ReadState>,
    next_read_context: u64,
    local_ticks: u64,
    expiry: ExpiryWatch,
    namespace_rule: NamespaceRuleWatch,
}

impl SimNode {
    pub fn new(
        index: usize,
        voters: usize,
        seed: u64,
        tick_ns: u64,
        bugs: PlantedBugs,
        machine_bugs: MachineBugs,
    ) -> SimNode {
        let ids = (1..=voters as u64).map(tob_raft::NodeId).collect();
        let mut config = Config::new(tob_raft::NodeId(index as u64 + 1), ids, seed);
        config.bugs = bugs;
        config.max_inflight_appends = 8;
        config.max_append_bytes = 16 * 1024;
        // Small pieces, so every snapshot travels in many and the simulator's drops,
        // duplicates and reordering hit the piece-by-piece protocol.
        config.snapshot_chunk_bytes = 512;
        let machine_config = MachineConfig { bugs: machine_bugs, ..MachineConfig::default() };
        let disk = Disk::empty();
        SimNode {
            index,
            name: format!("n{}", index + 1),
            up: true,
            broken: false,
            incarnation: 0,
            tick_ns,
            raft: Raft::new(config.clone(), disk.recover()),
            machine: Machine::new(machine_config.clone()),
            disk,
            config,
            machine_config,
            syncing: None,
            waiters: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: Vec::new(),
            next_read_context: 0,
            local_ticks: 0,
            expiry: ExpiryWatch::default(),
            namespace_rule: NamespaceRuleWatch::default(),
        }
    }

    /// Power loss: volatile state is gone, the disk keeps what it keeps.
    pub fn crash(&mut self, rng: &mut tob_raft::SplitMix64) {
        self.up = false;
        self.disk.crash(rng);
        self.syncing = None;
        self.waiters.clear();
        self.reads.clear();
        self.ready_reads.clear();
        self.expiry.reset();
        self.namespace_rule = NamespaceRuleWatch::default();
    }

    /// Power loss that also destroys the disk (a replaced drive, a deleted data directory):
    /// the node comes back blank and must rejoin.
    pub fn crash_and_wipe(&mut self, rng: &mut tob_raft::SplitMix64) {
        self.crash(rng);
        self.disk = Disk::empty();
    }

    /// Starts again from the disk.
    pub fn restart(&mut self, fx: &mut Effects) {
        self.up = true;
        self.incarnation += 1;
        let recovered = self.disk.recover();
        self.machine = Machine::new(self.machine_config.clone());
        if let Some(snapshot) = &recovered.snapshot {
            self.machine.restore(&snapshot.data).expect("own snapshot decodes");
        }
        fx.deliver_start = Some(self.machine.last_seq().0);
        let mut config = self.config.clone();
        config.seed = config.seed.wrapping_add(self.incarnation);
        self.raft = Raft::new(config, recovered);
        self.drive(fx);
    }

    pub fn tick(&mut self, fx: &mut Effects) {
        self.local_ticks += 1;
        self.raft.tick();
        self.watch_sessions(fx);
        self.drive(fx);
    }

    pub fn receive(&mut self, packet: Packet, fx: &mut Effects) {
        match packet {
            Packet::Raft(message) => self.raft.step(message),
            Packet::Call { client, request_id, body } => self.call(client, request_id, body, fx),
            Packet::Reply { .. } => {}
        }
        self.drive(fx);
    }

    pub fn sync_done(&mut self, fx: &mut Effects) {
        self.disk.sync();
        let ready = self.syncing.take().expect("a sync was in flight");
        self.finish(ready, fx);
        self.maybe_snapshot(fx);
        self.drive(fx);
    }

    fn call(&mut self, client: usize, request_id: RequestId, body: CallBody, fx: &mut Effects) {
        if self.raft.role() != Role::Leader {
            let hint = self.raft.leader().map(|id| id.0 as usize - 1);
            let reply = Packet::Reply { request_id, result: Err(Refusal::NotLeader { hint }) };
            fx.send.push((Addr::Client(client), reply));
            return;
        }
        match body {
            CallBody::Command(request) => {
                let key = (request.client.expect("clients name themselves"), request.request_id);
                self.waiters.entry(key).or_default().insert((client, request_id));
                self.raft.propose(request.encode()).expect("checked leader");
            }
            CallBody::Read { key, mode } => {
                let context = self.next_read_context;
                self.next_read_context += 1;
                self.reads.insert(context, (client, request_id, key));
                self.raft.read(context, mode).expect("checked leader");
            }
        }
    }

    /// Carries out Readys until one needs an fsync (then waits for it: group commit).
    fn drive(&mut self, fx: &mut Effects) {
        while self.syncing.is_none() && self.raft.has_ready() {
            let mut ready = self.raft.ready();
            for message in ready.messages.drain(..) {
                fx.send.push((Addr::Node(message.to.0 as usize - 1), Packet::Raft(message)));
            }
            if ready.must_persist() {
                if self.raft.role() == Role::Leader && ready.snapshot.is_none() {
                    // As the server does: a leader applies what is committed before its fsync.
                    for entry in std::mem::take(&mut ready.committed) {
                        self.apply(&entry, fx);
                    }
                }
                self.disk.write(&ready);
                self.syncing = Some(ready);
                fx.start_sync = true;
            } else {
                self.finish(ready, fx);
            }
        }
        if self.syncing.is_some() {
            // ...and what followers commit while the fsync runs.
            for entry in self.raft.take_committed() {
                self.apply(&entry, fx);
            }
        }
    }

    /// The rest of a Ready, once its writes are durable.
    fn finish(&mut self, ready: Ready, fx: &mut Effects) {
        for message in ready.messages_after_persist {
            fx.send.push((Addr::Node(message.to.0 as usize - 1), Packet::Raft(message)));
        }
        if let Some(snapshot) = &ready.snapshot {
            self.machine.restore(&snapshot.data).expect("leader snapshot decodes");
            fx.deliver_start = Some(self.machine.last_seq().0);
            fx.snapshots_installed += 1;
        }
        for entry in &ready.committed {
            self.apply(entry, fx);
        }
        self.ready_reads.extend(ready.read_states);
        for context in ready.aborted_reads {
            if let Some((client, request_id, _)) = self.reads.remove(&context) {
                let result = Err(Refusal::NotLeader { hint: None });
                fx.send.push((Addr::Client(client), Packet::Reply { request_id, result }));
            }
        }
        self.serve_reads(fx);
        self.raft.advance();
    }

    fn apply(&mut self, entry: &Entry, fx: &mut Effects) {
        let index = entry.index.0;
        fx.applied.push(summary(entry));
        match &entry.kind {
            EntryKind::Noop => self.machine.apply_noop(index),
            EntryKind::Command(bytes) => {
                let before = self.machine.last_seq().0;
                if let Some(applied) = self.machine.apply(index, bytes) {
                    // Every message the entry appended: an `Append`'s, or a `Settle`'s staged.
                    let after = self.machine.last_seq().0;
                    let appended = (after - before) as usize;
                    for m in
                        self.machine.messages(Seq(before + 1), appended, None).unwrap_or_default()
                    {
                        fx.deliveries
                            .push((m.seq.0, String::from_utf8_lossy(&m.payload).into_owned()));
                    }
                    self.applied(index, applied.request, applied.outcome, fx);
                }
            }
        }
        if index.is_multiple_of(STATE_HASH_EVERY_ENTRIES) {
            fx.state_hashes.push((index, Fnv::of(&self.machine.snapshot())));
        }
    }

    fn applied(&mut self, index: u64, request: Request, outcome: Outcome, fx: &mut Effects) {
        if let (Command::Expire { session, keepalives_seen }, Outcome::Expired { released }) =
            (&request.command, &outcome)
        {
            fx.expired.push((index, *session, *keepalives_seen, released.clone()));
        }
        let Some(client) = request.client else { return };
        if let Some(waiting) = self.waiters.remove(&(client, request.request_id)) {
            for (process, request_id) in waiting {
                let reply = Packet::Reply { request_id, result: Ok(outcome.clone()) };
                fx.send.push((Addr::Client(process), reply));
            }
        }
    }

    fn serve_reads(&mut self, fx: &mut Effects) {
        let applied = self.machine.applied_index();
        let (ready, waiting): (Vec<ReadState>, Vec<ReadState>) =
            self.ready_reads.drain(..).partition(|r| r.index.0 <= applied);
        self.ready_reads = waiting;
        for read in ready {
            if let Some((client, request_id, key)) = self.reads.remove(&read.context) {
                let result = Ok(Outcome::Owner { current: self.machine.owner(&key) });
                fx.send.push((Addr::Client(client), Packet::Reply { request_id, result }));
            }
        }
    }

    fn maybe_snapshot(&mut self, _fx: &mut Effects) {
        let applied = LogIndex(self.machine.applied_index());
        if applied.0 < self.raft.snapshot_index().0 + SNAPSHOT_EVERY_ENTRIES {
            return;
        }
        let Some(term) = self.raft.term_at(applied) else { return };
        let snapshot = Snapshot {
            index: applied,
            term,
            voters: self.config.voters.clone(),
            data: self.machine.snapshot(),
        };
        self.disk.install_local_snapshot(snapshot.clone());
        self.raft.compact(snapshot);
    }

    /// The leader proposes `Expire` for sessions without a keep-alive for their TTL, measured
    /// on its own ticks from when it became leader or last saw a keep-alive.
    fn watch_sessions(&mut self, fx: &mut Effects) {
        if self.raft.role() != Role::Leader {
            return self.expiry.reset();
        }
        // As the server does: the namespace rule, once per term until applied.
        if let Some(request) = self.namespace_rule.due(&self.machine, self.raft.term().0) {
            let _ = self.raft.propose(request.encode());
        }
        for request in self.expiry.due(&self.machine, self.raft.term().0, self.local_ticks, TICK_MS)
        {
            let Command::Expire { session, keepalives_seen } = request.command else { continue };
            if self.raft.propose(request.encode()).is_ok() {
                fx.expire_proposed.push((session, keepalives_seen));
            }
        }
    }

    /// One line for logs: role, term, positions.
    pub fn status(&self) -> String {
        format!(
            "{} up={} role={:?} term={} leader={:?} commit={} last={} snapshot={} applied={} syncing={}",
            self.name,
            self.up,
            self.raft.role(),
            self.raft.term().0,
            self.raft.leader().map(|l| l.0),
            self.raft.commit_index().0,
            self.raft.last_index().0,
            self.raft.snapshot_index().0,
            self.machine.applied_index(),
            self.syncing.is_some()
        )
    }

    /// Entries held, for the log-matching and leader-completeness checkers.
    pub fn log_summary(&self) -> Vec<EntrySummary> {
        self.raft.entries().iter().map(summary).collect()
    }
}

pub fn summary(entry: &Entry) -> EntrySummary {
    let digest = match &entry.kind {
        EntryKind::Noop => 0,
        EntryKind::Command(bytes) => Fnv::of(bytes),
    };
    EntrySummary { index: entry.index.0, term: entry.term.0, digest }
}
