//! How fast one row (or a few) goes through a weight matrix in the forms libtorch offers,
//! on this CPU: the layer products of a model shape (every layer's own weights, so that they
//! come from memory as in decoding) and a draft head's one-row product. The forms are timed
//! in turns, round after round; the median counts.
//! `cargo run --release -p mtp-core --example product_forms [demo|smollm2]`
mod common;

use tch::{Device, Kind, Tensor};

fn main() {
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, Device::Cpu);
    let shape = std::env::args().nth(1).unwrap_or_else(|| "smollm2".into());
    // (width, q/k/v rows, gate/up rows, intermediate, layers, draft vocabulary)
    let (d, qkv, gu, i, layers, vocab) =
        if shape == "demo" { (256, 512, 1408, 704, 6, 1024) } else { (576, 960, 3072, 1536, 30, 4096) };
    let shapes = [(qkv, d), (d, d), (gu, d), (d, i)];
    let weights: Vec<Vec<(Tensor, Tensor)>> = (0..layers)
        .map(|_| {
            shapes
                .iter()
                .map(|&(out, inp)| {
                    let w = Tensor::randn([out, inp], o);
                    let wt = w.tr().contiguous();
                    (w, wt)
                })
                .collect()
        })
        .collect();
    println!("{shape}: every layer's products, ms (median of 9 interleaved rounds)");
    for rows in [1i64, 2, 4, 9, 16, 25] {
        let xs: Vec<Tensor> = shapes.iter().map(|&(_, inp)| Tensor::randn([rows, inp], o)).collect();
        let run = |form: usize| {
            for layer in &weights {
                for ((w, wt), x) in layer.iter().zip(&xs) {
                    let _ = match form {
                        0 => mtp_core::model::linear::linear(x, w, None),
                        1 => x.linear::<Tensor>(w, None),
                        _ => x.mm(wt),
                    };
                }
            }
        };
        let med = common::medians(&[&|| run(0), &|| run(1), &|| run(2)], 9);
        println!(
            "rows {rows:2}: model::linear {:7.2}  x.linear(W) {:7.2}  x.mm(W^T contiguous) {:7.2}",
            med[0], med[1], med[2]
        );
    }
    let head = Tensor::randn([vocab, d], o);
    let head_t = head.tr().contiguous();
    let x = Tensor::randn([1, d], o);
    let calls = |f: &dyn Fn() -> Tensor| {
        for _ in 0..30 {
            let _ = f();
        }
    };
    let med = common::medians(
        &[
            &|| calls(&|| mtp_core::model::linear::linear(&x, &head, None)),
            &|| calls(&|| x.linear::<Tensor>(&head, None)),
            &|| calls(&|| x.mm(&head_t)),
        ],
        15,
    );
    println!(
        "draft head {vocab}x{d}, one row, us per call: model::linear {:.1}  x.linear(W) {:.1}  x.mm(W^T contiguous) {:.1}",
        med[0] * 1e3 / 30.0,
        med[1] * 1e3 / 30.0,
        med[2] * 1e3 / 30.0
    );
}
