//! The element-wise operations of decoding on the CPU in our own loops: RMSNorm, the rotary
//! embedding, SwiGLU's activation and the residual additions, for f32 passes of up to
//! [`MAX_ROWS`] rows (an AR step's one row, a speculative step's 25); and the copies of a
//! pass's keys and values into the cache ([`write_rows`], any dtype).
//!
//! libtorch spends a few microseconds on any operation (dispatch, a `TensorIterator`, an
//! output allocated), and at a step's sizes more per row than the arithmetic needs: on a
//! width-64 model (`layer_ops`, Zen 3) its RMSNorm took 15 us for one row and 26 for 25,
//! rotating q and k 10 and 18, `silu(gate) * up` 5 and 14, where each is well under a
//! microsecond of arithmetic. A small model's step is made of such operations, so this is
//! where a 25-row step lost most against an AR step. Each loop here is one pass over its
//! rows, with the vector instructions the compiler gives plain loops under AVX2; SwiGLU's
//! rows are shared between the OpenMP team's threads when a step has many.
//!
//! Every output row is computed alone, in the same order whatever the number of rows, so a
//! step's next-token rows still equal an AR step's bit for bit. The rotation equals
//! libtorch's (and transformers') bit for bit: two products and a sum, each rounded. RMSNorm
//! sums its squares in eight lanes rather than libtorch's order, and SwiGLU's exponential is
//! a polynomial of its own, so both differ from libtorch's by a rounding or two (tested
//! below); passes of more rows (a prefill), other dtypes, devices and anything that needs a
//! gradient keep libtorch's operations.

// Reads and writes tensors through raw pointers after checking their kind, device, sizes
// and strides; what each `unsafe` relies on is stated where it is used.
#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

/// The most rows (all dimensions but the last) these loops take. Longer passes are
/// prefills, where libtorch's operations share the work between threads.
pub const MAX_ROWS: i64 = 256;

/// Whether `t` can be read here: f32 on the CPU, no gradient, on a CPU with AVX2 and FMA.
fn takes(t: &Tensor) -> bool {
    super::few_rows::available() && t.device() == Device::Cpu && t.kind() == Kind::Float && !t.requires_grad()
}

/// The `[rows, width]` a contiguous `x` of at most [`MAX_ROWS`] rows is, or `None`.
fn rows_of(x: &Tensor) -> Option<(usize, usize)> {
    let width = *x.size().last()?;
    let rows = if width > 0 { x.numel() as i64 / width } else { 0 };
    (takes(x) && x.is_contiguous() && width > 0 && (1..=MAX_ROWS).contains(&rows))
        .then_some((rows as usize, width as usize))
}

/// `x` (`rows * width` values) as a slice.
///
/// # Safety
/// `x` is a contiguous f32 tensor on the CPU of `len` values, not written while the slice
/// lives.
unsafe fn values(x: &Tensor, len: usize) -> &[f32] {
    unsafe { std::slice::from_raw_parts(x.data_ptr() as *const f32, len) }
}

/// A new contiguous f32 tensor of `size`, its values written by `fill`.
fn output(size: &[i64], fill: impl FnOnce(&mut [f32])) -> Tensor {
    let y = Tensor::empty(size, (Kind::Float, Device::Cpu));
    let len = size.iter().product::<i64>() as usize;
    // SAFETY: `y` was just allocated with `len` f32 values and nothing else refers to it
    // while `fill` writes them.
    fill(unsafe { std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, len) });
    y
}

/// RMSNorm of each row of `x` (`[..., d]`) scaled by `weight` (`[d]`): `x * (1 / sqrt(mean(x
/// * x) + eps)) * weight`, the products rounded in that order as libtorch's f32 `rms_norm`
/// rounds them. `None` when the loops do not take `x` (see the module's documentation).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    let (rows, d) = rows_of(x)?;
    if !takes(weight) || !weight.is_contiguous() || weight.numel() != d {
        return None;
    }
    // SAFETY: `rows_of` and the checks above: both are contiguous f32 on the CPU, of these
    // lengths.
    let (xs, ws) = unsafe { (values(x, rows * d), values(weight, d)) };
    // SAFETY: `available()` (in `takes`) checked AVX2 and FMA.
    Some(output(&x.size(), |out| unsafe { kernels::rms_norm(xs, ws, out, d, eps as f32) }))
}

/// `silu(gate) * up` of each row of `gate_up` (`[..., 2 i]`, gate then up), `[..., i]`:
/// `gate / (1 + exp(-gate)) * up`, libtorch's formula with an exponential of our own.
/// `None` when the loops do not take `gate_up`.
pub fn swiglu(gate_up: &Tensor, i: i64) -> Option<Tensor> {
    let (rows, width) = rows_of(gate_up)?;
    if i <= 0 || width != 2 * i as usize {
        return None;
    }
    let mut size = gate_up.size();
    *size.last_mut()? = i;
    // SAFETY: `rows_of`: contiguous f32 on the CPU of `rows * width` values.
    let xs = unsafe { values(gate_up, rows * width) };
    let i = i as usize;
    Some(output(&size, |out| {
        // Rows shared out between the threads of libtorch's OpenMP team for a step's many
        // rows: each output is computed alone, so the same values whoever computes it.
        let y = SharedOut(out.as_mut_ptr());
        let work = super::few_rows::Work { bytes: 0, f32_macs: (rows * i) as f64 * SWIGLU_OUTPUT_AS_F32_MACS };
        super::few_rows::in_parts(super::few_rows::worth_sharing(work), &|part, parts| {
            let (r0, r1) = (rows * part / parts, rows * (part + 1) / parts);
            // SAFETY: the parts take disjoint rows r0..r1 of the output (`rows x i` values,
            // alive until `in_parts` returns) and read the same rows of `xs`.
            let out = unsafe { std::slice::from_raw_parts_mut(y.at(r0 * i), (r1 - r0) * i) };
            // SAFETY: `available()` checked AVX2 and FMA.
            unsafe { kernels::swiglu(&xs[r0 * width..r1 * width], out, i) };
        });
    }))
}

/// `x * sigmoid(x)` of every value of `x` in place, with SwiGLU's exponential (a draft
/// chain's state on host vectors: a scalar `exp` a value took 4 us a draft on the demo's
/// width). False (nothing changed) where the loops do not run.
pub fn silu_in_place(x: &mut [f32]) -> bool {
    if !super::few_rows::available() {
        return false;
    }
    // SAFETY: `available()` checked AVX2 and FMA.
    unsafe { kernels::silu(x) };
    true
}

/// How many f32 multiply-adds of the few-row kernel one output of [`swiglu`] counts as
/// when [`super::few_rows::worth_sharing`] decides whether to share its rows between
/// threads: the proxy's 25 rows of 172 took 3.7 us on one thread (AMX Xeon, forty-sixth
/// session), where the products run 32 multiply-adds a nanosecond. On the Zen 4 of
/// docs/BENCHMARKS.md (one thread against a team of two in turns in one process, medians):
/// the demo's 25 rows of 704 took 14-18 us against 10-13, 9 of them 5-7 against 4-6.5;
/// SmolLM2-135M's 25 rows of 1,536 32-40 against 20-23; the proxy's 25 of 172 4-6 against
/// 4-4.5. On the Zen 3 of the fifty-fourth session (`layer_ops`, three runs in turns with
/// `MTP_SHARE_MIN_US` at 10 and the default 20) the demo's 25 rows took 17-21 us alone and
/// 10-13 shared, where 28 put them at 15 us, under the line: with 40, 22 us, shared; its 9
/// rows (8 us) and the proxy's 25 (5 us) stay on one thread. An AR step's one row stays on
/// the calling thread.
const SWIGLU_OUTPUT_AS_F32_MACS: f64 = 40.0;

/// An output buffer the parts of a parallel loop write disjoint ranges of.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the parts write disjoint ranges (see where it is used) while the buffer lives.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The rows of `table` (`[vocab, d]`) at `ids` (int64, up to [`MAX_ROWS`] of them, any
/// shape), followed by the rows of `tail` (`[..., d]`) when given: `[ids..., d]` without a
/// tail, `[1, ids + tail rows, d]` with one (a speculative step's token embeddings then its
/// mask rows' inputs, one sequence). The values are copied, so they are those of libtorch's
/// `embedding` and `cat`; one allocation instead of two or three operations (a step's inputs
/// took 34 us so on the demo, its AR step's 14). `None` when the loops do not take the
/// tensors or an id is outside the table (libtorch's `embedding` then says so).
pub fn gather_rows(table: &Tensor, ids: &Tensor, tail: Option<&Tensor>) -> Option<Tensor> {
    let [vocab, d] = table.size()[..] else { return None };
    let n = ids.numel();
    let ids_ok = ids.kind() == Kind::Int64 && ids.device() == Device::Cpu && ids.is_contiguous();
    if !takes(table) || !table.is_contiguous() || !ids_ok || n == 0 || n > MAX_ROWS as usize || d <= 0 {
        return None;
    }
    let tail_rows = match tail {
        Some(t) if takes(t) && t.is_contiguous() && t.size().last() == Some(&d) => t.numel() / d as usize,
        Some(_) => return None,
        None => 0,
    };
    // SAFETY: `ids` is a contiguous int64 tensor on the CPU of `n` values, not written here.
    let ids_host = unsafe { std::slice::from_raw_parts(ids.data_ptr() as *const i64, n) };
    if ids_host.iter().any(|&i| !(0..vocab).contains(&i)) {
        return None;
    }
    let d = d as usize;
    // SAFETY: contiguous f32 on the CPU, checked above (`takes`): `vocab x d` and `tail_rows
    // x d` values (an empty tail is not read: its data pointer may be null).
    let (rows, tail_values) = unsafe {
        (values(table, vocab as usize * d), tail.filter(|_| tail_rows > 0).map(|t| values(t, tail_rows * d)))
    };
    let size: Vec<i64> = match tail {
        Some(_) => vec![1, (n + tail_rows) as i64, d as i64],
        None => ids.size().into_iter().chain([d as i64]).collect(),
    };
    let tail = tail_values;
    Some(output(&size, |out| {
        for (dst, &i) in out.chunks_exact_mut(d).zip(ids_host) {
            dst.copy_from_slice(&rows[i as usize * d..][..d]);
        }
        if let Some(tail) = tail {
            out[n * d..].copy_from_slice(tail);
        }
    }))
}

/// `a + b` for two contiguous f32 tensors of the same shape and up to [`MAX_ROWS`] rows (a
/// layer's residual additions in a decoding pass): the same floats as libtorch's `add`, in
/// one allocation and one loop (libtorch took 1.4 us an addition of one 64-wide row, 2.4 for
/// 25, in the proxy's decoding loop, where the sums take nanoseconds). `None` when the loops
/// do not take them.
pub fn add(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let (rows, width) = rows_of(a)?;
    let size = a.size();
    if rows_of(b) != Some((rows, width)) || b.size() != size {
        return None;
    }
    // SAFETY: `rows_of`: both contiguous f32 on the CPU of `rows x width` values.
    let (xs, ys) = unsafe { (values(a, rows * width), values(b, rows * width)) };
    Some(output(&size, |out| {
        for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
            *o = x + y;
        }
    }))
}

/// Copies `src` (`[b, h, t, d]`, any strides with the last one 1) into `dst` (`[b, h, n,
/// d]`, contiguous, `at + t <= n`) at positions `at..at + t` of its third dimension: what
/// `dst.narrow(2, at, t).copy_(src)` does (the values are copied, in any dtype), in one loop
/// of row copies (a decoding pass's keys and values into the cache: two `narrow`s and two
/// `copy_`s took 7.6 us a layer in the proxy's AR steps). False, and nothing written, unless
/// both are on the CPU in the same dtype without gradients.
pub fn write_rows(dst: &Tensor, src: &Tensor, at: i64) -> bool {
    let (size, st) = (src.size(), src.stride());
    let (&[b, h, t, d], &[s0, s1, s2, 1]) = (size.as_slice(), st.as_slice()) else { return false };
    if src.requires_grad() || src.device() != Device::Cpu {
        return false;
    }
    let rows = Rows { ptr: src.data_ptr() as *const u8, size: [b, h, t, d], strides: [s0, s1, s2], kind: src.kind() };
    write_rows_from(dst, rows, at)
}

/// `[b, h, t, d]` values of `kind` on the CPU read from `ptr` with element strides `strides`
/// for the first three dimensions (the last is 1): a tensor's data or part of it.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    /// Where element `[0, 0, 0, 0]` is.
    pub ptr: *const u8,
    /// `[b, h, t, d]`.
    pub size: [i64; 4],
    /// Elements from one batch entry, head and row to the next.
    pub strides: [i64; 3],
    /// Their dtype.
    pub kind: Kind,
}

/// [`write_rows`] from `src` (values the caller keeps alive and unwritten meanwhile, on the
/// CPU, never overlapping `dst`).
pub fn write_rows_from(dst: &Tensor, src: Rows, at: i64) -> bool {
    let Rows { size: [b, h, t, d], strides: [s0, s1, s2], kind, .. } = src;
    let ds = dst.size();
    let &[db, dh, n, dd] = ds.as_slice() else { return false };
    let same = (db, dh, dd) == (b, h, d) && at >= 0 && at + t <= n && b * h * t * d > 0;
    let placed = dst.device() == Device::Cpu && !dst.requires_grad() && dst.kind() == kind;
    if !(same && placed && dst.is_contiguous()) {
        return false;
    }
    let elt = kind.elt_size_in_bytes();
    let dst_ptr = dst.data_ptr() as *mut u8;
    let row_bytes = d as usize * elt;
    for e in 0..b {
        for head in 0..h {
            for r in 0..t {
                let from = (e * s0 + head * s1 + r * s2) as isize * elt as isize;
                let to = (((e * h + head) * n + at + r) * d) as usize * elt;
                // SAFETY: `src` holds the values its sizes and strides give (`from` indexes an
                // element of it and the row's `d` values follow at stride 1); `to` a row of
                // `dst` within its `b x h x n x d` values; the two never overlap (a cache
                // buffer and a pass's new keys).
                unsafe { std::ptr::copy_nonoverlapping(src.ptr.offset(from), dst_ptr.add(to), row_bytes) };
            }
        }
    }
    true
}

/// `x` (`[rows, width]`, up to [`MAX_ROWS`] rows) with `left` columns of zeros before its
/// own, `[rows, left + width]`: libtorch's `constant_pad_nd([left, 0])` in one allocation (a
/// speculative step's attention mask, its own rows' pattern after the cached positions,
/// which that operation padded in 15-20 us on the demo). `None` when the loops do not take
/// `x`.
pub fn pad_left(x: &Tensor, left: usize) -> Option<Tensor> {
    let [rows, width] = x.size()[..] else { return None };
    let (rows, width) = rows_of(x).filter(|&(r, w)| r as i64 == rows && w as i64 == width)?;
    // SAFETY: `rows_of`: contiguous f32 on the CPU of `rows x width` values.
    let xs = unsafe { values(x, rows * width) };
    Some(output(&[rows as i64, (left + width) as i64], |out| {
        for (dst, src) in out.chunks_exact_mut(left + width).zip(xs.chunks_exact(width)) {
            dst[..left].fill(0.0);
            dst[left..].copy_from_slice(src);
        }
    }))
}

/// `x * cos + [x2, x1] * sin_signed` for `x` `[b, t, heads, hd]` (a view whose heads of a
/// token are contiguous, such as q and k narrowed from the q/k/v projection) and tables
/// `[1 or b, t, 1, hd]` (see [`super::rope::RopeTables`]), as a new contiguous tensor; the
/// same floats as libtorch's operations give. `None` when the loops do not take them.
pub fn rope(x: &Tensor, cos: &Tensor, sin_signed: &Tensor) -> Option<Tensor> {
    let (size, stride) = (x.size(), x.stride());
    let &[b, t, heads, hd] = size.as_slice() else { return None };
    if !takes(x) || stride[3] != 1 || stride[2] != hd {
        return None;
    }
    rotate_heads(x, [b, t, heads, hd], [stride[0], stride[1]], cos, sin_signed)
}

/// [`rope`] of the first `heads` heads of width `hd` of each row of `x` (`[b, t, width]`,
/// contiguous, `width >= heads * hd`): a decoding pass's queries and keys rotated straight
/// from its q/k/v projection, without a view of them. `None` when the loops do not take it.
pub fn rope_leading(x: &Tensor, heads: i64, hd: i64, cos: &Tensor, sin_signed: &Tensor) -> Option<Tensor> {
    let size = x.size();
    let &[b, t, width] = size.as_slice() else { return None };
    if !takes(x) || !x.is_contiguous() || heads < 1 || heads * hd > width {
        return None;
    }
    rotate_heads(x, [b, t, heads, hd], [t * width, width], cos, sin_signed)
}

/// The rotation of `[b, t, heads, hd]` read from `x`'s data with batch and row strides
/// `stride` (each token's heads contiguous), into a new contiguous tensor.
fn rotate_heads(
    x: &Tensor,
    [b, t, heads, hd]: [i64; 4],
    stride: [i64; 2],
    cos: &Tensor,
    sin_signed: &Tensor,
) -> Option<Tensor> {
    let table_size = cos.size();
    let table_ok = |s: &Tensor| takes(s) && s.is_contiguous() && s.size() == table_size;
    let tables_b = table_size.first().copied().unwrap_or(0);
    if hd % 2 != 0
        || hd == 0
        || !(1..=MAX_ROWS).contains(&(b * t))
        || table_size != [tables_b, t, 1, hd]
        || !(tables_b == 1 || tables_b == b)
        || !table_ok(cos)
        || !table_ok(sin_signed)
    {
        return None;
    }
    let (t, row, hd) = (t as usize, (heads * hd) as usize, hd as usize);
    let tables = tables_b as usize * t * hd;
    // SAFETY: contiguous f32 tables on the CPU of `tables` values, checked above.
    let (c, s) = unsafe { (values(cos, tables), values(sin_signed, tables)) };
    let base = x.data_ptr() as *const f32;
    let rotate_all = |out: &mut [f32]| {
        for bi in 0..b as usize {
            for ti in 0..t {
                let at = if tables_b == 1 { ti } else { bi * t + ti } * hd;
                let dst = &mut out[(bi * t + ti) * row..][..row];
                // SAFETY: the token's heads are `row` contiguous values at the offsets the
                // caller's strides give, within `x`'s storage.
                let src = unsafe {
                    std::slice::from_raw_parts(
                        base.offset(bi as isize * stride[0] as isize + ti as isize * stride[1] as isize),
                        row,
                    )
                };
                // SAFETY: `available()` checked AVX2 and FMA.
                unsafe { kernels::rotate(src, &c[at..at + hd], &s[at..at + hd], dst, hd) };
            }
        }
    };
    Some(output(&[b, t as i64, heads, hd as i64], rotate_all))
}

/// The loops, compiled for AVX2 and FMA. Rust never fuses a product and a sum into one
/// multiply-add by itself, so each operation rounds as written.
mod kernels {
    /// See [`super::rms_norm`]. The squares of a row are summed in eight lanes, `j % 8`,
    /// in order; the lanes in a fixed tree; the remainder after.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rms_norm(x: &[f32], w: &[f32], y: &mut [f32], d: usize, eps: f32) {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mut lanes = [0f32; 8];
            let mut chunks = xr.chunks_exact(8);
            for c in &mut chunks {
                for j in 0..8 {
                    lanes[j] += c[j] * c[j];
                }
            }
            let [a0, a1, a2, a3, a4, a5, a6, a7] = lanes;
            let mut sum = ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7));
            for &v in chunks.remainder() {
                sum += v * v;
            }
            let inv = 1.0 / (sum / d as f32 + eps).sqrt();
            for ((o, &v), &s) in yr.iter_mut().zip(xr).zip(w) {
                *o = (v * inv) * s;
            }
        }
    }

    /// See [`super::swiglu`]: in 512-bit vectors where the products take sixteen lanes
    /// ([`crate::model::few_rows`]); each output is computed alone, so the same bits in
    /// either width.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    pub(super) unsafe fn swiglu(x: &[f32], y: &mut [f32], i: usize) {
        // SAFETY: AVX2 and FMA as this function's; AVX-512F and VL where the products take
        // sixteen lanes.
        unsafe { if crate::model::few_rows::sixteen_lanes() { swiglu16(x, y, i) } else { swiglu8(x, y, i) } }
    }

    /// [`swiglu`] in 256-bit vectors.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn swiglu8(x: &[f32], y: &mut [f32], i: usize) {
        swiglu_rows(x, y, i)
    }

    /// [`swiglu`] in 512-bit vectors.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512F and VL are available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn swiglu16(x: &[f32], y: &mut [f32], i: usize) {
        swiglu_rows(x, y, i)
    }

    /// [`swiglu`]'s loop, compiled into each width's function.
    #[inline(always)]
    fn swiglu_rows(x: &[f32], y: &mut [f32], i: usize) {
        for (gu, o) in x.chunks_exact(2 * i).zip(y.chunks_exact_mut(i)) {
            let (gate, up) = gu.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        }
    }

    /// See [`super::silu_in_place`]: SwiGLU's `silu`, without its `up`.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu(x: &mut [f32]) {
        for v in x {
            *v = *v / (1.0 + exp(-*v));
        }
    }

    /// One token's heads rotated: `row` holds heads of `hd` values; `c`, `s` are `hd`.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rotate(row: &[f32], c: &[f32], s: &[f32], y: &mut [f32], hd: usize) {
        let half = hd / 2;
        let ((c1, c2), (s1, s2)) = (c.split_at(half), s.split_at(half));
        // Each half: itself times its cos plus the other half times its signed sin.
        let half_turn = |o: &mut [f32], own: &[f32], other: &[f32], c: &[f32], s: &[f32]| {
            for ((o, (&a, &b)), (&c, &s)) in o.iter_mut().zip(own.iter().zip(other)).zip(c.iter().zip(s)) {
                *o = a * c + b * s;
            }
        };
        for (head, out) in row.chunks_exact(hd).zip(y.chunks_exact_mut(hd)) {
            let (x1, x2) = head.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            half_turn(o1, x1, x2, c1, s1);
            half_turn(o2, x2, x1, c2, s2);
        }
    }

    /// `e^x` for f32, within two units in the last place over the range where it is a
    /// normal float (inputs outside it are clamped to its ends): `x = n ln 2 + r` with `n`
    /// the nearest integer, `e^r` by the minimax polynomial of the Cephes library's `expf`,
    /// scaled by `2^n` built from its bits. Branch-free, so that loops over it vectorize.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        // Rounding to the nearest integer by adding and subtracting 1.5 * 2^23.
        const ROUND: f32 = 12_582_912.0;
        let x = x.clamp(-87.3, 88.3);
        let shifted = x * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        // ln 2 in two parts: the first exact in few bits, so `n * LN2_HI` is exact.
        let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let e_r = p * (r * r) + r + 1.0;
        // The integer sits in the low mantissa bits of `shifted`, offset by 2^22.
        let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
        e_r * f32::from_bits(((n_int + 127) << 23) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        ((a - b).abs() / (b.abs() + 1e-30)).max().double_value(&[])
    }

    /// The polynomial exponential stays within two units in the last place of the exact one
    /// (f64) from where `e^x` stops being a normal float to where it overflows.
    #[test]
    fn exp_is_within_two_ulps() {
        if !super::super::few_rows::available() {
            return;
        }
        let mut worst = 0f64;
        for k in -87_000..=88_000 {
            let x = k as f32 * 1e-3 + 1.7e-4;
            let exact = (x as f64).exp();
            let ulp = f64::from(f32::from_bits((exact as f32).to_bits() + 1) - exact as f32);
            worst = worst.max((f64::from(kernels::exp(x)) - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(kernels::exp(0.0), 1.0);
        assert!(kernels::exp(-1000.0) > 0.0 && kernels::exp(-1000.0) < 1.5e-38);
        assert!(kernels::exp(1000.0).is_finite());
    }

    /// RMSNorm within a rounding or two of libtorch's (widths with and without a
    /// remainder after the eight lanes), and each row the same bits alone as among others.
    #[test]
    fn rms_norm_matches_libtorch_and_rows_are_independent() {
        if !super::super::few_rows::available() {
            return;
        }
        tch::manual_seed(5);
        for d in [64i64, 67, 576] {
            let x = Tensor::randn([3, 25, d], (Kind::Float, Device::Cpu)) * 3.0;
            let w = Tensor::randn([d], (Kind::Float, Device::Cpu));
            let ours = rms_norm(&x, &w, 1e-5).expect("taken");
            let theirs = super::super::norm::RmsNorm::new(w.shallow_clone(), 1e-5).forward_tensor_ops(&x);
            let diff = (&ours - &theirs).abs().max().double_value(&[]);
            let scale = theirs.abs().max().double_value(&[]);
            assert!(diff <= 4.0 * f64::from(f32::EPSILON) * scale, "d {d}: {diff} of {scale}");
            let alone = rms_norm(&x.narrow(0, 1, 1).narrow(1, 7, 1).contiguous(), &w, 1e-5).expect("taken");
            assert!(alone.equal(&ours.narrow(0, 1, 1).narrow(1, 7, 1)), "d {d}");
        }
    }

    /// `silu(gate) * up` within a few roundings of libtorch's over values from -100 to
    /// 100 (zeros included), each row the same bits alone, and the same bits from one
    /// thread as from a team of two (a width whose 25 rows are shared out, and one whose
    /// are not).
    #[test]
    fn swiglu_matches_libtorch_and_rows_are_independent() {
        if !super::super::few_rows::available() {
            return;
        }
        tch::manual_seed(6);
        for i in [172, 704] {
            let gate_up = Tensor::randn([1, 25, 2 * i], (Kind::Float, Device::Cpu)) * 4.0;
            let ramp = Tensor::linspace(-100.0, 100.0, i, (Kind::Float, Device::Cpu));
            gate_up.narrow(1, 0, 1).narrow(2, 0, i).copy_(&ramp);
            let _ = gate_up.narrow(1, 1, 1).narrow(2, 0, 8).fill_(0.0);
            let ours = swiglu(&gate_up, i).expect("taken");
            let theirs = super::super::mlp::swiglu_tensor_ops(&gate_up, i);
            let nonzero = theirs.abs().gt(1e-30);
            let rel = max_rel(&ours.masked_select(&nonzero), &theirs.masked_select(&nonzero));
            assert!(rel <= 4.0 * f64::from(f32::EPSILON), "width {i}: {rel}");
            assert!(ours.masked_select(&nonzero.logical_not()).abs().max().double_value(&[]) < 1e-30);
            let alone = swiglu(&gate_up.narrow(1, 9, 1).contiguous(), i).expect("taken");
            assert!(alone.equal(&ours.narrow(1, 9, 1)), "width {i}: a row alone differs");
            for team in [1, 2] {
                let again = super::super::few_rows::tests::in_team(team, || swiglu(&gate_up, i)).expect("taken");
                assert!(again.equal(&ours), "width {i}: a team of {team} differs");
            }
        }
    }

    /// The rotation of q and k narrowed from a q/k/v projection equals libtorch's
    /// operations bit for bit, with tables for one sequence or for each of two.
    #[test]
    fn rope_equals_libtorch_bit_for_bit() {
        if !super::super::few_rows::available() {
            return;
        }
        tch::manual_seed(7);
        let (b, t, h, kv, hd) = (2i64, 25, 4, 2, 16);
        let qkv = Tensor::randn([b, t, h + 2 * kv, hd], (Kind::Float, Device::Cpu));
        let x = qkv.narrow(2, 0, h + kv);
        for tables_b in [1, b] {
            let tables = super::super::rope::RopeTables {
                cos: Tensor::randn([tables_b, t, 1, hd], (Kind::Float, Device::Cpu)),
                sin_signed: Tensor::randn([tables_b, t, 1, hd], (Kind::Float, Device::Cpu)),
            };
            let theirs = tables.apply_tensor_ops(&x);
            let ours = rope(&x, &tables.cos, &tables.sin_signed).expect("taken");
            assert!(ours.equal(&theirs), "tables for {tables_b} sequences");
        }
    }

    /// A residual addition equals libtorch's bit for bit, for one row and a step's rows; it
    /// leaves mismatched shapes and strided inputs to libtorch.
    #[test]
    fn add_equals_libtorch_bit_for_bit() {
        if !super::super::few_rows::available() {
            return;
        }
        tch::manual_seed(11);
        let o = (Kind::Float, Device::Cpu);
        for t in [1i64, 25] {
            let (a, b) = (Tensor::randn([1, t, 64], o), Tensor::randn([1, t, 64], o) * 1e3);
            assert!(add(&a, &b).expect("taken").equal(&(&a + &b)), "{t} rows");
        }
        let a = Tensor::randn([1, 9, 64], o);
        assert!(add(&a, &Tensor::randn([1, 9, 32], o)).is_none());
        assert!(add(&a, &Tensor::randn([1, 64, 9], o).transpose(1, 2)).is_none());
        assert!(add(&a, &a.view([9, 64])).is_none(), "same values, another shape");
    }

    /// Rows written into a cache buffer equal `narrow(..).copy_(..)` bit for bit, from a
    /// transposed view (as a pass's keys are), in f32 and bf16, at the buffer's start and
    /// further on, leaving every other position untouched; a dtype that differs from the
    /// buffer's, or a write past its end, is left to libtorch.
    #[test]
    fn written_rows_equal_narrow_copy() {
        tch::manual_seed(12);
        for kind in [Kind::Float, Kind::BFloat16] {
            let o = (kind, Device::Cpu);
            for (t, at) in [(1i64, 0i64), (1, 37), (25, 10)] {
                let base = Tensor::randn([2, 3, 64, 16], o);
                // [b, t, heads, hd] transposed to [b, heads, t, hd], as attention hands them.
                let src = Tensor::randn([2, t, 5, 16], o).narrow(2, 1, 3).transpose(1, 2);
                let (ours, theirs) = (base.copy(), base.copy());
                assert!(write_rows(&ours, &src, at), "{kind:?}, {t} rows at {at}");
                theirs.narrow(2, at, t).copy_(&src);
                assert!(ours.equal(&theirs), "{kind:?}, {t} rows at {at}");
            }
            let buffer = Tensor::zeros([1, 2, 8, 16], o);
            assert!(!write_rows(&buffer, &Tensor::ones([1, 2, 2, 16], o), 7), "past the end");
            assert!(buffer.equal(&Tensor::zeros([1, 2, 8, 16], o)), "nothing written");
        }
        let buffer = Tensor::zeros([1, 2, 8, 16], (Kind::Float, Device::Cpu));
        assert!(!write_rows(&buffer, &Tensor::ones([1, 2, 1, 16], (Kind::BFloat16, Device::Cpu)), 0));
    }

    /// What the loops leave to libtorch: a gradient, another dtype, a strided RMSNorm
    /// input, a prefill's rows.
    #[test]
    fn leaves_what_it_does_not_take() {
        let w = Tensor::ones([64], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 64], (Kind::Float, Device::Cpu));
        assert!(rms_norm(&x.copy().set_requires_grad(true), &w, 1e-5).is_none());
        assert!(rms_norm(&x.to_kind(Kind::BFloat16), &w, 1e-5).is_none());
        assert!(rms_norm(&Tensor::randn([64, 2], (Kind::Float, Device::Cpu)).t_(), &w, 1e-5).is_none());
        assert!(rms_norm(&Tensor::randn([MAX_ROWS + 1, 64], (Kind::Float, Device::Cpu)), &w, 1e-5).is_none());
        assert!(swiglu(&x, 31).is_none());
    }

    /// `silu_in_place` is SwiGLU's loop with every `up` 1, bit for bit, and within two
    /// units in the last place of libtorch's `silu`.
    #[test]
    fn silu_in_place_is_swiglu_without_up() {
        if !super::super::few_rows::available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([300], o) * 4.0;
        let mut got = Vec::<f32>::try_from(&x).unwrap_or_default();
        assert!(silu_in_place(&mut got));
        let gate_up = Tensor::cat(&[x.view([1, 300]), Tensor::ones([1, 300], o)], 1);
        let want = Vec::<f32>::try_from(swiglu(&gate_up, 300).expect("taken").view([-1])).unwrap_or_default();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(max_rel(&Tensor::from_slice(&got), &x.silu()) < 3e-7);
    }

    /// Gathered rows are libtorch's `embedding` (and `cat` with a tail) bit for bit, in
    /// the ids' shape; ids outside the table, too many ids, a table with a gradient or of
    /// another dtype, and a tail of another width are left to libtorch.
    #[test]
    fn gathered_rows_equal_embedding() {
        if !super::super::few_rows::available() {
            return;
        }
        let o = (Kind::Float, Device::Cpu);
        let table = Tensor::randn([50, 24], o);
        let ids = Tensor::from_slice(&[3i64, 49, 0, 3, 17]);
        let tail = Tensor::randn([1, 4, 24], o);
        let bits = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).unwrap_or_default();
        for ids in [ids.shallow_clone(), ids.view([1, 5])] {
            let want = Tensor::embedding(&table, &ids, -1, false, false);
            let got = gather_rows(&table, &ids, None).expect("taken");
            assert_eq!(got.size(), want.size());
            assert_eq!(bits(&got), bits(&want));
        }
        let want = Tensor::cat(&[Tensor::embedding(&table, &ids.unsqueeze(0), -1, false, false), tail.copy()], 1);
        let got = gather_rows(&table, &ids, Some(&tail)).expect("taken");
        assert_eq!(got.size(), [1, 9, 24]);
        assert_eq!(bits(&got), bits(&want));
        assert!(gather_rows(&table, &Tensor::from_slice(&[2i64, 50]), None).is_none());
        assert!(gather_rows(&table, &Tensor::from_slice(&[-1i64]), None).is_none());
        assert!(gather_rows(&table, &Tensor::zeros([MAX_ROWS + 1], (Kind::Int64, Device::Cpu)), None).is_none());
        assert!(gather_rows(&table.copy().set_requires_grad(true), &ids, None).is_none());
        assert!(gather_rows(&table.to_kind(Kind::BFloat16), &ids, None).is_none());
        assert!(gather_rows(&table, &ids, Some(&Tensor::randn([1, 4, 23], o))).is_none());
        // Padding on the left: libtorch's `constant_pad_nd`.
        let own = Tensor::randn([9, 9], o);
        for left in [0, 1, 100] {
            let got = pad_left(&own, left).expect("taken");
            assert_eq!(bits(&got), bits(&own.constant_pad_nd([left as i64, 0])), "{left}");
            assert_eq!(got.size(), [9, 9 + left as i64]);
        }
        assert!(pad_left(&own.t_copy().transpose(0, 1), 1).is_none());
        assert!(pad_left(&own.view([1, 9, 9]), 1).is_none());
        // A step without mask rows: an empty tail.
        let got = gather_rows(&table, &ids, Some(&Tensor::zeros([1, 0, 24], o))).expect("taken");
        assert_eq!(got.size(), [1, 5, 24]);
        assert_eq!(bits(&got), bits(&Tensor::embedding(&table, &ids, -1, false, false)));
    }
}
