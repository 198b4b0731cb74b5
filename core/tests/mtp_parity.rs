//! Loss and gradient parity with the PyTorch reference: `scripts/reference.py mtp-parity`
//! wrote the method again in PyTorch on top of transformers (the Fig. 4 layout by plain
//! loops, gated LoRA as hooks, the sampler head, the three losses) and recorded, for a
//! random non-zero adapter and a batch, every loss term and every trainable gradient.

mod common;

use common::*;
use mtp_core::checkpoint::SafetensorsFile;
use mtp_core::model::Proj;
use mtp_core::mtp::{LoraConfig, MtpAdapter, MtpConfig, build_layout, collate, loss};
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use tch::{Device, Kind};

#[test]
fn losses_and_gradients_match_the_pytorch_reference() -> anyhow::Result<()> {
    let file = SafetensorsFile::open(&fixtures().join("reference").join("mtp_parity.safetensors"))?;
    let meta = file.metadata().cloned().unwrap_or_default();
    let get =
        |k: &str| -> anyhow::Result<f64> { Ok(meta.get(k).ok_or_else(|| anyhow::anyhow!("metadata {k}"))?.parse()?) };
    let family = meta.get("family").cloned().unwrap_or_default();
    let (k, rank, alpha, lcm_weight) = (get("k")? as usize, get("rank")? as usize, get("alpha")?, get("lcm_weight")?);

    let m = LoadedModel::load(&ModelSource::Local { path: model_dir(&family) }, &LoadOptions::default(), &mut ())?;
    let config = MtpConfig {
        k,
        lora: LoraConfig { rank, alpha, targets: Proj::ALL.to_vec() },
        gated: true,
        sampler: true,
        train_mask_embeddings: false,
        // The reference implements the paper's form.
        sampler_form: mtp_core::mtp::SamplerForm::Paper,
        recipe: mtp_core::mtp::Recipe::Paper,
    };
    let adapter = mtp_core::device::seeded(0, || MtpAdapter::new(&m.model, config, "parity"))?;
    adapter.load_tensors(|name| file.read(&format!("adapter.{name}")))?;

    let ids = file.read("ids")?;
    let loss_mask = file.read("loss_mask")?.to_kind(Kind::Bool);
    let batch = collate(&[build_layout(&ids, &loss_mask, k as i64)], Device::Cpu);
    // The reference sums the LCM distance over the width.
    let lcm = loss::Lcm { weight: lcm_weight, reduction: loss::LcmReduction::Sum };
    let ours = loss::compute(&m.model, &adapter, &batch, lcm);
    let v = ours.values()?;
    for (name, value) in
        [("loss", v.loss), ("loss_base", v.loss_base), ("loss_sampler", v.loss_sampler), ("loss_lcm", v.loss_lcm)]
    {
        let reference = file.read(name)?.double_value(&[0]);
        let rel = (value - reference).abs() / reference.abs().max(1e-12);
        println!("{name}: ours {value:.6} reference {reference:.6} (relative difference {rel:.1e})");
        assert!(rel < 1e-5, "{name}: {value} vs {reference}");
    }

    ours.total.backward();
    let mut compared = 0;
    for (name, t) in adapter.named_tensors() {
        if !t.requires_grad() {
            continue;
        }
        let reference = file.read(&format!("grad.{name}"))?;
        let grad = t.grad();
        let scale = reference.abs().max().double_value(&[]).max(1e-6);
        let diff = (&grad - &reference).abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "gradient of {name}: max difference {diff} at scale {scale}");
        compared += 1;
    }
    // 2 layers x 7 projections x (A, B) + the sampler's 8 tensors.
    assert_eq!(compared, 2 * 7 * 2 + 8);
    Ok(())
}
