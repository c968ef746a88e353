//! The commands each client call sends and how its answer is read, shared by the blocking and
//! the async client so that both say and understand exactly the same things.

use tob_proto::{ClaimKind, Command, MessageRecord, Outcome, OwnerInfo, Reply, Seq};

use crate::{ClientError, claim_key};

pub fn append(topic: Option<&str>, payload: &[u8]) -> Command {
    Command::Append { topic: topic.map(str::to_owned), payload: payload.to_vec() }
}

/// A plain claim: held at once, never expiring, held by its owner.
pub fn claim(namespace: &str, key: &str, owner: &str) -> Command {
    Command::Claim {
        key: claim_key(namespace, key),
        owner: owner.into(),
        holder: owner.into(),
        kind: ClaimKind::Held,
        session: None,
    }
}

pub fn release(namespace: &str, key: &str, owner: &str) -> Command {
    Command::Release { key: claim_key(namespace, key), owner: owner.into(), holder: None }
}

/// A command's reply: its outcome, or the refusal it carries.
pub fn outcome(reply: Reply) -> Result<Outcome, ClientError> {
    match reply {
        Reply::Outcome(Outcome::Error { code }) => {
            Err(ClientError::Refused { code, message: code.name().into() })
        }
        Reply::Outcome(outcome) => Ok(outcome),
        other => Err(unexpected(other)),
    }
}

pub fn appended(outcome: Outcome) -> Result<Seq, ClientError> {
    match outcome {
        Outcome::Appended { seq } => Ok(seq),
        other => Err(unexpected_outcome(other)),
    }
}

/// Whether `CreateNamespace` created the namespace (false: it existed).
pub fn namespace_created(outcome: Outcome) -> Result<bool, ClientError> {
    match outcome {
        Outcome::NamespaceCreated { created } => Ok(created),
        other => Err(unexpected_outcome(other)),
    }
}

pub fn counter(outcome: Outcome) -> Result<u64, ClientError> {
    match outcome {
        Outcome::Counter { value } => Ok(value),
        other => Err(unexpected_outcome(other)),
    }
}

/// The owner from a log read's outcome.
pub fn owner_in_log(outcome: Outcome) -> Result<Option<OwnerInfo>, ClientError> {
    match outcome {
        Outcome::Owner { current } => Ok(current),
        other => Err(unexpected_outcome(other)),
    }
}

pub fn owner(reply: Reply) -> Result<Option<OwnerInfo>, ClientError> {
    match reply {
        Reply::Owner(owner) => Ok(owner),
        other => Err(unexpected(other)),
    }
}

pub fn messages(reply: Reply) -> Result<Vec<MessageRecord>, ClientError> {
    match reply {
        Reply::Messages(messages) => Ok(messages),
        other => Err(unexpected(other)),
    }
}

pub fn synced(reply: Reply) -> Result<u64, ClientError> {
    match reply {
        Reply::Synced { position } => Ok(position),
        other => Err(unexpected(other)),
    }
}

pub fn namespaces(reply: Reply) -> Result<Vec<String>, ClientError> {
    match reply {
        Reply::Namespaces(names) => Ok(names),
        other => Err(unexpected(other)),
    }
}

pub fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

pub fn unexpected_outcome(outcome: Outcome) -> ClientError {
    ClientError::Protocol(format!("unexpected outcome {outcome:?}"))
}
