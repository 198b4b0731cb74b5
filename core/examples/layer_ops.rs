//! Where one decoder layer's time goes, operation by operation, for an AR step's one row
//! and a speculative step's rows (default: the demo's first layer, 1 and 25 rows, 100
//! cached positions): each operation as the forward pass runs it, timed in turns with the
//! others, medians of rounds in microseconds per call; then the whole layer, and the
//! products of every layer in turn (a forward pass's, the weights read from memory).
//! `cargo run --release -p mtp-core --example layer_ops [ROWS] [MODEL_DIR]`
mod common;

use mtp_core::model::ProjGroup;
use mtp_core::model::attention::{AttnMask, Pass, attend};
use mtp_core::model::linear::linear;
use mtp_core::model::mlp;
use mtp_core::model::norm::RmsNorm;
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use tch::{Kind, Tensor};

/// One timed operation.
type Op<'a> = Box<dyn Fn() + 'a>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: i64 = args.get(1).map_or(Ok(25), |s| s.parse())?;
    let source = args.get(2).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let c = &model.config;
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, tch::Device::Cpu);
    let (d, heads, kv, hd) = (c.hidden_size as i64, c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
    let i = c.intermediate_size as i64;
    let past = 100i64;
    let weight = |g| model.group_weight(0, g).map(|(w, _)| w).ok_or_else(|| anyhow::anyhow!("layer 0"));
    let (w_qkv, w_o, w_gu, w_down) =
        (weight(ProjGroup::Qkv)?, weight(ProjGroup::O)?, weight(ProjGroup::GateUp)?, weight(ProjGroup::Down)?);
    let norm = RmsNorm::new(Tensor::ones([d], o), 1e-5);
    let layer = &model.layers()[0];

    println!("{:<36} {:>10} {:>10}", "operation (us per call)", "1 row", format!("{rows} rows"));
    let mut totals = [0.0f64; 2];
    let mut lines: Vec<(String, [f64; 2])> = Vec::new();
    for (col, t) in [1, rows].into_iter().enumerate() {
        let x = Tensor::randn([1, t, d], o) * 0.1;
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, tch::Device::Cpu));
        let rope = model.rope_tables(&positions, Kind::Float);
        let qkv = linear(&x, &w_qkv, None).view([1, t, heads + 2 * kv, hd]);
        let mut cache = model.new_cache(400);
        let _ = model.forward(&Tensor::arange(past, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0), Some(&mut cache));
        let mask = Tensor::zeros([t, past + t], o);
        let k_all = Tensor::randn([1, kv, past + t, hd], o);
        let v_all = Tensor::randn([1, kv, past + t, hd], o);
        let q = Tensor::randn([1, heads, t, hd], o);
        let k_cache = Tensor::randn([1, kv, 400, hd], o);
        let v_cache = Tensor::randn([1, kv, 400, hd], o);
        let gu = linear(&x, &w_gu, None);
        let act = Tensor::randn([1, t, i], o);
        let scale = (hd as f64).powf(-0.5);
        // The attention's output as the layer gets it (on the CPU our kernel writes it
        // `[b, t, heads, hd]`, so that the layout below is a view there).
        let y = attend(&q, &k_all, &v_all, (t > 1).then_some(&mask), false, scale);
        let cache_cell = std::cell::RefCell::new(cache);
        let pass_mask = if t == 1 { AttnMask::Causal } else { AttnMask::Custom(&mask) };
        let ops: Vec<(&str, Op)> = vec![
            ("rms_norm", Box::new(|| drop(norm.forward(&x)))),
            ("rms_norm, libtorch's", Box::new(|| drop(norm.forward_tensor_ops(&x)))),
            ("q/k/v product", Box::new(|| drop(linear(&x, &w_qkv, None)))),
            ("rotary embedding (q and k)", Box::new(|| drop(rope.apply(&qkv.narrow(2, 0, heads + kv))))),
            ("rotary embedding, libtorch's", Box::new(|| drop(rope.apply_tensor_ops(&qkv.narrow(2, 0, heads + kv))))),
            (
                "cache append (k and v)",
                Box::new(|| {
                    let k = qkv.narrow(2, heads, kv).transpose(1, 2);
                    let mut c = cache_cell.borrow_mut();
                    drop(c.append(0, &k, &k));
                }),
            ),
            ("attention", Box::new(|| drop(attend(&q, &k_all, &v_all, (t > 1).then_some(&mask), false, scale)))),
            (
                "attention, q/k/v as the layer has them",
                Box::new(|| {
                    let qk = rope.apply(&qkv.narrow(2, 0, heads + kv));
                    let q = qk.narrow(2, 0, heads).transpose(1, 2);
                    let (k, v) = (k_cache.narrow(2, 0, past + t), v_cache.narrow(2, 0, past + t));
                    drop(attend(&q, &k, &v, (t > 1).then_some(&mask), false, scale))
                }),
            ),
            ("attention output layout", Box::new(|| drop(y.transpose(1, 2).reshape([1, t, heads * hd])))),
            ("o product", Box::new(|| drop(linear(&x, &w_o, None)))),
            ("residual add", Box::new(|| drop(&x + &x))),
            ("gate/up product", Box::new(|| drop(linear(&x, &w_gu, None)))),
            ("silu(gate) * up", Box::new(|| drop(mlp::swiglu(&gu, i)))),
            ("silu(gate) * up, libtorch's", Box::new(|| drop(mlp::swiglu_tensor_ops(&gu, i)))),
            ("down product", Box::new(|| drop(linear(&act, &w_down, None)))),
            (
                "the four products in turn",
                Box::new(|| {
                    drop(linear(&x, &w_qkv, None));
                    drop(linear(&x, &w_o, None));
                    drop(linear(&x, &w_gu, None));
                    drop(linear(&act, &w_down, None));
                }),
            ),
            (
                "whole layer",
                Box::new(|| {
                    let pass = Pass { rope: &rope, mask: pass_mask, adapter: None, write_at: None };
                    let mut c = cache_cell.borrow_mut();
                    drop(layer.forward(&x, &pass, Some(&mut c)));
                }),
            ),
        ];
        let calls = 50;
        let forms: Vec<Box<dyn Fn()>> = ops
            .iter()
            .map(|(_, f)| {
                Box::new(move || {
                    for _ in 0..calls {
                        f();
                    }
                }) as Box<dyn Fn()>
            })
            .collect();
        let refs: Vec<&dyn Fn()> = forms.iter().map(|f| f.as_ref()).collect();
        let ms = common::medians(&refs, 21);
        for (k, ((name, _), ms)) in ops.iter().zip(ms).enumerate() {
            let us = ms * 1e3 / calls as f64;
            if col == 0 {
                lines.push((name.to_string(), [us, 0.0]));
            } else {
                lines[k].1[1] = us;
            }
            let aside = name.starts_with("whole") || name.starts_with("the four") || name.contains("as the layer");
            if !aside && !name.ends_with("libtorch's") {
                totals[col] += us;
            }
        }
    }
    for (name, [a, b]) in &lines {
        println!("{name:<36} {a:>10.1} {b:>10.1}");
    }
    println!("{:<36} {:>10.1} {:>10.1}", "sum of the operations", totals[0], totals[1]);

    // One layer's weights stay in the caches between calls; a forward pass reads every
    // layer's from memory (or L3) once. Its products, layer after layer:
    let weights: Vec<Tensor> = (0..model.layers().len())
        .flat_map(|l| ProjGroup::ALL.map(move |g| (l, g)))
        .filter_map(|(l, g)| model.group_weight(l, g).map(|(w, _)| w))
        .collect();
    let inputs = |t: i64| -> Vec<Tensor> { weights.iter().map(|w| Tensor::randn([t, w.size()[1]], o)).collect() };
    let (xs_one, xs_rows) = (inputs(1), inputs(rows));
    let every_layer = |xs: &[Tensor]| {
        for (w, x) in weights.iter().zip(xs) {
            drop(linear(x, w, None));
        }
    };
    let (one, many) = (|| every_layer(&xs_one), || every_layer(&xs_rows));
    let ms = common::medians(&[&one, &many], 21);
    println!("{:<36} {:>10.1} {:>10.1}", "every layer's products in turn", ms[0] * 1e3, ms[1] * 1e3);
    Ok(())
}
