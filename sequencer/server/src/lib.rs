//! The tob sequencer node. The consensus core (`tob-raft`) and state machine (`tob-machine`)
//! stay pure; this crate is the IO boundary: actors for the node, peer links and connections,
//! the write-ahead log (`tob-wal`), configuration.

pub mod codec;
pub mod config;
pub mod metrics;
pub mod net;
pub mod node;
pub mod sched;
pub mod wal_writer;
