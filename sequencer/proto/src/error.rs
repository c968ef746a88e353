//! Stable error codes. The number of each code is part of the wire protocol and never reused;
//! the PostgreSQL extension maps each to one SQLSTATE.

use serde::{Deserialize, Serialize};

/// Every error a tob component reports to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request could not be decoded.
    Malformed = 1,
    /// A key, payload, name or batch is over its limit (see [`crate::Limits`]).
    TooLarge = 2,
    /// A required argument is empty.
    Empty = 3,
    /// This node is not the leader; retry at the leader.
    NotLeader = 10,
    /// The cluster did not answer in time; the request may or may not have happened.
    Timeout = 11,
    /// The cluster could not be reached at all.
    Unavailable = 12,
    /// The session does not exist or has expired.
    UnknownSession = 20,
    /// A retry of a request whose answer the cluster has already forgotten: it was applied once
    /// and will not be applied again.
    RequestForgotten = 21,
    /// The messages asked for were trimmed by retention.
    Compacted = 22,
    /// A claim needs a session for its kind but none was given.
    SessionRequired = 23,
    /// Too many requests in flight on this connection; retry the same request shortly.
    Overloaded = 13,
    /// The claim's namespace was never created (`CreateNamespace`): most often a misspelt
    /// name, which would otherwise start a separate uniqueness domain without anyone noticing.
    UnknownNamespace = 24,
}

impl ErrorCode {
    /// The stable number of this code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// A short, stable name (used in JSON output and logs).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Empty => "empty",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::RequestForgotten => "request_forgotten",
            ErrorCode::Compacted => "compacted",
            ErrorCode::SessionRequired => "session_required",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::UnknownNamespace => "unknown_namespace",
        }
    }

    /// Whether retrying the same request (same request id) elsewhere may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::Timeout
                | ErrorCode::Unavailable
                | ErrorCode::Overloaded
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (E{})", self.name(), self.code())
    }
}

impl std::error::Error for ErrorCode {}

/// The message of a [`ErrorCode::Compacted`] refusal. It names the oldest message kept, so a
/// reader knows where to go on and how much it missed; [`compacted_first_kept`] reads it back.
pub fn compacted_message(first_kept: u64) -> String {
    format!(
        "messages before seq {first_kept} were trimmed by retention; the oldest kept is seq {first_kept}"
    )
}

/// The oldest seq kept, from a [`ErrorCode::Compacted`] refusal's message (None from a node
/// that did not say: older nodes answered just "compacted").
pub fn compacted_first_kept(message: &str) -> Option<u64> {
    message.rsplit_once("the oldest kept is seq ")?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_refusal_names_the_oldest_message_kept() {
        assert_eq!(compacted_first_kept(&compacted_message(1001)), Some(1001));
        assert_eq!(compacted_first_kept("compacted"), None);
        assert_eq!(compacted_first_kept("the oldest kept is seq x"), None);
    }
}
