//! Free loopback ports for the servers a test starts, never the same port twice.
//!
//! Binding port 0 and closing the socket again (so that a child process can bind the port)
//! leaves the port free, and the kernel may well hand it out again to the next bind of port
//! 0: a cluster once got the same client port for two of its nodes, the third node could not
//! start and the leader-kill test found no majority. So every port handed out here is
//! remembered for the life of the process and never handed out again, also not to a proxy
//! that binds its own listener through [`bind_fresh`].

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// Ports handed out by this process so far.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A listener on 127.0.0.1 whose port this process has not handed out before.
pub fn bind_fresh() -> std::io::Result<TcpListener> {
    // Listeners refused because their port was taken are held until the end so that the
    // kernel cannot offer the same port again on the next try.
    let mut refused = Vec::new();
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poison| poison.into_inner());
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if handed_out.insert(port) {
            return Ok(listener);
        }
        refused.push(listener);
    }
    Err(std::io::Error::other("no loopback port that was not handed out before"))
}

/// `n` distinct free loopback addresses for servers to bind. All are held open until all are
/// found, then closed so that the servers can bind them.
pub fn free_ports(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| bind_fresh().expect("a free loopback port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("a bound listener has an address")).collect()
}

/// The three addresses a node listens on.
pub struct NodePorts {
    pub peer: SocketAddr,
    pub client: SocketAddr,
    /// Given explicitly, never left to the node: a node that binds any free port for its
    /// metrics can take the peer or client port of a node that is down, which then cannot
    /// start again (seen in a fault run).
    pub metrics: SocketAddr,
}

/// Distinct free loopback addresses for `nodes` nodes.
pub fn node_ports(nodes: usize) -> Vec<NodePorts> {
    free_ports(3 * nodes)
        .chunks(3)
        .map(|p| NodePorts { peer: p[0], client: p[1], metrics: p[2] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_port_is_handed_out_twice() {
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            for address in free_ports(4) {
                assert!(address.ip().is_loopback());
                assert!(seen.insert(address.port()), "port {} handed out twice", address.port());
            }
        }
        let proxy = bind_fresh().unwrap();
        assert!(!seen.contains(&proxy.local_addr().unwrap().port()));
    }
}
