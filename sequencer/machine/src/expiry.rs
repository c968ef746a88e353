//! The leader's session-expiry watch: which sessions have gone a TTL without a keep-alive.
//!
//! It runs only on the leader, on the leader's own ticks, and restarts at every leader change
//! (so a new leader gives every session a full TTL). What it finds it *proposes* as `Expire`
//! commands; the state machine applies one only if no keep-alive was applied in between, so
//! a renewal racing the leader's decision always wins. Pure: the caller supplies the ticks.

use std::collections::{BTreeMap, BTreeSet};

use tob_proto::{Command, Request, RequestId, SessionId};

use crate::Machine;

#[derive(Debug, Default)]
pub struct ExpiryWatch {
    /// Per session: the keep-alive count last seen and the tick it changed.
    seen: BTreeMap<SessionId, (u64, u64)>,
    /// The leader term this watch belongs to.
    term: Option<u64>,
    /// (session, keep-alive count) already proposed for expiry in this term.
    proposed: BTreeSet<(SessionId, u64)>,
}

impl ExpiryWatch {
    /// Forgets everything (this node is not the leader).
    pub fn reset(&mut self) {
        *self = ExpiryWatch::default();
    }

    /// The `Expire` requests to propose at tick `now` of leader term `term`, given a tick of
    /// `tick_ms` logical milliseconds. Each is returned once per (session, keep-alive count).
    pub fn due(&mut self, machine: &Machine, term: u64, now: u64, tick_ms: u64) -> Vec<Request> {
        if self.term != Some(term) {
            self.reset();
            self.term = Some(term);
        }
        let mut due = Vec::new();
        let mut live = BTreeSet::new();
        for (session, record) in machine.sessions() {
            live.insert(session);
            let seen = self.seen.entry(session).or_insert((record.keepalives, now));
            if seen.0 != record.keepalives {
                *seen = (record.keepalives, now);
            }
            let ttl_ticks = record.ttl_ms / tick_ms.max(1);
            if now - seen.1 > ttl_ticks && self.proposed.insert((session, seen.0)) {
                due.push(Request {
                    client: None,
                    request_id: RequestId(0),
                    first_incomplete: RequestId(0),
                    command: Command::Expire { session, keepalives_seen: seen.0 },
                });
            }
        }
        self.seen.retain(|s, _| live.contains(s));
        due
    }
}

#[cfg(test)]
mod tests {
    use tob_proto::{ClientId, Outcome};

    use super::*;
    use crate::MachineConfig;

    fn apply(machine: &mut Machine, index: u64, command: Command) -> Outcome {
        let request = Request {
            client: Some(ClientId(1)),
            request_id: RequestId(index),
            first_incomplete: RequestId(index),
            command,
        };
        machine.apply(index, &request.encode()).unwrap().outcome
    }

    #[test]
    fn proposes_expiry_once_after_a_ttl_without_keepalives() {
        let mut machine = Machine::new(MachineConfig::default());
        let Outcome::SessionOpened { session } =
            apply(&mut machine, 1, Command::OpenSession { ttl_ms: 100 })
        else {
            panic!()
        };
        let mut watch = ExpiryWatch::default();
        assert!(watch.due(&machine, 1, 0, 10).is_empty());
        assert!(watch.due(&machine, 1, 10, 10).is_empty(), "exactly one TTL is not past it");
        apply(&mut machine, 2, Command::KeepAlive { session });
        assert!(watch.due(&machine, 1, 15, 10).is_empty(), "a keep-alive restarts the clock");
        let due = watch.due(&machine, 1, 26, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].command, Command::Expire { session, keepalives_seen: 1 });
        assert!(watch.due(&machine, 1, 27, 10).is_empty(), "proposed once");
        // A new leader term gives the session a full TTL again.
        assert!(watch.due(&machine, 2, 30, 10).is_empty());
        assert_eq!(watch.due(&machine, 2, 41, 10).len(), 1);
    }
}
