//! A simulated network: per-message delay, loss and duplication (which also reorders), and
//! partitions, symmetric or one-way, between nodes. Each client runs beside a home node and
//! reaches what that node's host reaches, through the same loss and delay.

use std::collections::BTreeSet;

use tob_proto::{ClaimKey, Outcome, Request, RequestId};
use tob_raft::{Message, ReadMode, SplitMix64};

/// A network endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Addr {
    Node(usize),
    Client(usize),
}

#[derive(Debug, Clone)]
pub enum Packet {
    Raft(Message),
    Call { client: usize, request_id: RequestId, body: CallBody },
    Reply { request_id: RequestId, result: Result<Outcome, Refusal> },
}

#[derive(Debug, Clone)]
pub enum CallBody {
    /// Through the log.
    Command(Request),
    /// ReadIndex or lease read of a key's owner.
    Read { key: ClaimKey, mode: ReadMode },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotLeader { hint: Option<usize> },
}

#[derive(Debug, Clone)]
pub struct Network {
    /// Node pairs (from, to) whose messages are dropped.
    blocked: BTreeSet<(usize, usize)>,
    pub loss_per_million: u32,
    pub duplicate_per_million: u32,
    pub delay_min_ns: u64,
    pub delay_max_ns: u64,
    /// The node each client runs beside.
    pub client_homes: Vec<usize>,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            blocked: BTreeSet::new(),
            loss_per_million: 0,
            duplicate_per_million: 0,
            delay_min_ns: 100_000,
            delay_max_ns: 2_000_000,
            client_homes: Vec::new(),
        }
    }
}

impl Network {
    pub fn new(client_homes: Vec<usize>) -> Network {
        Network { client_homes, ..Network::default() }
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
        self.loss_per_million = 0;
        self.duplicate_per_million = 0;
        self.delay_min_ns = 100_000;
        self.delay_max_ns = 2_000_000;
    }

    pub fn block(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Cuts every link between the two groups, both ways.
    pub fn split(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.block(x, y);
                self.block(y, x);
            }
        }
    }

    pub fn clear_partitions(&mut self) {
        self.blocked.clear();
    }

    pub fn is_blocked(&self, from: Addr, to: Addr) -> bool {
        match (from, to) {
            (Addr::Node(a), Addr::Node(b)) => self.blocked.contains(&(a, b)),
            // A client lives on its home node's host: it reaches what that host reaches, both
            // ways (a TCP connection needs both directions).
            (Addr::Client(c), Addr::Node(n)) | (Addr::Node(n), Addr::Client(c)) => {
                let home = self.client_homes[c];
                home != n
                    && (self.blocked.contains(&(home, n)) || self.blocked.contains(&(n, home)))
            }
            (Addr::Client(_), Addr::Client(_)) => false,
        }
    }

    /// Delivery delays for one send: empty if lost, two if duplicated.
    pub fn delays(&self, rng: &mut SplitMix64) -> Vec<u64> {
        if rng.chance(self.loss_per_million) {
            return Vec::new();
        }
        let mut delays = vec![rng.range(self.delay_min_ns, self.delay_max_ns + 1)];
        if rng.chance(self.duplicate_per_million) {
            delays.push(rng.range(self.delay_min_ns, self.delay_max_ns * 3 + 1));
        }
        delays
    }

    pub fn describe(&self) -> String {
        let cuts: Vec<String> =
            self.blocked.iter().map(|(a, b)| format!("n{}->n{}", a + 1, b + 1)).collect();
        format!(
            "cuts [{}] loss {}ppm dup {}ppm delay {}..{}us",
            cuts.join(" "),
            self.loss_per_million,
            self.duplicate_per_million,
            self.delay_min_ns / 1000,
            self.delay_max_ns / 1000
        )
    }
}
