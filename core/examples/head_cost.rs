//! scratch: layer products, three ways, rows 1..25, weights of a whole model
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn main() {
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, Device::Cpu);
    let which = std::env::args().nth(1).unwrap_or("smol".into());
    let (d, qkv, gu, i, l) =
        if which == "smol" { (576i64, 960i64, 3072i64, 1536i64, 30) } else { (256, 512, 1408, 704, 6) };
    let shapes = [(qkv, d), (d, d), (gu, d), (d, i)];
    let ws: Vec<Vec<(Tensor, Tensor)>> = (0..l)
        .map(|_| {
            shapes
                .iter()
                .map(|&(o_, k)| {
                    let w = Tensor::randn([o_, k], o);
                    let wt = w.tr().contiguous();
                    (w, wt)
                })
                .collect()
        })
        .collect();
    for rows in [1i64, 2, 4, 5, 9, 16, 25] {
        let xs: Vec<Tensor> = shapes.iter().map(|&(_, k)| Tensor::randn([rows, k], o)).collect();
        let forms = ["linear()", "x.linear", "x.mm(Wt)"];
        let mut times = vec![vec![]; 3];
        for _ in 0..9 {
            for f in 0..3 {
                let t = Instant::now();
                for layer in &ws {
                    for ((w, wt), x) in layer.iter().zip(&xs) {
                        let _ = match f {
                            0 => mtp_core::model::linear::linear(x, w, None),
                            1 => x.linear::<Tensor>(w, None),
                            _ => x.mm(wt),
                        };
                    }
                }
                times[f].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let med: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t[4]
            })
            .collect();
        println!(
            "{which} rows {rows:2}: {}",
            forms.iter().zip(&med).map(|(f, m)| format!("{f} {m:7.2} ms")).collect::<Vec<_>>().join("  ")
        );
    }
}
