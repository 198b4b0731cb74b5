//! Half of a call handed to the other thread of a pass whose rows are shared out
//! ([`super::row_split`]), where that thread takes it up when it can.
//!
//! A shared-out pass gives the first thread a step's next-token rows, whose f32 products
//! read every weight of the model, and the second thread mask rows, whose int8 products read
//! a quarter of those bytes. Each thread then takes its rows through every call alone, so the
//! first reads the model's f32 weights on one core, what an AR step reads on two. Here the
//! first thread (the owner) offers the second half of each call big enough to share
//! ([`super::few_rows::worth_sharing`]) and starts on the first half; the second thread (the
//! partner) takes the offer up between its own calls, or while it waits for the first's keys
//! and values or for the end of the pass; an offer nobody took by the time the owner's half is
//! done the owner takes back and runs itself. What crosses between the cores is the owner's
//! rows and half of their outputs, not every row of every call as when the team splits each
//! call's columns: on a VM whose two vCPUs the host places on two core complexes, a cache
//! line written by one core and read by the other takes 320-340 ns to come over instead of
//! 55-60 ns (docs/BENCHMARKS.md, sixtieth session).
//!
//! Which thread computes a part never changes its values (every kernel's part computes its
//! outputs the same way on any thread), so the outputs are the same bits.

// The offer is a raw pointer to the owner's closure, valid while the owner waits for it.
#![allow(unsafe_code)]

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU8, Ordering};

/// Nothing offered.
const EMPTY: u8 = 0;
/// A part offered, not yet taken.
const OFFERED: u8 = 1;
/// The partner runs it.
const TAKEN: u8 = 2;
/// The partner ran it.
const DONE: u8 = 3;
/// The partner's run of it panicked.
const FAILED: u8 = 4;

/// How many times a thread checks on another (an offer, a meeting) before it offers its
/// core to others between checks: some microseconds, a pause being tens of cycles, about
/// what a part of a call or a layer's wait takes.
const SPINS_BEFORE_YIELDING: u32 = 2_000;

/// A thread's way of waiting on another: a pause between its first
/// [`SPINS_BEFORE_YIELDING`] checks, then its core offered to others between checks (where
/// threads outnumber cores, tests running side by side, the one waited for may need it).
#[derive(Default)]
pub(super) struct Spinner(u32);

impl Spinner {
    /// One pause, while the first checks last; false once they are over (nothing done).
    pub(super) fn spin(&mut self) -> bool {
        if self.0 >= SPINS_BEFORE_YIELDING {
            return false;
        }
        self.0 += 1;
        std::hint::spin_loop();
        true
    }

    /// A pause, or the core offered to others once the first checks are over.
    pub(super) fn pause(&mut self) {
        if !self.spin() {
            std::thread::yield_now();
        }
    }

    /// Back to the first checks (the thread did some work in between).
    pub(super) fn reset(&mut self) {
        self.0 = 0;
    }
}

/// The part `(1, 2)` of one call, offered by the owner to the partner.
pub(super) struct Partner {
    state: AtomicU8,
    /// The owner's `part(i, n)`, set before the state says [`OFFERED`].
    part: UnsafeCell<Option<*const (dyn Fn(usize, usize) + Sync)>>,
    /// Calls offered, and those the partner took.
    offered: std::sync::atomic::AtomicU64,
    taken: std::sync::atomic::AtomicU64,
    /// Offer every call that has parts, whatever its size, and wait a while for the
    /// partner to take each (tests of small shapes).
    every: bool,
}

// SAFETY: `part` is written by the owner only while no offer is out (state EMPTY, with the
// partner never reading it then) and read by the partner only after it took the offer
// (OFFERED -> TAKEN, whose Acquire orders the owner's write before the read); the owner waits
// for DONE or FAILED, or takes the offer back, before its closure goes away.
unsafe impl Sync for Partner {}

impl Partner {
    /// `every`: the owner offers every call that has parts, however small.
    pub(super) fn new(every: bool) -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            part: UnsafeCell::new(None),
            offered: Default::default(),
            taken: Default::default(),
            every,
        }
    }

    /// How many calls the owner offered and how many the partner took.
    pub(super) fn counts(&self) -> (u64, u64) {
        (self.offered.load(Ordering::Relaxed), self.taken.load(Ordering::Relaxed))
    }

    /// The owner's call: `part(1, 2)` offered, `part(0, 2)` run here, then `part(1, 2)` here
    /// too if the partner has not taken it, or else waited for.
    fn offer(&self, part: &(dyn Fn(usize, usize) + Sync)) {
        // SAFETY: only the lifetime is erased; the pointer is dereferenced only while this
        // call waits for it (`Retract` below, on every way out of this function).
        let erased: *const (dyn Fn(usize, usize) + Sync) = unsafe { std::mem::transmute(part) };
        // SAFETY: no offer is out (see the impl's comment).
        unsafe { *self.part.get() = Some(erased) };
        self.offered.fetch_add(1, Ordering::Relaxed);
        self.state.store(OFFERED, Ordering::Release);
        /// Takes the offer back or waits for the partner's run of it, however the owner's
        /// half ends (a panic in it included: the closure must outlive the partner's use).
        struct Retract<'a>(&'a Partner);
        impl Drop for Retract<'_> {
            fn drop(&mut self) {
                self.0.settle();
            }
        }
        let retract = Retract(self);
        if self.every {
            // Tests of small shapes: the partner must see the offers, whose halves take
            // less time than its way to the next check.
            self.wait_taken(std::time::Duration::from_millis(1));
        }
        part(0, 2);
        std::mem::forget(retract);
        match self.settle() {
            Settled::Back => part(1, 2),
            Settled::Ran => {}
            Settled::Failed => panic!("the second thread's part of a call panicked"),
        }
    }

    /// Waits until the offer is taken, or for `limit` at most.
    fn wait_taken(&self, limit: std::time::Duration) {
        let since = std::time::Instant::now();
        let mut spinner = Spinner::default();
        while self.state.load(Ordering::Acquire) == OFFERED && since.elapsed() < limit {
            spinner.pause();
        }
    }

    /// Takes the offer back (nobody took it) or waits until the partner has run it; leaves
    /// nothing offered.
    fn settle(&self) -> Settled {
        if self.state.compare_exchange(OFFERED, EMPTY, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Settled::Back;
        }
        let mut spinner = Spinner::default();
        loop {
            match self.state.load(Ordering::Acquire) {
                DONE => break,
                FAILED => {
                    self.state.store(EMPTY, Ordering::Relaxed);
                    return Settled::Failed;
                }
                _ => spinner.pause(),
            }
        }
        self.state.store(EMPTY, Ordering::Relaxed);
        Settled::Ran
    }

    /// The partner's check: runs the part on offer, if any; returns the nanoseconds it took
    /// (0: nothing was on offer).
    pub(super) fn serve(&self) -> u64 {
        if self.state.load(Ordering::Relaxed) != OFFERED
            || self.state.compare_exchange(OFFERED, TAKEN, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            return 0;
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        let began = std::time::Instant::now();
        /// Says DONE, or FAILED where the part panicked, so that the owner never waits forever.
        struct Finish<'a>(&'a Partner, bool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.state.store(if self.1 { DONE } else { FAILED }, Ordering::Release);
            }
        }
        let mut finish = Finish(self, false);
        // SAFETY: taken (OFFERED -> TAKEN): the owner set the pointer before offering and
        // waits for DONE or FAILED before its closure goes away.
        if let Some(part) = unsafe { *self.part.get() } {
            // SAFETY: as above.
            unsafe { (*part)(1, 2) };
        }
        finish.1 = true;
        drop(finish);
        began.elapsed().as_nanos() as u64
    }
}

enum Settled {
    Back,
    Ran,
    Failed,
}

/// This thread's part in a pair: the owner offers, the partner serves.
#[derive(Clone, Copy)]
enum Role {
    Owner(*const Partner),
    Partner(*const Partner),
}

thread_local! {
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

/// `f()` with this thread in `partner`'s pair, as the owner (`owner`) or the partner; the
/// thread's role is put back however `f` ends. `partner` must outlive `f`.
pub(super) fn paired<T>(partner: &Partner, owner: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Role>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROLE.with(|c| c.set(self.0));
        }
    }
    let p = partner as *const Partner;
    let _restore = Restore(ROLE.with(|c| c.replace(Some(if owner { Role::Owner(p) } else { Role::Partner(p) }))));
    f()
}

/// On an owner's thread ([`paired`]): `part` in two halves, the second offered to the
/// partner; elsewhere `part(0, 1)`.
pub(super) fn offer(part: &(dyn Fn(usize, usize) + Sync)) {
    match ROLE.with(Cell::get) {
        // SAFETY: `paired` keeps the partner alive while the role is set.
        Some(Role::Owner(p)) => unsafe { &*p }.offer(part),
        _ => part(0, 1),
    }
}

/// Whether this thread is an owner ([`paired`]) that offers a call of this size (`big`:
/// [`super::few_rows::worth_sharing`] says yes).
pub(super) fn offers(big: bool) -> bool {
    match ROLE.with(Cell::get) {
        // SAFETY: `paired` keeps the partner alive while the role is set.
        Some(Role::Owner(p)) => big || unsafe { &*p }.every,
        _ => false,
    }
}

/// Where this thread is a partner, runs the part on offer, if any; returns the nanoseconds
/// that took (0: nothing ran).
pub(super) fn serve() -> u64 {
    match ROLE.with(Cell::get) {
        // SAFETY: as in `offer`.
        Some(Role::Partner(p)) => unsafe { &*p }.serve(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use super::*;

    /// Waits (a while at most) until the offer is out of the owner's hands.
    fn until_taken(p: &Partner) {
        p.wait_taken(std::time::Duration::from_secs(5));
    }

    /// `f(partner)` with a second thread serving `partner` until `f` returns; returns
    /// what `f` gave.
    fn with_partner<T>(partner: &Partner, f: impl FnOnce() -> T) -> T {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                paired(partner, false, || {
                    while !stop.load(Ordering::Acquire) {
                        // A panicking part is the test's to see: the owner's offer says so.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve));
                        std::hint::spin_loop();
                    }
                })
            });
            let out = paired(partner, true, f);
            stop.store(true, Ordering::Release);
            out
        })
    }

    /// With nobody serving, the owner runs both halves itself, and a thread that is no
    /// owner runs the whole call; the offer is taken back each time.
    #[test]
    fn an_offer_nobody_takes_runs_on_the_owner() {
        let p = Partner::new(false);
        let parts = Mutex::new(Vec::new());
        let part = |i: usize, n: usize| parts.lock().expect("parts").push((i, n, std::thread::current().id()));
        paired(&p, true, || offer(&part));
        offer(&part);
        let me = std::thread::current().id();
        assert_eq!(*parts.lock().expect("parts"), vec![(0, 2, me), (1, 2, me), (0, 1, me)]);
        assert_eq!(p.counts(), (1, 0));
        assert_eq!(p.state.load(Ordering::Relaxed), EMPTY);
        assert!(!offers(true), "no owner outside `paired`");
        assert!(paired(&p, true, || offers(true) && !offers(false)));
        assert!(paired(&Partner::new(true), true, || offers(false)), "every call offered");
        assert!(!paired(&p, false, || offers(true)), "a partner offers nothing");
    }

    /// A served offer runs on the partner, and the owner returns only after it, seeing what
    /// it wrote; call after call.
    #[test]
    fn the_owner_waits_for_the_half_the_partner_took() {
        let p = Partner::new(false);
        let calls = 200;
        let written = AtomicUsize::new(0);
        let owner = std::thread::current().id();
        let on_partner = AtomicUsize::new(0);
        with_partner(&p, || {
            for call in 1..=calls {
                let slot = std::cell::Cell::new(0usize);
                struct Slot<'a>(&'a std::cell::Cell<usize>);
                // SAFETY (test): the owner reads the cell only after the partner's part is
                // done (the offer's Acquire), and the partner writes it only while taken.
                unsafe impl Sync for Slot<'_> {}
                let cell = Slot(&slot);
                offer(&|i, _| {
                    if i == 0 {
                        until_taken(&p);
                    } else {
                        let cell = &cell;
                        cell.0.set(call);
                        if std::thread::current().id() != owner {
                            on_partner.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                assert_eq!(slot.get(), call, "call {call}: the second half not done when the offer returned");
                written.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert_eq!(written.load(Ordering::Relaxed), calls);
        let (offered, taken) = p.counts();
        assert_eq!(offered, calls as u64);
        assert_eq!(taken, on_partner.load(Ordering::Relaxed) as u64);
        assert!(taken > calls as u64 / 2, "the partner took {taken} of {calls}");
    }

    /// A part that panics on the partner makes the owner's call panic after it; a panic in
    /// the owner's own half waits for the partner's half before it goes on.
    #[test]
    fn panics_end_the_call_after_both_halves() {
        let p = Partner::new(false);
        let owner = std::thread::current().id();
        let result = with_partner(&p, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                offer(&|i, _| {
                    if i == 0 {
                        until_taken(&p);
                    } else if std::thread::current().id() != owner {
                        panic!("a part fails");
                    }
                })
            }))
        });
        let taken = p.counts().1 == 1;
        assert_eq!(result.is_err(), taken, "the partner's panic reached the owner");
        assert_eq!(p.state.load(Ordering::Relaxed), EMPTY);

        let p = Partner::new(false);
        let second_done = AtomicBool::new(false);
        let result = with_partner(&p, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                offer(&|i, _| {
                    if i == 0 {
                        until_taken(&p);
                        panic!("the owner's half fails");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    second_done.store(true, Ordering::Release);
                })
            }))
        });
        assert!(result.is_err());
        if p.counts().1 == 1 {
            assert!(second_done.load(Ordering::Acquire), "the owner went on before the partner's half was done");
        }
        assert_eq!(p.state.load(Ordering::Relaxed), EMPTY);
    }
}
