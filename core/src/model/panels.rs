//! A weight of short rows (at most [`MAX_INPUTS`] inputs) held once more as panels of
//! sixteen output columns, `[ceil(out / 16), in, 16]`: panel `p`'s values at input `k`
//! are the sixteen weights of outputs `16 p..16 p + 16` at that input, contiguous. A tile
//! broadcasts an input row's value at `k` and multiplies it by a panel's sixteen weights,
//! so sixteen outputs lie along the lanes of one vector, each accumulated over the inputs in
//! order, and nothing is summed across lanes at the end. The dot form of
//! [`super::few_rows`] (inputs along the lanes) sums each output's lanes, which for a weight
//! of 64 inputs costs as much as its multiply-adds (docs/BENCHMARKS.md, "Short weights as
//! panels").
//!
//! A decoding step's mask rows read the adapter's merged weight this way
//! ([`super::few_rows::product_two_weights`]); its next-token rows keep the dot form, AR's,
//! so they stay AR's outputs bit for bit and AR's step does not change. Every output here is
//! one multiply-add a input, in input order, from zero, then the bias: the same value
//! whatever the tile, the number of rows or the thread.

// Raw pointers and SIMD intrinsics, as in `few_rows`: what each `unsafe` relies on is
// stated where it is used.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

/// Outputs a panel holds (one 512-bit vector of f32).
pub const WIDTH: usize = 16;

/// The longest weight rows held as panels: a group of [`GROUP`] panels (16 KiB at 64
/// inputs, 64 KiB at 256) stays in L1 or L2 while the row passes read it.
pub const MAX_INPUTS: i64 = 256;

/// Panels a tile multiplies at once.
const GROUP: usize = 4;

/// The most input rows one pass of a tile holds (24 accumulators, 4 weight vectors and
/// the broadcast input of AVX-512's 32 registers).
const PASS_ROWS: usize = 6;

/// Whether panels run here: AVX-512F (the tiles are 512-bit) with the few-row kernel on.
pub fn available() -> bool {
    super::few_rows::sixteen_lanes()
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Let products read the panels they are given (`true`, the default) or run the dot form
/// instead: the examples time the two in turns in one process (the machine's speed drifts
/// too much between processes). Only mask rows read panels, so either way a step's
/// next-token rows are AR's.
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// [`set_enabled`]'s state.
pub fn enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed)
}

/// A weight as panels (see the module's documentation).
#[derive(Debug)]
pub struct Panels {
    data: Tensor,
    out: usize,
    inp: usize,
}

impl Panels {
    /// The panels of `weight` (`[out, in]`) where they run ([`available`]) and pay: f32 on
    /// the CPU, at most [`MAX_INPUTS`] inputs, no gradient; else `None`.
    pub fn of(weight: &Tensor) -> Option<Panels> {
        let size = weight.size();
        let [out, inp] = size[..] else { return None };
        let fits = (1..=MAX_INPUTS).contains(&inp)
            && out >= 1
            && weight.kind() == Kind::Float
            && weight.device() == Device::Cpu
            && !weight.requires_grad()
            && available();
        fits.then(|| {
            let data = tch::no_grad(|| {
                let count = (out + WIDTH as i64 - 1) / WIDTH as i64;
                let padded = weight.constant_pad_nd([0, 0, 0, count * WIDTH as i64 - out]);
                padded.view([count, WIDTH as i64, inp]).transpose(1, 2).contiguous()
            });
            Panels { data, out: out as usize, inp: inp as usize }
        })
    }

    /// Whether these are the panels of a weight of `out` x `inp`.
    pub fn fit(&self, out: usize, inp: usize) -> bool {
        self.out == out && self.inp == inp
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.numel() * std::mem::size_of::<f32>()
    }

    /// The first value.
    pub(super) fn ptr(&self) -> *const f32 {
        self.data.data_ptr() as *const f32
    }
}

/// Rows of a product through panels: `y[rows, out] = x[rows, inp] W^T + b`, row strides
/// `inp` and `out`.
#[derive(Clone, Copy)]
pub(super) struct Job {
    pub x: *const f32,
    pub panels: *const f32,
    /// Null: no bias.
    pub bias: *const f32,
    pub y: *mut f32,
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// Output columns `o0..o1` of `job`, every row (`o0` a multiple of [`WIDTH`]; `o1` one too,
/// or `out`).
///
/// # Safety
/// AVX-512F is available; the job's pointers are valid for its sizes (the panels for
/// `ceil(out / 16)` panels of `inp x 16` values, the bias for `out` values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn columns(job: &Job, o0: usize, o1: usize) {
    debug_assert!(o0.is_multiple_of(WIDTH) && (o1.is_multiple_of(WIDTH) || o1 == job.out));
    let (p0, p1) = (o0 / WIDTH, o1.div_ceil(WIDTH));
    let passes = job.rows.div_ceil(PASS_ROWS);
    let mut p = p0;
    while p < p1 {
        let n = (p1 - p).min(GROUP);
        // The first pass over a group asks for the next one, when as many panels follow.
        let ahead = (p + 2 * n <= p1).then_some(p + n);
        let mut r = 0;
        for pass in 0..passes {
            let nr = (job.rows - r).div_ceil(passes - pass);
            let prefetch = ahead.filter(|_| pass == 0);
            // SAFETY: as this function's; panels p..p + n <= p1 (and the prefetched ones
            // before p1), rows r..r + nr <= rows.
            unsafe {
                match n {
                    4 => pass_rows::<4>(job, p, r, nr, prefetch),
                    3 => pass_rows::<3>(job, p, r, nr, prefetch),
                    2 => pass_rows::<2>(job, p, r, nr, prefetch),
                    _ => pass_rows::<1>(job, p, r, nr, prefetch),
                }
            }
            r += nr;
        }
        p += n;
    }
}

/// Panels `p..p + NP` times rows `r..r + nr` (`nr` at most [`PASS_ROWS`]).
///
/// # Safety
/// As [`tile`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pass_rows<const NP: usize>(job: &Job, p: usize, r: usize, nr: usize, prefetch: Option<usize>) {
    // SAFETY: as this function's.
    unsafe {
        match nr {
            6 => tile::<NP, 6>(job, p, r, prefetch),
            5 => tile::<NP, 5>(job, p, r, prefetch),
            4 => tile::<NP, 4>(job, p, r, prefetch),
            3 => tile::<NP, 3>(job, p, r, prefetch),
            2 => tile::<NP, 2>(job, p, r, prefetch),
            _ => tile::<NP, 1>(job, p, r, prefetch),
        }
    }
}

/// Panels `p..p + NP` times rows `r..r + NR`; with `prefetch`, the panels from there on
/// are asked into L2, a cache line each an input.
///
/// # Safety
/// As [`columns`]'s, for panels `p..p + NP` and rows `r..r + NR` within the job.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const NP: usize, const NR: usize>(job: &Job, p: usize, r: usize, prefetch: Option<usize>) {
    use std::arch::x86_64::*;
    let n = job.inp;
    let mut acc = [[_mm512_setzero_ps(); NR]; NP];
    // SAFETY (the pointers below): rows r..r + NR of `x` (`n` values each) and panels
    // p..p + NP (and the prefetched ones, within the panels: `prefetch` + NP <= their count).
    let rows: [*const f32; NR] = std::array::from_fn(|j| unsafe { job.x.add((r + j) * n) });
    for k in 0..n {
        if let Some(a) = prefetch {
            for i in 0..NP {
                unsafe { _mm_prefetch::<_MM_HINT_T1>(job.panels.add(((a + i) * n + k) * WIDTH) as *const i8) };
            }
        }
        let w: [__m512; NP] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(job.panels.add(((p + i) * n + k) * WIDTH)) });
        for (j, row) in rows.iter().enumerate() {
            let x = _mm512_set1_ps(unsafe { *row.add(k) });
            for i in 0..NP {
                acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let o = (p + i) * WIDTH;
        let lanes = job.out.saturating_sub(o).min(WIDTH);
        let mask: __mmask16 = if lanes == WIDTH { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 };
        // SAFETY: the bias's values o..o + lanes <= out.
        let bias = (!job.bias.is_null()).then(|| unsafe { _mm512_maskz_loadu_ps(mask, job.bias.add(o)) });
        for (j, &a) in acc.iter().enumerate() {
            let s = match bias {
                Some(b) => _mm512_add_ps(a, b),
                None => a,
            };
            // SAFETY: row r + j of `y`, its columns o..o + lanes <= out.
            unsafe { _mm512_mask_storeu_ps(job.y.add((r + j) * job.out + o), mask, s) };
        }
    }
}
