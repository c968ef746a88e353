//! Identifiers, log entries, durable state and the messages Raft nodes exchange.

use serde::{Deserialize, Serialize};

/// A cluster member. `0` is never a valid id (it means "none" on the wire of older tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// A Raft term: at most one leader per term.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Term(pub u64);

/// A position in the replicated log, starting at 1. `LogIndex(0)` is "before the first entry".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LogIndex(pub u64);

impl LogIndex {
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// What a log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Appended by every new leader so that it can commit entries of earlier terms (§5.4.2)
    /// and serve reads (§6.4). The application ignores it.
    Noop,
    /// Opaque application bytes.
    Command(Vec<u8>),
}

/// One replicated log entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub term: Term,
    pub index: LogIndex,
    pub kind: EntryKind,
}

impl Entry {
    /// Approximate encoded size, used to bound the bytes of one AppendEntries.
    pub fn size_bytes(&self) -> usize {
        24 + match &self.kind {
            EntryKind::Noop => 0,
            EntryKind::Command(data) => data.len(),
        }
    }
}

/// The state that must survive a crash before certain messages may leave the node (see
/// [`crate::Ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<NodeId>,
    /// Known committed index. Persisting it is not needed for safety; it lets a restarted node
    /// apply its log without waiting for the leader.
    pub commit: LogIndex,
}

/// A snapshot of the application state covering the log up to and including `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub index: LogIndex,
    pub term: Term,
    /// The cluster's voters at `index` (room for membership change).
    pub voters: Vec<NodeId>,
    pub data: Vec<u8>,
}

/// A message between two Raft nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term, except in a pre-vote request where it is the term the sender would
    /// campaign in.
    pub term: Term,
    pub body: MessageBody,
}

/// The payload of a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// §9.6: would you vote for me? Changes no state on either side.
    PreVote {
        last_index: LogIndex,
        last_term: Term,
    },
    PreVoteResponse {
        granted: bool,
    },
    Vote {
        last_index: LogIndex,
        last_term: Term,
    },
    VoteResponse {
        granted: bool,
    },
    Append {
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: LogIndex,
    },
    AppendResponse(AppendResult),
    /// Keeps followers quiet and confirms leadership for reads: `round` is echoed back.
    Heartbeat {
        commit: LogIndex,
        round: u64,
    },
    HeartbeatResponse {
        round: u64,
    },
    /// One piece of the leader's snapshot at `index`: its bytes `offset..offset + data.len()`
    /// of `total`. Snapshots travel in pieces of at most `Config::snapshot_chunk_bytes`, one
    /// at a time, so a large state never needs one huge frame and heartbeats keep flowing
    /// between the pieces.
    InstallSnapshot {
        index: LogIndex,
        snapshot_term: Term,
        voters: Vec<NodeId>,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    },
    /// A follower holds the first `received` bytes of the snapshot at `index` (0: start over)
    /// and wants the piece that follows. The last piece is answered with `AppendResponse`
    /// instead, once the whole snapshot is durable.
    SnapshotReceived {
        index: LogIndex,
        received: u64,
    },
    /// From a node that lost its storage (see [`crate::Recovered::rejoining`]): what is your
    /// term and your log's end? Changes no term on either side; `term` is the sender's,
    /// `last_index` the end of its log — a leader that believed it held more replicates to it
    /// from scratch.
    StateProbe {
        last_index: LogIndex,
    },
    /// The answer: `term` is the answering node's current term.
    StateProbeResponse {
        last_index: LogIndex,
        last_term: Term,
    },
}

/// A follower's answer to `Append` or `InstallSnapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// The follower's log matches the leader's up to `match_index`.
    Accepted { match_index: LogIndex },
    /// `prev_index` did not match. The hint lets the leader skip a whole term at a time
    /// (§5.3 optimisation): `hint_term` is the follower's term at `prev_index` (if it has that
    /// index) and `hint_index` the first index the follower holds of that term, or its last
    /// index + 1 when its log is shorter.
    Rejected { rejected_index: LogIndex, hint_index: LogIndex, hint_term: Option<Term> },
}
