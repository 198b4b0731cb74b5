//! The bench's race for several drafter setups at once, in one process: each prompt's
//! generations go round AR and every (lora form, draft arithmetic, masks) setup in turn
//! (`auto`, bf16 and exact mask rows in the form `auto` takes, and the merged form),
//! `ROUNDS` times, and each counts its fastest (the machine's speed drifts too much between
//! processes to compare two bench runs). Prints tokens per forward, the speedup over AR
//! and whether every output is AR's. `ROUNDS` (default 3) and `TOKENS` (new tokens a
//! prompt, default 64; no end-of-text stop) from the environment.
//! `cargo run --release -p mtp-core --example arithmetic_race [MASKS [MODEL ADAPTER PROMPTS]]`
//! (`MASKS`: comma-separated counts or `auto`, default `1,2,4,auto`; default the demo.)
use std::time::Instant;

use mtp_core::decode::bench::read_prompts;
use mtp_core::decode::{
    Decoding, DraftArithmetic, DraftOptions, Drafter, GenerateRequest, Layout, LoraForm, MaskCount, Speculative,
    Strategy, generate,
};
use mtp_core::mtp::MtpAdapter;
use mtp_core::{LoadOptions, LoadedModel, ModelSource};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let masks: Vec<MaskCount> =
        args.get(1).map_or("1,2,4,auto", String::as_str).split(',').map(str::parse).collect::<Result<_, _>>()?;
    let source = args.get(2).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let adapter_path = args.get(3).map_or_else(mtp_core::source::demo_adapter, std::path::PathBuf::from);
    let prompts_path = args.get(4).map_or_else(mtp_core::source::demo_prompts, std::path::PathBuf::from);
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let tokens: usize = std::env::var("TOKENS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(&adapter_path, model)?;
    let setups = [
        (LoraForm::Auto, DraftArithmetic::Auto),
        (LoraForm::Auto, DraftArithmetic::Bf16),
        (LoraForm::Auto, DraftArithmetic::Exact),
        (LoraForm::Merged, DraftArithmetic::Auto),
    ];
    let drafters: Vec<Drafter> = setups
        .iter()
        .map(|&(lora, arithmetic)| {
            Drafter::new(model, &adapter, DraftOptions { lora, arithmetic, ..DraftOptions::default() })
        })
        .collect::<Result<_, _>>()?;
    let prompts = read_prompts(&prompts_path)?;
    let ids: Vec<Vec<i64>> = prompts.iter().map(|p| p.encode(&loaded.tokenizer, false)).collect::<Result<_, _>>()?;
    let runs: Vec<(usize, MaskCount)> = (0..setups.len()).flat_map(|s| masks.iter().map(move |&m| (s, m))).collect();
    // Per prompt: AR's fastest seconds and output; per run: fastest seconds, tokens, forwards, identical.
    let mut ar_best = vec![f64::MAX; ids.len()];
    let mut ar_out = vec![Vec::new(); ids.len()];
    let mut best = vec![vec![f64::MAX; ids.len()]; runs.len()];
    let mut counts = vec![(0usize, 0usize, true); runs.len()];
    for round in 0..rounds {
        for (p, prompt) in ids.iter().enumerate() {
            let req = GenerateRequest {
                prompt_ids: prompt.clone(),
                max_new_tokens: tokens,
                decoding: Decoding::Greedy,
                eos_ids: Vec::new(),
            };
            let t = Instant::now();
            let out = generate(model, Strategy::Ar, &req, &mut ())?;
            ar_best[p] = ar_best[p].min(t.elapsed().as_secs_f64());
            ar_out[p] = out.token_ids;
            for (i, &(s, m)) in runs.iter().enumerate() {
                let spec = Speculative { drafter: &drafters[s], layout: Layout::Quadratic, masks: m };
                let t = Instant::now();
                let out = generate(model, Strategy::Speculative(spec), &req, &mut ())?;
                best[i][p] = best[i][p].min(t.elapsed().as_secs_f64());
                if round == 0 {
                    counts[i].0 += out.token_ids.len();
                    counts[i].1 += out.forwards;
                }
                counts[i].2 &= out.token_ids == ar_out[p];
            }
        }
    }
    let ar_total: f64 = ar_best.iter().sum();
    println!("AR: {:.1} tokens/s", ids.len() as f64 * tokens as f64 / ar_total);
    for (i, &(s, m)) in runs.iter().enumerate() {
        let total: f64 = best[i].iter().sum();
        let (lora, arithmetic) = setups[s];
        println!(
            "{:<8} {:<6} masks {:<5} tokens/forward {:.2}  speedup {:.2}x  identical {}",
            lora.to_string(),
            arithmetic.to_string(),
            m.to_string(),
            counts[i].0 as f64 / counts[i].1 as f64,
            ar_total / total,
            counts[i].2
        );
    }
    Ok(())
}
