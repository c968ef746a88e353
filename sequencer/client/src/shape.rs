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

/// A page of messages and whether the read was complete (see `Call::ReadMessagesPage`).
pub fn messages_page(reply: Reply) -> Result<(Vec<MessageRecord>, bool), ClientError> {
    match reply {
        Reply::MessagesPage { records, complete } => Ok((records, complete)),
        other => Err(unexpected(other)),
    }
}

/// Where a read of up to `max` messages from `from` stands after one more page: for callers
/// that take the pages one at a time ([`crate::Client::read_messages_page`]).
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub from: Seq,
    pub max: u32,
    pub done: bool,
}

impl Reading {
    pub fn new(from: Seq, max: u32) -> Reading {
        Reading { from, max, done: max == 0 }
    }

    /// Takes in a page: the read goes on after its last message, for what is left of `max`,
    /// unless the node said nothing more matched (or the page was empty).
    pub fn advance(&mut self, page: &[MessageRecord], complete: bool) {
        self.max -= (page.len() as u32).min(self.max);
        match page.last() {
            Some(last) => self.from = Seq(last.seq.0 + 1),
            None => self.done = true,
        }
        self.done |= complete || self.max == 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seqs: std::ops::RangeInclusive<u64>) -> Vec<MessageRecord> {
        seqs.map(|s| MessageRecord { seq: Seq(s), topic: None, payload: Vec::new() }).collect()
    }

    #[test]
    fn a_reading_goes_on_after_each_page_until_max_the_end_or_nothing() {
        let mut reading = Reading::new(Seq(5), 10);
        reading.advance(&page(5..=8), false);
        assert_eq!((reading.from, reading.max, reading.done), (Seq(9), 6, false));
        // Gaps (another topic's messages) are skipped: on after the last one given.
        reading.advance(&page(20..=21), false);
        assert_eq!((reading.from, reading.max, reading.done), (Seq(22), 4, false));
        reading.advance(&page(22..=25), false);
        assert!(reading.done, "max reached");

        let mut reading = Reading::new(Seq(1), 10);
        reading.advance(&page(1..=3), true);
        assert!(reading.done, "the node said nothing more matched");
        let mut reading = Reading::new(Seq(1), 10);
        reading.advance(&[], false);
        assert!(reading.done, "an empty page ends it, whatever it says");
        assert!(Reading::new(Seq(1), 0).done, "nothing asked for");
    }
}
