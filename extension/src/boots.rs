//! Records each start of the server in `$PGDATA/tob_boots` with the first transaction id it
//! could hand out, so the reconciler can tell a reused id from the one a claim was made with
//! (the reasoning is in the `tob-boots` crate).
//!
//! Two moments, both before any transaction of the new start can get an id:
//! - the postmaster, as shared memory is (re)created, adds the start with the checkpoint's
//!   next id from `pg_control` (final after a clean shutdown, provisional otherwise);
//! - the startup process, when WAL replay ends, amends it with the id replay ended at. The
//!   only hook PostgreSQL 15 calls there is a WAL resource manager's `rm_cleanup`, so tob
//!   registers one (`tob.rmgr_id`) that never writes a record.
//!
//! Failing to record a start stops the server (FATAL): claims made without it could not be
//! settled safely after the next crash.

use std::ffi::CStr;
use std::io::Write;
use std::path::PathBuf;

use pgrx::prelude::*;
use tob_boots::Registry;

use crate::{guc, shmem};

pub const FILE_NAME: &str = "tob_boots";

static mut PREV_SHMEM_STARTUP_HOOK: Option<unsafe extern "C-unwind" fn()> = None;

/// From `_PG_init` while preloading, after the shared memory is requested.
pub fn register() {
    unsafe {
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
        // PostgreSQL copies the struct; the name must live for the process.
        let rmgr = pg_sys::RmgrData {
            rm_name: c"tob".as_ptr(),
            rm_redo: Some(redo),
            rm_desc: Some(describe),
            rm_identify: Some(identify),
            rm_startup: None,
            rm_cleanup: Some(on_replay_end),
            rm_mask: None,
            rm_decode: None,
        };
        let rmgr = Box::leak(Box::new(rmgr));
        pg_sys::RegisterCustomRmgr(guc::RMGR_ID.get() as pg_sys::RmgrId, rmgr);
    }
}

fn path() -> PathBuf {
    let data_dir = unsafe { CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(data_dir.to_string_lossy().into_owned()).join(FILE_NAME)
}

/// The registry as on disk (empty if there is no file yet).
pub fn read() -> Result<Registry, String> {
    let path = path();
    match std::fs::read_to_string(&path) {
        Ok(text) => Registry::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Replaces the file atomically and durably: a crash leaves the old or the new one.
fn write(registry: &Registry) -> Result<(), String> {
    let path = path();
    let temporary = path.with_extension("tmp");
    let failed = |e: std::io::Error| format!("{}: {e}", temporary.display());
    let mut file = std::fs::File::create(&temporary).map_err(failed)?;
    file.write_all(registry.render().as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    let directory = path.parent().expect("a file in the data directory");
    std::fs::File::open(directory)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", directory.display()))
}

fn fatal(message: String) -> ! {
    ereport!(
        PgLogLevel::FATAL,
        PgSqlErrorCode::ERRCODE_IO_ERROR,
        format!("tob: cannot record this start of the server: {message}")
    );
    unreachable!("FATAL does not return")
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP_HOOK {
            prev();
        }
        if pg_sys::IsUnderPostmaster {
            return; // shared memory attached by a child (EXEC_BACKEND builds): nothing new
        }
        let mut crc_ok = false;
        let control = pg_sys::get_controlfile(pg_sys::DataDir, &mut crc_ok);
        if control.is_null() || !crc_ok {
            fatal("pg_control could not be read or has a bad checksum".into());
        }
        let control = &*control;
        let clean = control.state == pg_sys::DBState::DB_SHUTDOWNED;
        let mut registry = read().unwrap_or_else(|e| fatal(e));
        let boot = registry.begin(control.checkPoint, control.checkPointCopy.nextXid.value, clean);
        write(&registry).unwrap_or_else(|e| fatal(e));
        shmem::set_boot(boot);
        log!(
            "tob: start {boot} of this server recorded ({}; first transaction id {} {})",
            if clean { "after a clean shutdown" } else { "WAL replay to come" },
            control.checkPointCopy.nextXid.value,
            if clean { "exactly" } else { "or later" }
        );
    }
}

/// WAL replay ended (startup process): the next id is now the first this start hands out.
#[pg_guard]
unsafe extern "C-unwind" fn on_replay_end() {
    let next = unsafe { pg_sys::ReadNextFullTransactionId().value };
    let boot = shmem::boot();
    let mut registry = read().unwrap_or_else(|e| fatal(e));
    registry.finish(boot, next).unwrap_or_else(|e| fatal(e));
    write(&registry).unwrap_or_else(|e| fatal(e));
    log!("tob: WAL replay of start {boot} ended; its first transaction id is {next}");
}

#[pg_guard]
unsafe extern "C-unwind" fn redo(_record: *mut pg_sys::XLogReaderState) {
    // Never written: tob's resource manager exists only for its end-of-replay callback.
    ereport!(
        PgLogLevel::PANIC,
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        "tob: a WAL record claims tob's resource manager id, but tob writes no WAL records",
        "Another extension may use the same id: set tob.rmgr_id to a free one."
    );
}

#[pg_guard]
unsafe extern "C-unwind" fn describe(
    _buf: pg_sys::StringInfo,
    _record: *mut pg_sys::XLogReaderState,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn identify(_info: u8) -> *const std::ffi::c_char {
    std::ptr::null()
}
