//! A persistent thread team for the CPU executor: the caller plus
//! `threads − 1` workers that spin briefly between jobs (then park), so the
//! ~100 parallel regions of a decode step cost microseconds instead of a
//! thread wake-up each. Parts of a job are claimed dynamically, so a late
//! worker never stalls the caller; which thread runs a part never changes its
//! result (parts write disjoint outputs).
//!
//! One job runs at a time; a caller that finds the team busy (another engine
//! in another thread) runs its parts itself. `CANTANTE_THREADS` sets the team
//! size (default: available parallelism).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(2);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// `epoch << 32 | parts << 16 | next part`.
    state: AtomicU64,
    /// Parts finished in the current epoch.
    done: AtomicUsize,
    /// A part of the current epoch panicked.
    panicked: AtomicBool,
    /// The current job (valid while its epoch has unfinished parts).
    job: UnsafeCell<Option<Job>>,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the caller holding `lock` before it
// publishes a new epoch, and read only by a thread that has claimed a part of
// that epoch (so the caller is still waiting and the closure is alive).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Team {
    shared: &'static Shared,
    workers: Vec<Thread>,
    lock: Mutex<()>,
}

static TEAM: OnceLock<Team> = OnceLock::new();

/// Threads the team uses (caller included).
pub fn threads() -> usize {
    team().workers.len() + 1
}

fn team() -> &'static Team {
    TEAM.get_or_init(|| {
        let n = std::env::var("CANTANTE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .min(64);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            sleeping: (1..n).map(|_| AtomicBool::new(false)).collect(),
        }));
        let workers = (1..n)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("cantante-team-{i}"))
                    .spawn(move || worker(shared, i - 1))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Team {
            shared,
            workers,
            lock: Mutex::new(()),
        }
    })
}

/// Claim and run parts of epoch `epoch` until none is left.
fn drain(shared: &Shared, epoch: u64) {
    loop {
        let s = shared.state.load(Ordering::Acquire);
        let (e, parts, next) = (s >> 32, (s >> 16) & 0xFFFF, s & 0xFFFF);
        if e != epoch || next >= parts {
            return;
        }
        if shared
            .state
            .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: part `next` of this epoch is claimed and unfinished, so the
        // caller is still waiting and the job pointer is the live closure.
        let job = unsafe { (*shared.job.get()).unwrap_unchecked() };
        // A panicking part still counts as done (so nobody waits forever); the
        // caller re-raises it once every part has finished.
        let part = std::panic::AssertUnwindSafe(|| unsafe { (*job)(next as usize) });
        if std::panic::catch_unwind(part).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

fn worker(shared: &'static Shared, idx: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = shared.state.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 && start.elapsed() > SPIN {
                shared.sleeping[idx].store(true, Ordering::SeqCst);
                if shared.state.load(Ordering::SeqCst) >> 32 == seen {
                    std::thread::park_timeout(Duration::from_millis(100));
                }
                shared.sleeping[idx].store(false, Ordering::SeqCst);
            }
        };
        seen = epoch;
        drain(shared, epoch);
    }
}

/// Run `f(0..parts)` on the team and return when every part has run.
pub fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        if parts == 1 {
            f(0);
        }
        return;
    }
    let team = team();
    let guard = match team.lock.try_lock() {
        Ok(g) if !team.workers.is_empty() && parts < 0xFFFF => g,
        _ => {
            (0..parts).for_each(f);
            return;
        }
    };
    let shared = team.shared;
    let epoch = (shared.state.load(Ordering::Acquire) >> 32) + 1;
    // SAFETY: the pointer is erased to 'static only for the duration of this
    // call: we wait below until every claimed part has finished, and no part
    // can be claimed after that (all are claimed).
    let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    unsafe { *shared.job.get() = Some(job) };
    shared.done.store(0, Ordering::Release);
    shared.panicked.store(false, Ordering::Release);
    shared
        .state
        .store((epoch << 32) | ((parts as u64) << 16), Ordering::SeqCst);
    for (w, sleeping) in team.workers.iter().zip(&shared.sleeping) {
        if sleeping.load(Ordering::SeqCst) {
            w.unpark();
        }
    }
    drain(shared, epoch);
    while shared.done.load(Ordering::Acquire) < parts {
        std::hint::spin_loop();
    }
    let panicked = shared.panicked.load(Ordering::Acquire);
    drop(guard);
    if panicked {
        panic!("a part of a CPU-executor job panicked (see the message above)");
    }
}

/// Split `0..n` into contiguous ranges of at least `min_len` items (at most
/// four per thread) and run `f` on each range on the team.
pub fn for_ranges(n: usize, min_len: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let parts = (n / min_len.max(1)).clamp(1, 4 * threads()).min(n.max(1));
    if parts <= 1 {
        f(0..n);
        return;
    }
    run(parts, &|p| f(n * p / parts..n * (p + 1) / parts));
}

/// A mutable slice shared by the parts of one job, each writing a disjoint piece.
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: parts access disjoint ranges (the caller of `range` guarantees it).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Share `s` for the duration of a job.
    pub fn new(s: &mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// The piece `start..end`.
    ///
    /// # Safety
    /// No two live references returned by this method may overlap, and the
    /// original slice must outlive them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, end: usize) -> &mut [T] {
        assert!(
            start <= end && end <= self.len,
            "SharedMut range out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
    }
}
