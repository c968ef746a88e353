//! What backends and the background worker share, when tob is in `shared_preload_libraries`:
//! the instance's session with the cluster, and the queue of transactions to settle.
//!
//! The queue is an optimisation, not the record: a transaction's claims are in flight in the
//! cluster under its holder id, and the worker's reconciler finds and settles any holder whose
//! queue entry was lost (queue full, backend crash, instance crash) from `pg_xact_status`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{PgAtomic, PgLwLock, pg_shmem_init};

pub const SETTLE_QUEUE_CAPACITY: usize = 8192;
/// Holders settled per command; a queue this long is settled without waiting for the delay.
pub const SETTLE_BATCH_MAX: usize = 1000;

/// A transaction whose fate is known, waiting for the worker to tell the cluster.
#[derive(Copy, Clone, Default, Debug)]
pub struct SettleEntry {
    pub full_xid: u64,
    pub committed: bool,
    /// End of the commit record (0 for an abort): the worker flushes the WAL up to it before
    /// settling, so that no claim or message outlives a commit that a crash could still undo.
    pub commit_lsn: u64,
}

#[derive(Copy, Clone)]
pub struct SettleQueue {
    pub len: usize,
    pub entries: [SettleEntry; SETTLE_QUEUE_CAPACITY],
}

impl Default for SettleQueue {
    fn default() -> Self {
        SettleQueue { len: 0, entries: [SettleEntry::default(); SETTLE_QUEUE_CAPACITY] }
    }
}

unsafe impl PGRXSharedMemory for SettleQueue {}

static QUEUE: PgLwLock<SettleQueue> = unsafe { PgLwLock::new(c"tob_settle_queue") };
/// The instance's session id in the cluster; 0 while the worker has none.
static SESSION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"tob_session") };
/// The worker's latch (a pointer into shared memory, valid in every process), 0 if none.
static WORKER_LATCH: PgAtomic<AtomicUsize> = unsafe { PgAtomic::new(c"tob_worker_latch") };
/// This start's number in the boot registry (`$PGDATA/tob_boots`); 0 until recorded.
static BOOT: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"tob_boot") };
/// The queue's length, kept beside it (written under its lock) so that the worker's check
/// every round takes no lock: a worker stopped or descheduled while holding the queue's lock
/// would hold up every committing backend.
static QUEUED: PgAtomic<AtomicUsize> = unsafe { PgAtomic::new(c"tob_settle_queued") };
/// Set when a queue entry had to be dropped: the worker then reconciles at once.
static OVERFLOWED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"tob_queue_overflowed") };

static mut ATTACHED: bool = false;

/// Requests the shared memory; only valid while loading from `shared_preload_libraries`.
pub fn init() {
    pg_shmem_init!(QUEUE);
    pg_shmem_init!(SESSION);
    pg_shmem_init!(WORKER_LATCH);
    pg_shmem_init!(OVERFLOWED);
    pg_shmem_init!(QUEUED);
    pg_shmem_init!(BOOT);
    unsafe { ATTACHED = true };
}

/// Whether this process has the shared state (tob was preloaded).
pub fn available() -> bool {
    unsafe { ATTACHED }
}

pub fn session() -> u64 {
    SESSION.get().load(Ordering::Acquire)
}

pub fn set_session(session: u64) {
    SESSION.get().store(session, Ordering::Release);
}

/// This start of the server (see `boots`); 0 if it was not recorded.
pub fn boot() -> u64 {
    BOOT.get().load(Ordering::Acquire)
}

pub fn set_boot(boot: u64) {
    BOOT.get().store(boot, Ordering::Release);
}

pub fn set_worker_latch(latch: *mut pg_sys::Latch) {
    WORKER_LATCH.get().store(latch as usize, Ordering::Release);
}

pub fn wake_worker() {
    let latch = WORKER_LATCH.get().load(Ordering::Acquire);
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Queues a settled transaction; never raises (called from COMMIT and ABORT callbacks).
/// Wakes the worker only for the first entry of a batch (it then gathers for
/// `tob.settle_delay`) and when a batch is full — not once per transaction.
pub fn push_settle(entry: SettleEntry) {
    let wake = {
        let mut queue = QUEUE.exclusive();
        if queue.len < SETTLE_QUEUE_CAPACITY {
            let at = queue.len;
            queue.entries[at] = entry;
            queue.len += 1;
            QUEUED.get().store(queue.len, Ordering::Release);
            queue.len == 1 || queue.len.is_multiple_of(SETTLE_BATCH_MAX)
        } else {
            OVERFLOWED.get().store(true, Ordering::Release);
            true
        }
    };
    if wake {
        wake_worker();
    }
}

/// How many settled transactions wait in the queue.
pub fn queued_settles() -> usize {
    QUEUED.get().load(Ordering::Acquire)
}

/// Takes everything queued.
pub fn drain_settles() -> Vec<SettleEntry> {
    if queued_settles() == 0 {
        return Vec::new();
    }
    let mut queue = QUEUE.exclusive();
    let taken = queue.entries[..queue.len].to_vec();
    queue.len = 0;
    QUEUED.get().store(0, Ordering::Release);
    taken
}

/// Whether an entry was dropped since the last call (and clears the flag).
pub fn take_overflowed() -> bool {
    OVERFLOWED.get().swap(false, Ordering::AcqRel)
}
