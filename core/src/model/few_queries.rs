//! Attention for a few query rows on the CPU (f32, AVX2 and FMA): an AR step's one row, a
//! speculative step's 4 to 81, a prompt's prefill of up to [`MAX_ROWS`] tokens.
//!
//! libtorch's CPU kernel costs far more than its arithmetic at these sizes: on the Zen 4 of
//! docs/BENCHMARKS.md, with a width-64 model's heads (4 query heads, 2 key/value heads of
//! 16) over about 100 cached positions, 7-13 us at one query row, 17-30 at nine and 29-46
//! at 25, against a few microseconds of multiply-adds. Here, per key/value head, its keys
//! are transposed once into a scratch buffer; then the query rows of its query heads go
//! six at a time ([`ROWS`]): their scores eight keys at a time (two blocks of keys a pass,
//! so that twelve chains of multiply-adds run side by side and each key vector loaded serves
//! six rows), each row's softmax with a vectorised exp, and the weighted sum of the values
//! (each value vector loaded once for the six rows). The key/value heads (and the rows within
//! them) are shared out between the threads of libtorch's OpenMP team when the call is big
//! enough. The output is written as `[b, t, heads, hd]` (what the layer's output
//! projection reads) and returned as the usual `[b, heads, t, hd]` view.
//!
//! Where the products take sixteen lanes (AVX-512, `few_rows`; `MTP_CPU_LANES=8` keeps
//! eight), so does this kernel: eight query rows a pass, sixteen keys a vector, the value
//! columns 32 at a time. Only the softmax's sum of weights is added in another order, the
//! same for every call of the process. SmolLM2-135M's heads, 25 rows over 100 cached
//! positions: 56-73 us against 75-118 in eight lanes; over 500, 212-241 against 334-395
//! (docs/BENCHMARKS.md, "Attention in sixteen lanes").
//!
//! Every row is computed by the same operations whatever the other rows are, whichever
//! thread takes it, and whatever keys past its own are masked out (a masked key adds an
//! exact zero): so a speculative step's next-token rows equal an AR step's bit for bit.
//! For that, every call that decoding makes goes through this kernel or none does: the
//! choice depends on the dtype, the device, gradients, the mask's kind and the number of
//! query rows only (at most [`MAX_ROWS`]), never on the number of keys.
//!
//! A bf16 model's calls come here too, widened to f32 (queries, keys, values and an additive
//! mask; the output rounded back to bf16), so that its steps' next-token rows are AR's as
//! well: libtorch's bf16 kernel gives no such promise.
//!
//! Anything else (other dtypes or devices, gradients, more rows) goes to libtorch's kernel;
//! `MTP_CPU_ATTENTION=libtorch` sends everything there (to compare).

// Reads tensors through raw pointers and uses SIMD intrinsics: each `unsafe` says what it
// relies on.
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

/// The most query rows a call takes: a quadratic step has `(drafts + 1) x (masks + 1)`
/// (81 at 8 masks; up to 31 masks fit), and prompts' prefills of up to this many tokens
/// come here too, so that a batched prefill (a distillation's, padded, under a mask) and a
/// single one (causal) of the same prompt take the same kernel (their values may still
/// differ in the last bits where left padding moves the keys to other lanes). Measured as
/// fast as libtorch's kernel or faster up to here (`attention_kernels`); longer prompts
/// re-read the values too often.
pub const MAX_ROWS: i64 = 1024;

/// How many f32 multiply-adds of the few-row kernel one unit of a call's work (batch x
/// heads x rows x keys x head width: a score's and a weighted value's multiply-add, a share
/// of the softmax) counts as when [`super::few_rows::worth_sharing`] weighs the call: the
/// proxy's 25 rows over 125 keys (200k units) took 20 us on one thread (forty-sixth
/// session, `layer_ops`), where the products run 32 multiply-adds a nanosecond.
const UNIT_AS_F32_MACS: f64 = 3.2;

/// The share of [`super::few_rows::worth_sharing`]'s threshold from which a call's key/value
/// heads are shared out between threads: the products' threshold (20 us) also pays for
/// what a shared product costs the cache around it, while the heads' parts read separate
/// keys and values. A 1-mask step's four rows of the demo (8 heads of 32, estimated under
/// 20 us) ran on one thread while the other waited; shared, the step's forward took
/// 0.926-0.933 of the time (Zen 3, one process, 30 rounds in turns, faster in
/// 23-28 of them), its AR step and the steps of more rows (already shared) the same
/// (docs/BENCHMARKS.md, fifty-sixth session).
const SHARE_FRACTION: f64 = 0.5;

/// Query rows a pass takes together in eight lanes: twelve accumulators (two blocks of eight
/// keys' scores for six rows, or sixteen value columns of six rows), the two vectors of
/// keys or values and a broadcast in sixteen registers; each vector loaded serves six rows,
/// and twelve chains of multiply-adds run side by side where eight waited on the latency of
/// the one before. On a Zen 3 (one process, the fastest of 60 rounds of 100 calls, in turns)
/// the demo's heads over 125 keys: 25 rows 61-62 us against 63-64 with four rows a pass on one
/// thread, 41-45 against 50-53 on two; 9 rows 22 against 24, 17-18 against 19-20;
/// SmolLM2-135M's 25 rows 67-80 against 81-90 on two threads (docs/BENCHMARKS.md, fifty-fourth
/// session).
const ROWS: usize = 6;

/// Query rows a pass takes together in sixteen lanes (32 registers: two blocks of sixteen
/// keys' scores for eight rows, or 32 value columns of eight rows, in 16 accumulators).
const ROWS16: usize = 8;

/// Whether this kernel takes calls at all: the CPU has AVX2 and FMA, `MTP_CPU_ATTENTION`
/// does not say `libtorch`, and [`set_enabled`] did not switch it off.
pub fn runs() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    let available = *AVAILABLE.get_or_init(|| {
        let off = std::env::var("MTP_CPU_ATTENTION").is_ok_and(|v| v.eq_ignore_ascii_case("libtorch"));
        if off {
            DISABLED.store(true, Ordering::Relaxed);
        }
        super::few_rows::available()
    });
    available && !DISABLED.load(Ordering::Relaxed)
}

/// Set by [`set_enabled`] (or by `MTP_CPU_ATTENTION=libtorch`).
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Send this process's attention to this kernel (`true`, the default where it runs) or to
/// libtorch's: the examples time the two in turns in one process (the machine's speed
/// drifts too much between processes). Decoding with one and comparing its outputs to
/// decoding with the other is not meant to give the same bits.
pub fn set_enabled(on: bool) {
    let _ = runs();
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Scaled-dot-product attention of `q` (`[b, h, t, hd]`) over `k`, `v` (`[b, kv, s, hd]`,
/// `h` a multiple of `kv`, grouped-query heads shared by their query heads) under `mask`
/// (additive f32 or boolean, `true` = attend; `[t, s]` or `[1, 1, t, s]` shared by the
/// batch, or `[b, 1, t, s]`) or, with `causal`, query `i`
/// seeing keys `0..=i` (only for `s == t`). `None` when this kernel does not take the call
/// (see the module's documentation).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> Option<Tensor> {
    if [q, k, v].iter().all(|x| x.kind() == Kind::BFloat16) && may_take(q, k, v, mask) {
        // Widened: a bf16 value is exactly an f32 value, and the f32 kernel then decides
        // the rest (shapes, strides, the mask's shape); a call it never takes (on a GPU, for
        // training, a long prefill) is not widened only to be refused.
        let wide = |x: &Tensor| x.to_kind(Kind::Float);
        let mask = mask.map(|m| if m.kind() == Kind::BFloat16 { wide(m) } else { m.shallow_clone() });
        return attend(&wide(q), &wide(k), &wide(v), mask.as_ref(), causal, scale).map(|y| y.to_kind(Kind::BFloat16));
    }
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    let [b, h, t, hd] = qs[..] else { return None };
    let [kb, kv, s, khd] = ks[..] else { return None };
    let shapes = vs == ks && kb == b && khd == hd && b >= 1 && h >= 1 && t >= 1 && s >= 1 && hd >= 1;
    let tensors = [q, k, v]
        .iter()
        .all(|x| x.device() == Device::Cpu && x.kind() == Kind::Float && !x.requires_grad() && x.stride()[3] == 1);
    if !(shapes && tensors) {
        return None;
    }
    let view = |x: &Tensor| {
        let st = x.stride();
        View { ptr: x.data_ptr() as *const f32, strides: [st[0] as isize, st[1] as isize, st[2] as isize] }
    };
    let dims = Dims { b: b as usize, h: h as usize, kv: kv as usize, t: t as usize, s: s as usize, hd: hd as usize };
    let out = attend_views(dims, [view(q), view(k), view(v)], mask, causal, scale, &[b, t, h, hd])?;
    Some(out.transpose(1, 2))
}

/// Whether [`attend`] may take a call at all, judged without touching the tensors' data:
/// the kernel runs, every tensor lives on the CPU and needs no gradient, and the queries'
/// rows are within [`MAX_ROWS`]. What it decides before widening bf16 to f32.
fn may_take(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    let here = |x: &Tensor| x.device() == Device::Cpu && !x.requires_grad();
    let rows = q.size().get(2).is_some_and(|&t| (1..=MAX_ROWS).contains(&t));
    runs() && rows && [q, k, v].into_iter().chain(mask).all(here)
}

/// A call's sizes: batch entries, query heads, key/value heads, query rows, keys, head width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub s: usize,
    pub hd: usize,
}

/// [`attend`] over queries, keys and values read through `[q, k, v]` (f32 on the CPU, each a
/// `[b, heads, rows, hd]` reading of its data with a last stride of 1, alive until this
/// returns): the output in a new tensor of `out_size` holding `[b, t, h, hd]` (for example
/// `[b, t, h * hd]`, what the layer's output projection reads). A decoding pass's attention
/// reads its queries from the rotated projection and its keys and values from the cache
/// buffers this way, without a view of each. `None` (nothing computed) when this kernel does
/// not take the call: the sizes or the mask (see [`attend`]).
pub(crate) fn attend_views(
    dims: Dims,
    qkv: [View; 3],
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    out_size: &[i64],
) -> Option<Tensor> {
    let Dims { b, h, kv, t, s, hd } = dims;
    let shapes = b >= 1
        && kv > 0
        && h % kv == 0
        && hd % 8 == 0
        && hd <= 512
        && (1..=MAX_ROWS as usize).contains(&t)
        && s >= 1
        && (!causal || (s == t && mask.is_none()))
        && out_size.iter().product::<i64>() as usize == b * t * h * hd;
    if !shapes {
        return None;
    }
    let [q, k, v] = qkv;
    let mask_kind = match mask {
        None => Some(MaskKind::None),
        Some(m) if m.device() != Device::Cpu || m.requires_grad() => None,
        Some(m) => {
            // Its shape as it broadcasts to `[b, h, t, s]` (ones added in front): `[1, 1, t, s]`
            // (shared by the batch) or `[b, 1, t, s]` (one a batch entry); anything else
            // (one a head, rows sharing a row, ...) to libtorch.
            let size = m.size();
            if size.len() > 4 {
                return None;
            }
            let mut dims = [1i64; 4];
            dims[4 - size.len()..].copy_from_slice(&size);
            let b = b as i64;
            if dims[1] != 1 || dims[2] != t as i64 || dims[3] != s as i64 || (dims[0] != 1 && dims[0] != b) {
                return None;
            }
            let per_batch = dims[0] == b && b > 1;
            match m.kind() {
                Kind::Float => Some(MaskKind::Additive { per_batch }),
                Kind::Bool => Some(MaskKind::Allowed { per_batch }),
                _ => None,
            }
        }
    };
    let mask_kind = mask_kind?;
    if !runs() {
        return None;
    }
    let mask = mask.map(Tensor::contiguous);
    let out = Tensor::empty(out_size, (Kind::Float, Device::Cpu));
    let call = Call {
        b,
        h,
        kv,
        t,
        s,
        hd,
        scale: scale as f32,
        causal,
        q,
        k,
        v,
        mask: mask.as_ref().map_or(std::ptr::null(), |m| m.data_ptr() as *const u8),
        mask_kind,
        out: out.data_ptr() as *mut f32,
        lanes16: super::few_rows::sixteen_lanes(),
    };
    // The keys and values read, and the arithmetic.
    let work = super::few_rows::Work {
        bytes: b * kv * s * hd * 2 * std::mem::size_of::<f32>(),
        f32_macs: (b * h * t * s * hd) as f64 * UNIT_AS_F32_MACS,
    };
    #[cfg(target_arch = "x86_64")]
    super::few_rows::in_parts(super::few_rows::worth_sharing_from(work, SHARE_FRACTION), &|i, n| {
        // SAFETY: `runs()` checked AVX2 and FMA; every pointer in `call` reads data of the
        // sizes and strides it states (the caller's views; `mask` and `out` contiguous),
        // kept alive until `in_parts` returns; the parts write disjoint rows of `out`.
        unsafe { kernel::part(&call, i, n) }
    });
    #[cfg(not(target_arch = "x86_64"))]
    return None;
    Some(out)
}

/// What the mask holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MaskKind {
    None,
    /// f32 values added to the scores (`-inf`: not attended).
    Additive {
        per_batch: bool,
    },
    /// One byte a key: nonzero = attended.
    Allowed {
        per_batch: bool,
    },
}

/// A `[batch, heads, rows, hd]` reading of a tensor's data (element strides of the first
/// three; the last is 1).
#[derive(Clone, Copy)]
pub(crate) struct View {
    /// Where element `[0, 0, 0, 0]` is.
    pub ptr: *const f32,
    /// Elements from one batch entry, head and row to the next.
    pub strides: [isize; 3],
}

impl View {
    /// The `hd` values of batch entry `e`, head `head`, row `row`.
    ///
    /// # Safety
    /// The indices are within the tensor this view reads.
    unsafe fn row(&self, e: usize, head: usize, row: usize) -> *const f32 {
        let [se, sh, sr] = self.strides;
        // SAFETY: the caller keeps the indices in range; strides are the tensor's own.
        unsafe { self.ptr.offset(e as isize * se + head as isize * sh + row as isize * sr) }
    }
}

/// One call's sizes and data.
struct Call {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    hd: usize,
    scale: f32,
    causal: bool,
    q: View,
    k: View,
    v: View,
    mask: *const u8,
    mask_kind: MaskKind,
    out: *mut f32,
    /// Scores, softmax and weighted sums in sixteen lanes (AVX-512), as the products
    /// ([`super::few_rows`]) choose for the whole process.
    lanes16: bool,
}

// SAFETY: the parts of a call read its inputs and write disjoint rows of its output, each
// from its own thread, while `attend` keeps the tensors alive.
unsafe impl Sync for Call {}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Call, MaskKind, ROWS, ROWS16};
    use crate::model::few_rows::{avx2::lanes_sum, avx512::halves};

    /// The values from one row to the next of the transposed keys and of the scores, for
    /// `s` keys in blocks of `lanes`: whole blocks, and an odd number of 64-byte lines, so
    /// that the rows a pass reads at one column fall in different sets of the L1 cache
    /// (rows of 512 values, 2 KiB apart, all fell in two of its 64 sets: SmolLM2-135M's
    /// one-row attention over 500 keys took 47-52 us in sixteen lanes, 28-32 with this
    /// stride; 39-47 and 35-37 in eight).
    pub(super) fn row_stride(s: usize, lanes: usize) -> usize {
        ((s.div_ceil(lanes) * lanes).div_ceil(16) | 1) * 16
    }

    /// Sixteen f32 values on a 64-byte cache line.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([f32; 16]);

    /// One pass's query rows, `rows.len()` of them: [`rows_pass`] or [`rows_pass16`].
    type PassFn = unsafe fn(&Call, &[f32], &mut [f32], usize, usize, &[(usize, usize)]);

    /// Part `i` of `n`: the call's units (batch entry, key/value head) are cut into passes
    /// of up to [`ROWS`] query rows ([`ROWS16`] in sixteen lanes), numbered in order, and
    /// part `i` takes the `i`-th share of them.
    ///
    /// # Safety
    /// AVX2 and FMA are available (and AVX-512F and VL with `call.lanes16`); `call`'s
    /// pointers are valid for its sizes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn part(call: &Call, i: usize, n: usize) {
        // SAFETY: as this function's.
        unsafe {
            if call.lanes16 { part_in::<ROWS16>(call, i, n, 16, pass16) } else { part_in::<ROWS>(call, i, n, 8, pass8) }
        }
    }

    /// [`part`] in passes of up to `P` rows, the keys padded to a multiple of `lanes`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn part_in<const P: usize>(call: &Call, i: usize, n: usize, lanes: usize, pass: PassFn) {
        let group = call.h / call.kv;
        let queries = group * call.t;
        let passes = queries.div_ceil(P);
        let total = call.b * call.kv * passes;
        let (first, last) = (total * i / n, total * (i + 1) / n);
        let width = row_stride(call.s, lanes);
        // Keys of one key/value head transposed: `hd` rows of `width` (zero padded); and the
        // pass's scores. Both start on a cache line, so that no vector load of a block of
        // keys or scores straddles two (with sixteen lanes every one would). They are this
        // thread's buffers, taken for the call and given back after: a new zeroed pair each
        // call, once a layer (12 kB for the proxy's 25 rows), cost about 30 us of glibc's
        // allocator a step (docs/BENCHMARKS.md, forty-eighth session).
        let (mut key_lines, mut score_lines) = SCRATCH.take();
        for (lines, values) in [(&mut key_lines, call.hd * width), (&mut score_lines, P * width)] {
            if lines.len() < values.div_ceil(16) {
                lines.resize(values.div_ceil(16), Line([0.0; 16]));
            }
        }
        // SAFETY: `Line`s are 16 f32 values each, without padding; the slices cover the
        // first `hd x width` and `P x width` of them.
        let (keys, scores) = unsafe {
            (
                std::slice::from_raw_parts_mut(key_lines.as_mut_ptr() as *mut f32, call.hd * width),
                std::slice::from_raw_parts_mut(score_lines.as_mut_ptr() as *mut f32, P * width),
            )
        };
        let mut loaded = None;
        for item in first..last {
            let (unit, at) = (item / passes, item % passes);
            let (e, g) = (unit / call.kv, unit % call.kv);
            if loaded != Some(unit) {
                // SAFETY: `e < b`, `g < kv`; `keys` holds `hd x width` values.
                unsafe { transpose_keys(call, e, g, keys, width) };
                loaded = Some(unit);
            }
            // Query vector `x` of this unit: head `g * group + x / t`, row `x % t`.
            let from = at * P;
            let count = (queries - from).min(P);
            let mut rows = [(0, 0); P];
            for (r, row) in rows.iter_mut().enumerate().take(count) {
                *row = (g * group + (from + r) / call.t, (from + r) % call.t);
            }
            // SAFETY: as this function's; the rows' heads and indices are in range.
            unsafe { pass(call, keys, scores, e, g, &rows[..count]) };
        }
        SCRATCH.set((key_lines, score_lines));
    }

    thread_local! {
        /// [`part_in`]'s transposed keys and scores, kept between calls.
        static SCRATCH: std::cell::Cell<(Vec<Line>, Vec<Line>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// The keys a pass of `rows` reads: all of them, or with `causal` none after the pass's
    /// last row (a prompt's prefill then does half the work). A row's values do not change:
    /// the keys it may not attend add exact zeros.
    fn keys_seen(call: &Call, rows: &[(usize, usize)]) -> usize {
        if call.causal { call.s.min(rows.iter().map(|&(_, i)| i + 1).max().unwrap_or(1)) } else { call.s }
    }

    /// Where the output of `(head, row)` of batch entry `e` starts (`[b, t, heads, hd]`).
    ///
    /// # Safety
    /// The indices are within the call's sizes.
    unsafe fn out_row(call: &Call, e: usize, (head, row): (usize, usize)) -> *mut f32 {
        // SAFETY: the caller keeps the indices in range.
        unsafe { call.out.add(((e * call.t + row) * call.h + head) * call.hd) }
    }

    /// [`rows_pass`] for up to [`ROWS`] rows.
    ///
    /// # Safety
    /// As [`rows_pass`]'s.
    unsafe fn pass8(call: &Call, keys: &[f32], scores: &mut [f32], e: usize, g: usize, rows: &[(usize, usize)]) {
        // SAFETY: as this function's; `part` checked AVX2 and FMA.
        unsafe {
            match rows.len() {
                1 => rows_pass::<1>(call, keys, scores, e, g, rows),
                2 => rows_pass::<2>(call, keys, scores, e, g, rows),
                3 => rows_pass::<3>(call, keys, scores, e, g, rows),
                4 => rows_pass::<4>(call, keys, scores, e, g, rows),
                5 => rows_pass::<5>(call, keys, scores, e, g, rows),
                _ => rows_pass::<6>(call, keys, scores, e, g, rows),
            }
        }
    }

    /// [`rows_pass16`] for up to [`ROWS16`] rows.
    ///
    /// # Safety
    /// As [`rows_pass16`]'s.
    unsafe fn pass16(call: &Call, keys: &[f32], scores: &mut [f32], e: usize, g: usize, rows: &[(usize, usize)]) {
        // SAFETY: as this function's; `call.lanes16` says AVX-512F and VL are available.
        unsafe {
            match rows.len() {
                1 => rows_pass16::<1>(call, keys, scores, e, g, rows),
                2 => rows_pass16::<2>(call, keys, scores, e, g, rows),
                3 => rows_pass16::<3>(call, keys, scores, e, g, rows),
                4 => rows_pass16::<4>(call, keys, scores, e, g, rows),
                5 => rows_pass16::<5>(call, keys, scores, e, g, rows),
                6 => rows_pass16::<6>(call, keys, scores, e, g, rows),
                7 => rows_pass16::<7>(call, keys, scores, e, g, rows),
                _ => rows_pass16::<8>(call, keys, scores, e, g, rows),
            }
        }
    }

    /// The keys of batch entry `e`, key/value head `g`, transposed into `keys` (`hd` rows of
    /// `width`): blocks of eight keys by eight of the width through registers, the last
    /// keys (fewer than eight) one by one.
    ///
    /// # Safety
    /// As [`part`]; `e < b`, `g < kv`, `keys` holds `hd x width` values, `width >= s`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transpose_keys(call: &Call, e: usize, g: usize, keys: &mut [f32], width: usize) {
        let (s, hd) = (call.s, call.hd);
        let whole = s / 8 * 8;
        // SAFETY (whole body): key rows below `s`, `hd` values each (a multiple of 8);
        // stores within `hd x width`.
        unsafe {
            let dst = keys.as_mut_ptr();
            for j0 in (0..whole).step_by(8) {
                let rows: [*const f32; 8] = std::array::from_fn(|i| call.k.row(e, g, j0 + i));
                for d0 in (0..hd).step_by(8) {
                    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(d0)));
                    let t = [
                        _mm256_unpacklo_ps(r[0], r[1]),
                        _mm256_unpackhi_ps(r[0], r[1]),
                        _mm256_unpacklo_ps(r[2], r[3]),
                        _mm256_unpackhi_ps(r[2], r[3]),
                        _mm256_unpacklo_ps(r[4], r[5]),
                        _mm256_unpackhi_ps(r[4], r[5]),
                        _mm256_unpacklo_ps(r[6], r[7]),
                        _mm256_unpackhi_ps(r[6], r[7]),
                    ];
                    let u = [
                        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                    ];
                    let columns = [
                        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
                        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
                        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
                        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
                        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
                        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
                        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
                        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
                    ];
                    for (i, c) in columns.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((d0 + i) * width + j0), *c);
                    }
                }
            }
            for j in whole..s {
                let row = call.k.row(e, g, j);
                for d in 0..hd {
                    *dst.add(d * width + j) = *row.add(d);
                }
            }
            // The padding: the buffer is reused, and a padding key's score is masked anyway,
            // but a zero there can be neither a NaN nor slow.
            for d in 0..hd {
                std::ptr::write_bytes(dst.add(d * width + s), 0, width - s);
            }
        }
    }

    /// The first `R` of `rows` (head, query row) of batch entry `e`, key/value head `g`:
    /// scores, softmax and the weighted sum of the values, written to the output.
    ///
    /// # Safety
    /// As [`part`]; `keys` holds the head's keys transposed (`hd` rows of `width`, zero
    /// padded), `scores` room for `R` rows of `width`; `rows` holds at least `R`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_pass<const R: usize>(
        call: &Call,
        keys: &[f32],
        scores: &mut [f32],
        e: usize,
        g: usize,
        rows: &[(usize, usize)],
    ) {
        let hd = call.hd;
        let width = row_stride(call.s, 8);
        let s = keys_seen(call, &rows[..R]);
        let blocks = s.div_ceil(8);
        // SAFETY (whole body): every pointer below indexes within the slices and tensors
        // whose sizes `call` gives; loads and stores are unaligned.
        unsafe {
            let q: [*const f32; R] = std::array::from_fn(|r| call.q.row(e, rows[r].0, rows[r].1));
            let scale = _mm256_set1_ps(call.scale);
            let mut best = [_mm256_set1_ps(f32::NEG_INFINITY); R];
            let mut blk = 0;
            // Two blocks of eight keys a pass while two remain, then one.
            while blk < blocks {
                let two = blk + 1 < blocks;
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for d in 0..hd {
                    let k0 = _mm256_loadu_ps(keys.as_ptr().add(d * width + blk * 8));
                    let k1 = if two { _mm256_loadu_ps(keys.as_ptr().add(d * width + blk * 8 + 8)) } else { k0 };
                    for r in 0..R {
                        let x = _mm256_broadcast_ss(&*q[r].add(d));
                        acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
                        if two {
                            acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (half, a) in acc.iter().enumerate().take(if two { 2 } else { 1 }) {
                        let b = blk + half;
                        let x = masked(call, e, rows[r].1, b, _mm256_mul_ps(*a, scale));
                        _mm256_storeu_ps(scores.as_mut_ptr().add(r * width + b * 8), x);
                        best[r] = _mm256_max_ps(best[r], x);
                    }
                }
                blk += if two { 2 } else { 1 };
            }
            // Each row's softmax weights (not yet divided by their sum).
            let mut inverse = [_mm256_setzero_ps(); R];
            let mut empty = [false; R];
            for r in 0..R {
                let top = horizontal_max(best[r]);
                if top == f32::NEG_INFINITY {
                    // A row that may attend to nothing: zeros (our masks never make one).
                    empty[r] = true;
                    continue;
                }
                let top = _mm256_set1_ps(top);
                let mut total = _mm256_setzero_ps();
                let row = scores.as_mut_ptr().add(r * width);
                for b in 0..blocks {
                    let x = exp(_mm256_sub_ps(_mm256_loadu_ps(row.add(b * 8)), top));
                    total = _mm256_add_ps(total, x);
                    _mm256_storeu_ps(row.add(b * 8), x);
                }
                inverse[r] = _mm256_set1_ps(1.0 / lanes_sum(total));
            }
            // The weighted sums of the values, sixteen of the head's width at a time (eight
            // for the last when the width is an odd multiple of eight).
            let out: [*mut f32; R] = std::array::from_fn(|r| out_row(call, e, rows[r]));
            let mut c0 = 0;
            while c0 < hd {
                let wide = c0 + 16 <= hd;
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for j in 0..s {
                    let vj = call.v.row(e, g, j).add(c0);
                    let v0 = _mm256_loadu_ps(vj);
                    let v1 = if wide { _mm256_loadu_ps(vj.add(8)) } else { v0 };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let p = _mm256_broadcast_ss(&*scores.as_ptr().add(r * width + j));
                        acc[0] = _mm256_fmadd_ps(p, v0, acc[0]);
                        if wide {
                            acc[1] = _mm256_fmadd_ps(p, v1, acc[1]);
                        }
                    }
                }
                for r in 0..R {
                    let (a0, a1) = if empty[r] {
                        (_mm256_setzero_ps(), _mm256_setzero_ps())
                    } else {
                        (_mm256_mul_ps(acc[r][0], inverse[r]), _mm256_mul_ps(acc[r][1], inverse[r]))
                    };
                    _mm256_storeu_ps(out[r].add(c0), a0);
                    if wide {
                        _mm256_storeu_ps(out[r].add(c0 + 8), a1);
                    }
                }
                c0 += if wide { 16 } else { 8 };
            }
        }
    }

    /// [`rows_pass`] in sixteen lanes: the scores of sixteen keys a vector (two blocks a
    /// pass), the softmax sixteen scores at a time and the weighted sums of the values 32
    /// columns at a time (16, then 8 for what is left). Every score and every weighted sum
    /// is the same sequence of operations as in eight lanes; only the softmax's sum of
    /// weights is added in another order (sixteen lanes, then eight, then one), the same
    /// for every row of every call.
    ///
    /// # Safety
    /// As [`rows_pass`]'s, with AVX-512F and VL available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn rows_pass16<const R: usize>(
        call: &Call,
        keys: &[f32],
        scores: &mut [f32],
        e: usize,
        g: usize,
        rows: &[(usize, usize)],
    ) {
        let hd = call.hd;
        let width = row_stride(call.s, 16);
        let s = keys_seen(call, &rows[..R]);
        let blocks = s.div_ceil(16);
        // SAFETY (whole body): every pointer below indexes within the slices and tensors
        // whose sizes `call` gives; loads and stores are unaligned.
        unsafe {
            let mut q = [std::ptr::null::<f32>(); R];
            for (r, q) in q.iter_mut().enumerate() {
                *q = call.q.row(e, rows[r].0, rows[r].1);
            }
            let scale = _mm512_set1_ps(call.scale);
            let mut best = [_mm512_set1_ps(f32::NEG_INFINITY); R];
            let mut blk = 0;
            while blk < blocks {
                let two = blk + 1 < blocks;
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                for d in 0..hd {
                    let k0 = _mm512_loadu_ps(keys.as_ptr().add(d * width + blk * 16));
                    let k1 = if two { _mm512_loadu_ps(keys.as_ptr().add(d * width + blk * 16 + 16)) } else { k0 };
                    for (acc, q) in acc.iter_mut().zip(&q) {
                        let x = _mm512_set1_ps(*q.add(d));
                        acc[0] = _mm512_fmadd_ps(x, k0, acc[0]);
                        if two {
                            acc[1] = _mm512_fmadd_ps(x, k1, acc[1]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (half, a) in acc.iter().enumerate().take(if two { 2 } else { 1 }) {
                        let b = blk + half;
                        let x = masked16(call, e, rows[r].1, b, _mm512_mul_ps(*a, scale));
                        _mm512_storeu_ps(scores.as_mut_ptr().add(r * width + b * 16), x);
                        best[r] = _mm512_max_ps(best[r], x);
                    }
                }
                blk += if two { 2 } else { 1 };
            }
            let mut inverse = [_mm512_setzero_ps(); R];
            let mut empty = [false; R];
            for r in 0..R {
                let top = _mm512_reduce_max_ps(best[r]);
                if top == f32::NEG_INFINITY {
                    empty[r] = true;
                    continue;
                }
                let top = _mm512_set1_ps(top);
                let mut total = _mm512_setzero_ps();
                let row = scores.as_mut_ptr().add(r * width);
                for b in 0..blocks {
                    let x = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(b * 16)), top));
                    total = _mm512_add_ps(total, x);
                    _mm512_storeu_ps(row.add(b * 16), x);
                }
                let (lo, hi) = halves(total);
                inverse[r] = _mm512_set1_ps(1.0 / lanes_sum(_mm256_add_ps(lo, hi)));
            }
            let mut out = [std::ptr::null_mut::<f32>(); R];
            for (r, out) in out.iter_mut().enumerate() {
                *out = out_row(call, e, rows[r]);
            }
            let p = |r: usize, j: usize| *scores.as_ptr().add(r * width + j);
            let mut c0 = 0;
            while c0 + 16 <= hd {
                // Two vectors of columns while two fit, then one.
                let wide = c0 + 32 <= hd;
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                for j in 0..s {
                    let vj = call.v.row(e, g, j).add(c0);
                    let v0 = _mm512_loadu_ps(vj);
                    let v1 = if wide { _mm512_loadu_ps(vj.add(16)) } else { v0 };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_ps(p(r, j));
                        acc[0] = _mm512_fmadd_ps(w, v0, acc[0]);
                        if wide {
                            acc[1] = _mm512_fmadd_ps(w, v1, acc[1]);
                        }
                    }
                }
                for r in 0..R {
                    for (half, a) in acc[r].iter().enumerate().take(if wide { 2 } else { 1 }) {
                        let a = if empty[r] { _mm512_setzero_ps() } else { _mm512_mul_ps(*a, inverse[r]) };
                        _mm512_storeu_ps(out[r].add(c0 + 16 * half), a);
                    }
                }
                c0 += if wide { 32 } else { 16 };
            }
            if c0 < hd {
                // The last eight columns (`hd` an odd multiple of eight).
                let mut acc = [_mm256_setzero_ps(); R];
                for j in 0..s {
                    let v0 = _mm256_loadu_ps(call.v.row(e, g, j).add(c0));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(_mm256_set1_ps(p(r, j)), v0, *acc);
                    }
                }
                for r in 0..R {
                    let a = if empty[r] {
                        _mm256_setzero_ps()
                    } else {
                        _mm256_mul_ps(acc[r], _mm512_castps512_ps256(inverse[r]))
                    };
                    _mm256_storeu_ps(out[r].add(c0), a);
                }
            }
        }
    }

    /// Where the mask's value for key `key` of query row `i` (batch entry `e`) is, in values
    /// from its start: a `[t, s]` mask shared by the batch, or one a batch entry.
    fn mask_at(call: &Call, e: usize, i: usize, key: usize, per_batch: bool) -> usize {
        (if per_batch { e * call.t * call.s } else { 0 }) + i * call.s + key
    }

    /// Block `b`'s sixteen scores `x` of query row `i` with the mask applied: its two
    /// halves as [`masked`] gives them, a half wholly past the last key `-inf`.
    ///
    /// # Safety
    /// As [`rows_pass16`]; `16 b < s`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    unsafe fn masked16(call: &Call, e: usize, i: usize, b: usize, x: __m512) -> __m512 {
        if !call.causal && (b + 1) * 16 <= call.s {
            // A whole block of keys: the same values as the two halves give, in one go (a
            // step's rows mask every block of the cache this way).
            let at = |per_batch: bool| mask_at(call, e, i, b * 16, per_batch);
            // SAFETY: the mask holds `t x s` values (or `b x t x s`), one byte a key for a
            // boolean mask, four for an additive one; keys 16 b..16 b + 16 lie below `s`.
            unsafe {
                return match call.mask_kind {
                    MaskKind::None => x,
                    MaskKind::Additive { per_batch } => {
                        _mm512_add_ps(x, _mm512_loadu_ps((call.mask as *const f32).add(at(per_batch))))
                    }
                    MaskKind::Allowed { per_batch } => {
                        let bytes = _mm_loadu_si128(call.mask.add(at(per_batch)) as *const __m128i);
                        let no = _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_setzero_si512());
                        _mm512_mask_mov_ps(x, no, _mm512_set1_ps(f32::NEG_INFINITY))
                    }
                };
            }
        }
        let (lo, hi) = halves(x);
        // SAFETY: block 2b starts before `s`; block 2b + 1 is masked only where it does.
        unsafe {
            let lo = masked(call, e, i, 2 * b, lo);
            let hi = if (2 * b + 1) * 8 < call.s {
                masked(call, e, i, 2 * b + 1, hi)
            } else {
                _mm256_set1_ps(f32::NEG_INFINITY)
            };
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
            ))
        }
    }

    /// Block `b`'s eight scores `x` of query row `i` (batch entry `e`) with the mask
    /// applied: `-inf` where the key may not be attended or lies past the last key.
    ///
    /// # Safety
    /// As [`rows_pass`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn masked(call: &Call, e: usize, i: usize, b: usize, x: __m256) -> __m256 {
        let s = call.s;
        let first = b * 8;
        let valid = (s - first).min(8);
        let minus = _mm256_set1_ps(f32::NEG_INFINITY);
        // SAFETY: the mask holds `t x s` values (or `b x t x s`), one byte a key for a
        // boolean mask, four for an additive one; only keys below `s` are read.
        unsafe {
            let row = |per_batch: bool| mask_at(call, e, i, first, per_batch);
            let mut x = match call.mask_kind {
                MaskKind::None => x,
                MaskKind::Additive { per_batch } => {
                    let m = (call.mask as *const f32).add(row(per_batch));
                    let add = if valid == 8 {
                        _mm256_loadu_ps(m)
                    } else {
                        let mut lanes = [0f32; 8];
                        lanes[..valid].copy_from_slice(std::slice::from_raw_parts(m, valid));
                        _mm256_loadu_ps(lanes.as_ptr())
                    };
                    _mm256_add_ps(x, add)
                }
                MaskKind::Allowed { per_batch } => {
                    let m = call.mask.add(row(per_batch));
                    let mut bytes = [0u8; 8];
                    bytes[..valid].copy_from_slice(std::slice::from_raw_parts(m, valid));
                    let wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr() as *const __m128i));
                    let no = _mm256_castsi256_ps(_mm256_cmpeq_epi32(wide, _mm256_setzero_si256()));
                    _mm256_blendv_ps(x, minus, no)
                }
            };
            if call.causal && first + 7 > i {
                // Keys after the row's own position (`s == t`).
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let key = _mm256_add_epi32(lane, _mm256_set1_epi32(first as i32));
                let after = _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, _mm256_set1_epi32(i as i32)));
                x = _mm256_blendv_ps(x, minus, after);
            }
            if valid < 8 {
                // Padding keys count for nothing.
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let past = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(valid as i32 - 1)));
                x = _mm256_blendv_ps(x, minus, past);
            }
            x
        }
    }

    /// The largest of the eight lanes of `x`.
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_max(x: __m256) -> f32 {
        let x = _mm256_max_ps(x, _mm256_permute2f128_ps(x, x, 1));
        let x = _mm256_max_ps(x, _mm256_permute_ps(x, 0b01_00_11_10));
        let x = _mm256_max_ps(x, _mm256_permute_ps(x, 0b10_11_00_01));
        _mm256_cvtss_f32(x)
    }

    /// e^x lane by lane, to within two units in the last place for x <= 0 (what the softmax
    /// takes); -inf gives 0. e^x = 2^n e^r with n the integer nearest x / ln 2 and
    /// |r| <= ln 2 / 2, e^r by its Taylor series to the 7th power (Horner), 2^n built in the
    /// exponent bits.
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        // ln 2 split in a part exact in few bits and the rest, so that n ln 2 subtracts exactly.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const INV: [f32; 8] = [1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
        let zero = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(INV[7]);
        for &c in INV[..7].iter().rev() {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        let e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        _mm256_andnot_ps(zero, e)
    }

    /// [`exp`] in sixteen lanes: the same operations lane by lane, so the same values.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    fn exp16(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const INV: [f32; 8] = [1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.0));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(INV[7]);
        for &c in INV[..7].iter().rev() {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(bits)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The vectorised exp against the standard library's, over the softmax's range.
        #[test]
        fn exp_within_two_ulp() {
            if !crate::model::few_rows::available() {
                return;
            }
            let mut worst = 0u32;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let lanes = [x, x * 0.5, x * 0.25, x * 0.125, x * 1e-3, x * 1e-6, -0.0, x * 0.75];
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and FMA checked above.
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp(_mm256_loadu_ps(lanes.as_ptr()))) };
                for (g, l) in got.iter().zip(lanes) {
                    let want = l.exp();
                    worst = worst.max(g.to_bits().abs_diff(want.to_bits()));
                }
                x += 0.0137;
            }
            assert!(worst <= 2, "{worst} ulp");
            let mut got = [1f32; 8];
            let lanes = [f32::NEG_INFINITY, -100.0, -88.0, -87.5, 0.0, -1.0, -2.0, -3.0];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp(_mm256_loadu_ps(lanes.as_ptr()))) };
            assert_eq!(&got[..4], &[0.0; 4]);
            assert_eq!(got[4], 1.0);
        }

        /// In sixteen lanes, every lane's value is the eight-lane function's, bit for bit.
        #[test]
        fn exp16_equals_exp() {
            if !(crate::model::few_rows::available() && std::arch::is_x86_feature_detected!("avx512f")) {
                return;
            }
            let mut x = -90.0f32;
            let mut values = vec![f32::NEG_INFINITY, -0.0, 0.0];
            while x <= 0.0 {
                values.push(x);
                x += 0.0093;
            }
            values.resize(values.len().div_ceil(16) * 16, -1.0);
            for block in values.chunks(16) {
                let (mut eight, mut sixteen) = ([0f32; 16], [0f32; 16]);
                // SAFETY: AVX2, FMA and AVX-512F checked above; 16 values each.
                unsafe {
                    _mm256_storeu_ps(eight.as_mut_ptr(), exp(_mm256_loadu_ps(block.as_ptr())));
                    _mm256_storeu_ps(eight.as_mut_ptr().add(8), exp(_mm256_loadu_ps(block.as_ptr().add(8))));
                    _mm512_storeu_ps(sixteen.as_mut_ptr(), exp16(_mm512_loadu_ps(block.as_ptr())));
                }
                assert_eq!(eight.map(f32::to_bits), sixteen.map(f32::to_bits), "{block:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libtorch(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> Tensor {
        let grouped = q.size()[1] != k.size()[1];
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, grouped)
    }

    /// Against libtorch's kernel, in eight lanes and in sixteen (where the CPU has them):
    /// grouped heads, head widths 8 to 128, 1 to 81 rows, no mask, additive and boolean
    /// masks, causal, batches with a mask each, q/k/v as the layer hands them over (strided
    /// views of the projection's output and of the cache); and each row alone gives the
    /// same bits as among the others, with the keys past it masked or absent (an AR step
    /// against a speculative step's next-token row).
    #[test]
    fn equals_libtorch_within_rounding() {
        for sixteen in [false, true] {
            crate::model::few_rows::tests::with_lanes(sixteen, equals_libtorch_within_rounding_in_lanes);
        }
    }

    fn equals_libtorch_within_rounding_in_lanes() {
        if !runs() {
            return;
        }
        tch::manual_seed(5);
        let o = (Kind::Float, Device::Cpu);
        let mut compared = 0;
        for (h, kv, hd) in [(4, 2, 16), (9, 3, 64), (8, 8, 24), (4, 1, 128), (2, 2, 8)] {
            for (b, t, past) in [
                (1, 1, 0),
                (1, 1, 37),
                (1, 4, 20),
                (1, 9, 100),
                (1, 25, 3),
                (3, 5, 12),
                (1, 81, 40),
                (1, 30, 0),
                (2, 7, 0),
            ] {
                let s = past + t;
                let qkv = Tensor::randn([b, t, h + 2 * kv, hd], o);
                let q = qkv.narrow(2, 0, h).transpose(1, 2);
                let cache = Tensor::randn([2, b, kv, s + 17, hd], o);
                let (k, v) = (cache.get(0).narrow(2, 0, s), cache.get(1).narrow(2, 0, s));
                // Random, but every row sees at least its own position.
                let own = Tensor::eye_m(t, s, (Kind::Bool, Device::Cpu)).roll([past], [1]);
                let allowed = Tensor::rand([b, 1, t, s], o).gt(0.3).logical_or(&own);
                let additive = Tensor::zeros([b, 1, t, s], o).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
                let shared = additive.get(0).get(0);
                let scale = (hd as f64).powf(-0.5);
                let mut cases: Vec<(Option<&Tensor>, bool)> =
                    vec![(None, false), (Some(&additive), false), (Some(&allowed), false), (Some(&shared), false)];
                if past == 0 {
                    cases.push((None, true));
                }
                for (mask, causal) in cases {
                    let what = format!("{h}/{kv} heads of {hd}, batch {b}, {t} rows over {s}, causal {causal}");
                    let Some(got) = attend(&q, &k, &v, mask, causal, scale) else {
                        panic!("the kernel did not take {what}");
                    };
                    assert_eq!(got.size(), [b, h, t, hd]);
                    let want = libtorch(&q, &k, &v, mask, causal, scale);
                    let diff = (&got - &want).abs().max().double_value(&[]);
                    assert!(diff < 2e-6, "{what}: {diff}");
                    compared += 1;
                }
                // Row i of a causal pattern alone, over its own keys only, gives the bits
                // it has among the others with the later keys masked.
                let causal_mask = Tensor::ones([t, s], (Kind::Bool, Device::Cpu)).tril(past).unsqueeze(0).unsqueeze(0);
                let all = attend(&q, &k, &v, Some(&causal_mask), false, scale).expect("causal mask");
                for i in [0, t / 2, t - 1] {
                    let n = past + i + 1;
                    let (ki, vi) = (k.narrow(2, 0, n), v.narrow(2, 0, n));
                    let alone = attend(&q.narrow(2, i, 1), &ki, &vi, None, false, scale).expect("one row");
                    assert!(alone.equal(&all.narrow(2, i, 1)), "{:?}: row {i} alone differs", (h, kv, hd, b, t));
                }
            }
        }
        assert_eq!(compared, 5 * (9 * 4 + 3));
    }

    /// A thread keeps its buffers between calls: a call gives the same bits on a thread that
    /// has just attended more keys, some of them infinite or NaN, as on a new thread, in
    /// eight lanes and in sixteen.
    #[test]
    fn earlier_calls_leave_no_trace() {
        for sixteen in [false, true] {
            crate::model::few_rows::tests::with_lanes(sixteen, earlier_calls_leave_no_trace_in_lanes);
        }
    }

    fn earlier_calls_leave_no_trace_in_lanes() {
        if !runs() {
            return;
        }
        tch::manual_seed(9);
        let o = (Kind::Float, Device::Cpu);
        // Queries, keys, values and a boolean mask: 25 rows over 101 keys.
        let inputs = [[1, 4, 25, 16], [1, 2, 101, 16], [1, 2, 101, 16]].map(|size| Tensor::randn(size, o));
        let mask = Tensor::rand([25, 101], o).gt(0.2);
        let call = |[q, k, v]: &[Tensor; 3], mask: &Tensor| attend(q, k, v, Some(mask), false, 0.25).expect("taken");
        let lanes = crate::model::few_rows::sixteen_lanes();
        let (copies, mask_copy) = (inputs.each_ref().map(Tensor::copy), mask.copy());
        let fresh =
            std::thread::spawn(move || crate::model::few_rows::tests::with_lanes(lanes, || call(&copies, &mask_copy)))
                .join()
                .expect("a new thread");
        // A bigger call first, its keys past 101 infinite and NaN.
        let big_k = Tensor::randn([1, 2, 300, 16], o);
        let _ = big_k.narrow(2, 101, 100).fill_(f64::INFINITY);
        let _ = big_k.narrow(2, 201, 99).fill_(f64::NAN);
        let big_q = Tensor::randn([1, 4, 40, 16], o);
        let _ = attend(&big_q, &big_k, &big_k, None, false, 0.25).expect("taken");
        assert!(call(&inputs, &mask).equal(&fresh), "sixteen lanes: {lanes}");
    }

    /// bf16 calls are widened to f32 only when the kernel may take them: not for gradients
    /// or too many rows (nor, on a GPU, for tensors off the CPU), which would otherwise pay
    /// for four f32 copies only to be refused.
    #[test]
    fn widens_bf16_only_when_it_may_take_the_call() {
        if !runs() {
            return;
        }
        let o = (Kind::BFloat16, Device::Cpu);
        let (q, k) = (Tensor::randn([1, 4, 3, 16], o), Tensor::randn([1, 2, 10, 16], o));
        assert!(may_take(&q, &k, &k, None));
        assert!(attend(&q, &k, &k, None, false, 0.25).is_some_and(|y| y.kind() == Kind::BFloat16));
        let mask = Tensor::zeros([3, 10], o);
        assert!(may_take(&q, &k, &k, Some(&mask)));
        assert!(!may_take(&q.copy().set_requires_grad(true), &k, &k, None));
        assert!(!may_take(&q, &k, &k, Some(&mask.copy().set_requires_grad(true))));
        let many = Tensor::randn([1, 4, MAX_ROWS + 1, 16], o);
        assert!(!may_take(&many, &k, &k, None));
        assert!(attend(&many, &k, &k, None, false, 0.25).is_none());
    }

    /// What it leaves to libtorch: gradients, too many rows, widths not a multiple of 8,
    /// masks of another size, integer masks, causal with a cache.
    #[test]
    fn declines_what_it_does_not_do() {
        let o = (Kind::Float, Device::Cpu);
        let (q, k) = (Tensor::randn([1, 4, 3, 16], o), Tensor::randn([1, 2, 10, 16], o));
        assert!(attend(&q.copy().set_requires_grad(true), &k, &k, None, false, 0.25).is_none());
        let many = Tensor::randn([1, 4, MAX_ROWS + 1, 16], o);
        assert!(attend(&many, &k, &k, None, false, 0.25).is_none());
        let odd = Tensor::randn([1, 4, 3, 12], o);
        let odd_k = Tensor::randn([1, 2, 10, 12], o);
        assert!(attend(&odd, &odd_k, &odd_k, None, false, 0.25).is_none());
        assert!(attend(&q, &k, &k, Some(&Tensor::zeros([3, 9], o)), false, 0.25).is_none());
        assert!(attend(&q, &k, &k, Some(&Tensor::zeros([3, 10], (Kind::Int64, Device::Cpu))), false, 0.25).is_none());
        assert!(attend(&q, &k, &k, None, true, 0.25).is_none());
        // A mask of `t x s` values that is not `[t, s]`: one a head, or one a batch entry
        // shared by its rows (batch 3 and 3 rows).
        let per_head = Tensor::zeros([1, 4, 3, 10], o);
        assert!(attend(&q, &k, &k, Some(&per_head), false, 0.25).is_none());
        let (q3, k3) = (Tensor::randn([3, 4, 3, 16], o), Tensor::randn([3, 2, 10, 16], o));
        assert!(attend(&q3, &k3, &k3, Some(&Tensor::zeros([3, 1, 1, 10], o)), false, 0.25).is_none());
        if runs() {
            assert!(attend(&q, &k, &k, Some(&Tensor::zeros([3, 10], o)), false, 0.25).is_some());
        }
    }
}
