//! Speculative decoding with the model's own mask tokens (METHOD.md section 4): the
//! quadratic scheme of the paper and the linear ablation, greedy or sampled, one forward
//! pass per step, the KV cache compacted on the device to the rows AR would have computed.
//!
//! Step input, quadratic: `[r_0 m_1..m_k, r_1 m_1..m_k, ..., r_n m_1..m_k]` with r_0 the
//! verified token not yet in the cache and r_g the drafts. Linear: `[r_0, r_1..r_n,
//! m_1..m_k]`. In both, regular row g sits at position P + g and attends the cache and
//! r_0..r_g; mask j of the block after r_g sits at P + g + j and attends the cache,
//! r_0..r_g and the masks of its block up to j. That is the training pattern with block =
//! g and slot = j, so the same builder makes it.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::ar::check_request;
use super::stats::StepStats;
use super::verify::{Verdict, verify_greedy, verify_sampling};
use super::{Decoding, GenerateRequest, Sampler};
use crate::error::{Error, Result};
use crate::model::{AttnMask, KvCache, Llama};
use crate::mtp::MtpAdapter;
use crate::mtp::masks::attention_mask;

/// How tokens are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One token per forward pass (the baseline).
    #[default]
    Ar,
    /// Drafts then one mask block (the paper's ablation).
    Linear,
    /// A mask block after every regular row (the method).
    Quadratic,
}

impl Mode {
    /// All modes.
    pub const ALL: [Mode; 3] = [Mode::Ar, Mode::Linear, Mode::Quadratic];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ar => "ar",
            Mode::Linear => "linear",
            Mode::Quadratic => "quadratic",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown mode `{s}` (ar, linear, quadratic)")))
    }
}

/// Per-row description of one forward pass's new rows: regular row g is (g, 0), mask j of
/// the block after regular row g is (g, j).
#[derive(Debug)]
pub struct StepLayout {
    /// `[T]` block (regular index) of each row.
    pub block: Tensor,
    /// `[T]` slot: 0 regular, j mask.
    pub slot: Tensor,
    /// Regular rows.
    pub regular: usize,
    /// Masks per block.
    pub masks: usize,
    /// Mode (decides where mask blocks are).
    pub mode: Mode,
}

impl StepLayout {
    /// The layout of a step with `drafts` drafts and `masks` masks per block.
    pub fn new(mode: Mode, drafts: usize, masks: usize) -> Self {
        let n = drafts as i64 + 1;
        let m = masks as i64;
        let (block, slot) = match mode {
            Mode::Quadratic => (
                Tensor::arange(n, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(m + 1, 0, None),
                Tensor::arange(m + 1, (Kind::Int64, Device::Cpu)).repeat([n]),
            ),
            _ => (
                Tensor::cat(
                    &[
                        Tensor::arange(n, (Kind::Int64, Device::Cpu)),
                        Tensor::full([m], n - 1, (Kind::Int64, Device::Cpu)),
                    ],
                    0,
                ),
                Tensor::cat(
                    &[
                        Tensor::zeros([n], (Kind::Int64, Device::Cpu)),
                        Tensor::arange_start(1, m + 1, (Kind::Int64, Device::Cpu)),
                    ],
                    0,
                ),
            ),
        };
        Self { block, slot, regular: n as usize, masks, mode }
    }

    /// Rows in the step.
    pub fn len(&self) -> usize {
        self.block.size()[0] as usize
    }

    /// True when the step has no rows (never for a built layout).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row index of regular row g.
    pub fn regular_row(&self, g: usize) -> usize {
        match self.mode {
            Mode::Quadratic => g * (self.masks + 1),
            _ => g,
        }
    }

    /// Row indices of the mask block after regular row g (empty when there is none).
    pub fn mask_rows(&self, g: usize) -> Vec<usize> {
        match self.mode {
            Mode::Quadratic => (1..=self.masks).map(|j| g * (self.masks + 1) + j).collect(),
            _ if g + 1 == self.regular => (1..=self.masks).map(|j| self.regular - 1 + j).collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_place_regular_rows_and_mask_blocks() {
        let q = StepLayout::new(Mode::Quadratic, 2, 2);
        assert_eq!(q.len(), 9);
        assert_eq!((0..3).map(|g| q.regular_row(g)).collect::<Vec<_>>(), [0, 3, 6]);
        assert_eq!(q.mask_rows(1), [4, 5]);
        assert_eq!(Vec::<i64>::try_from(&q.slot).unwrap_or_default(), [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        let l = StepLayout::new(Mode::Linear, 2, 2);
        assert_eq!(l.len(), 5);
        assert_eq!((0..3).map(|g| l.regular_row(g)).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(l.mask_rows(2), [3, 4]);
        assert!(l.mask_rows(0).is_empty());
        assert_eq!(Vec::<i64>::try_from(&l.block).unwrap_or_default(), [0, 1, 2, 2, 2]);
    }
}

/// The top candidates of one row, for display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    /// Token ids, most likely first.
    pub ids: Vec<i64>,
    /// Their probabilities.
    pub probs: Vec<f32>,
}

/// Everything about one step that the step-through view shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDetail {
    /// Input token of each row (mask rows: -(j) for mask m_j).
    pub inputs: Vec<i64>,
    /// Block of each row.
    pub block: Vec<i64>,
    /// Slot of each row.
    pub slot: Vec<i64>,
    /// RoPE position of each row.
    pub positions: Vec<i64>,
    /// Cached rows before the step.
    pub past: usize,
    /// `[T][T]` attention among the step's rows (every row also sees the whole cache).
    pub attention: Vec<Vec<bool>>,
    /// Base-model top-5 after each regular row (what verification compares drafts with).
    pub regular_top: Vec<Candidates>,
    /// For the mask block that made the next drafts: the top-5 of each slot.
    pub draft_top: Vec<Candidates>,
    /// The next drafts.
    pub next_drafts: Vec<i64>,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Accepted drafts, in order.
    pub accepted: Vec<i64>,
    /// The next verified token.
    pub next: i64,
    /// Statistics (emitted is filled in by the caller that applies EOS and limits).
    pub stats: StepStats,
    /// Details when asked for.
    pub detail: Option<Box<StepDetail>>,
}

/// A speculative decoder in progress: the cache holds the prompt and every emitted token
/// except `pending`, the verified token the next step starts with.
pub struct SpecDecoder<'a> {
    model: &'a Llama,
    adapter: &'a MtpAdapter,
    mode: Mode,
    masks: usize,
    sampler: Sampler,
    cache: KvCache,
    /// The verified token not yet in the cache.
    pub pending: i64,
    drafts: Vec<i64>,
    q: Vec<Vec<f32>>,
    steps: usize,
    /// Layout tensors by number of drafts (0..=masks), built on first use.
    plans: std::collections::HashMap<usize, (StepLayout, RowPlan)>,
}

fn top5(probs: &Tensor) -> Vec<Candidates> {
    let k = 5.min(probs.size().last().copied().unwrap_or(1));
    let (p, i) = probs.topk(k, -1, true, true);
    let rows = p.size()[0];
    (0..rows)
        .map(|r| Candidates {
            ids: Vec::<i64>::try_from(i.get(r)).unwrap_or_default(),
            probs: Vec::<f32>::try_from(p.get(r).to_kind(Kind::Float)).unwrap_or_default(),
        })
        .collect()
}

fn to_rows(t: &Tensor) -> Vec<Vec<f32>> {
    (0..t.size()[0]).map(|r| Vec::<f32>::try_from(t.get(r).to_device(Device::Cpu)).unwrap_or_default()).collect()
}

/// Device-side tensors of one layout of new rows (a given number of drafts), built once
/// and reused by every step with that layout.
struct RowPlan {
    /// `[T]` position offsets from the cache length: block + slot.
    offsets: Tensor,
    /// `[T, T]` attention among the new rows.
    own_mask: Tensor,
    /// `[1, T, d]`: each mask row's mask embedding (zero on regular rows).
    mask_embeds: Tensor,
    /// `[1, T, 1]`: true on mask rows.
    is_mask: Tensor,
    /// `[1, T, 1]`: the adapter's gate.
    gate: Option<Tensor>,
}

impl RowPlan {
    fn new(model: &Llama, adapter: &MtpAdapter, block: &Tensor, slot: &Tensor) -> Self {
        let device = model.device();
        tch::no_grad(|| {
            let slot_d = slot.to_device(device).unsqueeze(0);
            let zeros = Tensor::zeros_like(&slot_d);
            let mask_embeds =
                adapter.embed(model, &zeros, &slot_d) * slot_d.gt(0).unsqueeze(-1).to_kind(model.dtype().kind());
            Self {
                offsets: (block + slot).to_device(device),
                own_mask: attention_mask(block, slot).to_device(device),
                mask_embeds,
                is_mask: slot_d.gt(0).unsqueeze(-1),
                gate: adapter.gated(&slot_d).gate,
            }
        })
    }
}

/// The forward pass of new rows laid out by `plan`: `tokens` on regular rows, mask
/// embeddings on mask rows, positions `past + block + slot`, attention to the whole cache
/// plus the plan's pattern among the new rows, the adapter gated to mask rows. Returns the
/// final hidden states `[T, d]`; the rows' keys and values are appended to `cache`.
fn forward_rows(model: &Llama, adapter: &MtpAdapter, plan: &RowPlan, tokens: &[i64], cache: &mut KvCache) -> Tensor {
    let device = model.device();
    let past = cache.len() as i64;
    let t = tokens.len() as i64;
    tch::no_grad(|| {
        let tok = Tensor::from_slice(tokens).to_device(device).unsqueeze(0);
        let x = plan.mask_embeds.where_self(&plan.is_mask, &model.embed(&tok));
        let positions = &plan.offsets + past;
        let mask = if past == 0 {
            plan.own_mask.shallow_clone()
        } else {
            Tensor::cat(&[Tensor::ones([t, past], (Kind::Bool, device)), plan.own_mask.shallow_clone()], 1)
        };
        let gated = crate::model::Gated { delta: adapter, gate: plan.gate.as_ref().map(Tensor::shallow_clone) };
        model.forward_embeds(&x, &positions, AttnMask::Custom(&mask), Some(&gated), Some(cache)).squeeze_dim(0)
    })
}

fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default()
}

impl<'a> SpecDecoder<'a> {
    /// Check the request, run the prefill (prompt + one mask block) and choose the first
    /// token and the first drafts. Returns the decoder and the first token.
    pub fn start(
        model: &'a Llama,
        adapter: &'a MtpAdapter,
        mode: Mode,
        masks: usize,
        req: &GenerateRequest,
    ) -> Result<(Self, i64)> {
        if mode == Mode::Ar {
            return Err(Error::Invalid("SpecDecoder runs linear or quadratic decoding".into()));
        }
        if masks == 0 || masks > adapter.config.k {
            return Err(Error::Invalid(format!(
                "--masks {masks} is out of range: the adapter was trained with k = {} masks (use 1..={})",
                adapter.config.k, adapter.config.k
            )));
        }
        check_request(model, req, 2 * masks + 1)?;
        let p = req.prompt_ids.len();
        let mut cache = model.new_cache(p + req.max_new_tokens + (masks + 1) * (masks + 1) + masks + 1);
        let sampler = Sampler::new(req.decoding)?;

        // Prompt rows are regular rows of blocks 0..P-1; one mask block follows the last.
        let block = Tensor::cat(
            &[
                Tensor::arange(p as i64, (Kind::Int64, Device::Cpu)),
                Tensor::full([masks as i64], p as i64 - 1, (Kind::Int64, Device::Cpu)),
            ],
            0,
        );
        let slot = Tensor::cat(
            &[
                Tensor::zeros([p as i64], (Kind::Int64, Device::Cpu)),
                Tensor::arange_start(1, masks as i64 + 1, (Kind::Int64, Device::Cpu)),
            ],
            0,
        );
        let mut tokens = req.prompt_ids.clone();
        tokens.extend(std::iter::repeat_n(0, masks));
        let h = forward_rows(model, adapter, &RowPlan::new(model, adapter, &block, &slot), &tokens, &mut cache);
        // The mask rows were only needed for the first drafts.
        cache.truncate(p);
        let mut decoder = Self {
            model,
            adapter,
            mode,
            masks,
            sampler,
            cache,
            pending: 0,
            drafts: Vec::new(),
            q: Vec::new(),
            steps: 0,
            plans: std::collections::HashMap::new(),
        };
        let first = tch::no_grad(|| {
            let logits = model.logits(&h.narrow(0, p as i64 - 1, 1)).to_kind(Kind::Float);
            decoder.choose(&logits)
        });
        let z = h.narrow(0, p as i64, masks as i64);
        decoder.pending = first;
        decoder.draft(&z, first, None);
        Ok((decoder, first))
    }

    /// A token from one row of logits (`[1, V]`): argmax, or a draw from the processed
    /// distribution.
    fn choose(&mut self, logits: &Tensor) -> i64 {
        self.sampler.pick(&logits.view([-1]))
    }

    /// Draft the next `masks` tokens from mask hidden states `z` (`[m, d]`), the chain
    /// seeded with the verified token `b`: the sampler head sees the previous token's
    /// embedding; without it, drafts are the LM head's choice at each mask. Fills the top-5
    /// of each slot into `detail` when given.
    fn draft(&mut self, z: &Tensor, b: i64, detail: Option<&mut Vec<Candidates>>) {
        let model = self.model;
        let kind = model.dtype().kind();
        let device = model.device();
        let decoding = self.sampler.decoding();
        let mut drafts = Vec::with_capacity(self.masks);
        let mut q = Vec::new();
        let mut probs_rows = Vec::new();
        tch::no_grad(|| match self.adapter.sampler() {
            Some(head) => {
                let mut prev = Tensor::from_slice(&[b]).to_device(device);
                let mut chosen = Vec::new();
                for j in 0..self.masks as i64 {
                    let h = head.forward(&model.embed(&prev), &z.narrow(0, j, 1));
                    let logits = model.logits(&h.to_kind(kind)).to_kind(Kind::Float);
                    match decoding {
                        Decoding::Greedy => {
                            prev = logits.argmax(-1, false);
                            chosen.push(prev.shallow_clone());
                            if detail.is_some() {
                                probs_rows.push(logits.softmax(-1, Kind::Float));
                            }
                        }
                        Decoding::Sample(params) => {
                            let dist = params.distribution(&logits).view([-1]);
                            let row: Vec<f32> = Vec::try_from(dist.to_device(Device::Cpu)).unwrap_or_default();
                            let d = self.sampler.draw_slice(&row);
                            drafts.push(d);
                            q.push(row);
                            probs_rows.push(dist.unsqueeze(0));
                            prev = Tensor::from_slice(&[d]).to_device(device);
                        }
                    }
                }
                if !chosen.is_empty() {
                    drafts = ints(&Tensor::cat(&chosen, 0));
                }
            }
            None => {
                let logits = model.logits(z).to_kind(Kind::Float);
                match decoding {
                    Decoding::Greedy => {
                        drafts = ints(&logits.argmax(-1, false));
                        probs_rows.push(logits.softmax(-1, Kind::Float));
                    }
                    Decoding::Sample(params) => {
                        let dist = params.distribution(&logits);
                        for row in to_rows(&dist) {
                            drafts.push(self.sampler.draw_slice(&row));
                            q.push(row);
                        }
                        probs_rows.push(dist);
                    }
                }
            }
        });
        if let Some(out) = detail
            && !probs_rows.is_empty()
        {
            *out = top5(&Tensor::cat(&probs_rows, 0));
        }
        self.drafts = drafts;
        self.q = q;
    }

    /// The drafts the next step will verify.
    pub fn drafts(&self) -> &[i64] {
        &self.drafts
    }

    /// Rows in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// One forward pass: verify the drafts, keep the accepted rows in the cache, choose the
    /// next verified token and draft again. With `detailed`, also returns what the
    /// step-through view shows.
    pub fn step(&mut self, detailed: bool) -> StepResult {
        let t0 = Instant::now();
        self.steps += 1;
        let drafts = std::mem::take(&mut self.drafts);
        let q = std::mem::take(&mut self.q);
        let n = drafts.len();
        let (model, adapter, mode, masks) = (self.model, self.adapter, self.mode, self.masks);
        // Taken out of the map for the step (the step also borrows `self` mutably), put back
        // at the end.
        let (layout, plan) = self.plans.remove(&n).unwrap_or_else(|| {
            let layout = StepLayout::new(mode, n, masks);
            let plan = RowPlan::new(model, adapter, &layout.block, &layout.slot);
            (layout, plan)
        });
        let mut tokens = vec![0i64; layout.len()];
        tokens[layout.regular_row(0)] = self.pending;
        for (g, &d) in drafts.iter().enumerate() {
            tokens[layout.regular_row(g + 1)] = d;
        }
        let past = self.cache.len();
        let h = forward_rows(model, adapter, &plan, &tokens, &mut self.cache);

        let device = self.model.device();
        let regular: Vec<i64> = (0..layout.regular).map(|g| layout.regular_row(g) as i64).collect();
        let reg_idx = Tensor::from_slice(&regular).to_device(device);
        let logits = tch::no_grad(|| self.model.logits(&h.index_select(0, &reg_idx)).to_kind(Kind::Float));
        let verdict = match self.sampler.decoding() {
            Decoding::Greedy => verify_greedy(&drafts, &ints(&logits.argmax(-1, false))),
            Decoding::Sample(params) => {
                let p = to_rows(&tch::no_grad(|| params.distribution(&logits)));
                verify_sampling(&drafts, &q, &p, &mut self.sampler)
            }
        };
        let Verdict { accepted: a, next } = verdict;

        // Keep the cache rows of r_0..r_a: exactly the rows AR would have computed.
        let keep = Tensor::from_slice(&regular[..=a]).to_device(device);
        self.cache.keep_tail(past, &keep);
        self.pending = next;

        // Next drafts: the mask block after r_a (linear: only when every draft was accepted).
        let mask_rows = layout.mask_rows(a);
        let mut draft_top = Vec::new();
        if !mask_rows.is_empty() {
            let rows: Vec<i64> = mask_rows.iter().map(|&r| r as i64).collect();
            let z = h.index_select(0, &Tensor::from_slice(&rows).to_device(device));
            self.draft(&z, next, detailed.then_some(&mut draft_top));
        }

        let stats = StepStats {
            step: self.steps,
            drafts: drafts.clone(),
            accepted: a,
            first_rejected: (a < n).then_some(a + 1),
            emitted: a + 1,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let detail = detailed.then(|| {
            let probs = tch::no_grad(|| logits.softmax(-1, Kind::Float));
            let inputs = tokens.iter().zip(ints(&layout.slot)).map(|(&t, s)| if s > 0 { -s } else { t }).collect();
            Box::new(StepDetail {
                inputs,
                block: ints(&layout.block),
                slot: ints(&layout.slot),
                positions: ints(&(&layout.block + &layout.slot + past as i64)),
                past,
                attention: (0..layout.len() as i64)
                    .map(|r| Vec::<bool>::try_from(plan.own_mask.get(r).to_device(Device::Cpu)).unwrap_or_default())
                    .collect(),
                regular_top: top5(&probs),
                draft_top,
                next_drafts: self.drafts.clone(),
            })
        });
        self.plans.insert(n, (layout, plan));
        StepResult { accepted: drafts[..a].to_vec(), next, stats, detail }
    }
}
