//! The extension's settings (`tob.*`). Defined in `_PG_init`; the `tob.` prefix is reserved so a
//! misspelt setting is an error, not a silently ignored variable.

use std::ffi::CString;
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use tob_proto::ReadConsistency;

/// What a claim does when another transaction has the key pending.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClaimWait {
    /// Wait for the other transaction to finish, as a unique index does.
    #[name = c"wait"]
    Wait,
    /// Fail at once with 55P03.
    #[name = c"nowait"]
    Nowait,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReadMode {
    #[name = c"index"]
    Index,
    #[name = c"log"]
    Log,
    #[name = c"lease"]
    Lease,
}

pub static CLUSTER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static CLUSTER_ID: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2_000);
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static CLAIM_WAIT: GucSetting<ClaimWait> = GucSetting::<ClaimWait>::new(ClaimWait::Wait);
pub static CLAIM_WAIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static READ_CONSISTENCY: GucSetting<ReadMode> = GucSetting::<ReadMode>::new(ReadMode::Index);
pub static SESSION_TTL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static SETTLE_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static TEST_PAUSE_AFTER_PREPARE_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static TEST_PAUSE_AFTER_CLAIM_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static RMGR_ID: GucSetting<i32> = GucSetting::<i32>::new(pg_sys::RM_EXPERIMENTAL_ID as i32);
pub static WORKER_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn define() {
    GucRegistry::define_string_guc(
        c"tob.cluster",
        c"Client addresses of the tob sequencer nodes, comma-separated (host:port,...).",
        c"Any subset of the nodes works; the leader is discovered. One cluster per PostgreSQL instance.",
        &CLUSTER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tob.cluster_id",
        c"The cluster id the sequencer nodes were started with (--cluster-id).",
        c"Frames carrying another cluster id are refused, so an instance cannot talk to the wrong cluster.",
        &CLUSTER_ID,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tob.connect_timeout",
        c"How long to try to reach a sequencer node before giving up (08006).",
        c"",
        &CONNECT_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tob.request_timeout",
        c"Deadline of one request to the cluster, retries at other nodes included.",
        c"Also bounds the Prepare sent at commit, which statement_timeout does not cover.",
        &REQUEST_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"tob.claim_wait",
        c"Whether a claim on a key pending in another transaction waits (wait) or fails at once (nowait, 55P03).",
        c"",
        &CLAIM_WAIT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tob.claim_wait_timeout",
        c"How long a claim waits for another transaction's pending claim before failing with 55P03.",
        c"",
        &CLAIM_WAIT_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"tob.read_consistency",
        c"How tob_owner reads: index (ReadIndex, default), log (through the log) or lease (leader lease).",
        c"",
        &READ_CONSISTENCY,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tob.session_ttl",
        c"Lease of this instance's session: pending claims of an instance unheard of this long are released.",
        c"",
        &SESSION_TTL_MS,
        500,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tob.settle_delay",
        c"How long the worker gathers finished transactions before settling their claims in one request.",
        c"0 settles each at once. Each settle is a write to the cluster; at low load one per transaction doubles the cluster's writes, and a claim arriving behind one waits for its fsync.",
        &SETTLE_DELAY_MS,
        0,
        1_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"tob.database",
        c"The database the background worker connects to (to ask pg_xact_status).",
        c"",
        &WORKER_DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tob.test_pause_after_prepare",
        c"For tests only: pause this long at commit after the claims are prepared, before the commit record.",
        c"Opens the crash window the reconciler closes, so a test can stop the server inside it.",
        &TEST_PAUSE_AFTER_PREPARE_MS,
        0,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tob.test_pause_after_claim",
        c"For tests only: pause this long after a claim succeeds, before the statement goes on.",
        c"Lets a test stop the server while a claim exists whose transaction has written nothing yet.",
        &TEST_PAUSE_AFTER_CLAIM_MS,
        0,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tob.rmgr_id",
        c"The custom WAL resource manager id tob registers to learn where WAL replay ended.",
        c"tob writes no WAL records of its own; change it only if another extension uses the same id.",
        &RMGR_ID,
        pg_sys::RM_MIN_CUSTOM_ID as i32,
        pg_sys::RM_MAX_CUSTOM_ID as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    unsafe { pg_sys::MarkGUCPrefixReserved(c"tob".as_ptr()) };
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn connect_timeout() -> Duration {
    ms(&CONNECT_TIMEOUT_MS)
}

pub fn request_timeout() -> Duration {
    ms(&REQUEST_TIMEOUT_MS)
}

pub fn claim_wait_timeout() -> Duration {
    ms(&CLAIM_WAIT_TIMEOUT_MS)
}

pub fn session_ttl() -> Duration {
    ms(&SESSION_TTL_MS)
}

pub fn settle_delay() -> Duration {
    ms(&SETTLE_DELAY_MS)
}

pub fn cluster() -> Option<String> {
    CLUSTER.get().map(|c| c.to_string_lossy().into_owned()).filter(|c| !c.trim().is_empty())
}

pub fn worker_database() -> String {
    WORKER_DATABASE.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or("postgres".into())
}

pub fn read_consistency() -> ReadConsistency {
    match READ_CONSISTENCY.get() {
        ReadMode::Index => ReadConsistency::Index,
        ReadMode::Log => ReadConsistency::Log,
        ReadMode::Lease => ReadConsistency::Lease,
    }
}
