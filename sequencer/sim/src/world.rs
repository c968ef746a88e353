//! The simulated world: an event queue ordered by simulated nanoseconds, the nodes, the
//! network, the clients and the nemesis. One seed drives every choice, so a seed replays a run
//! exactly; the trace hash fingerprints the run to prove it.
//!
//! A run has three phases: **chaos** (faults injected), **heal** (faults removed, every node
//! restarted) and **quiesce** (clients finish what they started and start nothing new). At the
//! end every recorded operation must have completed and every replica must hold the same state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use serde_json::json;
use tob_machine::MachineBugs;
use tob_proto::SessionId;
use tob_raft::{PlantedBugs, Role, SplitMix64};

use crate::checkers::election_safety::ElectionSafety;
use crate::checkers::leader_completeness::LeaderCompleteness;
use crate::checkers::state_machine_safety::StateMachineSafety;
use crate::checkers::{self, Fnv, Violation, log_matching, violation};
use crate::client::{Completion, SimClient};
use crate::history::{Event, History};
use crate::network::{Addr, Network, Packet, Refusal};
use crate::node::{Effects, SimNode};

const MS: u64 = 1_000_000;
const TICK_NS: u64 = 10 * MS;
const ATTEMPT_TIMEOUT_NS: u64 = 40 * MS;
const GIVE_UP_NS: u64 = 1_000 * MS;
const NOT_LEADER_BACKOFF_NS: u64 = 5 * MS;
/// A run that needs more events than this is livelocked (only seen with planted bugs).
const EVENTS_MAX: u64 = 500_000;
/// Log-matching is checked across all nodes this often (it compares whole logs).
const LOG_CHECK_EVERY_EVENTS: u64 = 5_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub clients: usize,
    pub chaos_ns: u64,
    pub heal_ns: u64,
    pub quiesce_ns: u64,
    pub faults: bool,
    pub bugs: PlantedBugs,
    pub machine_bugs: MachineBugs,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes: 3,
            clients: 6,
            chaos_ns: 5_000 * MS,
            heal_ns: 2_000 * MS,
            quiesce_ns: 3_000 * MS,
            faults: true,
            bugs: PlantedBugs::default(),
            machine_bugs: MachineBugs::default(),
        }
    }
}

/// Counts for the progress line and summaries.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub events: u64,
    pub ops_ok: u64,
    pub ops_fail: u64,
    pub ops_info: u64,
    pub elections: u64,
    pub crashes: u64,
    /// Crashes that also wiped the node's disk.
    pub wipes: u64,
    pub partitions: u64,
    pub snapshots_installed: u64,
    pub max_commit: u64,
    pub reads_served: u64,
    /// Reads answered by a node while a newer term already had a leader.
    pub reads_by_deposed_leader: u64,
}

/// The result of one run.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub trace_hash: u64,
    pub violations: Vec<Violation>,
    pub history: History,
    pub stats: Stats,
    pub nemesis_log: Vec<String>,
}

#[derive(Debug, Clone)]
enum EventKind {
    Tick {
        node: usize,
        incarnation: u64,
    },
    Deliver {
        from: Addr,
        to: Addr,
        packet: Box<Packet>,
    },
    SyncDone {
        node: usize,
        incarnation: u64,
    },
    ClientWake {
        client: usize,
    },
    ClientTimeout {
        client: usize,
        attempt: u64,
    },
    /// Resend to the current target after a "not leader" answer.
    ClientRetry {
        client: usize,
        attempt: u64,
    },
    Nemesis,
    Restart {
        node: usize,
    },
    Heal,
    Quiesce,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Chaos,
    Heal,
    Quiesce,
}

struct Checkers {
    election: ElectionSafety,
    completeness: LeaderCompleteness,
    state_machine: StateMachineSafety,
    other: Vec<Violation>,
}

pub struct World {
    config: SimConfig,
    rng: SplitMix64,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, EventKind>,
    next_event: u64,
    nodes: Vec<SimNode>,
    clients: Vec<SimClient>,
    network: Network,
    phase: Phase,
    history: History,
    checkers: Checkers,
    trace: Fnv,
    stats: Stats,
    leader_terms_seen: BTreeSet<(usize, u64)>,
    /// Whether each node was leader after its last event (for the run log).
    leading: Vec<bool>,
    expire_first_proposed: BTreeMap<(SessionId, u64), u64>,
    expiries_recorded: BTreeSet<u64>,
    next_expirer_process: u64,
    nemesis_log: Vec<String>,
}

impl World {
    pub fn new(config: SimConfig) -> World {
        assert!(config.nodes >= 1 && config.clients >= 1);
        let mut rng = SplitMix64::new(config.seed);
        let nodes = (0..config.nodes)
            .map(|i| {
                // Tick-rate skew of up to ±3%, inside the 10% lease drift bound.
                let skew_permille = rng.range(0, 61) as i64 - 30;
                let tick_ns = (TICK_NS as i64 * (1000 + skew_permille) / 1000) as u64;
                SimNode::new(
                    i,
                    config.nodes,
                    rng.next_u64(),
                    tick_ns,
                    config.bugs,
                    config.machine_bugs,
                )
            })
            .collect();
        let clients =
            (0..config.clients).map(|i| SimClient::new(i, config.seed, config.nodes)).collect();
        let mut world = World {
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            nodes,
            clients,
            network: Network::new((0..config.clients).map(|c| c % config.nodes).collect()),
            phase: Phase::Chaos,
            history: History::default(),
            checkers: Checkers {
                election: ElectionSafety::default(),
                completeness: LeaderCompleteness::default(),
                state_machine: StateMachineSafety::default(),
                other: Vec::new(),
            },
            trace: Fnv::default(),
            stats: Stats::default(),
            leader_terms_seen: BTreeSet::new(),
            leading: vec![false; config.nodes],
            expire_first_proposed: BTreeMap::new(),
            expiries_recorded: BTreeSet::new(),
            next_expirer_process: 1_000_000,
            nemesis_log: Vec::new(),
            config,
        };
        for node in 0..world.nodes.len() {
            let first = world.rng.range(1, TICK_NS);
            world.schedule(first, EventKind::Tick { node, incarnation: 0 });
        }
        for client in 0..world.clients.len() {
            let first = world.rng.range(MS, 50 * MS);
            world.schedule(first, EventKind::ClientWake { client });
        }
        if world.config.faults {
            world.schedule(200 * MS, EventKind::Nemesis);
        }
        world.schedule(world.config.chaos_ns, EventKind::Heal);
        world.schedule(world.config.chaos_ns + world.config.heal_ns, EventKind::Quiesce);
        let end = world.config.chaos_ns + world.config.heal_ns + world.config.quiesce_ns;
        world.schedule(end, EventKind::End);
        world
    }

    fn schedule(&mut self, delay_ns: u64, kind: EventKind) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((self.now + delay_ns, id)));
        self.events.insert(id, kind);
    }

    /// Runs to the end and checks everything.
    pub fn run(mut self) -> Report {
        while let Some(Reverse((time, id))) = self.queue.pop() {
            let kind = self.events.remove(&id).expect("scheduled event");
            self.now = time;
            self.stats.events += 1;
            self.trace.u64(time);
            if matches!(kind, EventKind::End) {
                break;
            }
            self.handle(kind);
            if self.stats.events >= EVENTS_MAX {
                let at = self.now / MS;
                self.checkers.other.push(violation(
                    "liveness",
                    format!("livelock: {EVENTS_MAX} events by {at} ms"),
                ));
                break;
            }
            if self.stats.events.is_multiple_of(LOG_CHECK_EVERY_EVENTS) {
                self.check_logs();
            }
        }
        self.finish()
    }

    fn handle(&mut self, kind: EventKind) {
        match kind {
            EventKind::Tick { node, incarnation } => {
                self.trace.u64(1 + node as u64);
                let n = &self.nodes[node];
                if !n.up || n.incarnation != incarnation {
                    return;
                }
                let tick_ns = n.tick_ns;
                self.schedule(tick_ns, EventKind::Tick { node, incarnation });
                self.with_node(node, |n, fx| n.tick(fx));
            }
            EventKind::Deliver { from, to, packet } => {
                if self.network.is_blocked(from, to) {
                    return;
                }
                match to {
                    Addr::Node(node) => {
                        self.trace.u64(10 + node as u64);
                        if self.nodes[node].up {
                            self.with_node(node, |n, fx| n.receive(*packet, fx));
                        }
                    }
                    Addr::Client(client) => {
                        self.trace.u64(100 + client as u64);
                        self.client_reply(client, *packet);
                    }
                }
            }
            EventKind::SyncDone { node, incarnation } => {
                self.trace.u64(20 + node as u64);
                let n = &self.nodes[node];
                if n.up && n.incarnation == incarnation {
                    self.with_node(node, |n, fx| n.sync_done(fx));
                }
            }
            EventKind::ClientWake { client } => self.client_start(client),
            EventKind::ClientTimeout { client, attempt } => self.client_timeout(client, attempt),
            EventKind::ClientRetry { client, attempt } => {
                let live =
                    self.clients[client].current.as_ref().is_some_and(|c| c.attempt == attempt);
                if live {
                    self.client_send(client);
                }
            }
            EventKind::Nemesis => self.nemesis(),
            EventKind::Restart { node } => self.restart(node),
            EventKind::Heal => {
                self.phase = Phase::Heal;
                self.network.heal();
                self.log_nemesis("heal: network healed, restarting every node".into());
                for node in 0..self.nodes.len() {
                    self.restart(node);
                }
            }
            EventKind::Quiesce => self.phase = Phase::Quiesce,
            EventKind::End => {}
        }
    }

    // ----- nodes ----------------------------------------------------------------------------

    /// Runs one input on a node. A node whose core panics (an assertion found its state
    /// impossible) stops for good, as a real node refusing to run on would; the run goes on so
    /// that the history shows what clients saw.
    fn with_node(&mut self, node: usize, f: impl FnOnce(&mut SimNode, &mut Effects)) {
        let mut fx = Effects::default();
        let n = &mut self.nodes[node];
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(n, &mut fx)));
        if let Err(payload) = outcome {
            let message = panic_message(payload.as_ref());
            self.checkers
                .other
                .push(violation("panic", format!("n{} stopped: {message}", node + 1)));
            self.nodes[node].up = false;
            self.nodes[node].broken = true;
            self.leading[node] = false;
            return;
        }
        self.apply_effects(node, fx);
    }

    fn apply_effects(&mut self, node: usize, fx: Effects) {
        let name = self.nodes[node].name.clone();
        if let Some(seq) = fx.deliver_start {
            self.history.push(Event::deliver_start(&name, seq, self.now));
        }
        for entry in fx.applied {
            self.checkers.state_machine.observe_applied(node as u64 + 1, entry);
            self.checkers.completeness.observe_committed(entry);
            self.stats.max_commit = self.stats.max_commit.max(entry.index);
        }
        for (seq, id) in fx.deliveries {
            self.history.push(Event::deliver(&name, seq, &id, self.now));
        }
        for (index, hash) in fx.state_hashes {
            self.checkers.state_machine.observe_state(node as u64 + 1, index, hash);
        }
        for key in fx.expire_proposed {
            self.expire_first_proposed.entry(key).or_insert(self.now);
        }
        for (index, session, keepalives, released) in fx.expired {
            if !self.expiries_recorded.insert(index) {
                continue;
            }
            let invoked =
                self.expire_first_proposed.get(&(session, keepalives)).copied().unwrap_or(self.now);
            for claim in released {
                // The expiry is an operation of the cluster itself, on the released key.
                let process = self.next_expirer_process;
                self.next_expirer_process += 1;
                let key = json!(claim.key.key);
                let owner = json!({"owner": claim.owner});
                self.history.push(Event::op(
                    process,
                    "invoke",
                    "release",
                    key.clone(),
                    owner,
                    invoked,
                ));
                let released = json!({"result": "released"});
                self.history.push(Event::op(process, "ok", "release", key, released, self.now));
            }
        }
        self.stats.snapshots_installed += fx.snapshots_installed;
        if fx.start_sync {
            // fsync latency: usually fast, sometimes in a slow phase.
            let delay = if self.rng.chance(50_000) {
                self.rng.range(10 * MS, 40 * MS)
            } else {
                self.rng.range(MS / 5, 3 * MS)
            };
            let incarnation = self.nodes[node].incarnation;
            self.schedule(delay, EventKind::SyncDone { node, incarnation });
        }
        let max_term = self.leader_terms_seen.iter().map(|(_, t)| *t).max().unwrap_or(0);
        for (to, packet) in fx.send {
            if let Packet::Reply { result: Ok(tob_proto::Outcome::Owner { .. }), .. } = &packet {
                self.stats.reads_served += 1;
                if self.nodes[node].raft.term().0 < max_term {
                    self.stats.reads_by_deposed_leader += 1;
                }
            }
            self.send(Addr::Node(node), to, packet);
        }
        self.observe_leadership(node);
    }

    fn observe_leadership(&mut self, node: usize) {
        let n = &self.nodes[node];
        let leading = n.raft.role() == Role::Leader;
        if self.leading[node] != leading {
            self.leading[node] = leading;
            let what = if leading { "became leader" } else { "stopped leading" };
            let line = format!("n{} {what} in term {}", node + 1, n.raft.term().0);
            self.log_nemesis(line);
        }
        let n = &self.nodes[node];
        if !leading {
            return;
        }
        let term = n.raft.term().0;
        self.trace.u64(term);
        if self.leader_terms_seen.insert((node, term)) {
            self.stats.elections += 1;
            self.checkers.election.observe_leader(term, node as u64 + 1);
            let log = n.log_summary();
            let snapshot_index = n.raft.snapshot_index().0;
            self.checkers.completeness.observe_new_leader(
                node as u64 + 1,
                term,
                snapshot_index,
                &log,
            );
        }
    }

    fn send(&mut self, from: Addr, to: Addr, packet: Packet) {
        if self.network.is_blocked(from, to) {
            return;
        }
        for delay in self.network.delays(&mut self.rng) {
            self.schedule(delay, EventKind::Deliver { from, to, packet: Box::new(packet.clone()) });
        }
    }

    fn crash(&mut self, node: usize, wipe: bool) {
        self.stats.crashes += 1;
        if wipe {
            self.stats.wipes += 1;
            self.nodes[node].crash_and_wipe(&mut self.rng);
        } else {
            self.nodes[node].crash(&mut self.rng);
        }
        self.leading[node] = false;
        let down_ns = self.rng.range(50 * MS, 1_500 * MS);
        let what = if wipe { "crash and wipe the disk of" } else { "crash" };
        self.log_nemesis(format!("{what} n{} for {} ms", node + 1, down_ns / MS));
        self.schedule(down_ns, EventKind::Restart { node });
    }

    /// A leader and an up-to-date follower of it while another live node lags behind the
    /// commit index: the nodes the lost-disk scenario takes down.
    fn lost_disk_scenario(&self, leader: Option<usize>) -> Option<(usize, usize)> {
        let leader = leader?;
        let commit = self.nodes[leader].raft.commit_index();
        let live_follower = |x: &usize| {
            *x != leader && self.nodes[*x].up && self.nodes[*x].raft.role() != Role::Leader
        };
        let lagging = (0..self.nodes.len())
            .filter(live_follower)
            .any(|x| self.nodes[x].raft.last_index() < commit);
        let current = (0..self.nodes.len())
            .filter(live_follower)
            .find(|&x| self.nodes[x].raft.last_index() >= commit)?;
        lagging.then_some((current, leader))
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].up || self.nodes[node].broken {
            return;
        }
        self.log_nemesis(format!("restart n{}", node + 1));
        self.with_node(node, |n, fx| n.restart(fx));
        let incarnation = self.nodes[node].incarnation;
        let tick_ns = self.nodes[node].tick_ns;
        self.schedule(tick_ns, EventKind::Tick { node, incarnation });
    }

    // ----- nemesis --------------------------------------------------------------------------

    fn log_nemesis(&mut self, what: String) {
        self.nemesis_log.push(format!("{:>6} ms  {what}", self.now / MS));
    }

    fn nemesis(&mut self) {
        if self.phase != Phase::Chaos {
            return;
        }
        let n = self.nodes.len();
        let all: Vec<usize> = (0..n).collect();
        let leader = self.nodes.iter().position(|x| x.up && x.raft.role() == Role::Leader);
        let down = self.nodes.iter().filter(|x| !x.up).count();
        let roll = self.rng.range(0, 100);
        match roll {
            0..=17 => {
                let mut shuffled = all.clone();
                for i in (1..n).rev() {
                    shuffled.swap(i, self.rng.range(0, i as u64 + 1) as usize);
                }
                let cut = self.rng.range(1, n as u64) as usize;
                self.network.clear_partitions();
                self.network.split(&shuffled[..cut], &shuffled[cut..]);
                self.stats.partitions += 1;
                self.log_nemesis(format!(
                    "partition {:?} | {:?}",
                    names(&shuffled[..cut]),
                    names(&shuffled[cut..])
                ));
            }
            18..=29 => {
                if let Some(l) = leader {
                    let rest: Vec<usize> = all.iter().copied().filter(|&x| x != l).collect();
                    self.network.clear_partitions();
                    self.network.split(&[l], &rest);
                    self.stats.partitions += 1;
                    self.log_nemesis(format!("isolate leader n{}", l + 1));
                }
            }
            30..=37 => {
                let a = self.rng.range(0, n as u64) as usize;
                let b = (a + self.rng.range(1, n as u64) as usize) % n;
                self.network.block(a, b);
                self.stats.partitions += 1;
                self.log_nemesis(format!("one-way cut n{} -> n{}", a + 1, b + 1));
            }
            38..=42 if n >= 3 => {
                // Bridge: two sides that only one node can talk to.
                let bridge = self.rng.range(0, n as u64) as usize;
                let others: Vec<usize> = all.iter().copied().filter(|&x| x != bridge).collect();
                let half = others.len() / 2;
                self.network.clear_partitions();
                self.network.split(&others[..half], &others[half..]);
                self.stats.partitions += 1;
                self.log_nemesis(format!("bridge through n{}", bridge + 1));
            }
            43..=60 => {
                self.network.clear_partitions();
                self.log_nemesis("heal partitions".into());
            }
            61..=77 => {
                let up: Vec<usize> = all.iter().copied().filter(|&x| self.nodes[x].up).collect();
                if down < n.div_ceil(2) && !up.is_empty() {
                    let victim = if self.rng.chance(400_000) {
                        leader.unwrap_or(up[0])
                    } else {
                        up[self.rng.range(0, up.len() as u64) as usize]
                    };
                    // A lost disk now and then, one at a time: two nodes rejoining at once in a
                    // 3-node cluster is two lost disks, more than a majority can survive.
                    let wipe = self.rng.chance(300_000)
                        && self.nodes.iter().all(|x| x.up && !x.raft.is_rejoining());
                    match self.lost_disk_scenario(leader).filter(|_| wipe) {
                        Some((follower, leader)) => {
                            // The dangerous moment: a follower that lags behind the commit
                            // index, the other one (whose acknowledgements committed what the
                            // lagging one lacks) loses its disk, the leader goes down, and the
                            // network heals. The blank node must not help the lagging one win.
                            self.log_nemesis("lost-disk scenario".into());
                            self.crash(follower, true);
                            self.crash(leader, false);
                            self.network.clear_partitions();
                        }
                        None => self.crash(victim, wipe),
                    }
                }
            }
            _ => {
                self.network.loss_per_million =
                    [0, 10_000, 50_000, 200_000][self.rng.range(0, 4) as usize];
                self.network.duplicate_per_million =
                    [0, 20_000, 100_000][self.rng.range(0, 3) as usize];
                self.network.delay_max_ns =
                    [2 * MS, 10 * MS, 40 * MS][self.rng.range(0, 3) as usize];
                let described = self.network.describe();
                self.log_nemesis(format!("network {described}"));
            }
        }
        let next = self.rng.range(100 * MS, 600 * MS);
        self.schedule(next, EventKind::Nemesis);
    }

    // ----- clients --------------------------------------------------------------------------

    fn client_start(&mut self, client: usize) {
        if self.phase == Phase::Quiesce || self.clients[client].current.is_some() {
            return;
        }
        let op = self.clients[client].choose(&mut self.rng, self.now);
        let c = &mut self.clients[client];
        c.start(op, self.now, self.now + GIVE_UP_NS);
        let current = c.current.as_ref().expect("just started");
        if let Some(f) = current.op.f() {
            let mut event = Event::op(
                c.process,
                "invoke",
                f,
                current.op.history_key(),
                current.op.invoke_value(),
                self.now,
            );
            event.mode = current.op.read_mode().map(str::to_owned);
            self.history.push(event);
        }
        self.client_send(client);
    }

    fn client_send(&mut self, client: usize) {
        let c = &mut self.clients[client];
        let Some(current) = c.current.as_mut() else { return };
        current.attempt += 1;
        let attempt = current.attempt;
        let request_id = current.request_id;
        let body = c.call();
        let target = c.target;
        self.send(
            Addr::Client(client),
            Addr::Node(target),
            Packet::Call { client, request_id, body },
        );
        self.schedule(ATTEMPT_TIMEOUT_NS, EventKind::ClientTimeout { client, attempt });
    }

    fn client_timeout(&mut self, client: usize, attempt: u64) {
        let c = &self.clients[client];
        let Some(current) = &c.current else { return };
        if current.attempt != attempt {
            return;
        }
        let recorded = current.op.f();
        if let Some(f) = recorded
            && self.phase == Phase::Chaos
            && self.now >= current.give_up_ns
        {
            let key = current.op.history_key();
            let process = c.process;
            self.history.push(Event::op(
                process,
                "info",
                f,
                key,
                serde_json::Value::Null,
                self.now,
            ));
            self.stats.ops_info += 1;
            let clients = self.clients.len();
            self.clients[client].give_up(clients);
            let pause = self.rng.range(MS, 20 * MS);
            self.schedule(pause, EventKind::ClientWake { client });
            return;
        }
        // No answer: try another node with the same request id.
        let n = self.nodes.len();
        let c = &mut self.clients[client];
        if n > 1 {
            c.target = (c.target + 1 + self.rng.range(0, n as u64 - 1) as usize) % n;
        }
        self.client_send(client);
    }

    fn client_reply(&mut self, client: usize, packet: Packet) {
        let Packet::Reply { request_id, result } = packet else { return };
        let c = &mut self.clients[client];
        let Some(current) = &c.current else { return };
        if current.request_id != request_id {
            return; // an answer to an older attempt or operation
        }
        match result {
            Err(Refusal::NotLeader { hint }) => {
                let n = self.nodes.len();
                c.target = hint.unwrap_or_else(|| (c.target + 1) % n);
                // Retry after a short pause; the pending timeout of this attempt goes stale.
                let current = c.current.as_mut().expect("checked above");
                current.attempt += 1;
                let attempt = current.attempt;
                self.schedule(NOT_LEADER_BACKOFF_NS, EventKind::ClientRetry { client, attempt });
            }
            Ok(outcome) => {
                let op = current.op.clone();
                let process = c.process;
                let (kind, value) = match c.complete(outcome, self.now) {
                    Ok(Completion::Ok(value)) => {
                        self.stats.ops_ok += 1;
                        ("ok", value)
                    }
                    Ok(Completion::Fail(value)) => {
                        self.stats.ops_fail += 1;
                        ("fail", value)
                    }
                    Ok(Completion::NotRecorded) => ("", serde_json::Value::Null),
                    Err(e) => {
                        self.checkers.other.push(violation("client", e));
                        ("", serde_json::Value::Null)
                    }
                };
                if let (false, Some(f)) = (kind.is_empty(), op.f()) {
                    let event = Event::op(process, kind, f, op.history_key(), value, self.now);
                    self.history.push(event);
                }
                let think = self.rng.range(0, 10 * MS);
                self.schedule(think, EventKind::ClientWake { client });
            }
        }
    }

    // ----- checks ---------------------------------------------------------------------------

    fn check_logs(&mut self) {
        let logs: Vec<(u64, Vec<_>)> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| (n.index as u64 + 1, n.log_summary()))
            .collect();
        let found = log_matching::check(&logs);
        if !found.is_empty() && self.checkers.other.iter().all(|v| v.checker != "log_matching") {
            self.checkers.other.extend(found.into_iter().take(1));
        }
    }

    fn finish(mut self) -> Report {
        self.check_logs();
        let mut violations = Vec::new();
        violations.append(&mut self.checkers.election.violations);
        violations.append(&mut self.checkers.completeness.violations);
        violations.append(&mut self.checkers.state_machine.violations);
        violations.append(&mut self.checkers.other);

        // Liveness: after the heal, everything started must have finished...
        for c in &self.clients {
            if let Some(current) = &c.current {
                violations.push(violation(
                    "liveness",
                    format!(
                        "client {} still waiting for {:?} invoked at {} ms",
                        c.index,
                        current.op,
                        current.invoke_ns / MS
                    ),
                ));
            }
        }
        for n in &self.nodes {
            self.nemesis_log.push(format!("end     {}", n.status()));
        }
        // ...and every replica converged to the same state.
        let leader_commit = self.nodes.iter().map(|n| n.raft.commit_index().0).max().unwrap_or(0);
        let states: Vec<(u64, Vec<u8>)> =
            self.nodes.iter().map(|n| (n.machine.applied_index(), n.machine.snapshot())).collect();
        for (n, (applied, state)) in self.nodes.iter().zip(&states) {
            if *applied < leader_commit || state != &states[0].1 {
                violations.push(violation(
                    "convergence",
                    format!(
                        "{} applied {applied} of {leader_commit}; state {}",
                        n.name,
                        if state == &states[0].1 { "same" } else { "differs" }
                    ),
                ));
            }
        }
        self.history.sort();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        violations.extend(checkers::check_history(&self.history, &names));
        for (applied, state) in &states {
            self.trace.u64(*applied);
            self.trace.bytes(state);
        }
        Report {
            seed: self.config.seed,
            trace_hash: self.trace.0,
            violations,
            history: self.history,
            stats: self.stats,
            nemesis_log: self.nemesis_log,
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn names(nodes: &[usize]) -> Vec<String> {
    nodes.iter().map(|n| format!("n{}", n + 1)).collect()
}

/// Runs one seed. A panic inside the run (an assertion of the core or the simulator) is
/// reported as a violation of that seed, not as a crash of the whole range.
pub fn run(config: SimConfig) -> Report {
    let seed = config.seed;
    match std::panic::catch_unwind(move || World::new(config).run()) {
        Ok(report) => report,
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            Report {
                seed,
                trace_hash: 0,
                violations: vec![violation("panic", message)],
                history: History::default(),
                stats: Stats::default(),
                nemesis_log: Vec::new(),
            }
        }
    }
}
