//! The libtorch operations a fixed-shape decoding step issues (what a CUDA graph records,
//! one kernel or more each on a GPU), counted on the CPU: the model in f16, whose passes
//! take libtorch's general path as they do on CUDA (our CPU kernels run f32 and bf16
//! only), its steps run eagerly through the code a graph records (`StepGraphs::Eager`).
//! Run it under callgrind, collecting only inside the recorded bodies, then count the calls
//! of tch's C functions (`atg_*`, one libtorch operation each) with
//! `scripts/step_ops.py`:
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/ops.ar \
//!   --toggle-collect='mtp_core::decode::ar::in_place_logits*' \
//!   target/release/examples/step_ops MODEL ADAPTER MASKS ar
//! ```
//!
//! and `spec` with `--toggle-collect='mtp_core::decode::speculative::fixed::verify_and_draft*'`.
//! `cargo run --release -p mtp-core --example step_ops MODEL_DIR ADAPTER [MASKS] [ar|spec]`
use mtp_core::decode::{
    Decoding, DraftOptions, Drafter, GenerateRequest, Layout, LoraForm, MaskCount, Speculative, Strategy, generate,
};
use mtp_core::model::StepGraphs;
use mtp_core::mtp::MtpAdapter;
use mtp_core::{DType, LoadOptions, LoadedModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: step_ops MODEL_DIR ADAPTER [MASKS] [ar|spec] [low-rank|merged|folded]";
    let (Some(model_dir), Some(adapter_path)) = (args.get(1), args.get(2)) else { anyhow::bail!(usage) };
    let masks: usize = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let what = args.get(4).map_or("spec", String::as_str);
    let lora = match args.get(5).map(String::as_str) {
        None | Some("low-rank") => LoraForm::LowRank,
        Some("merged") => LoraForm::Merged,
        Some("folded") => LoraForm::Folded,
        Some(other) => anyhow::bail!("unknown form `{other}`; {usage}"),
    };
    let options = LoadOptions { dtype: DType::F16, ..LoadOptions::default() };
    let mut loaded = LoadedModel::from_folder(std::path::Path::new(model_dir), &options)?;
    loaded.model.set_step_graphs(StepGraphs::Eager);
    let model = &loaded.model;
    let adapter = MtpAdapter::load(std::path::Path::new(adapter_path), model)?;
    let drafter = Drafter::new(model, &adapter, DraftOptions { lora, ..DraftOptions::default() })?;
    let prompt: Vec<i64> = (1..24).map(|i| (i * 37) % model.config.vocab_size as i64).collect();
    let req = GenerateRequest { prompt_ids: prompt, max_new_tokens: 40, decoding: Decoding::Greedy, eos_ids: vec![] };
    let strategy = match what {
        "ar" => Strategy::Ar,
        "spec" => Strategy::Speculative(Speculative {
            drafter: &drafter,
            layout: Layout::Quadratic,
            masks: MaskCount::Fixed(masks),
        }),
        other => anyhow::bail!("unknown `{other}`; {usage}"),
    };
    let out = generate(model, strategy, &req, &mut ())?;
    println!("{what}: {} tokens, {} forwards", out.token_ids.len(), out.forwards);
    Ok(())
}
