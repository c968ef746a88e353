//! Wire types shared by every part of tob: identifiers, the commands the replicated state
//! machine applies and the outcomes it returns, the stable error codes, and request limits.
//!
//! This crate is the one place that defines each of these types. The consensus core does not
//! know them (it carries opaque bytes); the state machine decodes [`Request`] from log entries;
//! the node runtime, the client library and the PostgreSQL extension speak them on the wire.

use serde::{Deserialize, Serialize};

mod client;
mod error;
pub mod frame;
mod limits;

pub use client::{
    Call, ClientRequest, ClientResponse, HOLDERS_LISTED_MAX, MessageRecord, NAMESPACES_LISTED_MAX,
    NodeStatus, ReadConsistency, Reply,
};
pub use error::{ErrorCode, compacted_first_kept, compacted_message};
pub use limits::{LimitError, Limits};

/// Dense, gap-free position of a message in the total order (1, 2, 3, … across all topics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

/// A fencing token: the log index of the entry that granted a claim. Strictly increasing
/// across the whole cluster, so a storage system can reject a request carrying an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

/// Identifies one client (a process, or a PostgreSQL instance) for request de-duplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u128);

/// Per-client request number; a retry reuses it so the cluster applies the request once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A lease-bound session. Its id is the log index of the `OpenSession` entry, so ids are unique
/// and identical on every replica without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

/// How a granted claim lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimKind {
    /// Final at once and never expires (a claim made outside a transaction).
    Held,
    /// Pending in a transaction: blocks others, expires with its session unless prepared.
    Transactional,
    /// Held while its session lives (a lock); released when the session expires.
    Ephemeral,
    /// Prepared at once in a transaction that is about to commit (a PostgreSQL statement
    /// outside a transaction block): never expires; `Settle` ends it by the transaction's fate.
    Prepared,
}

/// Where a claim is in its life. A key with no record is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    /// Claimed inside a transaction that has not reached commit yet.
    Pending,
    /// The transaction is committing: the claim can no longer expire.
    Prepared,
    /// Final.
    Held,
}

impl ClaimState {
    /// The lower-case name used in SQL, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimState::Pending => "pending",
            ClaimState::Prepared => "prepared",
            ClaimState::Held => "held",
        }
    }
}

/// A claimed key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClaimKey {
    pub namespace: String,
    pub key: String,
}

/// A command for the replicated state machine. Applied in log order on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append a message to the total order; returns its [`Seq`].
    Append { topic: Option<String>, payload: Vec<u8> },
    /// First claim in log order wins.
    Claim {
        key: ClaimKey,
        owner: String,
        /// Who may prepare, finalize and release it: a transaction id, or the owner itself.
        holder: String,
        kind: ClaimKind,
        /// Required for `Transactional` and `Ephemeral` claims.
        session: Option<SessionId>,
    },
    /// Move all listed pending claims of `holder` to prepared, all or none.
    Prepare { holder: String, keys: Vec<ClaimKey> },
    /// Prepared claims of `holder` become held.
    Finalize { holder: String, keys: Vec<ClaimKey> },
    /// Release a claim owned by `owner` (and, if given, held by `holder`).
    Release { key: ClaimKey, owner: String, holder: Option<String> },
    /// Release a claim owned by `owner` when `holder` (a transaction) settles as committed;
    /// until then it stays as it is (a DELETE or UPDATE inside a transaction).
    ReleaseOnCommit { key: ClaimKey, owner: String, holder: String },
    /// Withdraw a `ReleaseOnCommit` of `holder` (its savepoint was rolled back).
    KeepOnCommit { key: ClaimKey, holder: String },
    /// Settle every in-flight claim of each holder once its transaction's fate is known:
    /// for a committed holder, prepared claims become held, claims it scheduled for release
    /// are released and unprepared pending ones are released; for an aborted holder, its
    /// pending and prepared claims are released and its scheduled releases withdrawn.
    /// Idempotent.
    Settle { committed: Vec<String>, aborted: Vec<String> },
    /// Read the owner of a key at this position in the log.
    Read { key: ClaimKey },
    /// Gap-free increment-and-get of a named counter.
    Next { counter: String },
    /// Open a session that lives while kept alive within `ttl_ms`.
    OpenSession { ttl_ms: u64 },
    /// Renew a session.
    KeepAlive { session: SessionId },
    /// Proposed by the leader when it saw no keep-alive for a TTL. Applies only if the session
    /// has had exactly `keepalives_seen` keep-alives, so a renewal that raced it wins.
    Expire { session: SessionId, keepalives_seen: u64 },
    /// Declare a namespace, so that claims in it are accepted (idempotent). Namespaces whose
    /// name starts with [`RESERVED_NAMESPACE_PREFIX`] always exist.
    CreateNamespace { name: String },
    /// Proposed by a leader whose state machine predates namespaces: from this entry on,
    /// claims need a declared namespace, and every namespace that already has claims is
    /// declared. Applying the log written before it with the old rules keeps every
    /// acknowledged claim as it was.
    RequireNamespaces,
    /// Stage messages for the total order under `holder` (a transaction): they are appended,
    /// in the order staged, when `Settle` names the holder committed, and dropped when it
    /// names it aborted. Until then no reader sees them. Several `Stage`s of one holder add
    /// up (a transaction's messages may need more than one request).
    Stage { holder: String, messages: Vec<StagedMessage> },
}

/// A message waiting for its transaction's commit (see [`Command::Stage`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedMessage {
    pub topic: Option<String>,
    pub payload: Vec<u8>,
}

/// Namespaces with this prefix are tob's own (the extension's locks) and need no declaring.
pub const RESERVED_NAMESPACE_PREFIX: &str = "tob.";

impl Command {
    /// A short operation name for logs, metrics and histories.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Append { .. } => "append",
            Command::Claim { .. } => "claim",
            Command::Prepare { .. } => "prepare",
            Command::Finalize { .. } => "finalize",
            Command::Release { .. } => "release",
            Command::ReleaseOnCommit { .. } => "release_on_commit",
            Command::KeepOnCommit { .. } => "keep_on_commit",
            Command::Settle { .. } => "settle",
            Command::Read { .. } => "read",
            Command::Next { .. } => "next",
            Command::OpenSession { .. } => "open_session",
            Command::KeepAlive { .. } => "keep_alive",
            Command::Expire { .. } => "expire",
            Command::CreateNamespace { .. } => "create_namespace",
            Command::RequireNamespaces => "require_namespaces",
            Command::Stage { .. } => "stage",
        }
    }
}

/// A client's request as it is written into the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `None` for commands the cluster proposes itself (`Expire`): never de-duplicated.
    pub client: Option<ClientId>,
    pub request_id: RequestId,
    /// Every request of this client below this id has had its answer: the cluster may forget
    /// them (Raft dissertation §6.3).
    pub first_incomplete: RequestId,
    pub command: Command,
}

impl Request {
    /// Encodes for a log entry.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("serialising to a Vec cannot fail")
    }

    /// Decodes a log entry.
    pub fn decode(bytes: &[u8]) -> Result<Request, ErrorCode> {
        postcard::from_bytes(bytes).map_err(|_| ErrorCode::Malformed)
    }
}

/// The owner of a key as a read sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    pub owner: String,
    pub holder: String,
    pub token: FencingToken,
    pub state: ClaimState,
}

/// A claim released by a session's expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedClaim {
    pub key: ClaimKey,
    pub owner: String,
}

/// What applying a command produced. Identical on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Appended {
        seq: Seq,
    },
    Claimed {
        token: FencingToken,
    },
    Taken {
        current: OwnerInfo,
    },
    Prepared,
    Finalized,
    Released,
    /// `ReleaseOnCommit` recorded (or `KeepOnCommit` withdrew it).
    ReleaseScheduled,
    /// `Settle` applied: this many claims changed.
    Settled {
        claims: u64,
    },
    NotOwner,
    Owner {
        current: Option<OwnerInfo>,
    },
    Counter {
        value: u64,
    },
    SessionOpened {
        session: SessionId,
    },
    KeptAlive,
    /// The session expired; these claims (pending or ephemeral) were released with it.
    Expired {
        released: Vec<ReleasedClaim>,
    },
    /// Prepare failed: these claims are no longer pending for the holder.
    Lost {
        keys: Vec<ClaimKey>,
    },
    Error {
        code: ErrorCode,
    },
    /// `CreateNamespace` applied: `created` is false if it existed already.
    NamespaceCreated {
        created: bool,
    },
    /// `RequireNamespaces` applied: these namespaces had claims and are now declared.
    NamespacesRequired {
        declared: Vec<String>,
    },
    /// `Stage` applied: the holder now has this many messages staged.
    Staged {
        messages: u64,
    },
    /// `Claim` refused for now: the key is held, but another transaction (`releasing`) has
    /// scheduled its release (`ReleaseOnCommit`) and has not settled. The claimer may wait
    /// and try again, as for a pending claim: free if that transaction commits, `Taken` if not.
    Releasing {
        current: OwnerInfo,
        releasing: String,
    },
}
