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

/// A request over a limit: the code sent back, and a message naming what and by how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Limits {
    /// Checks a command against the limits.
    pub fn check(&self, command: &Command) -> Result<(), LimitError> {
        match command {
            Command::Append { topic, payload } => {
                if let Some(topic) = topic {
                    self.name("topic", topic)?;
                }
                bounded("payload", "bytes long", payload.len(), self.payload_bytes_max)
            }
            Command::Claim { key, owner, holder, .. } => {
                self.key(key)?;
                self.name("owner", owner)?;
                bounded("holder", "bytes long", holder.len(), self.name_bytes_max)
            }
            Command::Prepare { holder, keys } | Command::Finalize { holder, keys } => {
                bounded("holder", "bytes long", holder.len(), self.name_bytes_max)?;
                bounded("batch", "keys", keys.len(), self.batch_keys_max)?;
                keys.iter().try_for_each(|key| self.key(key))
            }
            Command::Release { key, owner, .. } => {
                self.key(key)?;
                bounded("owner", "bytes long", owner.len(), self.name_bytes_max)
            }
            Command::ReleaseOnCommit { key, owner, holder } => {
                self.key(key)?;
                self.name("owner", owner)?;
                self.name("holder", holder)
            }
            Command::KeepOnCommit { key, holder } => {
                self.key(key)?;
                self.name("holder", holder)
            }
            Command::Settle { committed, aborted } => {
                let holders = committed.len() + aborted.len();
                bounded("settle", "holders", holders, self.batch_keys_max)?;
                committed.iter().chain(aborted).try_for_each(|h| self.name("holder", h))
            }
            Command::Read { key } => self.key(key),
            Command::Next { counter } => self.name("counter", counter),
            Command::CreateNamespace { name } => self.name("namespace", name),
            Command::OpenSession { .. }
            | Command::KeepAlive { .. }
            | Command::Expire { .. }
            | Command::RequireNamespaces => Ok(()),
            Command::Stage { holder, messages } => {
                self.name("holder", holder)?;
                bounded("stage", "messages", messages.len(), self.batch_keys_max)?;
                for message in messages {
                    if let Some(topic) = &message.topic {
                        self.name("topic", topic)?;
                    }
                }
                // One request's payloads together, like one `Append`'s.
                let bytes = messages.iter().map(|m| m.payload.len()).sum();
                bounded("staged payloads", "bytes together", bytes, self.payload_bytes_max)
            }
        }
    }

    fn key(&self, key: &ClaimKey) -> Result<(), LimitError> {
        self.name("namespace", &key.namespace)?;
        nonempty("key", &key.key)?;
        bounded("key", "bytes long", key.key.len(), self.key_bytes_max)
    }

    fn name(&self, what: &str, name: &str) -> Result<(), LimitError> {
        nonempty(what, name)?;
        bounded(what, "bytes long", name.len(), self.name_bytes_max)
    }
}

fn nonempty(what: &str, value: &str) -> Result<(), LimitError> {
    if value.is_empty() {
        return Err(LimitError { code: ErrorCode::Empty, message: format!("{what} is empty") });
    }
    Ok(())
}

/// `len` within `max`; otherwise "{what} is {len} {unit}; at most {max} are allowed".
fn bounded(what: &str, unit: &str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        let message = format!("{what} is {len} {unit}; at most {max} are allowed");
        return Err(LimitError { code: ErrorCode::TooLarge, message });
    }
    Ok(())
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
        let read = |k: &str| limits.check(&Command::Read { key: key(k) }).map_err(|e| e.code);
        assert_eq!(read(""), Err(ErrorCode::Empty));
        assert_eq!(read(&"x".repeat(1025)), Err(ErrorCode::TooLarge));
        assert_eq!(read(&"x".repeat(1024)), Ok(()));
    }

    #[test]
    fn refuses_oversized_payload() {
        let limits = Limits { payload_bytes_max: 4, ..Limits::default() };
        let append = |n| limits.check(&Command::Append { topic: None, payload: vec![0; n] });
        let code = |n| append(n).map_err(|e| e.code);
        assert_eq!(code(4), Ok(()));
        assert_eq!(code(5), Err(ErrorCode::TooLarge));
        assert_eq!(
            append(5).unwrap_err().message,
            "payload is 5 bytes long; at most 4 are allowed"
        );
    }

    #[test]
    fn bounds_a_stage_by_its_payloads_together() {
        let limits = Limits { payload_bytes_max: 4, batch_keys_max: 3, ..Limits::default() };
        let message = |n| StagedMessage { topic: Some("t".into()), payload: vec![0; n] };
        let stage = |messages: Vec<StagedMessage>| {
            limits.check(&Command::Stage { holder: "tx".into(), messages }).map_err(|e| e.code)
        };
        assert_eq!(stage(vec![message(2), message(2)]), Ok(()));
        assert_eq!(stage(vec![message(2), message(3)]), Err(ErrorCode::TooLarge));
        assert_eq!(stage(vec![message(0); 4]), Err(ErrorCode::TooLarge));
        let untitled = StagedMessage { topic: Some(String::new()), payload: vec![] };
        assert_eq!(stage(vec![untitled]), Err(ErrorCode::Empty));
        let anonymous = Command::Stage { holder: String::new(), messages: vec![] };
        let refused = limits.check(&anonymous).unwrap_err();
        assert_eq!((refused.code, refused.message.as_str()), (ErrorCode::Empty, "holder is empty"));
    }
}
