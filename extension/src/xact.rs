//! Claims inside PostgreSQL transactions (DESIGN.md §4).
//!
//! A claim is `Pending` in the cluster under the holder id `pg:<system id>:<boot>:<full xid>`. At
//! `PRE_COMMIT` (or `PRE_PREPARE`) the transaction prepares all its live claims: if any was
//! lost, the commit fails with 40001. After `COMMIT` or `ABORT` the transaction is queued for
//! the background worker, which settles it in the cluster (prepared claims become held,
//! scheduled releases happen, or everything is undone) — the callbacks themselves never talk
//! to the network and never raise. A rolled-back savepoint undoes its own claims and releases.
//! Messages for `tob_append_on_commit` wait in the backend and are staged under the same
//! holder at `PRE_COMMIT`; the same settle appends or drops them.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use tob_client::claim_key;
use tob_proto::{
    ClaimKey, ClaimKind, ClaimState, Command, FencingToken, Limits, Outcome, SessionId,
    StagedMessage,
};

use crate::backend::{self, with_client};
use crate::error::TobError;
use crate::{guc, shmem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    /// A pending claim of this transaction.
    Claimed,
    /// A release scheduled for this transaction's commit.
    Releasing,
    /// The key claimed again after this transaction scheduled its release (a row deleted and
    /// written again): the release is withdrawn, the claim stays as it was.
    Kept,
}

/// A row version written by this transaction: its table and its place in it (`ctid`). Two
/// triggers firing for one row (declared twice, or on a partition and its parent) name the
/// same one; within a transaction no other row can take the place of one it still has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowId {
    pub relation: u32,
    pub block: u32,
    pub offset: u16,
}

#[derive(Debug)]
struct Op {
    key: ClaimKey,
    owner: String,
    kind: OpKind,
    /// Claimed prepared at once (outside a transaction block): no `Prepare` needed.
    prepared: bool,
    /// The row a `tob_unique` trigger claimed the key for (or withdrew its release for), or
    /// None for a `tob_claim` call: another row of this transaction may not have the key.
    row: Option<RowId>,
    /// The (sub)transaction that did it; moves to the parent when a savepoint is released.
    subxact: pg_sys::SubTransactionId,
}

/// A message for the total order once this transaction commits (`tob_append_on_commit`).
#[derive(Debug)]
struct Outgoing {
    message: StagedMessage,
    /// The (sub)transaction that wrote it; moves to the parent when a savepoint is released.
    subxact: pg_sys::SubTransactionId,
}

#[derive(Debug)]
struct Txn {
    full_xid: u64,
    holder: String,
    ops: Vec<Op>,
    /// Kept here until `PRE_COMMIT` stages them in the cluster (a rolled-back savepoint drops
    /// its own without a round trip).
    outgoing: Vec<Outgoing>,
    outgoing_bytes: usize,
    /// Keys whose scheduled release a rolled-back savepoint could not withdraw or schedule
    /// again: set right (as the live ops say) before commit, where failing can still abort.
    releases_owed: Vec<ClaimKey>,
    /// For each key a live `Releasing` or `Kept` op names: the owner whose release the last
    /// of them wants scheduled, or None (withdrawn). What `ops` say, kept for a lookup per
    /// claim instead of a scan (a bulk INSERT claims many keys in one transaction).
    releases: BTreeMap<ClaimKey, Option<String>>,
    /// Keys a row written by this transaction has, and which row, as the live ops say: a
    /// `tob_unique` claim of one of them for another row is a second row with the value,
    /// refused as a unique index refuses it. The cluster cannot tell: it grants a holder's
    /// claim again (`tob_claim` twice returns the same token), so two rows with one value in
    /// one transaction both got in.
    rows: BTreeMap<ClaimKey, RowId>,
}

impl Op {
    /// What this op says about a row of this transaction having its key: Some(Some(row)) for
    /// a row's claim, Some(None) for a release (the row deleted, or `tob_release`).
    fn row_effect(&self) -> Option<Option<RowId>> {
        match self.kind {
            OpKind::Claimed | OpKind::Kept => self.row.map(Some),
            OpKind::Releasing => Some(None),
        }
    }
}

impl Txn {
    /// Whether a release of `key` should be scheduled at this point, and for which owner.
    fn release_wanted(&self, key: &ClaimKey) -> Option<String> {
        self.releases.get(key).cloned().flatten()
    }

    /// Recomputes `rows` for `key` from the live ops (after a savepoint's were undone).
    fn recompute_row(&mut self, key: &ClaimKey) {
        let last = self.ops.iter().rev().filter(|op| op.key == *key).find_map(Op::row_effect);
        match last.flatten() {
            Some(row) => drop(self.rows.insert(key.clone(), row)),
            None => drop(self.rows.remove(key)),
        }
    }

    /// Recomputes `releases` for `key` from the live ops (after a savepoint's were undone).
    fn recompute_release(&mut self, key: &ClaimKey) {
        let last = self
            .ops
            .iter()
            .rev()
            .find(|op| op.key == *key && matches!(op.kind, OpKind::Releasing | OpKind::Kept));
        match last {
            Some(op) => {
                let wanted = (op.kind == OpKind::Releasing).then(|| op.owner.clone());
                self.releases.insert(key.clone(), wanted);
            }
            None => {
                self.releases.remove(key);
            }
        }
    }
}

thread_local! {
    static TXN: RefCell<Option<Txn>> = const { RefCell::new(None) };
}

/// Registers the transaction callbacks; once per backend, from `_PG_init`.
pub fn register_callbacks() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        PREVIOUS_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREVIOUS_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

static mut PREVIOUS_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREVIOUS_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// The end of a query, after its AFTER triggers fired: their row claims are sent.
#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query_desc: *mut pg_sys::QueryDesc) {
    unsafe {
        match PREVIOUS_EXECUTOR_FINISH {
            Some(previous) => previous(query_desc),
            None => pg_sys::standard_ExecutorFinish(query_desc),
        }
    }
    send_row_ops();
}

/// The end of a utility statement (COPY fires its AFTER triggers without the executor's
/// finish): row claims held back are sent.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    environment: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        match PREVIOUS_PROCESS_UTILITY {
            Some(previous) => previous(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                dest,
                completion,
            ),
            None => pg_sys::standard_ProcessUtility(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                dest,
                completion,
            ),
        }
    }
    send_row_ops();
}

fn require_preloaded(what: &str) {
    if !shmem::available() {
        TobError::NotConfigured(format!(
            "{what} needs tob in shared_preload_libraries (its background worker keeps the instance's session and settles transactions)"
        ))
        .raise()
    }
}

/// The instance session, waiting briefly for the worker to open one.
pub fn instance_session() -> SessionId {
    let deadline = Instant::now() + guc::connect_timeout() + guc::request_timeout();
    loop {
        let session = shmem::session();
        if session != 0 {
            return SessionId(session);
        }
        if Instant::now() >= deadline {
            TobError::Unreachable(
                "tob's background worker has no session with the cluster (see the server log)"
                    .into(),
            )
            .raise()
        }
        backend::sleep(Duration::from_millis(10));
    }
}

/// This transaction's id and holder, for a call that changes the cluster's state with it
/// (`what`, as the error names it). Refused with 25006 in a read-only transaction (and so on
/// a hot standby, which could not assign the id), as `nextval` is.
fn current_holder(what: &std::ffi::CStr) -> (u64, String) {
    unsafe { pg_sys::PreventCommandIfReadOnly(what.as_ptr()) };
    let full_xid = unsafe { pg_sys::GetTopFullTransactionId().value };
    (full_xid, backend::holder_of(full_xid))
}

fn record(full_xid: u64, holder: &str, op: Op) {
    record_transaction(full_xid, holder);
    TXN.with(|cell| {
        let mut slot = cell.borrow_mut();
        let txn = slot.as_mut().expect("recorded above");
        match op.kind {
            OpKind::Releasing => drop(txn.releases.insert(op.key.clone(), Some(op.owner.clone()))),
            OpKind::Kept => drop(txn.releases.insert(op.key.clone(), None)),
            OpKind::Claimed => {}
        }
        match op.row_effect() {
            Some(Some(row)) => drop(txn.rows.insert(op.key.clone(), row)),
            Some(None) => drop(txn.rows.remove(&op.key)),
            None => {}
        }
        txn.ops.push(op);
    });
}

/// Starts this transaction's bookkeeping (once).
fn record_transaction(full_xid: u64, holder: &str) {
    TXN.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_some_and(|t| t.full_xid != full_xid) {
            *slot = None; // left over from a transaction whose end we did not see
        }
        slot.get_or_insert_with(|| Txn {
            full_xid,
            holder: holder.to_owned(),
            ops: Vec::new(),
            outgoing: Vec::new(),
            outgoing_bytes: 0,
            releases_owed: Vec::new(),
            releases: BTreeMap::new(),
            rows: BTreeMap::new(),
        });
    });
}

/// What a `tob_unique` trigger holds back until the end of its statement: a row's claim, or
/// the release of a row's old value (a DELETE, an UPDATE, a TRUNCATE).
struct RowOp {
    namespace: String,
    key: String,
    owner: String,
    /// The row claimed for; None for a release.
    claim_for: Option<RowId>,
    /// A row that was in the table before its trigger (`tob_unique_claim_rows`): a key this
    /// database already holds is its own, claimed when the row was written or by an earlier
    /// run, and is taken as claimed rather than refused.
    adopt_held: bool,
    subxact: pg_sys::SubTransactionId,
}

impl RowOp {
    /// Whether a claim refused with `current` is one this op takes as already made.
    fn adopts(&self, current: &tob_proto::OwnerInfo) -> bool {
        self.adopt_held && current.owner == self.owner && current.state == ClaimState::Held
    }
}

thread_local! {
    static ROW_OPS: RefCell<Vec<RowOp>> = const { RefCell::new(Vec::new()) };
}

/// Most row ops held back: a statement writing more rows sends them this many at a time.
const ROW_OPS_HELD_MAX: usize = 1_000;

/// Claims `key` for a row a `tob_unique` trigger saw written (`claim_for`), or schedules the
/// release of a row's old value at commit (None): held back until the end of the statement
/// (or until [`ROW_OPS_HELD_MAX`] are waiting), then sent with the statement's other rows'
/// claims and releases all in flight at once — one round trip for a multi-row INSERT, a COPY,
/// a DELETE or a TRUNCATE instead of one per row. Errors (23505, 55P03, …) come at the end
/// of the statement.
pub fn hold_row_op(namespace: &str, key: &str, owner: &str, claim_for: Option<RowId>) {
    hold(namespace, key, owner, claim_for, false);
}

/// Claims `key` for a row that was in its table before the table's `tob_unique` trigger,
/// as [`hold_row_op`] does for a row written, except that a key this database (`owner`)
/// already holds is taken as claimed (see [`RowOp::adopt_held`]).
pub fn hold_existing_row(namespace: &str, key: &str, owner: &str, row: RowId) {
    hold(namespace, key, owner, Some(row), true);
}

fn hold(namespace: &str, key: &str, owner: &str, claim_for: Option<RowId>, adopt_held: bool) {
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let full = ROW_OPS.with(|cell| {
        let mut held = cell.borrow_mut();
        let op = RowOp {
            namespace: namespace.into(),
            key: key.into(),
            owner: owner.into(),
            claim_for,
            adopt_held,
            subxact,
        };
        held.push(op);
        held.len() >= ROW_OPS_HELD_MAX
    });
    if full {
        send_row_ops();
    }
}

/// Sends the row ops held back, in the order they were made. Runs at the end of every
/// statement, and before anything else that claims or releases, reads an owner or commits,
/// so nothing sees the cluster without them or out of order.
pub fn send_row_ops() {
    let held = ROW_OPS.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    match held.as_slice() {
        [] => {}
        // One (the common single-row statement): the plain call, no pipeline.
        [one] => one_row_op(one),
        _ => pipeline_row_ops(held),
    }
}

/// A row op on its own, as [`claim`] or [`release`] makes it.
fn one_row_op(op: &RowOp) {
    match op.claim_for {
        Some(row) => {
            let _ = claim_or_adopt(&op.namespace, &op.key, &op.owner, Some(row), op.adopt_held);
        }
        None => drop(release(&op.namespace, &op.key, &op.owner)),
    }
}

/// Sends many row ops with them in flight together ([`tob_client::Client::pipeline`]).
///
/// In runs of ops that need nothing else and touch a key once: a claim of a key another row
/// of this transaction has, or whose release this transaction scheduled, ends a run and is
/// made on its own ([`claim`]: 23505, or the withdrawal of the release), as is a second op on
/// a key of the run. Each run's ops are recorded before they are sent, so an error or a
/// cancel while they are in flight leaves them to the abort (a rolled-back savepoint undoes
/// them, a transaction's abort settles them); an op not done at once — a key taken or pending
/// elsewhere, a release another transaction's unsettled one blocks, an expired session — is
/// unrecorded and made again on its own, which waits or raises as a single one does. So is
/// every op of a run whose pipeline failed (a leader change, a lost connection): making them
/// again is safe, as a holder's claim or scheduled release repeated is granted again.
fn pipeline_row_ops(held: Vec<RowOp>) {
    require_preloaded("tob_unique");
    let (full_xid, holder) = current_holder(c"tob_unique()");
    let prepared = !unsafe { pg_sys::IsTransactionBlock() };
    let kind = if prepared { ClaimKind::Prepared } else { ClaimKind::Transactional };
    record_transaction(full_xid, &holder);
    let mut at = 0;
    while at < held.len() {
        let base = TXN.with(|cell| cell.borrow().as_ref().map_or(0, |t| t.ops.len()));
        let mut run: Vec<(&RowOp, ClaimKey)> = Vec::new();
        let mut keys: BTreeSet<ClaimKey> = BTreeSet::new();
        while let Some(row_op) = held.get(at) {
            let key = claim_key(&row_op.namespace, &row_op.key);
            let alone = keys.contains(&key)
                || row_op.claim_for.is_some_and(|row| {
                    another_row_has(full_xid, &key, row)
                        || release_scheduled(full_xid, &key).is_some()
                });
            if alone {
                break;
            }
            let op = Op {
                key: key.clone(),
                owner: row_op.owner.clone(),
                kind: if row_op.claim_for.is_some() { OpKind::Claimed } else { OpKind::Releasing },
                prepared: prepared && row_op.claim_for.is_some(),
                row: row_op.claim_for,
                subxact: row_op.subxact,
            };
            record(full_xid, &holder, op);
            keys.insert(key.clone());
            run.push((row_op, key));
            at += 1;
        }
        if !run.is_empty() {
            let session = if prepared { None } else { Some(instance_session()) };
            let commands = run
                .iter()
                .map(|(row_op, key)| match row_op.claim_for {
                    Some(_) => Command::Claim {
                        key: key.clone(),
                        owner: row_op.owner.clone(),
                        holder: holder.clone(),
                        kind,
                        session,
                    },
                    None => Command::ReleaseOnCommit {
                        key: key.clone(),
                        owner: row_op.owner.clone(),
                        holder: holder.clone(),
                    },
                })
                .collect();
            let outcomes = with_client(|client| match client.pipeline(commands) {
                Ok(outcomes) => Ok(Some(outcomes)),
                Err(tob_client::ClientError::Interrupted) => Err(TobError::Cancelled),
                Err(_) => Ok(None),
            });
            // Not done: made again on its own. Adopted: done, but not this transaction's claim,
            // so not released at its abort.
            let mut again = Vec::new();
            let mut adopted = Vec::new();
            for (i, (row_op, _)) in run.iter().enumerate() {
                match (row_op.claim_for, outcomes.as_ref().map(|o| &o[i])) {
                    (Some(_), Some(Outcome::Claimed { .. })) => {}
                    (Some(_), Some(Outcome::Taken { current })) if row_op.adopts(current) => {
                        adopted.push(i)
                    }
                    (None, Some(Outcome::ReleaseScheduled)) => {}
                    _ => again.push(i),
                }
            }
            let mut undone: Vec<usize> = again.iter().chain(&adopted).copied().collect();
            undone.sort_unstable();
            unrecord(base, &undone);
            for i in again {
                one_row_op(run[i].0);
            }
        }
        if let Some(row_op) = held.get(at) {
            one_row_op(row_op);
            at += 1;
        }
    }
}

/// Removes the ops at `base + i` for each `i` of `positions` (ops recorded before they were
/// sent and then not done), and what they said of rows and releases.
fn unrecord(base: usize, positions: &[usize]) {
    if positions.is_empty() {
        return;
    }
    TXN.with(|cell| {
        let mut slot = cell.borrow_mut();
        let Some(txn) = slot.as_mut() else { return };
        let mut keys = Vec::new();
        for &i in positions.iter().rev() {
            keys.push(txn.ops.remove(base + i).key);
        }
        for key in &keys {
            txn.recompute_row(key);
            txn.recompute_release(key);
        }
    });
}

/// The owner whose release of `key` this transaction has scheduled, if any (see
/// [`Txn::releases`]).
fn release_scheduled(full_xid: u64, key: &ClaimKey) -> Option<String> {
    TXN.with(|cell| {
        let slot = cell.borrow();
        slot.as_ref().filter(|t| t.full_xid == full_xid).and_then(|t| t.release_wanted(key))
    })
}

/// Claims `key` for `owner` until this transaction ends: final at commit, released at abort.
/// `row`: the row a `tob_unique` trigger claims it for, refused with 23505 if another row of
/// this transaction has the key (a `tob_claim` of a key this transaction holds returns its
/// token again).
pub fn claim(namespace: &str, key: &str, owner: &str, row: Option<RowId>) -> FencingToken {
    claim_or_adopt(namespace, key, owner, row, false)
}

/// [`claim`], and with `adopt_held` a key `owner` already holds is taken as claimed: its
/// token is returned and nothing is recorded (see [`RowOp::adopt_held`]).
fn claim_or_adopt(
    namespace: &str,
    key: &str,
    owner: &str,
    row: Option<RowId>,
    adopt_held: bool,
) -> FencingToken {
    send_row_ops();
    require_preloaded("tob_claim");
    let (full_xid, holder) = current_holder(c"tob_claim()");
    let claim_key = claim_key(namespace, key);
    if row.is_some_and(|row| another_row_has(full_xid, &claim_key, row)) {
        TobError::TakenInTransaction { namespace: namespace.into(), key: key.into() }.raise()
    }
    // Outside a transaction block the statement's transaction commits as soon as the statement
    // ends: claim prepared at once and save the Prepare round trip at commit. Safe because a
    // prepared claim's fate is the transaction's (settled from the commit log, or aborted if
    // its id was handed out again after a crash: see `boots`); the cost is that such a claim
    // does not expire with the session while the statement runs.
    let prepared = !unsafe { pg_sys::IsTransactionBlock() };
    let kind = if prepared { ClaimKind::Prepared } else { ClaimKind::Transactional };
    record_transaction(full_xid, &holder);
    if let Some(token) = claim_again(full_xid, &holder, &claim_key, owner, row) {
        return token;
    }
    // Recorded before it is sent: if the answer is lost (a cancel, a lost connection, a
    // timeout), the claim may still have been granted, and the abort of the statement's
    // (sub)transaction must release it. Recorded only once granted, a claim prepared at once
    // outlived a savepoint rolled back around it (a PL/pgSQL EXCEPTION block catching the
    // 08006) and became held when the transaction committed, with no row.
    let base = TXN.with(|cell| cell.borrow().as_ref().map_or(0, |t| t.ops.len()));
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let op = Op {
        key: claim_key.clone(),
        owner: owner.into(),
        kind: OpKind::Claimed,
        prepared,
        row,
        subxact,
    };
    record(full_xid, &holder, op);
    let refuse = |error: TobError| -> ! {
        unrecord(base, &[0]);
        error.raise()
    };
    let mut waiting = backend::Waiting::new();
    loop {
        let session = if prepared { None } else { Some(instance_session()) };
        let outcome = with_client(|c| {
            backend::session_outcome(c.claim_with(namespace, key, owner, &holder, kind, session))
                .map_err(|e| TobError::from(e).in_namespace(namespace))
        });
        match outcome {
            Outcome::Claimed { token } => {
                let pause = guc::TEST_PAUSE_AFTER_CLAIM_MS.get();
                if pause > 0 {
                    backend::sleep(Duration::from_millis(pause as u64));
                }
                return token;
            }
            Outcome::Taken { current }
                if adopt_held && current.owner == owner && current.state == ClaimState::Held =>
            {
                unrecord(base, &[0]);
                return current.token;
            }
            Outcome::Taken { current }
                if current.holder == holder || current.state == ClaimState::Held =>
            {
                refuse(TobError::Taken { namespace: namespace.into(), key: key.into(), current })
            }
            // Pending or prepared in another transaction, or held and being released by one
            // (a DELETE not committed yet): wait for its fate, as a unique index does.
            Outcome::Taken { current } => waiting.wait_or_raise(namespace, key, current, false),
            Outcome::Releasing { current, .. } => {
                waiting.wait_or_raise(namespace, key, current, true)
            }
            Outcome::Error { code: tob_proto::ErrorCode::UnknownSession } => {
                // The instance session expired; the worker opens another. Claims made earlier
                // in this transaction are lost and will fail the commit.
                wait_for_new_session(session.expect("only session-bound claims expire"));
            }
            other => refuse(TobError::from_outcome(other)),
        }
    }
}

/// Claims a key again whose release this transaction scheduled for the same owner (a row
/// deleted, then written again, as a unique index allows): withdraws the release instead, and
/// returns the claim's token. None if this transaction has no such release scheduled.
fn claim_again(
    full_xid: u64,
    holder: &str,
    key: &ClaimKey,
    owner: &str,
    row: Option<RowId>,
) -> Option<FencingToken> {
    if release_scheduled(full_xid, key).as_deref() != Some(owner) {
        return None;
    }
    // Recorded before the withdrawal is sent: if a call below fails and its savepoint is rolled
    // back, undoing this op schedules the release again — whether or not the withdrawal got
    // through — instead of leaving the name held for a row that is gone.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let op = Op {
        key: key.clone(),
        owner: owner.into(),
        kind: OpKind::Kept,
        prepared: false,
        row,
        subxact,
    };
    record(full_xid, holder, op);
    with_client(|c| Ok(c.keep_on_commit(key.clone(), holder)?));
    let current = with_client(|c| {
        Ok(c.owner(&key.namespace, &key.key, tob_proto::ReadConsistency::Index)?)
    });
    // Gone only if it was this transaction's own pending claim and the instance session
    // expired: claim anew (the commit then fails with 40001 for the lost one).
    current.filter(|c| c.owner == owner).map(|c| c.token)
}

/// Whether a row written by this transaction other than `row` has `key` (see [`Txn::rows`]).
fn another_row_has(full_xid: u64, key: &ClaimKey, row: RowId) -> bool {
    TXN.with(|cell| {
        let slot = cell.borrow();
        let txn = slot.as_ref().filter(|t| t.full_xid == full_xid);
        txn.and_then(|t| t.rows.get(key)).is_some_and(|r| *r != row)
    })
}

/// Waits for the background worker to open a new instance session after `old` expired; 08006
/// if none opens within the connect and request timeouts.
pub fn wait_for_new_session(old: SessionId) {
    let deadline = Instant::now() + guc::connect_timeout() + guc::request_timeout();
    while shmem::session() == old.0 {
        if Instant::now() >= deadline {
            TobError::Unreachable("the instance's session expired and no new one opened".into())
                .raise()
        }
        backend::sleep(Duration::from_millis(10));
    }
}

/// Schedules the release of `owner`'s claim on `key` for this transaction's commit. Returns
/// false if `owner` does not hold it.
///
/// If `owner` holds it but another transaction's release of it is still being settled, this
/// waits (as a claim waits for a pending one, bounded by `tob.claim_wait_timeout`; 55P03
/// after that). That other transaction has ended — PostgreSQL's row lock saw to it — but the
/// background worker has not told the cluster yet; the cluster refuses a second scheduled
/// release meanwhile. Treating that refusal as "not ours" let a DELETE commit while its claim
/// stayed held for good (found by a 30-minute fault run: a DELETE cut short by
/// `pg_terminate_backend`, then the same DELETE again from a new connection).
pub fn release(namespace: &str, key: &str, owner: &str) -> bool {
    send_row_ops();
    require_preloaded("tob_release inside a transaction");
    let (full_xid, holder) = current_holder(c"tob_release()");
    let claim_key = claim_key(namespace, key);
    // The reconciler decides a scheduled release by the transaction's fate, as it does a
    // prepared claim (a release from an earlier start whose id was reused is dropped).
    record_transaction(full_xid, &holder);
    let mut waiting = backend::Waiting::new();
    loop {
        let outcome = with_client(|c| {
            c.release_on_commit(claim_key.clone(), owner, &holder)
                .map_err(|e| TobError::from(e).in_namespace(&claim_key.namespace))
        });
        match outcome {
            Outcome::ReleaseScheduled => {
                let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
                let op = Op {
                    key: claim_key,
                    owner: owner.into(),
                    kind: OpKind::Releasing,
                    prepared: false,
                    row: None,
                    subxact,
                };
                record(full_xid, &holder, op);
                return true;
            }
            Outcome::NotOwner => {
                let current = with_client(|c| {
                    Ok(c.owner(namespace, key, tob_proto::ReadConsistency::Index)?)
                });
                match current {
                    Some(current) if current.owner == owner => {
                        waiting.wait_or_raise(namespace, key, current, true)
                    }
                    _ => return false,
                }
            }
            other => TobError::from_outcome(other).raise(),
        }
    }
}

/// Keeps a message for the total order until this transaction commits: staged in the cluster
/// at `PRE_COMMIT` (after the claims are prepared), appended when the transaction is settled
/// as committed, dropped if it aborts or its savepoint is rolled back.
pub fn append_on_commit(topic: Option<&str>, payload: &[u8]) {
    require_preloaded("tob_append_on_commit");
    let (full_xid, holder) = current_holder(c"tob_append_on_commit()");
    record_transaction(full_xid, &holder);
    let limit = Limits::default().staged_bytes_max;
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let message = StagedMessage { topic: topic.map(str::to_owned), payload: payload.to_vec() };
    TXN.with(|cell| {
        let mut slot = cell.borrow_mut();
        let txn = slot.as_mut().expect("recorded above");
        if txn.outgoing_bytes + payload.len() > limit {
            TobError::LimitExceeded(format!(
                "a transaction's messages for tob_append_on_commit may total {} MiB; this one would have {} bytes",
                limit >> 20,
                txn.outgoing_bytes + payload.len()
            ))
            .raise()
        }
        txn.outgoing_bytes += payload.len();
        txn.outgoing.push(Outgoing { message, subxact });
    });
}

/// Stages the transaction's outgoing messages, in order, in as few requests as the limits on
/// one request allow. Failing raises, which aborts the commit (and drops what was staged).
fn stage_outgoing(holder: &str, outgoing: Vec<StagedMessage>) {
    let limits = Limits::default();
    let mut batch: Vec<StagedMessage> = Vec::new();
    let mut batch_bytes = 0;
    let send = |batch: Vec<StagedMessage>| match with_client(|c| Ok(c.stage(holder, batch)?)) {
        Outcome::Staged { .. } => {}
        other => TobError::from_outcome(other).raise(),
    };
    for message in outgoing {
        let full = batch.len() == limits.batch_keys_max
            || batch_bytes + message.payload.len() > limits.payload_bytes_max;
        if full && !batch.is_empty() {
            send(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
        batch_bytes += message.payload.len();
        batch.push(message);
    }
    if !batch.is_empty() {
        send(batch);
    }
}

/// Before commit (or PREPARE TRANSACTION): prepare every live claim; a lost one aborts.
fn prepare_for_commit(two_phase: bool) {
    // Row claims of deferred constraint triggers, fired just before this.
    send_row_ops();
    let Some((holder, keys, owed, outgoing)) = TXN.with(|cell| {
        cell.borrow_mut().as_mut().map(|t| {
            let mut keys: Vec<ClaimKey> = t
                .ops
                .iter()
                .filter(|op| op.kind == OpKind::Claimed && !op.prepared)
                .map(|op| op.key.clone())
                .collect();
            keys.sort();
            keys.dedup();
            let outgoing: Vec<StagedMessage> =
                std::mem::take(&mut t.outgoing).into_iter().map(|o| o.message).collect();
            let owed: Vec<(ClaimKey, Option<String>)> =
                t.releases_owed.iter().map(|key| (key.clone(), t.release_wanted(key))).collect();
            (t.holder.clone(), keys, owed, outgoing)
        })
    }) else {
        return;
    };
    // PostgreSQL makes a commit durable before COMMIT returns only if the transaction wrote
    // WAL; one that only claimed, released or appended on commit wrote none, so its commit
    // record could be lost in a crash after COMMIT returned — and with it, by the commit log,
    // its claims and messages. Its effects are in the cluster: flush its commit like a
    // writing transaction's (unless synchronous_commit is off, as PostgreSQL would).
    if unsafe { pg_sys::synchronous_commit }
        > pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
    {
        unsafe { pg_sys::ForceSyncCommit() };
    }
    if two_phase && !shmem::available() {
        TobError::NotConfigured("PREPARE TRANSACTION with tob claims".into()).raise()
    }
    for (key, wanted) in owed {
        let outcome = match wanted {
            None => with_client(|c| Ok(c.keep_on_commit(key.clone(), &holder)?)),
            Some(owner) => {
                with_client(|c| Ok(c.release_on_commit(key.clone(), &owner, &holder)?))
            }
        };
        if outcome != Outcome::ReleaseScheduled {
            TobError::from_outcome(outcome).raise()
        }
    }
    // Both precede the commit record, so either order is safe; messages first, so that a
    // claim seen prepared means this transaction's messages are staged too.
    let staged = !outgoing.is_empty();
    if staged {
        stage_outgoing(&holder, outgoing);
    }
    if !keys.is_empty() {
        prepare(&holder, keys);
    }
    let claimed = TXN.with(|cell| {
        cell.borrow().as_ref().is_some_and(|t| t.ops.iter().any(|op| op.kind == OpKind::Claimed))
    });
    let pause = guc::TEST_PAUSE_AFTER_PREPARE_MS.get();
    if (claimed || staged) && pause > 0 {
        backend::sleep(Duration::from_millis(pause as u64));
    }
}

/// Prepares `keys` of `holder`; a lost one aborts the transaction (40001).
///
/// In batches of at most the cluster's batch limit (10,000 keys): sent whole, a transaction
/// with more claims could never commit (22001 at COMMIT, after all its claims were made).
/// Batches need not be atomic together: if a later one finds a claim lost, the transaction
/// aborts, and its abort releases the claims an earlier batch prepared, as it would pending
/// ones.
fn prepare(holder: &str, keys: Vec<ClaimKey>) {
    for batch in keys.chunks(Limits::default().batch_keys_max) {
        match with_client(|c| Ok(c.prepare(holder, batch.to_vec())?)) {
            Outcome::Prepared => {}
            Outcome::Lost { keys } => TobError::ClaimLost {
                keys: keys
                    .iter()
                    .map(|k| format!("\"{}\" in \"{}\"", k.key, k.namespace))
                    .collect(),
            }
            .raise(),
            other => TobError::from_outcome(other).raise(),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => prepare_for_commit(false),
        XACT_EVENT_PRE_PREPARE => prepare_for_commit(true),
        // The transaction is now PREPAREd: COMMIT/ROLLBACK PREPARED may come from any session,
        // so the worker's reconciler settles it from pg_xact_status.
        XACT_EVENT_PREPARE => drop(TXN.with(|cell| cell.borrow_mut().take())),
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT => {
            // Held back and never sent (an error ended the statement first): nothing to undo.
            drop(ROW_OPS.with(|cell| std::mem::take(&mut *cell.borrow_mut())));
            // Interrupts are held and an ERROR here would be fatal: only queue, never raise.
            // Queued even without recorded ops: a claim whose answer was lost may still exist.
            if let Some(txn) = TXN.with(|cell| cell.borrow_mut().take())
                && shmem::available()
            {
                let committed = event == XACT_EVENT_COMMIT;
                // Set by RecordTransactionCommit, which ran before this callback.
                let commit_lsn = if committed { unsafe { pg_sys::XactLastCommitEnd } } else { 0 };
                shmem::push_settle(shmem::SettleEntry {
                    full_xid: txn.full_xid,
                    committed,
                    commit_lsn,
                });
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_COMMIT_SUB => TXN.with(|cell| {
            ROW_OPS.with(|held| {
                for claim in held.borrow_mut().iter_mut().filter(|c| c.subxact == my_subid) {
                    claim.subxact = parent_subid;
                }
            });
            let mut slot = cell.borrow_mut();
            let Some(txn) = slot.as_mut() else { return };
            for subxact in txn
                .ops
                .iter_mut()
                .map(|op| &mut op.subxact)
                .chain(txn.outgoing.iter_mut().map(|o| &mut o.subxact))
            {
                if *subxact == my_subid {
                    *subxact = parent_subid;
                }
            }
        }),
        SUBXACT_EVENT_ABORT_SUB => {
            ROW_OPS.with(|held| held.borrow_mut().retain(|c| c.subxact != my_subid));
            undo_subtransaction(my_subid)
        }
        _ => {}
    }
}

/// A savepoint was rolled back: undo what it did. Best effort without raising (this runs
/// during abort processing): a claim whose release fails is released when the transaction
/// settles (an unprepared claim never survives), and a key whose scheduled release could not
/// be withdrawn or scheduled again is set right before commit.
fn undo_subtransaction(subxact: pg_sys::SubTransactionId) {
    // The claims to release, and the keys whose scheduled release must change: for each,
    // whether (and for which owner) the ops left want one.
    let (holder, claims, schedules) = TXN.with(|cell| {
        let mut slot = cell.borrow_mut();
        let Some(txn) = slot.as_mut() else { return (String::new(), Vec::new(), Vec::new()) };
        // Its messages were never sent: dropping them is all there is to undo.
        txn.outgoing.retain(|o| o.subxact != subxact);
        txn.outgoing_bytes = txn.outgoing.iter().map(|o| o.message.payload.len()).sum();
        let touched: BTreeSet<ClaimKey> = txn
            .ops
            .iter()
            .filter(|op| op.subxact == subxact && op.kind != OpKind::Claimed)
            .map(|op| op.key.clone())
            .collect();
        let before: Vec<(ClaimKey, bool)> = touched
            .into_iter()
            .map(|key| {
                let wanted = txn.release_wanted(&key).is_some();
                (key, wanted)
            })
            .collect();
        let (undone, kept): (Vec<Op>, Vec<Op>) =
            std::mem::take(&mut txn.ops).into_iter().partition(|op| op.subxact == subxact);
        txn.ops = kept;
        let rows_touched: BTreeSet<ClaimKey> = undone.iter().map(|op| op.key.clone()).collect();
        for key in &rows_touched {
            txn.recompute_row(key);
        }
        let schedules: Vec<(ClaimKey, Option<String>)> = before
            .into_iter()
            .filter_map(|(key, was)| {
                txn.recompute_release(&key);
                let wanted = txn.release_wanted(&key);
                (wanted.is_some() != was).then_some((key, wanted))
            })
            .collect();
        // A claim the parent made before the savepoint stays.
        let claims: Vec<Op> = undone
            .into_iter()
            .filter(|op| op.kind == OpKind::Claimed)
            .filter(|op| !txn.ops.iter().any(|o| o.key == op.key && o.kind == OpKind::Claimed))
            .collect();
        (txn.holder.clone(), claims, schedules)
    });
    for op in claims {
        backend::try_with_client(|c| {
            let release =
                Command::Release { key: op.key, owner: op.owner, holder: Some(holder.clone()) };
            c.command(release).map(|_| ())
        });
    }
    let mut owed = Vec::new();
    for (key, wanted) in schedules {
        let done = backend::try_with_client(|c| match &wanted {
            None => c.keep_on_commit(key.clone(), &holder).map(|_| ()),
            Some(owner) => match c.release_on_commit(key.clone(), owner, &holder)? {
                Outcome::ReleaseScheduled => Ok(()),
                other => Err(tob_client::ClientError::Protocol(format!("{other:?}"))),
            },
        });
        if !done {
            owed.push(key);
        }
    }
    TXN.with(|cell| {
        if let Some(txn) = cell.borrow_mut().as_mut() {
            txn.releases_owed.extend(owed);
        }
    });
}
