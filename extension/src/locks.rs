//! Session-held locks (`tob_lock`): ephemeral claims bound to the instance's session, held by
//! this backend (pid plus start time). Released by `tob_unlock`, when the backend exits (an
//! exit hook, best effort), or when the instance's session expires.

use std::cell::RefCell;
use std::collections::BTreeSet;

use pgrx::prelude::*;
use tob_proto::{ClaimKind, Command, ErrorCode, FencingToken, Outcome};

use crate::backend::{self, with_client};
use crate::error::TobError;
use crate::xact;

const LOCK_NAMESPACE: &str = "tob.lock";

thread_local! {
    static HELD: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
    static EXIT_HOOK: RefCell<bool> = const { RefCell::new(false) };
}

pub fn lock(resource: &str) -> FencingToken {
    // A lock belongs to the server's session with the cluster, which tob's background worker
    // holds, and the worker runs only on a primary: refused at once on a hot standby (25006)
    // instead of waiting out the timeouts for a session that never comes.
    unsafe { pg_sys::PreventCommandDuringRecovery(c"tob_lock()".as_ptr()) };
    let holder = backend::backend_holder();
    let mut waiting = backend::Waiting::new();
    loop {
        let session = xact::instance_session();
        let outcome = with_client(|c| {
            Ok(backend::session_outcome(c.claim_with(
                LOCK_NAMESPACE,
                resource,
                &holder,
                &holder,
                ClaimKind::Ephemeral,
                Some(session),
            ))?)
        });
        match outcome {
            Outcome::Claimed { token } => {
                remember(resource);
                return token;
            }
            Outcome::Taken { current } => {
                waiting.wait_or_raise(LOCK_NAMESPACE, resource, current, false)
            }
            Outcome::Releasing { current, .. } => {
                waiting.wait_or_raise(LOCK_NAMESPACE, resource, current, true)
            }
            // The instance session expired: the worker opens a new one.
            Outcome::Error { code: ErrorCode::UnknownSession } => {
                xact::wait_for_new_session(session)
            }
            other => TobError::from_outcome(other).raise(),
        }
    }
}

pub fn unlock(resource: &str) -> bool {
    let holder = backend::backend_holder();
    let outcome = with_client(|c| Ok(c.command(release_command(resource, &holder))?));
    HELD.with(|held| held.borrow_mut().remove(resource));
    outcome == Outcome::Released
}

fn release_command(resource: &str, holder: &str) -> Command {
    Command::Release {
        key: tob_client::claim_key(LOCK_NAMESPACE, resource),
        owner: holder.into(),
        holder: Some(holder.into()),
    }
}

fn remember(resource: &str) {
    HELD.with(|held| held.borrow_mut().insert(resource.to_owned()));
    EXIT_HOOK.with(|registered| {
        if !*registered.borrow() {
            unsafe { pg_sys::on_proc_exit(Some(release_all_at_exit), pg_sys::Datum::from(0)) };
            *registered.borrow_mut() = true;
        }
    });
}

/// Releases this backend's locks as it exits (also after pg_terminate_backend). Never raises;
/// what it cannot release is freed when the instance's session expires.
#[pg_guard]
unsafe extern "C-unwind" fn release_all_at_exit(_code: i32, _arg: pg_sys::Datum) {
    backend::set_exiting();
    let holder = backend::backend_holder();
    let held: Vec<String> =
        HELD.with(|held| std::mem::take(&mut *held.borrow_mut()).into_iter().collect());
    for resource in held {
        backend::try_with_client(|c| c.command(release_command(&resource, &holder)).map(|_| ()));
    }
}
