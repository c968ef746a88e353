//! Size limits on requests. Checked by the state machine (so every replica refuses the same
//! requests) and earlier by clients and the node (so oversized requests never reach the log).

use crate::{ClaimKey, Command, ErrorCode};

/// Bounds on what one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub name_bytes_max: usize,
    pub payload_bytes_max: usize,
    pub batch_keys_max: usize,
    /// Payload bytes one transaction may have staged (`Stage`) at once, all requests together.
    pub staged_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 1024,
            name_bytes_max: 256,
            payload_bytes_max: 1024 * 1024,
            batch_keys_max: 10_000,
            staged_bytes_max: 64 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Checks a command against the limits.
    pub fn check(&self, command: &Command) -> Result<(), ErrorCode> {
        match command {
            Command::Append { topic, payload } => {
                if let Some(topic) = topic {
                    self.name(topic)?;
                }
                bounded(payload.len(), self.payload_bytes_max)
            }
            Command::Claim { key, owner, holder, .. } => {
                self.key(key)?;
                self.name(owner)?;
                bounded(holder.len(), self.name_bytes_max)
            }
            Command::Prepare { holder, keys } | Command::Finalize { holder, keys } => {
                bounded(holder.len(), self.name_bytes_max)?;
                bounded(keys.len(), self.batch_keys_max)?;
                keys.iter().try_for_each(|key| self.key(key))
            }
            Command::Release { key, owner, .. } => {
                self.key(key)?;
                bounded(owner.len(), self.name_bytes_max)
            }
            Command::ReleaseOnCommit { key, owner, holder } => {
                self.key(key)?;
                self.name(owner)?;
                self.name(holder)
            }
            Command::KeepOnCommit { key, holder } => {
                self.key(key)?;
                self.name(holder)
            }
            Command::Settle { committed, aborted } => {
                bounded(committed.len() + aborted.len(), self.batch_keys_max)?;
                committed.iter().chain(aborted).try_for_each(|h| self.name(h))
            }
            Command::Read { key } => self.key(key),
            Command::Next { counter } => self.name(counter),
            Command::CreateNamespace { name } => self.name(name),
            Command::OpenSession { .. }
            | Command::KeepAlive { .. }
            | Command::Expire { .. }
            | Command::RequireNamespaces => Ok(()),
            Command::Stage { holder, messages } => {
                self.name(holder)?;
                bounded(messages.len(), self.batch_keys_max)?;
                for message in messages {
                    if let Some(topic) = &message.topic {
                        self.name(topic)?;
                    }
                }
                // One request's payloads together, like one `Append`'s.
                bounded(messages.iter().map(|m| m.payload.len()).sum(), self.payload_bytes_max)
            }
        }
    }

    fn key(&self, key: &ClaimKey) -> Result<(), ErrorCode> {
        self.name(&key.namespace)?;
        nonempty(&key.key)?;
        bounded(key.key.len(), self.key_bytes_max)
    }

    fn name(&self, name: &str) -> Result<(), ErrorCode> {
        nonempty(name)?;
        bounded(name.len(), self.name_bytes_max)
    }
}

fn nonempty(value: &str) -> Result<(), ErrorCode> {
    if value.is_empty() { Err(ErrorCode::Empty) } else { Ok(()) }
}

fn bounded(len: usize, max: usize) -> Result<(), ErrorCode> {
    if len > max { Err(ErrorCode::TooLarge) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StagedMessage;

    fn key(k: &str) -> ClaimKey {
        ClaimKey { namespace: "users".into(), key: k.into() }
    }

    #[test]
    fn refuses_empty_and_oversized_keys() {
        let limits = Limits::default();
        let read = |k: &str| limits.check(&Command::Read { key: key(k) });
        assert_eq!(read(""), Err(ErrorCode::Empty));
        assert_eq!(read(&"x".repeat(1025)), Err(ErrorCode::TooLarge));
        assert_eq!(read(&"x".repeat(1024)), Ok(()));
    }

    #[test]
    fn refuses_oversized_payload() {
        let limits = Limits { payload_bytes_max: 4, ..Limits::default() };
        let append = |n| limits.check(&Command::Append { topic: None, payload: vec![0; n] });
        assert_eq!(append(4), Ok(()));
        assert_eq!(append(5), Err(ErrorCode::TooLarge));
    }

    #[test]
    fn bounds_a_stage_by_its_payloads_together() {
        let limits = Limits { payload_bytes_max: 4, batch_keys_max: 3, ..Limits::default() };
        let message = |n| StagedMessage { topic: Some("t".into()), payload: vec![0; n] };
        let stage = |messages: Vec<StagedMessage>| {
            limits.check(&Command::Stage { holder: "tx".into(), messages })
        };
        assert_eq!(stage(vec![message(2), message(2)]), Ok(()));
        assert_eq!(stage(vec![message(2), message(3)]), Err(ErrorCode::TooLarge));
        assert_eq!(stage(vec![message(0); 4]), Err(ErrorCode::TooLarge));
        let untitled = StagedMessage { topic: Some(String::new()), payload: vec![] };
        assert_eq!(stage(vec![untitled]), Err(ErrorCode::Empty));
        let anonymous = Command::Stage { holder: String::new(), messages: vec![] };
        assert_eq!(limits.check(&anonymous), Err(ErrorCode::Empty));
    }
}
