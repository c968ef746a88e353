//! What the leader knows about each follower's log, and the bounded window of
//! AppendEntries in flight to it.

use std::collections::VecDeque;

use crate::types::LogIndex;

/// How the leader currently sends entries to one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicationState {
    /// Unknown match: one Append at a time until the follower accepts one.
    Probe,
    /// Known match: Appends are pipelined, at most `max_inflight` at once.
    Replicate,
    /// The snapshot at `index` is on its way, piece by piece; the follower confirmed holding
    /// its first `received` bytes.
    Snapshot { index: LogIndex, received: u64 },
}

/// Heartbeat answers without replication progress before the leader re-probes a follower.
const STALLED_HEARTBEATS_MAX: u32 = 3;

#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Highest index known to be replicated on the follower. Invariant: `match_index < next_index`.
    pub match_index: LogIndex,
    pub next_index: LogIndex,
    pub state: ReplicationState,
    /// In `Probe`: an Append is out and unanswered, so don't send another until a heartbeat
    /// response says the follower is alive.
    pub probe_sent: bool,
    /// Last index of each Append in flight (in `Replicate`), oldest first.
    pub inflight: VecDeque<LogIndex>,
    /// Heard from since the last check-quorum.
    pub recent_active: bool,
    /// Highest heartbeat round the follower has answered in this term.
    pub acked_round: u64,
    /// Heartbeat answers in a row while `match_index` stood still below the leader's last
    /// index: pipelined Appends were probably lost, so the leader falls back to probing.
    pub stalled_heartbeats: u32,
    match_at_last_heartbeat: LogIndex,
    /// Snapshot bytes the follower had confirmed at the last heartbeat answer: no more since
    /// means the piece in flight (or its answer) was lost, and it is sent again.
    pub snapshot_received_at_heartbeat: u64,
}

impl Progress {
    pub fn new(next_index: LogIndex) -> Progress {
        Progress {
            match_index: LogIndex(0),
            next_index,
            state: ReplicationState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            recent_active: false,
            acked_round: 0,
            stalled_heartbeats: 0,
            match_at_last_heartbeat: LogIndex(0),
            snapshot_received_at_heartbeat: 0,
        }
    }

    pub fn become_probe(&mut self) {
        self.next_index = self.match_index.next().max(match self.state {
            ReplicationState::Snapshot { index, .. } => index.next(),
            _ => LogIndex(0),
        });
        self.state = ReplicationState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
    }

    pub fn become_replicate(&mut self) {
        self.state = ReplicationState::Replicate;
        self.next_index = self.match_index.next();
        self.inflight.clear();
    }

    /// Records an acknowledgement up to `index`. Returns whether it moved `match_index`.
    pub fn acknowledge(&mut self, index: LogIndex) -> bool {
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        let moved = index > self.match_index;
        if moved {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index.next());
        moved
    }

    /// Notes a heartbeat answer; returns whether replication to this follower looks stuck.
    pub fn heartbeat_answered(&mut self, leader_last: LogIndex) -> bool {
        if self.match_index < leader_last && self.match_index == self.match_at_last_heartbeat {
            self.stalled_heartbeats += 1;
        } else {
            self.stalled_heartbeats = 0;
        }
        self.match_at_last_heartbeat = self.match_index;
        self.stalled_heartbeats >= STALLED_HEARTBEATS_MAX
    }

    pub fn is_paused(&self, max_inflight: usize) -> bool {
        match self.state {
            ReplicationState::Probe => self.probe_sent,
            ReplicationState::Replicate => self.inflight.len() >= max_inflight,
            ReplicationState::Snapshot { .. } => true,
        }
    }

    /// Notes an Append ending at `last` as sent.
    pub fn sent(&mut self, last: LogIndex, had_entries: bool) {
        match self.state {
            ReplicationState::Replicate if had_entries => {
                self.next_index = last.next();
                self.inflight.push_back(last);
            }
            ReplicationState::Probe => self.probe_sent = true,
            _ => {}
        }
    }
}
