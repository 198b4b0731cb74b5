//! What the mask block after the prompt adds to a prefill: the speculative prefill (the
//! prompt and one block of m masks, drafting from it) against AR's (the prompt alone), for
//! prompts of the demo's lengths, timed in turns, medians of many rounds (microseconds).
//! `cargo run --release -p mtp-core --example prefill_cost [MODEL_DIR ADAPTER]`
use std::time::Instant;

use mtp_core::decode::{Decoding, DraftOptions, Drafter, GenerateRequest, MaskCount, Mode, Strategy, generate};
use mtp_core::mtp::MtpAdapter;
use mtp_core::{LoadOptions, LoadedModel, ModelSource};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let source = args.get(1).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let adapter_path = args.get(2).map_or_else(mtp_core::source::demo_adapter, std::path::PathBuf::from);
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(&adapter_path, model)?;
    let drafter = Drafter::new(model, &adapter, DraftOptions::default())?;
    let _g = tch::no_grad_guard();
    let vocab = model.config.vocab_size as i64;
    for p in [10usize, 22, 28, 32, 38] {
        let req = GenerateRequest {
            prompt_ids: (0..p as i64).map(|i| (i * 37 + 11) % vocab).collect(),
            max_new_tokens: 1,
            decoding: Decoding::Greedy,
            eos_ids: vec![],
        };
        let strategies: Vec<(String, Strategy)> = std::iter::once(("ar".to_string(), Strategy::Ar))
            .chain([1, 2, 4].into_iter().map(|m| {
                let s = Strategy::new(Mode::Quadratic, Some(&drafter), MaskCount::Fixed(m)).expect("strategy");
                (format!("{m} masks"), s)
            }))
            .collect();
        let mut times = vec![Vec::new(); strategies.len()];
        for _ in 0..200 {
            for (i, (_, s)) in strategies.iter().enumerate() {
                let t = Instant::now();
                generate(model, *s, &req, &mut ())?;
                times[i].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let medians: Vec<String> = strategies
            .iter()
            .zip(&mut times)
            .map(|((name, _), t)| {
                t.sort_by(f64::total_cmp);
                format!("{name} {:.0}", t[t.len() / 2])
            })
            .collect();
        println!("prompt of {p}: {}", medians.join(", "));
    }
    Ok(())
}
