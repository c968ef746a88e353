//! What clients and nodes say to each other inside `Request` and `Response` frames. One
//! connection may carry many requests at once (pipelining); `id` pairs each response with its
//! request.

use serde::{Deserialize, Serialize};

use crate::{ClaimKey, ErrorCode, Outcome, OwnerInfo, Request, Seq};

/// How an owner read is made linearizable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadConsistency {
    /// The read is a command in the log.
    Log,
    /// ReadIndex: the leader confirms leadership with a quorum, then reads (the default).
    Index,
    /// Leader lease: no round trip while the lease holds; assumes bounded clock drift.
    Lease,
}

impl ReadConsistency {
    pub fn parse(name: &str) -> Option<ReadConsistency> {
        match name {
            "log" => Some(ReadConsistency::Log),
            "index" => Some(ReadConsistency::Index),
            "lease" => Some(ReadConsistency::Lease),
            _ => None,
        }
    }
}

/// A client's call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// A state-machine command through the log, de-duplicated by its client and request id.
    Command(Request),
    /// The owner of a key (`Log` reads go through [`Call::Command`] with `Command::Read`).
    Owner { key: ClaimKey, consistency: ReadConsistency },
    /// Up to `max` messages from `from` on, optionally of one topic, after a ReadIndex.
    ReadMessages { from: Seq, max: u32, topic: Option<String> },
    /// A linearizable position: the commit index confirmed by a quorum, applied here.
    Sync,
    /// Stream messages from `from` on, as this node applies them (any node serves it; the
    /// order is the total order). Answered by any number of `Messages` replies with this id.
    Follow { from: Seq, topic: Option<String> },
    /// This node's view of the cluster (answered by any node).
    Status,
    /// Holders starting with `prefix` that have claims in flight (pending, prepared, or
    /// scheduled for release) or staged messages, in order, after `after`, at most `max`
    /// (and at most [`HOLDERS_LISTED_MAX`]); after a ReadIndex. What a PostgreSQL instance's
    /// reconciler asks.
    InFlightHolders { prefix: String, after: Option<String>, max: u32 },
    /// The declared namespaces in order, at most [`NAMESPACES_LISTED_MAX`], after a ReadIndex.
    Namespaces,
    /// As [`Call::ReadMessages`], answered by [`Reply::MessagesPage`], which says whether the
    /// node stopped short: a page holds at most 10,000 messages and about half a frame of
    /// payloads, so fewer than `max` messages does not by itself mean there are no more.
    /// (Added after `ReadMessages`, whose callers read on until an empty reply; a node older
    /// than this call refuses it as malformed.)
    ReadMessagesPage { from: Seq, max: u32, topic: Option<String> },
}

/// Most namespaces one `Namespaces` call lists (about 2.5 MiB of names at most).
pub const NAMESPACES_LISTED_MAX: usize = 10_000;

/// Most holders one `InFlightHolders` call lists (a few hundred KiB of ids). A page shorter
/// than asked holds every holder there was after `after`.
pub const HOLDERS_LISTED_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    pub id: u64,
    pub call: Call,
}

/// One node's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub last_seq: u64,
    pub pid: u32,
    /// Where this node serves Prometheus metrics.
    pub metrics_address: String,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Outcome(Outcome),
    Owner(Option<OwnerInfo>),
    Messages(Vec<MessageRecord>),
    Holders(Vec<String>),
    Synced {
        position: u64,
    },
    Status(NodeStatus),
    /// Refused; `leader` is the client address of the leader when known.
    Error {
        code: ErrorCode,
        message: String,
        leader: Option<String>,
    },
    Namespaces(Vec<String>),
    /// The answer to [`Call::ReadMessagesPage`]: `complete` when no further message of the
    /// read (from `from` on, of the topic) existed when it was made beyond `records` — false
    /// when the node stopped at `max`, at its page limit or at the frame budget.
    MessagesPage {
        records: Vec<MessageRecord>,
        complete: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub seq: Seq,
    pub topic: Option<String>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientResponse {
    pub id: u64,
    pub reply: Reply,
}
