//! What one step of the core asks its caller to do, and in which order.
//!
//! # The persistence contract
//!
//! The caller takes a [`Ready`] with [`crate::Raft::ready`] and then, **in this order**:
//!
//! 1. may send [`Ready::messages`] at once — they depend on nothing unwritten (the leader's
//!    Appends and heartbeats, pre-vote requests; a leader may write its own log in parallel with
//!    its followers, §10.2.1, because it counts itself only once [`crate::Raft::advance`] says
//!    its entries are durable);
//! 2. makes durable, with one fsync covering all of it: [`Ready::snapshot`] (if any), then
//!    [`Ready::entries`] — first deleting every stored entry with an index `>=` the first one
//!    given, then appending — then [`Ready::hard_state`] (if any);
//! 3. only then sends [`Ready::messages_after_persist`]: votes and vote requests (a vote must
//!    never be forgotten, or a node could vote twice in one term) and acknowledgements of
//!    entries (an entry acknowledged but lost could be counted towards a commit it is missing
//!    from);
//! 4. if [`Ready::snapshot`] is set, restores the application from it, then applies
//!    [`Ready::committed`] in order — these are all durable on this node by step 2. A leader
//!    may apply them before step 2 instead: committed means durable on a majority, and a
//!    leader's Ready never carries a snapshot; while its fsync runs, it may also apply what
//!    [`crate::Raft::take_committed`] hands out as followers' acknowledgements arrive;
//! 5. serves [`Ready::read_states`] once the application has applied up to their index, and
//!    answers [`Ready::aborted_reads`] with "not leader";
//! 6. calls [`crate::Raft::advance`].
//!
//! Between `ready` and `advance` the caller may keep calling `step`, `tick` and `propose`
//! (a group commit in flight does not stop the node), but must not call `ready` again.

use crate::types::{Entry, HardState, LogIndex, Message, Snapshot};

/// A read that may be served once the local application has applied `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's identifier for the read.
    pub context: u64,
    pub index: LogIndex,
}

/// Work for the caller. See the module documentation for the order it must be done in.
#[derive(Debug, Default)]
pub struct Ready {
    pub messages: Vec<Message>,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub messages_after_persist: Vec<Message>,
    pub committed: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    pub aborted_reads: Vec<u64>,
    /// Set in the one Ready whose hard state ends a rejoin (see
    /// [`crate::Recovered::rejoining`]): once that hard state is durable, the caller may forget
    /// that its storage was lost (delete its marker).
    pub rejoined: bool,
}

impl Ready {
    /// Whether anything must be written to disk for this Ready.
    pub fn must_persist(&self) -> bool {
        self.snapshot.is_some() || !self.entries.is_empty() || self.hard_state.is_some()
    }
}
