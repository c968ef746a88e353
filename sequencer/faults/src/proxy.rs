//! A fault-injecting TCP proxy on loopback. Each proxy carries one direction of one link
//! (node i dials node j's peer port through the proxy for i→j), so cutting it is a one-way
//! partition. Controls take effect at once: `cut` drops every connection and refuses new ones
//! until `heal`; `set_delay` holds every chunk for that long ±50% (jitter) before forwarding
//! it — bytes stay in order, as TCP's would.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
struct Controls {
    cut: AtomicBool,
    delay_us: AtomicU64,
    /// Bumped to drop every open connection.
    generation: AtomicU64,
    stopped: AtomicBool,
}

pub struct Proxy {
    pub address: SocketAddr,
    controls: Arc<Controls>,
}

impl Proxy {
    /// Listens on an OS-chosen loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        assert!(target.ip().is_loopback(), "the harness only talks to 127.0.0.0/8");
        let listener = crate::ports::bind_fresh()?;
        let address = listener.local_addr()?;
        let controls = Arc::new(Controls::default());
        let c = controls.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if c.stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(inbound) = inbound else { continue };
                if c.cut.load(Ordering::Relaxed) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                else {
                    continue;
                };
                let generation = c.generation.load(Ordering::Relaxed);
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else { continue };
                    let c = c.clone();
                    std::thread::spawn(move || pump(from, to, &c, generation));
                }
            }
        });
        Ok(Proxy { address, controls })
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.controls.cut.store(true, Ordering::Relaxed);
        self.controls.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn heal(&self) {
        self.controls.cut.store(false, Ordering::Relaxed);
        self.controls.delay_us.store(0, Ordering::Relaxed);
    }

    /// Drops every open connection once (a reset); new ones are accepted.
    pub fn reset(&self) {
        self.controls.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.controls.delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.controls.stopped.store(true, Ordering::Relaxed);
        self.controls.generation.fetch_add(1, Ordering::Relaxed);
        let _ = TcpStream::connect(self.address); // wakes the accept loop
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, c: &Controls, generation: u64) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = to.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    // Jitter needs no replay: the timing of real processes is not reproducible anyway.
    let nanos = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos() as u64);
    let mut rng = tob_raft::SplitMix64::new(nanos ^ generation);
    loop {
        if c.generation.load(Ordering::Relaxed) != generation {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let delay = c.delay_us.load(Ordering::Relaxed);
                if delay > 0 {
                    let jittered = rng.range(delay / 2, delay + delay / 2 + 1);
                    std::thread::sleep(Duration::from_micros(jittered));
                }
                if c.generation.load(Ordering::Relaxed) != generation
                    || to.write_all(&buf[..n]).is_err()
                {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
