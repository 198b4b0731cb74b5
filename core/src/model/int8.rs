//! A decoding step's mask rows multiplied in int8 on the CPU (AVX-512 VNNI: Zen 4, Ice
//! Lake and later; AVX2 elsewhere, below): `vpdpbusd` adds 64 products of bytes an
//! instruction, twice what `vdpbf16ps` does with bf16 pairs and four times an f32
//! multiply-add.
//!
//! The weight the mask rows read (the adapter's merged weight `W + s B A`, so no term is
//! left to add) is held once more, quantized when the drafter is prepared: each output row
//! scaled by its largest magnitude to `[-127, 127]` (or `[-32, 32]` for AVX2, below), laid
//! out as panels of sixteen outputs by groups of four inputs (`[ceil(out / 16), ceil(in /
//! 4), 16, 4]` bytes, a quarter of the f32 weight), so that one 512-bit load is a group's
//! weights for sixteen outputs, one output a lane, and nothing is transposed or summed
//! across lanes at run time (the bf16 pairs of [`super::few_rows`] transpose each block of
//! the weight as they go, about a third of their time). Each mask row is quantized per call
//! the same way, shifted by 128 to the unsigned bytes `vpdpbusd` takes; the shift comes off
//! each output as `128 x` its weight row's sum, computed with the panels. An output is then
//! `(acc - 128 sum) x scale_w x scale_x`, plus the bias.
//!
//! Where the CPU has AMX (Sapphire Rapids and later) and the weight is large enough, the mask
//! rows go through its tiles instead ([`amx`]): the same integer sums, so the same outputs.
//!
//! Where it has AVX2 but not AVX-512 VNNI (Zen 3, Haswell to Skylake), the panels go
//! through `vpmaddubsw` ([`avx2`]), which multiplies unsigned bytes by signed ones and adds
//! each pair of products in sixteen bits, with saturation; a `vpmaddwd` by ones then widens
//! the pairs to eight int32 sums. Two forms keep the sums exact:
//! - panels of 127 levels: the rows' bytes signed, each pair taken as `|x|` times the
//!   weight with x's sign (at most `2 x 127 x 127`), each group widened alone: about 56
//!   multiply-adds a nanosecond on a Zen 3 core (SmolLM2-135M's 1728 x 576 weight, 20 rows,
//!   `int8_tiles`), the f32 tiles about 31;
//! - short panels ([`SHORT_LEVELS`], values in `[-32, 32]`): the rows' bytes shifted as for
//!   `vpdpbusd`, and two groups' pairs added in sixteen bits before one widening (at most
//!   `2 x 2 x 255 x 32 = 32,640`, under 32,767), since widening costs a multiply as dear as
//!   the products': about 87 a nanosecond. The drafter takes them for models whose weights
//!   fit a cache, whose steps wait on arithmetic
//!   ([`crate::decode::speculative::int8_short_panels`], with what they cost in drafts).
//!
//! The next-token rows of the same call go through the f32 kernel
//! ([`super::few_rows::exact_columns`]), AR's products, so they stay AR's outputs bit for
//! bit; the mask rows' outputs are drafts only. On the demo the int8 rows drafted the same
//! tokens per forward as f32 (docs/BENCHMARKS.md, "Mask rows in int8").

// Raw pointers and SIMD intrinsics, as in `few_rows`: what each `unsafe` relies on is
// stated where it is used.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::few_rows;

/// Outputs a panel holds (one lane each of a 512-bit vector).
const WIDTH: usize = 16;

/// Inputs a group holds (the four bytes `vpdpbusd` sums into a lane).
const GROUP: usize = 4;

/// Mask rows a tile holds: eight accumulators, the panel's vector and the broadcast rows.
const TILE_ROWS: usize = 8;

/// Mask rows an AVX2 tile of short panels holds at most: two accumulators each (sixteen
/// outputs in two vectors). Four and five rows, with the ones, two groups' broadcast bytes
/// and two temporaries, fit the sixteen registers, the panel's vectors read from L1 by the
/// multiplies (`avx2::pairs`); six spill in the compiled loop, yet measured as fast as two
/// tiles of three (fifty-fourth session). A product's mask rows are shared out evenly
/// between its tiles: a 4-mask step's 20 as four tiles of five, a 2-mask step's 6 as one
/// (SmolLM2-135M's 1728 x 576 weight on a Zen 3, one thread, `int8_tiles`: 20 rows 244-255
/// us a call so against 257-264 in tiles of at most three).
const AVX2_PAIR_TILE_ROWS: usize = 6;

/// Mask rows an AVX2 tile of 127-level panels holds: two accumulators each, the panel's
/// two vectors, the ones and a row's temporaries in sixteen registers.
const AVX2_SIGNED_TILE_ROWS: usize = 4;

/// The tiles a product's mask rows go through on the vector units.
#[derive(Clone, Copy)]
enum Form {
    /// AVX-512 VNNI's `vpdpbusd`.
    Vnni,
    /// AVX2's `vpmaddubsw` of 127-level panels, each group widened alone ([`avx2`]).
    Signed,
    /// AVX2's `vpmaddubsw` of short panels, two groups' pairs added before widening.
    Pairs,
}

/// Mask rows an AMX tile holds at most.
const AMX_ROWS: usize = 16;

/// The fewest mask rows multiplied in AMX tiles where they run ([`amx::available`]); fewer
/// go through `vpdpbusd`, whose cost grows with the rows where a tile's does not.
const AMX_MIN_ROWS: usize = 4;

/// The fewest weight elements (`out x in`, 2 MiB of f32) whose mask rows go through AMX
/// tiles. Called alone, the tiles were faster for every shape measured but the smallest
/// (`examples/int8_tiles.rs` on a Sapphire Rapids-class Xeon, two threads: the demo's
/// 1408 x 256 gate/up, 25 rows from 5, 35 us a call against 46 with `vpdpbusd`;
/// SmolLM2-135M's 1728 x 576, 136 against 154; the proxy's 344 x 64, 8.1 against 7.3), but
/// the demo's steps with every weight in tiles measured slower in `mtp bench` (2-mask step
/// 1.54-1.57 AR steps against 1.46-1.47, twice in turns), so only weights that large
/// (SmolLM2-135M's q/k/v, gate/up and down; none of the demo's): its 4-mask step 2.04-2.06
/// -> 1.74-1.85 AR steps (docs/BENCHMARKS.md, forty-third session).
const AMX_MIN_WEIGHT: usize = 1 << 19;

/// Whether this CPU runs the int8 tiles: the few-row kernel (AVX2 and FMA), with AVX-512F,
/// BW and VNNI for `vpdpbusd` ([`vnni`]) or without them for `vpmaddubsw` ([`avx2`]).
pub fn available() -> bool {
    few_rows::available()
}

/// Whether the tiles take `vpdpbusd` (AVX-512F, BW and VNNI) rather than AVX2's
/// `vpmaddubsw`. `MTP_CPU_INT8=avx2` asks for AVX2's even where VNNI runs (the same
/// outputs: to compare the two on one machine).
pub fn vnni() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            available()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && !matches!(std::env::var("MTP_CPU_INT8").as_deref().map(str::trim), Ok("avx2"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The largest magnitude of a weight's quantized values in short panels
/// ([`Int8Panels::of`]), for AVX2's tiles that add two groups' products in sixteen bits: a
/// group's pair of products is at most `2 x 255 x 32` (a shifted row byte by a weight
/// byte), two groups' `32,640`, under sixteen bits' 32,767 (see the module's
/// documentation).
pub const SHORT_LEVELS: i32 = 32;

/// A weight quantized to int8 per output row, as panels (see the module's documentation).
#[derive(Debug)]
pub struct Int8Panels {
    data: Vec<i8>,
    /// Per output (padded to whole panels with zeros): the row's scale.
    scale: Vec<f32>,
    /// Per output: 128 times the sum of the row's quantized values.
    shift: Vec<i32>,
    out: usize,
    inp: usize,
    /// The largest magnitude of the quantized values: 127, or [`SHORT_LEVELS`].
    levels: i32,
}

impl Int8Panels {
    /// The panels of `weight` (`[out, in]`, f32 on the CPU, no gradient) where the tiles run
    /// ([`available`]), its values in `[-127, 127]`, or with `short` in `[-32, 32]` where
    /// that makes the tiles faster (AVX2 without VNNI: [`SHORT_LEVELS`]); else `None`.
    pub fn of(weight: &Tensor, short: bool) -> Option<Int8Panels> {
        let size = weight.size();
        let [out, inp] = size[..] else { return None };
        let fits = out >= 1
            && inp >= 1
            && weight.kind() == Kind::Float
            && weight.device() == Device::Cpu
            && !weight.requires_grad()
            && available();
        if !fits {
            return None;
        }
        let (panels, groups) = ((out as usize).div_ceil(WIDTH) as i64, (inp as usize).div_ceil(GROUP) as i64);
        let levels = if short && !vnni() { SHORT_LEVELS } else { 127 };
        let (data, scale, shift) = tch::no_grad(|| {
            // Each row scaled by its largest magnitude (a row of zeros, or one that is not
            // finite, by 1), rounded to nearest (ties to even), padded with zeros to whole
            // panels and groups, then laid out [panel, group, output, input].
            let max = weight.abs().amax([1i64].as_slice(), true);
            let usable = max.gt(0.0).logical_and(&max.isfinite());
            let levels = f64::from(levels);
            let max = max.where_self(&usable, &max.ones_like().g_mul_scalar(levels));
            let q = (weight * (max.reciprocal() * levels)).round().clamp(-levels, levels);
            let q = q.constant_pad_nd([0, groups * GROUP as i64 - inp, 0, panels * WIDTH as i64 - out]);
            let shift = q.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).to_kind(Kind::Int) * 128;
            let data = q.to_kind(Kind::Int8).view([panels, WIDTH as i64, groups, GROUP as i64]).permute([0, 2, 1, 3]);
            let scale = (max / levels).view([-1]).constant_pad_nd([0, panels * WIDTH as i64 - out]);
            (data.contiguous().view([-1]), scale, shift)
        });
        let (data, scale, shift) =
            (Vec::<i8>::try_from(data).ok()?, Vec::<f32>::try_from(scale).ok()?, Vec::<i32>::try_from(shift).ok()?);
        let (out, inp) = (out as usize, inp as usize);
        Some(Int8Panels { data, scale, shift, out, inp, levels })
    }

    /// The largest magnitude of the quantized values: 127, or [`SHORT_LEVELS`] for AVX2's
    /// faster tiles.
    pub fn levels(&self) -> i32 {
        self.levels
    }

    /// Whether these are the panels of a weight of `out` x `inp`.
    pub fn fit(&self, out: usize, inp: usize) -> bool {
        self.out == out && self.inp == inp
    }

    /// Where the panel that holds output `o` starts in `data` (`ceil(in / 4)` groups of 64
    /// bytes a panel).
    fn panel_offset(&self, o: usize) -> usize {
        o / WIDTH * self.inp.div_ceil(GROUP) * WIDTH * GROUP
    }

    /// How many int8 multiply-adds with these panels count as one f32 multiply-add of the
    /// few-row kernel when [`few_rows::worth_sharing`] weighs a product and
    /// `model::row_split` first shares a step's rows: an int8 instruction does four times
    /// the multiply-adds of an f32 one with VNNI (the demo chain's 256 x 256 products of
    /// one row took 3.3-3.5 us a call shared between two threads, most of it the sharing).
    /// AVX2's tiles of SmolLM2-135M's 1728 x 576 weight ran at about 56 multiply-adds a
    /// nanosecond on a Zen 3 with 127-level panels, 87 with short ones, the f32 tiles at
    /// about 31 (`int8_tiles`, one thread); 127-level panels count 2 (the split then
    /// follows what the threads measure: the proxy's steps measured the same at 2 and 4,
    /// docs/BENCHMARKS.md, fifty-first session).
    pub fn macs_per_f32(&self) -> f64 {
        match self.form() {
            Form::Vnni => 4.0,
            Form::Signed => 2.0,
            Form::Pairs => 2.8,
        }
    }

    /// The tiles these panels' products go through on the vector units.
    fn form(&self) -> Form {
        match (vnni(), self.levels == SHORT_LEVELS) {
            (true, _) => Form::Vnni,
            (false, false) => Form::Signed,
            (false, true) => Form::Pairs,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() + 8 * self.scale.len()
    }
}

/// A row's scale (its largest magnitude over 127; 1 for a row of zeros) and its inverse,
/// from its largest magnitude `max` (NaN values left out).
fn scale_of(max: f32) -> (f32, f32) {
    if max > 0.0 && max.is_finite() { (max / 127.0, 127.0 / max) } else { (1.0, 1.0) }
}

/// The largest magnitude of `row`'s values, NaN values left out (0 for none).
fn largest_magnitude(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni() {
        // SAFETY: `vnni()` checked AVX-512F.
        return unsafe { avx512::largest_magnitude(row) };
    } else if available() {
        // SAFETY: `available()` checked AVX2.
        return unsafe { avx2::largest_magnitude(row) };
    }
    row.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `x W^T + b` (`x`: `[rows, in]`, or `[1, rows, in]` for `[1, rows, out]`, f32 on the CPU,
/// at most [`few_rows::MAX_ROWS`] rows, `weight` `[out, in]`) with the rows from `start` on multiplied
/// in int8 by the weight `panels` hold (the same shape: the merged weight, for a step's mask
/// rows), the rows before `start` exactly what [`few_rows::product`] gives them. `None` when
/// the operands do not fit.
pub fn product_tail(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    panels: &Int8Panels,
    start: i64,
) -> Option<Tensor> {
    // A layer's `[1, rows, in]` is read in place: no view to make and undo (two of
    // libtorch's view operations a product, about as long as a quarter of the demo's
    // products of 25 rows, on the thread the other waits for).
    let (rows, inp) = few_rows::takes_rows(x, weight)?;
    let out = weight.size()[0];
    let fits = (0..rows).contains(&start)
        && panels.fit(out as usize, inp as usize)
        && bias.is_none_or(|b| b.kind() == Kind::Float && b.device() == Device::Cpu && b.numel() == out as usize);
    if !fits {
        return None;
    }
    let mut x_copy = None;
    let x = few_rows::contiguous(x, &mut x_copy);
    let (mut weight_copy, mut bias_copy) = (None, None);
    let weight = few_rows::contiguous(weight, &mut weight_copy);
    let bias = bias.map(|b| few_rows::contiguous(b, &mut bias_copy));
    let y = few_rows::output_like(x, rows, out);
    let (rows, inp, start) = (rows as usize, inp as usize, start as usize);
    // SAFETY: `x` is contiguous f32 with `rows x inp` values, alive to the end.
    let xs = unsafe { std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * inp) };
    let exact = [x.data_ptr(), weight.data_ptr(), bias.as_ref().map_or(std::ptr::null_mut(), |b| b.data_ptr())]
        .map(|p| Ptr(p as *mut f32));
    multiply(panels, &xs[start * inp..], exact, Ptr(y.data_ptr() as *mut f32), start);
    Some(y)
}

/// `x W^T` for host rows `x` (`rows x in` values) with every row multiplied in int8 by the
/// weight `panels` hold, into `y` (`rows x out`): [`product_tail`]'s mask rows, for a draft
/// chain's head on host vectors. False (nothing written) when the sizes do not fit.
pub fn product_into(x: &[f32], panels: &Int8Panels, y: &mut [f32]) -> bool {
    let (inp, out) = (panels.inp, panels.out);
    let rows = x.len().checked_div(inp).unwrap_or(0);
    if rows == 0 || x.len() != rows * inp || y.len() != rows * out {
        return false;
    }
    multiply(panels, x, [Ptr(std::ptr::null_mut()); 3], Ptr(y.as_mut_ptr()), 0);
    true
}

/// The rows before `start` in f32 from `exact` (`x`, the weight, the bias: pointers the
/// f32 kernel reads; unused without such rows), then the `tail` rows quantized and
/// multiplied in int8 by `panels`, into `y` (`(start + tail rows) x out`).
fn multiply(panels: &Int8Panels, tail: &[f32], exact: [Ptr; 3], y: Ptr, start: usize) {
    let inp = panels.inp;
    // The quantized rows in this thread's buffers, taken for the call and given back after
    // (a step makes four products a layer: no allocation for each).
    let (mut xq, mut sx) = SCRATCH.take();
    // AVX2's tiles of 127-level panels take the rows' bytes signed; the others shifted by
    // 128.
    let shifted = !matches!(panels.form(), Form::Signed);
    quantize_rows(tail, inp, shifted, &mut xq, &mut sx);
    let [x, w, bias] = exact;
    let job = Job {
        x,
        w,
        bias,
        y,
        start,
        inp,
        out: panels.out,
        panels,
        xq: &xq,
        sx: &sx,
        lanes16: few_rows::sixteen_lanes(),
        amx: amx_asked() && amx_available(),
        ahead: start > 0 && ahead_asked() && super::huge_pages::read_from_memory(w.0 as usize),
    };
    job.run(start + tail.len() / inp);
    SCRATCH.set((xq, sx));
}

thread_local! {
    /// [`multiply`]'s quantized rows and their scales, kept between calls.
    static SCRATCH: std::cell::Cell<(Vec<u8>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// A raw pointer the parts of a product share (each writes its own columns).
#[derive(Clone, Copy)]
struct Ptr(*mut f32);

// SAFETY: the parts read the inputs and write disjoint columns of the output while the
// caller keeps the tensors alive (`product_tail` returns after every part).
unsafe impl Sync for Ptr {}

/// One product's operands.
struct Job<'a> {
    x: Ptr,
    w: Ptr,
    bias: Ptr,
    y: Ptr,
    start: usize,
    inp: usize,
    out: usize,
    panels: &'a Int8Panels,
    /// The mask rows quantized (`tail x groups x 4` bytes) and their scales.
    xq: &'a [u8],
    sx: &'a [f32],
    /// The f32 rows' form ([`few_rows::sixteen_lanes`]), fixed when the job is made so
    /// that every part, on whatever thread, computes them as AR does.
    lanes16: bool,
    /// Whether the mask rows go through AMX tiles ([`amx_asked`] on the calling thread
    /// and the tiles run), fixed when the job is made.
    amx: bool,
    /// Whether the columns go in chunks ([`Job::columns`]): next-token rows there, the
    /// weight read from memory, and [`ahead_asked`] on the calling thread.
    ahead: bool,
}

// SAFETY: as `Ptr`'s.
unsafe impl Sync for Job<'_> {}

impl Job<'_> {
    /// Every output column of the job's `rows` rows, shared between the threads' parts
    /// when the product is big enough.
    fn run(&self, rows: usize) {
        let out = self.out;
        // The next-token rows read the f32 weight, the mask rows its int8 panels.
        let elements = out * self.inp;
        let work = few_rows::Work {
            bytes: elements * if self.start > 0 { 5 } else { 1 },
            f32_macs: (self.start * elements) as f64
                + (rows - self.start) as f64 * elements as f64 / self.panels.macs_per_f32(),
        };
        let share = out > WIDTH && few_rows::worth_sharing(work);
        #[cfg(target_arch = "x86_64")]
        if self.start > 0 && few_rows::is_alone() && super::partner::offers(share) {
            // The first thread of a pass shared out by rows: the other thread takes half of
            // the next-token rows' columns, the f32 work that reads the whole weight, and
            // none of the mask rows, which stay on this core ([`super::partner`]).
            let mid = out.div_ceil(2 * WIDTH) * WIDTH;
            super::partner::offer(&|i, n| match (i, n) {
                (0, 2) => {
                    // SAFETY: as in `columns`: columns 0..mid lie within `out`.
                    unsafe { self.exact_columns(0, mid.min(out)) };
                    self.mask_columns(0, out, rows - self.start);
                }
                // SAFETY: as above, columns mid..out.
                (_, 2) if mid < out => unsafe { self.exact_columns(mid, out) },
                (_, 2) => {}
                _ => self.columns(0, out, rows - self.start),
            });
            return;
        }
        few_rows::in_parts(share, &|i, n| {
            let edge = |i: usize| if i >= n { out } else { (out.div_ceil(WIDTH) * i / n) * WIDTH };
            let (o0, o1) = (edge(i).min(out), edge(i + 1).min(out));
            if o0 < o1 {
                self.columns(o0, o1, rows - self.start);
            }
        });
    }

    /// Output columns `o0..o1` (`o0` a multiple of [`WIDTH`]; `o1` one too, or `out`) of
    /// every row: the next-token rows in f32, then the mask rows in int8. Where the f32
    /// weight is read from memory ([`super::huge_pages::read_from_memory`]) and both kinds of
    /// rows are there, [`AHEAD_CHUNK`] columns at a time, the mask rows of each chunk asking
    /// for the next chunk's weight and panels as they go ([`Ahead`]).
    fn columns(&self, o0: usize, o1: usize, tail: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if self.ahead && !self.amx_tiles(tail) {
                let mut c = o0;
                while c < o1 {
                    let c1 = (c + AHEAD_CHUNK).min(o1);
                    // SAFETY: as below, for columns c..c1 within o0..o1.
                    unsafe { self.exact_columns(c, c1) };
                    let mut ahead = self.ahead(c1, (c1 + AHEAD_CHUNK).min(o1), c1 - c, tail);
                    self.tail_columns(c, c1, tail, &mut ahead);
                    c = c1;
                }
                return;
            }
            if self.start > 0 {
                // SAFETY: the pointers cover `start x inp`, `out x inp`, `out` and `start x
                // out` values; columns o0..o1 lie within `out`.
                unsafe { self.exact_columns(o0, o1) };
            }
        }
        self.mask_columns(o0, o1, tail);
    }

    /// Whether the job's `tail` mask rows go through AMX tiles (asked for, where they run,
    /// and enough rows and weight).
    fn amx_tiles(&self, tail: usize) -> bool {
        self.amx && tail >= AMX_MIN_ROWS && self.out * self.inp >= AMX_MIN_WEIGHT
    }

    /// The mask rows' outputs at columns `o0..o1` (`o0` a multiple of [`WIDTH`]; `o1` one
    /// too, or `out`), as [`Job::columns`] computes them where it does not chunk them: in AMX
    /// tiles where [`Job::amx_tiles`], else in the vector units' tiles.
    fn mask_columns(&self, o0: usize, o1: usize, tail: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.amx_tiles(tail) {
            // SAFETY: `amx` holds only where the tiles run (the process may use them);
            // columns o0..o1 lie within `out`.
            unsafe { amx::tail(self, o0, o1, tail) };
            return;
        }
        self.tail_columns(o0, o1, tail, &mut { Ahead::NONE });
    }

    /// The next-token rows' outputs at columns `o0..o1`, in f32 as AR computes them.
    ///
    /// # Safety
    /// The job's pointers cover `start x inp`, `out x inp`, `out` and `start x out` values;
    /// `o0 <= o1 <= out`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn exact_columns(&self, o0: usize, o1: usize) {
        // SAFETY: as this function's.
        unsafe {
            few_rows::exact_columns(
                self.x.0,
                self.w.0,
                self.bias.0,
                self.y.0,
                (self.start, self.inp, self.out),
                (o0, o1),
                self.lanes16,
            )
        };
    }

    /// What the mask rows' tiles of `chunk` columns ask for ahead: the f32 weight's rows
    /// `n0..n1` and their panels, spread evenly over the tiles' groups of four inputs.
    fn ahead(&self, n0: usize, n1: usize, chunk: usize, tail: usize) -> Ahead {
        if n0 >= n1 {
            return Ahead::NONE;
        }
        let p = self.panels;
        let groups = p.inp.div_ceil(GROUP);
        let weight = self.w.0 as usize;
        let f32_rows = (weight + n0 * self.inp * 4, weight + n1 * self.inp * 4);
        let panel = |o: usize| p.data.as_ptr() as usize + p.panel_offset(o);
        let panels = (panel(n0), panel(n1.div_ceil(WIDTH) * WIDTH));
        let lines = (f32_rows.1 - f32_rows.0 + panels.1 - panels.0).div_ceil(64);
        let steps = tail.div_ceil(self.tile_rows()) * chunk.div_ceil(WIDTH) * groups;
        Ahead { at: f32_rows.0 & !63, end: f32_rows.1, then: panels, per: lines.div_ceil(steps.max(1)) }
    }

    /// Mask rows a tile takes at most.
    fn tile_rows(&self) -> usize {
        match self.panels.form() {
            Form::Vnni => TILE_ROWS,
            Form::Signed => AVX2_SIGNED_TILE_ROWS,
            Form::Pairs => AVX2_PAIR_TILE_ROWS,
        }
    }

    /// The mask rows' outputs at columns `o0..o1`, in int8 tiles, each group of inputs of
    /// each tile taking its share of `ahead`.
    fn tail_columns(&self, o0: usize, o1: usize, tail: usize, ahead: &mut Ahead) {
        #[cfg(target_arch = "x86_64")]
        {
            let (form, tile_rows) = (self.panels.form(), self.tile_rows());
            // AVX2's pair tiles share the rows out evenly (20 rows as four tiles of five, 6
            // as one of six); the others take as many as they hold at a time.
            let tiles = tail.div_ceil(tile_rows);
            let mut r = 0;
            for t in 0..tiles {
                let n = match form {
                    Form::Pairs => (tail - r).div_ceil(tiles - t),
                    _ => (tail - r).min(tile_rows),
                };
                let mut o = o0;
                while o < o1 {
                    let lanes = (o1 - o).min(WIDTH);
                    // SAFETY: `available()` held when the panels were made (they exist), and
                    // `vnni()` where the AVX-512 tiles run; rows r..r + n of the tail, panel
                    // o / 16, `lanes` outputs from o.
                    unsafe {
                        match (form, n) {
                            (Form::Vnni, 8) => avx512::tile::<8>(self, r, o, lanes, ahead),
                            (Form::Vnni, 7) => avx512::tile::<7>(self, r, o, lanes, ahead),
                            (Form::Vnni, 6) => avx512::tile::<6>(self, r, o, lanes, ahead),
                            (Form::Vnni, 5) => avx512::tile::<5>(self, r, o, lanes, ahead),
                            (Form::Vnni, 4) => avx512::tile::<4>(self, r, o, lanes, ahead),
                            (Form::Vnni, 3) => avx512::tile::<3>(self, r, o, lanes, ahead),
                            (Form::Vnni, 2) => avx512::tile::<2>(self, r, o, lanes, ahead),
                            (Form::Vnni, _) => avx512::tile::<1>(self, r, o, lanes, ahead),
                            (Form::Signed, 4) => avx2::tile_signed::<4>(self, r, o, lanes, ahead),
                            (Form::Signed, 3) => avx2::tile_signed::<3>(self, r, o, lanes, ahead),
                            (Form::Signed, 2) => avx2::tile_signed::<2>(self, r, o, lanes, ahead),
                            (Form::Signed, _) => avx2::tile_signed::<1>(self, r, o, lanes, ahead),
                            (Form::Pairs, 6) => avx2::tile_pairs::<6>(self, r, o, lanes, ahead),
                            (Form::Pairs, 5) => avx2::tile_pairs::<5>(self, r, o, lanes, ahead),
                            (Form::Pairs, 4) => avx2::tile_pairs::<4>(self, r, o, lanes, ahead),
                            (Form::Pairs, 3) => avx2::tile_pairs::<3>(self, r, o, lanes, ahead),
                            (Form::Pairs, 2) => avx2::tile_pairs::<2>(self, r, o, lanes, ahead),
                            (Form::Pairs, _) => avx2::tile_pairs::<1>(self, r, o, lanes, ahead),
                        }
                    }
                    o += WIDTH;
                }
                r += n;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (o0, o1, tail, ahead);
    }
}

/// Output columns a chunk of a product takes where its weight is read from memory
/// ([`Job::columns`]): the next-token rows' f32 products of a chunk, which wait on reading
/// its weight, then its mask rows' int8 tiles, which wait on arithmetic and meanwhile ask for
/// the next chunk's weight, so that the read and the arithmetic overlap where they came one
/// after the other (a multiple of sixteen, the panels' width, and of the f32 tiles' blocks of
/// two, three and four outputs; its weight rows, 110 KB of SmolLM2-135M's with their
/// panels 28 KB more, fit the 512 KB L2 of a Zen 3 core twice). SmolLM2-135M's shape on a
/// Zen 3 (`mtp bench --draft-arithmetic int8`, in turns, four rounds): the 4-mask step
/// 2.49-2.72 AR steps without the chunks, 2.23-2.39 with them (exact 2.86-2.93); chunks of
/// 24, 96 and 192 columns measured slower than 48; the demo's weights, read from L3,
/// measured no faster chunked (docs/BENCHMARKS.md, fifty-first session).
const AHEAD_CHUNK: usize = 48;

thread_local! {
    /// Whether this thread's int8 products chunk their columns ([`use_ahead`]); `None`:
    /// as `MTP_INT8_AHEAD` says.
    static AHEAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Let this thread's int8 products whose weight is read from memory take their columns in
/// chunks, the mask rows asking for the next chunk ([`AHEAD_CHUNK`]: `true`, the default
/// unless `MTP_INT8_AHEAD=off`), or every f32 column first, then every int8 one (`false`).
/// The same operations on every output either way, so the same outputs bit for bit.
pub fn use_ahead(on: bool) {
    AHEAD.with(|c| c.set(Some(on)));
}

/// Whether this thread's int8 products chunk their columns ([`use_ahead`]).
fn ahead_asked() -> bool {
    static DEFAULT: OnceLock<bool> = OnceLock::new();
    AHEAD.with(std::cell::Cell::get).unwrap_or_else(|| {
        *DEFAULT.get_or_init(|| !matches!(std::env::var("MTP_INT8_AHEAD").as_deref().map(str::trim), Ok("off" | "0")))
    })
}

/// Cache lines a tile's groups of four inputs ask into L2 as they go, `per` at each group:
/// the span `at..end`, then the span `then`.
#[derive(Clone, Copy)]
struct Ahead {
    at: usize,
    end: usize,
    then: (usize, usize),
    per: usize,
}

impl Ahead {
    /// Nothing to ask for.
    const NONE: Ahead = Ahead { at: 0, end: 0, then: (0, 0), per: 0 };

    /// This group's share: the next `per` lines.
    #[inline]
    fn step(&mut self) {
        for _ in 0..self.per {
            if self.at >= self.end {
                if self.then.0 >= self.then.1 {
                    self.per = 0;
                    return;
                }
                (self.at, self.end) = (self.then.0 & !63, self.then.1);
                self.then = (0, 0);
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SSE is part of x86_64; a prefetch reads nothing the program sees,
            // whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(self.at as *const i8)
            };
            self.at += 64;
        }
    }
}

/// Rows of `inp` values each, quantized per row to bytes (`round(x / scale)` in `[-127,
/// 127]`, each row padded with zeros to whole groups of four), and their scales: `shifted`
/// by 128 to the unsigned bytes `vpdpbusd` and AVX2's pair tiles take, or signed for AVX2's
/// tiles of 127-level panels.
fn quantize_rows(x: &[f32], inp: usize, shifted: bool, xq: &mut Vec<u8>, sx: &mut Vec<f32>) {
    let stride = inp.div_ceil(GROUP) * GROUP;
    let vnni = vnni();
    let zero = if shifted { 128 } else { 0 };
    // Every byte is written below (each row's values, then its padding): the buffer is
    // only resized, not cleared.
    xq.resize(x.len() / inp * stride, zero);
    sx.clear();
    sx.reserve(x.len() / inp);
    for (row, dst) in x.chunks_exact(inp).zip(xq.chunks_exact_mut(stride)) {
        let (s, inv) = scale_of(largest_magnitude(row));
        sx.push(s);
        dst[inp..].fill(zero);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` holds wherever panels exist, the only callers'
        // precondition, and `vnni()` where the AVX-512 form runs.
        unsafe {
            if vnni { avx512::quantize(row, inv, shifted, dst) } else { avx2::quantize(row, inv, shifted, dst) }
        };
        #[cfg(not(target_arch = "x86_64"))]
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + if shifted { 128 } else { 0 }) as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Ahead, GROUP, Job, WIDTH};

    /// The largest magnitude of `row`'s values, NaN values left out (0 for none): the
    /// same value as the scalar fold, sixteen lanes at a time.
    ///
    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn largest_magnitude(row: &[f32]) -> f32 {
        let mut best = _mm512_setzero_ps();
        for chunk in row.chunks(WIDTH) {
            let mask: __mmask16 = if chunk.len() == WIDTH { 0xffff } else { ((1u32 << chunk.len()) - 1) as __mmask16 };
            // SAFETY: masked lanes only read the chunk's values (the others are 0).
            let v = _mm512_abs_ps(unsafe { _mm512_maskz_loadu_ps(mask, chunk.as_ptr()) });
            // Where `v` is NaN, `max` returns its second operand: the best so far.
            best = _mm512_max_ps(v, best);
        }
        _mm512_reduce_max_ps(best)
    }

    /// `row` times `inv`, rounded to nearest (ties to even), clamped to `[-127, 127]`, plus
    /// 128 where `shifted` (the unsigned bytes `vpdpbusd` takes; signed bytes else), into
    /// `dst` (at least `row.len()` bytes).
    ///
    /// # Safety
    /// AVX-512F and BW are available.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(row: &[f32], inv: f32, shifted: bool, dst: &mut [u8]) {
        let scale = _mm512_set1_ps(inv);
        let shift = _mm512_set1_epi32(if shifted { 128 } else { 0 });
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for (k, chunk) in row.chunks(WIDTH).enumerate() {
            let mask: __mmask16 = if chunk.len() == WIDTH { 0xffff } else { ((1u32 << chunk.len()) - 1) as __mmask16 };
            // SAFETY: masked lanes only read and write the chunk's values.
            unsafe {
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, chunk.as_ptr()), scale);
                let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), shift);
                _mm512_mask_cvtepi32_storeu_epi8(dst.as_mut_ptr().add(k * WIDTH) as *mut i8, mask, q);
            }
        }
    }

    /// Mask rows `r..r + NR` of the tail at outputs `o..o + lanes` (`o` a multiple of 16):
    /// per group of four inputs, the panel's vector and each row's four bytes broadcast,
    /// `vpdpbusd` into the row's sixteen sums; then each sum less the shift, times the two
    /// scales, plus the bias.
    ///
    /// # Safety
    /// AVX-512F, BW and VNNI are available; the job's pointers are valid for its sizes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const NR: usize>(job: &Job, r: usize, o: usize, lanes: usize, ahead: &mut Ahead) {
        let p = job.panels;
        let groups = p.inp.div_ceil(GROUP);
        let stride = groups * GROUP;
        let mut acc = [_mm512_setzero_si512(); NR];
        // SAFETY: panel o / 16 holds `groups x 64` bytes.
        let panel = unsafe { p.data.as_ptr().add(p.panel_offset(o)) };
        let xq = job.xq.as_ptr();
        for g in 0..groups {
            ahead.step();
            // SAFETY: group g of the panel; row r + j's four bytes of group g (`tail x stride`).
            unsafe {
                let w = _mm512_loadu_si512(panel.add(g * WIDTH * GROUP) as *const __m512i);
                for (j, a) in acc.iter_mut().enumerate() {
                    let four = (xq.add((r + j) * stride + g * GROUP) as *const i32).read_unaligned();
                    *a = _mm512_dpbusd_epi32(*a, _mm512_set1_epi32(four), w);
                }
            }
        }
        // SAFETY: outputs o..o + lanes of the job, its tail rows r..r + NR.
        unsafe {
            let outputs = Outputs::at(job, o, lanes);
            for (j, a) in acc.iter().enumerate() {
                outputs.store(job, r + j, *a);
            }
        }
    }

    /// What turns a tail row's sixteen sums at outputs `o..o + lanes` into its outputs:
    /// the panels' scales and shifts there, and the bias.
    pub(super) struct Outputs {
        mask: __mmask16,
        o: usize,
        sw: __m512,
        shift: __m512i,
        bias: Option<__m512>,
    }

    impl Outputs {
        /// # Safety
        /// AVX-512F is available; `o` is a multiple of 16 within the job's `out`, `lanes`
        /// at most 16 and at most `out - o`.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn at(job: &Job, o: usize, lanes: usize) -> Outputs {
            let p = job.panels;
            let mask: __mmask16 = if lanes == WIDTH { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 };
            // SAFETY: the panels' scales and shifts are padded to whole panels; the bias has
            // `out` values, of which the mask's lanes from o.
            unsafe {
                Outputs {
                    mask,
                    o,
                    sw: _mm512_loadu_ps(p.scale.as_ptr().add(o)),
                    shift: _mm512_loadu_si512(p.shift.as_ptr().add(o) as *const __m512i),
                    bias: (!job.bias.0.is_null()).then(|| _mm512_maskz_loadu_ps(mask, job.bias.0.add(o))),
                }
            }
        }

        /// Tail row `row`'s sums `acc`, less the shift, times the two scales, plus the bias,
        /// into its outputs.
        ///
        /// # Safety
        /// As [`Outputs::at`]; `row` is one of the job's tail rows.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn store(&self, job: &Job, row: usize, acc: __m512i) {
            let mut v = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, self.shift)), self.sw),
                _mm512_set1_ps(job.sx[row]),
            );
            if let Some(b) = self.bias {
                v = _mm512_add_ps(v, b);
            }
            // SAFETY: row start + row of `y`, the mask's lanes from o within `out`.
            unsafe { _mm512_mask_storeu_ps(job.y.0.add((job.start + row) * job.out + self.o), self.mask, v) };
        }
    }
}

/// The tiles for CPUs with AVX2 and no AVX-512 VNNI (see the module's documentation): the
/// same panels, eight outputs a 256-bit vector, the rows quantized to signed bytes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Ahead, GROUP, Job, WIDTH};

    /// Lanes of a 256-bit vector of f32 or int32.
    const LANES: usize = 8;

    /// The lanes of a vector of eight that a chunk of `len` (1 to 8) values fills: -1 in
    /// each of the first `len`, 0 after (for `maskload` and `maskstore`).
    ///
    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    unsafe fn first_lanes(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The largest magnitude of `row`'s values, NaN values left out (0 for none): the
    /// same value as the scalar fold, eight lanes at a time.
    ///
    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn largest_magnitude(row: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        // Four vectors a pass, each into its own maximum (four chains side by side), the
        // last values under a mask. A maximum of numbers is the same in any order.
        let mut best = [_mm256_setzero_ps(); 4];
        let mut chunks = row.chunks_exact(4 * LANES);
        for chunk in &mut chunks {
            for (j, b) in best.iter_mut().enumerate() {
                // SAFETY: vector j of the chunk's 32 values.
                let v = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(chunk.as_ptr().add(j * LANES)) });
                // Where `v` is NaN, `max` returns its second operand: the best so far.
                *b = _mm256_max_ps(v, *b);
            }
        }
        for chunk in chunks.remainder().chunks(LANES) {
            // SAFETY: masked lanes only read the chunk's values (the others are 0).
            let v = _mm256_andnot_ps(sign, unsafe { _mm256_maskload_ps(chunk.as_ptr(), first_lanes(chunk.len())) });
            best[0] = _mm256_max_ps(v, best[0]);
        }
        let mut lanes = [0f32; 4 * LANES];
        for (j, b) in best.iter().enumerate() {
            // SAFETY: eight values into eight of the 32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(j * LANES), *b) };
        }
        lanes.into_iter().fold(0f32, f32::max)
    }

    /// `v` times `scale`, rounded to int32 and clamped to `lo..=hi`.
    ///
    /// # Safety
    /// AVX2 is available.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn clamped(v: __m256, scale: __m256, lo: __m256i, hi: __m256i) -> __m256i {
        // Rounded by MXCSR's mode, to nearest (Rust never changes it); out of range gives
        // i32::MIN, as AVX-512's conversion does.
        _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, scale)), lo), hi)
    }

    /// `row` times `inv`, rounded to nearest (ties to even), clamped to `[-127, 127]`, plus
    /// 128 where `shifted` (signed bytes else), into `dst` (at least `row.len()` bytes): the
    /// values [`super::avx512`] quantizes to (an out-of-range value, such as an infinity, to
    /// -127 as there).
    ///
    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(row: &[f32], inv: f32, shifted: bool, dst: &mut [u8]) {
        let scale = _mm256_set1_ps(inv);
        let flip = _mm256_set1_epi8(if shifted { -128 } else { 0 });
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        // 32 values a pass, stored at once: four vectors of int32 packed to bytes (within
        // each 128-bit half, so each vector's eight bytes come as two runs of four), the
        // runs put in order by one permutation.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let whole = row.len() / (4 * LANES) * (4 * LANES);
        for k in (0..whole).step_by(4 * LANES) {
            // SAFETY: values k..k + 32 of `row` read, bytes k..k + 32 of `dst` written (at
            // least `row.len()` bytes).
            unsafe {
                let at = row.as_ptr().add(k);
                let q = [0, 1, 2, 3].map(|j| clamped(_mm256_loadu_ps(at.add(j * LANES)), scale, lo, hi));
                // In [-127, 127]: the packs do not saturate.
                let words = (_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words.0, words.1), order);
                _mm256_storeu_si256(dst.as_mut_ptr().add(k) as *mut __m256i, _mm256_xor_si256(bytes, flip));
            }
        }
        let (row, dst) = (&row[whole..], &mut dst[whole..]);
        for (k, chunk) in row.chunks(LANES).enumerate() {
            // SAFETY: masked lanes only read the chunk's values; the bytes written below lie
            // within the chunk's place in `dst`.
            unsafe {
                let q = clamped(_mm256_maskload_ps(chunk.as_ptr(), first_lanes(chunk.len())), scale, lo, hi);
                // Eight int32 to eight signed bytes (each 128-bit half's four values in its
                // first four bytes), then plus 128 if shifted: a signed byte's top bit flipped.
                let words = _mm256_packs_epi32(q, q);
                let bytes = _mm256_xor_si256(_mm256_packs_epi16(words, words), flip);
                let four = [
                    _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes)),
                    _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(bytes)),
                ];
                let eight: [u8; 8] = std::mem::transmute(four);
                dst[k * LANES..k * LANES + chunk.len()].copy_from_slice(&eight[..chunk.len()]);
            }
        }
    }

    /// Mask rows `r..r + NR` of the tail at outputs `o..o + lanes` (`o` a multiple of 16)
    /// with panels of 127 levels: per group of four inputs, the panel's two vectors (eight
    /// outputs each) and each row's four bytes broadcast (signed: `quantize`'s unshifted);
    /// `vpmaddubsw` of the bytes' magnitudes by the weights with the bytes' signs (pairs of
    /// products in sixteen bits, at most 2 x 127 x 127), `vpmaddwd` by ones into eight int32
    /// sums; then each sum times the two scales, plus the bias (the sums have no shift).
    ///
    /// # Safety
    /// AVX2 is available; the job's pointers are valid for its sizes, its rows quantized by
    /// [`quantize`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_signed<const NR: usize>(job: &Job, r: usize, o: usize, lanes: usize, ahead: &mut Ahead) {
        let at = Operands::of(job, r, o);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; NR];
        for g in 0..at.groups {
            ahead.step();
            // SAFETY: g < groups; rows r + j are the caller's tail rows.
            let w = unsafe { at.weights(g) };
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let x = unsafe { at.row(j, g) };
                let magnitude = _mm256_abs_epi8(x);
                for (half, a) in a.iter_mut().enumerate() {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w[half], x));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        // SAFETY: as `store`'s; the sums are unshifted.
        unsafe { store::<NR>(job, r, o, lanes, &acc, false) };
    }

    /// Mask rows `r..r + NR` of the tail at outputs `o..o + lanes` (`o` a multiple of 16):
    /// two groups of four inputs at a time, the panel's four vectors (eight outputs each)
    /// and each row's two groups of four bytes broadcast; `vpmaddubsw` of the row's bytes by
    /// the weights (pairs of products in sixteen bits), the two groups' pairs added (at most
    /// `2 x 2 x 255 x 32`, under 32,767: [`super::SHORT_LEVELS`]), `vpmaddwd` by ones
    /// into eight int32 sums; then each sum less the shift, times the two scales, plus the
    /// bias.
    ///
    /// # Safety
    /// AVX2 is available; the job's pointers are valid for its sizes, its rows quantized by
    /// [`quantize`], its panels made with [`super::SHORT_LEVELS`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_pairs<const NR: usize>(job: &Job, r: usize, o: usize, lanes: usize, ahead: &mut Ahead) {
        let at = Operands::of(job, r, o);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; NR];
        let mut g = 0;
        // With nothing to ask for ahead, four and five rows' pairs of groups in assembly
        // ([`pairs`]); the loop below takes the rest (the last group of an odd count).
        // SAFETY: AVX2 is available; the panel holds `groups` groups, and rows r..r + NR
        // of the tail as many groups' bytes each.
        if ahead.per == 0 && at.groups >= 2 && unsafe { pairs::<NR>(&at, at.groups / 2, &mut acc) } {
            g = at.groups / 2 * 2;
        }
        while g + 1 < at.groups {
            ahead.step();
            ahead.step();
            // SAFETY: g + 1 < groups; rows r + j are the caller's tail rows.
            let (w, v) = unsafe { (at.weights(g), at.weights(g + 1)) };
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let (x, y) = unsafe { (at.row(j, g), at.row(j, g + 1)) };
                for (half, a) in a.iter_mut().enumerate() {
                    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(x, w[half]), _mm256_maddubs_epi16(y, v[half]));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
            g += 2;
        }
        if g < at.groups {
            ahead.step();
            // SAFETY: as above, g < groups.
            let w = unsafe { at.weights(g) };
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let x = unsafe { at.row(j, g) };
                for (half, a) in a.iter_mut().enumerate() {
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w[half]), ones));
                }
            }
        }
        // SAFETY: as `store`'s; the sums are shifted.
        unsafe { store::<NR>(job, r, o, lanes, &acc, true) };
    }

    /// One row's two groups in [`pairs`]' loop: the row's bytes of each group broadcast
    /// (from `[$at]` and `[$at + 4]`), each half's two `vpmaddubsw` with the panel's
    /// vectors read from L1 (`{w}`: the pair of groups), their pairs added, widened by the
    /// ones (in `ymm11`), into the row's two accumulators.
    #[rustfmt::skip]
    macro_rules! pair_row {
        ($at:literal, $acc0:literal, $acc1:literal) => {
            concat!(
                "vpbroadcastd ymm12, dword ptr [", $at, "]\n",
                "vpbroadcastd ymm13, dword ptr [", $at, " + 4]\n",
                "vpmaddubsw ymm14, ymm12, ymmword ptr [{w}]\n",
                "vpmaddubsw ymm15, ymm13, ymmword ptr [{w} + 64]\n",
                "vpaddw ymm14, ymm14, ymm15\n",
                "vpmaddwd ymm14, ymm14, ymm11\n",
                "vpaddd ", $acc0, ", ", $acc0, ", ymm14\n",
                "vpmaddubsw ymm14, ymm12, ymmword ptr [{w} + 32]\n",
                "vpmaddubsw ymm15, ymm13, ymmword ptr [{w} + 96]\n",
                "vpaddw ymm14, ymm14, ymm15\n",
                "vpmaddwd ymm14, ymm14, ymm11\n",
                "vpaddd ", $acc1, ", ", $acc1, ", ymm14\n",
            )
        };
    }

    /// [`tile_pairs`]' loop over the first `iterations` pairs of groups of four or five rows
    /// (`NR`), in assembly, into `acc` (zeroed first); false, and nothing done, for other
    /// row counts. Written with intrinsics, the compiler keeps the panel's four vectors of a
    /// pair of groups in registers and so spills accumulators of five rows to the stack (a
    /// load and a store each a pass, besides the multiplies); here the ten accumulators, the
    /// ones, the rows' bytes and two temporaries hold the sixteen registers and the
    /// multiplies read the panel from L1. The same instructions on the same values as that
    /// loop, so the same sums. On a Zen 3 (one thread, fastest of 50 rounds in turns in one
    /// process) the demo's 25-row products from 5 took 4-20% less: gate/up 152-159 us
    /// against 163-165, q/k/v 53-55 against 62-63; six rows (a 2-mask step's) measured no
    /// faster so, nor in tiles of three with the panel in registers (docs/BENCHMARKS.md,
    /// fifty-fourth session).
    ///
    /// # Safety
    /// AVX2 is available; `at`'s panel holds `2 x iterations` groups (`iterations >= 1`)
    /// and its rows `0..NR` as many groups' bytes each.
    #[target_feature(enable = "avx2")]
    unsafe fn pairs<const NR: usize>(at: &Operands, iterations: usize, acc: &mut [[__m256i; 2]; NR]) -> bool {
        static ONES: [i16; 16] = [1; 16];
        let (w, x, stride) = (at.panel, at.xq, at.stride);
        // Rows 3 and 4 are addressed from here (an address takes twice the stride at most).
        let x3 = x.wrapping_add(3 * stride);
        let out = acc.as_mut_ptr() as *mut __m256i;
        // The ones loaded and the accumulators zeroed; the loop, the rows' bytes moving 8 a
        // pass and the panel 128; the accumulators stored, vector `i` at `32 i`.
        macro_rules! tile {
            ($($row:expr),+; $(($reg:literal, $at:literal)),+) => {
                // SAFETY: the function's: every address read lies in the panel's first
                // `2 x iterations` groups or the rows' bytes of as many groups, and `out`
                // holds `2 x NR` vectors.
                unsafe {
                    std::arch::asm!(
                        "vmovdqu ymm11, ymmword ptr [{ones}]",
                        $(concat!("vpxor ", $reg, ", ", $reg, ", ", $reg),)+
                        "2:",
                        $($row,)+
                        "add {x}, 8",
                        "add {x3}, 8",
                        "add {w}, 128",
                        "dec {n}",
                        "jnz 2b",
                        $(concat!("vmovdqu ymmword ptr [{out} + ", $at, "], ", $reg),)+
                        w = inout(reg) w => _,
                        x = inout(reg) x => _,
                        x3 = inout(reg) x3 => _,
                        n = inout(reg) iterations => _,
                        s = in(reg) stride,
                        ones = in(reg) ONES.as_ptr(),
                        out = in(reg) out,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                        options(nostack),
                    )
                }
            };
        }
        match NR {
            4 => tile!(
                pair_row!("{x}", "ymm0", "ymm1"), pair_row!("{x} + {s}", "ymm2", "ymm3"),
                pair_row!("{x} + 2*{s}", "ymm4", "ymm5"), pair_row!("{x3}", "ymm6", "ymm7");
                ("ymm0", "0"), ("ymm1", "32"), ("ymm2", "64"), ("ymm3", "96"),
                ("ymm4", "128"), ("ymm5", "160"), ("ymm6", "192"), ("ymm7", "224")
            ),
            5 => tile!(
                pair_row!("{x}", "ymm0", "ymm1"), pair_row!("{x} + {s}", "ymm2", "ymm3"),
                pair_row!("{x} + 2*{s}", "ymm4", "ymm5"), pair_row!("{x3}", "ymm6", "ymm7"),
                pair_row!("{x3} + {s}", "ymm8", "ymm9");
                ("ymm0", "0"), ("ymm1", "32"), ("ymm2", "64"), ("ymm3", "96"), ("ymm4", "128"),
                ("ymm5", "160"), ("ymm6", "192"), ("ymm7", "224"), ("ymm8", "256"), ("ymm9", "288")
            ),
            _ => return false,
        }
        true
    }

    /// Where a tile of mask rows from `r` at the panel of outputs `o` reads its operands.
    struct Operands {
        panel: *const i8,
        xq: *const u8,
        stride: usize,
        groups: usize,
    }

    impl Operands {
        fn of(job: &Job, r: usize, o: usize) -> Operands {
            let p = job.panels;
            let groups = p.inp.div_ceil(GROUP);
            let stride = groups * GROUP;
            // Panel o / 16 holds `groups x 64` bytes; row r's bytes start at `r x stride`
            // (`tail x stride`): pointers into both (the arithmetic alone, no read).
            Operands {
                panel: p.data.as_ptr().wrapping_add(p.panel_offset(o)),
                xq: job.xq.as_ptr().wrapping_add(r * stride),
                stride,
                groups,
            }
        }

        /// Group `g`'s weights for the panel's outputs 0-7 and 8-15.
        ///
        /// # Safety
        /// AVX2 is available; `g < groups`.
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn weights(&self, g: usize) -> [__m256i; 2] {
            // SAFETY: group g of the panel, 64 bytes.
            unsafe {
                let w = self.panel.add(g * WIDTH * GROUP);
                [_mm256_loadu_si256(w as *const __m256i), _mm256_loadu_si256(w.add(32) as *const __m256i)]
            }
        }

        /// The tile's row `j`'s four bytes of group `g`, broadcast to every lane.
        ///
        /// # Safety
        /// AVX2 is available; `g < groups` and row r + j is a tail row.
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn row(&self, j: usize, g: usize) -> __m256i {
            // SAFETY: four bytes of row r + j's `stride`.
            _mm256_set1_epi32(unsafe { (self.xq.add(j * self.stride + g * GROUP) as *const i32).read_unaligned() })
        }
    }

    /// Rows `r..r + NR` of the tail at outputs `o..o + lanes`: each row's sums `acc` (eight
    /// outputs a vector), less the panels' shift where `shifted`, times the two scales, plus
    /// the bias.
    ///
    /// # Safety
    /// AVX2 is available; `o` is a multiple of 16 within the job's `out`, `lanes` at most
    /// 16 and at most `out - o`; rows r..r + NR are the job's tail rows.
    #[target_feature(enable = "avx2")]
    unsafe fn store<const NR: usize>(
        job: &Job,
        r: usize,
        o: usize,
        lanes: usize,
        acc: &[[__m256i; 2]; NR],
        shifted: bool,
    ) {
        let p = job.panels;
        let (sw, shift, bias) = (p.scale.as_ptr(), p.shift.as_ptr(), job.bias.0);
        for (j, a) in acc.iter().enumerate() {
            for (half, a) in a.iter().enumerate() {
                let o = o + half * LANES;
                let n = lanes.saturating_sub(half * LANES).min(LANES);
                if n == 0 {
                    continue;
                }
                // SAFETY: the panels' scales and shifts are padded to whole panels; the bias
                // and the row of `y` are read and written only in the first `n` lanes from
                // o, within `out`.
                unsafe {
                    let mask = first_lanes(n);
                    let sums = if shifted {
                        _mm256_sub_epi32(*a, _mm256_loadu_si256(shift.add(o) as *const __m256i))
                    } else {
                        *a
                    };
                    let mut v = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(sw.add(o))),
                        _mm256_set1_ps(job.sx[r + j]),
                    );
                    if !bias.is_null() {
                        v = _mm256_add_ps(v, _mm256_maskload_ps(bias.add(o), mask));
                    }
                    _mm256_maskstore_ps(job.y.0.add((job.start + r + j) * job.out + o), mask, v);
                }
            }
        }
    }
}

thread_local! {
    /// Whether this thread's int8 products may use AMX tiles (where they run).
    static AMX: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Let this thread's int8 products put their mask rows through AMX tiles where the CPU and
/// the OS run them (`true`, the default) or always through `vpdpbusd` (the tests and
/// `step_profile` compare the two: the same sums, so the same outputs bit for bit).
pub fn use_amx(on: bool) {
    AMX.with(|c| c.set(on));
}

/// Whether this thread's int8 products may use AMX tiles ([`use_amx`]).
pub(super) fn amx_asked() -> bool {
    AMX.with(std::cell::Cell::get)
}

/// Whether the mask rows can go through AMX tiles here ([`amx::available`]).
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Intel's AMX tiles for the mask rows (Sapphire Rapids and later): one `tdpbusd` adds
/// the products of a tile of sixteen rows by 64 bytes and one of sixteen groups of four
/// bytes by sixteen outputs, 16,384 multiply-adds, where a `vpdpbusd` adds 64. The panels'
/// layout ([`Int8Panels`]: a panel's groups of four inputs by sixteen outputs, 64 bytes a
/// group) is the layout the second tile is loaded from, sixteen groups at a time; the
/// quantized rows the first, 64 bytes of sixteen rows at a time. The sums are integers, so
/// they are `vpdpbusd`'s exactly, and the same code turns them into outputs.
///
/// Rust's AMX intrinsics and target features are unstable: the instructions are written as
/// inline assembly (which the assembler takes without a target feature), and only run where
/// [`available`] found them and asked Linux for the tile state.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::avx512::Outputs;
    use super::{AMX_ROWS, GROUP, Job, WIDTH};

    /// Panels a pass accumulates at once: tiles 0-3 (tile 4 and 5 hold the rows' bytes, a
    /// whole block of sixteen groups and the last, shorter one; 6 and 7 a panel's).
    const PANELS: usize = 4;

    /// Whether the CPU has AMX (tiles and int8) and AVX-512 for the outputs, and Linux gave
    /// this process the tiles' state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`, asked
    /// once; without it the first tile instruction would kill the process).
    /// `MTP_CPU_AMX=off` leaves the tiles out (to compare).
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            let off = std::env::var("MTP_CPU_AMX").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
            if off || !super::vnni() {
                return false;
            }
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked above).
            let leaf7 = __cpuid_count(7, 0);
            let (tile, int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
            tile && int8 && request_tile_state()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_state() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a system call with integer arguments; it changes only which register state
        // the kernel saves for this process.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_state() -> bool {
        false
    }

    /// `ldtilecfg`'s 64 bytes: palette 1, then each tile's bytes a row and rows.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Bytes between a panel's groups of four inputs as a tile loads them (sixteen outputs).
    const PANEL_ROW: isize = (WIDTH * GROUP) as isize;

    /// Bytes between the rows of [`Sums`]' tiles (sixteen sums).
    const SUMS_ROW: isize = (WIDTH * 4) as isize;

    /// `tileloadd` of tile `tile` (named in the instruction) from rows `stride` bytes apart
    /// from `ptr`.
    macro_rules! load {
        ($tile:literal, $ptr:expr, $stride:expr) => {
            asm!(
                concat!("tileloadd ", $tile, ", [{0} + {1}*1]"),
                in(reg) $ptr,
                in(reg) $stride,
                options(nostack, readonly),
            )
        };
    }

    /// `tdpbusd` into tile `acc` (0-3) from tiles `a` and `b`, named in the instruction.
    macro_rules! dpbusd {
        ($acc:expr, $a:literal, $b:literal) => {
            match $acc {
                0 => asm!(concat!("tdpbusd tmm0, ", $a, ", ", $b), options(nostack)),
                1 => asm!(concat!("tdpbusd tmm1, ", $a, ", ", $b), options(nostack)),
                2 => asm!(concat!("tdpbusd tmm2, ", $a, ", ", $b), options(nostack)),
                _ => asm!(concat!("tdpbusd tmm3, ", $a, ", ", $b), options(nostack)),
            }
        };
    }

    /// The job's tail rows at outputs `o0..o1` (`o0` a multiple of 16; `o1` one too, or
    /// `out`): for each block of sixteen rows and four panels, the sums of every group in
    /// tiles 0-3, stored, then each row's outputs as [`super::avx512::tile`] makes them.
    ///
    /// # Safety
    /// [`available`] is true; the job's pointers are valid for its sizes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tail(job: &Job, o0: usize, o1: usize, tail: usize) {
        let p = job.panels;
        let groups = p.inp.div_ceil(GROUP);
        let stride = groups * GROUP;
        let (blocks, rest) = (groups / AMX_ROWS, groups % AMX_ROWS);
        let panel_bytes = groups * WIDTH * GROUP;
        // Tiles 0-3 (sums) and 4-5 (rows) hold as many rows as the block has (a tile's cost
        // follows its rows: a 4-mask step's 20 mask rows are a block of 16 and one of 4).
        let config = |block_rows: usize| {
            let mut config = Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
            for t in [0, 1, 2, 3, 4] {
                (config.rows[t], config.colsb[t]) = (block_rows as u8, (WIDTH * GROUP) as u16);
            }
            (config.rows[6], config.colsb[6]) = (AMX_ROWS as u8, (WIDTH * GROUP) as u16);
            if rest > 0 {
                (config.rows[5], config.colsb[5]) = (block_rows as u8, (rest * GROUP) as u16);
                (config.rows[7], config.colsb[7]) = (rest as u8, (WIDTH * GROUP) as u16);
            }
            config
        };
        let mut sums = Sums([[0; WIDTH * AMX_ROWS]; PANELS]);
        let row_bytes = stride as isize;
        // SAFETY (the block): tile loads read the block's rows of the quantized rows
        // (`stride` bytes apart, within the row) and up to sixteen groups of a panel within
        // its `panel_bytes`; stores write `sums`; the tiles are released before returning.
        unsafe {
            for r in (0..tail).step_by(AMX_ROWS) {
                let block_rows = (tail - r).min(AMX_ROWS);
                asm!("ldtilecfg [{}]", in(reg) &config(block_rows), options(nostack, readonly));
                let rows = job.xq.as_ptr().add(r * stride);
                let mut o = o0;
                while o < o1 {
                    let panels = (o1 - o).div_ceil(WIDTH).min(PANELS);
                    let first = p.data.as_ptr().add(p.panel_offset(o));
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    for block in 0..blocks {
                        let x = rows.add(block * AMX_ROWS * GROUP);
                        load!("tmm4", x, row_bytes);
                        for j in 0..panels {
                            load!("tmm6", first.add(j * panel_bytes + block * AMX_ROWS * WIDTH * GROUP), PANEL_ROW);
                            dpbusd!(j, "tmm4", "tmm6");
                        }
                    }
                    if rest > 0 {
                        let x = rows.add(blocks * AMX_ROWS * GROUP);
                        load!("tmm5", x, row_bytes);
                        for j in 0..panels {
                            load!("tmm7", first.add(j * panel_bytes + blocks * AMX_ROWS * WIDTH * GROUP), PANEL_ROW);
                            dpbusd!(j, "tmm5", "tmm7");
                        }
                    }
                    let s = sums.0.as_mut_ptr();
                    asm!(
                        "tilestored [{0} + {4}*1], tmm0",
                        "tilestored [{1} + {4}*1], tmm1",
                        "tilestored [{2} + {4}*1], tmm2",
                        "tilestored [{3} + {4}*1], tmm3",
                        in(reg) s, in(reg) s.add(1), in(reg) s.add(2), in(reg) s.add(3), in(reg) SUMS_ROW,
                        options(nostack),
                    );
                    for (j, panel) in sums.0.iter().enumerate().take(panels) {
                        let oj = o + j * WIDTH;
                        let outputs = Outputs::at(job, oj, (o1 - oj).min(WIDTH));
                        for (i, row) in (r..r + block_rows).enumerate() {
                            outputs.store(
                                job,
                                row,
                                _mm512_loadu_si512(panel.as_ptr().add(i * WIDTH) as *const __m512i),
                            );
                        }
                    }
                    o += PANELS * WIDTH;
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Tiles 0-3 stored: sixteen rows of sixteen sums each.
    #[repr(C, align(64))]
    struct Sums([[i32; WIDTH * AMX_ROWS]; PANELS]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative(got: &Tensor, want: &Tensor) -> f64 {
        f64::try_from((got - want).norm() / want.norm()).expect("a norm")
    }

    /// A row's largest magnitude in sixteen lanes is the scalar fold's, NaN values left out
    /// and infinities kept, for lengths that end inside a vector; a row of zeros or NaN
    /// values gives 0, and its scale is 1.
    #[test]
    fn largest_magnitude_is_the_scalar_folds() {
        let fold = |row: &[f32]| row.iter().fold(0f32, |m, v| m.max(v.abs()));
        for len in [1usize, 7, 16, 17, 64, 172] {
            let mut row: Vec<f32> = (0..len).map(|j| ((j * 37 % 23) as f32 - 11.0) * 0.37).collect();
            assert_eq!(largest_magnitude(&row), fold(&row), "{len} values");
            row[len / 2] = f32::NAN;
            assert_eq!(largest_magnitude(&row), fold(&row), "{len} values, one NaN");
            row[len - 1] = -1e30;
            assert_eq!(largest_magnitude(&row), 1e30, "{len} values, one large");
            row[0] = f32::NEG_INFINITY;
            assert_eq!(largest_magnitude(&row), f32::INFINITY, "{len} values, one infinite");
            assert_eq!(scale_of(largest_magnitude(&row)), (1.0, 1.0));
        }
        assert_eq!(largest_magnitude(&[0.0; 20]), 0.0);
        assert_eq!(largest_magnitude(&[f32::NAN; 20]), 0.0);
        assert_eq!(scale_of(0.0), (1.0, 1.0));
    }

    /// Rows are quantized as the scalar formula says, shifted or signed, padded to whole
    /// groups of four: lengths that end inside a pass of 32 values, a vector of eight and a
    /// group; a NaN and an infinity (to the lowest level, as `vpdpbusd`'s form does), the
    /// largest magnitudes of both signs, and values halfway between two levels.
    #[test]
    fn rows_quantize_as_the_scalar_formula() {
        if !available() {
            return;
        }
        for len in [1usize, 3, 8, 13, 31, 32, 33, 64, 70, 96, 171, 256] {
            let mut rows: Vec<f32> = (0..3 * len).map(|j| ((j * 53 % 41) as f32 - 20.0) * 0.31).collect();
            rows[len / 2] = f32::NAN;
            rows[len - 1] = f32::INFINITY;
            rows[len + len / 3] = -1e6;
            rows[2 * len] = 2.5;
            rows[3 * len - 1] = -2.5;
            for shifted in [false, true] {
                let (mut xq, mut sx) = (Vec::new(), Vec::new());
                quantize_rows(&rows, len, shifted, &mut xq, &mut sx);
                let stride = len.div_ceil(GROUP) * GROUP;
                assert_eq!((xq.len(), sx.len()), (3 * stride, 3), "{len} values");
                for (r, row) in rows.chunks_exact(len).enumerate() {
                    let (s, inv) = scale_of(row.iter().fold(0f32, |m, v| m.max(v.abs())));
                    assert_eq!(sx[r], s, "{len} values, row {r}");
                    let shift = if shifted { 128 } else { 0 };
                    let want: Vec<u8> = (0..stride)
                        .map(|i| {
                            let q = match row.get(i) {
                                Some(v) if (v * inv).is_finite() => {
                                    (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32
                                }
                                Some(_) => -127,
                                None => 0,
                            };
                            (q + shift) as u8
                        })
                        .collect();
                    assert_eq!(&xq[r * stride..(r + 1) * stride], &want[..], "{len} values, row {r}, {shifted}");
                }
            }
        }
    }

    /// The rows before `start` are `few_rows::product`'s bit for bit (one thread or two,
    /// widths that end inside a panel or a group of four, 9 head rows, whose f32 tiles take
    /// three weight rows while the parts here split at sixteen); the rows from `start` on
    /// are the f32 product to int8's rounding.
    #[test]
    fn head_rows_exact_and_tail_rows_close() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let _g = tch::no_grad_guard();
        for (out, inp, rows, start) in
            [(1408, 256, 25, 5), (172, 64, 9, 3), (40, 171, 7, 1), (256, 704, 4, 3), (300, 96, 20, 9)]
        {
            let w = Tensor::randn([out, inp], o) * 0.05;
            let bias = Tensor::randn([out], o);
            let x = Tensor::randn([rows, inp], o);
            for (short, threads) in [(false, 1), (false, 2), (true, 1), (true, 2)] {
                let panels = Int8Panels::of(&w, short).expect("panels");
                let y = few_rows::tests::in_team(threads, || product_tail(&x, &w, Some(&bias), &panels, start))
                    .expect("a product");
                let head = few_rows::product(&x.narrow(0, 0, start), &w, Some(&bias)).expect("a product");
                assert!(y.narrow(0, 0, start).equal(&head), "{out}x{inp}: head rows differ ({threads} threads)");
                let want = x.narrow(0, start, rows - start).matmul(&w.tr()) + &bias;
                let err = relative(&y.narrow(0, start, rows - start), &want);
                // A weight value's rounding is at most half a step of its row's largest
                // magnitude over 127 or 32 (short panels where AVX2's pair tiles run): about
                // 1% and 4% of these rows' products.
                let bound = if panels.levels() == SHORT_LEVELS { 6e-2 } else { 2e-2 };
                assert_eq!(panels.levels() == SHORT_LEVELS, short && !vnni());
                assert!(err < bound, "{out}x{inp}: tail rows {err:.2e} from f32");
                assert!(err > 0.0, "{out}x{inp}: tail rows not quantized");
            }
        }
    }

    /// Mask rows through AMX tiles are the `vpdpbusd` tiles' outputs bit for bit (integer
    /// sums, the same conversion): weights whose inputs end inside a block of sixteen
    /// groups or a group of four, outputs inside a panel or a pass of four panels, 4 to 32 mask
    /// rows (whole tiles and shorter blocks), after next-token rows or alone, one thread or
    /// two. Where the tiles do not run, both sides take `vpdpbusd` and the check says
    /// nothing about AMX ([`amx_available`]; the Sapphire Rapids machines do run it).
    #[test]
    fn amx_tiles_equal_vnni_tiles() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let _g = tch::no_grad_guard();
        for (out, inp, rows, start) in [
            (3000, 180, 25, 5),
            (1100, 500, 9, 1),
            (1408, 384, 20, 0),
            (530, 1001, 6, 2),
            (2050, 256, 32, 0),
            (2100, 260, 4, 0),
            (576, 1536, 21, 1),
        ] {
            assert!(out * inp >= AMX_MIN_WEIGHT as i64, "{out}x{inp} is below the tiles' threshold");
            let w = Tensor::randn([out, inp], o) * 0.05;
            let bias = Tensor::randn([out], o);
            let x = Tensor::randn([rows, inp], o);
            let panels = Int8Panels::of(&w, false).expect("panels");
            for threads in [1, 2] {
                let run = |amx: bool| {
                    use_amx(amx);
                    let y = few_rows::tests::in_team(threads, || product_tail(&x, &w, Some(&bias), &panels, start));
                    use_amx(true);
                    y.expect("a product")
                };
                let (tiles, vnni) = (run(true), run(false));
                assert!(tiles.equal(&vnni), "{out}x{inp}, {rows} rows from {start}, {threads} threads");
            }
        }
    }

    /// The mask rows' outputs are the integer sums of the quantized rows and panels, times
    /// the two scales, plus the bias, bit for bit, whichever tiles run here (`vpdpbusd`,
    /// AMX or AVX2's `vpmaddubsw`: so they agree with each other): rows quantized as the
    /// scalar formula says, weights read back from the panels; widths that end inside a
    /// group of four, a vector of eight and a panel, one thread or two, rows of large
    /// values (every byte pair at the largest magnitudes, both signs, the sums AVX2's
    /// sixteen bits must hold); the next-token rows [`few_rows::product`]'s; the same with
    /// the weight read from memory, its columns taken in chunks or not ([`use_ahead`]); with
    /// panels of 127 levels and short ones; tiles of two to six rows over even and odd
    /// counts of groups (AVX2's loop of four and five rows in assembly, and its last group).
    #[test]
    fn tail_rows_are_the_integer_sums() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let _g = tch::no_grad_guard();
        let cases =
            [(300, 96, 12, 2), (40, 171, 7, 0), (1408, 256, 25, 5), (21, 13, 3, 1), (48, 20, 10, 0), (40, 64, 8, 0)];
        for ((out, inp, rows, start), short) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let w = Tensor::randn([out, inp], o) * 0.05;
            // The first two weight rows and the first tail row all at their largest
            // magnitude, of either sign: AVX2's sixteen-bit sums at their bound
            // (255 x 32 for each product).
            let _ = w.get(0).fill_(0.7);
            let _ = w.get(1).fill_(-0.7);
            let bias = Tensor::randn([out], o);
            let x = Tensor::randn([rows, inp], o);
            let _ = x.get(start).fill_(3.0);
            let _ = x.get(start + 1).fill_(-3.0);
            let panels = Int8Panels::of(&w, short).expect("panels");
            let (out, inp, rows, start) = (out as usize, inp as usize, rows as usize, start as usize);
            let groups = inp.div_ceil(GROUP);
            let xs = Vec::<f32>::try_from(x.view([-1])).expect("host rows");
            let bs = Vec::<f32>::try_from(&bias).expect("host bias");
            let mut want = vec![0f32; (rows - start) * out];
            for (t, row) in xs.chunks_exact(inp).skip(start).enumerate() {
                let (s, inv) = scale_of(row.iter().fold(0f32, |m, v| m.max(v.abs())));
                let q: Vec<i32> = row.iter().map(|v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32).collect();
                for c in 0..out {
                    let weight = |i: usize| {
                        panels.data[c / WIDTH * groups * WIDTH * GROUP
                            + i / GROUP * WIDTH * GROUP
                            + c % WIDTH * GROUP
                            + i % GROUP]
                    };
                    let acc: i32 = q.iter().enumerate().map(|(i, &v)| v * i32::from(weight(i))).sum();
                    want[t * out + c] = acc as f32 * panels.scale[c] * s + bs[c];
                }
            }
            // The weight as made, then read from memory (in a buffer bigger than the
            // last-level cache), its columns in chunks and not.
            let head = few_rows::product(&x.narrow(0, 0, start as i64), &w, Some(&bias));
            let mut w = w;
            for (from_memory, ahead) in [(false, true), (true, false), (true, true)] {
                if from_memory && !super::super::huge_pages::read_from_memory(w.data_ptr() as usize) {
                    let mut filler = Tensor::zeros([(super::super::huge_pages::last_level_cache() / 4) as i64], o);
                    super::super::huge_pages::pack(vec![&mut w, &mut filler]);
                    assert!(super::super::huge_pages::read_from_memory(w.data_ptr() as usize));
                }
                for threads in [1, 2] {
                    let y = few_rows::tests::in_team(threads, || {
                        use_ahead(ahead);
                        product_tail(&x, &w, Some(&bias), &panels, start as i64)
                    })
                    .expect("a product");
                    let got = Vec::<f32>::try_from(y.narrow(0, start as i64, (rows - start) as i64).reshape([-1]))
                        .expect("host rows");
                    let case = format!(
                        "{out}x{inp}, {rows} rows from {start}, {threads} threads, {from_memory} {ahead}, \
                         {} levels",
                        panels.levels()
                    );
                    assert_eq!(got, want, "{case}");
                    if let Some(head) = &head {
                        assert!(y.narrow(0, 0, start as i64).equal(head), "{case}");
                    }
                }
            }
        }
    }

    /// A row's int8 outputs do not depend on the other rows of the call, nor on the thread.
    #[test]
    fn tail_rows_do_not_depend_on_the_others() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let _g = tch::no_grad_guard();
        let w = Tensor::randn([300, 96], o);
        for short in [false, true] {
            let panels = Int8Panels::of(&w, short).expect("panels");
            let x = Tensor::randn([12, 96], o);
            let all = product_tail(&x, &w, None, &panels, 2).expect("a product");
            let some = product_tail(&x.narrow(0, 0, 5), &w, None, &panels, 2).expect("a product");
            assert!(all.narrow(0, 0, 5).equal(&some), "{} levels", panels.levels());
        }
    }

    /// Host rows multiplied by `product_into` are `product_tail`'s rows from 0, bit for bit,
    /// one thread or two.
    #[test]
    fn host_rows_equal_tail_rows() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let _g = tch::no_grad_guard();
        let cases = [(4096, 256, 1), (4096, 256, 4), (300, 96, 3), (40, 171, 2)];
        for ((out, inp, rows), short) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let w = Tensor::randn([out, inp], o) * 0.05;
            let panels = Int8Panels::of(&w, short).expect("panels");
            let x = Tensor::randn([rows, inp], o);
            let want = product_tail(&x, &w, None, &panels, 0).expect("a product");
            let xs = Vec::<f32>::try_from(x.view([-1])).expect("host rows");
            for threads in [1, 2] {
                let mut y = vec![0f32; (rows * out) as usize];
                assert!(few_rows::tests::in_team(threads, || product_into(&xs, &panels, &mut y)));
                let want = Vec::<f32>::try_from(want.view([-1])).expect("host rows");
                assert_eq!(y, want, "{out}x{inp}, {rows} rows, {threads} threads");
            }
            assert!(!product_into(&xs[1..], &panels, &mut vec![0f32; (rows * out) as usize]), "a partial row");
        }
    }

    /// Operands that do not fit are declined (the caller runs its other form).
    #[test]
    fn declines_what_does_not_fit() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([32, 16], o);
        let panels = Int8Panels::of(&w, false).expect("panels");
        let x = Tensor::randn([4, 16], o);
        assert!(product_tail(&x, &w, None, &panels, 4).is_none(), "no tail rows");
        assert!(product_tail(&x, &Tensor::randn([32, 8], o), None, &panels, 1).is_none(), "another weight");
        assert!(product_tail(&Tensor::randn([40, 16], o), &w, None, &panels, 1).is_none(), "too many rows");
        assert!(product_tail(&x, &w, None, &panels, 1).is_some());
        assert!(product_tail(&x.view([2, 2, 16]), &w, None, &panels, 1).is_none(), "two sequences");
        assert!(product_tail(&x.view([1, 1, 4, 16]), &w, None, &panels, 1).is_none(), "four dimensions");
    }

    /// One sequence's rows (`[1, rows, in]`, as a layer holds them) give `[1, rows, out]`,
    /// the same values as the rows alone, also where they are not contiguous.
    #[test]
    fn a_sequence_gives_a_sequence() {
        if !available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([40, 24], o);
        let bias = Tensor::randn([40], o);
        let panels = Int8Panels::of(&w, false).expect("panels");
        let x = Tensor::randn([7, 24], o);
        let want = product_tail(&x, &w, Some(&bias), &panels, 3).expect("a product");
        let got = product_tail(&x.unsqueeze(0), &w, Some(&bias), &panels, 3).expect("a product");
        assert_eq!(got.size(), [1, 7, 40]);
        assert!(got.squeeze_dim(0).equal(&want));
        let wide = Tensor::randn([1, 7, 48], o);
        wide.narrow(2, 0, 24).copy_(&x);
        let got = product_tail(&wide.narrow(2, 0, 24), &w, Some(&bias), &panels, 3).expect("a product");
        assert!(got.squeeze_dim(0).equal(&want), "rows not contiguous");
    }
}
