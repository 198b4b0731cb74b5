//! What the adapter's low-rank term adds to a decoding step's products on the CPU, every
//! layer's groups of the SmolLM2-135M shape (or the demo's) at rank 16 (each layer's own
//! weights and factors, so that they come from memory or L3 as in decoding): the base
//! products alone, the term read as one block-diagonal `B` (its zero blocks included: the
//! layout before the term went part by part), the term part by part (what decoding runs),
//! a rank-1 term (what a term costs beyond its factors: the intermediate's pass and the
//! barrier), the mask rows in bf16, and the two kinds of rows of that product apart (the
//! next-token rows alone, exact; the mask rows alone with their term, bf16). The forms are
//! timed in turns, round after round; medians in milliseconds.
//! `cargo run --release -p mtp-core --example term_parts [smollm2|demo]`
mod common;

use mtp_core::model::few_rows::{self, TailTerm, TermPart};
use tch::{Device, Kind, Tensor};

/// One projection group of one layer: the base weight, the stacked A factors, the
/// block-diagonal `B^T`, the parts' `B^T` and a rank-1 term.
struct Group {
    w: Tensor,
    a: Tensor,
    block: Tensor,
    compact: Tensor,
    a1: Tensor,
    b1: Tensor,
}

/// The term's layouts compared.
#[derive(Clone, Copy)]
enum Form {
    /// One block-diagonal `B`, its zero blocks read.
    Block,
    /// Part by part (what decoding runs).
    ByPart,
    /// Rank 1.
    Rank1,
}

fn main() {
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, Device::Cpu);
    let r = 16;
    // (name, layers, width, key/value width, MLP width).
    let (name, num_layers, d, kv, i) = match std::env::args().nth(1).as_deref() {
        Some("demo") => ("demo", 6, 256, 128, 704),
        _ => ("SmolLM2-135M", 30, 576, 192, 1536),
    };
    // (input width, each part's output width): q/k/v, o, gate/up, down.
    let shapes: [(i64, Vec<i64>); 4] = [(d, vec![d, kv, kv]), (d, vec![d]), (d, vec![i, i]), (i, vec![d])];
    let parts: Vec<Vec<TermPart>> = shapes
        .iter()
        .map(|(_, outs)| {
            let mut start = 0;
            outs.iter()
                .enumerate()
                .map(|(i, &n)| {
                    let cols = start..start + n as usize;
                    start += n as usize;
                    TermPart { cols, rank_offset: i * r as usize }
                })
                .collect()
        })
        .collect();
    let dense: Vec<Vec<TermPart>> = shapes
        .iter()
        .map(|(_, outs)| vec![TermPart { cols: 0..outs.iter().sum::<i64>() as usize, rank_offset: 0 }])
        .collect();
    let rank1: Vec<Vec<TermPart>> = parts
        .iter()
        .map(|ps| ps.iter().enumerate().map(|(i, p)| TermPart { cols: p.cols.clone(), rank_offset: i }).collect())
        .collect();
    let layers: Vec<Vec<Group>> = (0..num_layers)
        .map(|_| {
            shapes
                .iter()
                .zip(&parts)
                .map(|((inp, outs), ps)| {
                    let (out, n) = (outs.iter().sum::<i64>(), outs.len() as i64);
                    let compact = Tensor::randn([r, out], o);
                    let block = Tensor::zeros([n * r, out], o);
                    for p in ps {
                        let (c0, len) = (p.cols.start as i64, p.cols.len() as i64);
                        block.narrow(0, p.rank_offset as i64, r).narrow(1, c0, len).copy_(&compact.narrow(1, c0, len));
                    }
                    Group {
                        w: Tensor::randn([out, *inp], o),
                        a: Tensor::randn([n * r, *inp], o),
                        block,
                        compact,
                        a1: Tensor::randn([n, *inp], o),
                        b1: Tensor::randn([1, out], o),
                    }
                })
                .collect()
        })
        .collect();
    println!("{name} shape, rank 16: every layer's products, ms (median of 15 interleaved rounds)");
    for (rows, start) in [(4i64, 2i64), (9, 3), (25, 5)] {
        let xs: Vec<Tensor> = shapes.iter().map(|(inp, _)| Tensor::randn([rows, *inp], o)).collect();
        let each = |f: &dyn Fn(&Group, &Tensor, usize)| {
            for layer in &layers {
                for (i, (g, x)) in layer.iter().zip(&xs).enumerate() {
                    f(g, x, i);
                }
            }
        };
        let plain = || each(&|g, x, _| drop(few_rows::product(x, &g.w, None)));
        // Every layer's products with a term of one form, its mask rows exact or in bf16.
        let with_term = |form: Form, bf16: bool| {
            each(&|g, x, i| {
                let (a, bt, parts) = match form {
                    Form::Block => (&g.a, &g.block, &dense[i]),
                    Form::ByPart => (&g.a, &g.compact, &parts[i]),
                    Form::Rank1 => (&g.a1, &g.b1, &rank1[i]),
                };
                drop(few_rows::product_with_low_rank(x, &g.w, None, &TailTerm { a, bt, parts, start, bf16 }))
            })
        };
        let block = || with_term(Form::Block, false);
        let by_part = || with_term(Form::ByPart, false);
        let one = || with_term(Form::Rank1, false);
        let bf16 = || with_term(Form::ByPart, true);
        // The same product's two kinds of rows apart.
        let heads: Vec<Tensor> = xs.iter().map(|x| x.narrow(0, 0, start)).collect();
        let tails: Vec<Tensor> = xs.iter().map(|x| x.narrow(0, start, rows - start)).collect();
        let head_rows = || each(&|g, _, i| drop(few_rows::product(&heads[i], &g.w, None)));
        let mask_rows = || {
            each(&|g, _, i| {
                let term = TailTerm { a: &g.a, bt: &g.compact, parts: &parts[i], start: 0, bf16: true };
                drop(few_rows::product_with_low_rank(&tails[i], &g.w, None, &term))
            })
        };
        let t = common::medians(&[&plain, &block, &by_part, &one, &bf16, &head_rows, &mask_rows], 15);
        println!(
            "{rows:2} rows ({:2} with the term): products {:6.2}; term as one block-diagonal B +{:5.2}, by part +{:5.2}, rank 1 +{:5.2}; by part with those rows in bf16 {:6.2} (next-token rows alone {:6.2}, mask rows alone {:6.2})",
            rows - start,
            t[0],
            t[1] - t[0],
            t[2] - t[0],
            t[3] - t[0],
            t[4],
            t[5],
            t[6]
        );
    }
}
