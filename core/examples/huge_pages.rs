//! A model's forward pass with its weights in one buffer on huge pages (as every CPU load
//! from a folder has them) against the same weights each in a buffer of its own, in one
//! process: 1, 9 and 25 new tokens after 100 cached ones, the two models in turns, round
//! after round (the machine is shared and noisy: compare within a round's stretch of time).
//! `cargo run --release -p mtp-core --example huge_pages [MODEL] [ROUNDS]` (default: demo)
use std::time::Instant;

use mtp_core::checkpoint::Checkpoint;
use mtp_core::model::ModelConfig;
use mtp_core::{DType, Llama, LoadOptions, LoadedModel, ModelSource};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let source = args.get(1).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(15), |s| s.parse())?;
    let packed = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    // `Llama::from_checkpoint` leaves each weight where loading put it.
    let config = ModelConfig::from_file(&packed.dir.join("config.json"))?;
    let plain = Llama::from_checkpoint(config, &Checkpoint::open(&packed.dir)?, DType::F32, Device::Cpu)?;
    let models = [&plain, &packed.model];
    let meminfo = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    for line in meminfo.lines().filter(|l| l.starts_with("AnonHugePages")) {
        println!("this process's {line}");
    }
    let _g = tch::no_grad_guard();
    let past = 100i64;
    let prompt = Tensor::arange(past, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut caches: Vec<_> = models
        .iter()
        .map(|m| {
            let mut cache = m.new_cache(400);
            let _ = m.forward(&prompt, Some(&mut cache));
            cache
        })
        .collect();
    let tokens = [1i64, 9, 25];
    let mut ms = vec![[Vec::new(), Vec::new()]; tokens.len()];
    for _ in 0..rounds {
        for (r, &t) in tokens.iter().enumerate() {
            let ids = Tensor::full([1, t], 5, (Kind::Int64, Device::Cpu));
            for (i, m) in models.iter().enumerate() {
                let start = Instant::now();
                let logits = m.forward(&ids, Some(&mut caches[i]));
                let _ = logits.argmax(-1, false).int64_value(&[0, 0]);
                caches[i].truncate(past as usize);
                ms[r][i].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!("forward ms (min / first quartile / median): own buffers | huge pages");
    for (t, [a, b]) in tokens.iter().zip(&mut ms) {
        let stat = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            [v[0], v[v.len() / 4], v[v.len() / 2]]
        };
        let (a, b) = (stat(a), stat(b));
        let change: Vec<String> = a.iter().zip(&b).map(|(a, b)| format!("{:+.1}%", (b / a - 1.0) * 100.0)).collect();
        println!(
            "{t:>2} tokens: {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} ({})",
            a[0],
            a[1],
            a[2],
            b[0],
            b[1],
            b[2],
            change.join(" / ")
        );
    }
    Ok(())
}
