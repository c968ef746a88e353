use super::*;

fn key(k: &str) -> ClaimKey {
    ClaimKey { namespace: "users".into(), key: k.into() }
}

/// Drives one replica with consecutive log indexes, as a client with id 7.
struct Driver {
    machine: Machine,
    index: u64,
    next_request: u64,
}

impl Driver {
    fn new() -> Driver {
        Driver { machine: Machine::new(MachineConfig::default()), index: 0, next_request: 1 }
    }

    fn apply_request(&mut self, request: &Request) -> Applied {
        self.index += 1;
        self.machine.apply(self.index, &request.encode()).expect("decodes")
    }

    fn open_session(&mut self, ttl_ms: u64) -> SessionId {
        let Outcome::SessionOpened { session } = self.run(Command::OpenSession { ttl_ms }) else {
            panic!("a session opens")
        };
        session
    }

    fn run(&mut self, command: Command) -> Outcome {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let request =
            Request { client: Some(ClientId(7)), request_id: id, first_incomplete: id, command };
        self.apply_request(&request).outcome
    }

    fn claim(
        &mut self,
        k: &str,
        owner: &str,
        kind: ClaimKind,
        session: Option<SessionId>,
    ) -> Outcome {
        self.run(Command::Claim {
            key: key(k),
            owner: owner.into(),
            holder: owner.into(),
            kind,
            session,
        })
    }
}

#[test]
fn first_claim_wins_and_token_is_the_log_index() {
    let mut d = Driver::new();
    assert_eq!(
        d.claim("alice", "u1", ClaimKind::Held, None),
        Outcome::Claimed { token: FencingToken(1) }
    );
    match d.claim("alice", "u2", ClaimKind::Held, None) {
        Outcome::Taken { current } => {
            assert_eq!(current.owner, "u1");
            assert_eq!(current.token, FencingToken(1));
            assert_eq!(current.state, ClaimState::Held);
        }
        other => panic!("expected taken, got {other:?}"),
    }
    // A re-claim by the same owner is idempotent and keeps the original token.
    assert_eq!(
        d.claim("alice", "u1", ClaimKind::Held, None),
        Outcome::Claimed { token: FencingToken(1) }
    );
    assert_eq!(
        d.claim("bob", "u2", ClaimKind::Held, None),
        Outcome::Claimed { token: FencingToken(4) }
    );
}

#[test]
fn release_frees_the_key_only_for_its_owner() {
    let mut d = Driver::new();
    d.claim("alice", "u1", ClaimKind::Held, None);
    let release =
        |owner: &str| Command::Release { key: key("alice"), owner: owner.into(), holder: None };
    assert_eq!(d.run(release("u2")), Outcome::NotOwner);
    assert_eq!(d.run(release("u1")), Outcome::Released);
    assert_eq!(d.run(Command::Read { key: key("alice") }), Outcome::Owner { current: None });
    assert_eq!(
        d.claim("alice", "u2", ClaimKind::Held, None),
        Outcome::Claimed { token: FencingToken(5) }
    );
}

#[test]
fn transaction_lifecycle_pending_prepared_held() {
    let mut d = Driver::new();
    let session = d.open_session(1000);
    let claim = Command::Claim {
        key: key("alice"),
        owner: "u1".into(),
        holder: "tx1".into(),
        kind: ClaimKind::Transactional,
        session: Some(session),
    };
    assert!(matches!(d.run(claim), Outcome::Claimed { .. }));
    assert_eq!(d.machine.owner(&key("alice")).unwrap().state, ClaimState::Pending);
    let keys = vec![key("alice")];
    assert_eq!(
        d.run(Command::Prepare { holder: "tx1".into(), keys: keys.clone() }),
        Outcome::Prepared
    );
    // A prepared claim survives its session's expiry.
    let expired = d.run(Command::Expire { session, keepalives_seen: 0 });
    assert_eq!(expired, Outcome::Expired { released: vec![] });
    assert_eq!(d.machine.owner(&key("alice")).unwrap().state, ClaimState::Prepared);
    assert_eq!(d.run(Command::Finalize { holder: "tx1".into(), keys }), Outcome::Finalized);
    assert_eq!(d.machine.owner(&key("alice")).unwrap().state, ClaimState::Held);
}

#[test]
fn pending_claim_of_expired_session_is_lost_at_prepare() {
    let mut d = Driver::new();
    let session = d.open_session(1000);
    d.claim("alice", "u1", ClaimKind::Transactional, Some(session));
    d.claim("lock", "u1", ClaimKind::Ephemeral, Some(session));
    // A keep-alive that raced the leader's decision wins.
    assert_eq!(d.run(Command::KeepAlive { session }), Outcome::KeptAlive);
    assert_eq!(d.run(Command::Expire { session, keepalives_seen: 0 }), Outcome::KeptAlive);
    assert_eq!(
        d.run(Command::Expire { session, keepalives_seen: 1 }),
        Outcome::Expired {
            released: vec![
                ReleasedClaim { key: key("alice"), owner: "u1".into() },
                ReleasedClaim { key: key("lock"), owner: "u1".into() },
            ]
        }
    );
    assert_eq!(
        d.run(Command::Prepare { holder: "u1".into(), keys: vec![key("alice")] }),
        Outcome::Lost { keys: vec![key("alice")] }
    );
    assert_eq!(d.machine.owner(&key("lock")), None);
    assert_eq!(
        d.claim("x", "u1", ClaimKind::Transactional, Some(session)),
        Outcome::Error { code: ErrorCode::UnknownSession }
    );
    assert_eq!(
        d.claim("x", "u1", ClaimKind::Ephemeral, None),
        Outcome::Error { code: ErrorCode::SessionRequired }
    );
}

#[test]
fn a_retried_request_is_answered_not_applied_twice() {
    let mut d = Driver::new();
    let request = Request {
        client: Some(ClientId(9)),
        request_id: RequestId(1),
        first_incomplete: RequestId(1),
        command: Command::Next { counter: "orders".into() },
    };
    let first = d.apply_request(&request);
    let retry = d.apply_request(&request);
    assert_eq!(first.outcome, Outcome::Counter { value: 1 });
    assert_eq!(retry.outcome, Outcome::Counter { value: 1 });
    assert!(retry.duplicate);
    assert_eq!(d.machine.counter("orders"), 1);
    // Once the client says request 1 is done, the answer is forgotten but never re-applied.
    let next =
        Request { request_id: RequestId(2), first_incomplete: RequestId(2), ..request.clone() };
    assert_eq!(d.apply_request(&next).outcome, Outcome::Counter { value: 2 });
    assert_eq!(
        d.apply_request(&request).outcome,
        Outcome::Error { code: ErrorCode::RequestForgotten }
    );
    assert_eq!(d.machine.counter("orders"), 2);
}

#[test]
fn per_client_dedup_table_is_bounded() {
    let mut config = MachineConfig { dedup_per_client_max: 2, ..MachineConfig::default() };
    config.dedup_clients_max = 1;
    let mut machine = Machine::new(config);
    let request = |client: u128, id: u64| Request {
        client: Some(ClientId(client)),
        request_id: RequestId(id),
        first_incomplete: RequestId(1),
        command: Command::Next { counter: "c".into() },
    };
    for (index, id) in (1..=3).enumerate() {
        machine.apply(index as u64 + 1, &request(1, id).encode());
    }
    assert_eq!(machine.state.clients[&ClientId(1)].answers.len(), 2);
    let forgotten = machine.apply(4, &request(1, 1).encode()).unwrap();
    assert_eq!(forgotten.outcome, Outcome::Error { code: ErrorCode::RequestForgotten });
    machine.apply(5, &request(2, 1).encode());
    assert_eq!(machine.state.clients.len(), 1, "least recently active client evicted");
}

#[test]
fn appends_get_dense_sequence_numbers_and_can_be_read_by_topic() {
    let mut d = Driver::new();
    for (i, topic) in ["a", "b", "a"].iter().enumerate() {
        let outcome =
            d.run(Command::Append { topic: Some(topic.to_string()), payload: vec![i as u8] });
        assert_eq!(outcome, Outcome::Appended { seq: Seq(i as u64 + 1) });
    }
    let all = d.machine.messages(Seq(1), 10, None).unwrap();
    assert_eq!(all.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let a = d.machine.messages(Seq(2), 10, Some("a")).unwrap();
    assert_eq!(a.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn a_page_of_messages_stops_at_max_or_its_byte_budget_and_says_whether_more_exist() {
    let mut d = Driver::new();
    // Payloads of 100 bytes: each counts 164 against the budget.
    for i in 0..10u8 {
        let topic = if i % 2 == 0 { "even" } else { "odd" };
        d.run(Command::Append { topic: Some(topic.into()), payload: vec![i; 100] });
    }
    let seqs = |page: &crate::MessagesPage| page.messages.iter().map(|m| m.seq.0).collect();
    let page = d.machine.messages_page(Seq(1), 100, None, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.complete), ((1..=10).collect::<Vec<_>>(), true));
    let page = d.machine.messages_page(Seq(1), 4, None, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![1, 2, 3, 4], false), "stopped at max");
    let page = d.machine.messages_page(Seq(7), 4, None, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![7, 8, 9, 10], true), "exactly the rest");
    let page = d.machine.messages_page(Seq(1), 100, None, 3 * 164).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![1, 2, 3], false), "stopped at the budget");
    let page = d.machine.messages_page(Seq(1), 100, None, 10).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![1], false), "at least one message");
    let page = d.machine.messages_page(Seq(4), 100, Some("even"), 2 * 164).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![5, 7], false));
    let page = d.machine.messages_page(Seq(8), 100, Some("even"), 2 * 164).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![9], true));
    let page = d.machine.messages_page(Seq(11), 100, None, usize::MAX).unwrap();
    assert_eq!((seqs(&page), page.complete), (vec![], true));
}

#[test]
fn trimmed_messages_are_reported_compacted() {
    let config = MachineConfig { messages_retained_max: 2, ..MachineConfig::default() };
    let mut machine = Machine::new(config);
    for index in 1..=3 {
        let request = Request {
            client: None,
            request_id: RequestId(0),
            first_incomplete: RequestId(0),
            command: Command::Append { topic: None, payload: vec![] },
        };
        machine.apply(index, &request.encode());
    }
    assert_eq!(machine.messages(Seq(1), 10, None), Err(ErrorCode::Compacted));
    assert_eq!(machine.first_kept_seq(), Seq(2));
    assert_eq!(machine.messages(Seq(2), 10, None).unwrap().len(), 2);
    assert_eq!(machine.messages(Seq(4), 10, None).unwrap().len(), 0);
}

#[test]
fn bad_input_is_refused_identically_and_changes_nothing() {
    let mut d = Driver::new();
    let before = d.machine.snapshot();
    assert_eq!(d.claim("", "u1", ClaimKind::Held, None), Outcome::Error { code: ErrorCode::Empty });
    let huge = "k".repeat(2000);
    assert_eq!(
        d.claim(&huge, "u1", ClaimKind::Held, None),
        Outcome::Error { code: ErrorCode::TooLarge }
    );
    assert_eq!(d.machine.apply(99, b"\xff\xff garbage"), None);
    let mut after = d.machine.clone();
    after.state.applied_index = 0;
    after.state.clients.clear();
    after.state.clients_by_activity.clear();
    let mut empty = Machine::new(MachineConfig::default());
    empty.restore(&before).unwrap();
    assert_eq!(after.state, empty.state);
}

#[test]
fn snapshots_are_byte_identical_across_replicas() {
    // Replica A applies everything; replica B restores A's mid-way snapshot and applies the
    // rest. Same index, same bytes.
    let commands: Vec<Command> = (0..50)
        .map(|i| match i % 5 {
            _ if i == 10 => Command::RequireNamespaces,
            _ if i == 30 => Command::CreateNamespace { name: "orders".into() },
            _ if i == 20 || i == 35 => stage("pg:1:x1", &[("t1", "staged")]),
            _ if i == 40 => Command::Settle { committed: vec!["pg:1:x1".into()], aborted: vec![] },
            0 => Command::Append { topic: Some(format!("t{}", i % 3)), payload: vec![i as u8] },
            1 => Command::Claim {
                key: key(&format!("k{}", i % 7)),
                owner: format!("u{i}"),
                holder: format!("u{i}"),
                kind: ClaimKind::Held,
                session: None,
            },
            2 => Command::Next { counter: format!("c{}", i % 2) },
            3 => Command::OpenSession { ttl_ms: 100 },
            _ => Command::Release {
                key: key(&format!("k{}", i % 7)),
                owner: format!("u{}", i - 3),
                holder: None,
            },
        })
        .collect();
    let mut a = Driver::new();
    let mut b = Driver::new();
    for (i, command) in commands.iter().enumerate() {
        a.run(command.clone());
        if i == 24 {
            b.machine.restore(&a.machine.snapshot()).unwrap();
            b.index = a.index;
            b.next_request = a.next_request;
        } else if i > 24 {
            b.run(command.clone());
        }
    }
    assert_eq!(a.machine.applied_index(), b.machine.applied_index());
    assert_eq!(a.machine.snapshot(), b.machine.snapshot());
}

/// A transactional claim by `holder` for `owner`.
fn tx_claim(d: &mut Driver, k: &str, owner: &str, holder: &str, session: SessionId) -> Outcome {
    d.run(Command::Claim {
        key: key(k),
        owner: owner.into(),
        holder: holder.into(),
        kind: ClaimKind::Transactional,
        session: Some(session),
    })
}

fn state_of(d: &Driver, k: &str) -> Option<ClaimState> {
    d.machine.owner(&key(k)).map(|o| o.state)
}

fn settle(d: &mut Driver, committed: &[&str], aborted: &[&str]) -> Outcome {
    d.run(Command::Settle {
        committed: committed.iter().map(|h| h.to_string()).collect(),
        aborted: aborted.iter().map(|h| h.to_string()).collect(),
    })
}

#[test]
fn settle_resolves_each_holder_by_its_transactions_fate() {
    let mut d = Driver::new();
    let session = d.open_session(1000);
    // x1 commits: "a" prepared -> held; "b" claimed but never prepared -> released.
    tx_claim(&mut d, "a", "db1", "pg:1:x1", session);
    tx_claim(&mut d, "b", "db1", "pg:1:x1", session);
    d.run(Command::Prepare { holder: "pg:1:x1".into(), keys: vec![key("a")] });
    // x2 aborts after prepare: "c" released.
    tx_claim(&mut d, "c", "db1", "pg:1:x2", session);
    d.run(Command::Prepare { holder: "pg:1:x2".into(), keys: vec![key("c")] });
    // Another instance's holder is not listed under pg:1: and is left alone.
    tx_claim(&mut d, "d", "db2", "pg:2:x9", session);
    assert_eq!(
        d.machine.in_flight_holders("pg:1:", None, 10),
        vec!["pg:1:x1".to_string(), "pg:1:x2".to_string()]
    );
    assert_eq!(d.machine.in_flight_holders("pg:1:", Some("pg:1:x1"), 10), vec!["pg:1:x2"]);
    assert_eq!(d.machine.in_flight_holders("pg:1:", None, 1), vec!["pg:1:x1"]);

    assert_eq!(settle(&mut d, &["pg:1:x1"], &["pg:1:x2"]), Outcome::Settled { claims: 3 });
    assert_eq!(state_of(&d, "a"), Some(ClaimState::Held));
    assert_eq!(state_of(&d, "b"), None);
    assert_eq!(state_of(&d, "c"), None);
    assert_eq!(state_of(&d, "d"), Some(ClaimState::Pending));
    assert!(d.machine.in_flight_holders("pg:1:", None, 10).is_empty());
    // Idempotent: settling again changes nothing.
    assert_eq!(settle(&mut d, &["pg:1:x1"], &["pg:1:x2"]), Outcome::Settled { claims: 0 });
    assert_eq!(state_of(&d, "a"), Some(ClaimState::Held));
}

#[test]
fn release_on_commit_takes_effect_only_when_its_transaction_commits() {
    let mut d = Driver::new();
    d.claim("alice", "db1", ClaimKind::Held, None);
    d.claim("bob", "db1", ClaimKind::Held, None);
    // Only the owner may schedule a release, and one transaction at a time.
    let schedule = |d: &mut Driver, k: &str, owner: &str, holder: &str| {
        d.run(Command::ReleaseOnCommit { key: key(k), owner: owner.into(), holder: holder.into() })
    };
    assert_eq!(schedule(&mut d, "alice", "db2", "pg:1:x1"), Outcome::NotOwner);
    assert_eq!(schedule(&mut d, "alice", "db1", "pg:1:x1"), Outcome::ReleaseScheduled);
    assert_eq!(schedule(&mut d, "alice", "db1", "pg:1:x2"), Outcome::NotOwner);
    assert_eq!(schedule(&mut d, "bob", "db1", "pg:1:x2"), Outcome::ReleaseScheduled);
    // Still held until the fate is known; another claimer is told to wait for it.
    assert_eq!(state_of(&d, "alice"), Some(ClaimState::Held));
    let claim = |d: &mut Driver, k: &str| d.claim(k, "db2", ClaimKind::Prepared, None);
    let Outcome::Releasing { current, releasing } = claim(&mut d, "alice") else {
        panic!("a claim on a key being released waits")
    };
    assert_eq!((current.owner.as_str(), releasing.as_str()), ("db1", "pg:1:x1"));
    assert_eq!(settle(&mut d, &["pg:1:x1"], &["pg:1:x2"]), Outcome::Settled { claims: 2 });
    assert_eq!(state_of(&d, "alice"), None, "released by the committed transaction");
    assert_eq!(state_of(&d, "bob"), Some(ClaimState::Held), "kept: its deleter aborted");
    assert!(matches!(claim(&mut d, "alice"), Outcome::Claimed { .. }), "free once committed");
    assert!(matches!(claim(&mut d, "bob"), Outcome::Taken { .. }), "taken once aborted");
    // A withdrawn schedule (rolled-back savepoint) releases nothing at commit.
    assert_eq!(schedule(&mut d, "bob", "db1", "pg:1:x3"), Outcome::ReleaseScheduled);
    d.run(Command::KeepOnCommit { key: key("bob"), holder: "pg:1:x3".into() });
    assert!(d.machine.in_flight_holders("pg:1:", None, 10).is_empty());
    assert_eq!(settle(&mut d, &["pg:1:x3"], &[]), Outcome::Settled { claims: 0 });
    assert_eq!(state_of(&d, "bob"), Some(ClaimState::Held));
}

#[test]
fn expiry_and_release_leave_no_in_flight_entry_behind() {
    let mut d = Driver::new();
    let session = d.open_session(1000);
    tx_claim(&mut d, "a", "db1", "pg:1:x1", session);
    tx_claim(&mut d, "b", "db1", "pg:1:x2", session);
    d.run(Command::Release { key: key("b"), owner: "db1".into(), holder: Some("pg:1:x2".into()) });
    assert_eq!(d.machine.in_flight_holders("pg:", None, 10), vec!["pg:1:x1"]);
    let Outcome::Expired { released } = d.run(Command::Expire { session, keepalives_seen: 0 })
    else {
        panic!("expired")
    };
    assert_eq!(released.len(), 1);
    assert!(d.machine.in_flight_holders("pg:", None, 10).is_empty());
    // A transaction whose claim expired cannot prepare it.
    assert!(matches!(
        d.run(Command::Prepare { holder: "pg:1:x1".into(), keys: vec![key("a")] }),
        Outcome::Lost { .. }
    ));
}

#[test]
fn a_claim_prepared_at_once_needs_no_session_and_follows_its_holders_fate() {
    let mut d = Driver::new();
    let prepared = |d: &mut Driver, k: &str, holder: &str| {
        d.run(Command::Claim {
            key: key(k),
            owner: "db1".into(),
            holder: holder.into(),
            kind: ClaimKind::Prepared,
            session: None,
        })
    };
    assert!(matches!(prepared(&mut d, "a", "pg:1:x1"), Outcome::Claimed { .. }));
    assert!(matches!(prepared(&mut d, "b", "pg:1:x2"), Outcome::Claimed { .. }));
    assert_eq!(state_of(&d, "a"), Some(ClaimState::Prepared));
    assert!(matches!(d.claim("a", "u2", ClaimKind::Held, None), Outcome::Taken { .. }));
    assert_eq!(settle(&mut d, &["pg:1:x1"], &["pg:1:x2"]), Outcome::Settled { claims: 2 });
    assert_eq!(state_of(&d, "a"), Some(ClaimState::Held));
    assert_eq!(state_of(&d, "b"), None);
}

fn in_namespace(d: &mut Driver, namespace: &str, k: &str, owner: &str) -> Outcome {
    d.run(Command::Claim {
        key: ClaimKey { namespace: namespace.into(), key: k.into() },
        owner: owner.into(),
        holder: owner.into(),
        kind: ClaimKind::Held,
        session: None,
    })
}

#[test]
fn claims_need_a_declared_namespace_once_required() {
    let mut d = Driver::new();
    // Before the rule (a log written before namespaces existed): any namespace goes.
    assert!(matches!(in_namespace(&mut d, "users", "alice", "u1"), Outcome::Claimed { .. }));
    assert!(!d.machine.namespaces_required());
    assert_eq!(
        d.run(Command::RequireNamespaces),
        Outcome::NamespacesRequired { declared: vec!["users".into()] },
        "a namespace in use is declared when the rule starts"
    );
    assert!(d.machine.namespaces_required());
    assert_eq!(d.run(Command::RequireNamespaces), Outcome::NamespacesRequired { declared: vec![] });

    // A misspelt namespace: refused for claims, releases and reads, and nothing changes.
    let before = d.machine.snapshot();
    let unknown = Outcome::Error { code: ErrorCode::UnknownNamespace };
    assert_eq!(in_namespace(&mut d, "user", "alice", "u2"), unknown);
    let typo = ClaimKey { namespace: "user".into(), key: "alice".into() };
    let release = Command::Release { key: typo.clone(), owner: "u1".into(), holder: None };
    assert_eq!(d.run(release), unknown);
    let release_later =
        Command::ReleaseOnCommit { key: typo.clone(), owner: "u1".into(), holder: "tx".into() };
    assert_eq!(d.run(release_later), unknown);
    assert_eq!(d.run(Command::Read { key: typo }), unknown);
    assert_eq!(d.machine.check_namespace("user"), Err(ErrorCode::UnknownNamespace));
    let mut after = Machine::new(MachineConfig::default());
    after.restore(&d.machine.snapshot()).unwrap();
    let mut unchanged = Machine::new(MachineConfig::default());
    unchanged.restore(&before).unwrap();
    assert_eq!(after.state.claims, unchanged.state.claims);

    // Declared ones are accepted; declaring is idempotent; tob's own need no declaring.
    let create = |name: &str| Command::CreateNamespace { name: name.into() };
    assert_eq!(d.run(create("orders")), Outcome::NamespaceCreated { created: true });
    assert_eq!(d.run(create("orders")), Outcome::NamespaceCreated { created: false });
    assert!(matches!(in_namespace(&mut d, "orders", "o1", "u1"), Outcome::Claimed { .. }));
    assert!(matches!(in_namespace(&mut d, "tob.lock", "job", "u1"), Outcome::Claimed { .. }));
    assert_eq!(d.run(create("tob.lock")), Outcome::NamespaceCreated { created: false });
    assert_eq!(d.machine.namespaces().collect::<Vec<_>>(), ["orders", "users"]);
    assert_eq!(
        d.run(create("")),
        Outcome::Error { code: ErrorCode::Empty },
        "names follow the limits of other names"
    );
}

#[test]
fn a_snapshot_from_before_namespaces_restores_without_the_rule() {
    let mut d = Driver::new();
    in_namespace(&mut d, "users", "alice", "u1");
    in_namespace(&mut d, "tob.lock", "job", "u1");
    // What a node wrote before namespaces existed: the state's fields and nothing after them.
    let old = postcard::to_allocvec(&d.machine.state).unwrap();
    let mut restored = Machine::new(MachineConfig::default());
    restored.restore(&old).unwrap();
    assert!(!restored.namespaces_required());
    assert_eq!(restored.owner(&key("alice")).unwrap().owner, "u1");
    let mut e = Driver { machine: restored, index: d.index, next_request: d.next_request };
    assert!(matches!(in_namespace(&mut e, "orders", "o1", "u1"), Outcome::Claimed { .. }));
    assert_eq!(
        e.run(Command::RequireNamespaces),
        Outcome::NamespacesRequired { declared: vec!["orders".into(), "users".into()] }
    );

    // Anything else after the state's fields is refused, as is a cut-off namespace part.
    let mut current = e.machine.snapshot();
    assert!(Machine::new(MachineConfig::default()).restore(&current).is_ok());
    current.push(0);
    assert_eq!(Machine::new(MachineConfig::default()).restore(&current), Err(ErrorCode::Malformed));
    current.truncate(current.len() - 3);
    assert_eq!(Machine::new(MachineConfig::default()).restore(&current), Err(ErrorCode::Malformed));
}

fn stage(holder: &str, messages: &[(&str, &str)]) -> Command {
    let messages = messages
        .iter()
        .map(|(topic, payload)| StagedMessage {
            topic: Some(topic.to_string()),
            payload: payload.as_bytes().to_vec(),
        })
        .collect();
    Command::Stage { holder: holder.into(), messages }
}

fn payloads(d: &Driver) -> Vec<String> {
    let messages = d.machine.messages(Seq(1), 100, None).unwrap();
    messages.into_iter().map(|m| String::from_utf8(m.payload).unwrap()).collect()
}

#[test]
fn staged_messages_enter_the_order_together_when_their_transaction_commits() {
    let mut d = Driver::new();
    assert_eq!(
        d.run(stage("pg:1:x1", &[("t", "a1"), ("t", "a2")])),
        Outcome::Staged { messages: 2 }
    );
    assert_eq!(d.run(stage("pg:1:x2", &[("t", "b1")])), Outcome::Staged { messages: 1 });
    d.run(Command::Append { topic: None, payload: b"plain".to_vec() });
    assert_eq!(d.run(stage("pg:1:x1", &[("u", "a3")])), Outcome::Staged { messages: 3 });
    // Nobody reads a staged message; the reconciler finds its holder.
    assert_eq!(payloads(&d), vec!["plain"]);
    assert_eq!(d.machine.in_flight_holders("pg:1:", None, 10), vec!["pg:1:x1", "pg:1:x2"]);
    assert_eq!(d.machine.staged_messages(), 4);

    assert_eq!(settle(&mut d, &["pg:1:x1"], &["pg:1:x2"]), Outcome::Settled { claims: 0 });
    assert_eq!(d.machine.staged_messages(), 0);
    assert_eq!(payloads(&d), vec!["plain", "a1", "a2", "a3"]);
    let topics: Vec<Option<String>> =
        d.machine.messages(Seq(2), 10, None).unwrap().into_iter().map(|m| m.topic).collect();
    assert_eq!(topics, vec![Some("t".into()), Some("t".into()), Some("u".into())]);
    assert!(d.machine.in_flight_holders("pg:1:", None, 10).is_empty());
    // Settling again (the reconciler after the worker) appends nothing twice.
    settle(&mut d, &["pg:1:x1", "pg:1:x2"], &[]);
    assert_eq!(payloads(&d), vec!["plain", "a1", "a2", "a3"]);
}

#[test]
fn a_transaction_stages_at_most_its_byte_limit() {
    let limits = Limits { staged_bytes_max: 5, ..Limits::default() };
    let mut d = Driver::new();
    d.machine = Machine::new(MachineConfig { limits, ..MachineConfig::default() });
    assert_eq!(d.run(stage("tx", &[("t", "abc")])), Outcome::Staged { messages: 1 });
    // Refused as a whole: neither message of the second request is staged.
    assert_eq!(
        d.run(stage("tx", &[("t", "d"), ("t", "efg")])),
        Outcome::Error { code: ErrorCode::TooLarge }
    );
    assert_eq!(d.run(stage("tx", &[("t", "de")])), Outcome::Staged { messages: 2 });
    settle(&mut d, &["tx"], &[]);
    assert_eq!(payloads(&d), vec!["abc", "de"]);
}

#[test]
fn holders_in_flight_include_those_with_only_staged_messages() {
    let mut d = Driver::new();
    let session = d.open_session(1000);
    tx_claim(&mut d, "a", "db1", "pg:1:x1", session);
    tx_claim(&mut d, "b", "db1", "pg:1:x3", session);
    d.run(stage("pg:1:x0", &[("t", "m")]));
    d.run(stage("pg:1:x1", &[("t", "m")]));
    d.run(stage("pg:1:x2", &[("t", "m")]));
    d.run(stage("pg:2:x0", &[("t", "m")]));
    let listed = |after: Option<&str>, max| d.machine.in_flight_holders("pg:1:", after, max);
    assert_eq!(listed(None, 10), vec!["pg:1:x0", "pg:1:x1", "pg:1:x2", "pg:1:x3"]);
    assert_eq!(listed(None, 2), vec!["pg:1:x0", "pg:1:x1"]);
    assert_eq!(listed(Some("pg:1:x1"), 2), vec!["pg:1:x2", "pg:1:x3"]);
    assert_eq!(listed(Some("pg:1:x3"), 2), Vec::<String>::new());
}

#[test]
fn staged_messages_survive_a_snapshot_and_older_snapshots_have_none() {
    let mut d = Driver::new();
    d.run(stage("pg:1:x1", &[("t", "a1")]));
    let mut restored = Machine::new(MachineConfig::default());
    restored.restore(&d.machine.snapshot()).unwrap();
    assert_eq!(restored.staged_messages(), 1);
    let mut e = Driver { machine: restored, index: d.index, next_request: d.next_request };
    settle(&mut e, &["pg:1:x1"], &[]);
    assert_eq!(payloads(&e), vec!["a1"]);

    // What a node wrote before staging existed: the state's fields and the namespaces.
    let old = postcard::to_allocvec(&d.machine.state).unwrap();
    let old = postcard::to_extend(&d.machine.state.namespaces, old).unwrap();
    let mut restored = Machine::new(MachineConfig::default());
    restored.restore(&old).unwrap();
    assert!(restored.in_flight_holders("pg:", None, 10).is_empty());
}
