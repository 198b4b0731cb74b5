//! How many threads a CPU decoding pass runs on (libtorch's OpenMP team, whose threads our
//! kernels' teams and the row split's pair are), chosen between passes from what the machine
//! leaves free.
//!
//! A team runs well only while each of its threads has a core. Where another runnable
//! thread shares the cores (another process, or the window's own software renderer drawing a
//! race), each meeting of the team waits for whichever thread the kernel put off: on two
//! cores with one busy process beside it, the demo's AR decoding ran at 397-547 tokens/s on
//! two threads and 924 on one (654-1,392 and 928 with the cores to itself; docs/BENCHMARKS.md,
//! sixty-second session). So, over windows of [`WINDOW`] spent inside passes (a demo race
//! lasts some 150 ms):
//! - the share of the window the deciding thread was kept from running (its wall time less
//!   its CPU time, inside passes only: a pass never sleeps unless it is put off, or waits for
//!   a team member that was) above [`CROWDED`] in [`CROWDED_WINDOWS`] windows in a row: a
//!   thread fewer, down to one;
//! - with fewer threads than at the start, at least [`FREE_CORE`] of a core idle on the
//!   machine (`/proc/stat`, in 10 ms ticks) over [`GROW_AFTER`] of uncrowded windows: a
//!   thread more (a core left free by a pause of the other work is not taken back at once).
//!
//! A window with more than [`STALE`] between its passes (nothing decoded for a while: a new
//! job, another state of the machine) decides nothing.
//!
//! Outputs are the same bits at any count (a test: the demo's prefill and decoding passes on
//! one thread and on two): every kernel's part computes its outputs the same way on any
//! thread. The count is each thread's own setting (OpenMP's), and a program turns this on
//! once ([`adapt`]: the `mtp` command line and the workbench); tests and libraries keep
//! libtorch's count. Training keeps it too: libtorch splits a long sum by thread (a tensor's
//! sum differs in its last bits between one thread and two), and a resumed run must equal an
//! uninterrupted one to the bit. Nothing changes where `OMP_NUM_THREADS` is set (libtorch's
//! own way to fix the count, for every thread and for training too), or off Linux.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The time inside passes a decision is made from.
pub const WINDOW: Duration = Duration::from_millis(30);

/// A window whose passes are this far apart in all (time outside them) decides nothing.
pub const STALE: Duration = Duration::from_secs(1);

/// The share of a window the deciding thread may be kept from running before the team
/// shrinks (in [`CROWDED_WINDOWS`] windows in a row). With one busy thread more than cores:
/// 0.47-0.51 here on two threads. Alone on its cores: under 0.03, but one window in some
/// thirty at 0.11-0.19 (a team's thread woken from sleep, the host's other guests).
pub const CROWDED: f64 = 0.25;

/// Crowded windows in a row that shrink the team.
pub const CROWDED_WINDOWS: u32 = 2;

/// The idle cores (averaged over [`GROW_AFTER`]) that let the team grow by a thread.
pub const FREE_CORE: f64 = 0.75;

/// The span of uncrowded windows whose idle cores decide whether the team grows.
pub const GROW_AFTER: Duration = Duration::from_millis(300);

/// The count libtorch started with, where this process adapts it (set once by [`adapt`]).
static STARTED_WITH: OnceLock<Option<i32>> = OnceLock::new();

/// Turn adaptation on for this process, where it applies (see the module's documentation).
/// Call once, before decoding, from the program's start.
pub fn adapt() {
    let _ = STARTED_WITH.get_or_init(|| {
        let applies =
            cfg!(target_os = "linux") && std::env::var_os("OMP_NUM_THREADS").is_none() && idle_ticks().is_some();
        let start = tch::get_num_threads();
        (applies && start > 1).then_some(start)
    });
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if ok { Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32) } else { Duration::ZERO }
}

/// The machine's idle and total time in clock ticks, all cores together (`/proc/stat`'s
/// first line: idle and iowait against everything), and its number of cores.
fn idle_ticks() -> Option<(u64, u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let first = lines.next()?;
    let fields: Vec<u64> = first.strip_prefix("cpu ")?.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    if fields.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user's).
    let total = fields.iter().take(8).sum();
    let cores = lines.filter(|l| l.starts_with("cpu")).count();
    Some((fields[3] + fields[4], total, cores.max(1)))
}

/// A window in progress on the deciding thread.
struct Window {
    /// When its first pass began.
    opened: Instant,
    /// `/proc/stat` then.
    ticks: Option<(u64, u64, usize)>,
    /// Wall and CPU time inside its passes.
    wall: Duration,
    cpu: Duration,
}

impl Window {
    /// A window opened now, `/proc/stat` read as `ticks`.
    fn open(ticks: Option<(u64, u64, usize)>) -> Self {
        Self { opened: Instant::now(), ticks, wall: Duration::ZERO, cpu: Duration::ZERO }
    }
}

/// The deciding thread's record.
struct Adapter {
    window: Window,
    /// Since when the windows were uncrowded at this count, and `/proc/stat` then.
    uncrowded: Option<(Instant, (u64, u64, usize))>,
    /// Crowded windows in a row up to the last.
    crowded: u32,
}

thread_local! {
    static ADAPTER: RefCell<Option<Adapter>> = const { RefCell::new(None) };
}

/// What one window says to do with the count (`now`, at most `max`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// A thread fewer.
    Fewer,
    /// A thread more.
    More,
    /// The count as it is.
    Keep,
}

/// The rule, apart from its measurements: `crowded` the windows in a row up to this one in
/// which the thread was kept from running more than [`CROWDED`] of the time, `idle_cores` the
/// cores idle on average over the uncrowded windows up to this one, where they span at least
/// [`GROW_AFTER`].
pub fn verdict(now: i32, max: i32, crowded: u32, idle_cores: Option<f64>) -> Verdict {
    if crowded > 0 {
        if now > 1 && crowded >= CROWDED_WINDOWS { Verdict::Fewer } else { Verdict::Keep }
    } else if now < max && idle_cores.is_some_and(|c| c >= FREE_CORE) {
        Verdict::More
    } else {
        Verdict::Keep
    }
}

/// Idle cores between two `/proc/stat` readings.
fn idle_between(a: (u64, u64, usize), b: (u64, u64, usize)) -> Option<f64> {
    let ((i0, t0, cores), (i1, t1, _)) = (a, b);
    (t1 > t0).then(|| i1.saturating_sub(i0) as f64 / (t1 - t0) as f64 * cores as f64)
}

/// One pass, timed for the count's choice: [`pass`] before it, dropped after it.
pub struct Pass {
    start: Option<(Instant, Duration)>,
}

/// Start timing one CPU pass (nothing where this process does not adapt).
pub fn pass() -> Pass {
    let adapting = STARTED_WITH.get().is_some_and(Option::is_some);
    Pass { start: adapting.then(|| (Instant::now(), thread_cpu())) }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let (Some((t0, c0)), Some(&Some(max))) = (self.start, STARTED_WITH.get()) else { return };
        let (wall, cpu) = (t0.elapsed(), thread_cpu().saturating_sub(c0));
        ADAPTER.with(|a| {
            let mut a = a.borrow_mut();
            let a = a.get_or_insert_with(|| Adapter {
                window: Window { opened: t0, ..Window::open(idle_ticks()) },
                uncrowded: None,
                crowded: 0,
            });
            a.window.wall += wall;
            a.window.cpu += cpu;
            if a.window.wall < WINDOW {
                return;
            }
            let ticks = idle_ticks();
            if a.window.opened.elapsed().saturating_sub(a.window.wall) > STALE {
                (a.uncrowded, a.crowded) = (None, 0);
            } else {
                let kept_off = 1.0 - a.window.cpu.as_secs_f64() / a.window.wall.as_secs_f64();
                a.crowded = if kept_off > CROWDED { a.crowded + 1 } else { 0 };
                if a.crowded > 0 {
                    a.uncrowded = None;
                } else if a.uncrowded.is_none() {
                    a.uncrowded = a.window.ticks.map(|t| (a.window.opened, t));
                }
                // The idle cores over the uncrowded span, once it is long enough.
                let span = a.uncrowded.filter(|(since, _)| since.elapsed() >= GROW_AFTER);
                let idle_cores = span.and_then(|(_, t)| idle_between(t, ticks?));
                if span.is_some() {
                    // Judged once: the next span starts here.
                    a.uncrowded = ticks.map(|t| (Instant::now(), t));
                }
                let now = tch::get_num_threads();
                let next = match verdict(now, max, a.crowded, idle_cores) {
                    Verdict::Fewer => now - 1,
                    Verdict::More => now + 1,
                    Verdict::Keep => now,
                };
                if next != now {
                    tracing::debug!(kept_off, ?idle_cores, "decoding threads {now} -> {next}");
                    tch::set_num_threads(next);
                    (a.uncrowded, a.crowded) = (None, 0);
                }
            }
            a.window = Window::open(ticks);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_when_crowded_and_grows_on_a_free_core() {
        assert_eq!(verdict(2, 2, CROWDED_WINDOWS, None), Verdict::Fewer);
        assert_eq!(verdict(2, 2, CROWDED_WINDOWS - 1, None), Verdict::Keep, "one crowded window is not enough");
        assert_eq!(verdict(1, 2, CROWDED_WINDOWS, Some(1.0)), Verdict::Keep, "never below one");
        assert_eq!(verdict(2, 2, 0, Some(1.0)), Verdict::Keep, "never above the start");
        assert_eq!(verdict(1, 2, 0, Some(0.5)), Verdict::Keep, "no free core");
        assert_eq!(verdict(1, 2, 0, None), Verdict::Keep, "the span not yet long enough");
        assert_eq!(verdict(1, 2, 0, Some(0.9)), Verdict::More);
        assert_eq!(verdict(3, 16, 1, Some(4.0)), Verdict::Keep, "not after a crowded window");
        assert_eq!(verdict(3, 16, 3, Some(4.0)), Verdict::Fewer, "crowded comes first");
        assert_eq!(idle_between((10, 100, 2), (19, 110, 2)), Some(1.8));
        assert_eq!(idle_between((10, 100, 2), (10, 100, 2)), None);
    }

    #[test]
    fn reads_the_machine() {
        if cfg!(target_os = "linux") {
            let (idle, total, cores) = idle_ticks().expect("/proc/stat");
            assert!(idle <= total && cores >= 1);
            let (a, b) = (thread_cpu(), {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                thread_cpu()
            });
            assert!(b > a, "a busy thread's CPU time grows");
        }
    }

    /// The premise of changing the count between passes: a model's logits, a prefill's and
    /// each decoding pass's, are the same bits on one thread and on two.
    #[test]
    fn the_same_bits_on_one_thread_and_on_two() {
        use crate::{LoadOptions, LoadedModel, ModelSource};
        use tch::{Kind, Tensor};
        let loaded = LoadedModel::load(&ModelSource::Demo, &LoadOptions::default(), &mut ()).expect("the demo");
        let model = &loaded.model;
        let _g = tch::no_grad_guard();
        let run = |threads: i32, len: i64| -> Vec<Tensor> {
            tch::set_num_threads(threads);
            let v = model.config.vocab_size as i64;
            let prompt =
                Tensor::arange(len, (Kind::Int64, tch::Device::Cpu)).multiply_scalar(7).remainder(v).unsqueeze(0);
            let mut cache = model.new_cache(len as usize + 20);
            let mut out = vec![model.forward(&prompt, Some(&mut cache))];
            for _ in 0..8 {
                let next = out.last().expect("a pass").select(1, -1).argmax(-1, false).unsqueeze(0);
                out.push(model.forward(&next, Some(&mut cache)));
            }
            out
        };
        let threads = tch::get_num_threads();
        for len in [5, 200] {
            let (two, one) = (run(2, len), run(1, len));
            tch::set_num_threads(threads);
            for (i, (a, b)) in two.iter().zip(&one).enumerate() {
                assert!(a.equal(b), "prompt of {len}: pass {i} differs between one thread and two");
            }
        }
    }
}
