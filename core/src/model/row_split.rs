//! A decoding pass's rows shared out between two threads for the whole stack of layers (the
//! CPU, f32, a model whose calls are too small to share one at a time): each thread takes a
//! share of the rows through every layer's norms, projections, rotation, SwiGLU and
//! residuals, and the threads meet once a layer, where attention needs every row's new keys
//! and values in the cache. No row moves between the threads, and each row is computed by the same operations
//! as when one thread takes them all (every kernel of a pass computes a row from that row
//! alone), so the outputs are the same bits: a speculative step's next-token rows stay AR's.
//!
//! Why: a thin model's calls (the launch-bound proxy's 3 to 20 us) are too small to share
//! one at a time (handing half a call to the other thread costs about what it saves,
//! docs/BENCHMARKS.md, forty-eighth session), so the second core did nothing for a step.
//! Here each thread pays the fixed costs of every operation on its own rows, and the extra
//! rows' arithmetic, the mask rows' above all, is split between the cores. AR's one row
//! stays on one thread.
//!
//! Where the first share's rows attend to none of the second's (a step's next-token rows come
//! first, and each row sees only rows before it), the meeting is one way: the first thread
//! goes on at once, and the second waits only for the first's keys and values of the layer
//! ([`Meeting::one_way`]). Each thread takes its rows through the final norm too, and the
//! first, which finishes before the other, can take the next-token rows' logits meanwhile
//! ([`head_on_first_rows`]).
//!
//! The shares start from an estimate of each row's arithmetic and move by a row at a time
//! towards the thread that waits ([`Balance`]); a pass whose threads mostly wait (another
//! program holds a core) puts the sharing off for a while ([`Backoff`]).
//!
//! The second thread also takes halves of the first thread's calls that are big enough to
//! share, between its own calls, at its waits and once its rows are through
//! ([`super::partner`]): the next-token rows' f32 products read every weight, and shared
//! by their columns they cost the first thread what an AR step's cost each core. With it a
//! model whose calls are big enough to share one at a time is shared out by rows too where
//! its f32 weights fit the last-level cache, in passes of a full 4-mask step's rows (the
//! demo, see [`wanted`]).
//!
//! `MTP_ROW_SPLIT=off` turns it off, `on` takes passes whose calls are big enough to share
//! one at a time too, whatever the model's size (see [`wanted`]); `MTP_ROW_SPLIT_PARTNER=off`
//! keeps the second thread off the first's calls; `MTP_ROW_SPLIT_WEIGHT` sets how many mask
//! rows a row without the adapter's term counts as in the estimate (in place of
//! [`row_weights`]'s).

// The threads share the pass's tensors (see `Shared`) and meet through atomics.
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use tch::{Device, Kind, Tensor};

use super::attention::{AttnMask, Pass};
use super::block::DecoderLayer;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Gate, Gated};
use super::norm::RmsNorm;
use super::partner::{Partner, Spinner};
use super::rope::RopeTables;

/// The fewest rows of a pass of a model whose calls are big enough to share one at a time
/// that is shared out by rows ([`wanted`]): a full 4-mask quadratic step. There the first
/// thread's next-token rows set a floor under the pass's time whatever its mask rows, so
/// fewer rows save little, where calls shared one at a time save in proportion. On the demo
/// (Zen 4, `mtp bench` with `auto`, whose steps leave out blocks down to 7-13 rows) its
/// steps of 7-10 rows took 1.16-1.38 ms shared out by rows against 1.15-1.29 ms for 25 rows,
/// and 0.80-1.24 ms for 9-13 rows with their calls shared one at a time; shared out from 6
/// rows, `auto` saw no cost in
/// rows, stopped leaving blocks out, and lost (speedup 1.47x -> 1.36x, medians of eight
/// rounds), from 16 rows it still lost in six rounds of eight, from 25 it gained (1.57x ->
/// 1.66x, five rounds; docs/BENCHMARKS.md, sixtieth session).
const MIN_ROWS_BIG_CALLS: i64 = 25;

/// The fewest rows a pass shares out. A 1-mask quadratic step's 4 rows on the proxy
/// (Zen 4 VM, `mtp bench`) cost 1.13-1.16 AR steps shared out against 1.19-1.24 on one
/// thread while the two vCPUs ran at full speed together, and 1.31-1.42 in the phases when
/// they did not (every shared step then slower, 9 rows at par, 25 still ahead): too little
/// to win against what it risks. 2 masks' 9 rows and more are shared out.
const MIN_ROWS: i64 = 6;

/// What a row's attention costs against its products, a multiply-add for a multiply-add:
/// the softmax's exponentials and the mask add about two fifths to the scores' and weighted
/// values' multiply-adds (forty-eighth session: a pass of eight rows over the proxy's 125
/// keys, 2,024 cycles of multiply-adds and about 900 of exponentials and masking).
const ATTENTION_FACTOR: f64 = 1.4;

/// How long a thread waits at a meeting before the pass gives up on sharing (a layer of a
/// pass that shares its rows takes tens of microseconds; a thread without a core waits for
/// the scheduler's next time slice, milliseconds).
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_millis(1);

/// What `MTP_ROW_SPLIT` asks for.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Setting {
    Off,
    Auto,
    On,
}

fn setting() -> Setting {
    static SETTING: OnceLock<Setting> = OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("MTP_ROW_SPLIT").as_deref().map(str::trim) {
        Ok("off") | Ok("0") => Setting::Off,
        Ok("on") | Ok("1") => Setting::On,
        _ => Setting::Auto,
    })
}

/// `MTP_ROW_SPLIT_WEIGHT`, where set: how many tail rows a row without the adapter's term
/// counts as, in place of [`row_weights`]'s estimate (to measure the balance).
fn weight_asked() -> Option<f64> {
    static WEIGHT: OnceLock<Option<f64>> = OnceLock::new();
    *WEIGHT.get_or_init(|| {
        std::env::var("MTP_ROW_SPLIT_WEIGHT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|w| w.is_finite() && *w > 0.0)
    })
}

/// Each of a pass's `t` rows' estimated time a layer, in multiply-adds of f32 products: its
/// products (a tail row's at the adapter's [`super::ProjDelta::tail_row_cost`]) and its
/// attention over `keys` cached rows. The fixed costs of each operation, the same for every
/// thread whatever its share, do not count.
fn row_weights(config: &ModelConfig, t: i64, untermed: i64, tail_cost: f64, keys: i64) -> Vec<f64> {
    let products = row_products(config) as f64;
    let attention = (config.num_heads * config.head_dim * 2) as f64 * keys as f64 * ATTENTION_FACTOR;
    let (plain, tail) = match weight_asked() {
        Some(w) => (w, 1.0),
        None => (products + attention, products * tail_cost + attention),
    };
    (0..t).map(|r| if r < untermed { plain } else { tail }).collect()
}

thread_local! {
    /// Whether this thread's passes may be shared out, and how many were.
    static ALLOWED: std::cell::Cell<(bool, u64)> = const { std::cell::Cell::new((true, 0)) };
}

/// Let this thread's decoding passes share their rows out between threads where they
/// qualify (`true`, the default) or never (the tests compare the outputs of the two, the
/// examples time them in turns in one process), forgetting the passes it has put off after
/// starved ones ([`Backoff`]); returns how many passes this thread has shared out so far.
pub fn split_rows(on: bool) -> u64 {
    // Asked again: what this thread learned of starved passes starts afresh.
    BACKOFF.with(|c| c.set(Backoff::FRESH));
    ALLOWED.with(|c| {
        let (_, count) = c.get();
        c.set((on, count));
        count
    })
}

thread_local! {
    /// Whether this thread's shared passes meet one way where their mask allows
    /// ([`Meeting::one_way`]), and how many did.
    static ONE_WAY: std::cell::Cell<(bool, u64)> = const { std::cell::Cell::new((true, 0)) };
}

/// Let this thread's shared passes meet one way where the first share's rows attend to none
/// of the second's (`true`, the default; [`Meeting::one_way`]) or always meet both ways once
/// a layer (the tests compare the outputs of the two, the examples time them in turns);
/// returns how many passes of this thread met one way so far.
pub fn one_way_meetings(on: bool) -> u64 {
    ONE_WAY.with(|c| {
        let (_, count) = c.get();
        c.set((on, count));
        count
    })
}

/// Which of the first thread's calls a shared-out pass offers the second thread
/// ([`super::partner`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartnerCalls {
    /// None: each thread takes its rows through every call alone.
    Off,
    /// Those big enough to share ([`super::few_rows::worth_sharing`]): the default.
    Big,
    /// Every call that has parts, however small, the first thread waiting up to 1 ms for
    /// the second to take each (tests of small shapes, whose calls are over before the
    /// second thread would look).
    Every,
}

thread_local! {
    /// Which calls this thread's shared passes offer, and how many the second threads took.
    static PARTNER: std::cell::Cell<(PartnerCalls, u64)> = std::cell::Cell::new((partner_default(), 0));
}

/// `MTP_ROW_SPLIT_PARTNER=off` turns [`super::partner`] off (to measure it).
fn partner_default() -> PartnerCalls {
    static CALLS: OnceLock<PartnerCalls> = OnceLock::new();
    *CALLS.get_or_init(|| match std::env::var("MTP_ROW_SPLIT_PARTNER").as_deref().map(str::trim) {
        Ok("off" | "0") => PartnerCalls::Off,
        _ => PartnerCalls::Big,
    })
}

/// Which of the first thread's calls this thread's shared passes offer the second thread
/// ([`PartnerCalls::Big`], the default unless `MTP_ROW_SPLIT_PARTNER=off`; the tests compare
/// the outputs of each, the examples time them in turns); returns how many calls the second
/// threads of this thread's passes took so far.
pub fn partner_calls(calls: PartnerCalls) -> u64 {
    PARTNER.with(|c| {
        let (_, count) = c.get();
        c.set((calls, count));
        count
    })
}

/// What [`head_on_first_rows`] asks of this thread's next shared pass, and what it gave.
#[derive(Default)]
struct EarlyHead {
    /// The head and how many first rows.
    asked: Option<(Tensor, i64)>,
    /// Their logits, where the pass took them.
    logits: Option<Tensor>,
}

thread_local! {
    static EARLY_HEAD: std::cell::RefCell<EarlyHead> =
        const { std::cell::RefCell::new(EarlyHead { asked: None, logits: None }) };
}

/// `f()`, a decoding pass of this thread, and where the pass's rows were shared out between
/// threads with its first `rows` rows in the first share, those rows' final hidden states
/// times `head` (`[vocab, d]`), multiplied by the first thread once its rows are through
/// the layers, while the other thread finishes its own: bit for bit what
/// [`super::linear::linear`] gives for them after the pass (a step's verification, its
/// next-token rows' logits). `None` where the pass did not give them.
pub fn head_on_first_rows<T>(head: &Tensor, rows: i64, f: impl FnOnce() -> T) -> (T, Option<Tensor>) {
    /// Clears the request however `f` ends.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            EARLY_HEAD.with(|c| *c.borrow_mut() = EarlyHead::default());
        }
    }
    EARLY_HEAD.with(|c| *c.borrow_mut() = EarlyHead { asked: Some((head.shallow_clone(), rows)), logits: None });
    let _clear = Clear;
    let out = f();
    let logits = EARLY_HEAD.with(|c| c.borrow_mut().logits.take());
    (out, logits)
}

/// One thread's share of a pass's rows, as its layers see it.
pub(super) struct RowPart<'a> {
    /// The cache row its first row is written at.
    pub at: i64,
    /// The cache rows attention reads: the committed ones and every row of the pass (with
    /// [`Meeting::one_way`], the first share's only up to its last row).
    pub keys: i64,
    meeting: &'a Meeting,
    /// Which thread of the team takes it.
    thread: usize,
    /// The layers whose meeting this thread has passed.
    layers: std::cell::Cell<usize>,
}

impl RowPart<'_> {
    /// Wait until the rows this thread's attention reads have been written by every thread
    /// (each thread calls this once a layer, after writing its own): every thread reaching
    /// this point of its layer, or with [`Meeting::one_way`], the first share going on at
    /// once and the second waiting for the first's rows of this layer. False when a thread
    /// failed (then every thread stops, and the pass runs again on one thread).
    pub fn meet(&self) -> bool {
        let layer = self.layers.get() + 1;
        self.layers.set(layer);
        self.meeting.meet(self.thread, layer)
    }

    /// Say that this thread cannot go on (its layer's in-place path did not apply).
    pub fn fail(&self) {
        self.meeting.failed.store(true, Ordering::Release);
    }
}

/// Where the threads of a team wait for each other once a layer: a counter and a
/// generation, waited on by spinning (a layer's wait is a few microseconds; sleeping and
/// waking through the OS would cost more than that), and a flag that releases every waiter
/// when one thread fails or panics, so that none waits forever.
struct Meeting {
    threads: AtomicUsize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    failed: AtomicBool,
    /// Nanoseconds the first two threads waited for the others, for [`Balance`].
    waited: [AtomicU64; 2],
    /// Set when a thread stopped waiting after [`WAIT_LIMIT`].
    gave_up: AtomicBool,
    /// The first share's rows attend to no row of the second's (a step's layouts put the
    /// next-token rows first, and each row sees only rows before it): the first thread never
    /// waits, and the second waits only for the first's keys and values of each layer
    /// (`written`). A meeting of both once a layer made each wait for the other's
    /// slowest moments, layer after layer: on the proxy's 4-mask steps the two threads
    /// waited 78 and 68 us a step at the meetings (`perf record` of `mtp bench`, fiftieth
    /// session); one way, the first only for the second at the end (35 us more there than
    /// before), the second 44 us.
    one_way: bool,
    /// With `one_way`: the layers whose rows the first thread has written.
    written: AtomicUsize,
    /// When the first two threads finished their shares, in nanoseconds from the pass's
    /// start: with `one_way` the first thread never waits at a meeting, so its share being
    /// too light shows only here.
    finished: [AtomicU64; 2],
    /// Set when the first thread is through its share: its partner stops serving it
    /// ([`super::partner`]).
    owner_done: AtomicBool,
}

impl Meeting {
    fn new(one_way: bool) -> Self {
        Self {
            threads: AtomicUsize::new(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            waited: [AtomicU64::new(0), AtomicU64::new(0)],
            gave_up: AtomicBool::new(false),
            one_way,
            written: AtomicUsize::new(0),
            finished: [AtomicU64::new(0), AtomicU64::new(0)],
            owner_done: AtomicBool::new(false),
        }
    }

    /// Thread `thread`'s wait at its `layer`th meeting (see [`RowPart::meet`]).
    fn meet(&self, thread: usize, layer: usize) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        if self.one_way && self.threads.load(Ordering::Relaxed) == 2 {
            if thread == 0 {
                // Its rows written (the store orders them before the other thread's reads).
                self.written.store(layer, Ordering::Release);
                return !self.failed.load(Ordering::Acquire);
            }
            return self.wait(thread, || self.written.load(Ordering::Acquire) >= layer);
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads.load(Ordering::Relaxed) {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            !self.failed.load(Ordering::Acquire)
        } else {
            self.wait(thread, || self.generation.load(Ordering::Acquire) != generation)
        }
    }

    /// Spin until `done()`, the time counted as `thread`'s wait; false when a thread
    /// failed, or this one waited past [`WAIT_LIMIT`] (then it fails the pass). A partner
    /// runs the owner's offered parts meanwhile ([`super::partner`]), their time not counted
    /// as waiting.
    fn wait(&self, thread: usize, done: impl Fn() -> bool) -> bool {
        let since = std::time::Instant::now();
        let mut spinner = Spinner::default();
        let mut helped = 0u64;
        while !done() {
            if self.failed.load(Ordering::Acquire) {
                return false;
            }
            let ns = super::partner::serve();
            if ns > 0 {
                helped += ns;
                spinner.reset();
                continue;
            }
            if spinner.spin() {
                continue;
            }
            if since.elapsed().saturating_sub(std::time::Duration::from_nanos(helped)) < WAIT_LIMIT {
                // Where the threads outnumber the cores (tests running side by side), the
                // thread waited for may need this one's core.
                std::thread::yield_now();
            } else {
                // The other thread has not had a core for a while: every thread stops at
                // its next meeting, and the pass runs again on one thread.
                self.gave_up.store(true, Ordering::Relaxed);
                self.failed.store(true, Ordering::Release);
                return false;
            }
        }
        if let Some(waited) = self.waited.get(thread) {
            waited.fetch_add((since.elapsed().as_nanos() as u64).saturating_sub(helped), Ordering::Relaxed);
        }
        !self.failed.load(Ordering::Acquire)
    }
}

/// The pass's tensors and the model's layers, read by every thread of the team.
struct Shared<'a> {
    layers: &'a [DecoderLayer],
    /// The model's final norm, each thread's rows through it at the end.
    norm: &'a RmsNorm,
    /// [`head_on_first_rows`]'s head and rows, for the first thread; its logits.
    head: Option<(Tensor, i64)>,
    logits: std::sync::Mutex<Option<Tensor>>,
    x: &'a Tensor,
    pass: &'a Pass<'a>,
    mask: &'a Tensor,
    cache: &'a KvCache,
    /// With two threads: the first's rows, `0..split` ([`Balance`]; never empty, nor are the
    /// second's).
    split: i64,
    /// `[1, t, d]`, contiguous: each thread writes its rows.
    out: *mut f32,
    d: usize,
    past: i64,
    t: i64,
    /// When the pass started.
    began: std::time::Instant,
    /// This thread's settings that the other threads take for the pass.
    amx: bool,
    /// With two threads, the second takes halves of the first's calls
    /// ([`super::partner`]).
    partner: Option<Partner>,
    #[cfg(test)]
    lanes16: Option<bool>,
}

// SAFETY: the threads only read the shared tensors (libtorch's tensors may be read from
// several threads at once: their metadata is not changed, their reference counts are
// atomic): the layers' weights, the pass's rows, rotation tables and mask, and the
// adapter, which says it may be called so ([`super::ProjDelta::rows_apart`]). Each thread
// writes only its own rows: of the cache buffers (rows `past + start..` of its share, not
// committed, made room for before the team starts, [`KvCache::write_rows`]) and of `out`.
// A thread reads the other's cache rows only after both have met (`Meeting`, whose atomics
// order the writes before the reads).
unsafe impl Sync for Shared<'_> {}

/// The final hidden states of `x` (`[1, t, d]`) through `layers` and the final `norm` with its rows shared out
/// between two threads, its keys and values written after the cache's committed rows (not
/// committed); `None`, and the cache's committed rows untouched, where the pass does not
/// qualify or a layer's in-place path does not apply (the caller then runs it on one
/// thread, writing the same rows again).
pub(super) fn forward(
    layers: &[DecoderLayer],
    norm: &RmsNorm,
    config: &ModelConfig,
    x: &Tensor,
    pass: &Pass,
    cache: &mut KvCache,
) -> Option<Tensor> {
    let size = x.size();
    let &[1, t, d] = size.as_slice() else { return None };
    let AttnMask::Custom(mask) = pass.mask else { return None };
    // Rows without the adapter's term (the first), what a tail row's products cost, and
    // whether the adapter lets the rows go apart.
    let (untermed, tail_cost, adapter_apart) = match pass.adapter {
        None => (t, 1.0, true),
        Some(Gated { delta, gate: Gate::Tail(start) }) => (*start, delta.tail_row_cost(), delta.rows_apart()),
        Some(_) => (t, 1.0, false),
    };
    let qualifies = wanted(config, untermed, t - untermed, tail_cost)
        && (MIN_ROWS..=super::few_rows::MAX_ROWS).contains(&t)
        && x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && !x.requires_grad()
        && pass.write_at.is_none()
        && !config.qk_norm
        && adapter_apart
        && super::attention::reads_in_place()
        && !super::few_rows::is_alone()
        && tch::get_num_threads() > 1
        // Last: only a pass that would share uses up one of those to put off.
        && backoff_go_ahead();
    if !qualifies {
        return None;
    }
    let x = x.contiguous();
    let past = cache.len() as i64;
    cache.reserve_rows([1, config.num_kv_heads as i64, config.head_dim as i64], Kind::Float, t);
    let balance = &BALANCE[t as usize];
    let out = Tensor::empty([1, t, d], (Kind::Float, Device::Cpu));
    let split = balance.split(&row_weights(config, t, untermed, tail_cost, past + t), t);
    let meeting = Meeting::new(ONE_WAY.with(|c| c.get().0) && sees_only_earlier(mask, past, split));
    let panic = std::sync::Mutex::new(None);
    let began = std::time::Instant::now();
    let shared = Shared {
        layers,
        norm,
        head: EARLY_HEAD.with(|c| c.borrow().asked.as_ref().map(|(head, rows)| (head.shallow_clone(), *rows))),
        logits: std::sync::Mutex::new(None),
        x: &x,
        pass,
        mask,
        cache,
        split,
        out: out.data_ptr() as *mut f32,
        d: d as usize,
        past,
        t,
        began,
        amx: super::int8::amx_asked(),
        partner: match PARTNER.with(|c| c.get().0) {
            PartnerCalls::Off => None,
            calls => Some(Partner::new(calls == PartnerCalls::Every)),
        },
        #[cfg(test)]
        lanes16: super::few_rows::tests::lanes_here(),
    };
    let ran = super::few_rows::in_team(2, &|i, n| {
        if i == 0 {
            meeting.threads.store(n, Ordering::Relaxed);
        }
        // Every thread must know the team's size before the first meeting: the first
        // thread sets it, the others wait for it (a team of one never waits).
        while n > 1 && meeting.threads.load(Ordering::Relaxed) != n {
            std::hint::spin_loop();
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_share(&shared, &meeting, i, n)));
        if let Err(payload) = result {
            meeting.failed.store(true, Ordering::Release);
            if let Ok(mut slot) = panic.lock() {
                slot.get_or_insert(payload);
            }
        }
    });
    if let Some(payload) = panic.into_inner().ok().flatten() {
        std::panic::resume_unwind(payload);
    }
    if meeting.gave_up.load(Ordering::Relaxed) {
        backoff_record(true);
    }
    let done = ran && !meeting.failed.load(Ordering::Acquire);
    if done && meeting.threads.load(Ordering::Relaxed) == 2 {
        let [mut first, mut second] = meeting.waited.each_ref().map(|w| w.load(Ordering::Relaxed) as i64);
        if meeting.one_way {
            // The thread that finished first waited at the end for the other.
            let [end0, end1] = meeting.finished.each_ref().map(|w| w.load(Ordering::Relaxed) as i64);
            first += (end1 - end0).max(0);
            second += (end0 - end1).max(0);
        }
        let took = began.elapsed().as_nanos() as i64;
        balance.learn(second - first, took / t);
        // More than half the two threads' time spent waiting: the other thread did not get
        // its core (other work on the machine, more threads than cores).
        backoff_record(first + second > took);
    }
    if let Some(partner) = &shared.partner {
        let taken = partner.counts().1;
        PARTNER.with(|c| c.set((c.get().0, c.get().1 + taken)));
    }
    if done {
        if let Some(logits) = shared.logits.lock().ok().and_then(|mut l| l.take()) {
            EARLY_HEAD.with(|c| c.borrow_mut().logits = Some(logits));
        }
        ALLOWED.with(|c| c.set((c.get().0, c.get().1 + 1)));
        if meeting.one_way {
            ONE_WAY.with(|c| c.set((c.get().0, c.get().1 + 1)));
        }
    }
    done.then_some(out)
}

/// Whether the first `split` rows of a pass under `mask` (`[.., t, past + t]`, additive or
/// boolean) attend to none of the rows after them: every value of those rows' keys from
/// `past + split` on is `-inf` (or `false`). Then the first share's attention over the keys
/// up to its last row gives the same bits as over all of them (a key it may not attend to
/// adds exact zeros), and it need not wait for the second share's keys. Anything else
/// (another layout of the mask, a finite value) says no.
fn sees_only_earlier(mask: &Tensor, past: i64, split: i64) -> bool {
    let size = mask.size();
    let [.., t, s] = size.as_slice() else { return false };
    let (t, s) = (*t, *s);
    let fits = size.iter().rev().skip(2).all(|&n| n == 1)
        && s == past + t
        && (1..t).contains(&split)
        && mask.device() == Device::Cpu
        && mask.is_contiguous();
    if !fits {
        return false;
    }
    let (first, count) = ((past + split) as usize, (t - split) as usize);
    let rows = (0..split as usize).map(|r| r * s as usize + first);
    match mask.kind() {
        Kind::Float => {
            // SAFETY: a contiguous CPU tensor of `t x s` f32 values; each row's values from
            // `first` on, `count` of them, lie within it.
            let data = unsafe { std::slice::from_raw_parts(mask.data_ptr() as *const f32, (t * s) as usize) };
            rows.into_iter().all(|at| data[at..at + count].iter().all(|&v| v == f32::NEG_INFINITY))
        }
        Kind::Bool => {
            // SAFETY: as above, one byte a value.
            let data = unsafe { std::slice::from_raw_parts(mask.data_ptr() as *const u8, (t * s) as usize) };
            rows.into_iter().all(|at| data[at..at + count].iter().all(|&v| v == 0))
        }
        _ => false,
    }
}

/// Whether this thread shares out a pass of `config`'s model with `untermed` rows without
/// the adapter's term and `tail` with it ([`Setting`]). For `auto`:
/// - where the pass's largest product (gate/up) is too small to be shared between the
///   threads by its columns ([`super::few_rows::worth_sharing`]);
/// - or, for a pass of [`MIN_ROWS_BIG_CALLS`] rows or more, where the model's f32 weights
///   fit the last-level cache and the second thread takes halves of the first's calls
///   ([`super::partner`]): the next-token rows' products, which
///   read every weight, are then shared by their columns as an AR step's are, and each
///   thread reads the int8 weights of its mask rows from the cache. The calls shared one at
///   a time, the team's way until the sixtieth session, move every row of every product
///   between the cores; on a VM whose vCPUs the host placed on two core complexes the demo's
///   4-mask step cost about 3.1 AR steps so, against 2.0 on one (docs/BENCHMARKS.md).
///
/// A model whose weights come from memory keeps the calls shared one at a time: each
/// thread's mask rows would read all of the int8 weights, twice the bytes a step reads now.
/// So does a process whose OpenMP team has more than two threads: a shared-out pass takes
/// two, a call shared one at a time all of them (measured only on two vCPUs).
fn wanted(config: &ModelConfig, untermed: i64, tail: i64, tail_cost: f64) -> bool {
    if !ALLOWED.with(|c| c.get().0) {
        return false;
    }
    match setting() {
        Setting::Off => false,
        Setting::On => true,
        Setting::Auto => {
            let weight = 2 * config.intermediate_size * config.hidden_size;
            let rows = untermed as f64 + tail as f64 * tail_cost;
            let calls_small = !super::few_rows::worth_sharing(super::few_rows::Work {
                bytes: weight * 4,
                f32_macs: weight as f64 * rows,
            });
            let in_cache = row_products(config) * config.num_layers * 4 <= super::huge_pages::last_level_cache();
            let pair = tch::get_num_threads() == 2;
            let rows_enough = untermed + tail >= MIN_ROWS_BIG_CALLS;
            calls_small || (in_cache && pair && rows_enough && PARTNER.with(|c| c.get().0) != PartnerCalls::Off)
        }
    }
}

/// The f32 multiply-adds of one row's projections in a layer.
fn row_products(config: &ModelConfig) -> usize {
    let (d, i) = (config.hidden_size, config.intermediate_size);
    d * (config.q_dim() + 2 * config.kv_dim()) + config.q_dim() * d + 3 * d * i
}

/// Thread `i` of `n`'s share of the pass: its rows through every layer, written into
/// `out`; stops (the meeting failed) where a layer's in-place path does not apply.
fn run_share(shared: &Shared, meeting: &Meeting, i: usize, n: usize) {
    // A thread that starts after the others gave up on it has nothing to do.
    if meeting.failed.load(Ordering::Acquire) {
        return;
    }
    // The team was asked for two threads; a runtime that gives one leaves it every row.
    let (start, rows) = match (n, i) {
        (2, 0) => (0, shared.split),
        (2, _) => (shared.split, shared.t - shared.split),
        _ => (0, shared.t),
    };
    let _grad = tch::no_grad_guard();
    let amx = super::int8::amx_asked();
    super::int8::use_amx(shared.amx);
    #[cfg(test)]
    let lanes16 = super::few_rows::tests::set_lanes(shared.lanes16);
    let through = || {
        super::few_rows::alone(|| share_through_layers(shared, meeting, i, start, rows));
        let end = shared.began.elapsed().as_nanos() as u64;
        if i == 0 {
            if let Some(at) = meeting.finished.first() {
                at.store(end, Ordering::Relaxed);
            }
            meeting.owner_done.store(true, Ordering::Release);
            return;
        }
        // The second thread serves the first until it is through: the time spent on its
        // calls counts as this thread's work, the rest as waiting at the end.
        let (mut helped, mut spinner) = (0, Spinner::default());
        while !meeting.owner_done.load(Ordering::Acquire) && !meeting.failed.load(Ordering::Acquire) {
            match super::partner::serve() {
                0 => spinner.pause(),
                ns => {
                    helped += ns;
                    spinner.reset();
                }
            }
        }
        if let Some(at) = meeting.finished.get(i) {
            at.store(end + helped, Ordering::Relaxed);
        }
    };
    match (&shared.partner, n) {
        (Some(partner), 2) => super::partner::paired(partner, i == 0, through),
        _ => through(),
    }
    super::int8::use_amx(amx);
    #[cfg(test)]
    super::few_rows::tests::set_lanes(lanes16);
}

/// [`run_share`]'s rows `start..start + rows` through every layer, into `out`.
fn share_through_layers(shared: &Shared, meeting: &Meeting, thread: usize, start: i64, rows: i64) {
    let pass = shared.pass;
    let rope = RopeTables {
        cos: pass.rope.cos.narrow(1, start, rows),
        sin_signed: pass.rope.sin_signed.narrow(1, start, rows),
    };
    // The first share of a one-way pass reads only the keys up to its last row (the rest,
    // which it may not attend to, the other thread may be writing).
    let keys = if meeting.one_way && thread == 0 { shared.past + rows } else { shared.past + shared.t };
    let mask = shared.mask.narrow(-2, start, rows);
    let mask = if keys < shared.past + shared.t { mask.narrow(-1, 0, keys).contiguous() } else { mask };
    // The adapter's term on this share's tail rows; a share without any runs as the base
    // model does.
    let gated = match pass.adapter {
        Some(Gated { delta, gate: Gate::Tail(s) }) if s - start < rows => {
            Some(Gated { delta: *delta, gate: Gate::Tail((s - start).max(0)) })
        }
        _ => None,
    };
    let part_pass = Pass { rope: &rope, mask: AttnMask::Custom(&mask), adapter: gated.as_ref(), write_at: None };
    let part = RowPart { at: shared.past + start, keys, meeting, thread, layers: std::cell::Cell::new(0) };
    let mut h = shared.x.narrow(1, start, rows);
    for layer in shared.layers {
        match layer.forward_part(&h, &part_pass, shared.cache, &part) {
            Some(next) => h = next,
            None => return,
        }
    }
    let h = shared.norm.forward(&h).contiguous();
    // The first thread's first rows through the head asked for, while the other thread may
    // still be on its layers (the first waits for it at the end).
    if let Some((head, n)) =
        shared.head.as_ref().filter(|&&(_, n)| thread == 0 && start == 0 && (1..=rows).contains(&n))
    {
        let n = *n;
        let logits = super::linear::linear(&h.narrow(1, 0, n).view([n, shared.d as i64]), head, None);
        if let Ok(mut slot) = shared.logits.lock() {
            *slot = Some(logits);
        }
    }
    let count = rows as usize * shared.d;
    // SAFETY: `h` is `[1, rows, d]` contiguous f32; `out` holds `t x d` values, of which
    // rows `start..start + rows` are this thread's alone.
    unsafe {
        std::ptr::copy_nonoverlapping(h.data_ptr() as *const f32, shared.out.add(start as usize * shared.d), count)
    };
}

/// How two threads' shares of a pass of some number of rows are moved from the estimate
/// ([`row_weights`]) by what they measure: where one thread waits for the other at the
/// meetings more than the other does, a row goes from the busier thread's share to the
/// other's. The estimate cannot know how fast each kernel runs on the CPU at hand (the proxy's
/// next-token rows' f32 products ran at half the FMA's rate on the Zen 4, its mask rows' int8
/// tiles near theirs). Which thread takes a row never changes its value, so this moves only
/// time.
struct Balance {
    /// Rows the first share gives to the second, beyond the estimate's split (negative: the
    /// other way).
    shift: AtomicI64,
    /// A running mean of how much longer the second thread waited than the first in a pass
    /// (nanoseconds; positive: the first was the busier).
    lean: AtomicI64,
}

/// [`Balance`] for each row count of a pass (one process may decode with several models in
/// turn: a shift only ever moves time, and a few passes correct it).
static BALANCE: [Balance; super::few_rows::MAX_ROWS as usize + 1] =
    [const { Balance { shift: AtomicI64::new(0), lean: AtomicI64::new(0) } }; super::few_rows::MAX_ROWS as usize + 1];

impl Balance {
    /// The first thread's rows of a pass of `t` rows weighing `weights`: the estimate's, then
    /// shifted, each thread keeping one row at least.
    fn split(&self, weights: &[f64], t: i64) -> i64 {
        let estimate = shares(weights, 2)[0].1;
        (estimate - self.shift.load(Ordering::Relaxed)).clamp(1, (t - 1).max(1))
    }

    /// Learn from a pass whose second thread waited `lean` nanoseconds longer than the first,
    /// a row of it taking about `row` nanoseconds (the pass's time over its rows: moving a
    /// row moves about twice that between the waits). Each pass's lean counts at most two
    /// rows' time (a thread descheduled for a while says nothing about the shares) and an
    /// eighth in the mean; a row moves once the mean leans by more than a row.
    fn learn(&self, lean: i64, row: i64) {
        let row = row.max(1);
        let mean = self.lean.load(Ordering::Relaxed);
        let mean = mean + (lean.clamp(-2 * row, 2 * row) - mean) / 8;
        let step = match mean {
            m if m > row => 1,
            m if m < -row => -1,
            _ => 0,
        };
        let bound = super::few_rows::MAX_ROWS;
        self.shift.store((self.shift.load(Ordering::Relaxed) + step).clamp(-bound, bound), Ordering::Relaxed);
        self.lean.store(if step == 0 { mean } else { 0 }, Ordering::Relaxed);
    }
}

/// After a pass whose threads mostly waited for each other, the passes that follow run on
/// one thread: while other work holds a core, a thread waits at every meeting for the other to
/// be given its core again (a scheduler's time slice, milliseconds, against a layer's
/// microseconds: the proxy's 2-mask steps cost 12-19 AR steps shared out while a build ran on
/// both cores, 1.6-1.8 on one thread). The first such pass costs the next [`FIRST_PENALTY`]
/// passes their sharing; each further one in a row doubles that, up to [`MAX_PENALTY`]; a
/// pass that shares well starts again from the first. Each decoding thread keeps its own.
///
/// The first penalty is short because a lone starved pass is common on a shared VM (the
/// host takes a vCPU away for a millisecond or more): with 256, the proxy's `mtp bench`
/// ran a third of its rounds mostly on one thread (2-mask steps 1.44 AR steps against
/// 1.26-1.34). Other work that keeps a core reaches the longest penalty after ten starved
/// passes in a row, each given up within [`WAIT_LIMIT`].
#[derive(Clone, Copy, Debug, PartialEq)]
struct Backoff {
    /// Passes left to run on one thread.
    skip: u64,
    /// How many the next starved pass costs.
    penalty: u64,
}

const FIRST_PENALTY: u64 = 8;
const MAX_PENALTY: u64 = 8192;

impl Backoff {
    const FRESH: Backoff = Backoff { skip: 0, penalty: FIRST_PENALTY };

    /// Whether this pass may share its rows out (else one of those to skip is used up).
    fn go_ahead(&mut self) -> bool {
        let go = self.skip == 0;
        self.skip = self.skip.saturating_sub(1);
        go
    }

    /// Learn from a shared pass: `starved` when its threads mostly waited.
    fn record(&mut self, starved: bool) {
        if starved {
            self.skip = self.penalty;
            self.penalty = (self.penalty * 2).min(MAX_PENALTY);
        } else {
            self.penalty = FIRST_PENALTY;
        }
    }
}

thread_local! {
    /// This thread's [`Backoff`].
    static BACKOFF: std::cell::Cell<Backoff> = const { std::cell::Cell::new(Backoff::FRESH) };
}

/// [`Backoff::go_ahead`] on this thread's.
fn backoff_go_ahead() -> bool {
    BACKOFF.with(|c| {
        let mut b = c.get();
        let go = b.go_ahead();
        c.set(b);
        go
    })
}

/// [`Backoff::record`] on this thread's.
fn backoff_record(starved: bool) {
    BACKOFF.with(|c| {
        let mut b = c.get();
        b.record(starved);
        c.set(b);
    });
}

/// `(first row, rows)` of each of `n` threads' shares of rows weighing `weights`: runs of
/// rows in order whose weights are as near the same as the rows allow.
fn shares(weights: &[f64], n: usize) -> Vec<(i64, i64)> {
    let total: f64 = weights.iter().sum();
    let mut shares = Vec::with_capacity(n);
    let (mut start, mut sum) = (0usize, 0.0);
    for i in 0..n {
        let goal = total * (i + 1) as f64 / n as f64;
        let mut end = start;
        // Take a row while doing so comes nearer the share's goal (the last takes the rest).
        while end < weights.len() && (i + 1 == n || (sum + weights[end] - goal).abs() <= (sum - goal).abs()) {
            sum += weights[end];
            end += 1;
        }
        shares.push((start as i64, (end - start) as i64));
        start = end;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass whose first thread keeps being the busier gives a row to the second once the
    /// mean leans by more than a row's time, and rows then go back the other way; a lean
    /// within a row's time, or one pass's long wait (a thread descheduled), moves nothing.
    #[test]
    fn balance_moves_rows_to_the_thread_that_waits() {
        let weights = vec![1.0; 10];
        let b = Balance { shift: AtomicI64::new(0), lean: AtomicI64::new(0) };
        assert_eq!(b.split(&weights, 10), 5);
        b.learn(1_000_000, 1000);
        assert_eq!(b.split(&weights, 10), 5, "one long wait");
        for _ in 0..100 {
            b.learn(-900, 1000);
        }
        assert_eq!(b.split(&weights, 10), 5, "a lean within a row's time");
        let passes = (0..100).take_while(|_| {
            b.learn(3000, 1000);
            b.split(&weights, 10) == 5
        });
        assert!(passes.count() < 20);
        assert_eq!(b.split(&weights, 10), 4, "the first thread's share lighter by a row");
        for _ in 0..200 {
            b.learn(-3000, 1000);
        }
        assert_eq!(b.split(&weights, 10), 9, "each thread keeps a row");
    }

    /// A starved pass puts off the next 8 passes' sharing, a second in a row 16, and so on up
    /// to 8192; a pass that shares well resets it.
    #[test]
    fn starved_passes_put_sharing_off() {
        let mut b = Backoff::FRESH;
        let skipped = |b: &mut Backoff| (0..100_000).take_while(|_| !b.go_ahead()).count();
        assert_eq!(skipped(&mut b), 0);
        b.record(true);
        assert_eq!(skipped(&mut b), 8);
        b.record(true);
        assert_eq!(skipped(&mut b), 16);
        for _ in 0..20 {
            b.record(true);
        }
        assert_eq!(skipped(&mut b), 8192);
        b.record(false);
        b.record(true);
        assert_eq!(skipped(&mut b), 8);
    }

    /// A mask whose first rows see none of the later rows' keys says so, additive or
    /// boolean; one such row that sees a later key, a finite value in place of `-inf`, or a
    /// split at the edge says no.
    #[test]
    fn one_way_where_the_first_rows_see_only_earlier_keys() {
        let (past, t) = (3i64, 5i64);
        // Row r sees the cached keys and the pass's rows up to its own.
        let allowed = Tensor::ones([t, past + t], (Kind::Bool, Device::Cpu)).tril_(past);
        let additive = Tensor::zeros([t, past + t], (Kind::Float, Device::Cpu))
            .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
            .view([1, 1, t, past + t]);
        for split in 1..t {
            assert!(sees_only_earlier(&allowed, past, split), "boolean, split {split}");
            assert!(sees_only_earlier(&additive, past, split), "additive, split {split}");
        }
        assert!(!sees_only_earlier(&allowed, past, 0) && !sees_only_earlier(&allowed, past, t));
        // Row 1 sees row 3's key: a split after row 1 (or 2) is one way no longer.
        let later = allowed.copy();
        let _ = later.get(1).get(past + 3).fill_(1);
        assert!(sees_only_earlier(&later, past, 1) && sees_only_earlier(&later, past, 4));
        assert!(!sees_only_earlier(&later, past, 2) && !sees_only_earlier(&later, past, 3));
        let finite = additive.copy();
        let _ = finite.get(0).get(0).get(0).get(past + 4).fill_(-1e30);
        assert!(!sees_only_earlier(&finite, past, 1));
        assert!(!sees_only_earlier(&allowed.to_kind(Kind::Int8), past, 1), "another kind");
        assert!(!sees_only_earlier(&allowed, past + 1, 1), "keys that are not the cache's and the pass's");
    }

    /// One way, the second thread's wait ends only once the first has written its rows of
    /// that layer (and sees them), layer after layer; the first never waits.
    #[test]
    fn one_way_meetings_order_the_first_threads_writes() {
        let meeting = Meeting::new(true);
        meeting.threads.store(2, Ordering::Relaxed);
        let layers = 200;
        let rows: Vec<AtomicUsize> = (0..layers).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                for (layer, row) in rows.iter().enumerate() {
                    row.store(layer + 1, Ordering::Relaxed);
                    assert!(meeting.meet(0, layer + 1));
                }
            });
            s.spawn(|| {
                for (layer, row) in rows.iter().enumerate() {
                    assert!(meeting.meet(1, layer + 1));
                    assert_eq!(row.load(Ordering::Relaxed), layer + 1, "layer {layer} read before it was written");
                }
            });
        });
        assert_eq!(meeting.waited[0].load(Ordering::Relaxed), 0, "the first thread waited");
        // A thread that fails releases the other.
        let failing = Meeting::new(true);
        failing.threads.store(2, Ordering::Relaxed);
        std::thread::scope(|s| {
            s.spawn(|| assert!(!failing.meet(1, 1)));
            s.spawn(|| failing.failed.store(true, Ordering::Release));
        });
    }

    /// The shares cover the rows in order, once each, with weights near each other.
    #[test]
    fn shares_cover_the_rows_evenly() {
        let weights: Vec<f64> = (0..25).map(|r| if r < 5 { 2.0 } else { 1.0 }).collect();
        assert_eq!(shares(&weights, 2), vec![(0, 10), (10, 15)]);
        assert_eq!(shares(&weights, 1), vec![(0, 25)]);
        let even = vec![1.0; 9];
        assert_eq!(shares(&even, 2), vec![(0, 5), (5, 4)]);
        let three = shares(&even, 3);
        assert_eq!(three, vec![(0, 3), (3, 3), (6, 3)]);
        // More threads than rows: the later shares are empty, none is lost.
        let few = shares(&[1.0, 1.0], 4);
        assert_eq!(few.iter().map(|s| s.1).sum::<i64>(), 2);
        assert!(few.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
    }
}
