//! A bf16 model's products on this CPU: every SmolLM2-135M layer's four products (each
//! layer its own weights, so they come from memory as in decoding) at 1, 4, 9 and 25 rows,
//! through our kernel with every row widened to f32 (what decoding runs), through it with
//! the rows after the first fifth in bf16 pairs (`--draft-arithmetic bf16`), through
//! libtorch, the first fifth through ours and the rest through libtorch, and through our
//! kernel in f32. The forms in turns, 15 rounds; medians in ms (docs/BENCHMARKS.md, "bf16
//! models on the CPU").
//! `cargo run --release -p mtp-core --example bf16_products`
use mtp_core::model::few_rows;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() {
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, Device::Cpu);
    let (d, qkv, gu, i, layers) = (576, 960, 3072, 1536, 30);
    let shapes = [(qkv, d), (d, d), (gu, d), (d, i)];
    let w32: Vec<Vec<Tensor>> =
        (0..layers).map(|_| shapes.iter().map(|&(out, inp)| Tensor::randn([out, inp], o) * 0.05).collect()).collect();
    let w16: Vec<Vec<Tensor>> = w32.iter().map(|l| l.iter().map(|w| w.to_kind(Kind::BFloat16)).collect()).collect();
    for rows in [1i64, 4, 9, 25] {
        let xs32: Vec<Tensor> = shapes.iter().map(|&(_, inp)| Tensor::randn([rows, inp], o)).collect();
        let xs16: Vec<Tensor> = xs32.iter().map(|x| x.to_kind(Kind::BFloat16)).collect();
        let start = (rows / 5).max(1);
        let mut t = vec![Vec::new(); 5];
        for _ in 0..15 {
            for form in 0..5 {
                let now = Instant::now();
                for l in 0..layers {
                    for (j, _) in shapes.iter().enumerate() {
                        let _y = match form {
                            0 => few_rows::product(&xs16[j], &w16[l][j], None).expect("our kernel takes it"),
                            1 => few_rows::product_bf16_tail(&xs16[j], &w16[l][j], None, start)
                                .expect("our kernel takes it"),
                            2 => xs16[j].linear::<Tensor>(&w16[l][j], None),
                            4 => {
                                let h = few_rows::product(&xs16[j].narrow(0, 0, start), &w16[l][j], None)
                                    .expect("our kernel takes it");
                                let t = xs16[j].narrow(0, start, rows - start).linear::<Tensor>(&w16[l][j], None);
                                Tensor::cat(&[h, t], 0)
                            }
                            _ => few_rows::product(&xs32[j], &w32[l][j], None).expect("our kernel takes it"),
                        };
                    }
                }
                t[form].push(now.elapsed().as_secs_f64() * 1e3);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{rows} rows: bf16 exact {:.2}  bf16 pairs {:.2}  libtorch bf16 {:.2}  f32 ours {:.2}  split {:.2}",
            med(&mut t[0]),
            med(&mut t[1]),
            med(&mut t[2]),
            med(&mut t[3]),
            med(&mut t[4])
        );
    }
}
