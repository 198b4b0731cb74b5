//! Two layouts for the CPU's few-row products, measured on every layer's weights of the
//! SmolLM2-135M shape (30 layers, fresh weights per layer so that they come from memory as
//! in decoding): today's kernel (`model::few_rows`: the weight as stored, `[out, in]`, dot
//! products of four weight rows by three input rows) against the weight stored once more as
//! panels of 16 output columns (`[out / 16, in, 16]`), multiplied five input rows by 16
//! columns at a time with the input broadcast. A standalone prototype without libtorch,
//! for docs/BENCHMARKS.md ("What bounds a 4-mask step on this CPU"). It carries its own copy
//! of today's dot form so that both forms run on the same helper thread: the library's
//! kernel on libtorch's OpenMP team beside this prototype's spinning thread measured 2 to 4
//! times slower than either alone (the two spin against each other on two cores).
//! `cargo run --release -p mtp-core --example panel_layout [THREADS: 1 or 2]`
// Raw pointers and SIMD intrinsics, as in `model::few_rows`.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    /// The eight lanes summed.
    #[target_feature(enable = "avx2,fma")]
    fn lanes_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Operands of one product: `y[rows, out] = x[rows, inp] W^T`, columns `o0..o1`.
    #[derive(Clone, Copy)]
    pub struct Job {
        pub x: *const f32,
        pub w: *const f32,
        pub y: *mut f32,
        pub rows: usize,
        pub inp: usize,
        pub out: usize,
    }

    /// Outputs `r..r + NR` x `o..o + NO` in the dot form (`w`: `[out, in]`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_tile<const NO: usize, const NR: usize>(j: &Job, o: usize, r: usize) {
        let n = j.inp;
        let mut acc = [[_mm256_setzero_ps(); NR]; NO];
        let mut k = 0;
        while k + 8 <= n {
            let mut xs = [_mm256_setzero_ps(); NR];
            for (i, x) in xs.iter_mut().enumerate() {
                *x = unsafe { _mm256_loadu_ps(j.x.add((r + i) * n + k)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = unsafe { _mm256_loadu_ps(j.w.add((o + i) * n + k)) };
                for (a, x) in row.iter_mut().zip(&xs) {
                    *a = _mm256_fmadd_ps(w, *x, *a);
                }
            }
            k += 8;
        }
        for (i, row) in acc.iter().enumerate() {
            for (q, a) in row.iter().enumerate() {
                unsafe { *j.y.add((r + q) * j.out + o + i) = lanes_sum(*a) };
            }
        }
    }

    /// Columns `o0..o1` (multiples of four) in the dot form.
    ///
    /// # Safety
    /// AVX2 and FMA are available; the pointers cover the job's sizes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(j: &Job, o0: usize, o1: usize) {
        let mut o = o0;
        while o + 4 <= o1 {
            let mut r = 0;
            while r + 3 <= j.rows {
                unsafe { dot_tile::<4, 3>(j, o, r) };
                r += 3;
            }
            match j.rows - r {
                2 => unsafe { dot_tile::<4, 2>(j, o, r) },
                1 => unsafe { dot_tile::<4, 1>(j, o, r) },
                _ => {}
            }
            o += 4;
        }
    }

    /// Outputs `r..r + R` x `o..o + 16` in the panel form (`w`: `[out / 16, in, 16]`), each
    /// output summed over the input in order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn panel_tile<const R: usize>(j: &Job, o: usize, r: usize) {
        let n = j.inp;
        let panel = unsafe { j.w.add(o * n) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in 0..n {
            let w = unsafe { [_mm256_loadu_ps(panel.add(k * 16)), _mm256_loadu_ps(panel.add(k * 16 + 8))] };
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(unsafe { *j.x.add((r + i) * n + k) });
                a[0] = _mm256_fmadd_ps(b, w[0], a[0]);
                a[1] = _mm256_fmadd_ps(b, w[1], a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let y = unsafe { j.y.add((r + i) * j.out + o) };
            unsafe {
                _mm256_storeu_ps(y, a[0]);
                _mm256_storeu_ps(y.add(8), a[1]);
            }
        }
    }

    /// Columns `o0..o1` (multiples of 16) in the panel form, five rows at a time.
    ///
    /// # Safety
    /// AVX2 and FMA are available; the pointers cover the job's sizes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel(j: &Job, o0: usize, o1: usize) {
        let mut o = o0;
        while o + 16 <= o1 {
            let mut r = 0;
            while r < j.rows {
                let take = (j.rows - r).min(5);
                match take {
                    5 => unsafe { panel_tile::<5>(j, o, r) },
                    4 => unsafe { panel_tile::<4>(j, o, r) },
                    3 => unsafe { panel_tile::<3>(j, o, r) },
                    2 => unsafe { panel_tile::<2>(j, o, r) },
                    _ => unsafe { panel_tile::<1>(j, o, r) },
                }
                r += take;
            }
            o += 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod pool {
    //! One spinning helper thread: the second half of every product's columns.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    use super::kernels::Job;

    pub type Kernel = unsafe fn(&Job, usize, usize);

    struct Work {
        kernel: Kernel,
        job: Job,
        o0: usize,
        o1: usize,
    }
    // SAFETY: the pointers are read by the helper only while `run` waits for it.
    unsafe impl Send for Work {}

    static POSTED: AtomicUsize = AtomicUsize::new(0);
    static DONE: AtomicUsize = AtomicUsize::new(0);
    static WORK: Mutex<Option<Work>> = Mutex::new(None);
    static HELPER: OnceLock<()> = OnceLock::new();

    fn helper() {
        let mut seen = 0;
        loop {
            while POSTED.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
            }
            seen = POSTED.load(Ordering::Acquire);
            if let Some(w) = WORK.lock().expect("work").take() {
                // SAFETY: as `run`'s caller promised for the job.
                unsafe { (w.kernel)(&w.job, w.o0, w.o1) };
            }
            DONE.store(seen, Ordering::Release);
        }
    }

    /// Columns split in two at a multiple of 16: the helper takes the second half.
    ///
    /// # Safety
    /// As `kernel`'s.
    pub unsafe fn run(kernel: Kernel, job: Job) {
        HELPER.get_or_init(|| {
            std::thread::spawn(helper);
        });
        let half = (job.out / 2).div_ceil(16) * 16;
        *WORK.lock().expect("work") = Some(Work { kernel, job, o0: half, o1: job.out });
        let n = POSTED.fetch_add(1, Ordering::AcqRel) + 1;
        unsafe { kernel(&job, 0, half) };
        while DONE.load(Ordering::Acquire) != n {
            std::hint::spin_loop();
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::time::Instant;

    use kernels::Job;

    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        println!("this CPU has no AVX2 and FMA");
        return;
    }
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().expect("THREADS: 1 or 2"));
    // (in, out) of each layer's products: q/k/v, o, gate/up, down.
    let shapes = [(576usize, 960usize), (576, 576), (576, 3072), (1536, 576)];
    let layers = 30;
    let value = |i: usize| ((i.wrapping_mul(2_654_435_761)) % 1000) as f32 * 1e-3 - 0.5;
    let mut weights = Vec::new();
    for _ in 0..layers {
        for &(inp, out) in &shapes {
            let w: Vec<f32> = (0..inp * out).map(value).collect();
            let mut p = vec![0f32; inp * out];
            for o in 0..out {
                for k in 0..inp {
                    p[(o / 16) * 16 * inp + k * 16 + o % 16] = w[o * inp + k];
                }
            }
            weights.push((w, p));
        }
    }
    let flop_per_row: f64 = 2.0 * layers as f64 * shapes.iter().map(|&(i, o)| (i * o) as f64).sum::<f64>();
    println!("SmolLM2-135M shape, every layer's products, {threads} thread(s), ms (best of 5, the forms in turns)");
    for rows in [1usize, 4, 9, 16, 25] {
        let xs: Vec<Vec<f32>> =
            shapes.iter().map(|&(inp, _)| (0..rows * inp).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect()).collect();
        let mut ys: Vec<[Vec<f32>; 2]> =
            shapes.iter().map(|&(_, out)| [vec![0f32; rows * out], vec![0f32; rows * out]]).collect();
        let mut best = [f64::MAX; 2];
        for _ in 0..5 {
            for (form, best) in best.iter_mut().enumerate() {
                let t = Instant::now();
                for layer in 0..layers {
                    for (s, &(inp, out)) in shapes.iter().enumerate() {
                        let (w, p) = &weights[layer * shapes.len() + s];
                        let job = Job {
                            x: xs[s].as_ptr(),
                            w: if form == 0 { w.as_ptr() } else { p.as_ptr() },
                            y: ys[s][form].as_mut_ptr(),
                            rows,
                            inp,
                            out,
                        };
                        let kernel: pool::Kernel = if form == 0 { kernels::dot } else { kernels::panel };
                        // SAFETY: AVX2 and FMA checked above; the buffers match the sizes.
                        unsafe { if threads > 1 { pool::run(kernel, job) } else { kernel(&job, 0, out) } }
                    }
                }
                *best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        // Both forms compute the same products (to f32 rounding: the sums run in other orders).
        for (s, [a, b]) in ys.iter().enumerate() {
            let diff = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-2 * shapes[s].0 as f32, "the forms disagree by {diff}");
        }
        let gflops = |ms: f64| rows as f64 * flop_per_row / ms / 1e6;
        println!(
            "rows {rows:2}: [out, in] dot form {:6.1} ({:5.1} GFLOP/s)   panels of 16 columns {:6.1} ({:5.1} GFLOP/s)",
            best[0],
            gflops(best[0]),
            best[1],
            gflops(best[1])
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only");
}
