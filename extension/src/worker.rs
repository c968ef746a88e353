//! The background worker, one per PostgreSQL instance (needs `shared_preload_libraries`).
//!
//! It keeps the instance's session with the cluster alive (pending claims of an instance that
//! went silent expire with it), tells the cluster the fate of finished transactions (queued by
//! their COMMIT/ABORT callbacks), and reconciles: every in-flight holder of this instance in
//! the cluster whose transaction `pg_xact_status` reports committed or aborted is settled that
//! way. PostgreSQL's own commit log is the decision record, so a crash between `Prepare` and
//! the commit record, a lost queue entry, or `COMMIT PREPARED` from another session all end
//! the same way: the claim matches the transaction's fate. A holder from an earlier start of
//! the server whose id was handed out again since is aborted without asking (see `boots`).

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use tob_client::{Client, ClientConfig, ClientError};
use tob_proto::SessionId;

use tob_boots::{Fate, TransactionHolder};

use crate::backend::{holder_of, holder_prefix, transaction_of_holder};
use crate::{guc, shmem};

/// How often the reconciler walks this instance's in-flight holders.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Most in-flight holders one reconcile sorts and settles (the rest wait for the next round).
const RECONCILE_HOLDERS_MAX: usize = 100_000;

pub fn register() {
    BackgroundWorkerBuilder::new("tob session and reconciler")
        .set_type("tob")
        .set_library("tob")
        .set_function("tob_worker_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

struct Worker {
    client: Option<(String, Client)>,
    session: Option<SessionId>,
    last_keepalive: Instant,
    last_reconcile: Option<Instant>,
    /// When the transactions queued since the last settle are due to be settled.
    settle_due: Option<Instant>,
    /// Every transaction that ended before the queued ones is settled: false at start, after
    /// a settle failed and after the queue overflowed. Until a reconcile completes, the queue
    /// is not settled from, so that one transaction's messages never enter the order after
    /// those of a transaction that began once it had committed (see `round`).
    in_sync: bool,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tob_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&guc::worker_database()), None);
    shmem::set_worker_latch(unsafe { pg_sys::MyLatch });
    shmem::set_session(0);
    log!("tob worker started; holder prefix {}", holder_prefix());
    let mut worker = Worker {
        client: None,
        session: None,
        last_keepalive: Instant::now(),
        last_reconcile: None,
        settle_due: None,
        in_sync: false,
    };
    while BackgroundWorker::wait_latch(Some(worker.next_wait())) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        worker.round();
    }
    shmem::set_worker_latch(std::ptr::null_mut());
    shmem::set_session(0);
}

impl Worker {
    /// How long to sleep unless woken: until queued transactions are due, at most 100 ms.
    fn next_wait(&self) -> Duration {
        let idle = Duration::from_millis(100);
        self.settle_due.map_or(idle, |due| due.saturating_duration_since(Instant::now()).min(idle))
    }

    fn round(&mut self) {
        if !self.ensure_client() {
            return;
        }
        self.keep_session();
        if shmem::take_overflowed() {
            self.in_sync = false;
        }
        if !self.in_sync {
            // Some ended transactions are known only to the commit log (a restart, a failed
            // settle, a full queue). Settled from the queue now, a later transaction could go
            // before them; so the queue is dropped — what it held is in flight in the cluster
            // and ended, so the reconciler settles it too — and everything is reconciled in
            // the order the transactions began.
            drop(shmem::drain_settles());
            self.settle_due = None;
            if self.reconcile_due() {
                self.in_sync = self.reconcile();
            }
            return;
        }
        self.settle_queued();
        if self.in_sync && self.reconcile_due() {
            self.in_sync = self.reconcile();
        }
    }

    /// Whether a reconcile is due: one a second (a failed one is tried again no sooner, so a
    /// cluster that refuses is not asked every round), and at once after a start or a failed
    /// settle.
    fn reconcile_due(&self) -> bool {
        self.last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_EVERY)
    }

    fn ensure_client(&mut self) -> bool {
        let Some(cluster) = guc::cluster() else { return false };
        if self.client.as_ref().is_none_or(|(c, _)| *c != cluster) {
            let nodes = cluster.split(',').map(|n| n.trim().to_owned()).collect();
            let mut client = Client::new(ClientConfig::new(nodes, guc::CLUSTER_ID.get() as u64));
            client.set_interrupt(BackgroundWorker::sigterm_received);
            self.client = Some((cluster, client));
        }
        let client = &mut self.client.as_mut().expect("set above").1;
        let config = client.config_mut();
        config.connect_timeout = guc::connect_timeout();
        // Never wait longer than a third of the lease on one call: keep-alives must get through.
        config.request_timeout = guc::request_timeout().min(guc::session_ttl() / 3);
        true
    }

    fn client(&mut self) -> &mut Client {
        &mut self.client.as_mut().expect("ensured").1
    }

    fn keep_session(&mut self) {
        let ttl = guc::session_ttl();
        match self.session {
            None => match self.client().open_session(ttl) {
                Ok(session) => {
                    log!("tob: instance session {} opened (ttl {} ms)", session.0, ttl.as_millis());
                    self.session = Some(session);
                    self.last_keepalive = Instant::now();
                    shmem::set_session(session.0);
                }
                Err(e) => warn_once(&format!("tob: cannot open a session: {e}")),
            },
            Some(session) if self.last_keepalive.elapsed() >= ttl / 4 => {
                match self.client().keep_alive(session) {
                    Ok(()) => self.last_keepalive = Instant::now(),
                    Err(ClientError::Refused {
                        code: tob_proto::ErrorCode::UnknownSession,
                        ..
                    }) => {
                        warning!(
                            "tob: instance session {} expired; its pending claims were released",
                            session.0
                        );
                        self.session = None;
                        shmem::set_session(0);
                    }
                    Err(e) => warn_once(&format!("tob: keep-alive failed: {e}")),
                }
            }
            Some(_) => {}
        }
    }

    /// Settles the queued transactions once the first of them has waited `tob.settle_delay`
    /// (or a batch is full), so that one request settles many: each is a write to the cluster.
    fn settle_queued(&mut self) {
        let waiting = shmem::queued_settles();
        if waiting == 0 {
            self.settle_due = None;
            return;
        }
        let due = *self.settle_due.get_or_insert_with(|| Instant::now() + guc::settle_delay());
        if Instant::now() < due && waiting < shmem::SETTLE_BATCH_MAX {
            return;
        }
        self.settle_due = None;
        self.settle_entries(&shmem::drain_settles());
    }

    /// Settles drained queue entries in their order, the order of their commits. False if the
    /// cluster refused or did not answer: the worker is then out of sync.
    fn settle_entries(&mut self, queued: &[shmem::SettleEntry]) -> bool {
        if queued.is_empty() {
            return true;
        }
        flush_commits_up_to(queued.iter().map(|e| e.commit_lsn).max().unwrap_or(0));
        for batch in queued.chunks(shmem::SETTLE_BATCH_MAX) {
            let (committed, aborted): (Vec<&shmem::SettleEntry>, Vec<&shmem::SettleEntry>) =
                batch.iter().partition(|e| e.committed);
            let committed = committed.iter().map(|e| holder_of(e.full_xid)).collect();
            let aborted = aborted.iter().map(|e| holder_of(e.full_xid)).collect();
            if let Err(e) = self.client().settle(committed, aborted) {
                // Still in flight in the cluster: the reconciler settles them (and those
                // after them in the queue) before anything else.
                warn_once(&format!("tob: settling finished transactions failed: {e}"));
                self.in_sync = false;
                self.last_reconcile = None;
                return false;
            }
        }
        true
    }

    /// Settles every in-flight holder of this instance whose transaction has ended, in the
    /// order the transactions began (start, then transaction id): the order their staged
    /// messages enter the total order in. Returns whether it got through all of them.
    fn reconcile(&mut self) -> bool {
        self.last_reconcile = Some(Instant::now());
        let prefix = holder_prefix();
        let current = shmem::boot();
        let registry = match crate::boots::read() {
            Ok(registry) => registry,
            Err(e) => {
                warn_once(&format!("tob: reconciler cannot read the starts of this server: {e}"));
                return false;
            }
        };
        // All of them first: the cluster lists holders in the order of their text, in which
        // transaction 1000 comes before 999. In one read whenever they fit (see
        // `collect_pages`): read page by page, a holder could be missed while younger ones
        // were listed, and settling those would put their messages before its own.
        let listed = match self.client().all_in_flight_holders(&prefix, RECONCILE_HOLDERS_MAX) {
            Ok(listed) => listed,
            Err(e) => {
                warn_once(&format!("tob: reconciler cannot list in-flight claims: {e}"));
                return false;
            }
        };
        if listed.len() >= RECONCILE_HOLDERS_MAX {
            warn_once(&format!(
                "tob: over {RECONCILE_HOLDERS_MAX} transactions in flight; reconciling the first of them"
            ));
        }
        let mut holders: Vec<(TransactionHolder, String)> =
            listed.into_iter().filter_map(|h| Some((transaction_of_holder(&h)?, h))).collect();
        holders.sort();
        for chunk in holders.chunks(1000) {
            if !self.settle_ended(&registry, current, chunk) {
                return false;
            }
        }
        true
    }

    /// Settles those of `holders` (in order) whose transaction has ended.
    fn settle_ended(
        &mut self,
        registry: &tob_boots::Registry,
        current: u64,
        holders: &[(TransactionHolder, String)],
    ) -> bool {
        let mut committed = Vec::new();
        let mut aborted = Vec::new();
        let mut ask = Vec::new();
        for (transaction, holder) in holders {
            let fate = match transaction.boot {
                Some(boot) => registry.fate(current, boot, transaction.full_xid),
                // Written before starts were recorded, when every id was flushed to the WAL
                // before its claim: never reused.
                None => Fate::AskCommitLog,
            };
            match fate {
                Fate::AskCommitLog => ask.push((holder.clone(), transaction.full_xid)),
                Fate::Aborted => {
                    debug1!("tob: reconciler: {holder} is past the start after its own: aborted");
                    aborted.push(holder.clone())
                }
                Fate::Unknown => warn_once(&format!(
                    "tob: {holder} names a start of this server that {} does not record; its claims stay in flight",
                    crate::boots::FILE_NAME
                )),
            }
        }
        let xids: Vec<u64> = ask.iter().map(|(_, xid)| *xid).collect();
        for ((holder, xid), status) in ask.into_iter().zip(transaction_statuses(&xids)) {
            debug1!("tob: reconciler: {holder} is {status:?}");
            match status.as_deref() {
                Some("committed") => committed.push(holder),
                Some("aborted") => aborted.push(holder),
                Some(_) => {} // in progress, or PREPAREd and waiting for COMMIT PREPARED
                None => warning!(
                    "tob: transaction {xid} is too old for pg_xact_status; its claims stay in flight"
                ),
            }
        }
        if self.in_sync {
            // The queue first, in commit order, then what only the commit log knows of (a
            // PREPAREd transaction, say). A queued transaction's entry was queued before any
            // transaction that began after it had started, so this keeps commit order whether
            // or not the listing has every holder. Settled from the listing in transaction-id
            // order instead, the queued ones kept their order only if the listing had them
            // all: in a fault run a listing read in two pages lacked a holder in flight that
            // had committed before three listed ones began (see `collect_pages`), and those
            // three's messages entered the total order before its own.
            let queued = shmem::drain_settles();
            self.settle_due = None;
            if !self.settle_entries(&queued) {
                return false;
            }
            let settled: std::collections::HashSet<String> =
                queued.iter().map(|e| holder_of(e.full_xid)).collect();
            committed.retain(|h| !settled.contains(h));
            aborted.retain(|h| !settled.contains(h));
        }
        if !committed.is_empty() {
            // Their commit records were written before pg_xact_status saw them committed.
            flush_commits_up_to(unsafe { pg_sys::GetXLogInsertRecPtr() });
        }
        if (!committed.is_empty() || !aborted.is_empty())
            && let Err(e) = self.client().settle(committed, aborted)
        {
            warn_once(&format!("tob: reconciler could not settle: {e}"));
            return false;
        }
        true
    }
}

/// Makes the WAL durable up to `lsn` before committed transactions are settled. A transaction
/// committed with `synchronous_commit = off` is in the commit log (pg_xact_status says
/// committed) before its commit record is on disk, and a crash then loses it: settled first,
/// its name would stay held with no row and its messages would stay in the total order.
/// Usually a no-op (tob's commits flush themselves, and the WAL writer flushes the others
/// within three `wal_writer_delay`s); otherwise the worker waits for the flush as a committing
/// backend would.
fn flush_commits_up_to(lsn: u64) {
    if lsn != 0 {
        unsafe { pg_sys::XLogFlush(lsn) };
    }
}

/// `pg_xact_status` of each full transaction id, in one query: one parse and plan per page
/// of holders rather than per holder (at a few thousand claiming transactions a second, one
/// query each cost the worker a noticeable share of the CPU). If the query fails (an id
/// PostgreSQL refuses, e.g. one in the future), each id is asked on its own.
fn transaction_statuses(full_xids: &[u64]) -> Vec<Option<String>> {
    if full_xids.is_empty() {
        return Vec::new();
    }
    let list = full_xids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let joined = BackgroundWorker::transaction(|| {
        Spi::get_one::<String>(&format!(
            "SELECT string_agg(coalesce(pg_xact_status(x::text::xid8)::text, ''), ',' ORDER BY n)
             FROM unnest('{{{list}}}'::bigint[]) WITH ORDINALITY AS t(x, n)"
        ))
        .ok()
        .flatten()
    });
    match joined {
        Some(joined) if joined.split(',').count() == full_xids.len() => joined
            .split(',')
            .map(|status| (!status.is_empty()).then(|| status.to_owned()))
            .collect(),
        _ => full_xids.iter().map(|&xid| transaction_status(xid)).collect(),
    }
}

/// `pg_xact_status` of a full transaction id: committed, aborted, in progress, or None when
/// it is too old to know.
fn transaction_status(full_xid: u64) -> Option<String> {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<String>(&format!("SELECT pg_xact_status('{full_xid}'::xid8)::text"))
            .ok()
            .flatten()
    })
}

/// Logs a warning, but not the same one over and over while the cluster is down.
fn warn_once(message: &str) {
    thread_local! {
        static LAST: std::cell::RefCell<(String, Option<Instant>)> =
            const { std::cell::RefCell::new((String::new(), None)) };
    }
    LAST.with(|cell| {
        let mut last = cell.borrow_mut();
        let repeat =
            last.0 == message && last.1.is_some_and(|t| t.elapsed() < Duration::from_secs(30));
        if !repeat {
            warning!("{message}");
            *last = (message.to_owned(), Some(Instant::now()));
        }
    });
}
