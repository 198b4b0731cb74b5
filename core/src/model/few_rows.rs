//! Products of a few rows with a weight on the CPU (`x W^T`, f32 or bf16, 1 to [`MAX_ROWS`]
//! rows): the products of decoding, an AR step's one row and a speculative step's 9 or 25.
//!
//! Measured on the CPU we run on (docs/BENCHMARKS.md, "A product kernel for a few rows"),
//! neither of libtorch's libraries does these well: MKL and oneDNN pack the weight for
//! every call and run their few-column kernels at a fraction of the CPU's arithmetic, so
//! SmolLM2-135M's layer products take 36 ms for one row where reading the weights takes
//! about 17, and 58 ms for 9 rows. This kernel streams the weight once, four output rows at
//! a time, and multiplies each block by every input row while it sits in L1 (AVX2 and FMA,
//! chosen at run time; other CPUs keep the libraries). The output columns are split between
//! the threads of libtorch's own OpenMP team.
//!
//! Every output is the same sequence of operations whatever the number of rows and
//! wherever its row falls in a tile (eight lanes accumulated over the input in order, or
//! sixteen on a CPU with AVX-512 ([`sixteen_lanes`]), the lanes summed in a fixed order, the
//! remainder added last, then the bias): a row's output
//! does not depend on the other rows of the call. So a speculative step's next-token rows
//! equal an AR step's outputs bit for bit, however many mask rows ride along.
//!
//! A bf16 model's products ([`product`] of bf16 operands) run the same tiles with the
//! weight read as bf16, half the bytes, and widened to f32 in registers (a bf16 value is the
//! upper half of the f32 with the same value): the rows are widened to f32 first and each
//! output is rounded to bf16 once, at the end.

// The one module that reads tensors through raw pointers and uses SIMD intrinsics: what
// each `unsafe` relies on is stated where it is used.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// The most rows a call takes (more go [`product_in_chunks`]: on the CPUs measured, up to a
/// few hundred rows this kernel still beats MKL's, see `linear::chunked_max_rows`).
pub const MAX_ROWS: i64 = 32;

/// What a call is estimated to cost on one thread, for [`worth_sharing`]: the bytes it
/// reads from beyond the core's own caches (its weight) and its arithmetic, counted in f32
/// multiply-adds of this kernel (an int8 or bf16 kernel's counted at its own rate, see the
/// callers).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Work {
    pub bytes: usize,
    pub f32_macs: f64,
}

/// Bytes a core reads a nanosecond, and this kernel's f32 multiply-adds a nanosecond at a
/// few rows: on the AMX Xeon of docs/BENCHMARKS.md (forty-sixth session, `layer_ops`, one
/// thread), the demo's one-row gate/up product (1.4 MB of weight) took 45 us, the proxy's
/// 9- and 25-row gate/up (198k and 550k multiply-adds) 8.7 and 22 us.
const BYTES_PER_NS: f64 = 32.0;
const F32_MACS_PER_NS: f64 = 32.0;

/// Calls estimated to take less than this on one thread run on the calling thread alone:
/// handing half of a call to the second thread of the OpenMP team costs about 3.5 us there
/// and more in the caches (the proxy's 9-row gate/up product, 8.7 us alone, took 7.7
/// shared, but the layer around it 45 us against 39 with nothing shared). The rule until
/// the forty-sixth session counted multiply-adds alone (65,536, whatever their kind), so
/// that a step's 9- and 25-row calls of a thin model were shared where AR's were not. On
/// the AMX Xeon (`mtp bench`, the proxy's untrained adapter, three rounds in turns), the
/// proxy's steps cost 1.55-1.58 / 2.37-2.49 AR steps at 2 / 4 masks with that rule,
/// 1.42-1.46 / 2.27-2.32 from 10 us, 1.34-1.48 / 1.98-2.20 from 20, 1.45-1.47 / 2.14-2.18
/// from 40, and 1.44-1.50 / 2.13-2.24 on one thread; the demo's were the same with each,
/// its AR's one-row products shared (docs/BENCHMARKS.md, forty-sixth session).
/// `MTP_SHARE_MIN_US` sets another value (microseconds; 0: share whatever the size).
const SHARE_MIN_NS: f64 = 20_000.0;

/// [`SHARE_MIN_NS`], or `MTP_SHARE_MIN_US` where set (read once).
fn share_min_ns() -> f64 {
    static MIN: OnceLock<f64> = OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("MTP_SHARE_MIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|us| us.is_finite() && *us >= 0.0)
            .map_or(SHARE_MIN_NS, |us| us * 1000.0)
    })
}

/// Whether a call of `work` is worth sharing between threads ([`in_parts`]): its estimated
/// time on one thread is at least [`SHARE_MIN_NS`]. Which thread computes a row or column
/// never changes its value, so this decides speed only.
pub(super) fn worth_sharing(work: Work) -> bool {
    worth_sharing_from(work, 1.0)
}

/// [`worth_sharing`] from `fraction` of its threshold ([`SHARE_MIN_NS`], or
/// `MTP_SHARE_MIN_US`): for calls whose parts read nothing the other part reads, such as
/// attention's key/value heads, where sharing costs the hand-over and little more.
pub(super) fn worth_sharing_from(work: Work, fraction: f64) -> bool {
    #[cfg(test)]
    if tests::SHARE_ALL.with(std::cell::Cell::get) {
        return true;
    }
    work.bytes as f64 / BYTES_PER_NS + work.f32_macs / F32_MACS_PER_NS >= share_min_ns() * fraction
}

/// Weight rows a bf16 block multiplies at once: one output a lane of a 512-bit vector.
const BF16_BLOCK: usize = 16;

/// Whether this CPU runs the kernel (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has AVX-512's 32 vector registers for 256-bit operations (AVX-512F and
/// VL): the f32 tiles then hold up to six rows' accumulators (`avx512::columns_f32`).
fn wide_registers() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            available()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the f32 tiles accumulate each output in sixteen lanes (512-bit vectors) rather
/// than eight: where [`wide_registers`] holds, unless `MTP_CPU_LANES=8` asks for eight (to
/// compare the two on one machine). The choice is made once a process, for every product
/// of every row count, AR's one row among them, so a row's outputs still do not depend on
/// the other rows of a call. Sixteen lanes halve the multiply-adds of a tile where the CPU
/// has 512-bit multiply-add units (docs/BENCHMARKS.md, "Sixteen lanes").
pub(super) fn sixteen_lanes() -> bool {
    #[cfg(test)]
    if let Some(wide) = tests::LANES16.with(std::cell::Cell::get) {
        return wide && wide_registers();
    }
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        wide_registers() && !matches!(std::env::var("MTP_CPU_LANES").as_deref().map(str::trim), Ok("8"))
    })
}

/// Whether this CPU multiplies bf16 pairs with f32 sums (AVX-512 BF16: Zen 4, Sapphire
/// Rapids and later), for [`TailTerm::bf16`].
pub fn bf16_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            available()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether multiplying rows in bf16 pairs ([`TailTerm::bf16`]) pays on this CPU, for a
/// choice made by default: it runs ([`bf16_available`]) and the CPU is an AMD one before
/// Zen 5 ([`amd_before_zen5`]). On the Zen 4 measured, a 4-mask step of the SmolLM2-135M
/// shape fell from 2.1-2.8 to 1.6-2.2 AR steps with its mask rows in pairs; on an Intel
/// Xeon (AVX-512 BF16 and AMX) it rose from 2.17-2.20 to 2.46-2.56, the pairs' 512-bit
/// instructions slower there than the f32 tiles' 256-bit ones (docs/BENCHMARKS.md, "bf16
/// models on the CPU"). Both measured before the f32 tiles took sixteen lanes
/// ([`sixteen_lanes`]), which made the exact form cheaper still. On a Zen 5 (sixty-fourth
/// session, `mtp bench`, three rounds in turns) the 3- and 4-mask steps ran 1.91-1.93 and
/// 2.11-2.17 AR steps in pairs against 1.22-1.55 and 1.75-2.26 exact.
pub fn bf16_pairs_pay() -> bool {
    bf16_available() && amd_before_zen5()
}

/// Whether the CPU is an AMD one before Zen 5 (vendor string `AuthenticAMD`, family 0x19
/// or lower: Zen 3, Zen 4 and the cores before them), whose cores do half the f32 multiply-adds a cycle of an
/// Intel Xeon's or a Zen 5's. Where a default depends on it, it is because the cores
/// measured so: a Zen 4 core ran 3.3 G 512-bit f32 multiply-adds a second (its 512-bit
/// instructions in two halves) and a Zen 3 core 5.5 G 256-bit ones, an Emerald Rapids Xeon
/// core 5.5 G 512-bit ones and a Zen 5 (EPYC, family 0x1A) core 8.9 G (two 512-bit units
/// each), so on the latter a few rows' f32 arithmetic is the cheaper form more often
/// (docs/BENCHMARKS.md).
pub fn amd_before_zen5() -> bool {
    static BEFORE: OnceLock<bool> = OnceLock::new();
    *BEFORE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // The vendor string of leaf 0 (EBX, EDX, ECX); leaf 1's EAX holds the family.
            let leaf = std::arch::x86_64::__cpuid(0);
            let vendor: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            vendor == b"AuthenticAMD" && cpu_family(std::arch::x86_64::__cpuid(1).eax) <= 0x19
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The family of CPUID leaf 1's `eax`: the base family (bits 8-11), plus the extended
/// family (bits 20-27) where the base is 0xF (every AMD CPU since the Athlon 64).
fn cpu_family(eax: u32) -> u32 {
    let base = (eax >> 8) & 0xF;
    match base {
        0xF => base + ((eax >> 20) & 0xFF),
        _ => base,
    }
}

/// Whether `x W^T` (`x`: `[rows, in]`) can run here: the CPU has the instructions, both
/// are f32 on the CPU, `x` has 1 to [`MAX_ROWS`] rows, and neither needs a gradient.
pub fn takes(x: &Tensor, weight: &Tensor) -> bool {
    takes_kind(x, weight, Kind::Float, false)
}

/// [`takes`] for `x` of `[rows, in]` or `[1, rows, in]` (a decoding pass's one sequence as
/// a layer holds it, read in place with no view made): `x`'s rows and width, `None` where
/// [`takes`] would not take it as `[rows, in]`.
pub fn takes_rows(x: &Tensor, weight: &Tensor) -> Option<(i64, i64)> {
    if !available() || x.kind() != Kind::Float || weight.kind() != Kind::Float {
        return None;
    }
    let (xs, ws) = (x.size(), weight.size());
    let (&[rows, inp], &[_, w_in]) = (
        match xs[..] {
            [_, _] => &xs[..],
            [1, _, _] => &xs[1..],
            _ => return None,
        },
        &ws[..],
    ) else {
        return None;
    };
    (inp == w_in
        && (1..=MAX_ROWS).contains(&rows)
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && !x.requires_grad()
        && !weight.requires_grad())
    .then_some((rows, inp))
}

/// [`takes`] for operands of `kind`; with `any_rows`, `x` may have more than [`MAX_ROWS`]
/// rows (a product in chunks). The kind is checked first: most calls are f32 ones, and the
/// checks that read sizes cost more.
fn takes_kind(x: &Tensor, weight: &Tensor, kind: Kind, any_rows: bool) -> bool {
    if !available() || x.kind() != kind || weight.kind() != kind {
        return false;
    }
    let (xs, ws) = (x.size(), weight.size());
    xs.len() == 2
        && ws.len() == 2
        && xs[1] == ws[1]
        && xs[0] >= 1
        && (any_rows || xs[0] <= MAX_ROWS)
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && !x.requires_grad()
        && !weight.requires_grad()
}

/// Whether [`bf16_product`] takes `x W^T + b`: bf16 operands [`takes`] would take in f32
/// (`x` of any number of rows, judged by its first [`MAX_ROWS`]), and a bias of as many
/// values as outputs, f32 or bf16.
fn takes_bf16(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    takes_kind(x, weight, Kind::BFloat16, true)
        && bias
            .is_none_or(|b| matches!(b.kind(), Kind::Float | Kind::BFloat16) && b.numel() == weight.size()[0] as usize)
}

/// `x W^T + b` (`x`: `[rows, in]`, `weight`: `[out, in]`, `bias`: `[out]`), or `None`
/// when [`takes`] says no. bf16 operands are taken alike ([`takes`] for bf16) and give a
/// bf16 output (see the module's documentation).
pub fn product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    if x.size().first().is_some_and(|&rows| rows <= MAX_ROWS) && takes_bf16(x, weight, bias) {
        return Some(bf16_product(x, weight, bias, None));
    }
    if !takes(x, weight) || bias.is_some_and(|b| b.kind() != Kind::Float || b.numel() != weight.size()[0] as usize) {
        return None;
    }
    let y = Tensor::empty([x.size()[0], weight.size()[0]], (Kind::Float, Device::Cpu));
    run(x, weight, bias, &y, false, Extras::default());
    Some(y)
}

/// [`product`] of any number of rows, [`MAX_ROWS`] at a time (a prompt's prefill): each
/// row's output is the one [`product`] gives it alone. `None` when [`takes`] says no to a
/// call of [`MAX_ROWS`] rows.
pub fn product_in_chunks(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    let rows = x.size().first().copied().unwrap_or(0);
    if takes_bf16(x, weight, bias) {
        return Some(bf16_product(x, weight, bias, None));
    }
    if !takes_kind(x, weight, Kind::Float, true)
        || bias.is_some_and(|b| b.kind() != Kind::Float || b.numel() != weight.size()[0] as usize)
    {
        return None;
    }
    let y = Tensor::empty([rows, weight.size()[0]], (Kind::Float, Device::Cpu));
    // Made contiguous once, not once a chunk.
    let mut copy = None;
    let weight = contiguous(weight, &mut copy);
    for at in (0..rows).step_by(MAX_ROWS as usize) {
        let n = MAX_ROWS.min(rows - at);
        // Rows of a contiguous `y`: contiguous too.
        run(&x.narrow(0, at, n), weight, bias, &y.narrow(0, at, n), false, Extras::default());
    }
    Some(y)
}

/// `x W^T + b` of bf16 operands (any number of rows, [`MAX_ROWS`] a call; checked by the
/// callers): the rows widened to f32, the weight read as bf16 by the f32 tiles, each
/// output rounded to bf16 once (to nearest, ties to even, as libtorch rounds). The
/// widening and the rounding happen here, not as libtorch operations (two more a product,
/// each costing more than a step's rows of arithmetic). With `tail_from` (where
/// [`bf16_available`]), the rows from it on are multiplied pair by pair in bf16 with f32
/// sums, as [`TailTerm::bf16`] says of f32 rows, their values as they are.
fn bf16_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, tail_from: Option<usize>) -> Tensor {
    let (rows, inp, out) = (x.size()[0] as usize, x.size()[1] as usize, weight.size()[0] as usize);
    let x = x.contiguous();
    // SAFETY: a contiguous bf16 tensor of `rows x inp` values.
    let halves = unsafe { std::slice::from_raw_parts(x.data_ptr() as *const u16, rows * inp) };
    let wide: Vec<f32> = halves.iter().map(|&h| f32::from_bits(u32::from(h) << 16)).collect();
    // The tail rows' bf16 values, each row zero-padded to `stride`.
    let from = tail_from.filter(|&from| from < rows && bf16_available());
    let stride = inp.div_ceil(32) * 32;
    let mut tail = Vec::new();
    if let Some(from) = from {
        tail = vec![0u16; (rows - from) * stride];
        for (dst, row) in tail.chunks_exact_mut(stride).zip(halves[from * inp..].chunks_exact(inp)) {
            dst[..inp].copy_from_slice(row);
        }
    }
    let bias = bias.map(|b| b.to_kind(Kind::Float).contiguous());
    let weight = weight.contiguous();
    let mut sums = vec![0f32; rows * out];
    for at in (0..rows).step_by(MAX_ROWS as usize) {
        let n = (MAX_ROWS as usize).min(rows - at);
        // This call's first tail row, when it has any.
        let low = from.filter(|&from| from < at + n).map(|from| {
            let first = from.max(at);
            Bf16Rows { x: tail[(first - from) * stride..].as_ptr(), from: first - at, stride }
        });
        dispatch(Job {
            x: wide[at * inp..].as_ptr(),
            // The bf16 values, read as `u16`s (`w16`).
            w: weight.data_ptr() as *const f32,
            bias: bias.as_ref().map_or(std::ptr::null(), |b| b.data_ptr() as *const f32),
            y: sums[at * out..].as_mut_ptr(),
            rows: n,
            inp,
            out,
            accumulate: false,
            low_rank: None,
            bf16: low,
            tail_weight: None,
            w16: true,
            lanes16: sixteen_lanes(),
            from_memory: false,
            tail_panels: std::ptr::null(),
        });
    }
    let y = Tensor::empty([rows as i64, out as i64], (Kind::BFloat16, Device::Cpu));
    // SAFETY: a new contiguous bf16 tensor of `rows x out` values.
    let y_halves = unsafe { std::slice::from_raw_parts_mut(y.data_ptr() as *mut u16, rows * out) };
    for (h, &v) in y_halves.iter_mut().zip(&sums) {
        *h = round_to_bf16(v);
    }
    y
}

/// `x W^T + b` of bf16 operands (`x`: `[rows, in]`, any number of rows), the rows from
/// `start` on multiplied pair by pair in bf16 with f32 sums (`vdpbf16ps`, 32 pairs an
/// instruction; where [`bf16_available`], else as the rows before): those before `start`
/// exactly what [`product`] gives them. For a decoding step's mask rows, whose outputs are
/// only drafts. `None` when [`takes`] says no to bf16 operands of [`MAX_ROWS`] rows.
pub fn product_bf16_tail(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, start: i64) -> Option<Tensor> {
    let rows = *x.size().first()?;
    let fits = (0..=rows).contains(&start) && takes_bf16(x, weight, bias);
    fits.then(|| bf16_product(x, weight, bias, Some(start as usize)))
}

/// `v` rounded to bf16 (to nearest, ties to even; NaN to a quiet NaN), as libtorch does.
fn round_to_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let bits = v.to_bits();
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `y += x W^T` in place (`y`: `[rows, out]`, contiguous, f32); false (and `y` untouched)
/// when [`takes`] says no or `y` does not fit.
pub fn accumulate(x: &Tensor, weight: &Tensor, y: &Tensor) -> bool {
    let fits = y.size() == [x.size()[0], weight.size()[0]]
        && y.kind() == Kind::Float
        && y.device() == Device::Cpu
        && y.is_contiguous()
        && !y.requires_grad();
    if !fits || !takes(x, weight) {
        return false;
    }
    run(x, weight, None, y, true, Extras::default());
    true
}

/// `y = x W^T + b` for rows held in host memory (`x`: `rows x in` values, row after row;
/// `y`: `rows x out`; `bias`: `out`), the weight a tensor: the same kernel and the same
/// outputs as [`product`], without a tensor for the input or the output (the draft chain
/// multiplies one row at a time, and a libtorch operation costs more than the product of
/// a small head). False (and `y` untouched) when [`takes`] would say no for the weight or
/// the lengths do not fit.
pub fn product_into(x: &[f32], weight: &Tensor, bias: Option<&[f32]>, y: &mut [f32]) -> bool {
    let size = weight.size();
    let [out, inp] = size[..] else { return false };
    let (out, inp) = (out as usize, inp as usize);
    let rows = x.len().checked_div(inp).unwrap_or(0);
    let fits = available()
        && weight.device() == Device::Cpu
        && weight.kind() == Kind::Float
        && !weight.requires_grad()
        && weight.is_contiguous()
        && (1..=MAX_ROWS as usize).contains(&rows)
        && x.len() == rows * inp
        && y.len() == rows * out
        && bias.is_none_or(|b| b.len() == out);
    if !fits {
        return false;
    }
    let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
    dispatch(Job::plain(
        x.as_ptr(),
        weight.data_ptr() as *const f32,
        bias,
        y.as_mut_ptr(),
        (rows, inp, out),
        sixteen_lanes(),
    ));
    true
}

/// One product's operands, as raw pointers into tensors the caller keeps alive until every
/// part has run.
#[derive(Clone, Copy)]
struct Job {
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    y: *mut f32,
    rows: usize,
    inp: usize,
    out: usize,
    accumulate: bool,
    /// A low-rank term added to the rows from its `start` on, in the same parallel region.
    low_rank: Option<LowRank>,
    /// Rows from `from` on multiplied in bf16 (see [`product_with_low_rank`]).
    bf16: Option<Bf16Rows>,
    /// `(from, weight)`: the rows from `from` on multiplied by this weight (the same
    /// shape) instead (see [`product_two_weights`]).
    tail_weight: Option<(usize, *const f32)>,
    /// The weight holds bf16 values (`w` points at `u16`s), widened to f32 as they are
    /// read (by the `bf16` rows as they are); not with a term or a tail weight.
    w16: bool,
    /// Accumulate in sixteen lanes ([`sixteen_lanes`]), fixed when the job is made so that
    /// every part, on whatever thread, runs the same sequence of operations.
    lanes16: bool,
    /// The weight is read from memory, not a cache ([`super::huge_pages::read_from_memory`],
    /// set by [`dispatch`]): the first pass over a block of few passes prefetches all of the
    /// block ahead ([`avx2::FRONT_LOADED_PASSES`]).
    from_memory: bool,
    /// The tail weight as panels ([`super::panels`]; null: none): its rows read them, in
    /// f32, instead of the tail weight's dot form.
    tail_panels: *const f32,
}

// SAFETY: the parts of a job read its inputs and write disjoint columns of its output
// (`Job::run_part`), each from its own thread, while the caller keeps the tensors alive.
unsafe impl Sync for Job {}

/// The rows of a product from `from` on, rounded to bf16 (`x`: `[rows - from, stride]`
/// values, each row zero-padded to `stride`, a multiple of 32), multiplied by the weight
/// rounded to bf16 block by block with f32 sums.
#[derive(Clone, Copy)]
struct Bf16Rows {
    x: *const u16,
    from: usize,
    stride: usize,
}

/// The most parts a low-rank term has: the projections of one group (q, k, v).
pub const MAX_TERM_PARTS: usize = 3;

/// Where one part of a low-rank term goes: output columns `cols` get
/// `h[:, rank_offset..rank_offset + r] B_part^T`, with `B_part^T` the rows of the term's
/// `[r, out]` factor in those columns. The parts of a group's term are its adapted
/// projections: each reads only its own rank-r slice of the intermediate, so the zero
/// blocks of a block-diagonal `B` are never stored nor read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermPart {
    /// Output columns, a range of the product's.
    pub cols: std::ops::Range<usize>,
    /// The first of the part's r columns of the intermediate `x A^T`.
    pub rank_offset: usize,
}

/// `(x[start..] A^T) B^T` added to `y[start..]` part by part: `a` is `[m, inp]`, `bt`
/// `[r, out]` (each part's `B^T` in its own columns); `parts[..n]` say which columns take
/// which slice of the intermediate `x A^T`.
#[derive(Clone, Copy)]
struct LowRank {
    a: *const f32,
    bt: *const f32,
    m: usize,
    r: usize,
    start: usize,
    /// `(first column, end column, rank offset)` of each part.
    parts: [(usize, usize, usize); MAX_TERM_PARTS],
    n: usize,
}

#[cfg(target_arch = "x86_64")]
/// One part of a low-rank term on the rows it applies to: `y` (`[rows, out]`, row
/// stride `out`) += `h` (`[rows, r]`, row stride `m`: the part's slice of the
/// intermediate) times `bt` (`[r, out]`).
struct Term {
    y: *mut f32,
    out: usize,
    h: *const f32,
    m: usize,
    rows: usize,
    bt: *const f32,
    r: usize,
}

impl Job {
    /// What the job costs one thread ([`worth_sharing`]): its weights read (a tail
    /// weight's too), the f32 rows' multiply-adds, bf16 rows' at half (a bf16 pair
    /// instruction does twice an f32 one's), and a low-rank term's.
    fn work(&self) -> Work {
        let elements = self.out * self.inp;
        let bytes = elements * if self.w16 { 2 } else { 4 } * if self.tail_weight.is_some() { 2 } else { 1 };
        let bf16_rows = self.bf16.map_or(0, |b| self.rows.saturating_sub(b.from));
        let term =
            self.low_rank.map_or(0, |lr| (self.rows - lr.start.min(self.rows)) * (lr.m * self.inp + lr.r * self.out));
        let f32_macs = ((self.rows - bf16_rows) * elements + term) as f64 + (bf16_rows * elements) as f64 / 2.0;
        Work { bytes, f32_macs }
    }

    /// `y = x W^T + b` of f32 operands (`bias` may be null) and nothing more.
    fn plain(
        x: *const f32,
        w: *const f32,
        bias: *const f32,
        y: *mut f32,
        (rows, inp, out): (usize, usize, usize),
        lanes16: bool,
    ) -> Job {
        Job {
            x,
            w,
            bias,
            y,
            rows,
            inp,
            out,
            accumulate: false,
            low_rank: None,
            bf16: None,
            tail_weight: None,
            w16: false,
            lanes16,
            from_memory: false,
            tail_panels: std::ptr::null(),
        }
    }

    /// Columns `[edge(i), edge(i + 1))` of `n` of `parts`: multiples of `unit` but for the
    /// last part's end, so parts write disjoint columns.
    fn edge(n: usize, i: usize, parts: usize, unit: usize) -> usize {
        if i >= parts { n } else { (n * i / parts) / unit * unit }
    }

    /// Compute part `i` of `parts`. With a low-rank term: the part's share of the product,
    /// the rank slices of the intermediate `x A^T` that the parts of its own columns read
    /// (in a buffer of its own: a slice two parts' columns read is computed by both, which
    /// costs less than waiting for each other at a barrier and writing next to each other
    /// in one buffer), then the term on its columns.
    fn run_part(&self, i: usize, parts: usize) {
        // A job with bf16 rows splits at whole blocks of its bf16 tiles, so that which
        // columns fall in a block (and so every output's value) does not depend on the
        // number of threads; an f32 job at whole blocks of its tiles, so that no thread's
        // columns end in a part block (a tail weight's two sub-jobs take blocks of four,
        // or two).
        let unit = match (self.bf16, self.tail_weight) {
            (Some(_), _) => BF16_BLOCK,
            // Whole panels for the tail rows (a multiple of the head rows' four).
            (None, Some(_)) if !self.tail_panels.is_null() => super::panels::WIDTH,
            (None, Some(_)) => 4,
            (None, None) => f32_block(self.rows, self.lanes16),
        };
        let (o0, o1) = (Self::edge(self.out, i, parts, unit), Self::edge(self.out, i + 1, parts, unit));
        debug_assert!(
            !self.w16 || (self.tail_weight.is_none() && self.low_rank.is_none()),
            "a bf16 weight in a product with a tail weight or a term"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` held when the job was made; the pointers cover `rows x inp`,
        // `out x inp` (bf16 with `w16`), `out` and `rows x out` f32 values (and the term's `m x inp` and
        // `r x out`, its parts within `out` columns and `m` rank columns: checked by
        // `product_with_low_rank`), alive until the job is done.
        unsafe {
            match (self.bf16, self.tail_weight) {
                (Some(low), _) if self.w16 => avx512::columns::<true>(self, &low, o0, o1),
                (Some(low), _) => avx512::columns::<false>(self, &low, o0, o1),
                // Each block of rows with its own weight, both streamed once.
                (None, Some((from, w))) => {
                    if from > 0 {
                        f32_columns::<false>(&Job { rows: from, tail_weight: None, ..*self }, o0, o1);
                    }
                    let tail = Job {
                        x: self.x.add(from * self.inp),
                        w,
                        y: self.y.add(from * self.out),
                        rows: self.rows - from,
                        tail_weight: None,
                        ..*self
                    };
                    if tail.rows > 0 && !self.tail_panels.is_null() {
                        let panels = super::panels::Job {
                            x: tail.x,
                            panels: self.tail_panels,
                            bias: self.bias,
                            y: tail.y,
                            rows: tail.rows,
                            inp: self.inp,
                            out: self.out,
                        };
                        super::panels::columns(&panels, o0, o1);
                    } else {
                        f32_columns::<false>(&tail, o0, o1);
                    }
                }
                (None, None) if self.w16 => f32_columns::<true>(self, o0, o1),
                (None, None) => f32_columns::<false>(self, o0, o1),
            }
            let Some(lr) = self.low_rank else { return };
            let tail = self.rows - lr.start;
            let mut h = vec![0f32; tail * lr.m];
            let first = Job {
                x: self.x.add(lr.start * self.inp),
                w: lr.a,
                bias: std::ptr::null(),
                y: h.as_mut_ptr(),
                rows: tail,
                out: lr.m,
                accumulate: false,
                low_rank: None,
                bf16: None,
                tail_weight: None,
                w16: false,
                ..*self
            };
            // Rows multiplied in bf16 take their intermediate `x A^T` in bf16 too (their
            // rounded inputs are at hand: the same rows). The demo's 25-row products, every
            // layer: 1.07 / 1.21 / 1.08 ms against 1.11 / 1.35 / 1.11 with it in f32; the
            // SmolLM2-135M shape 29.1 against 29.3.
            let low = self.bf16.filter(|low| low.from == lr.start).map(|low| Bf16Rows { from: 0, ..low });
            let y = self.y.add(lr.start * self.out);
            for &(c0, c1, offset) in &lr.parts[..lr.n] {
                let (c0, c1) = (c0.max(o0), c1.min(o1));
                if c0 < c1 {
                    match &low {
                        Some(low) => {
                            avx512::columns::<false>(&Job { bf16: Some(*low), ..first }, low, offset, offset + lr.r)
                        }
                        None => f32_columns::<false>(&first, offset, offset + lr.r),
                    }
                    let term =
                        Term { y, out: self.out, h: h.as_ptr().add(offset), m: lr.m, rows: tail, bt: lr.bt, r: lr.r };
                    avx2::add_term(&term, c0, c1);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (o0, o1);
    }
}

/// Output columns `o0..o1` of `job`, every row in f32: with 32 registers in passes of up
/// to six rows (9 rows: two passes, not three; every layer's 9-row products 5-8% faster
/// on the demo, the proxy and the SmolLM2-135M shape), else of three or four; with
/// [`Job::lanes16`] always so, in sixteen lanes. The same outputs for any number of rows.
/// `W16`: the weight is bf16 ([`Job::w16`]).
///
/// # Safety
/// [`available`] holds; the job's pointers are valid for its sizes.
#[cfg(target_arch = "x86_64")]
unsafe fn f32_columns<const W16: bool>(job: &Job, o0: usize, o1: usize) {
    if job.lanes16 {
        // SAFETY: AVX-512F and VL are available (`sixteen_lanes`).
        unsafe { avx512::columns_f32::<W16, true>(job, o0, o1) }
    } else if job.rows > 4 && wide_registers() {
        // At four rows and fewer (AR's one row among them) the narrow tiles' passes are as
        // few, and the wide form measured no faster (one row: 4-15% slower).
        // SAFETY: AVX-512F and VL are available.
        unsafe { avx512::columns_f32::<W16, false>(job, o0, o1) }
    } else {
        // SAFETY: AVX2 and FMA are available (`available`).
        unsafe { avx2::columns::<W16>(job, o0, o1) }
    }
}

/// Output columns `o0..o1` of `y = x W^T + b` for `(rows, inp, out)` (`bias` may be
/// null), on this thread: exactly the values [`product`] gives them (with `lanes16` as
/// [`sixteen_lanes`] says in the thread that made the call's plan), for a kernel of another
/// module that runs a step's next-token rows beside its own ([`super::int8`]). `o0` should
/// be a multiple of four, as [`product`]'s parts are, for speed.
///
/// # Safety
/// [`available`] holds; `x`, `w`, `bias` and `y` are valid for `rows x inp`, `out x inp`,
/// `out` and `rows x out` f32 values (row-major), `o0 <= o1 <= out`; no other thread
/// writes these columns of `y` meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn exact_columns(
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    y: *mut f32,
    (rows, inp, out): (usize, usize, usize),
    (o0, o1): (usize, usize),
    lanes16: bool,
) {
    let job = Job {
        from_memory: super::huge_pages::read_from_memory(w as usize),
        ..Job::plain(x, w, bias, y, (rows, inp, out), lanes16)
    };
    // SAFETY: as this function's.
    unsafe { f32_columns::<false>(&job, o0, o1) }
}

/// The weight rows an f32 tile of `rows` input rows takes (so, where a product is shared
/// between threads, the multiple each thread's columns start at): four, but three for 7 to
/// 9 rows and two for 10 to 12 in sixteen lanes, which then take every row in one pass
/// (`avx512::one_pass`).
fn f32_block(rows: usize, lanes16: bool) -> usize {
    match rows {
        7..=9 if lanes16 => 3,
        10..=12 if lanes16 => 2,
        _ => 4,
    }
}

/// What a product does beyond `x W^T + b` (its operands kept alive by the caller until
/// [`run`] returns).
#[derive(Clone, Copy, Default)]
struct Extras {
    /// A low-rank term on the rows from its start.
    low_rank: Option<LowRank>,
    /// The rows from this one on in bf16.
    bf16_from: Option<usize>,
    /// The rows from `.0` on multiplied by the weight at `.1`.
    tail_weight: Option<(usize, *const f32)>,
    /// That weight's panels, which its rows then read instead.
    tail_panels: Option<*const f32>,
}

/// `t` itself where it is contiguous, else a contiguous copy kept in `slot`. Not
/// `t.contiguous()`, which gives a new handle even then: a handle counts a reference on the
/// tensor, an atomic operation on its memory, and the threads that share a step's rows
/// ([`super::row_split`]) would contend for a weight's count in every product of every
/// layer.
pub(super) fn contiguous<'a>(t: &'a Tensor, slot: &'a mut Option<Tensor>) -> &'a Tensor {
    if t.is_contiguous() { t } else { slot.insert(t.contiguous()) }
}

/// A new `[rows, out]` for `x` of `[rows, in]`, `[1, rows, out]` for `[1, rows, in]`
/// ([`takes_rows`]).
pub(super) fn output_like(x: &Tensor, rows: i64, out: i64) -> Tensor {
    match x.dim() {
        2 => Tensor::empty([rows, out], (Kind::Float, Device::Cpu)),
        _ => Tensor::empty([1, rows, out], (Kind::Float, Device::Cpu)),
    }
}

/// `y (+)= x W^T + b` (`x`: `[rows, in]` or `[1, rows, in]`), and what `extras` asks for.
fn run(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor, accumulate: bool, extras: Extras) {
    let Extras { low_rank, bf16_from, tail_weight, tail_panels } = extras;
    // Contiguous copies only where the caller's tensors are not (kept alive below).
    let x = x.contiguous();
    let (mut weight_copy, mut bias_copy) = (None, None);
    let weight = contiguous(weight, &mut weight_copy);
    let bias = bias.map(|b| contiguous(b, &mut bias_copy));
    let size = x.size();
    let (rows, inp) = match size[..] {
        [.., rows, inp] => (rows as usize, inp as usize),
        _ => (0, 0),
    };
    let stride = inp.div_ceil(32) * 32;
    let mut x_bf16 = Vec::new();
    let bf16 = bf16_from.filter(|&from| from < rows && bf16_available()).map(|from| {
        x_bf16 = vec![0u16; (rows - from) * stride];
        // SAFETY: the f32 rows from `from` on (`(rows - from) x inp` values of the
        // contiguous `x`) and the buffer of `(rows - from) x stride` values.
        let src =
            unsafe { std::slice::from_raw_parts((x.data_ptr() as *const f32).add(from * inp), (rows - from) * inp) };
        for (dst, row) in x_bf16.chunks_exact_mut(stride).zip(src.chunks_exact(inp)) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `bf16_available()` holds.
            unsafe {
                avx512::round_row(row, dst)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (row, dst);
        }
        Bf16Rows { x: x_bf16.as_ptr(), from, stride }
    });
    // A bf16 weight's values are read as `u16`s through the same pointer.
    let w16 = weight.kind() == Kind::BFloat16;
    dispatch(Job {
        x: x.data_ptr() as *const f32,
        w: weight.data_ptr() as *const f32,
        bias: bias.as_ref().map_or(std::ptr::null(), |b| b.data_ptr() as *const f32),
        y: y.data_ptr() as *mut f32,
        rows,
        inp,
        out: weight.size()[0] as usize,
        accumulate,
        low_rank,
        bf16,
        tail_weight,
        w16,
        lanes16: sixteen_lanes(),
        from_memory: false,
        tail_panels: tail_panels.unwrap_or(std::ptr::null()),
    });
}

/// Run `job`, shared ([`in_parts`]) when the weight is big enough.
fn dispatch(job: Job) {
    let job = Job { from_memory: super::huge_pages::read_from_memory(job.w as usize), ..job };
    in_parts(job.out >= 8 && worth_sharing(job.work()), &|i, n| job.run_part(i, n));
}

/// A low-rank term `(x A^T) B^T` on the rows of a product from `start` on, for
/// [`product_with_low_rank`].
#[derive(Debug, Clone, Copy)]
pub struct TailTerm<'a> {
    /// `[m, in]`: the stacked A factors.
    pub a: &'a Tensor,
    /// `[r, out]`: each part's `B^T` (the scale already in it) in its own output columns.
    pub bt: &'a Tensor,
    /// Which columns read which rank-r slice of the intermediate.
    pub parts: &'a [TermPart],
    /// The first row the term applies to.
    pub start: i64,
    /// Multiply the base product of those rows in bf16 (where [`bf16_available`], else
    /// exactly): each value rounded to bf16 (to nearest, ties to even), the products
    /// summed in f32 (32 pairs an instruction, twice a core's f32 multiply-adds). For a
    /// decoding step's mask rows, whose outputs are only drafts.
    pub bf16: bool,
}

/// `x W^T + b`, plus the low-rank term `term` on its rows, in one call: the rows before
/// `term.start` are exactly [`product`]'s, and the term costs no libtorch operation (its
/// rank-`m` intermediate lives in buffers of our own) and no parallel region of its own:
/// each thread computes its share of the base product, the slices of the intermediate its
/// own output columns read, then adds the term to them (two regions before: on the
/// SmolLM2-135M shape a layer's terms cost 108 us over the base products at 9 rows, then
/// 67 with one region and a barrier; without the barrier the demo's 9-row products with
/// their terms, every layer, took 0.78 ms against 0.95, docs/BENCHMARKS.md). Columns in no
/// part get no term. `None` when [`takes`] says no to either, or the
/// parts do not fit (more than [`MAX_TERM_PARTS`], out of order or out of range).
pub fn product_with_low_rank(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, term: &TailTerm) -> Option<Tensor> {
    let TailTerm { a, bt, parts, start, bf16 } = *term;
    let (rows, inp) = takes_rows(x, weight)?;
    let (out, a_size) = (weight.size()[0], a.size());
    let &[m, a_in] = &a_size[..] else { return None };
    let r = *bt.size().first()?;
    let ordered = parts.windows(2).all(|w| w[0].cols.end <= w[1].cols.start);
    let parts_fit = parts.len() <= MAX_TERM_PARTS
        && ordered
        && parts
            .iter()
            .all(|p| p.cols.start < p.cols.end && p.cols.end <= out as usize && p.rank_offset as i64 + r <= m);
    let fits = (0..rows).contains(&start)
        && parts_fit
        && bt.size() == [r, out]
        && bt.kind() == Kind::Float
        && bt.device() == Device::Cpu
        && a_in == inp
        && a.kind() == Kind::Float
        && a.device() == Device::Cpu
        && !a.requires_grad()
        && !bias.is_some_and(|b| b.kind() != Kind::Float || b.numel() != out as usize);
    if !fits {
        return None;
    }
    // Contiguous copies only where the caller's tensors are not (kept alive below).
    let (a, bt) = (a.contiguous(), bt.contiguous());
    let y = output_like(x, rows, out);
    let mut spans = [(0, 0, 0); MAX_TERM_PARTS];
    for (span, p) in spans.iter_mut().zip(parts) {
        *span = (p.cols.start, p.cols.end, p.rank_offset);
    }
    let low_rank = LowRank {
        a: a.data_ptr() as *const f32,
        bt: bt.data_ptr() as *const f32,
        m: m as usize,
        r: r as usize,
        start: start as usize,
        parts: spans,
        n: parts.len(),
    };
    let extras = Extras { low_rank: Some(low_rank), bf16_from: bf16.then_some(start as usize), ..Extras::default() };
    run(x, weight, bias, &y, false, extras);
    Some(y)
}

/// `x W^T + b` with the rows from `start` on multiplied by `tail_weight` (the same shape
/// as `weight`) instead, in one call: the rows before `start` are exactly [`product`]'s,
/// the others exactly [`product`]'s of `tail_weight` (each block of rows streams its
/// weight once). For a decoding step whose mask rows read the adapter's weights merged
/// into the base weights (`W + s B A`): no term to compute, the merged weights held once
/// more, what a model small enough for its weights to stay in cache affords. With `bf16`
/// (where [`bf16_available`]), the rows from `start` on are multiplied in bf16 as
/// [`TailTerm::bf16`] says (before, the merged form ignored `--draft-arithmetic`); else, with
/// `tail_panels` (the tail weight's, [`super::panels`]), the rows from `start` on read them
/// instead, in f32: no lanes to sum for a weight of short rows.
/// `None` when [`takes`] says no to either weight, `start` is out of range or the panels
/// are another weight's shape.
pub fn product_two_weights(
    x: &Tensor,
    weight: &Tensor,
    tail_weight: &Tensor,
    tail_panels: Option<&super::panels::Panels>,
    bias: Option<&Tensor>,
    start: i64,
    bf16: bool,
) -> Option<Tensor> {
    let (rows, _) = takes_rows(x, weight)?;
    let (out, inp) = weight.size2().ok()?;
    let fits = (0..rows).contains(&start)
        && tail_weight.size() == [out, inp]
        && tail_weight.is_contiguous()
        && takes_rows(x, tail_weight).is_some()
        && tail_panels.is_none_or(|p| p.fit(out as usize, inp as usize))
        && !bias.is_some_and(|b| b.kind() != Kind::Float || b.numel() != out as usize);
    if !fits {
        return None;
    }
    let y = output_like(x, rows, out);
    let tail = (start as usize, tail_weight.data_ptr() as *const f32);
    let tail_panels = tail_panels.filter(|_| !bf16 && super::panels::enabled()).map(super::panels::Panels::ptr);
    let bf16_from = bf16.then_some(start as usize);
    let extras = Extras { tail_weight: Some(tail), bf16_from, tail_panels, ..Extras::default() };
    run(x, weight, bias, &y, false, extras);
    Some(y)
}

/// libtorch's own OpenMP runtime (libgomp, or a runtime with its GNU entry points), found
/// in the running process: the parts of a product run on the threads that run libtorch's
/// operations. A pool of our own would spin on the same cores as OpenMP's threads, which
/// wait busily for a while after each parallel operation: measured on 2 cores, an AR step
/// of the SmolLM2-135M shape took 79 ms so, against 53 with the libraries alone.
struct OpenMp {
    parallel: ParallelFn,
    thread_num: IntFn,
    num_threads: IntFn,
}

type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut libc::c_void), *mut libc::c_void, libc::c_uint, libc::c_uint);
type IntFn = unsafe extern "C" fn() -> libc::c_int;

fn openmp() -> Option<&'static OpenMp> {
    static OPENMP: OnceLock<Option<OpenMp>> = OnceLock::new();
    OPENMP
        .get_or_init(|| {
            #[cfg(unix)]
            {
                let find = |name: &std::ffi::CStr| {
                    // SAFETY: dlsym with a NUL-terminated name; a null result is checked.
                    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                    (!p.is_null()).then_some(p)
                };
                let (parallel, thread_num, num_threads) =
                    (find(c"GOMP_parallel")?, find(c"omp_get_thread_num")?, find(c"omp_get_num_threads")?);
                // SAFETY: the symbols of the GNU OpenMP ABI, with these signatures
                // (`void GOMP_parallel(void (*)(void *), void *, unsigned, unsigned)`).
                unsafe {
                    Some(OpenMp {
                        parallel: std::mem::transmute::<*mut libc::c_void, ParallelFn>(parallel),
                        thread_num: std::mem::transmute::<*mut libc::c_void, IntFn>(thread_num),
                        num_threads: std::mem::transmute::<*mut libc::c_void, IntFn>(num_threads),
                    })
                }
            }
            #[cfg(not(unix))]
            None
        })
        .as_ref()
}

impl OpenMp {
    /// `part(i, n)` on every thread `i` of a team of `n = threads` (the calling thread
    /// among them); returns when all are done.
    fn team(&self, threads: usize, part: &(dyn Fn(usize, usize) + Sync)) {
        extern "C" fn each(data: *mut libc::c_void) {
            // SAFETY: `data` is the `Call` below, alive until GOMP_parallel returns; the
            // OpenMP functions are those of the runtime running this team.
            let call = unsafe { &*(data as *const Call) };
            let (i, n) = unsafe { ((call.omp.thread_num)(), (call.omp.num_threads)()) };
            (call.part)(i.max(0) as usize, n.max(1) as usize);
        }
        struct Call<'a> {
            part: &'a (dyn Fn(usize, usize) + Sync),
            omp: &'a OpenMp,
        }
        let call = Call { part, omp: self };
        // SAFETY: GOMP_parallel runs `each` on every thread of the team and returns after
        // all of them; `call` outlives it.
        unsafe { (self.parallel)(each, &call as *const Call as *mut libc::c_void, threads as libc::c_uint, 0) }
    }
}

/// `part(i, n)` for every part `i` of `n`: on the threads of libtorch's OpenMP team when
/// `share` and the team has more than one thread (and this thread is not one of a team
/// already, see [`alone`]); on a thread that runs its share of a pass alone and owns a
/// partner ([`super::partner`]), in two halves, the second offered to the partner when
/// `share`; else `part(0, 1)` on this thread (a partner first running the part on offer).
pub(super) fn in_parts(share: bool, part: &(dyn Fn(usize, usize) + Sync)) {
    let threads = tch::get_num_threads().max(1) as usize;
    match openmp() {
        Some(omp) if share && threads > 1 && !is_alone() => omp.team(threads, part),
        _ if is_alone() && super::partner::offers(share) => super::partner::offer(part),
        _ => {
            super::partner::serve();
            part(0, 1);
        }
    }
}

/// `part(i, n)` on every thread `i` of an OpenMP team of at most `threads` (the calling
/// thread is part 0; the runtime may give fewer, `n` says how many); false, and nothing run,
/// where there is no OpenMP runtime.
pub(super) fn in_team(threads: usize, part: &(dyn Fn(usize, usize) + Sync)) -> bool {
    match openmp() {
        Some(omp) => {
            omp.team(threads.max(1), part);
            true
        }
        None => false,
    }
}

thread_local! {
    /// Set while this thread runs its share of a team's work ([`alone`]).
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` with every product and attention of this thread on this thread alone: for a thread
/// that already runs its share of a team's work (a nested team would only add the cost of
/// starting one).
pub(super) fn alone<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the setting back however `f` ends (a panic caught further up included).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ALONE.with(|c| c.replace(true)));
    f()
}

/// Whether this thread runs inside [`alone`].
pub(super) fn is_alone() -> bool {
    ALONE.with(std::cell::Cell::get)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Job, Term};

    /// Output columns `o0..o1` of the job: blocks of four weight rows multiplied by the
    /// input rows three at a time (the last pass one or two), or for 4, 7 and 8 rows blocks
    /// of two weight rows by four input rows (one or two passes), then single columns.
    /// Until the fifty-fifth session those took blocks of three by four, whose twelve
    /// accumulators and four rows need all sixteen registers: the compiled loop moved
    /// accumulators through the other registers and the stack at every step. On a Zen 3
    /// (`layer_ops`, the builds in turns; docs/BENCHMARKS.md, fifty-fifth session), 4 rows
    /// against one row of every layer's products of the demo took 1.69-1.83 times as long
    /// so, 1.28-1.29 in blocks of two (1.23-1.28 in passes of three and one, slower where
    /// the weight comes from memory: SmolLM2-135M's shape 1.14-1.16, against 1.02-1.10 in
    /// blocks of three by four and 1.05-1.10 in blocks of two); 8 rows 2.0-2.2 -> 1.8-2.0
    /// on the demo, 1.8 -> 1.4 on SmolLM2-135M. The
    /// passes over a block also ask for the block [`PREFETCH_BLOCKS`] ahead, spread over
    /// them, so that reading the weight from memory or L3 overlaps the arithmetic of the
    /// later passes (9 rows of SmolLM2-135M's layers: 29 ms -> 26 on a Zen 3; 25 rows on a
    /// Zen 4, where waiting for each block had cost a fifth of the step: its forward 72 ms
    /// -> 59, the demo's 4-mask step 2.5 AR steps -> 1.9; docs/BENCHMARKS.md). The block
    /// is asked into L2, not L1: a core has many more requests to memory in flight for L2
    /// than for L1, and the block moves to L1 on its first pass anyway. On the Zen 4 the
    /// SmolLM2-135M shape's products, every layer in turn, took 19.9 / 21.7 / 28.8 / 39.9
    /// ms at 1 / 4 / 9 / 25 rows prefetched into L1, 14.0 / 12.7 / 15.4 / 35.2 into L2
    /// (`layer_ops`, "every layer's products").
    ///
    /// # Safety
    /// AVX2 and FMA are available; the job's pointers are valid for its sizes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns<const W16: bool>(job: &Job, o0: usize, o1: usize) {
        let o = if matches!(job.rows, 4 | 7 | 8) {
            unsafe { blocks::<2, 4, W16>(job, o0, o1) }
        } else {
            unsafe { blocks::<4, 3, W16>(job, o0, o1) }
        };
        for o in o..o1 {
            for r in 0..job.rows {
                unsafe { tile::<1, 1, W16>(job, o, r, None, (0, 1)) };
            }
        }
    }

    /// Blocks of `NO` weight rows from `o0` while they fit before `o1`, each multiplied by
    /// the input rows `NR` at a time (the remainder in one narrower pass); returns where
    /// the blocks stopped.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blocks<const NO: usize, const NR: usize, const W16: bool>(job: &Job, o0: usize, o1: usize) -> usize {
        let mut o = o0;
        while o + NO <= o1 {
            let ahead = o + NO * PREFETCH_BLOCKS;
            unsafe { block::<NO, NR, W16>(job, o, (ahead + NO <= o1).then_some(ahead)) };
            o += NO;
        }
        o
    }

    /// The block of `NO` weight rows at `o` multiplied by every input row, `NR` at a time
    /// (the remainder in one narrower pass), the passes prefetching the block at `prefetch`:
    /// with up to [`FRONT_LOADED_PASSES`] passes over a weight read from memory the first
    /// asks for all of it, else each asks for its share.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const NO: usize, const NR: usize, const W16: bool>(job: &Job, o: usize, prefetch: Option<usize>) {
        let passes = job.rows.div_ceil(NR);
        let front = job.from_memory && passes <= FRONT_LOADED_PASSES;
        let asks = |i: usize| if front { (prefetch.filter(|_| i == 0), (0, 1)) } else { (prefetch, (i, passes)) };
        let mut r = 0;
        while r + NR <= job.rows {
            let (prefetch, pass) = asks(r / NR);
            unsafe { tile::<NO, NR, W16>(job, o, r, prefetch, pass) };
            r += NR;
        }
        let (prefetch, pass) = asks(r / NR);
        match job.rows - r {
            3 => unsafe { tile::<NO, 3, W16>(job, o, r, prefetch, pass) },
            2 => unsafe { tile::<NO, 2, W16>(job, o, r, prefetch, pass) },
            1 => unsafe { tile::<NO, 1, W16>(job, o, r, prefetch, pass) },
            _ => {}
        }
    }

    /// How many blocks of weight rows ahead the passes prefetch.
    pub(super) const PREFETCH_BLOCKS: usize = 2;

    /// Up to this many passes over a block (18 rows in passes of three) of a weight read
    /// from memory, the first pass asks for the whole block ahead: its reads start a pass or
    /// two earlier, what a block of few passes lacks (its arithmetic is shorter than its
    /// read). Every layer's products of the SmolLM2-135M shape, in one process against the
    /// requests spread over the passes, medians of four or five runs on a Zen 3: 9 rows
    /// 10-17% faster, 6 rows 5-16%, 13 and 16 rows 0-8% (docs/BENCHMARKS.md). At 19 and 25
    /// rows spreading measured as fast or faster, and so it did for weights read from a
    /// cache (the demo's 9 to 16 rows 5-12% slower front-loaded).
    pub(super) const FRONT_LOADED_PASSES: usize = 6;

    /// Outputs `r..r + NR` x `o..o + NO`: one accumulator of eight lanes per output. With
    /// `prefetch`, pass `pass.0` of `pass.1` also prefetches its share of the weight rows
    /// from that one on (each cache line, which of the passes takes them in turn). `W16`:
    /// the weight's values are bf16, widened as they are loaded ([`weights8`]).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn tile<const NO: usize, const NR: usize, const W16: bool>(
        job: &Job,
        o: usize,
        r: usize,
        prefetch: Option<usize>,
        pass: (usize, usize),
    ) {
        let n = job.inp;
        let whole = n / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; NO];
        let mut k = 0;
        let mut turns = LineTurns::new(pass);
        while k < whole {
            prefetch_share::<NO, W16>(job, prefetch, k, &mut turns);
            let mut xs = [_mm256_setzero_ps(); NR];
            for (j, x) in xs.iter_mut().enumerate() {
                *x = unsafe { _mm256_loadu_ps(job.x.add((r + j) * n + k)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = unsafe { weights8::<W16>(job.w, (o + i) * n + k) };
                for (a, x) in row.iter_mut().zip(&xs) {
                    *a = _mm256_fmadd_ps(w, *x, *a);
                }
            }
            k += 8;
        }
        unsafe { finish::<NO, NR, W16>(job, o, r, &acc, whole) }
    }

    /// A pass's share of the prefetch of a block of weight rows: the 64-byte lines of the
    /// rows go to the block's passes in turn, line `l` to pass `l % passes`. The turn is
    /// counted as the lines go by, where the remainder had been computed at every line: a
    /// `div` instruction in the tile's loop (every layer's products of the demo's and the
    /// proxy's shapes 1-3% faster without it in one process on a Zen 3; whole steps within
    /// the noise).
    pub(super) struct LineTurns {
        /// The pass the next line falls to.
        next: usize,
        /// This pass, of how many.
        pass: (usize, usize),
    }

    impl LineTurns {
        /// Pass `pass.0` of `pass.1`, before the first line.
        #[inline]
        pub(super) fn new(pass: (usize, usize)) -> Self {
            Self { next: 0, pass }
        }

        /// At input `k` (the tile's loop, in steps of a vector): true where `k` starts a
        /// line of `line` values that falls to this pass. Called at every step, in order.
        #[inline]
        pub(super) fn mine(&mut self, k: usize, line: usize) -> bool {
            if !k.is_multiple_of(line) {
                return false;
            }
            let mine = self.next == self.pass.0;
            self.next += 1;
            if self.next >= self.pass.1 {
                self.next = 0;
            }
            mine
        }
    }

    /// A pass's share of the prefetch of the `NO` weight rows from `prefetch` on, at input
    /// `k`: where `k` starts a 64-byte line of the weight, this pass asks for that line of
    /// each row when the line falls to it ([`LineTurns`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) fn prefetch_share<const NO: usize, const W16: bool>(
        job: &Job,
        prefetch: Option<usize>,
        k: usize,
        turns: &mut LineTurns,
    ) {
        // Values of a 64-byte line.
        let line = if W16 { 32 } else { 16 };
        if let Some(p) = prefetch
            && turns.mine(k, line)
        {
            for i in 0..NO {
                // Within the weight: row p + i < o1 <= out, column k < inp.
                _mm_prefetch::<_MM_HINT_T1>(weight_at::<W16>(job.w, (p + i) * job.inp + k));
            }
        }
    }

    /// Outputs `r..r + NR` x `o..o + NO` from their eight-lane accumulators over the inputs
    /// before `whole`: the lanes summed in a fixed order, the inputs from `whole` on added
    /// one at a time, then the bias; stored or added to `y`. Every tile ends here, so an
    /// output's last operations do not depend on the tile either.
    ///
    /// # Safety
    /// As [`tile`]'s.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn finish<const NO: usize, const NR: usize, const W16: bool>(
        job: &Job,
        o: usize,
        r: usize,
        acc: &[[__m256; NR]; NO],
        whole: usize,
    ) {
        let n = job.inp;
        // Four outputs of two rows at a time, when no remainder follows: their eight lane
        // sums in one tree, the additions of `lanes_sum` in its order (the same bits) in
        // 21 instructions instead of 48, and four values stored a row. A tile's sums cost
        // as much as its products where the input is short (64 or 256 values).
        let mut paired = 0;
        if NO == 4 && whole == n {
            while paired + 2 <= NR {
                let v: [__m256; 8] = std::array::from_fn(|q| acc[q / 2][paired + q % 2]);
                let sums = lanes_sums(&v);
                for (half, j) in
                    [(_mm256_castps256_ps128(sums), paired), (_mm256_extractf128_ps::<1>(sums), paired + 1)]
                {
                    let mut s = half;
                    if !job.bias.is_null() {
                        // SAFETY: the bias has `out` values, o + 4 <= out.
                        s = _mm_add_ps(s, unsafe { _mm_loadu_ps(job.bias.add(o)) });
                    }
                    // SAFETY: row r + j of `y`, its columns o..o + 4.
                    let y = unsafe { job.y.add((r + j) * job.out + o) };
                    unsafe { _mm_storeu_ps(y, if job.accumulate { _mm_add_ps(_mm_loadu_ps(y), s) } else { s }) };
                }
                paired += 2;
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate().skip(paired) {
                let xr = unsafe { job.x.add((r + j) * n) };
                let mut s = lanes_sum(*a);
                for k in whole..n {
                    s += unsafe { weight1::<W16>(job.w, (o + i) * n + k) * *xr.add(k) };
                }
                if !job.bias.is_null() {
                    s += unsafe { *job.bias.add(o + i) };
                }
                let y = unsafe { job.y.add((r + j) * job.out + o + i) };
                unsafe {
                    if job.accumulate {
                        *y += s;
                    } else {
                        *y = s;
                    }
                }
            }
        }
    }

    /// Eight weights from value `at` of the weight `w`: f32 values, or with `W16` bf16
    /// values (`u16`s at the same pointer) widened to f32, each the bf16 bits shifted to
    /// the upper half (exact).
    ///
    /// # Safety
    /// AVX2 is available; the eight values are readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn weights8<const W16: bool>(w: *const f32, at: usize) -> __m256 {
        if W16 {
            let half = unsafe { _mm_loadu_si128((w as *const u16).add(at) as *const __m128i) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
        } else {
            unsafe { _mm256_loadu_ps(w.add(at)) }
        }
    }

    /// Value `at` of the weight `w` as f32 (see [`weights8`]).
    ///
    /// # Safety
    /// The value is readable.
    #[inline]
    unsafe fn weight1<const W16: bool>(w: *const f32, at: usize) -> f32 {
        if W16 { f32::from_bits(u32::from(unsafe { *(w as *const u16).add(at) }) << 16) } else { unsafe { *w.add(at) } }
    }

    /// The address of value `at` of the weight `w` (see [`weights8`]), for a prefetch.
    #[inline]
    pub(super) fn weight_at<const W16: bool>(w: *const f32, at: usize) -> *const i8 {
        if W16 { (w as *const u16).wrapping_add(at) as *const i8 } else { w.wrapping_add(at) as *const i8 }
    }

    /// The term of one part on columns `c0..c1`: `y[i, c] += sum_j h[i, j] * bt[j, c]` for
    /// every row i, four rows by sixteen columns at a time held in registers, the products
    /// added in order of j, each fused (`y = h * w + y`); the last columns (fewer than
    /// sixteen) through masked lanes with the same fused operations, so an output's value
    /// does not depend on where the part, the thread's share or a block edge falls.
    ///
    /// # Safety
    /// AVX2 and FMA are available; the term's pointers are valid for its sizes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_term(t: &Term, c0: usize, c1: usize) {
        // Column blocks outside, rows inside: a block's slice of `bt` (r rows `out` apart,
        // one cache line or two each) is read from L2 once and stays in L1 for every row,
        // where rows outside read it again for each four rows (the slice's loads were half
        // the term's time, and the term three times the base product's per multiply-add).
        let mut c = c0;
        while c + 16 <= c1 {
            // The next block's slice: its lines lie `out` apart, which the hardware's
            // prefetchers do not follow.
            if c + 32 <= c1 {
                for j in 0..t.r {
                    // SAFETY: within `bt`: row j < r, columns c + 16..c + 32 <= c1 <= out.
                    let next = unsafe { t.bt.add(j * t.out + c + 16) };
                    // Its first value's line and its last's (sixteen values may span two).
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(unsafe { next.add(15) } as *const i8);
                }
            }
            unsafe { term_rows(t, c, None) };
            c += 16;
        }
        // The last columns (fewer than sixteen) through masked loads and stores: the same
        // fused operations in the same order as whole blocks, lanes past `c1` neither read
        // nor written. One column at a time, each output's chain of r dependent operations
        // waited on the last (the proxy's 172-wide gate and up: 12 columns a part; its
        // gate/up group with the term at 9 rows 0.5-0.7 us faster, in turns in one process).
        if c < c1 {
            let mut on = [0i32; 16];
            on[..c1 - c].fill(-1);
            // SAFETY: sixteen values.
            let masks = unsafe {
                [
                    _mm256_loadu_si256(on.as_ptr() as *const __m256i),
                    _mm256_loadu_si256(on.as_ptr().add(8) as *const __m256i),
                ]
            };
            unsafe { term_rows(t, c, Some(&masks)) };
        }
    }

    /// Every row of the term at columns `c..c + 16` (`masks`: which of those lanes are
    /// columns, for a part's last columns), a fixed number of rows per call, which keeps the
    /// accumulators in registers.
    ///
    /// # Safety
    /// As [`add_term`]; `c + 16 <= t.out` or the masks' lanes lie within the part.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn term_rows(t: &Term, c: usize, masks: Option<&[__m256i; 2]>) {
        let mut i0 = 0;
        while i0 < t.rows {
            match t.rows - i0 {
                1 => unsafe { term_block::<1>(t, i0, c, masks) },
                2 => unsafe { term_block::<2>(t, i0, c, masks) },
                3 => unsafe { term_block::<3>(t, i0, c, masks) },
                _ => unsafe { term_block::<4>(t, i0, c, masks) },
            }
            i0 += (t.rows - i0).min(4);
        }
    }

    /// Rows `i0..i0 + NR` and columns `c..c + 16` of the term (see [`add_term`]), only the
    /// lanes `masks` selects read and written when given.
    ///
    /// # Safety
    /// As [`term_rows`]; `i0 + NR <= t.rows`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn term_block<const NR: usize>(t: &Term, i0: usize, c: usize, masks: Option<&[__m256i; 2]>) {
        // Functions, not closures: closures do not take the target features, so they would
        // be called rather than inlined, the accumulators saved around every call.
        let m = |half: usize| masks.map(|m| m[half]);
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        for (i, a) in acc.iter_mut().enumerate() {
            let y = unsafe { t.y.add((i0 + i) * t.out + c) };
            *a = unsafe { [load8(y, m(0)), load8(y.add(8), m(1))] };
        }
        for j in 0..t.r {
            let w = unsafe { t.bt.add(j * t.out + c) };
            let (w0, w1) = unsafe { (load8(w, m(0)), load8(w.add(8), m(1))) };
            for (i, a) in acc.iter_mut().enumerate() {
                let hv = _mm256_set1_ps(unsafe { *t.h.add((i0 + i) * t.m + j) });
                a[0] = _mm256_fmadd_ps(hv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(hv, w1, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let y = unsafe { t.y.add((i0 + i) * t.out + c) };
            unsafe {
                store8(y, m(0), a[0]);
                store8(y.add(8), m(1), a[1]);
            }
        }
    }

    /// Eight values at `p`, or the lanes `mask` selects (the others zero).
    ///
    /// # Safety
    /// AVX2 is available; the values (or the selected lanes) are readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const f32, mask: Option<__m256i>) -> __m256 {
        match mask {
            Some(m) => unsafe { _mm256_maskload_ps(p, m) },
            None => unsafe { _mm256_loadu_ps(p) },
        }
    }

    /// `v` to eight values at `p`, or to the lanes `mask` selects.
    ///
    /// # Safety
    /// AVX2 is available; the values (or the selected lanes) are writable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store8(p: *mut f32, mask: Option<__m256i>, v: __m256) {
        match mask {
            Some(m) => unsafe { _mm256_maskstore_ps(p, m, v) },
            None => unsafe { _mm256_storeu_ps(p, v) },
        }
    }

    /// The eight lanes summed: halves, then pairs, then the last two (also the softmax's
    /// sum in [`super::super::few_queries`]).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::model) fn lanes_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// [`lanes_sum`] of eight vectors at once, the same additions in the same order (so
    /// the same bits): lanes `[v0, v2, v4, v6, v1, v3, v5, v7]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lanes_sums(v: &[__m256; 8]) -> __m256 {
        // Halves: [v(2p) lo + hi | v(2p+1) lo + hi].
        let h: [__m256; 4] = std::array::from_fn(|p| {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b))
        });
        // Pairs: lanes 0 and 2, 1 and 3 of two vectors' halves.
        let pairs =
            |a: __m256, b: __m256| _mm256_add_ps(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xee>(a, b));
        let (p, q) = (pairs(h[0], h[1]), pairs(h[2], h[3]));
        // The last two of each.
        _mm256_add_ps(_mm256_shuffle_ps::<0x88>(p, q), _mm256_shuffle_ps::<0xdd>(p, q))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{BF16_BLOCK, Bf16Rows, Job, avx2, avx2::weights8};

    /// `row` rounded to bf16 (to nearest, ties to even) into `dst`, zero past its end.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 are available; `dst` is at least as long as `row`, a
    /// multiple of 32.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub(super) unsafe fn round_row(row: &[f32], dst: &mut [u16]) {
        debug_assert!(dst.len().is_multiple_of(32) && dst.len() >= row.len());
        unsafe { round(row.as_ptr(), row.len(), dst.as_mut_ptr(), dst.len()) }
    }

    /// `n` f32 values at `src` rounded to bf16 at `dst`, zero from `n` to `stride`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    #[inline]
    unsafe fn round(src: *const f32, n: usize, dst: *mut u16, stride: usize) {
        // The lanes of 16 values from `from` that lie before `n`.
        let lanes = |from: usize| -> __mmask16 {
            let left = n.saturating_sub(from);
            if left >= 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 }
        };
        let mut k = 0;
        while k < stride {
            // SAFETY: masked loads read only values below `n`; k + 32 <= stride of `dst`.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(lanes(k), src.add(k));
                let hi = _mm512_maskz_loadu_ps(lanes(k + 16), src.add(k + 16));
                _mm512_storeu_si512(
                    dst.add(k) as *mut __m512i,
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
                );
            }
            k += 32;
        }
    }

    /// Output columns `o0..o1` of `job`: its rows before `low.from` exactly as
    /// [`avx2::columns`] computes them (the same tiles, so the same bits), the rows from
    /// `low.from` on in bf16, a block of [`BF16_BLOCK`] weight rows at a time: once the
    /// f32 rows' passes have brought the block to L1, it is rounded to bf16 and laid out
    /// by pairs of inputs ([`pack`]: lane `i` of vector `p` holds inputs `2p` and `2p + 1`
    /// of the block's row `i`), so that one `vdpbf16ps` of a vector and a row's pair of
    /// inputs (broadcast) adds to sixteen outputs at once, each in its own lane: no lanes
    /// to sum at the end (the layout before this one, four rows' inputs along the lanes,
    /// spent as much time summing lanes and rounding as multiplying on the demo's width
    /// of 256). Columns past the last whole block: f32, every row.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512F and AVX-512 BF16 are available; the job's and `low`'s pointers
    /// are valid for their sizes.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bf16,avx512vl,avx512bw")]
    pub(super) unsafe fn columns<const W16: bool>(job: &Job, low: &Bf16Rows, o0: usize, o1: usize) {
        const NO: usize = BF16_BLOCK;
        // The bf16 rows' weight: the tail weight where the job has one (it starts where
        // the bf16 rows do: `product_two_weights`), else the job's.
        let tail_w = job.tail_weight.map_or(job.w, |(_, w)| w);
        debug_assert!(job.tail_weight.is_none_or(|(from, _)| from == low.from), "bf16 rows and tail weight apart");
        let head = Job { rows: low.from, tail_weight: None, ..*job };
        let mut packed = vec![0u32; low.stride / 2 * NO];
        let mut o = o0;
        while o + NO <= o1 {
            // The f32 rows of the block, four weight rows at a time; each asks for the
            // same four rows of the next block, which then arrive while this block's bf16
            // rows are multiplied.
            for q in (0..NO).step_by(4) {
                let ahead = o + NO + q;
                let prefetch = (ahead + 4 <= o1).then_some(ahead);
                if head.rows > 0 {
                    unsafe {
                        if job.lanes16 {
                            block_f32::<W16, true>(&head, o + q, prefetch)
                        } else {
                            block_f32::<W16, false>(&head, o + q, prefetch)
                        }
                    };
                }
                // The bf16 rows' next block, where the f32 rows' passes do not ask for it:
                // no f32 rows, or a tail weight of its own.
                if let Some(p) = prefetch.filter(|_| head.rows == 0 || job.tail_weight.is_some()) {
                    for i in 0..4 {
                        for k in (0..job.inp).step_by(if W16 { 32 } else { 16 }) {
                            // Within the weight: row p + i < o1 <= out, column k < inp.
                            _mm_prefetch::<_MM_HINT_T1>(avx2::weight_at::<W16>(tail_w, (p + i) * job.inp + k));
                        }
                    }
                }
            }
            // SAFETY: weight rows o..o + NO (`inp` values each) and the buffer of
            // `stride / 2 x NO` pairs.
            unsafe {
                if W16 {
                    pack_bf16((tail_w as *const u16).add(o * job.inp), job.inp, low.stride, packed.as_mut_ptr())
                } else {
                    pack(tail_w.add(o * job.inp), job.inp, low.stride, packed.as_mut_ptr())
                }
            };
            let rows = job.rows - low.from;
            let mut r = 0;
            while r < rows {
                // Ten rows at most a pass (ten accumulators of sixteen outputs), passes of
                // about equal size: 12 rows as two of six.
                let left = rows - r;
                let n = left.div_ceil(left.div_ceil(BF16_PASS_ROWS));
                // SAFETY: as this function's.
                unsafe {
                    match n {
                        10 => tile::<10>(job, low, &packed, o, r),
                        9 => tile::<9>(job, low, &packed, o, r),
                        8 => tile::<8>(job, low, &packed, o, r),
                        7 => tile::<7>(job, low, &packed, o, r),
                        6 => tile::<6>(job, low, &packed, o, r),
                        5 => tile::<5>(job, low, &packed, o, r),
                        4 => tile::<4>(job, low, &packed, o, r),
                        3 => tile::<3>(job, low, &packed, o, r),
                        2 => tile::<2>(job, low, &packed, o, r),
                        _ => tile::<1>(job, low, &packed, o, r),
                    }
                }
                r += n;
            }
            o += NO;
        }
        if o < o1 {
            // The last columns in f32, each block of rows through its own weight.
            match job.tail_weight {
                None => unsafe { super::f32_columns::<W16>(job, o, o1) },
                Some((from, w)) => {
                    if from > 0 {
                        unsafe { super::f32_columns::<false>(&Job { rows: from, tail_weight: None, ..*job }, o, o1) };
                    }
                    // SAFETY: rows `from..rows` of `x` and `y`.
                    let tail = unsafe {
                        Job {
                            x: job.x.add(from * job.inp),
                            w,
                            y: job.y.add(from * job.out),
                            rows: job.rows - from,
                            tail_weight: None,
                            ..*job
                        }
                    };
                    unsafe { super::f32_columns::<false>(&tail, o, o1) };
                }
            }
        }
    }

    /// [`avx2::columns`] with AVX-512's 32 registers: a block of four weight rows
    /// multiplied by up to six input rows a pass ([`block_f32`]), the same outputs. With
    /// `L16`, every tile accumulates in sixteen lanes ([`tile16`]).
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512F and VL are available; the job's pointers are valid for its
    /// sizes.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn columns_f32<const W16: bool, const L16: bool>(job: &Job, o0: usize, o1: usize) {
        // SAFETY (the one-pass blocks): as this function's, the rows as matched.
        let o = match (super::f32_block(job.rows, L16), job.rows) {
            (3, 7) => unsafe { one_pass::<3, 7, W16>(job, o0, o1) },
            (3, 8) => unsafe { one_pass::<3, 8, W16>(job, o0, o1) },
            (3, _) => unsafe { one_pass::<3, 9, W16>(job, o0, o1) },
            (2, 10) => unsafe { one_pass::<2, 10, W16>(job, o0, o1) },
            (2, 11) => unsafe { one_pass::<2, 11, W16>(job, o0, o1) },
            (2, _) => unsafe { one_pass::<2, 12, W16>(job, o0, o1) },
            _ => {
                let mut o = o0;
                while o + 4 <= o1 {
                    let ahead = o + 4 * avx2::PREFETCH_BLOCKS;
                    unsafe { block_f32::<W16, L16>(job, o, (ahead + 4 <= o1).then_some(ahead)) };
                    o += 4;
                }
                o
            }
        };
        for o in o..o1 {
            for r in 0..job.rows {
                unsafe { pass::<1, 1, W16, L16>(job, o, r, None, (0, 1)) };
            }
        }
    }

    /// The block of four weight rows at `o` times every input row, in as few passes of
    /// at most [`MAX_PASS_ROWS`] rows as fit, of about equal size (9 rows as 5 and 4; 25
    /// as five of 5), the passes prefetching the block at `prefetch`. With 16 registers a
    /// pass held three rows: a 4-mask step's five next-token rows took two passes, now
    /// one, the weights read from L1 once less (the demo's 25-row products 1.46 and 1.45
    /// ms against 1.56 and 1.53, SmolLM2-135M's 27.8 against 29.1). A tile's shape does
    /// not change its outputs.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    unsafe fn block_f32<const W16: bool, const L16: bool>(job: &Job, o: usize, prefetch: Option<usize>) {
        let passes = job.rows.div_ceil(MAX_PASS_ROWS);
        let mut r = 0;
        for p in 0..passes {
            let n = (job.rows - r).div_ceil(passes - p);
            let at = (p, passes);
            // SAFETY: as this function's; r + n <= rows.
            unsafe {
                match n {
                    6 => pass::<4, 6, W16, L16>(job, o, r, prefetch, at),
                    5 => pass::<4, 5, W16, L16>(job, o, r, prefetch, at),
                    4 => pass::<4, 4, W16, L16>(job, o, r, prefetch, at),
                    3 => pass::<4, 3, W16, L16>(job, o, r, prefetch, at),
                    2 => pass::<4, 2, W16, L16>(job, o, r, prefetch, at),
                    _ => pass::<4, 1, W16, L16>(job, o, r, prefetch, at),
                }
            }
            r += n;
        }
    }

    /// Blocks of `NO` weight rows from `o0` while they fit before `o1`, each multiplied by
    /// all `NR` input rows in one pass of sixteen lanes (between 7 and 12 rows: three
    /// weight rows for up to nine, two for up to twelve, with as many accumulators as the
    /// four-row blocks' passes hold), each prefetching the block about eight weight rows
    /// ahead; returns where the blocks stopped. Four-row blocks took these rows in two
    /// passes, and the second pass's multiply-adds did not overlap the weight's reads from
    /// memory: SmolLM2-135M's 9-row products, every layer, 25-27 ms against 31-32 from
    /// memory on two cores, the same outputs (docs/BENCHMARKS.md, "One pass").
    ///
    /// # Safety
    /// As [`tile16`]'s, for `NR == job.rows`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn one_pass<const NO: usize, const NR: usize, const W16: bool>(job: &Job, o0: usize, o1: usize) -> usize {
        debug_assert_eq!(job.rows, NR);
        let ahead = (4 * avx2::PREFETCH_BLOCKS).div_ceil(NO) * NO;
        let mut o = o0;
        while o + NO <= o1 {
            let prefetch = (o + ahead + NO <= o1).then_some(o + ahead);
            // SAFETY: as this function's; o + NO <= o1 <= out.
            unsafe { tile16::<NO, NR, W16>(job, o, 0, prefetch, (0, 1)) };
            o += NO;
        }
        o
    }

    /// One tile: [`tile16`] with `L16`, else [`avx2::tile`].
    ///
    /// # Safety
    /// As [`tile16`]'s.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    unsafe fn pass<const NO: usize, const NR: usize, const W16: bool, const L16: bool>(
        job: &Job,
        o: usize,
        r: usize,
        prefetch: Option<usize>,
        at: (usize, usize),
    ) {
        // SAFETY: as the caller's.
        unsafe {
            if L16 {
                tile16::<NO, NR, W16>(job, o, r, prefetch, at)
            } else {
                avx2::tile::<NO, NR, W16>(job, o, r, prefetch, at)
            }
        }
    }

    /// [`avx2::tile`] in sixteen lanes: one 512-bit accumulator per output over the inputs
    /// in steps of sixteen, its two halves then added into eight lanes, which take the
    /// inputs up to the last multiple of eight in one more step and end as every tile does
    /// ([`avx2::finish`]); or, for two rows and more of four outputs whose inputs are whole
    /// sixteens, the same additions many outputs at once ([`finish_by_fours`]; AR's one row
    /// keeps the first form). Half the multiply-adds of eight lanes, and half the chain of
    /// dependent ones each output waits on (AR's one row: four outputs a tile, four chains).
    /// An output's operations depend on its inputs' count only, not on the tile.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512F and VL are available; the job's pointers are valid for its
    /// sizes; `o + NO <= out`, `r + NR <= rows`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    unsafe fn tile16<const NO: usize, const NR: usize, const W16: bool>(
        job: &Job,
        o: usize,
        r: usize,
        prefetch: Option<usize>,
        pass: (usize, usize),
    ) {
        let n = job.inp;
        let (whole16, whole) = (n / 16 * 16, n / 8 * 8);
        let mut acc = [[_mm512_setzero_ps(); NR]; NO];
        let mut k = 0;
        let mut turns = avx2::LineTurns::new(pass);
        while k < whole16 {
            avx2::prefetch_share::<NO, W16>(job, prefetch, k, &mut turns);
            if NR <= MAX_PASS_ROWS {
                // The rows' inputs held, each weight vector loaded once.
                let mut xs = [_mm512_setzero_ps(); NR];
                for (j, x) in xs.iter_mut().enumerate() {
                    // SAFETY: row r + j of `x`, its values k..k + 16 <= n.
                    *x = unsafe { _mm512_loadu_ps(job.x.add((r + j) * n + k)) };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    // SAFETY: row o + i of the weight, its values k..k + 16 <= n.
                    let w = unsafe { weights16::<W16>(job.w, (o + i) * n + k) };
                    for (a, x) in row.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(w, *x, *a);
                    }
                }
            } else {
                // More rows than registers for their inputs ([`one_pass`]): the weight
                // vectors held, each row's inputs loaded as they are used. The same
                // multiply-adds into each accumulator, in the same order.
                let mut ws = [_mm512_setzero_ps(); NO];
                for (i, w) in ws.iter_mut().enumerate() {
                    // SAFETY: row o + i of the weight, its values k..k + 16 <= n.
                    *w = unsafe { weights16::<W16>(job.w, (o + i) * n + k) };
                }
                for j in 0..NR {
                    // SAFETY: row r + j of `x`, its values k..k + 16 <= n.
                    let x = unsafe { _mm512_loadu_ps(job.x.add((r + j) * n + k)) };
                    for (row, w) in acc.iter_mut().zip(&ws) {
                        row[j] = _mm512_fmadd_ps(*w, x, row[j]);
                    }
                }
            }
            k += 16;
        }
        if NO == 4 && whole16 == n && NR >= 2 {
            // The same bits as below. AR's one row is left as it is: its products would get
            // faster too, and a speculative step's cost is measured against AR's.
            // SAFETY: as this function's; every input in the sixteen-lane accumulators.
            unsafe { finish_by_fours::<NO, NR, W16>(job, o, r, &acc, n) };
            return;
        }
        // The halves added: lane l of eight holds lanes l and l + 8.
        // (Loops, not `array::from_fn`, whose closures are not always inlined here.)
        let mut acc8 = [[_mm256_setzero_ps(); NR]; NO];
        for (row8, row) in acc8.iter_mut().zip(&acc) {
            for (a8, a) in row8.iter_mut().zip(row) {
                let (lo, hi) = halves(*a);
                *a8 = _mm256_add_ps(lo, hi);
            }
        }
        if whole16 < whole {
            for (i, row) in acc8.iter_mut().enumerate() {
                // SAFETY: row o + i of the weight, its values whole16..whole <= n.
                let w = unsafe { weights8::<W16>(job.w, (o + i) * n + whole16) };
                for (j, a) in row.iter_mut().enumerate() {
                    // SAFETY: row r + j of `x`, its values whole16..whole <= n.
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(job.x.add((r + j) * n + whole16)) }, *a);
                }
            }
        }
        // SAFETY: as this function's.
        unsafe { avx2::finish::<NO, NR, W16>(job, o, r, &acc8, whole) }
    }

    /// Outputs `r..r + NR` x `o..o + 4` from their sixteen-lane accumulators over all `n`
    /// inputs, four rows at a time: their sixteen lane sums in one tree ([`lanes_sums16`],
    /// the additions [`avx2::finish`] makes in its order, so the same bits), then the bias,
    /// stored or added to `y` as [`avx2::finish`] does. A last group of three rows takes
    /// the tree too (a fourth of zeros); one or two rows left take a tree of four vectors
    /// each ([`lanes_sums4`]). A tile's sums had cost about as much as its products where the
    /// input is short: 40 instructions for the halves and pairs of eight outputs (the
    /// proxy's width of 64: 16 multiply-adds an output), 45 now for sixteen. [`product`] on
    /// one thread, medians of 200 rounds in turns with the form before (Zen 4, fiftieth
    /// session): 5 rows of the proxy's gate/up (344 x 64) 4.42 -> 3.98 us, of the demo's
    /// (1408 x 256) 41.7 -> 38.6; 3 rows 3.54 -> 3.22 and 29.7 -> 27.8.
    ///
    /// # Safety
    /// As [`tile16`]'s; `NO == 4`, `n` a multiple of sixteen.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[inline]
    unsafe fn finish_by_fours<const NO: usize, const NR: usize, const W16: bool>(
        job: &Job,
        o: usize,
        r: usize,
        acc: &[[__m512; NR]; NO],
        n: usize,
    ) {
        debug_assert!(NO == 4 && n.is_multiple_of(16));
        let bias = if job.bias.is_null() {
            None
        } else {
            // SAFETY: the bias has `out` values, o + 4 <= out.
            Some(unsafe { _mm_loadu_ps(job.bias.add(o)) })
        };
        let mut j0 = 0;
        while NR - j0 >= 3 {
            let m = (NR - j0).min(4);
            // Vector 4 i + j: output i of the group's row j (zeros past the group's rows).
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, row) in acc.iter().enumerate() {
                for j in 0..m {
                    v[4 * i + j] = row[j0 + j];
                }
            }
            let sums = lanes_sums16(&v);
            for j in 0..m {
                // Lanes 4 j..4 j + 4: row j's four outputs.
                let sums = match j {
                    0 => _mm512_extractf32x4_ps::<0>(sums),
                    1 => _mm512_extractf32x4_ps::<1>(sums),
                    2 => _mm512_extractf32x4_ps::<2>(sums),
                    _ => _mm512_extractf32x4_ps::<3>(sums),
                };
                // SAFETY: as this function's; row r + j0 + j < r + NR.
                unsafe { store4(job, o, r + j0 + j, bias, sums) };
            }
            j0 += m;
        }
        // One or two rows left: each row's four outputs in a tree of their own (the
        // index reads a column of the accumulators).
        #[allow(clippy::needless_range_loop)]
        for j in j0..NR {
            // SAFETY: as above.
            unsafe { store4(job, o, r + j, bias, lanes_sums4(&[acc[0][j], acc[1][j], acc[2][j], acc[3][j]])) };
        }
    }

    /// Four sums of row `row` at columns `o..o + 4` of `y`, the bias added, stored or added
    /// to what `y` holds (the operations of [`avx2::finish`]).
    ///
    /// # Safety
    /// The job's `y` holds row `row`, `o + 4 <= out`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store4(job: &Job, o: usize, row: usize, bias: Option<__m128>, mut s: __m128) {
        if let Some(b) = bias {
            s = _mm_add_ps(s, b);
        }
        // SAFETY: as this function's.
        let y = unsafe { job.y.add(row * job.out + o) };
        unsafe { _mm_storeu_ps(y, if job.accumulate { _mm_add_ps(_mm_loadu_ps(y), s) } else { s }) };
    }

    /// Two vectors' lanes l and l + 8 added: `[x 0..8 | y 0..8]`, the first step of
    /// [`lanes_sums16`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn fold_halves(x: __m512, y: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xee>(x, y))
    }

    /// [`lanes_sums16`] for four vectors: lane `i` of the result holds `v[i]`'s sum.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn lanes_sums4(v: &[__m512; 4]) -> __m128 {
        let (b0, b1) = (fold_halves(v[0], v[1]), fold_halves(v[2], v[3]));
        // Chunk k: v[k]'s four partial sums.
        let c = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(b0, b1), _mm512_shuffle_f32x4::<0xdd>(b0, b1));
        let d = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(c, c), _mm512_shuffle_ps::<0xee>(c, c));
        let e = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(d, d), _mm512_shuffle_ps::<0xdd>(d, d));
        // Lane 0 of each chunk.
        let first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castps512_ps128(_mm512_permutexvar_ps(first, e))
    }

    /// The sixteen lanes of each of `v`'s sixteen vectors summed, lane `4 j + i` of the
    /// result holding `v[4 i + j]`'s: the additions of [`halves`] then [`avx2::lanes_sum`]
    /// in their order (lane l with l + 8, then with l + 4, with l + 2, with l + 1), so the
    /// same bits, for sixteen vectors at once.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::model) fn lanes_sums16(v: &[__m512; 16]) -> __m512 {
        // Lanes l and l + 8 of two vectors: [v(2p) 0..8 | v(2p+1) 0..8].
        let mut b = [_mm512_setzero_ps(); 8];
        for (p, b) in b.iter_mut().enumerate() {
            *b = fold_halves(v[2 * p], v[2 * p + 1]);
        }
        // Then l and l + 4: each 128-bit chunk one vector's four partial sums, chunk k of
        // c[q] from v[4 q + k].
        let mut c = [_mm512_setzero_ps(); 4];
        for (q, c) in c.iter_mut().enumerate() {
            let (x, y) = (b[2 * q], b[2 * q + 1]);
            *c = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xdd>(x, y));
        }
        // Then l and l + 2, within each chunk: [c(2u) 0, 1 | c(2u+1) 0, 1].
        let mut d = [_mm512_setzero_ps(); 2];
        for (u, d) in d.iter_mut().enumerate() {
            let (x, y) = (c[2 * u], c[2 * u + 1]);
            *d = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xee>(x, y));
        }
        // Then the last two: chunk k [c0, c1, c2, c3]'s sums of chunk k, v[k], v[4 + k], ...
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(d[0], d[1]), _mm512_shuffle_ps::<0xdd>(d[0], d[1]))
    }

    /// Lanes 0-7 and 8-15 of `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::model) fn halves(v: __m512) -> (__m256, __m256) {
        let v = _mm512_castps_pd(v);
        (_mm256_castpd_ps(_mm512_castpd512_pd256(v)), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(v)))
    }

    /// Sixteen weights from value `at` of the weight `w`, as [`avx2::weights8`] reads eight.
    ///
    /// # Safety
    /// AVX-512F is available; the sixteen values are readable.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weights16<const W16: bool>(w: *const f32, at: usize) -> __m512 {
        if W16 {
            // SAFETY: sixteen bf16 values from `at`.
            let half = unsafe { _mm256_loadu_si256((w as *const u16).add(at) as *const __m256i) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        } else {
            // SAFETY: sixteen values from `at`.
            unsafe { _mm512_loadu_ps(w.add(at)) }
        }
    }

    /// The most rows a pass of [`block_f32`] multiplies (24 accumulators, 4 weight
    /// vectors and an input's).
    const MAX_PASS_ROWS: usize = 6;

    /// The most bf16 rows one pass of [`tile`] multiplies (20 in one pass measured no
    /// faster: 1.50 and 1.57 ms against 1.46 and 1.45 for the demo's 25-row products).
    const BF16_PASS_ROWS: usize = 10;

    /// Sixteen weight rows from `w` (`inp` values each, `inp` apart) rounded to bf16 and
    /// laid out by pairs of inputs: `dst[p * 16 + i]` holds inputs `2p`, `2p + 1` of row
    /// `i` (zero past `inp`), for `p < stride / 2`.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 are available; `w` holds the rows, `dst` `stride / 2 x 16`
    /// values; `stride` is a multiple of 32 and at least `inp`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub(super) unsafe fn pack(w: *const f32, inp: usize, stride: usize, dst: *mut u32) {
        let lanes = |from: usize| -> __mmask16 {
            let left = inp.saturating_sub(from);
            if left >= 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 }
        };
        let mut k = 0;
        while k < stride {
            let (m0, m1) = (lanes(k), lanes(k + 16));
            // Row i's 32 inputs from k as sixteen pairs, then the 16 x 16 pairs transposed.
            let mut v: [__m512i; 16] = std::array::from_fn(|i| {
                // SAFETY: masked loads read only values below `inp` of row i.
                unsafe {
                    let row = w.add(i * inp + k);
                    let lo = _mm512_maskz_loadu_ps(m0, row);
                    let hi = _mm512_maskz_loadu_ps(m1, row.add(16));
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
                }
            });
            transpose(&mut v);
            for (p, col) in v.iter().enumerate() {
                // SAFETY: pair k / 2 + p < stride / 2 of the buffer.
                unsafe { _mm512_storeu_si512(dst.add((k / 2 + p) * 16) as *mut __m512i, *col) };
            }
            k += 32;
        }
    }

    /// [`pack`] of sixteen rows of bf16 values (`w`: `inp` values each, `inp` apart): the
    /// same layout, the values as they are.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 are available; as [`pack`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    pub(super) unsafe fn pack_bf16(w: *const u16, inp: usize, stride: usize, dst: *mut u32) {
        let mut k = 0;
        while k < stride {
            let left = inp.saturating_sub(k);
            let lanes: __mmask32 = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
            // Row i's 32 inputs from k as sixteen pairs, then the 16 x 16 pairs transposed.
            // SAFETY: masked loads read only values below `inp` of row i.
            let mut v: [__m512i; 16] =
                std::array::from_fn(|i| unsafe { _mm512_maskz_loadu_epi16(lanes, w.add(i * inp + k) as *const i16) });
            transpose(&mut v);
            for (p, col) in v.iter().enumerate() {
                // SAFETY: pair k / 2 + p < stride / 2 of the buffer.
                unsafe { _mm512_storeu_si512(dst.add((k / 2 + p) * 16) as *mut __m512i, *col) };
            }
            k += 32;
        }
    }

    /// `v[i]`'s lane `j` to `v[j]`'s lane `i` (a 16 x 16 transpose of 32-bit values):
    /// pairs of vectors interleaved by 32 bits, then by 64, then 128-bit lanes exchanged
    /// twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose(v: &mut [__m512i; 16]) {
        let mut a = [_mm512_setzero_si512(); 16];
        for m in 0..8 {
            a[2 * m] = _mm512_unpacklo_epi32(v[2 * m], v[2 * m + 1]);
            a[2 * m + 1] = _mm512_unpackhi_epi32(v[2 * m], v[2 * m + 1]);
        }
        // b[4n + c], 128-bit lane l: column 4l + c of rows 4n..4n + 4.
        let mut b = [_mm512_setzero_si512(); 16];
        for n in 0..4 {
            b[4 * n] = _mm512_unpacklo_epi64(a[4 * n], a[4 * n + 2]);
            b[4 * n + 1] = _mm512_unpackhi_epi64(a[4 * n], a[4 * n + 2]);
            b[4 * n + 2] = _mm512_unpacklo_epi64(a[4 * n + 1], a[4 * n + 3]);
            b[4 * n + 3] = _mm512_unpackhi_epi64(a[4 * n + 1], a[4 * n + 3]);
        }
        for c in 0..4 {
            let e0 = _mm512_shuffle_i32x4::<0x44>(b[c], b[4 + c]);
            let e1 = _mm512_shuffle_i32x4::<0xee>(b[c], b[4 + c]);
            let e2 = _mm512_shuffle_i32x4::<0x44>(b[8 + c], b[12 + c]);
            let e3 = _mm512_shuffle_i32x4::<0xee>(b[8 + c], b[12 + c]);
            v[c] = _mm512_shuffle_i32x4::<0x88>(e0, e2);
            v[4 + c] = _mm512_shuffle_i32x4::<0xdd>(e0, e2);
            v[8 + c] = _mm512_shuffle_i32x4::<0x88>(e1, e3);
            v[12 + c] = _mm512_shuffle_i32x4::<0xdd>(e1, e3);
        }
    }

    /// Outputs `low.from + r .. + NR` x `o..o + 16` in bf16 from the block `packed` (see
    /// [`pack`]): per pair of inputs, one vector of the block and each row's pair
    /// broadcast; each lane sums its output's pairs in order.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    #[inline]
    unsafe fn tile<const NR: usize>(job: &Job, low: &Bf16Rows, packed: &[u32], o: usize, r: usize) {
        let mut acc = [_mm512_setzero_ps(); NR];
        // SAFETY: `low.x` holds `stride` values (`stride / 2` pairs) for each row from `r`.
        let rows: [*const u32; NR] = std::array::from_fn(|j| unsafe { low.x.add((r + j) * low.stride) } as *const u32);
        for (p, w) in packed.chunks_exact(16).enumerate() {
            // SAFETY: a chunk of 16 values.
            let w: __m512bh = unsafe { std::mem::transmute(_mm512_loadu_si512(w.as_ptr() as *const __m512i)) };
            for (a, row) in acc.iter_mut().zip(&rows) {
                // SAFETY: pair p < stride / 2 of the row.
                let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(row.add(p).read_unaligned() as i32)) };
                *a = _mm512_dpbf16_ps(*a, w, x);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let mut s = *a;
            if !job.bias.is_null() {
                // SAFETY: the bias has `out` values, o + 16 <= out.
                s = _mm512_add_ps(s, unsafe { _mm512_loadu_ps(job.bias.add(o)) });
            }
            // SAFETY: row `low.from + r + j` of `y`, its columns o..o + 16.
            let y = unsafe { job.y.add((low.from + r + j) * job.out + o) };
            unsafe { _mm512_storeu_ps(y, if job.accumulate { _mm512_add_ps(_mm512_loadu_ps(y), s) } else { s }) };
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    thread_local! {
        /// This thread's products in sixteen lanes (`Some(true)`), eight (`Some(false)`),
        /// or as the process chooses (`None`): so each test can try both forms.
        pub(super) static LANES16: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }

    /// This thread's [`LANES16`].
    pub(in crate::model) fn lanes_here() -> Option<bool> {
        LANES16.with(std::cell::Cell::get)
    }

    /// The family read from CPUID leaf 1's `eax` as the CPUs of docs/BENCHMARKS.md report
    /// it: Zen 3 and Zen 4 are family 0x19, so [`amd_before_zen5`] takes them; the Zen 5 of
    /// the sixty-fourth session (`00b00f21`) is 0x1A; Intel's Xeons are family 6.
    #[test]
    fn cpu_families() {
        assert_eq!(cpu_family(0x00a0_0f11), 0x19); // Zen 3 (Milan: family 25 model 1)
        assert_eq!(cpu_family(0x00a1_0f11), 0x19); // Zen 4 (Genoa: family 25 model 17)
        assert_eq!(cpu_family(0x00b0_0f21), 0x1a); // Zen 5 (Turin)
        assert_eq!(cpu_family(0x000c_06f2), 6); // Emerald Rapids (model 207): no extended family
        assert_eq!(cpu_family(0x0080_0f82), 0x17); // Zen 2
    }

    /// Set this thread's [`LANES16`]; returns what it was.
    pub(in crate::model) fn set_lanes(lanes: Option<bool>) -> Option<bool> {
        LANES16.with(|c| c.replace(lanes))
    }

    /// `f` with this thread's products in sixteen lanes or eight, the setting then
    /// restored.
    pub(in crate::model) fn with_lanes<T>(sixteen: bool, f: impl FnOnce() -> T) -> T {
        let before = LANES16.with(|c| c.replace(Some(sixteen)));
        let result = f();
        LANES16.with(|c| c.set(before));
        result
    }

    const O: (Kind, Device) = (Kind::Float, Device::Cpu);

    thread_local! {
        /// Every call of this thread shared with its team whatever its size ([`in_team`]).
        pub(super) static SHARE_ALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// `f` run with OpenMP teams of `team` threads, the setting then restored (it is this
    /// thread's own: other tests keep theirs). With more than one thread, every call is
    /// shared with the team however small ([`worth_sharing`] says yes), so that a test's
    /// small shapes compare a shared call with one on a single thread.
    pub(in crate::model) fn in_team<T>(team: i32, f: impl FnOnce() -> T) -> T {
        let threads = tch::get_num_threads();
        tch::set_num_threads(team);
        let before = SHARE_ALL.with(|c| c.replace(team > 1));
        let result = f();
        SHARE_ALL.with(|c| c.set(before));
        tch::set_num_threads(threads);
        result
    }

    /// Sharing decides speed only: the estimate grows with each part of a call's work, and
    /// a width-64 model's 9-row products stay on one thread where SmolLM2-135M's one-row
    /// products are shared.
    #[test]
    fn shares_calls_by_their_estimated_time() {
        let f32_product =
            |rows: usize, out: usize, inp: usize| Work { bytes: out * inp * 4, f32_macs: (rows * out * inp) as f64 };
        let small = f32_product(9, 344, 64);
        assert!(!worth_sharing(small), "the proxy's 9-row gate/up");
        assert!(worth_sharing(f32_product(1, 3072, 576)), "SmolLM2-135M's one-row gate/up");
        assert!(!worth_sharing(Work::default()));
        let more_rows = Work { f32_macs: small.f32_macs * 100.0, ..small };
        let more_bytes = Work { bytes: small.bytes * 100, ..small };
        assert!(worth_sharing(more_rows) && worth_sharing(more_bytes));
    }

    /// A pass's prefetch turns, counted line by line, fall on the lines the remainder gives
    /// (line `l` to pass `l % passes`), for the tiles' steps of eight and sixteen values and
    /// lines of sixteen f32 or thirty-two bf16 values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn prefetch_turns_follow_the_lines() {
        for (step, line) in [(8, 16), (8, 32), (16, 16), (16, 32)] {
            for passes in 1..=9 {
                for pass in 0..passes {
                    let mut turns = avx2::LineTurns::new((pass, passes));
                    let mine: Vec<usize> = (0..1024).step_by(step).filter(|&k| turns.mine(k, line)).collect();
                    let expected: Vec<usize> =
                        (0..1024).step_by(step).filter(|&k| k % line == 0 && (k / line) % passes == pass).collect();
                    assert_eq!(mine, expected, "steps of {step}, lines of {line}, pass {pass} of {passes}");
                    assert!(!mine.is_empty());
                }
            }
        }
    }

    /// The kernel's product equals libtorch's to f32 rounding: widths that are not
    /// multiples of the tile (7 x 13), small weights computed by one thread and large ones
    /// shared with the OpenMP team, with and without a bias, and added in place.
    #[test]
    fn matches_the_library_product() {
        for sixteen in [false, true] {
            with_lanes(sixteen, matches_the_library_product_in_lanes);
        }
    }

    fn matches_the_library_product_in_lanes() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(1);
        for (out, inp) in [(7, 13), (64, 64), (320, 256), (1030, 600)] {
            let w = Tensor::randn([out, inp], O);
            let b = Tensor::randn([out], O);
            for rows in [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 25, MAX_ROWS] {
                let x = Tensor::randn([rows, inp], O);
                for bias in [None, Some(&b)] {
                    let Some(got) = product(&x, &w, bias) else {
                        assert!(!available(), "refused {rows} x {inp} by {out} x {inp}");
                        return;
                    };
                    let want = x.linear(&w, bias);
                    let diff = (&got - &want).abs().max().double_value(&[]);
                    assert!(diff < 1e-3, "{out}x{inp}, {rows} rows, bias {}: max difference {diff}", bias.is_some());
                }
                let y = Tensor::randn([rows, out], O);
                let want = &y + x.linear::<Tensor>(&w, None);
                assert!(accumulate(&x, &w, &y), "{out}x{inp}, {rows} rows: not accumulated");
                let diff = (&y - &want).abs().max().double_value(&[]);
                assert!(diff < 1e-3, "{out}x{inp}, {rows} rows, in place: max difference {diff}");
            }
        }
    }

    /// Rows in host memory give bit for bit the tensor product's outputs, and lengths that
    /// do not fit are refused with the output untouched.
    #[test]
    fn host_rows_equal_the_tensor_product() {
        for sixteen in [false, true] {
            with_lanes(sixteen, host_rows_equal_the_tensor_product_in_lanes);
        }
    }

    fn host_rows_equal_the_tensor_product_in_lanes() {
        let _g = tch::no_grad_guard();
        if !available() {
            return;
        }
        tch::manual_seed(4);
        for (out, inp) in [(7, 13), (256, 256), (1030, 600)] {
            let (w, b) = (Tensor::randn([out, inp], O), Tensor::randn([out], O));
            let b_host = Vec::<f32>::try_from(&b).expect("bias to the host");
            for rows in [1, 4, 9] {
                let x = Tensor::randn([rows, inp], O);
                let x_host = Vec::<f32>::try_from(x.view([-1])).expect("rows to the host");
                for bias in [None, Some(&b)] {
                    let want = product(&x, &w, bias).expect("the tensor product");
                    let want = Vec::<f32>::try_from(want.view([-1])).expect("product to the host");
                    let mut got = vec![0f32; (rows * out) as usize];
                    assert!(product_into(&x_host, &w, bias.map(|_| b_host.as_slice()), &mut got));
                    assert_eq!(got, want, "{out}x{inp}, {rows} rows, bias {}", bias.is_some());
                }
            }
            let mut short = vec![7f32; out as usize - 1];
            assert!(!product_into(&vec![0f32; inp as usize], &w, None, &mut short));
            assert!(short.iter().all(|&v| v == 7.0));
            assert!(!product_into(&vec![0f32; inp as usize + 1], &w, None, &mut vec![0f32; out as usize]));
        }
    }

    /// The trees that sum sixteen or four vectors' lanes at once give each vector's sum
    /// bit for bit as its halves and then [`avx2::lanes_sum`] give it, in the lane the tree
    /// puts it: values of many magnitudes and both signs, where the order of the additions
    /// shows, infinities and NaN among them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_trees_add_as_one_vector_at_a_time() {
        use std::arch::x86_64::*;
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl")) {
            return;
        }
        // SAFETY (the block): AVX-512F and VL are available; the arrays hold sixteen values.
        unsafe {
            #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
            unsafe fn one(v: &[f32; 16]) -> f32 {
                let (lo, hi) = avx512::halves(unsafe { _mm512_loadu_ps(v.as_ptr()) });
                avx2::lanes_sum(_mm256_add_ps(lo, hi))
            }
            let mut seed = 0x9e37_79b9_u32;
            let mut value = || {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                // Sign, exponent 2^-20..2^20, mantissa: sums that round differently in
                // another order.
                let exponent = 107 + (seed >> 8) % 40;
                f32::from_bits((seed & 0x8000_0000) | (exponent << 23) | (seed & 0x7f_ffff))
            };
            for round in 0..200 {
                let mut v = [[0f32; 16]; 16];
                for (i, x) in v.iter_mut().flatten().enumerate() {
                    *x = match (round, i) {
                        (1, 3) => f32::INFINITY,
                        (2, 40) => f32::NAN,
                        (3, 7) | (3, 9) => f32::NEG_INFINITY,
                        _ => value(),
                    };
                }
                let vectors: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(v[i].as_ptr()));
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), avx512::lanes_sums16(&vectors));
                for (i, w) in v.iter().enumerate() {
                    // Vector 4 i + j's sum in lane 4 j + i.
                    let lane = 4 * (i % 4) + i / 4;
                    assert_eq!(got[lane].to_bits(), one(w).to_bits(), "round {round}, vector {i} of sixteen");
                }
                let mut four = [0f32; 4];
                _mm_storeu_ps(
                    four.as_mut_ptr(),
                    avx512::lanes_sums4(&[vectors[0], vectors[1], vectors[2], vectors[3]]),
                );
                for (i, w) in v.iter().take(4).enumerate() {
                    assert_eq!(four[i].to_bits(), one(w).to_bits(), "round {round}, vector {i} of four");
                }
            }
        }
    }

    /// A row's outputs are bit for bit the same alone and among any number of other rows,
    /// at any position: what keeps a speculative step's next-token rows equal to AR's.
    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        for sixteen in [false, true] {
            with_lanes(sixteen, a_row_does_not_depend_on_the_other_rows_in_lanes);
        }
    }

    fn a_row_does_not_depend_on_the_other_rows_in_lanes() {
        let _g = tch::no_grad_guard();
        if !available() {
            return;
        }
        tch::manual_seed(2);
        // An input of 600 values ends in eight lanes; 64 and 576 (the proxy's and
        // SmolLM2-135M's widths) are whole sixteens, whose tiles of three rows and more sum
        // their lanes four rows at a time (`avx512::finish_by_fours`).
        for (out, inp) in [(1030, 600), (344, 64), (132, 576)] {
            let (w, b) = (Tensor::randn([out, inp], O), Tensor::randn([out], O));
            let x = Tensor::randn([MAX_ROWS, inp], O);
            for bias in [None, Some(&b)] {
                let alone: Vec<Tensor> =
                    (0..MAX_ROWS).map(|i| product(&x.narrow(0, i, 1), &w, bias).expect("one row")).collect();
                for rows in [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 25, MAX_ROWS] {
                    let all = product(&x.narrow(0, 0, rows), &w, bias).expect("rows");
                    for (i, one) in alone.iter().enumerate().take(rows as usize) {
                        assert!(
                            all.narrow(0, i as i64, 1).equal(one),
                            "{out}x{inp}: row {i} of {rows} differs from the row alone"
                        );
                    }
                    // Added to what `y` holds: each row as the sum of the two.
                    let y = Tensor::randn([rows, out], O);
                    let before = y.copy();
                    assert!(accumulate(&x.narrow(0, 0, rows), &w, &y));
                    let want = &before + product(&x.narrow(0, 0, rows), &w, None).expect("rows");
                    assert!(y.equal(&want), "{out}x{inp}: {rows} rows added to y");
                }
            }
        }
    }

    /// More rows than a call takes go in chunks: every row as it is alone (so a prompt's
    /// rows in a prefill do not depend on a mask block after them), all within rounding of
    /// the library's product.
    #[test]
    fn chunks_keep_each_row_as_it_is_alone() {
        for sixteen in [false, true] {
            with_lanes(sixteen, chunks_keep_each_row_as_it_is_alone_in_lanes);
        }
    }

    fn chunks_keep_each_row_as_it_is_alone_in_lanes() {
        let _g = tch::no_grad_guard();
        if !available() {
            return;
        }
        tch::manual_seed(3);
        let (w, b) = (Tensor::randn([300, 200], O), Tensor::randn([300], O));
        let x = Tensor::randn([2 * MAX_ROWS + 7, 200], O);
        for rows in [1, MAX_ROWS, MAX_ROWS + 1, 2 * MAX_ROWS + 7] {
            let all = product_in_chunks(&x.narrow(0, 0, rows), &w, Some(&b)).expect("chunks");
            assert_eq!(all.size(), [rows, 300]);
            let library = x.narrow(0, 0, rows).linear(&w, Some(&b));
            assert!(all.allclose(&library, 1e-4, 1e-4, false), "{rows} rows");
            for i in [0, rows / 2, rows - 1] {
                let one = product(&x.narrow(0, i, 1), &w, Some(&b)).expect("one row");
                assert!(all.narrow(0, i, 1).equal(&one), "row {i} of {rows} differs from the row alone");
            }
        }
        assert!(product_in_chunks(&x.set_requires_grad(true), &w, None).is_none());
    }

    /// The product with a low-rank term on the tail rows: the rows before `start` are
    /// bit for bit the plain product's, the others the library's `x W^T + b + (x A^T) B^T`
    /// to f32 rounding; and every row is bit for bit the same computed by this thread
    /// alone as shared by a team of two (each thread computing the intermediate's slices
    /// its columns read).
    #[test]
    fn low_rank_term_applies_to_the_tail_rows_only() {
        for sixteen in [false, true] {
            with_lanes(sixteen, low_rank_term_applies_to_the_tail_rows_only_in_lanes);
        }
    }

    fn low_rank_term_applies_to_the_tail_rows_only_in_lanes() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let (w, bias) = (Tensor::randn([1030, 600], O), Tensor::randn([1030], O));
        let (a, b) = (Tensor::randn([96, 600], O), Tensor::randn([1030, 96], O));
        let bt = b.tr().contiguous();
        let on = |team: i32, x: &Tensor, start: i64| {
            let parts = [TermPart { cols: 0..1030, rank_offset: 0 }];
            let term = TailTerm { a: &a, bt: &bt, parts: &parts, start, bf16: false };
            in_team(team, || product_with_low_rank(x, &w, Some(&bias), &term))
        };
        for (rows, start) in [(9, 3), (25, 5), (4, 0), (1, 0)] {
            let x = Tensor::randn([rows, 600], O);
            let Some(y) = on(2, &x, start) else {
                assert!(!available());
                return;
            };
            let plain = product(&x, &w, Some(&bias)).expect("plain product");
            assert!(y.narrow(0, 0, start).equal(&plain.narrow(0, 0, start)), "{rows} rows: head rows changed");
            let xt = x.narrow(0, start, rows - start);
            let want = xt.linear(&w, Some(&bias)) + xt.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None);
            let diff = (y.narrow(0, start, rows - start) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-2, "{rows} rows from {start}: max difference {diff}");
            let alone = on(1, &x, start).expect("one thread");
            assert!(alone.equal(&y), "{rows} rows from {start}: one thread differs from a team of two");
        }
    }

    /// The largest difference between `got` and `want`, relative to `want`'s largest value.
    fn relative_difference(got: &Tensor, want: &Tensor) -> f64 {
        (got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
    }

    /// The tail rows in bf16: the rows before `start` are bit for bit the plain product's,
    /// the tail rows the library's `x W^T + b + (x A^T) B^T` to bf16 rounding (in the
    /// first block of sixteen columns further from it than f32 rounding: the bf16 path
    /// ran), widths that are not multiples of the blocks (23 or 1,030 columns: blocks of
    /// sixteen and the rest in f32; 13 or 600 inputs: padded to 32), every row the same
    /// from one thread as from a team of two.
    #[test]
    fn bf16_tail_rows_are_close_and_head_rows_exact() {
        for sixteen in [false, true] {
            with_lanes(sixteen, bf16_tail_rows_are_close_and_head_rows_exact_in_lanes);
        }
    }

    fn bf16_tail_rows_are_close_and_head_rows_exact_in_lanes() {
        let _g = tch::no_grad_guard();
        if !bf16_available() {
            return;
        }
        tch::manual_seed(5);
        for (out, inp) in [(1030, 600), (23, 13), (64, 64)] {
            let (w, bias) = (Tensor::randn([out, inp], O), Tensor::randn([out], O));
            let (a, b) = (Tensor::randn([16, inp], O) * 0.1, Tensor::randn([out, 16], O) * 0.1);
            let bt = b.tr().contiguous();
            let parts = [TermPart { cols: 0..out as usize, rank_offset: 0 }];
            let on = |team: i32, x: &Tensor, start: i64| {
                let term = TailTerm { a: &a, bt: &bt, parts: &parts, start, bf16: true };
                in_team(team, || product_with_low_rank(x, &w, Some(&bias), &term)).expect("bf16 tail")
            };
            for (rows, start) in [(25, 5), (9, 3), (4, 0)] {
                let x = Tensor::randn([rows, inp], O);
                let y = on(2, &x, start);
                let plain = product(&x, &w, Some(&bias)).expect("plain product");
                let what = format!("{out}x{inp}, {rows} rows from {start}");
                assert!(y.narrow(0, 0, start).equal(&plain.narrow(0, 0, start)), "{what}: head rows changed");
                let xt = x.narrow(0, start, rows - start);
                let want = xt.linear(&w, Some(&bias)) + xt.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None);
                let got = y.narrow(0, start, rows - start);
                let all = relative_difference(&got, &want);
                assert!(all < 1e-2, "{what}: relative difference {all}");
                let block = relative_difference(&got.narrow(1, 0, 16), &want.narrow(1, 0, 16));
                assert!(block > 1e-5, "{what}: {block} from the f32 product: the bf16 path did not run");
                assert!(on(1, &x, start).equal(&y), "{what}: one thread differs from a team of two");
            }
        }
    }

    /// A group's term part by part (q, k, v with k not adapted, the parts' edges inside
    /// blocks of sixteen columns and the last block short): each part's columns take its
    /// own slice of the intermediate and the other columns none, bit for bit what the same
    /// term gives through a block-diagonal `B` with its zero blocks read (as before the
    /// parts), from one thread and a team of two, and the library's product to f32
    /// rounding; likewise with the term's rows in bf16 (their base products in pairs, the
    /// term's pass after them), to bf16 rounding.
    #[test]
    fn term_parts_equal_the_block_diagonal_term() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(4);
        // Rank 16: each slice of the intermediate one block of the bf16 rows' tiles.
        let (out, inp, r) = (637, 200, 16);
        let (q, k) = (376, 128);
        let v = out - q - k;
        let w = Tensor::randn([out, inp], O);
        let a = Tensor::randn([2 * r, inp], O);
        // q: columns 0..376 from slice 0; k: 376..504 none; v: 504..637 from slice r.
        let (bq, bv) = (Tensor::randn([r, q], O), Tensor::randn([r, v], O));
        let compact = Tensor::zeros([r, out], O);
        compact.narrow(1, 0, q).copy_(&bq);
        compact.narrow(1, q + k, v).copy_(&bv);
        let block = Tensor::zeros([2 * r, out], O);
        block.narrow(0, 0, r).narrow(1, 0, q).copy_(&bq);
        block.narrow(0, r, r).narrow(1, q + k, v).copy_(&bv);
        let (q, k) = (q as usize, k as usize);
        let parts =
            [TermPart { cols: 0..q, rank_offset: 0 }, TermPart { cols: q + k..out as usize, rank_offset: r as usize }];
        for bf16 in [false, true] {
            if bf16 && !bf16_available() {
                continue;
            }
            for (rows, start) in [(4, 2), (25, 5)] {
                let x = Tensor::randn([rows, inp], O);
                let term = |bt, parts| TailTerm { a: &a, bt, parts, start, bf16 };
                let Some(got) = in_team(2, || product_with_low_rank(&x, &w, None, &term(&compact, &parts))) else {
                    assert!(!available());
                    return;
                };
                let what = format!("{rows} rows, bf16 {bf16}");
                let dense = [TermPart { cols: 0..out as usize, rank_offset: 0 }];
                let want = product_with_low_rank(&x, &w, None, &term(&block, &dense)).expect("dense term");
                assert!(got.equal(&want), "{what}: the parts differ from the block-diagonal term");
                let alone = in_team(1, || product_with_low_rank(&x, &w, None, &term(&compact, &parts)));
                assert!(alone.expect("one thread").equal(&got), "{what}: one thread differs from a team of two");
                // One sequence's rows as a layer holds them, `[1, rows, in]`: `[1, rows, out]`.
                let seq = in_team(2, || product_with_low_rank(&x.unsqueeze(0), &w, None, &term(&compact, &parts)));
                let seq = seq.expect("a sequence");
                assert_eq!(seq.size(), [1, rows, out], "{what}");
                assert!(seq.squeeze_dim(0).equal(&got), "{what}: a sequence differs from its rows");
                let xt = x.narrow(0, start, rows - start);
                let library = xt.linear::<Tensor>(&w, None) + xt.linear::<Tensor>(&a, None).mm(&block);
                let diff = relative_difference(&got.narrow(0, start, rows - start), &library);
                assert!(diff < if bf16 { 1e-2 } else { 1e-5 }, "{what}: relative difference {diff}");
            }
        }
        let overlapping = [TermPart { cols: 0..400, rank_offset: 0 }, TermPart { cols: 384..637, rank_offset: 0 }];
        let term = TailTerm { a: &a, bt: &compact, parts: &overlapping, start: 2, bf16: false };
        assert!(product_with_low_rank(&Tensor::randn([4, inp], O), &w, None, &term).is_none());
    }

    /// Two weights, one for the rows before `start` and one for the rest: each block of
    /// rows bit for bit what [`product`] gives it with its weight, from one thread and from
    /// a team of two; a tail weight of another shape is refused.
    #[test]
    fn rows_from_start_take_the_tail_weight() {
        for sixteen in [false, true] {
            with_lanes(sixteen, rows_from_start_take_the_tail_weight_in_lanes);
        }
    }

    fn rows_from_start_take_the_tail_weight_in_lanes() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(6);
        let (w, tail_w, bias) =
            (Tensor::randn([1030, 600], O), Tensor::randn([1030, 600], O), Tensor::randn([1030], O));
        for (rows, start) in [(9, 3), (25, 5), (4, 0), (2, 1)] {
            let x = Tensor::randn([rows, 600], O);
            let on =
                |team: i32| in_team(team, || product_two_weights(&x, &w, &tail_w, None, Some(&bias), start, false));
            let Some(y) = on(2) else {
                assert!(!available());
                return;
            };
            let head = product(&x.narrow(0, 0, start.max(1)), &w, Some(&bias)).expect("head rows");
            let tail = product(&x.narrow(0, start, rows - start), &tail_w, Some(&bias)).expect("tail rows");
            assert!(y.narrow(0, 0, start).equal(&head.narrow(0, 0, start)), "{rows} rows from {start}: head rows");
            assert!(y.narrow(0, start, rows - start).equal(&tail), "{rows} rows from {start}: tail rows");
            assert!(on(1).expect("one thread").equal(&y), "{rows} rows from {start}: one thread differs");
            let seq = product_two_weights(&x.unsqueeze(0), &w, &tail_w, None, Some(&bias), start, false);
            let seq = seq.expect("a sequence");
            assert_eq!(seq.size(), [1, rows, 1030]);
            assert!(seq.squeeze_dim(0).equal(&y), "{rows} rows from {start}: a sequence differs from its rows");
        }
        let two = Tensor::randn([2, 4, 600], O);
        assert!(product_two_weights(&two, &w, &tail_w, None, None, 2, false).is_none(), "two sequences");
        let other = Tensor::randn([1029, 600], O);
        assert!(product_two_weights(&Tensor::randn([4, 600], O), &w, &other, None, None, 2, false).is_none());
    }

    /// Two weights, the tail one read as panels ([`super::super::panels`]): the head rows
    /// bit for bit [`product`]'s of the base weight (the dot form, as AR's), the tail rows
    /// the library's product of the tail weight to f32 rounding and each the same bits alone
    /// as among the others, on one thread and on a team of two, with and without a bias,
    /// widths that are not multiples of sixteen; panels of another shape are refused.
    #[test]
    fn tail_rows_read_the_tail_weights_panels() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(8);
        for (out, inp) in [(344, 64), (64, 172), (23, 13), (512, 256)] {
            let (w, tail_w, b) = (Tensor::randn([out, inp], O), Tensor::randn([out, inp], O), Tensor::randn([out], O));
            let Some(panels) = super::super::panels::Panels::of(&tail_w) else {
                assert!(!super::super::panels::available());
                return;
            };
            for (rows, start) in [(25, 5), (9, 3), (4, 1), (7, 0)] {
                let x = Tensor::randn([rows, inp], O);
                for bias in [None, Some(&b)] {
                    let what = format!("{out}x{inp}, {rows} rows from {start}, bias {}", bias.is_some());
                    let two = |x: &Tensor, start: i64, team: i32| {
                        in_team(team, || product_two_weights(x, &w, &tail_w, Some(&panels), bias, start, false))
                            .expect("panels taken")
                    };
                    let y = two(&x, start, 2);
                    let head = product(&x, &w, bias).expect("base product");
                    assert!(y.narrow(0, 0, start).equal(&head.narrow(0, 0, start)), "{what}: head rows changed");
                    let xt = x.narrow(0, start, rows - start);
                    let want = xt.linear(&tail_w, bias);
                    let diff = relative_difference(&y.narrow(0, start, rows - start), &want);
                    assert!(diff < 1e-4, "{what}: relative difference {diff}");
                    let last = x.narrow(0, rows - 1, 1);
                    let alone = two(&Tensor::cat(&[&last, &last], 0), 1, 1);
                    assert!(alone.narrow(0, 1, 1).equal(&y.narrow(0, rows - 1, 1)), "{what}: a row alone differs");
                    assert!(two(&x, start, 1).equal(&y), "{what}: one thread differs from a team of two");
                    // Rows asked in bf16 take the pairs, not the panels.
                    let pairs = |p| product_two_weights(&x, &w, &tail_w, p, bias, start, true).expect("bf16 tail");
                    assert!(pairs(Some(&panels)).equal(&pairs(None)), "{what}: bf16 rows read the panels");
                }
            }
            let wrong = super::super::panels::Panels::of(&tail_w.narrow(0, 0, out - 1)).expect("panels");
            let x = Tensor::randn([4, inp], O);
            assert!(product_two_weights(&x, &w, &tail_w, Some(&wrong), None, 2, false).is_none());
        }
    }

    /// Two weights with the tail rows in bf16: the head rows exactly the base weight's
    /// product, the tail rows the tail weight's within bf16 rounding (and not its f32
    /// product: the bf16 path ran), the same on one thread as on two.
    #[test]
    fn bf16_tail_rows_take_the_tail_weight() {
        let _g = tch::no_grad_guard();
        if !bf16_available() {
            return;
        }
        tch::manual_seed(7);
        for (out, inp) in [(1030, 600), (23, 13), (344, 64)] {
            let (w, tail_w, bias) =
                (Tensor::randn([out, inp], O), Tensor::randn([out, inp], O), Tensor::randn([out], O));
            for (rows, start) in [(25, 5), (9, 3), (4, 0)] {
                let x = Tensor::randn([rows, inp], O);
                let on = |team: i32| {
                    in_team(team, || product_two_weights(&x, &w, &tail_w, None, Some(&bias), start, true))
                        .expect("bf16 tail")
                };
                let y = on(2);
                let what = format!("{out}x{inp}, {rows} rows from {start}");
                let head = product(&x, &w, Some(&bias)).expect("base product");
                assert!(y.narrow(0, 0, start).equal(&head.narrow(0, 0, start)), "{what}: head rows changed");
                let xt = x.narrow(0, start, rows - start);
                let want = xt.linear(&tail_w, Some(&bias));
                let got = y.narrow(0, start, rows - start);
                let diff = relative_difference(&got, &want);
                assert!(diff < 1e-2, "{what}: relative difference {diff}");
                let exact = product(&xt, &tail_w, Some(&bias)).expect("tail product");
                assert!(
                    !got.narrow(1, 0, 16.min(out)).equal(&exact.narrow(1, 0, 16.min(out))) || out < 16,
                    "{what}: the bf16 path did not run"
                );
                assert!(on(1).equal(&y), "{what}: one thread differs from a team of two");
            }
        }
    }

    /// bf16 operands: every row within bf16 rounding of the library's product of the same
    /// values in f32 (widths that are not multiples of the tile, one thread and a team,
    /// with and without a bias, in chunks past [`MAX_ROWS`]), a bf16 output, and each row
    /// bit for bit what it gives alone, so a step's next-token rows are AR's in bf16 too.
    #[test]
    fn bf16_weights_match_the_library_and_keep_rows_apart() {
        for sixteen in [false, true] {
            with_lanes(sixteen, bf16_weights_match_the_library_and_keep_rows_apart_in_lanes);
        }
    }

    fn bf16_weights_match_the_library_and_keep_rows_apart_in_lanes() {
        let _g = tch::no_grad_guard();
        if !available() {
            return;
        }
        tch::manual_seed(8);
        let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
        for (out, inp) in [(7, 13), (64, 64), (320, 256), (1030, 600)] {
            let (w, b) = (bf(Tensor::randn([out, inp], O)), bf(Tensor::randn([out], O)));
            let x = bf(Tensor::randn([2 * MAX_ROWS + 5, inp], O));
            let alone: Vec<Tensor> =
                (0..x.size()[0]).map(|i| product(&x.narrow(0, i, 1), &w, Some(&b)).expect("one bf16 row")).collect();
            for rows in [1, 2, 5, 8, 9, 11, 25, MAX_ROWS, MAX_ROWS + 1, 2 * MAX_ROWS + 5] {
                let xs = x.narrow(0, 0, rows);
                for bias in [None, Some(&b)] {
                    let what = format!("{out}x{inp}, {rows} rows, bias {}", bias.is_some());
                    let got = if rows <= MAX_ROWS {
                        in_team(2, || product(&xs, &w, bias)).expect("bf16 product")
                    } else {
                        assert!(product(&xs, &w, bias).is_none(), "{what}: more rows than a call takes");
                        product_in_chunks(&xs, &w, bias).expect("bf16 chunks")
                    };
                    assert_eq!(got.kind(), Kind::BFloat16, "{what}");
                    let f = |t: &Tensor| t.to_kind(Kind::Float);
                    // The f32 kernel on the widened values, rounded: the same bits.
                    let wide = product_in_chunks(&f(&xs), &f(&w), bias.map(f).as_ref()).expect("f32 product");
                    assert!(got.equal(&wide.to_kind(Kind::BFloat16)), "{what}: not the f32 kernel's rounded");
                    let want = f(&xs).linear(&f(&w), bias.map(f).as_ref());
                    let diff = relative_difference(&f(&got), &want);
                    assert!(diff < 1e-2, "{what}: relative difference {diff}");
                    if bias.is_some() {
                        for (i, one) in alone.iter().enumerate().take(rows as usize) {
                            assert!(
                                got.narrow(0, i as i64, 1).equal(one),
                                "{what}: row {i} differs from the row alone"
                            );
                        }
                        if rows <= MAX_ROWS {
                            let single = in_team(1, || product(&xs, &w, bias)).expect("one thread");
                            assert!(single.equal(&got), "{what}: one thread differs from a team of two");
                        }
                    }
                }
            }
        }
        // Mixed dtypes go to the library.
        let (x, w) = (Tensor::randn([4, 32], O), Tensor::randn([64, 32], O));
        assert!(product(&bf(x.shallow_clone()), &w, None).is_none());
        assert!(product(&x, &bf(w.shallow_clone()), None).is_none());
    }

    /// A bf16 model's mask rows in bf16 pairs: the rows before `start` bit for bit what
    /// [`product`] gives them (so AR's), the others within bf16 rounding of the library's
    /// product, across chunks of [`MAX_ROWS`], from one thread as from a team of two. (The
    /// pairs' f32 sums differ from the widened tiles' in their last bits only, which the
    /// rounding to bf16 almost always hides: the outputs cannot tell which ran.)
    #[test]
    fn bf16_model_tail_rows_in_pairs() {
        let _g = tch::no_grad_guard();
        if !bf16_available() {
            return;
        }
        tch::manual_seed(10);
        let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        for (out, inp) in [(1030, 600), (23, 13), (344, 64)] {
            let (w, b) = (bf(Tensor::randn([out, inp], O)), bf(Tensor::randn([out], O)));
            for (rows, start) in [(25, 5), (9, 3), (4, 0), (70, 40), (70, 20)] {
                let what = format!("{out}x{inp}, {rows} rows from {start}");
                let x = bf(Tensor::randn([rows, inp], O));
                let y = in_team(2, || product_bf16_tail(&x, &w, Some(&b), start)).expect("bf16 tail");
                let exact = product_in_chunks(&x, &w, Some(&b)).expect("exact");
                assert!(y.narrow(0, 0, start).equal(&exact.narrow(0, 0, start)), "{what}: head rows changed");
                let got = y.narrow(0, start, rows - start);
                let want = f(&x.narrow(0, start, rows - start)).linear(&f(&w), Some(&f(&b)));
                let diff = relative_difference(&f(&got), &want);
                assert!(diff < 1e-2, "{what}: relative difference {diff}");
                let single = in_team(1, || product_bf16_tail(&x, &w, Some(&b), start)).expect("one thread");
                assert!(single.equal(&y), "{what}: one thread differs from a team of two");
            }
        }
        let x = bf(Tensor::randn([4, 32], O));
        assert!(product_bf16_tail(&x, &bf(Tensor::randn([8, 32], O)), None, 5).is_none());
        assert!(product_bf16_tail(&f(&x), &Tensor::randn([8, 32], O), None, 2).is_none());
    }

    /// Our rounding to bf16 is libtorch's, bit for bit: random values of every magnitude,
    /// ties (both ways), infinities, the largest values (rounding up to infinity), zeros of
    /// both signs and subnormals.
    #[test]
    fn bf16_rounding_is_libtorchs() {
        tch::manual_seed(9);
        let mut values: Vec<f32> =
            Vec::<f32>::try_from(Tensor::randn([4096], O) * Tensor::randn([4096], O).exp2() * 1e3)
                .expect("values to the host");
        values.extend([
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 256.0),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            0.0,
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            1e-40,
        ]);
        let want = Tensor::from_slice(&values).to_kind(Kind::BFloat16).view_dtype(Kind::Int16);
        let want: Vec<i16> = Vec::<i16>::try_from(want).expect("bits to the host");
        for (&v, &w) in values.iter().zip(&want) {
            assert_eq!(round_to_bf16(v), w as u16, "{v:e}");
        }
        assert!(f32::from_bits(u32::from(round_to_bf16(f32::NAN)) << 16).is_nan());
    }

    /// What the kernel leaves to the libraries: too many rows, a gradient, other dtypes,
    /// widths that do not agree; and an output that does not fit is left untouched.
    #[test]
    fn refuses_what_it_does_not_take() {
        let w = Tensor::randn([64, 32], O);
        let x = |rows: i64| Tensor::randn([rows, 32], O);
        assert!(product(&x(MAX_ROWS + 1), &w, None).is_none());
        assert!(product(&x(4).set_requires_grad(true), &w, None).is_none());
        assert!(product(&x(4).to_kind(Kind::Double), &w.to_kind(Kind::Double), None).is_none());
        assert!(product(&Tensor::randn([4, 31], O), &w, None).is_none());
        assert!(product(&x(4), &w, Some(&Tensor::zeros([63], O))).is_none());
        let y = Tensor::zeros([4, 63], O);
        assert!(!accumulate(&x(4), &w, &y));
        assert_eq!(y.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
