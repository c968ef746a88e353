//! This backend's connection to the cluster and who it is in the cluster's eyes.
//!
//! One blocking client per backend (PostgreSQL backends are single-threaded), created on first
//! use from `tob.cluster`, re-created when that setting changes. Waits on the cluster wake
//! every few milliseconds to look at `InterruptPending`, so `pg_cancel_backend` and
//! `statement_timeout` stop them promptly (the client returns `Interrupted`, then
//! [`interrupted`] lets PostgreSQL raise the cancel itself).

use std::cell::RefCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgrx::prelude::*;
use tob_boots::TransactionHolder;
use tob_client::{Client, ClientConfig};

use crate::error::TobError;
use crate::guc;

thread_local! {
    static CLIENT: RefCell<Option<(String, i32, Client)>> = const { RefCell::new(None) };
}

/// A session-bound command's outcome, with the cluster's "unknown session" kept as an outcome
/// rather than an error, so the caller can wait for the new session the background worker
/// opens. (The client reports an `Outcome::Error` as an error: the callers' arms for it never
/// ran, and a claim or lock after the instance session expired failed with XX000.)
pub fn session_outcome(
    result: Result<tob_proto::Outcome, tob_client::ClientError>,
) -> Result<tob_proto::Outcome, tob_client::ClientError> {
    match result {
        Err(tob_client::ClientError::Refused {
            code: code @ tob_proto::ErrorCode::UnknownSession,
            ..
        }) => Ok(tob_proto::Outcome::Error { code }),
        other => other,
    }
}

/// Runs `f` with this backend's client, configured from the current settings.
pub fn with_client<T>(f: impl FnOnce(&mut Client) -> Result<T, TobError>) -> T {
    let Some(cluster) = guc::cluster() else {
        TobError::NotConfigured(
            "tob.cluster is not set (the sequencer nodes' client addresses, comma-separated)"
                .into(),
        )
        .raise()
    };
    let cluster_id = guc::CLUSTER_ID.get();
    let result = CLIENT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(c, id, _)| *c != cluster || *id != cluster_id) {
            let nodes = cluster.split(',').map(|n| n.trim().to_owned()).collect();
            let mut client = Client::new(ClientConfig::new(nodes, cluster_id as u64));
            client.set_interrupt(interrupt_pending);
            *slot = Some((cluster.clone(), cluster_id, client));
        }
        let (_, _, client) = slot.as_mut().expect("set above");
        let config = client.config_mut();
        config.connect_timeout = guc::connect_timeout();
        config.request_timeout = guc::request_timeout();
        config.poll_interval = Duration::from_millis(10);
        f(client)
    });
    match result {
        Ok(value) => value,
        Err(TobError::Cancelled) => interrupted(),
        Err(error) => error.raise(),
    }
}

/// Runs `f` with this backend's client if one can be had, without ever raising: for abort
/// processing and exit hooks. Returns whether `f` succeeded.
pub fn try_with_client(f: impl FnOnce(&mut Client) -> Result<(), tob_client::ClientError>) -> bool {
    CLIENT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => slot.as_mut().is_some_and(|(_, _, client)| f(client).is_ok()),
        Err(_) => false,
    })
}

/// Set while the backend exits: a pending terminate must not cut short the clean-up calls.
static EXITING: AtomicBool = AtomicBool::new(false);

pub fn set_exiting() {
    EXITING.store(true, Ordering::Relaxed);
}

/// The client's interrupt hook: true when PostgreSQL has an interrupt to act on.
pub fn interrupt_pending() -> bool {
    !EXITING.load(Ordering::Relaxed)
        && unsafe { std::ptr::read_volatile(&raw const pg_sys::InterruptPending) != 0 }
}

/// Lets PostgreSQL act on the pending interrupt (raising 57014 for a cancel or timeout); if
/// it was some other kind of interrupt, reports the abandoned wait as cancelled.
pub fn interrupted() -> ! {
    pgrx::check_for_interrupts!();
    TobError::Cancelled.raise()
}

/// Sleeps on this backend's latch for `duration`, acting on interrupts (the latch may be set
/// for other reasons: keep waiting until the time is up).
pub fn sleep(duration: Duration) {
    let until = std::time::Instant::now() + duration;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        unsafe {
            let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                events as i32,
                left.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

/// Backoff while a key is pending in another transaction (or locked by another backend),
/// bounded by `tob.claim_wait` and `tob.claim_wait_timeout`.
pub struct Waiting {
    started: std::time::Instant,
    pause: Duration,
}

impl Waiting {
    pub fn new() -> Waiting {
        Waiting { started: std::time::Instant::now(), pause: Duration::from_millis(2) }
    }

    /// Sleeps a little (2 ms, doubling up to 50 ms), or raises 55P03 when this session does
    /// not wait or has waited long enough. `releasing`: what is waited for is another
    /// transaction's release of the key, not its claim.
    pub fn wait_or_raise(
        &mut self,
        namespace: &str,
        key: &str,
        current: tob_proto::OwnerInfo,
        releasing: bool,
    ) {
        let nowait = crate::guc::CLAIM_WAIT.get() == crate::guc::ClaimWait::Nowait;
        if nowait || self.started.elapsed() >= crate::guc::claim_wait_timeout() {
            TobError::WouldWait {
                namespace: namespace.into(),
                key: key.into(),
                current,
                waited: !nowait,
                releasing,
            }
            .raise()
        }
        sleep(self.pause);
        self.pause = (self.pause * 2).min(Duration::from_millis(50));
    }
}

/// This PostgreSQL instance's identity: its system identifier (from `initdb`).
pub fn system_identifier() -> u64 {
    unsafe { pg_sys::GetSystemIdentifier() }
}

/// The prefix of every transaction holder id of this instance.
pub fn holder_prefix() -> String {
    format!("pg:{}:", system_identifier())
}

/// The holder id of the transaction with this full transaction id in this start of the server
/// (`pg:<system id>:<boot>:<xid>`; the boot tells a reused id apart after a crash, see
/// `boots`).
pub fn holder_of(full_xid: u64) -> String {
    let boot = crate::shmem::boot();
    format!("pg:{}:{}", system_identifier(), TransactionHolder::render(boot, full_xid))
}

/// The start and transaction id a holder id names, if it is one of this instance's.
pub fn transaction_of_holder(holder: &str) -> Option<TransactionHolder> {
    TransactionHolder::parse(holder.strip_prefix(&holder_prefix())?)
}

/// The default owner of a claim: this instance (its `cluster_name`, or its system identifier)
/// and database, so two servers with a database of the same name do not share an owner.
pub fn default_owner() -> String {
    thread_local! {
        // Both parts are fixed for a backend's life (cluster_name needs a restart to change);
        // computed once instead of a catalog lookup per claimed row.
        static DEFAULT_OWNER: std::cell::OnceCell<String> = const { std::cell::OnceCell::new() };
    }
    DEFAULT_OWNER.with(|owner| owner.get_or_init(compute_default_owner).clone())
}

fn compute_default_owner() -> String {
    let instance = unsafe {
        let name = pg_sys::cluster_name;
        if name.is_null() || *name == 0 {
            system_identifier().to_string()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    };
    let database = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            "?".to_owned()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    };
    format!("{instance}/{database}")
}

/// The holder of this backend's session-held locks: stable for the backend's life, unique
/// across backends and restarts (pid plus start time).
pub fn backend_holder() -> String {
    let started = unsafe { pg_sys::MyStartTimestamp };
    format!("pgb:{}:{}:{}", system_identifier(), unsafe { pg_sys::MyProcPid }, started)
}
