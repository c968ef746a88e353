//! The Raft algorithm: one struct, one `step` per input, one step function per role.
//!
//! Reference: Ongaro's dissertation — §3 (core), §6.4 (ReadIndex and leases), §9.6 (pre-vote)
//! and check-quorum. Nothing here performs IO, reads a clock, or spawns a thread: time is
//! [`Raft::tick`], randomness comes from the configured seed, and every effect is returned in a
//! [`Ready`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::config::{Config, PlantedBugs};
use crate::log::RaftLog;
use crate::progress::{Progress, ReplicationState};
use crate::ready::{ReadState, Ready};
use crate::rng::SplitMix64;
use crate::types::{
    AppendResult, Entry, EntryKind, HardState, LogIndex, Message, MessageBody, NodeId, Snapshot,
    Term,
};

/// The role a node plays in its current term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Asking whether it could win before disturbing anyone with a higher term (§9.6).
    PreCandidate,
    Candidate,
    Leader,
}

/// How a read confirms that this node is still the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: a heartbeat round acknowledged by a quorum after the read arrived.
    Index,
    /// A leader lease: no round trip while a recent quorum acknowledgement is younger than
    /// [`Config::lease_ticks`]; falls back to `Index` otherwise. Assumes bounded tick-rate drift.
    Lease,
}

/// Refusal of a request that only the leader can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLeader {
    /// The leader this node last heard from in its current term, if any.
    pub leader: Option<NodeId>,
}

/// What a committed Ready wrote, remembered until [`Raft::advance`].
#[derive(Debug)]
struct InFlight {
    last_entry: Option<(LogIndex, Term)>,
    snapshot_index: Option<LogIndex>,
}

#[derive(Debug)]
struct PendingRead {
    context: u64,
    index: LogIndex,
    /// The heartbeat round whose quorum acknowledgement confirms this read.
    round: u64,
}

/// State of the read-confirmation rounds of the current leader term.
#[derive(Debug, Default)]
struct ReadRounds {
    /// Last heartbeat round sent.
    round: u64,
    /// Tick at which each not yet quorum-acknowledged (and the last acknowledged) round was
    /// sent, oldest first.
    sent_at_tick: VecDeque<(u64, u64)>,
    /// Highest round acknowledged by a quorum, and when it was sent.
    confirmed: Option<(u64, u64)>,
    pending: VecDeque<PendingRead>,
    /// Reads queued since the last heartbeat: the next `ready` sends a round for them.
    round_needed: bool,
    /// Reads that arrived before this term's no-op committed (§6.4 step 1).
    waiting_for_noop: Vec<(u64, ReadMode)>,
}

/// What a rejoining node (see [`Recovered::rejoining`]) has heard from the other voters.
#[derive(Debug, Default)]
struct Rejoin {
    /// Each answering voter's term and log end (last term, last index).
    answers: BTreeMap<NodeId, (Term, Term, LogIndex)>,
    /// Every voter has answered; the answers are frozen, and the highest term among them is
    /// this node's term, counted as voted (see [`Raft::maybe_finish_rejoin`]). Until then it
    /// acknowledges nothing.
    floor_taken: bool,
    /// The most up-to-date log end (last term, last index) among the answers.
    target: (Term, LogIndex),
}

/// One Raft node.
#[derive(Debug)]
/// What an InstallSnapshot piece says about the snapshot it belongs to.
struct SnapshotPiece {
    index: LogIndex,
    term: Term,
    voters: Vec<NodeId>,
    offset: u64,
    total: u64,
}

/// The bytes of a snapshot received so far, in order.
struct IncomingSnapshot {
    index: LogIndex,
    term: Term,
    voters: Vec<NodeId>,
    total: u64,
    data: Vec<u8>,
}

impl From<SnapshotPiece> for IncomingSnapshot {
    fn from(piece: SnapshotPiece) -> IncomingSnapshot {
        let SnapshotPiece { index, term, voters, total, .. } = piece;
        IncomingSnapshot { index, term, voters, total, data: Vec::new() }
    }
}

pub struct Raft {
    config: Config,
    rng: SplitMix64,
    term: Term,
    voted_for: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,

    /// Total ticks seen; the leader's clock for leases.
    ticks: u64,
    election_elapsed: u64,
    randomized_election_ticks: u64,
    heartbeat_elapsed: u64,
    /// Ticks since this node last heard from (or was) a leader. While below `election_ticks`
    /// it refuses to help elect anyone else: this keeps a partitioned-then-healed node from
    /// disrupting a healthy leader and is what makes leader leases safe. Starts at 0 on boot,
    /// so a restarted node cannot break a lease it forgot about.
    leader_contact_elapsed: u64,

    votes: BTreeMap<NodeId, bool>,
    progress: BTreeMap<NodeId, Progress>,
    reads: ReadRounds,
    /// New entries or commit progress to push to followers at the next `ready`.
    broadcast_needed: bool,

    messages: Vec<Message>,
    messages_after_persist: Vec<Message>,
    /// A snapshot arriving piece by piece from the leader.
    incoming_snapshot: Option<IncomingSnapshot>,
    read_states: Vec<ReadState>,
    aborted_reads: Vec<u64>,
    persisted_hard_state: HardState,
    in_flight: Option<InFlight>,
    /// Present while this node rejoins after losing its storage.
    rejoin: Option<Rejoin>,
    /// The rejoin ended: the next Ready carries the hard state that records it.
    rejoined_unreported: bool,
}

/// What a node recovered from its disk.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    /// The node's storage may have been lost (it started on an empty data directory, or on one
    /// whose rejoin never finished): it may have voted, and acknowledged entries, in a life it
    /// no longer remembers. Counting it again at once could elect two leaders in one term (it
    /// votes twice) or a leader missing a committed entry (one whose majority included its lost
    /// acknowledgement). So it votes for nobody and never campaigns until it has heard from
    /// **every** other voter and holds a log at least as up to date as the most up-to-date of
    /// theirs; it then takes the highest term they reported as its own, as if it had voted for
    /// itself in it, so it can vote again only in later terms. It acknowledges entries meanwhile
    /// (those acknowledgements are durable). A brand-new cluster starts this way too: every node
    /// hears from every other at once, and nothing is held back.
    pub rejoining: bool,
}

impl Raft {
    /// Creates a node from what its storage recovered (all empty for a brand new node).
    /// The caller restores its application from `recovered.snapshot` before applying the
    /// entries of the first `Ready`.
    pub fn new(config: Config, recovered: Recovered) -> Raft {
        config.validate();
        let mut rng = SplitMix64::new(config.seed ^ config.id.0.wrapping_mul(0x9E37_79B9));
        let election_ticks = u64::from(config.election_ticks);
        let randomized = rng.range(election_ticks, 2 * election_ticks);
        let log = RaftLog::new(recovered.snapshot, recovered.entries, recovered.hard_state.commit);
        // A crash can keep entries whose term update it lost (both were unsynced): never run
        // behind the log. Dropping the vote is safe: no vote was ever cast in that newer term.
        let (term, voted_for) = if log.last_term() > recovered.hard_state.term {
            (log.last_term(), None)
        } else {
            (recovered.hard_state.term, recovered.hard_state.voted_for)
        };
        let forget = cfg!(feature = "planted-bugs") && config.bugs.forget_lost_storage;
        let rejoin = (recovered.rejoining && !forget).then(Rejoin::default);
        let mut raft = Raft {
            rng,
            term,
            voted_for,
            role: Role::Follower,
            leader: None,
            log,
            ticks: 0,
            election_elapsed: 0,
            randomized_election_ticks: randomized,
            heartbeat_elapsed: 0,
            leader_contact_elapsed: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            reads: ReadRounds::default(),
            broadcast_needed: false,
            messages: Vec::new(),
            messages_after_persist: Vec::new(),
            incoming_snapshot: None,
            read_states: Vec::new(),
            aborted_reads: Vec::new(),
            persisted_hard_state: recovered.hard_state,
            in_flight: None,
            rejoin,
            rejoined_unreported: false,
            config,
        };
        if raft.rejoin.is_some() {
            raft.probe_peers();
            raft.maybe_finish_rejoin();
        }
        raft
    }

    // ----- observers -----------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.config.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn commit_index(&self) -> LogIndex {
        self.log.committed
    }
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }
    pub fn snapshot_index(&self) -> LogIndex {
        self.log.snapshot_index
    }
    /// Term of the entry at `index`, if held.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }
    /// Entries held after the snapshot (for checkers and status pages).
    pub fn entries(&self) -> &[Entry] {
        self.log.entries()
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Whether this node is still rejoining after losing its storage (it votes for nobody).
    pub fn is_rejoining(&self) -> bool {
        self.rejoin.is_some()
    }
    /// Whether a lease read could be answered right now without a round trip.
    pub fn has_lease(&self) -> bool {
        self.role == Role::Leader && self.lease_valid()
    }

    // ----- inputs ---------------------------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.election_elapsed += 1;
            self.leader_contact_elapsed += 1;
            if self.rejoin.is_some() {
                // Not allowed to campaign; asks again, now and then, whoever has not answered
                // (a leader's heartbeats keep the election timer from ever running out).
                if self.ticks.is_multiple_of(u64::from(self.config.election_ticks)) {
                    self.probe_peers();
                }
                if self.election_elapsed >= self.randomized_election_ticks {
                    self.reset_election_timer();
                }
            } else if self.election_elapsed >= self.randomized_election_ticks {
                self.campaign_pre_vote();
            }
        }
    }

    /// Proposes an application command. Only the leader accepts; the entry's index is returned
    /// and the command takes effect when that index is committed *and* still holds it.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<LogIndex, NotLeader> {
        if self.role != Role::Leader {
            return Err(self.not_leader());
        }
        let index = self.log.last_index().next();
        self.log.append(Entry { term: self.term, index, kind: EntryKind::Command(data) });
        self.broadcast_needed = true;
        if self.config.voters.len() == 1 {
            self.maybe_commit();
        }
        Ok(index)
    }

    /// Starts a linearizable read identified by `context`. It completes as a [`ReadState`] (serve
    /// it once applied up to its index) or, if leadership is lost first, in
    /// [`Ready::aborted_reads`].
    pub fn read(&mut self, context: u64, mode: ReadMode) -> Result<(), NotLeader> {
        if self.role != Role::Leader {
            return Err(self.not_leader());
        }
        if self.log.term(self.log.committed) != Some(self.term) {
            self.reads.waiting_for_noop.push((context, mode));
        } else {
            self.register_read(context, mode);
        }
        Ok(())
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, message: Message) {
        debug_assert_eq!(message.to, self.config.id);
        if !self.config.voters.contains(&message.from) || message.from == self.config.id {
            return;
        }
        match message.body {
            // Like pre-votes, probes change no terms: a rejoining node must not disturb anyone.
            MessageBody::StateProbe { last_index } => {
                if let Some(progress) =
                    self.progress.get_mut(&message.from).filter(|p| p.match_index > last_index)
                {
                    // It lost what it acknowledged: replicate to it from scratch (a lower
                    // match index only delays commits).
                    let acked_round = progress.acked_round;
                    *progress = Progress::new(self.log.last_index().next());
                    progress.acked_round = acked_round;
                    self.send_append(message.from);
                }
                let body = MessageBody::StateProbeResponse {
                    last_index: self.log.last_index(),
                    last_term: self.log.last_term(),
                };
                return self.send_now(message.from, self.term, body);
            }
            MessageBody::StateProbeResponse { last_index, last_term } => {
                if let Some(rejoin) = self.rejoin.as_mut().filter(|r| !r.floor_taken) {
                    rejoin.answers.insert(message.from, (message.term, last_term, last_index));
                    self.maybe_finish_rejoin();
                }
                return;
            }
            _ => {}
        }
        if message.term > self.term {
            match &message.body {
                // Pre-votes never change terms: that is their point.
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResponse { granted: true } => {}
                MessageBody::Vote { .. } if self.in_leader_contact() => return,
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    self.become_follower(message.term, Some(message.from));
                }
                _ => self.become_follower(message.term, None),
            }
        } else if message.term < self.term {
            self.step_stale(message);
            return;
        }
        match &message.body {
            MessageBody::PreVote { last_index, last_term } => {
                let granted = message.term > self.term
                    && self.rejoin.is_none()
                    && !self.in_leader_contact()
                    && self.log_ok_for_vote(*last_index, *last_term);
                let term = if granted { message.term } else { self.term };
                self.send_now(message.from, term, MessageBody::PreVoteResponse { granted });
            }
            MessageBody::Vote { last_index, last_term } => {
                self.step_vote(message.from, *last_index, *last_term)
            }
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
                if self.rejoin.as_ref().is_some_and(|r| !r.floor_taken) =>
            {
                // Rejoining and not yet sure which terms it may have voted in: an answer could
                // help a deposed leader (see `maybe_finish_rejoin`). Say nothing.
            }
            _ => match self.role {
                Role::Leader => self.step_leader(message),
                Role::Candidate | Role::PreCandidate => self.step_candidate(message),
                Role::Follower => self.step_follower(message),
            },
        }
        if self.rejoin.is_some() {
            self.maybe_finish_rejoin(); // the log may have caught up
        }
    }

    /// Replaces the log up to `snapshot.index` with the snapshot. The caller has made the
    /// snapshot durable and has applied at least up to its index.
    pub fn compact(&mut self, snapshot: Snapshot) {
        assert_eq!(
            Some(snapshot.term),
            self.log.term(snapshot.index),
            "snapshot term does not match the log"
        );
        self.log.compact(snapshot);
    }

    // ----- outputs --------------------------------------------------------------------------

    /// Whether [`Raft::ready`] has anything to hand out.
    pub fn has_ready(&self) -> bool {
        !self.messages.is_empty()
            || !self.messages_after_persist.is_empty()
            || self.log.has_unstable()
            || self.log.pending_snapshot.is_some()
            || self.hard_state_changed()
            || self.log.committed > self.log.applied
            || !self.read_states.is_empty()
            || !self.aborted_reads.is_empty()
            || self.reads.round_needed
            || (self.broadcast_needed && self.role == Role::Leader)
            || self.rejoined_unreported
    }

    /// Takes the work accumulated since the last call. See [`Ready`] for the order in which the
    /// caller must carry it out; call [`Raft::advance`] when done.
    pub fn ready(&mut self) -> Ready {
        assert!(self.in_flight.is_none(), "ready() called again before advance()");
        if self.role == Role::Leader {
            if self.reads.round_needed {
                self.broadcast_heartbeat();
            }
            if self.broadcast_needed {
                self.broadcast_append();
            }
        }
        let snapshot = self.log.pending_snapshot.take();
        let entries = self.log.take_unstable();
        let hard_state = self.current_hard_state();
        let rejoined = std::mem::take(&mut self.rejoined_unreported);
        let hard_state =
            if self.hard_state_changed() || !entries.is_empty() || snapshot.is_some() || rejoined {
                self.persisted_hard_state = hard_state;
                Some(hard_state)
            } else {
                None
            };
        self.in_flight = Some(InFlight {
            last_entry: entries.last().map(|e| (e.index, e.term)),
            snapshot_index: snapshot.as_ref().map(|s| s.index),
        });
        Ready {
            messages: std::mem::take(&mut self.messages),
            snapshot,
            entries,
            hard_state,
            messages_after_persist: std::mem::take(&mut self.messages_after_persist),
            committed: self.log.take_committed(),
            read_states: std::mem::take(&mut self.read_states),
            aborted_reads: std::mem::take(&mut self.aborted_reads),
            rejoined,
        }
    }

    /// A leader's committed entries not handed out yet, to apply at once while a [`Ready`] is
    /// being made durable (between [`Raft::ready`] and [`Raft::advance`]): when followers
    /// acknowledge entries before the leader's own fsync ends, the commit need not wait for
    /// that fsync, nor for the next Ready. Committed means durable on a majority, so applying
    /// and answering them is safe whatever becomes of this node's copy. Empty unless leader
    /// (a follower's commit may run ahead of a snapshot it has still to install).
    pub fn take_committed(&mut self) -> Vec<Entry> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        self.log.take_committed()
    }

    /// Confirms that everything in the last [`Ready`] is durable and carried out.
    pub fn advance(&mut self) {
        let in_flight = self.in_flight.take().expect("advance() without ready()");
        if let Some(index) = in_flight.snapshot_index {
            self.log.stable = self.log.stable.max(index);
        }
        if let Some((index, term)) = in_flight.last_entry {
            // A newer leader may have truncated what we were writing in the meantime.
            if self.log.term(index) == Some(term) {
                self.log.stable = self.log.stable.max(index);
            }
        }
        if self.role == Role::Leader {
            self.maybe_commit();
        }
    }

    // ----- elections ------------------------------------------------------------------------

    fn in_leader_contact(&self) -> bool {
        self.role == Role::Leader
            || self.leader_contact_elapsed < u64::from(self.config.election_ticks)
    }

    fn log_ok_for_vote(&self, last_index: LogIndex, last_term: Term) -> bool {
        self.log.is_up_to_date(last_index, last_term) || self.bug(|b| b.vote_without_log_check)
    }

    fn campaign_pre_vote(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.reset_election_timer();
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        if self.has_quorum_of_votes(true) {
            return self.campaign();
        }
        let body = MessageBody::PreVote {
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        let term = Term(self.term.0 + 1);
        for peer in self.peers() {
            self.send_now(peer, term, body.clone());
        }
    }

    fn campaign(&mut self) {
        self.role = Role::Candidate;
        self.term = Term(self.term.0 + 1);
        self.voted_for = Some(self.config.id);
        self.leader = None;
        self.reset_election_timer();
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        if self.has_quorum_of_votes(true) {
            return self.become_leader();
        }
        let body = MessageBody::Vote {
            last_index: self.log.last_index(),
            last_term: self.log.last_term(),
        };
        for peer in self.peers() {
            // Our own vote must be durable before anyone can count on our candidacy.
            self.send_after_persist(peer, body.clone());
        }
    }

    fn step_vote(&mut self, candidate: NodeId, last_index: LogIndex, last_term: Term) {
        let free_to_vote = self.rejoin.is_none()
            && (self.voted_for == Some(candidate)
                || (self.voted_for.is_none() && self.leader.is_none()));
        let granted = free_to_vote && self.log_ok_for_vote(last_index, last_term);
        if granted {
            self.voted_for = Some(candidate);
            self.reset_election_timer();
        }
        self.send_after_persist(candidate, MessageBody::VoteResponse { granted });
    }

    fn step_candidate(&mut self, message: Message) {
        match message.body {
            MessageBody::PreVoteResponse { granted } if self.role == Role::PreCandidate => {
                if message.term != Term(self.term.0 + 1) && granted {
                    return; // an answer to an older pre-vote
                }
                self.votes.insert(message.from, granted);
                if self.has_quorum_of_votes(true) {
                    self.campaign();
                } else if self.has_quorum_of_votes(false) {
                    self.become_follower(self.term, None);
                }
            }
            MessageBody::VoteResponse { granted } if self.role == Role::Candidate => {
                self.votes.insert(message.from, granted);
                if self.has_quorum_of_votes(true) {
                    self.become_leader();
                } else if self.has_quorum_of_votes(false) {
                    self.become_follower(self.term, None);
                }
            }
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                // A leader exists in our term: it won.
                self.become_follower(self.term, Some(message.from));
                self.step_follower(message);
            }
            _ => {}
        }
    }

    fn has_quorum_of_votes(&self, granted: bool) -> bool {
        let count = self.votes.values().filter(|&&g| g == granted).count();
        count >= self.quorum()
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
        }
        if self.role == Role::Leader {
            self.abort_reads();
            // A deposed leader keeps refusing votes for a full election timeout so that any
            // lease it granted itself runs out first.
            self.leader_contact_elapsed = 0;
        }
        self.role = Role::Follower;
        self.leader = leader;
        if leader.is_some() {
            self.leader_contact_elapsed = 0;
        }
        self.progress.clear();
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.incoming_snapshot = None;
        self.leader = Some(self.config.id);
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        self.leader_contact_elapsed = 0;
        let next = self.log.last_index().next();
        self.progress = self.peers().into_iter().map(|p| (p, Progress::new(next))).collect();
        self.reads = ReadRounds { round: self.reads.round, ..ReadRounds::default() };
        // §5.4.2 / §6.4: commit something of our own term to learn the commit index.
        let index = self.log.last_index().next();
        self.log.append(Entry { term: self.term, index, kind: EntryKind::Noop });
        self.broadcast_needed = true;
        if self.config.voters.len() == 1 {
            self.maybe_commit();
        }
    }

    // ----- rejoining after lost storage (see `Recovered::rejoining`) -----------------------

    /// Asks the voters that have not answered yet; once all have, asks them all again (so a
    /// leader that still counts on what this node held before learns otherwise).
    fn probe_peers(&mut self) {
        let Some(rejoin) = &self.rejoin else { return };
        let targets: Vec<NodeId> = self
            .peers()
            .into_iter()
            .filter(|p| rejoin.floor_taken || !rejoin.answers.contains_key(p))
            .collect();
        let body = MessageBody::StateProbe { last_index: self.log.last_index() };
        for peer in targets {
            self.send_now(peer, self.term, body.clone());
        }
    }

    fn maybe_finish_rejoin(&mut self) {
        let peers = self.peers();
        let Some(rejoin) = &mut self.rejoin else { return };
        if !rejoin.floor_taken {
            if peers.iter().any(|p| !rejoin.answers.contains_key(p)) {
                return;
            }
            rejoin.floor_taken = true;
            // Every vote this node may have cast went to a candidate that made its term durable
            // first, and that candidate has answered with a term at least as high. Taking that
            // term now, before acknowledging anything, keeps it from helping a leader of an
            // older term commit behind the back of one it may have elected.
            let floor = rejoin.answers.values().map(|&(term, _, _)| term).max().unwrap_or_default();
            rejoin.target = rejoin
                .answers
                .values()
                .map(|&(_, last_term, last_index)| (last_term, last_index))
                .max()
                .unwrap_or_default();
            if floor > self.term {
                self.become_follower(floor, None);
            }
            if self.term == floor && self.voted_for.is_none() {
                // As if it had voted for itself: the only vote it may have cast in `floor`
                // is gone.
                self.voted_for = Some(self.config.id);
            }
            // Asked again so that a leader replicates to it from scratch now that it answers.
            self.probe_peers();
        }
        let Some(rejoin) = &self.rejoin else { return };
        if (self.log.last_term(), self.log.last_index()) < rejoin.target {
            return; // not caught up yet: whatever it acknowledged before may be missing
        }
        self.rejoin = None;
        self.rejoined_unreported = true;
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let e = u64::from(self.config.election_ticks);
        self.randomized_election_ticks = self.rng.range(e, 2 * e);
    }

    // ----- followers ------------------------------------------------------------------------

    fn step_follower(&mut self, message: Message) {
        let from = message.from;
        match message.body {
            MessageBody::Append { prev_index, prev_term, entries, commit } => {
                self.heard_from_leader(from);
                self.handle_append(from, prev_index, prev_term, entries, commit);
            }
            MessageBody::Heartbeat { commit, round } => {
                self.heard_from_leader(from);
                // The leader sends min(commit, our match), so we hold those entries.
                let commit = commit.min(self.log.last_index());
                self.log.commit_to(commit);
                self.send_now(from, self.term, MessageBody::HeartbeatResponse { round });
            }
            MessageBody::InstallSnapshot { index, snapshot_term, voters, offset, total, data } => {
                self.heard_from_leader(from);
                let match_index = if index <= self.log.committed {
                    self.incoming_snapshot = None;
                    self.log.committed
                } else if self.log.term(index) == Some(snapshot_term) {
                    self.incoming_snapshot = None;
                    self.log.commit_to(index);
                    index
                } else {
                    let piece = SnapshotPiece { index, term: snapshot_term, voters, offset, total };
                    match self.receive_snapshot_piece(piece, data) {
                        Ok(snapshot) => {
                            self.log.restore(snapshot);
                            index
                        }
                        Err(received) => {
                            let body = MessageBody::SnapshotReceived { index, received };
                            self.send_now(from, self.term, body);
                            return;
                        }
                    }
                };
                self.send_after_persist(
                    from,
                    MessageBody::AppendResponse(AppendResult::Accepted { match_index }),
                );
            }
            _ => {}
        }
    }

    /// Adds one piece to the snapshot being received. Returns the whole snapshot once all its
    /// bytes are here, or else how many bytes in order are held (the piece the leader should
    /// send next). Pieces out of order, repeated, or of another snapshot are dropped; a new
    /// snapshot starts at offset 0 and replaces an unfinished one.
    fn receive_snapshot_piece(
        &mut self,
        piece: SnapshotPiece,
        data: Vec<u8>,
    ) -> Result<Snapshot, u64> {
        let offset = piece.offset;
        let same = self.incoming_snapshot.as_ref().is_some_and(|s| {
            s.index == piece.index && s.term == piece.term && s.total == piece.total
        });
        if !same {
            if offset != 0 {
                return Err(0);
            }
            // Reserve what the leader announced, within reason: it is a peer, not a client, but
            // a corrupt length must not allocate the machine's memory at once.
            let reserve = piece.total.min(64 * 1024 * 1024) as usize;
            self.incoming_snapshot =
                Some(IncomingSnapshot { data: Vec::with_capacity(reserve), ..piece.into() });
        }
        let incoming = self.incoming_snapshot.as_mut().expect("set above");
        let held = incoming.data.len() as u64;
        if offset == held && held + data.len() as u64 <= incoming.total {
            incoming.data.extend_from_slice(&data);
        }
        if (incoming.data.len() as u64) < incoming.total {
            return Err(incoming.data.len() as u64);
        }
        let done = self.incoming_snapshot.take().expect("checked above");
        Ok(Snapshot { index: done.index, term: done.term, voters: done.voters, data: done.data })
    }

    fn heard_from_leader(&mut self, leader: NodeId) {
        self.leader = Some(leader);
        self.election_elapsed = 0;
        self.leader_contact_elapsed = 0;
    }

    fn handle_append(
        &mut self,
        leader: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: LogIndex,
    ) {
        let result = if prev_index < self.log.committed {
            AppendResult::Accepted { match_index: self.log.committed }
        } else if self.log.term(prev_index) == Some(prev_term)
            || (self.log.term(prev_index).is_some() && self.bug(|b| b.append_without_prev_check))
        {
            let last_new = self.log.append_from_leader(prev_index, entries);
            self.log.commit_to(commit.min(last_new));
            AppendResult::Accepted { match_index: last_new }
        } else if prev_index > self.log.last_index() {
            AppendResult::Rejected {
                rejected_index: prev_index,
                hint_index: self.log.last_index().next(),
                hint_term: None,
            }
        } else {
            AppendResult::Rejected {
                rejected_index: prev_index,
                hint_index: self.log.first_index_of_term_at(prev_index),
                hint_term: self.log.term(prev_index),
            }
        };
        self.send_after_persist(leader, MessageBody::AppendResponse(result));
    }

    /// A message from an older term: tell stale leaders and pre-candidates about ours.
    fn step_stale(&mut self, message: Message) {
        match message.body {
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                self.send_now(message.from, self.term, MessageBody::HeartbeatResponse { round: 0 });
            }
            MessageBody::PreVote { .. } => {
                self.send_now(
                    message.from,
                    self.term,
                    MessageBody::PreVoteResponse { granted: false },
                );
            }
            _ => {}
        }
    }

    // ----- leaders --------------------------------------------------------------------------

    fn tick_leader(&mut self) {
        self.leader_contact_elapsed = 0;
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= u64::from(self.config.election_ticks) {
            self.election_elapsed = 0;
            // Check-quorum: a leader that cannot reach a quorum steps down, so clients move on.
            let active = 1 + self.progress.values().filter(|p| p.recent_active).count();
            if active < self.quorum() {
                let term = self.term;
                self.become_follower(term, None);
                return;
            }
            for progress in self.progress.values_mut() {
                progress.recent_active = false;
            }
        }
        if self.heartbeat_elapsed >= u64::from(self.config.heartbeat_ticks) {
            self.broadcast_heartbeat();
        }
    }

    fn step_leader(&mut self, message: Message) {
        let from = message.from;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        match message.body {
            MessageBody::AppendResponse(AppendResult::Accepted { match_index }) => {
                match progress.state {
                    ReplicationState::Snapshot { index, .. } if match_index < index => return,
                    ReplicationState::Snapshot { .. } | ReplicationState::Probe => {
                        // The follower's log matches ours up to `match_index`: start pipelining.
                        progress.acknowledge(match_index);
                        progress.become_replicate();
                    }
                    ReplicationState::Replicate => {
                        progress.acknowledge(match_index);
                    }
                }
                self.maybe_commit();
                self.send_append(from);
            }
            MessageBody::AppendResponse(AppendResult::Rejected {
                rejected_index,
                hint_index,
                hint_term,
            }) => {
                let stale = match progress.state {
                    ReplicationState::Replicate => rejected_index <= progress.match_index,
                    ReplicationState::Probe => rejected_index != progress.next_index.prev(),
                    ReplicationState::Snapshot { .. } => true,
                };
                if stale {
                    return;
                }
                let mut next = match hint_term.and_then(|t| self.log.last_index_of_term(t)) {
                    Some(last_of_term) => last_of_term.next(),
                    None => hint_index,
                };
                next = next.min(rejected_index).max(progress.match_index.next());
                progress.become_probe();
                progress.next_index = next;
                self.send_append(from);
            }
            MessageBody::HeartbeatResponse { round } => {
                progress.acked_round = progress.acked_round.max(round);
                let stalled = progress.heartbeat_answered(self.log.last_index());
                match progress.state {
                    ReplicationState::Probe => progress.probe_sent = false,
                    // Pipelined Appends may have been lost; probing finds out.
                    ReplicationState::Replicate if stalled => progress.become_probe(),
                    ReplicationState::Replicate => {}
                    // No piece confirmed since the last answer: the one in flight, or its
                    // answer, was lost. Send it again (the follower drops a repeat).
                    ReplicationState::Snapshot { received, .. } => {
                        let lost = received == progress.snapshot_received_at_heartbeat;
                        progress.snapshot_received_at_heartbeat = received;
                        if lost {
                            self.send_snapshot_piece(from);
                        }
                        self.advance_reads();
                        return;
                    }
                }
                if progress.match_index < self.log.last_index() {
                    self.send_append(from);
                }
                self.advance_reads();
            }
            MessageBody::SnapshotReceived { index, received } => {
                if let ReplicationState::Snapshot { index: sending, .. } = progress.state {
                    // A follower answering about an older snapshot of ours gets the current
                    // one from its start.
                    let received = if index == sending { received } else { 0 };
                    progress.state = ReplicationState::Snapshot { index: sending, received };
                    self.send_snapshot_piece(from);
                }
            }
            _ => {}
        }
    }

    fn maybe_commit(&mut self) {
        let mut matches: Vec<LogIndex> = self.progress.values().map(|p| p.match_index).collect();
        matches.push(self.log.stable);
        matches.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_index = matches[self.quorum() - 1];
        if quorum_index <= self.log.committed {
            return;
        }
        // §5.4.2: only entries of the current term are committed by counting replicas.
        if self.log.term(quorum_index) != Some(self.term) {
            return;
        }
        self.log.commit_to(quorum_index);
        self.broadcast_needed = true;
        if !self.reads.waiting_for_noop.is_empty() {
            for (context, mode) in std::mem::take(&mut self.reads.waiting_for_noop) {
                self.register_read(context, mode);
            }
        }
    }

    /// Sends new entries to every follower. A new commit index alone is not broadcast: it
    /// rides on the next Append or heartbeat. Sending it at once cost every commit a message
    /// to the slower follower, and that follower's answer: one of the leader's four sends per
    /// request at one request in flight.
    fn broadcast_append(&mut self) {
        self.broadcast_needed = false;
        let last = self.log.last_index();
        for peer in self.peers() {
            let progress = &self.progress[&peer];
            if progress.state == ReplicationState::Replicate && progress.next_index > last {
                continue;
            }
            self.send_append(peer);
        }
    }

    fn send_append(&mut self, to: NodeId) {
        let max_inflight = self.config.max_inflight_appends;
        let max_bytes = self.config.max_append_bytes;
        let term = self.term;
        let commit = self.log.committed;
        let last = self.log.last_index();
        let progress = self.progress.get_mut(&to).expect("progress for every peer");
        if progress.is_paused(max_inflight) {
            return;
        }
        let prev_index = progress.next_index.prev();
        let Some(prev_term) = self.log.term(prev_index) else {
            // The follower needs entries we compacted away.
            let index = self.log.snapshot.as_ref().expect("compacted log has a snapshot").index;
            progress.state = ReplicationState::Snapshot { index, received: 0 };
            progress.snapshot_received_at_heartbeat = 0;
            progress.inflight.clear();
            self.send_snapshot_piece(to);
            return;
        };
        let entries = self.log.slice(progress.next_index, last, max_bytes);
        if entries.is_empty()
            && progress.state == ReplicationState::Replicate
            && progress.match_index >= commit.min(last)
        {
            return; // nothing new; heartbeats carry the commit index
        }
        let last_sent = entries.last().map(|e| e.index).unwrap_or(prev_index);
        progress.sent(last_sent, !entries.is_empty());
        self.messages.push(Message {
            from: self.config.id,
            to,
            term,
            body: MessageBody::Append { prev_index, prev_term, entries, commit },
        });
    }

    /// Sends `to` the piece of our snapshot that follows what it confirmed. If we compacted
    /// again meanwhile, the newer snapshot starts over from its first byte.
    fn send_snapshot_piece(&mut self, to: NodeId) {
        let chunk = self.config.snapshot_chunk_bytes as u64;
        let snapshot = self.log.snapshot.as_ref().expect("sending a snapshot we have");
        let progress = self.progress.get_mut(&to).expect("progress for every peer");
        let ReplicationState::Snapshot { index, received } = progress.state else { return };
        let offset = if index == snapshot.index { received } else { 0 };
        progress.state = ReplicationState::Snapshot { index: snapshot.index, received: offset };
        let total = snapshot.data.len() as u64;
        let offset = offset.min(total);
        let end = (offset + chunk).min(total);
        let body = MessageBody::InstallSnapshot {
            index: snapshot.index,
            snapshot_term: snapshot.term,
            voters: snapshot.voters.clone(),
            offset,
            total,
            data: snapshot.data[offset as usize..end as usize].to_vec(),
        };
        self.messages.push(Message { from: self.config.id, to, term: self.term, body });
    }

    fn broadcast_heartbeat(&mut self) {
        self.heartbeat_elapsed = 0;
        self.reads.round += 1;
        self.reads.round_needed = false;
        let round = self.reads.round;
        self.reads.sent_at_tick.push_back((round, self.ticks));
        for peer in self.peers() {
            let commit = self.log.committed.min(self.progress[&peer].match_index);
            self.send_now(peer, self.term, MessageBody::Heartbeat { commit, round });
        }
        if self.config.voters.len() == 1 {
            self.advance_reads();
        }
    }

    // ----- reads ----------------------------------------------------------------------------

    fn register_read(&mut self, context: u64, mode: ReadMode) {
        let index = self.log.committed;
        let immediate = self.config.voters.len() == 1
            || (mode == ReadMode::Lease && self.lease_valid())
            || self.bug(|b| b.read_without_quorum);
        if immediate {
            self.read_states.push(ReadState { context, index });
        } else {
            let round = self.reads.round + 1;
            self.reads.pending.push_back(PendingRead { context, index, round });
            self.reads.round_needed = true;
        }
    }

    /// The highest heartbeat round acknowledged by a quorum (counting ourselves).
    fn quorum_round(&self) -> u64 {
        let mut rounds: Vec<u64> = self.progress.values().map(|p| p.acked_round).collect();
        rounds.push(self.reads.round);
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds[self.quorum() - 1]
    }

    fn advance_reads(&mut self) {
        let confirmed = self.quorum_round();
        while let Some(&(round, tick)) = self.reads.sent_at_tick.front() {
            if round > confirmed {
                break;
            }
            self.reads.confirmed = Some((round, tick));
            self.reads.sent_at_tick.pop_front();
        }
        while self.reads.pending.front().is_some_and(|r| r.round <= confirmed) {
            let read = self.reads.pending.pop_front().expect("checked non-empty");
            self.read_states.push(ReadState { context: read.context, index: read.index });
        }
    }

    fn lease_valid(&self) -> bool {
        match self.reads.confirmed {
            Some((_, sent_tick)) => self.ticks < sent_tick + self.config.lease_ticks(),
            None => false,
        }
    }

    fn abort_reads(&mut self) {
        let reads = std::mem::take(&mut self.reads);
        self.aborted_reads.extend(reads.pending.into_iter().map(|r| r.context));
        self.aborted_reads.extend(reads.waiting_for_noop.into_iter().map(|(c, _)| c));
        self.reads.round = reads.round;
    }

    // ----- helpers --------------------------------------------------------------------------

    fn quorum(&self) -> usize {
        self.config.voters.len() / 2 + 1
    }

    fn peers(&self) -> Vec<NodeId> {
        let me = self.config.id;
        let peers: BTreeSet<NodeId> =
            self.config.voters.iter().copied().filter(|&p| p != me).collect();
        peers.into_iter().collect()
    }

    fn not_leader(&self) -> NotLeader {
        NotLeader { leader: self.leader }
    }

    fn current_hard_state(&self) -> HardState {
        HardState { term: self.term, voted_for: self.voted_for, commit: self.log.committed }
    }

    /// Term or vote changed since last handed out (a commit change alone is not worth an fsync).
    fn hard_state_changed(&self) -> bool {
        self.term != self.persisted_hard_state.term
            || self.voted_for != self.persisted_hard_state.voted_for
    }

    fn send_now(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.messages.push(Message { from: self.config.id, to, term, body });
    }

    fn send_after_persist(&mut self, to: NodeId, body: MessageBody) {
        let term = self.term;
        self.messages_after_persist.push(Message { from: self.config.id, to, term, body });
    }

    fn bug(&self, which: impl Fn(&PlantedBugs) -> bool) -> bool {
        cfg!(feature = "planted-bugs") && which(&self.config.bugs)
    }
}
