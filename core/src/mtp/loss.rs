//! The three losses of METHOD.md section 3 on one collated batch, plus the per-slot
//! accuracies logged every step.
//!
//! - `L_base`: cross-entropy of the LM head on mask rows.
//! - `L_sampler`: cross-entropy of the sampler head on every labelled row (NTP and mask).
//! - `L_lcm`: for each NTP row t, the mask rows that predict the same token are pulled
//!   toward its (detached) final hidden state: mean over those masks of the squared
//!   distance summed over d, averaged over t.

use tch::{Kind, Tensor};

use super::adapter::MtpAdapter;
use super::masks::{IGNORE, MtpLayout, additive_mask};
use crate::error::Result;
use crate::model::attention::Pass;
use crate::model::{AttnMask, Llama};

/// The losses of one batch.
#[derive(Debug)]
pub struct MtpLosses {
    /// `L_base + L_sampler + lcm_weight * L_lcm`, a scalar with a gradient.
    pub total: Tensor,
    /// `L_base` (scalar).
    pub base: Tensor,
    /// `L_sampler` (scalar; zero without a sampler).
    pub sampler: Tensor,
    /// `L_lcm` (scalar).
    pub lcm: Tensor,
    /// Per slot j = 1..k: mask rows whose LM-head top-1 equals the label, `[k]` f32.
    pub slot_correct: Tensor,
    /// Per slot: the sampler's correct top-1s, `[k]` f32.
    pub slot_correct_sampler: Tensor,
    /// Per slot: labelled mask rows, `[k]` f32.
    pub slot_count: Tensor,
    /// Labelled rows in the batch (NTP and mask).
    pub labelled_rows: Tensor,
}

/// Scalars of [`MtpLosses`] on the host, for logging.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct LossValues {
    /// Total loss.
    pub loss: f64,
    /// `L_base`.
    pub loss_base: f64,
    /// `L_sampler`.
    pub loss_sampler: f64,
    /// `L_lcm`.
    pub loss_lcm: f64,
    /// Top-1 accuracy of each mask slot from the LM head.
    pub slot_acc: Vec<f64>,
    /// Top-1 accuracy of each mask slot from the sampler.
    pub slot_acc_sampler: Vec<f64>,
}

impl MtpLosses {
    /// Copy the scalars to the host, in one read from the device.
    pub fn values(&self) -> crate::error::Result<LossValues> {
        let values = tch::no_grad(|| {
            let count = self.slot_count.clamp_min(1.0);
            let scalars =
                [&self.total, &self.base, &self.sampler, &self.lcm].map(|t| t.to_kind(Kind::Double).view([1]));
            let parts: Vec<Tensor> = scalars
                .into_iter()
                .chain([&self.slot_correct, &self.slot_correct_sampler].map(|c| (c / &count).to_kind(Kind::Double)))
                .collect();
            Vec::<f64>::try_from(Tensor::cat(&parts, 0).to_device(tch::Device::Cpu))
        })?;
        let k = self.slot_count.numel();
        let [loss, loss_base, loss_sampler, loss_lcm] = values[..4] else {
            return Err(crate::error::Error::Invalid(format!("{} loss values, not 4 + 2 x {k}", values.len())));
        };
        if values.len() != 4 + 2 * k {
            return Err(crate::error::Error::Invalid(format!("{} loss values, not 4 + 2 x {k}", values.len())));
        }
        Ok(LossValues {
            loss,
            loss_base,
            loss_sampler,
            loss_lcm,
            slot_acc: values[4..4 + k].to_vec(),
            slot_acc_sampler: values[4 + k..].to_vec(),
        })
    }
}

fn rows_where(cond: &Tensor) -> Tensor {
    cond.nonzero().view([-1])
}

/// The f32 logits one chunk of [`head_cross_entropy`] holds (elements): 128 MiB, 682 rows
/// of a 49,152-token vocabulary (SmolLM2), 261 of Llama 3's 128,256.
pub const CHUNK_LOGITS: i64 = 1 << 25;

/// The mean cross-entropy of the LM head's logits of `h` (`[n, d]`, final hidden states or
/// the sampler's outputs) against `labels` (`[n]`, every one a token id), and each row's
/// top-1 against its label (`[n]` bool), without ever holding the `[n, vocab]` logits:
/// they are made a chunk of rows at a time, and where `h` needs a gradient each chunk's
/// gradient with respect to `h` (`(softmax - onehot) W / n`, what the backward pass of
/// the logits would compute) is made with them. The loss then carries it through a term
/// whose value is zero and whose gradient is that: `(h * g).sum() - (h * g).sum().detach()`.
/// The head's weight is frozen, so nothing else needs the logits. Training kept four f32
/// copies of every labelled row's logits (logits, log-probabilities, their two gradients:
/// 3.6 GB of SmolLM2-135M's 5.9 at k = 4, 256 x 2; 29 GB at 128 x 32); here one chunk's,
/// of at most `chunk_logits` elements (training: [`CHUNK_LOGITS`]).
pub fn head_cross_entropy(model: &Llama, h: &Tensor, labels: &Tensor, chunk_logits: i64) -> (Tensor, Tensor) {
    let (n, device) = (h.size()[0], h.device());
    if n == 0 {
        return (Tensor::zeros([], (Kind::Float, device)), Tensor::zeros([0], (Kind::Bool, device)));
    }
    let vocab = model.lm_head.size()[0];
    let rows = (chunk_logits / vocab.max(1)).max(1);
    let grad = h.requires_grad();
    let detached = h.detach();
    let (mut total, mut correct, mut grads) = (Vec::new(), Vec::new(), Vec::new());
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let labels = labels.narrow(0, start, len);
            let logits = model.logits(&detached.narrow(0, start, len)).to_kind(Kind::Float);
            let lse = logits.logsumexp([-1i64], true);
            let picked = logits.gather(1, &labels.unsqueeze(1), false);
            total.push((&lse - picked).sum(Kind::Float));
            correct.push(logits.argmax(-1, false).eq_tensor(&labels));
            if grad {
                // softmax - onehot, over n (the mean), in the activations' dtype as the
                // product's backward pass would take it.
                let mut g = (logits - lse).exp_();
                let _ = g.scatter_add_(1, &labels.unsqueeze(1), &Tensor::full([len, 1], -1.0, (Kind::Float, device)));
                let g = (g / n as f64).to_kind(h.kind());
                grads.push(g.mm(&model.lm_head));
            }
            start += len;
        }
    });
    let mean = Tensor::stack(&total, 0).sum(Kind::Float) / n as f64;
    let correct = Tensor::cat(&correct, 0);
    if !grad {
        return (mean, correct);
    }
    let g = Tensor::cat(&grads, 0);
    let carrier = (h * g).sum(Kind::Float);
    (mean + (&carrier - carrier.detach()), correct)
}

/// How `L_lcm` reduces the squared distance over the hidden width (METHOD.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LcmReduction {
    /// Summed over the width: the first reading, about 1,000 at width 256 against about 5 for
    /// the cross-entropies, so its weight depended on the model (runs recorded before the
    /// reduction was, read as this).
    #[default]
    Sum,
    /// Averaged over the width: one weight serves every width.
    Mean,
}

impl std::fmt::Display for LcmReduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LcmReduction::Sum => "sum",
            LcmReduction::Mean => "mean",
        })
    }
}

impl std::str::FromStr for LcmReduction {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s.trim() {
            "sum" => Ok(LcmReduction::Sum),
            "mean" => Ok(LcmReduction::Mean),
            other => Err(crate::error::Error::Invalid(format!("unknown LCM reduction `{other}` (mean, sum)"))),
        }
    }
}

/// The latent-consistency term's weight and reduction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lcm {
    /// `w_lcm` in `L_base + L_sampler + w_lcm * L_lcm`.
    pub weight: f64,
    /// Sum or mean over the width.
    pub reduction: LcmReduction,
}

/// Forward `batch` through the adapted model and compute every loss term.
pub fn compute(model: &Llama, adapter: &MtpAdapter, batch: &MtpLayout, lcm: Lcm) -> MtpLosses {
    let x = adapter.embed(model, &batch.tokens, &batch.slot);
    let gated = adapter.gated(&batch.slot, model.dtype().kind());
    let mask = additive_mask(&batch.attention_mask(), x.kind());
    let z = model.forward_embeds(&x, &batch.positions, AttnMask::Custom(&mask), Some(&gated), None);
    from_hidden(model, adapter, batch, &z, lcm)
}

/// The greedy drafts of one training pass over `ids` with a mask block after every
/// position from `from` on (as training lays them out, loss from `from`): per position
/// `i`, the drafts of slots 1..k of the block after it, slot `j` drafting the token at
/// `i + j + 1` from the sampler fed the true token before it (the LM head without a
/// sampler); -1 where the sequence ends first, and empty rows before `from`. Decoding the
/// model's own greedy continuation drafts these: a step whose first `a` drafts are right
/// drafted them as this pass did, so its acceptance is what the pass predicts. Drafts are
/// chosen from the whole vocabulary (a drafter with a draft vocabulary chooses among
/// fewer). The paper's recipe only: the UNO recipe's mask rows read random ids.
pub fn training_drafts(model: &Llama, adapter: &MtpAdapter, ids: &[i64], from: usize) -> Result<Vec<Vec<i64>>> {
    if adapter.config.recipe == super::Recipe::Uno {
        return Err(crate::error::Error::Invalid(
            "training drafts need the paper's recipe: the UNO recipe's mask rows read random ids".into(),
        ));
    }
    let (n, k) = (ids.len(), adapter.config.k);
    let loss: Vec<bool> = (0..n).map(|i| i >= from).collect();
    let layout = super::masks::build_layout(&Tensor::from_slice(ids), &Tensor::from_slice(&loss), k as i64);
    let batch = super::masks::collate(&[layout], model.device());
    tch::no_grad(|| {
        let x = adapter.embed(model, &batch.tokens, &batch.slot);
        let gated = adapter.gated(&batch.slot, model.dtype().kind());
        let mask = additive_mask(&batch.attention_mask(), x.kind());
        let z = model.forward_embeds(&x, &batch.positions, AttnMask::Custom(&mask), Some(&gated), None);
        let z = z.reshape([-1, z.size()[2]]);
        let h = match adapter.sampler() {
            Some(head) => head.forward(&model.embed(&batch.prev.reshape([-1])), &z).to_kind(z.kind()),
            None => z,
        };
        let drafts = Vec::<i64>::try_from(model.logits(&h).argmax(-1, false))?;
        let column = |t: &Tensor| Vec::<i64>::try_from(t.reshape([-1]));
        let (labels, slot, block) = (column(&batch.labels)?, column(&batch.slot)?, column(&batch.block)?);
        let mut out: Vec<Vec<i64>> = (0..n).map(|i| if i >= from { vec![-1; k] } else { Vec::new() }).collect();
        for r in 0..drafts.len() {
            if slot[r] > 0 && labels[r] != IGNORE {
                out[block[r] as usize][slot[r] as usize - 1] = drafts[r];
            }
        }
        Ok(out)
    })
}

/// [`compute`] and the backward pass of `scale * total` with activation checkpointing:
/// the forward pass keeps only each layer's input; the backward pass runs from the loss
/// down to the last layer's output, then recomputes one layer at a time and carries the
/// gradient of its output to its input (`backward` of `sum(output * grad)`). Parameter
/// gradients accumulate exactly as in one backward pass, up to rounding. Returns the
/// losses (their graph is already used).
pub fn backward_checkpointed(
    model: &Llama,
    adapter: &MtpAdapter,
    batch: &MtpLayout,
    lcm: Lcm,
    scale: f64,
) -> MtpLosses {
    let x = adapter.embed(model, &batch.tokens, &batch.slot);
    let gated = adapter.gated(&batch.slot, model.dtype().kind());
    let mask = additive_mask(&batch.attention_mask(), x.kind());
    let rope = model.rope_tables(&batch.positions, x.kind());
    let pass = Pass { rope: &rope, mask: AttnMask::Custom(&mask), adapter: Some(&gated), write_at: None };
    let layers = model.layers();
    let mut inputs = Vec::with_capacity(layers.len());
    let mut h = x.detach();
    tch::no_grad(|| {
        for layer in layers {
            inputs.push(h.shallow_clone());
            h = layer.forward(&h, &pass, None);
        }
    });
    let top = h.detach().set_requires_grad(true);
    let losses = from_hidden(model, adapter, batch, &model.final_norm(&top), lcm);
    if losses.total.requires_grad() {
        (&losses.total * scale).backward();
        let mut grad = top.grad();
        for (i, layer) in layers.iter().enumerate().rev() {
            // Each layer's input is let go once its gradient is taken (its own and that
            // gradient would otherwise stay until every layer is done).
            let saved = inputs.pop();
            if !grad.defined() {
                break;
            }
            // The first layer's input carries the mask embeddings' graph when they train.
            let input = match saved {
                Some(h) if i > 0 => h.set_requires_grad(true),
                _ => x.shallow_clone(),
            };
            let out = layer.forward(&input, &pass, None);
            (out * &grad).sum(Kind::Float).backward();
            if i > 0 {
                grad = input.grad();
            }
        }
    }
    losses
}

/// Every loss term from the final hidden states `z` (`[b, L, d]`) of `batch`.
pub fn from_hidden(model: &Llama, adapter: &MtpAdapter, batch: &MtpLayout, z: &Tensor, lcm_term: Lcm) -> MtpLosses {
    let device = model.device();
    let k = adapter.config.k as i64;
    let f32s = (Kind::Float, device);
    let kind = model.dtype().kind();
    let (rows, d) = (z.size()[0] * z.size()[1], z.size()[2]);
    let len = z.size()[1];
    let zf = z.reshape([rows, d]);
    let labels = batch.labels.reshape([rows]);
    let slot = batch.slot.reshape([rows]);
    let valid = labels.ne(IGNORE);

    // L_base on mask rows.
    let m_rows = rows_where(&valid.logical_and(&slot.gt(0)));
    let m_labels = labels.index_select(0, &m_rows);
    let m_slot0 = slot.index_select(0, &m_rows) - 1;
    let (base, base_correct) = head_cross_entropy(model, &zf.index_select(0, &m_rows), &m_labels, CHUNK_LOGITS);
    let per_slot =
        |values: &Tensor, slots: &Tensor| Tensor::zeros([k], f32s).index_add(0, slots, &values.to_kind(Kind::Float));
    let slot_correct = per_slot(&base_correct, &m_slot0);
    let slot_count = per_slot(&Tensor::ones_like(&m_labels), &m_slot0);

    // L_sampler on every labelled row, conditioned on the true previous token.
    let v_rows = rows_where(&valid);
    let (sampler, slot_correct_sampler) = match adapter.sampler() {
        Some(head) => {
            let v_labels = labels.index_select(0, &v_rows);
            let prev = batch.prev.reshape([rows]).index_select(0, &v_rows);
            let h = head.forward(&model.embed(&prev), &zf.index_select(0, &v_rows));
            let (loss, correct) = head_cross_entropy(model, &h.to_kind(kind), &v_labels, CHUNK_LOGITS);
            let v_slot = slot.index_select(0, &v_rows);
            let correct = correct.logical_and(&v_slot.gt(0));
            (loss, per_slot(&correct, &(v_slot - 1).clamp_min(0)))
        }
        None => (Tensor::zeros([], f32s), Tensor::zeros([k], f32s)),
    };

    // L_lcm: mask rows toward the detached state of the NTP row predicting the same token.
    let flat_target = batch.lcm_target.reshape([rows]);
    let l_rows = rows_where(&flat_target.ge(0));
    let lcm = if l_rows.size()[0] == 0 {
        Tensor::zeros([], f32s)
    } else {
        let seq_offset = l_rows.divide_scalar_mode(len, "floor") * len;
        let targets = flat_target.index_select(0, &l_rows) + seq_offset;
        let z_t = zf.index_select(0, &targets).detach().to_kind(Kind::Float);
        let z_m = zf.index_select(0, &l_rows).to_kind(Kind::Float);
        let dist = match lcm_term.reduction {
            LcmReduction::Sum => (z_t - z_m).square().sum_dim_intlist(-1, false, Kind::Float),
            LcmReduction::Mean => (z_t - z_m).square().mean_dim(-1, false, Kind::Float),
        };
        let sums = Tensor::zeros([rows], f32s).index_add(0, &targets, &dist);
        let counts = Tensor::zeros([rows], f32s).index_add(0, &targets, &Tensor::ones_like(&dist));
        let present = rows_where(&counts.gt(0.0));
        (sums.index_select(0, &present) / counts.index_select(0, &present)).mean(Kind::Float)
    };

    let total = &base + &sampler + &lcm * lcm_term.weight;
    MtpLosses {
        total,
        base,
        sampler,
        lcm,
        slot_correct,
        slot_correct_sampler,
        slot_count,
        labelled_rows: v_rows.size1().map_or(Tensor::zeros([], f32s), |n| Tensor::from(n as f32)),
    }
}
