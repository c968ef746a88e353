//! Real `tob-sequencer` processes on loopback, every peer link through its own [`Proxy`], and
//! the process faults: kill -9, restart, SIGSTOP/SIGCONT.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::Proxy;

struct Node {
    id: u64,
    peer: SocketAddr,
    client: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
    paused: bool,
    /// Extra flags (a different tick rate, to skew its clock).
    extra: Vec<String>,
}

pub struct Cluster {
    binary: PathBuf,
    dir: PathBuf,
    nodes: Vec<Node>,
    /// `(from, to)` → the proxy that carries from's messages to `to`.
    links: BTreeMap<(usize, usize), Proxy>,
    /// The proxy in front of each node's client port: clients only ever use these.
    client_links: Vec<Proxy>,
    log: std::fs::File,
}

/// How many times a cluster is started on fresh ports before giving up.
const START_ATTEMPTS: usize = 3;

impl Cluster {
    /// Starts `size` nodes, each with `flags` on its command line, and waits until every
    /// node listens. A node that exits at once is started again with the others on fresh
    /// ports: a port picked here is free when picked, but another process (a second test
    /// binary, a client's outgoing connection) can take it before the node binds it, and a
    /// new cluster missing a node never elects a leader (seen twice with two fault runs side
    /// by side: "cluster not reachable in 30 s").
    pub fn start(
        binary: &Path,
        dir: &Path,
        size: usize,
        flags: &[String],
    ) -> std::io::Result<Cluster> {
        let mut attempt = 1;
        loop {
            let mut cluster = Cluster::start_on_fresh_ports(binary, dir, size, flags)?;
            match cluster.wait_listening(Duration::from_secs(10)) {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < START_ATTEMPTS => {
                    let mut log = cluster.log.try_clone()?;
                    let _ = writeln!(log, "tob-faults: {e}; starting the cluster again");
                    drop(cluster);
                    for i in 1..=size {
                        let _ = std::fs::remove_dir_all(dir.join(format!("n{i}")));
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every node accepts connections on its client port and, a moment later,
    /// still runs (a node that cannot bind one of its ports exits right after the others).
    fn wait_listening(&mut self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        let mut listening = vec![false; self.nodes.len()];
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                if !listening[i] {
                    let timeout = Duration::from_millis(100);
                    listening[i] = TcpStream::connect_timeout(&node.client, timeout).is_ok();
                }
            }
            if listening.iter().all(|l| *l) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(i) = (0..self.nodes.len()).find(|&i| self.exited(i)) {
                return Err(std::io::Error::other(format!(
                    "node {} exited at start (see nodes.log)",
                    self.nodes[i].id
                )));
            }
            if listening.iter().all(|l| *l) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("a node did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether node `i`'s process has ended on its own.
    fn exited(&mut self, i: usize) -> bool {
        self.nodes[i].child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    fn start_on_fresh_ports(
        binary: &Path,
        dir: &Path,
        size: usize,
        flags: &[String],
    ) -> std::io::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let nodes: Vec<Node> = (1..)
            .zip(crate::ports::node_ports(size))
            .map(|(id, ports)| Node {
                id,
                peer: ports.peer,
                client: ports.client,
                metrics: ports.metrics,
                child: None,
                paused: false,
                extra: flags.to_vec(),
            })
            .collect();
        let mut links = BTreeMap::new();
        for from in 0..size {
            for (to, node) in nodes.iter().enumerate() {
                if from != to {
                    links.insert((from, to), Proxy::start(node.peer)?);
                }
            }
        }
        let client_links =
            nodes.iter().map(|n| Proxy::start(n.client)).collect::<std::io::Result<Vec<_>>>()?;
        // Appended to: a start tried again keeps what the failed one logged.
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("nodes.log"))?;
        let mut cluster = Cluster {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            nodes,
            links,
            client_links,
            log,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    pub fn name(&self, i: usize) -> String {
        format!("n{}", self.nodes[i].id)
    }

    /// Client addresses of every node (through their client proxies).
    pub fn client_addresses(&self) -> Vec<String> {
        self.client_links.iter().map(|p| p.address.to_string()).collect()
    }

    /// Cuts clients off from node `i` (the node and its peers do not notice).
    pub fn cut_clients(&self, i: usize) {
        self.client_links[i].cut();
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--node-id").arg(node.id.to_string()).arg("--cluster-id").arg("1");
        cmd.arg("--data-dir").arg(self.data_dir(i));
        cmd.arg("--metrics-listen").arg(node.metrics.to_string());
        for (j, other) in self.nodes.iter().enumerate() {
            // This node reaches the others through its own proxies, and names the others'
            // client proxies in redirects (its own entry must be what it listens on).
            let (peer, client) = if j == i {
                (other.peer, other.client)
            } else {
                (self.links[&(i, j)].address, self.client_links[j].address)
            };
            cmd.arg("--peer").arg(format!("{}={},{}", other.id, peer, client));
        }
        cmd.args(&node.extra);
        cmd.stdout(Stdio::null()).stderr(self.log.try_clone()?);
        self.nodes[i].child = Some(cmd.spawn()?);
        self.nodes[i].paused = false;
        Ok(())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[i].paused = false;
    }

    /// kill -9, then the node's data directory deleted (a lost disk); `restart` brings it back
    /// blank and it rejoins. At most one blank node at a time: if another node has not
    /// finished rejoining (its `rejoining` marker is still there), this is a plain kill —
    /// two lost disks of three is more than any majority survives, and the cluster would wait
    /// for ever.
    pub fn wipe(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        let another_rejoining = (0..self.nodes.len())
            .any(|j| j != i && self.data_dir(j).join(tob_wal::REJOIN_MARKER).exists());
        if another_rejoining {
            use std::io::Write;
            let name = self.name(i);
            return writeln!(
                self.log,
                "tob-faults: wipe of {name} skipped (another node is rejoining)"
            );
        }
        match std::fs::remove_dir_all(self.data_dir(i)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", self.nodes[i].id))
    }

    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// Restarts node `i` with more flags (kept for later restarts too).
    pub fn restart_with(&mut self, i: usize, extra: Vec<String>) -> std::io::Result<()> {
        let flags = &mut self.nodes[i].extra;
        // A flag given again replaces its earlier value (clap refuses duplicates).
        for pair in extra.chunks(2) {
            if let Some(at) = flags.iter().position(|f| *f == pair[0]) {
                flags.drain(at..(at + 2).min(flags.len()));
            }
        }
        flags.extend(extra);
        self.restart(i)
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = &self.nodes[i].child {
            let _ =
                Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status();
        }
    }

    pub fn pause(&mut self, i: usize) {
        self.signal(i, "STOP");
        self.nodes[i].paused = self.nodes[i].child.is_some();
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, "CONT");
        self.nodes[i].paused = false;
    }

    /// Cuts every link from `from` to `to` (one way).
    pub fn cut(&self, from: usize, to: usize) {
        self.links[&(from, to)].cut();
    }

    /// Cuts node `i` off from every other node, both ways.
    pub fn isolate(&self, i: usize) {
        for j in 0..self.size() {
            if j != i {
                self.cut(i, j);
                self.cut(j, i);
            }
        }
    }

    /// Node `n` keeps every link; the other nodes split into two halves (in node order) that
    /// cannot reach each other — Jepsen's bridge.
    pub fn bridge(&self, n: usize) {
        let others: Vec<usize> = (0..self.size()).filter(|&i| i != n).collect();
        let (left, right) = others.split_at(others.len() / 2);
        for &a in left {
            for &b in right {
                self.cut(a, b);
                self.cut(b, a);
            }
        }
    }

    /// The node that is leader in the highest term among those that answer (asked directly,
    /// not through the proxies, with a short timeout), if any.
    pub fn leader(&self) -> Option<usize> {
        let addresses = self.nodes.iter().map(|n| n.client.to_string()).collect();
        let mut config = tob_client::ClientConfig::new(addresses, 1);
        config.connect_timeout = std::time::Duration::from_millis(200);
        config.request_timeout = std::time::Duration::from_millis(300);
        let mut client = tob_client::Client::new(config);
        (0..self.size())
            .filter(|&i| self.nodes[i].child.is_some() && !self.nodes[i].paused)
            .filter_map(|i| client.status_of(i).ok().map(|s| (s, i)))
            .filter(|(s, _)| s.role == "leader")
            .max_by_key(|(s, _)| s.term)
            .map(|(_, i)| i)
    }

    /// Splits the nodes into two sides that cannot talk.
    pub fn partition(&self, side: &[usize]) {
        for a in 0..self.size() {
            for b in 0..self.size() {
                if a != b && side.contains(&a) != side.contains(&b) {
                    self.cut(a, b);
                }
            }
        }
    }

    pub fn delay_all(&self, delay: std::time::Duration) {
        for proxy in self.links.values().chain(&self.client_links) {
            proxy.set_delay(delay);
        }
    }

    pub fn reset_all(&self) {
        for proxy in self.links.values().chain(&self.client_links) {
            proxy.reset();
        }
    }

    /// Heals every link, resumes paused nodes, restarts dead ones.
    pub fn heal(&mut self) -> std::io::Result<()> {
        for proxy in self.links.values().chain(&self.client_links) {
            proxy.heal();
        }
        for i in 0..self.size() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            if self.nodes[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.size() {
            self.resume(i);
            self.kill(i);
        }
    }
}
