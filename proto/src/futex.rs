//! Shared (not process-private) futex calls on the ring's waiter word.

use crate::sync::AtomicU32;

/// Wakes every thread blocked on `word`, in any process.
#[cfg(not(loom))]
pub fn wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only reads the address, which is a live, aligned
    // u32 for the duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// In the loom model nobody blocks in the kernel.
#[cfg(loom)]
pub fn wake_all(_word: &AtomicU32) {}

/// Blocks while `word == expected`, for at most `timeout_ns`. Returns at once
/// if the value differs; spurious returns are possible.
#[cfg(not(loom))]
pub fn wait(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: the kernel reads the aligned u32 at the address and the
    // timespec, both alive for the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

#[cfg(not(loom))]
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// Blocks until any of the words differs from its expected value or is
/// woken, for at most `timeout_ns` (futex_waitv, Linux 5.16+; on older
/// kernels it waits on the first word only, at most 1 ms). At most 128 words
/// are watched. No allocation.
#[cfg(not(loom))]
pub fn wait_any<'a>(words: impl IntoIterator<Item = (&'a AtomicU32, u32)>, timeout_ns: u64) {
    const FUTEX_32: u32 = 2;
    const MAX: usize = 128;
    let mut v: [FutexWaitv; MAX] = core::array::from_fn(|_| FutexWaitv {
        val: 0,
        uaddr: 0,
        flags: 0,
        reserved: 0,
    });
    let mut n = 0;
    let mut first = None;
    for (w, e) in words.into_iter().take(MAX) {
        first.get_or_insert((w, e));
        v[n] = FutexWaitv {
            val: e as u64,
            uaddr: w.as_ptr() as u64,
            flags: FUTEX_32,
            reserved: 0,
        };
        n += 1;
    }
    let Some((w0, e0)) = first else { return };
    if n == 1 {
        return wait(w0, e0, timeout_ns);
    }
    let at = monotonic_ns().saturating_add(timeout_ns);
    let deadline = libc::timespec {
        tv_sec: (at / 1_000_000_000) as libc::time_t,
        tv_nsec: (at % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `v` holds `n` valid entries pointing at live aligned u32s;
    // `deadline` is a valid absolute CLOCK_MONOTONIC time.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            v.as_ptr(),
            n as u32,
            0u32,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        wait(w0, e0, timeout_ns.min(1_000_000));
    }
}

#[cfg(not(loom))]
#[inline]
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the machine.
#[cfg(not(loom))]
#[inline]
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in ns since the Unix epoch.
#[cfg(not(loom))]
#[inline]
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}
