//! The write-ahead log on a thread of its own (a follower writes on the node's thread, see
//! [`WalWriter::persist_here`]). The node hands it one `Ready`'s durable parts
//! at a time and carries on on the I/O thread (taking requests, stepping peer messages, which
//! all batch into the next `Ready`); the writer appends, fsyncs, and reports back. Keeping the
//! node on the same thread as its connections and peer links, with only the fsync elsewhere,
//! saves two thread hand-offs per request on the leader and two per Append on a follower —
//! each a futex wake-up and a context switch.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use actix::prelude::*;
use tob_raft::{Entry, HardState, Snapshot};
use tob_wal::Wal;

use crate::metrics::Metrics;

/// A `Ready`'s durable parts are on disk (or the log failed and the node must stop).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Persisted {
    /// Handed back so the node can restore it once it is durable.
    pub snapshot: Option<Snapshot>,
    pub result: Result<(), String>,
}

enum Job {
    Persist {
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    },
    /// Drop segments covered by a durable snapshot at this index.
    ForgetCovered(u64),
}

/// The handle the node keeps; jobs run in the order given.
pub struct WalWriter {
    jobs: mpsc::Sender<Job>,
    /// Shared with the writer thread so that [`WalWriter::persist_here`] can write on the
    /// caller's thread. Never contended: the node has one Ready in flight at a time.
    wal: Arc<Mutex<Wal>>,
    metrics: Arc<Metrics>,
}

/// One Ready's durable parts: appended and fsynced, with the metrics recorded.
fn persist(
    wal: &Mutex<Wal>,
    metrics: &Metrics,
    snapshot: Option<&Snapshot>,
    entries: &[Entry],
    hard_state: Option<HardState>,
) -> Result<(), String> {
    let started = Instant::now();
    let mut wal = wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = wal
        .append(snapshot, entries, hard_state)
        .and_then(|()| wal.sync())
        .map_err(|e| e.to_string());
    metrics.fsync_latency.observe_duration(started.elapsed());
    metrics.fsyncs.fetch_add(1, Relaxed);
    metrics.batch_entries.observe(entries.len() as f64);
    result
}

impl WalWriter {
    /// Starts the writer thread; it ends when the handle is dropped.
    pub fn spawn(wal: Wal, node: Recipient<Persisted>, metrics: Arc<Metrics>) -> WalWriter {
        let (jobs, queue) = mpsc::channel::<Job>();
        let wal = Arc::new(Mutex::new(wal));
        let (thread_wal, thread_metrics) = (wal.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                for job in queue {
                    match job {
                        Job::Persist { snapshot, entries, hard_state } => {
                            let result = persist(
                                &thread_wal,
                                &thread_metrics,
                                snapshot.as_ref(),
                                &entries,
                                hard_state,
                            );
                            node.do_send(Persisted { snapshot, result });
                        }
                        Job::ForgetCovered(index) => {
                            let mut wal =
                                thread_wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                            if let Err(e) = wal.forget_covered(index) {
                                tracing::error!(error = %e, "log compaction failed; stopping");
                                std::process::exit(70);
                            }
                        }
                    }
                }
            })
            .expect("spawning the WAL writer thread");
        WalWriter { jobs, wal, metrics }
    }

    /// Writes and fsyncs on the calling thread. Only while no Ready is with the writer thread
    /// (the node has one in flight at a time), so writes stay in order. For a follower: its
    /// acknowledgement waits for the fsync anyway, and writing here saves the two thread
    /// wake-ups of a hand-over on the leader's commit path.
    pub fn persist_here(
        &self,
        entries: &[Entry],
        hard_state: Option<HardState>,
    ) -> Result<(), String> {
        persist(&self.wal, &self.metrics, None, entries, hard_state)
    }

    /// Writes and fsyncs; [`Persisted`] follows.
    pub fn persist(
        &self,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    ) {
        self.send(Job::Persist { snapshot, entries, hard_state });
    }

    /// Deletes the rejoin marker (on the calling thread: once in a node's life, and no Ready
    /// is with the writer thread when the one recording the rejoin has been persisted).
    pub fn forget_rejoin(&self) {
        let mut wal = self.wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match wal.forget_rejoin() {
            Ok(()) => tracing::info!("rejoined: this node votes again"),
            // Harmless: the node rejoins once more at its next start.
            Err(e) => tracing::warn!(error = %e, "could not delete the rejoin marker"),
        }
    }

    pub fn forget_covered(&self, index: u64) {
        self.send(Job::ForgetCovered(index));
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            // The writer thread is gone: it stopped the process, or is about to.
            tracing::error!("write-ahead log writer stopped; stopping");
            std::process::exit(70);
        }
    }
}
