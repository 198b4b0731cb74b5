//! The int8 product of a decoding step's mask rows (`model::int8::product_tail`) with its
//! mask rows through AMX tiles against `vpdpbusd`, in turns in one process: the proxy's,
//! the demo's and SmolLM2-135M's layer shapes, a 4-mask quadratic step's 25 rows (5
//! next-token rows in f32) and the mask rows alone (20, 16, 6, 5), one thread and two; the
//! fastest of 50 rounds of 100 calls, microseconds a call. Where the tiles do not run, the
//! first two columns are `vpdpbusd`'s, or without AVX-512 VNNI AVX2's `vpmaddubsw`; the
//! third takes short panels (`Int8Panels::of(w, true)`: AVX2's pair tiles where they run,
//! else the same as the second).
//! `cargo run --release -p mtp-core --example int8_tiles`
use std::time::Instant;

use mtp_core::model::int8::{self, Int8Panels};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let o = (Kind::Float, Device::Cpu);
    let _g = tch::no_grad_guard();
    if !int8::available() {
        anyhow::bail!("this CPU does not run the int8 tiles (AVX2 and FMA)");
    }
    println!("AMX tiles run here: {}", int8::amx_available());
    println!(
        "{:>7} {:>11} {:>5} {:>6} {:>9} {:>9} {:>9}",
        "threads", "weight", "rows", "start", "AMX us", "VNNI us", "short us"
    );
    let shapes = [
        (344, 64, 25, 5),
        (64, 172, 25, 5),
        (344, 64, 20, 0),
        (1408, 256, 25, 5),
        (512, 256, 25, 5),
        (256, 704, 25, 5),
        (1728, 576, 25, 5),
        (576, 1536, 25, 5),
        (1728, 576, 20, 0),
        (1728, 576, 16, 0),
        (1728, 576, 6, 0),
        (1728, 576, 5, 0),
    ];
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        for (out, inp, rows, start) in shapes {
            let w = Tensor::randn([out, inp], o) * 0.05;
            let x = Tensor::randn([rows, inp], o);
            let full = Int8Panels::of(&w, false).ok_or_else(|| anyhow::anyhow!("no panels"))?;
            let short = Int8Panels::of(&w, true).ok_or_else(|| anyhow::anyhow!("no panels"))?;
            let mut best = [f64::MAX; 3];
            for _ in 0..50 {
                for (i, (amx, panels)) in [(true, &full), (false, &full), (false, &short)].into_iter().enumerate() {
                    int8::use_amx(amx);
                    let t = Instant::now();
                    for _ in 0..100 {
                        let _ = int8::product_tail(&x, &w, None, panels, start)
                            .ok_or_else(|| anyhow::anyhow!("declined"))?;
                    }
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e6 / 100.0);
                }
            }
            int8::use_amx(true);
            println!(
                "{threads:>7} {:>11} {rows:>5} {start:>6} {:>9.2} {:>9.2} {:>9.2}",
                format!("{out}x{inp}"),
                best[0],
                best[1],
                best[2]
            );
        }
    }
    Ok(())
}
