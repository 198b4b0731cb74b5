//! The fixed-shape forward pass that CUDA graphs record (`Llama::forward_in_place`: the new
//! row written at a position held on the device, the whole cache attended under a mask)
//! against the ordinary cached pass, on every fixture family on the CPU: the same logits
//! within f32 rounding and the same greedy tokens, step after step.

use std::path::Path;

use mtp_core::model::attention::read_in_place;
use mtp_core::model::{AttnMask, Llama};
use mtp_core::{LoadOptions, LoadedModel};
use tch::{Device, Tensor};

const FAMILIES: [&str; 6] = ["llama", "llama-sharded", "llama3-tied", "mistral", "qwen2", "qwen3"];

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn in_place_steps_equal_cached_steps_on_every_family() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    for family in FAMILIES {
        let loaded = LoadedModel::from_folder(&root.join(family), &LoadOptions::default())?;
        let model: &Llama = &loaded.model;
        let vocab = model.config.vocab_size as i64;
        let prompt: Vec<i64> = (0..9).map(|i| (i * 37 + 5) % vocab).collect();
        let steps = 12;
        let (mut eager, mut in_place) = (model.new_cache(prompt.len() + steps), model.new_cache(prompt.len() + steps));
        tch::no_grad(|| -> anyhow::Result<()> {
            let ids = Tensor::from_slice(&prompt).unsqueeze(0);
            let first = model.forward(&ids, Some(&mut eager));
            let again = model.forward(&ids, Some(&mut in_place));
            assert_eq!(max_diff(&first, &again), 0.0);
            let mut token = first.get(0).get(prompt.len() as i64 - 1).argmax(-1, false).int64_value(&[]);
            assert!(in_place.capacity() >= prompt.len() + steps, "{family}: {}", in_place.capacity());
            for step in 0..steps {
                let input = Tensor::from_slice(&[token]).unsqueeze(0);
                let want = model.forward(&input, Some(&mut eager)).view([-1]);
                let position = Tensor::from_slice(&[in_place.len() as i64]);
                let got = model.logits(&model.forward_in_place(&input, &position, &mut in_place)).view([-1]);
                in_place.commit(1);
                let diff = max_diff(&want, &got);
                assert!(diff < 1e-4, "{family}, step {step}: logits differ by {diff}");
                let (a, b) = (want.argmax(-1, false).int64_value(&[]), got.argmax(-1, false).int64_value(&[]));
                assert_eq!(a, b, "{family}, step {step}: greedy tokens differ");
                token = a;
            }
            assert_eq!(eager.len(), in_place.len());
            Ok(())
        })?;
        assert_eq!(model.device(), Device::Cpu);
        assert!(!model.records_graphs(), "graphs are never recorded on the CPU");
    }
    Ok(())
}

/// A decoding pass's attention read in place (queries, keys and values straight from the
/// q/k/v projection and the cache buffers) gives the general path's hidden states and cache
/// bit for bit, on every fixture family (Qwen3's q/k norms take the general path), for AR
/// steps and for a step of several rows under an explicit mask; and it is taken.
#[test]
fn attention_read_in_place_equals_the_general_path() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    for family in FAMILIES {
        let loaded = LoadedModel::from_folder(&root.join(family), &LoadOptions::default())?;
        let model: &Llama = &loaded.model;
        let vocab = model.config.vocab_size as i64;
        let prompt: Vec<i64> = (0..9).map(|i| (i * 37 + 5) % vocab).collect();
        tch::no_grad(|| -> anyhow::Result<()> {
            let ids = Tensor::from_slice(&prompt).unsqueeze(0);
            let run = |in_place: bool| -> (Vec<Tensor>, u64) {
                let before = read_in_place(in_place);
                let mut cache = model.new_cache(64);
                let mut out = vec![model.forward(&ids, Some(&mut cache))];
                for step in 0..4i64 {
                    out.push(
                        model.forward(&Tensor::from_slice(&[(step * 11 + 3) % vocab]).unsqueeze(0), Some(&mut cache)),
                    );
                }
                // Five rows after the cache, each seeing the cache and a pattern of its own.
                let past = cache.len() as i64;
                let rows = Tensor::from_slice(&[1i64, 2, 3, 4, 5]).unsqueeze(0);
                let own =
                    Tensor::from_slice(&[1u8, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1])
                        .to_kind(tch::Kind::Bool)
                        .view([5, 5]);
                let mask = Tensor::cat(&[Tensor::ones([5, past], (tch::Kind::Bool, Device::Cpu)), own], 1);
                let positions = Tensor::from_slice(&[past, past + 1, past + 1, past + 2, past + 1]);
                out.push(model.forward_embeds(
                    &model.embed(&rows),
                    &positions,
                    AttnMask::Custom(&mask),
                    None,
                    Some(&mut cache),
                ));
                // A last AR step attends to every row the cache holds.
                out.push(model.forward(&Tensor::from_slice(&[7i64]).unsqueeze(0), Some(&mut cache)));
                out.push(Tensor::from_slice(&[cache.len() as i64]));
                (out, read_in_place(true) - before)
            };
            let (general, none) = run(false);
            let (read, taken) = run(true);
            assert_eq!(none, 0, "{family}: switched off");
            if model.config.qk_norm {
                assert_eq!(taken, 0, "{family}: q/k norms take the general path");
            } else {
                assert!(taken >= 6 * model.config.num_layers as u64, "{family}: read in place {taken} times");
            }
            for (i, (a, b)) in general.iter().zip(&read).enumerate() {
                assert!(a.equal(b), "{family}: output {i} differs");
            }
            Ok(())
        })?;
    }
    Ok(())
}
