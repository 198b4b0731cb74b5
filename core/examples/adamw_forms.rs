//! Time of one AdamW step over an adapter's parameters, one tensor per parameter against
//! the flat buffers (`AdamW::with_form`), in turns; medians in microseconds.
//! `cargo run --release -p mtp-core --example adamw_forms [MODEL_DIR]`
use mtp_core::mtp::{LoraConfig, MtpAdapter, MtpConfig};
use mtp_core::train::{AdamW, OptimConfig};
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use tch::{Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let source = args.get(1).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let config = MtpConfig { k: 4, lora: LoraConfig { rank: 16, ..LoraConfig::default() }, ..MtpConfig::default() };
    let mut medians = Vec::new();
    for flat in [false, true] {
        let adapter = MtpAdapter::new(&loaded.model, config.clone(), "bench")?;
        let params: Vec<(String, Tensor)> =
            adapter.named_tensors().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let count = params.len();
        let elements: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let handles: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut opt = AdamW::with_form(params, OptimConfig::default(), flat);
        let mut times = Vec::new();
        for _ in 0..60 {
            // Gradients as a backward pass leaves them.
            let loss = handles.iter().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
            loss.backward();
            let t0 = std::time::Instant::now();
            opt.step(1e-3);
            opt.zero_grad();
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{}: {count} tensors, {elements} elements: {:.0} us a step",
            if opt.is_flat() { "flat" } else { "one tensor per parameter" },
            times[times.len() / 2]
        );
        medians.push(times[times.len() / 2]);
    }
    println!("flat / per parameter: {:.2}", medians[1] / medians[0]);
    Ok(())
}
