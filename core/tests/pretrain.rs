//! Pretraining from scratch: a tokenizer trained on the data, every weight trained, the
//! folder loads back as an ordinary model, and a stopped run resumes.

use mtp_core::train::pretrain::{ArchConfig, PretrainConfig, TokenizerPlan, pretrain};
use mtp_core::train::{Control, LoopConfig, OptimConfig, Outcome, Schedule, TrainEvent};
use mtp_core::{DeviceSpec, LoadOptions, LoadedModel};

fn config(steps: usize) -> anyhow::Result<PretrainConfig> {
    Ok(PretrainConfig {
        data: vec!["builtin:code:400".parse()?, "builtin:arith:400".parse()?],
        arch: ArchConfig::preset("tiny")?,
        tokenizer: TokenizerPlan::Train { vocab_size: 384 },
        training: LoopConfig {
            optim: OptimConfig { lr: 3e-3, warmup: 5, schedule: Schedule::Cosine, ..OptimConfig::default() },
            steps,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 64,
            val_fraction: 0.05,
            val_every: 10,
            checkpoint_every: 10,
            seed: 3,
            device: DeviceSpec::Cpu,

            ..LoopConfig::default()
        },
    })
}

#[test]
fn pretrains_saves_and_resumes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("model");
    let mut losses = Vec::new();
    let control = Control::new();
    let stopper = control.clone();
    let summary = pretrain(
        &config(30)?,
        &out,
        false,
        &mut |e: &TrainEvent| {
            if let TrainEvent::Step(m) = e {
                losses.push(m.losses.loss);
                if m.step == 12 {
                    stopper.cancel();
                }
            }
        },
        &control,
    )?;
    assert_eq!((summary.outcome, summary.step), (Outcome::Stopped, 12));
    let summary = pretrain(
        &config(30)?,
        &out,
        true,
        &mut |e: &TrainEvent| {
            if let TrainEvent::Step(m) = e {
                losses.push(m.losses.loss);
            }
        },
        &Control::new(),
    )?;
    assert_eq!((summary.outcome, summary.step), (Outcome::Finished, 30));
    assert_eq!(losses.len(), 30);
    assert!(losses[29] < losses[0] - 0.5, "loss fell too little: {} -> {}", losses[0], losses[29]);

    // The folder is an ordinary model folder.
    let loaded = LoadedModel::from_folder(&out, &LoadOptions::default())?;
    assert_eq!(loaded.model.config.vocab_size, 384);
    assert_eq!(loaded.tokenizer.vocab_size(), 384);
    let ids = loaded.tokenizer.encode("def sum_items(xs):")?;
    assert_eq!(loaded.tokenizer.decode(&ids, false)?, "def sum_items(xs):");
    assert_eq!(loaded.tokenizer.eos_ids.len(), 1);
    let info = mtp_core::inspect::ModelInfo::from_folder(&out)?;
    assert_eq!(info.num_parameters, summary.parameters);
    Ok(())
}
