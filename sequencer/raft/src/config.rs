//! Static configuration of one Raft node.

use crate::types::NodeId;

/// Things that can be switched on to make the algorithm deliberately wrong, so tests can show
/// that the simulator's checkers catch them. Only honoured with the `planted-bugs` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// Grant votes without the §5.4.1 log up-to-date check.
    pub vote_without_log_check: bool,
    /// Answer ReadIndex reads without confirming leadership with a quorum.
    pub read_without_quorum: bool,
    /// Accept an Append whose previous entry has a different term (breaks log matching).
    pub append_without_prev_check: bool,
    /// Start a node whose storage was lost as if it were brand new: it votes at once.
    pub forget_lost_storage: bool,
}

/// Entry bytes in one Append unless configured otherwise.
pub const MAX_APPEND_BYTES_DEFAULT: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    /// Initial voters, including `id`. Membership change will make this dynamic.
    pub voters: Vec<NodeId>,
    /// Minimum election timeout in ticks; each timeout is drawn from
    /// `election_ticks..2*election_ticks`. Also the period of check-quorum and the window in
    /// which a node that heard from a leader refuses to vote for anyone else.
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    /// Appends in flight to one follower before the leader waits for acknowledgements.
    pub max_inflight_appends: usize,
    /// Upper bound on entry bytes in one Append.
    pub max_append_bytes: usize,
    /// Largest piece of a snapshot in one InstallSnapshot message.
    pub snapshot_chunk_bytes: usize,
    /// Largest relative difference between two nodes' tick rates, in parts per thousand, that
    /// lease reads tolerate. A lease lasts `election_ticks * (1000 - d) / (1000 + d) - 1` ticks
    /// from the moment the confirming heartbeat was sent. If tick rates differ by more than
    /// this, lease reads may be stale: use ReadIndex reads.
    pub lease_drift_permille: u32,
    /// Seed for the randomized election timeouts.
    pub seed: u64,
    pub bugs: PlantedBugs,
}

impl Config {
    pub fn new(id: NodeId, voters: Vec<NodeId>, seed: u64) -> Config {
        Config {
            id,
            voters,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_inflight_appends: 64,
            max_append_bytes: MAX_APPEND_BYTES_DEFAULT,
            snapshot_chunk_bytes: 1024 * 1024,
            lease_drift_permille: 100,
            seed,
            bugs: PlantedBugs::default(),
        }
    }

    /// Ticks a lease stays valid after the heartbeat that confirmed it was sent.
    pub fn lease_ticks(&self) -> u64 {
        let d = u64::from(self.lease_drift_permille.min(999));
        (u64::from(self.election_ticks) * (1000 - d) / (1000 + d)).saturating_sub(1)
    }

    pub(crate) fn validate(&self) {
        assert!(self.voters.contains(&self.id), "a node must be one of the voters");
        assert!(self.heartbeat_ticks >= 1 && self.heartbeat_ticks < self.election_ticks);
        assert!(self.max_inflight_appends >= 1);
        assert!(self.snapshot_chunk_bytes >= 1);
    }
}
