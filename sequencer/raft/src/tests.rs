//! Scenario tests of the core through its public API, on a tiny synchronous harness: every
//! Ready is "persisted" at once and messages are delivered in order unless a link is cut.

use std::collections::{BTreeMap, BTreeSet};

use crate::*;

struct Cluster {
    nodes: BTreeMap<u64, Raft>,
    cut: BTreeSet<(u64, u64)>,
    applied: BTreeMap<u64, Vec<Entry>>,
    reads: BTreeMap<u64, Vec<ReadState>>,
    /// Every Ready seen, for checks on the persistence contract.
    readies: Vec<(u64, Ready)>,
    /// Snapshot pieces at these offsets are lost (once each).
    lose_pieces_at: BTreeSet<u64>,
    /// Every snapshot piece is delivered twice.
    repeat_pieces: bool,
    /// Every snapshot piece sent: (offset, bytes).
    pieces_sent: Vec<(u64, usize)>,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        Cluster::with_config(n, |_| {})
    }

    fn with_config(n: u64, edit: impl Fn(&mut Config)) -> Cluster {
        let voters: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let nodes = (1..=n)
            .map(|id| {
                let mut config = Config::new(NodeId(id), voters.clone(), 42);
                edit(&mut config);
                (id, Raft::new(config, Recovered::default()))
            })
            .collect();
        Cluster {
            nodes,
            cut: BTreeSet::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            readies: Vec::new(),
            lose_pieces_at: BTreeSet::new(),
            repeat_pieces: false,
            pieces_sent: Vec::new(),
        }
    }

    fn cut_both_ways(&mut self, a: u64, b: u64) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    fn isolate(&mut self, id: u64) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Carries out Readys and delivers messages until the cluster is quiet.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut messages = Vec::new();
            for (&id, raft) in self.nodes.iter_mut() {
                if !raft.has_ready() {
                    continue;
                }
                let ready = raft.ready();
                messages.extend(ready.messages.iter().cloned());
                messages.extend(ready.messages_after_persist.iter().cloned());
                self.applied.entry(id).or_default().extend(ready.committed.iter().cloned());
                self.reads.entry(id).or_default().extend(ready.read_states.iter().copied());
                raft.advance();
                self.readies.push((id, ready));
            }
            if messages.is_empty() && !self.nodes.values().any(Raft::has_ready) {
                return;
            }
            for m in messages {
                if self.cut.contains(&(m.from.0, m.to.0)) {
                    continue;
                }
                if let MessageBody::InstallSnapshot { offset, data, .. } = &m.body {
                    self.pieces_sent.push((*offset, data.len()));
                    if self.lose_pieces_at.remove(offset) {
                        continue;
                    }
                    if self.repeat_pieces {
                        self.nodes.get_mut(&m.to.0).unwrap().step(m.clone());
                    }
                }
                self.nodes.get_mut(&m.to.0).unwrap().step(m);
            }
        }
        panic!("cluster never settled");
    }

    fn tick(&mut self, ticks: u32) {
        for _ in 0..ticks {
            for raft in self.nodes.values_mut() {
                raft.tick();
            }
            self.settle();
        }
    }

    fn leaders(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, r)| r.role() == Role::Leader).map(|(&id, _)| id).collect()
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..100 {
            self.tick(1);
            if let [leader] = self.leaders()[..] {
                return leader;
            }
        }
        panic!("no leader elected");
    }
}

#[test]
fn elects_one_leader_which_appends_a_noop() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    assert_eq!(c.leaders(), vec![leader]);
    let term = c.nodes[&leader].term();
    let first_of_term = c.nodes[&leader].entries().iter().find(|e| e.term == term).unwrap();
    assert_eq!(first_of_term.kind, EntryKind::Noop);
    for raft in c.nodes.values() {
        assert_eq!(raft.term(), term);
        assert_eq!(raft.leader(), Some(NodeId(leader)));
    }
}

#[test]
fn votes_leave_only_after_they_are_persisted() {
    let mut c = Cluster::new(3);
    c.elect();
    let mut saw_vote = false;
    for (_, ready) in &c.readies {
        for m in &ready.messages {
            assert!(
                !matches!(
                    m.body,
                    MessageBody::Vote { .. }
                        | MessageBody::VoteResponse { .. }
                        | MessageBody::AppendResponse(_)
                ),
                "{m:?} may only be sent after persisting"
            );
        }
        for m in &ready.messages_after_persist {
            if let MessageBody::VoteResponse { granted: true } | MessageBody::Vote { .. } = m.body {
                saw_vote = true;
                // The vote this message depends on is in the same Ready's hard state.
                let hs = ready.hard_state.expect("a vote changes the hard state");
                assert_eq!(hs.term, m.term);
                assert!(hs.voted_for.is_some());
            }
        }
    }
    assert!(saw_vote);
}

#[test]
fn proposals_are_committed_and_applied_in_the_same_order_everywhere() {
    let mut c = Cluster::new(5);
    let leader = c.elect();
    for i in 0..20u8 {
        c.nodes.get_mut(&leader).unwrap().propose(vec![i]).unwrap();
    }
    c.tick(3);
    let commands = |entries: &Vec<Entry>| -> Vec<Vec<u8>> {
        entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::Command(d) => Some(d.clone()),
                EntryKind::Noop => None,
            })
            .collect()
    };
    let expected: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i]).collect();
    for id in 1..=5 {
        assert_eq!(commands(&c.applied[&id]), expected, "node {id}");
    }
    let follower = (1..=5).find(|&i| i != leader).unwrap();
    assert_eq!(
        c.nodes.get_mut(&follower).unwrap().propose(vec![9]),
        Err(NotLeader { leader: Some(NodeId(leader)) })
    );
}

#[test]
fn a_leader_applies_what_followers_commit_while_its_own_fsync_runs() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    c.tick(1);
    let raft = c.nodes.get_mut(&leader).unwrap();
    raft.propose(vec![7]).unwrap();
    // The leader's Ready is "being written": no advance yet. Its Appends go out meanwhile.
    let ready = raft.ready();
    assert_eq!(ready.entries.len(), 1);
    let index = ready.entries[0].index;
    assert!(raft.take_committed().is_empty(), "nothing is committed before any answer");
    for m in ready.messages {
        c.nodes.get_mut(&m.to.0).unwrap().step(m);
    }
    let mut answers = Vec::new();
    for (&id, raft) in c.nodes.iter_mut().filter(|(id, _)| **id != leader) {
        let ready = raft.ready();
        answers.extend(ready.messages_after_persist.iter().cloned());
        raft.advance();
        assert!(raft.take_committed().is_empty(), "node {id}: only a leader hands entries out");
    }
    let raft = c.nodes.get_mut(&leader).unwrap();
    for m in answers {
        raft.step(m);
    }
    // Both followers hold it durably: committed without the leader's copy, and handed out.
    let taken = raft.take_committed();
    assert_eq!(taken.iter().map(|e| e.index).collect::<Vec<_>>(), vec![index]);
    assert!(raft.take_committed().is_empty(), "handed out once");
    raft.advance();
    let next = raft.ready();
    assert!(next.committed.iter().all(|e| e.index != index), "handed out again: {next:?}");
    raft.advance();
}

#[test]
fn a_new_commit_index_waits_for_the_next_append_or_heartbeat() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    c.tick(1);
    let (fast, slow) =
        match c.nodes.keys().copied().filter(|&id| id != leader).collect::<Vec<_>>()[..] {
            [a, b] => (a, b),
            _ => unreachable!("three nodes"),
        };
    let raft = c.nodes.get_mut(&leader).unwrap();
    raft.propose(vec![7]).unwrap();
    let ready = raft.ready();
    let index = ready.entries[0].index;
    raft.advance();
    let mut to_slow = Vec::new();
    for m in ready.messages {
        if m.to.0 == slow { to_slow.push(m) } else { c.nodes.get_mut(&m.to.0).unwrap().step(m) }
    }
    // Only the fast follower answers: the entry commits on the leader and the fast follower.
    let ready = c.nodes.get_mut(&fast).unwrap().ready();
    c.nodes.get_mut(&fast).unwrap().advance();
    let raft = c.nodes.get_mut(&leader).unwrap();
    for m in ready.messages_after_persist {
        raft.step(m);
    }
    assert_eq!(raft.commit_index(), index);
    // The slow follower still has the entry in flight: no message just for the commit index.
    let ready = raft.ready();
    raft.advance();
    let extra: Vec<_> = ready.messages.iter().filter(|m| m.to.0 == slow).collect();
    assert!(extra.is_empty(), "a commit index alone was sent: {extra:?}");
    // It learns the commit from the next heartbeat.
    for m in to_slow {
        c.nodes.get_mut(&slow).unwrap().step(m);
    }
    c.settle();
    assert!(c.nodes[&slow].commit_index() < index, "nothing told it the commit index yet");
    c.tick(2);
    assert_eq!(c.nodes[&slow].commit_index(), index);
}

#[test]
fn read_index_waits_for_a_quorum_round() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    c.tick(1);
    let raft = c.nodes.get_mut(&leader).unwrap();
    raft.read(7, ReadMode::Index).unwrap();
    let ready = raft.ready();
    assert!(ready.read_states.is_empty(), "answered before confirming leadership");
    assert!(ready.messages.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    raft.advance();
    let heartbeats = ready.messages;
    for m in heartbeats {
        c.nodes.get_mut(&m.to.0).unwrap().step(m);
    }
    c.settle();
    let reads = &c.reads[&leader];
    assert_eq!(reads.last().map(|r| r.context), Some(7));
    assert_eq!(reads.last().unwrap().index, c.nodes[&leader].commit_index());
}

#[test]
fn an_isolated_leader_cannot_confirm_reads_and_steps_down() {
    let mut c = Cluster::new(3);
    let old = c.elect();
    c.isolate(old);
    c.nodes.get_mut(&old).unwrap().read(1, ReadMode::Index).unwrap();
    c.tick(3 * 10);
    assert!(c.reads.get(&old).is_none_or(|r| r.iter().all(|r| r.context != 1)));
    assert_ne!(c.nodes[&old].role(), Role::Leader, "check-quorum must depose it");
    let ready = c.nodes.get_mut(&old).unwrap();
    assert!(ready.read(2, ReadMode::Index).is_err());
    let new = c.leaders();
    assert_eq!(new.len(), 1);
    assert_ne!(new[0], old);
}

#[test]
fn lease_reads_skip_the_round_trip_only_while_the_lease_holds() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    c.tick(2); // a heartbeat round confirmed
    let raft = c.nodes.get_mut(&leader).unwrap();
    assert!(raft.has_lease());
    raft.read(1, ReadMode::Lease).unwrap();
    assert_eq!(raft.ready().read_states.len(), 1, "lease read answered at once");
    raft.advance();
    c.isolate(leader);
    let lease_ticks = c.nodes[&leader].config().lease_ticks();
    for _ in 0..=lease_ticks {
        c.nodes.get_mut(&leader).unwrap().tick();
        c.settle();
    }
    let raft = c.nodes.get_mut(&leader).unwrap();
    assert!(!raft.has_lease(), "lease outlived {lease_ticks} ticks without acknowledgements");
    assert!(lease_ticks < u64::from(raft.config().election_ticks));
}

#[test]
fn pre_vote_keeps_a_partitioned_node_from_inflating_its_term() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    let term = c.nodes[&leader].term();
    let loner = (1..=3).find(|&i| i != leader).unwrap();
    c.isolate(loner);
    c.tick(100);
    assert_eq!(c.nodes[&loner].term(), term, "pre-vote failed to hold the term");
    c.cut.clear();
    c.tick(10);
    assert_eq!(c.leaders(), vec![leader], "a rejoining node must not depose a healthy leader");
}

/// A leader that compacted its log, with `data` as the snapshot, past a follower that was cut
/// off meanwhile (still cut off). Returns the cluster, the leader, the follower, the snapshot.
fn leader_compacted_past_a_follower(
    chunk_bytes: usize,
    data: Vec<u8>,
) -> (Cluster, u64, u64, Snapshot) {
    let mut c = Cluster::with_config(3, |config| config.snapshot_chunk_bytes = chunk_bytes);
    let leader = c.elect();
    let lagging = (1..=3).find(|&i| i != leader).unwrap();
    c.isolate(lagging);
    for i in 0..30u8 {
        c.nodes.get_mut(&leader).unwrap().propose(vec![i]).unwrap();
        c.settle();
    }
    let raft = c.nodes.get_mut(&leader).unwrap();
    let index = raft.commit_index();
    let term = raft.term_at(index).unwrap();
    let snapshot = Snapshot { index, term, voters: raft.config().voters.clone(), data };
    raft.compact(snapshot.clone());
    assert_eq!(raft.snapshot_index(), index);
    (c, leader, lagging, snapshot)
}

#[test]
fn lagging_follower_catches_up_from_a_snapshot() {
    let (mut c, leader, lagging, snapshot) =
        leader_compacted_past_a_follower(1024 * 1024, b"state".to_vec());
    c.readies.clear();
    c.cut.clear();
    c.tick(6);
    let installed =
        c.readies.iter().any(|(id, r)| *id == lagging && r.snapshot.as_ref() == Some(&snapshot));
    assert!(installed, "the follower was not sent the snapshot");
    assert_eq!(c.nodes[&lagging].commit_index(), c.nodes[&leader].commit_index());
}

#[test]
fn recovery_restores_term_vote_and_log() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    c.nodes.get_mut(&leader).unwrap().propose(b"x".to_vec()).unwrap();
    c.tick(2);
    let raft = &c.nodes[&leader];
    let recovered = Recovered {
        hard_state: HardState {
            term: raft.term(),
            voted_for: Some(NodeId(leader)),
            commit: raft.commit_index(),
        },
        snapshot: None,
        entries: raft.entries().to_vec(),
        rejoining: false,
    };
    let restarted = Raft::new(raft.config().clone(), recovered);
    assert_eq!(restarted.term(), raft.term());
    assert_eq!(restarted.last_index(), raft.last_index());
    assert_eq!(restarted.role(), Role::Follower);
}

#[test]
fn a_large_snapshot_travels_in_pieces_that_survive_loss_and_repeats() {
    // Lost pieces are sent again after a heartbeat answer shows no progress; repeated ones
    // are dropped by the follower (each on its own: a repeat would also make up for a loss).
    snapshot_in_pieces([3000, 7000].into(), false);
    snapshot_in_pieces(BTreeSet::new(), true);
}

fn snapshot_in_pieces(lose_pieces_at: BTreeSet<u64>, repeat_pieces: bool) {
    let data = (0..10_500u32).map(|i| (i % 251) as u8).collect();
    let (mut c, leader, lagging, snapshot) = leader_compacted_past_a_follower(1000, data);
    c.readies.clear();
    c.cut.clear();
    c.lose_pieces_at = lose_pieces_at;
    c.repeat_pieces = repeat_pieces;
    c.tick(30);
    let installed: Vec<&Snapshot> = c
        .readies
        .iter()
        .filter(|(id, _)| *id == lagging)
        .filter_map(|(_, r)| r.snapshot.as_ref())
        .collect();
    assert_eq!(installed, vec![&snapshot], "installed exactly once, byte for byte");
    assert!(c.lose_pieces_at.is_empty(), "the pieces to lose were sent");
    assert!(c.pieces_sent.iter().all(|&(_, len)| len <= 1000), "no piece over the limit");
    let offsets: BTreeSet<u64> = c.pieces_sent.iter().map(|&(o, _)| o).collect();
    assert_eq!(offsets, (0..11).map(|i| i * 1000).collect(), "every piece, lost ones again");
    assert_eq!(c.nodes[&lagging].commit_index(), c.nodes[&leader].commit_index());
    // The leader went back to sending entries, which the follower applies.
    c.nodes.get_mut(&leader).unwrap().propose(vec![99]).unwrap();
    c.tick(3); // the next heartbeat carries the new commit index
    assert_eq!(
        c.applied[&lagging].last().map(|e| e.kind.clone()),
        Some(EntryKind::Command(vec![99]))
    );
}

#[test]
fn a_follower_restarted_mid_snapshot_asks_for_it_from_the_start() {
    let (mut c, leader, lagging, snapshot) = leader_compacted_past_a_follower(100, vec![7; 450]);
    let index = snapshot.index;
    // The follower takes pieces 0 and 100, then loses its memory (a restart) while the piece
    // at 200 is lost: the next piece it sees is at 300, which it cannot use.
    let term = c.nodes[&leader].term();
    let piece = |offset: u64, data: Vec<u8>| Message {
        from: NodeId(leader),
        to: NodeId(lagging),
        term,
        body: MessageBody::InstallSnapshot {
            index,
            snapshot_term: snapshot.term,
            voters: snapshot.voters.clone(),
            offset,
            total: 450,
            data,
        },
    };
    // What the follower answers to one piece: the bytes it says it holds.
    let answer = |follower: &mut Raft, message: Message| {
        follower.step(message);
        let messages = follower.ready().messages;
        follower.advance();
        match &messages[..] {
            [Message { body: MessageBody::SnapshotReceived { received, .. }, .. }] => *received,
            other => panic!("unexpected answer {other:?}"),
        }
    };
    let follower = c.nodes.get_mut(&lagging).unwrap();
    assert_eq!(answer(follower, piece(0, vec![7; 100])), 100);
    *follower = Raft::new(follower.config().clone(), Recovered::default());
    assert_eq!(answer(follower, piece(300, vec![7; 100])), 0, "start over");
    // And through the leader it gets the whole of it.
    c.cut.clear();
    c.readies.clear();
    c.tick(20);
    let installed =
        c.readies.iter().any(|(id, r)| *id == lagging && r.snapshot.as_ref() == Some(&snapshot));
    assert!(installed);
}

/// The two other nodes of a 3-node cluster.
fn followers_of(leader: u64) -> (u64, u64) {
    let mut others = (1..=3).filter(|&id| id != leader);
    (others.next().unwrap(), others.next().unwrap())
}

/// A 3-node cluster with a leader and its followers `(leader, blank, other)`, the link that
/// `cut` picks among them cut both ways.
fn three_nodes_with_a_cut(cut: impl Fn(u64, u64, u64) -> (u64, u64)) -> (Cluster, u64, u64, u64) {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    let (blank, other) = followers_of(leader);
    let (a, b) = cut(leader, blank, other);
    c.cut_both_ways(a, b);
    (c, leader, blank, other)
}

/// Restarts `id` on a blank disk: storage lost, rejoining.
fn wipe(c: &mut Cluster, id: u64) {
    let config = c.nodes[&id].config().clone();
    let blank = Recovered { rejoining: true, ..Recovered::default() };
    c.nodes.insert(id, Raft::new(config, blank));
}

#[test]
fn a_new_cluster_of_blank_nodes_elects_a_leader_once_every_node_has_answered() {
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut c = Cluster::new(3);
    for id in 1..=3 {
        let config = Config::new(NodeId(id), voters.clone(), 42);
        c.nodes.insert(id, Raft::new(config, Recovered { rejoining: true, ..Default::default() }));
    }
    // Until every node has answered, nobody votes: two nodes of three elect no one.
    c.isolate(3);
    c.tick(60);
    assert!(c.leaders().is_empty(), "elected before hearing from node 3: {:?}", c.leaders());
    c.cut.clear();
    let leader = c.elect();
    assert!(c.nodes.values().all(|r| !r.is_rejoining()));
    let rejoined = c.readies.iter().filter(|(_, r)| r.rejoined).count();
    assert_eq!(rejoined, 3, "each node reports the end of its rejoin once");
    assert!(c.readies.iter().filter(|(_, r)| r.rejoined).all(|(_, r)| r.hard_state.is_some()));
    assert_eq!(c.leaders(), vec![leader]);
}

#[test]
fn a_node_that_lost_its_disk_votes_only_after_hearing_from_everyone_and_catching_up() {
    // The lagging follower misses entries that the leader and `blank` commit together.
    let (mut c, leader, blank, lagging) =
        three_nodes_with_a_cut(|leader, _, lagging| (leader, lagging));
    for i in 0..3u8 {
        c.nodes.get_mut(&leader).unwrap().propose(vec![i]).unwrap();
    }
    c.tick(1);
    let committed = c.nodes[&leader].commit_index();
    assert!(c.nodes[&lagging].last_index() < committed, "the lagging node has them");
    let term_before = c.nodes[&leader].term();
    // `blank` loses its disk; the leader goes away; the network between the others heals.
    wipe(&mut c, blank);
    c.isolate(leader);
    c.cut.remove(&(blank, lagging));
    c.cut.remove(&(lagging, blank));
    c.tick(60);
    // Without `blank`'s vote the lagging node — which lacks committed entries — cannot win.
    assert!(c.nodes[&blank].is_rejoining(), "it has not heard from the leader");
    assert!(c.leaders().iter().all(|&l| l == leader), "no new leader: {:?}", c.leaders());
    assert_eq!(c.nodes[&lagging].term(), term_before, "no pre-vote granted, no new term");
    // The old leader comes back: a leader with every committed entry, and `blank` rejoined.
    c.cut.clear();
    c.tick(60);
    let [new_leader] = c.leaders()[..] else { panic!("one leader expected: {:?}", c.leaders()) };
    assert!(!c.nodes[&blank].is_rejoining());
    for raft in c.nodes.values() {
        assert!(raft.last_index() >= committed, "node {} lost committed entries", raft.id().0);
    }
    assert!(c.nodes[&new_leader].commit_index() >= committed);
    assert!(c.nodes[&blank].term() >= term_before, "it took the others' term as a floor");
}

#[test]
fn a_rejoined_node_counts_the_highest_reported_term_as_voted() {
    let mut c = Cluster::new(3);
    let leader = c.elect();
    let blank = if leader == 1 { 2 } else { 1 };
    let term = c.nodes[&leader].term();
    wipe(&mut c, blank);
    c.tick(4);
    let raft = &c.nodes[&blank];
    assert!(!raft.is_rejoining());
    assert_eq!(raft.term(), term);
    assert_eq!(c.leaders(), vec![leader], "rejoining disturbed no one");
    let last = c.readies.iter().rev().find(|(id, r)| *id == blank && r.rejoined).unwrap();
    let hard_state = last.1.hard_state.expect("the rejoin is recorded durably");
    assert_eq!(hard_state.term, term);
    assert_eq!(hard_state.voted_for, Some(NodeId(blank)), "no second vote in this term");
}

#[test]
fn a_blank_node_acknowledges_nothing_until_every_member_has_answered() {
    let (mut c, leader, blank, _) = three_nodes_with_a_cut(|_, blank, other| (blank, other));
    wipe(&mut c, blank);
    c.readies.clear();
    c.nodes.get_mut(&leader).unwrap().propose(b"x".to_vec()).unwrap();
    c.tick(30);
    let answered_leader = |c: &Cluster| {
        c.readies.iter().filter(|(id, _)| *id == blank).any(|(_, r)| {
            r.messages.iter().chain(&r.messages_after_persist).any(|m| {
                m.to.0 == leader
                    && matches!(
                        m.body,
                        MessageBody::AppendResponse(_) | MessageBody::HeartbeatResponse { .. }
                    )
            })
        })
    };
    assert!(!answered_leader(&c), "it answered the leader before hearing from everyone");
    assert!(c.nodes[&blank].is_rejoining());
    c.cut.clear();
    c.tick(30);
    assert!(answered_leader(&c));
    assert!(!c.nodes[&blank].is_rejoining());
    assert_eq!(c.nodes[&blank].last_index(), c.nodes[&leader].last_index());
}
