//! The node's request to the CPU scheduler for short time slices.
//!
//! A node mostly sleeps: it wakes for a request, a peer's message or a finished fsync, works
//! for some microseconds and sleeps again, while whoever waits for its answer (a PostgreSQL
//! backend holding a transaction open, a client) waits too. When the node shares the CPUs with
//! busy processes — PostgreSQL on the same machine, say — a waking node may have to wait for a
//! running process's whole time slice (milliseconds) before it runs. Linux's EEVDF scheduler
//! (kernel 6.12 and later) lets a thread ask for a shorter slice; such a thread is picked
//! sooner when it wakes, without getting a larger share of the CPU than its priority gives it
//! (unlike `nice`, which was tried: a higher priority made the SQL benchmark slower). Older
//! kernels ignore the request. Threads and processes started afterwards inherit it, so the
//! node asks once, before it starts any.

use std::time::Duration;

/// `struct sched_attr` of `sched_setattr(2)` (the first version of it, 56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    /// For the normal policies: the slice the thread asks for, in nanoseconds.
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// The slice range Linux accepts for normal threads; other values are clamped by the kernel,
/// and refused by the configuration so that what is asked is what is granted.
pub const SLICE_MIN: Duration = Duration::from_micros(100);
pub const SLICE_MAX: Duration = Duration::from_millis(100);

/// `SCHED_FLAG_RESET_ON_FORK` of `sched_setattr(2)`: set by whoever started the node so that
/// its children start with default scheduling; kept.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// Asks for `slice` for the calling thread and everything it starts later, keeping its policy,
/// nice value and reset-on-fork flag. Threads under a real-time or deadline policy are left
/// alone.
pub fn request_cpu_slice(slice: Duration) -> std::io::Result<()> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a writable `sched_attr` of the size passed; pid 0 is this thread.
    let got = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if !matches!(attr.sched_policy as i32, libc::SCHED_OTHER | libc::SCHED_BATCH) {
        return Ok(());
    }
    attr.size = size;
    // Only reset-on-fork describes the thread; the other flags ask for changes (utilisation
    // clamps) that were not asked for.
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = slice.as_nanos() as u64;
    // SAFETY: as above; the kernel only reads `attr`.
    let set = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice the kernel reports for this thread, where it reports one (`/proc` of a
    /// kernel with EEVDF).
    fn reported_slice() -> Option<u64> {
        let tid = unsafe { libc::gettid() };
        let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.split_whitespace().last()?.parse().ok()
    }

    #[test]
    fn a_thread_started_after_the_request_inherits_the_slice() {
        // On a thread of its own, so that the test runner's threads keep theirs.
        std::thread::spawn(|| {
            // A nice value of its own first, to see that the request keeps it (lowering one's
            // own priority needs no privilege). PRIO_PROCESS with a thread id is that thread.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
            let nice = (before + 3).min(19);
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) }, 0);
            request_cpu_slice(Duration::from_micros(300)).unwrap();
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, nice);
            let child = std::thread::spawn(reported_slice).join().unwrap();
            if let Some(own) = reported_slice() {
                assert_eq!(own, 300_000);
                assert_eq!(child, Some(300_000));
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn reset_on_fork_is_kept() {
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: plain system calls on this thread (pid 0). Setting the flag needs no
            // privilege.
            let policy = libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK;
            assert_eq!(unsafe { libc::sched_setscheduler(0, policy, &param) }, 0);
            request_cpu_slice(Duration::from_micros(300)).unwrap();
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, policy);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_real_time_thread_is_left_alone() {
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: plain system calls on this thread (pid 0).
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                return; // Not permitted here (no CAP_SYS_NICE): nothing to check.
            }
            request_cpu_slice(Duration::from_micros(300)).unwrap();
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
            let mut kept = libc::sched_param { sched_priority: 0 };
            assert_eq!(unsafe { libc::sched_getparam(0, &mut kept) }, 0);
            assert_eq!(kept.sched_priority, 1);
        })
        .join()
        .unwrap();
    }
}
