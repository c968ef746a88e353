//! Raft as a pure, deterministic state machine.
//!
//! This crate is only the algorithm. It never touches a disk, a socket, a clock or a thread:
//! its caller feeds it inputs and carries out what it asks for. That makes every run
//! replayable from a seed, which is what the simulator (`tob-sim`) relies on.
//!
//! # Driving a node
//!
//! ```text
//! loop {
//!     on timer:           raft.tick()                 // logical time, one call per tick
//!     on peer message:    raft.step(message)
//!     on client command:  raft.propose(bytes) / raft.read(context, mode)
//!     if raft.has_ready() {
//!         let ready = raft.ready();
//!         send ready.messages                          // may go at once
//!         persist ready.snapshot, ready.entries, ready.hard_state; fsync
//!         send ready.messages_after_persist            // only after the fsync
//!         restore ready.snapshot; apply ready.committed
//!         serve ready.read_states when applied >= index; fail ready.aborted_reads
//!         raft.advance()
//!     }
//!     now and then: snapshot the application at an applied index, persist it,
//!                   raft.compact(snapshot)
//! }
//! ```
//!
//! [`Ready`] documents the persistence contract exactly: which writes must be durable before
//! which messages may leave the node.
//!
//! # What is implemented
//!
//! Leader election with randomized timeouts, pre-vote and check-quorum; log replication with
//! proposal batching, pipelined Appends bounded per follower, and term-skipping backtracking;
//! commitment only by counting replicas of current-term entries; a no-op from every new
//! leader; ReadIndex reads and opt-in lease reads ([`Config::lease_drift_permille`] states the
//! clock-drift bound); snapshots sent piece by piece (InstallSnapshot) and log compaction. Membership is static
//! (the voter list is a `Vec` so that joint consensus can be added).

mod config;
mod log;
mod progress;
mod raft;
mod ready;
mod rng;
mod types;

pub use config::{Config, MAX_APPEND_BYTES_DEFAULT, PlantedBugs};
pub use raft::{NotLeader, Raft, ReadMode, Recovered, Role};
pub use ready::{ReadState, Ready};
pub use rng::SplitMix64;
pub use types::{
    AppendResult, Entry, EntryKind, HardState, LogIndex, Message, MessageBody, NodeId, Snapshot,
    Term,
};

#[cfg(test)]
mod tests;
