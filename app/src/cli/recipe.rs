//! The optimisation loop's flags, shared by `mtp train` and `mtp pretrain`: one definition
//! that edits core's [`LoopConfig`], each command's defaults taken from its recipe's
//! `Default` (so `--help` shows what a run without the flag does, and nothing here repeats a
//! number).

use mtp_core::DeviceSpec;
use mtp_core::train::pretrain::PretrainConfig;
use mtp_core::train::{LoopConfig, OptimConfig, Schedule, TrainConfig};

fn steps_help(defaults: &LoopConfig) -> String {
    format!("Total optimizer steps [default: {}] (with --resume: the new total)", defaults.steps)
}

/// The flags of a loop whose defaults are `$defaults`. A macro, not a generic struct: clap
/// keeps each default's text in a static of the function it derives, which every
/// instantiation of a generic struct would share.
macro_rules! loop_args {
    ($(#[$doc:meta])* $name:ident, $defaults:expr) => {
        $(#[$doc])*
        #[derive(Debug, clap::Args)]
        pub struct $name {
            #[arg(long, help = steps_help(&$defaults))]
            pub steps: Option<usize>,
            /// Sequences per micro-batch.
            #[arg(long, default_value_t = $defaults.batch_size)]
            pub batch_size: usize,
            /// Micro-batches per optimizer step.
            #[arg(long, default_value_t = $defaults.grad_accum)]
            pub grad_accum: usize,
            /// Tokens per training sequence.
            #[arg(long, default_value_t = $defaults.seq_len)]
            pub seq_len: usize,
            /// Peak learning rate.
            #[arg(long, default_value_t = $defaults.optim.lr)]
            pub lr: f64,
            /// Warmup steps (linear from 0).
            #[arg(long, default_value_t = $defaults.optim.warmup)]
            pub warmup: usize,
            /// The learning rate after warmup: constant, or cosine (a decay to 10% of the
            /// peak at the last step).
            #[arg(long, default_value_t = $defaults.optim.schedule)]
            pub schedule: Schedule,
            /// Shorthand for --schedule cosine.
            #[arg(long)]
            pub cosine: bool,
            /// Decoupled weight decay.
            #[arg(long, default_value_t = $defaults.optim.weight_decay)]
            pub weight_decay: f64,
            /// Clip the gradient norm (0 = off).
            #[arg(long, default_value_t = $defaults.optim.grad_clip)]
            pub grad_clip: f64,
            /// Seed of initialisation and data order.
            #[arg(long, default_value_t = $defaults.seed)]
            pub seed: u64,
            /// Checkpoint every N steps.
            #[arg(long, default_value_t = $defaults.checkpoint_every)]
            pub checkpoint_every: usize,
            /// Validate every N steps (0 = only at the end).
            #[arg(long, default_value_t = $defaults.val_every)]
            pub val_every: usize,
            /// Share of examples held out for validation.
            #[arg(long, default_value_t = $defaults.val_fraction)]
            pub val_fraction: f64,
            /// cpu, cuda or cuda:N.
            #[arg(long, default_value_t = $defaults.device)]
            pub device: DeviceSpec,
        }

        impl $name {
            /// The loop these flags ask for: the command's defaults with every flag applied.
            pub fn config(&self) -> LoopConfig {
                let d: LoopConfig = $defaults;
                LoopConfig {
                    optim: OptimConfig {
                        lr: self.lr,
                        warmup: self.warmup,
                        schedule: if self.cosine { Schedule::Cosine } else { self.schedule },
                        weight_decay: self.weight_decay,
                        grad_clip: self.grad_clip,
                        ..d.optim
                    },
                    steps: self.steps.unwrap_or(d.steps),
                    batch_size: self.batch_size,
                    grad_accum: self.grad_accum,
                    seq_len: self.seq_len,
                    val_fraction: self.val_fraction,
                    val_every: self.val_every,
                    checkpoint_every: self.checkpoint_every,
                    seed: self.seed,
                    device: self.device,
                    ..d
                }
            }
        }
    };
}

loop_args!(
    /// `mtp train`'s loop flags, defaults from [`TrainConfig`].
    TrainLoopArgs,
    TrainConfig::default().training
);

loop_args!(
    /// `mtp pretrain`'s loop flags, defaults from [`PretrainConfig`].
    PretrainLoopArgs,
    PretrainConfig::default().training
);

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Train {
        #[command(flatten)]
        training: TrainLoopArgs,
    }

    #[derive(Debug, Parser)]
    struct Pretrain {
        #[command(flatten)]
        training: PretrainLoopArgs,
    }

    #[test]
    fn no_flags_give_each_commands_recipe_defaults() {
        assert_eq!(Train::parse_from(["t"]).training.config(), TrainConfig::default().training);
        assert_eq!(Pretrain::parse_from(["p"]).training.config(), PretrainConfig::default().training);
        assert_ne!(TrainConfig::default().training, PretrainConfig::default().training);
    }

    #[test]
    fn flags_override_and_cosine_is_a_shorthand() {
        let t = Train::parse_from(["t", "--steps", "7", "--lr", "0.01", "--cosine", "--batch-size", "3"]);
        let c = t.training.config();
        assert_eq!((c.steps, c.batch_size, c.optim.lr, c.optim.schedule), (7, 3, 0.01, Schedule::Cosine));
        // What no flag touches stays the recipe's (pretraining's beta2).
        let p = Pretrain::parse_from(["p", "--schedule", "constant"]).training.config();
        assert_eq!(p.optim.schedule, Schedule::Constant);
        assert_eq!(p.optim.beta2, PretrainConfig::default().training.optim.beta2);
    }
}
