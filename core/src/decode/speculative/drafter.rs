//! The adapter as decoding uses it: its parts copied once into the shapes and dtype a step
//! wants (mask embeddings in the model's dtype, LoRA factors restacked per projection group,
//! the sampler head split for chained drafting, the LM-head rows of the draft vocabulary),
//! and the draft chain itself.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use tch::{Device, Kind, Tensor};

use super::super::sampling::{Sampler, SamplingParams};
use super::super::strategy::{Layout, MaskCount};
use super::super::verify::first_largest;
use super::fixed::FixedSteps;
use super::layout::{StepLayout, StepPlan};
use super::masks::MaskController;
use crate::error::{Error, Result};
use crate::model::int8::Int8Panels;
use crate::model::{Gate, Gated, KvCache, Llama, few_rows};
use crate::mtp::gated_lora::PreparedLora;
use crate::mtp::sampler::PreparedSampler;
use crate::mtp::{MtpAdapter, MtpConfig};

/// The softmax probability of `logits[top]`, the largest: one over the sum of
/// `exp(l - l[top])`.
fn top_probability(logits: &[f32], top: usize) -> f32 {
    let max = logits[top];
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    1.0 / total
}

/// One mask block's greedy drafts, made on host vectors ([`Drafter::greedy_on_host`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HostDrafts {
    /// The drafts, in order.
    pub ids: Vec<i64>,
    /// When asked for: each draft's probability under the drafter given the drafts before
    /// it (the softmax of its logits over the draft vocabulary, where it has one), the
    /// chance that the model writes it if the drafter is calibrated; else empty.
    pub confidence: Vec<f32>,
}

/// A step plan's shape: layout, drafts, masks a block, the regular rows with a block.
type PlanKey = (Layout, usize, usize, Vec<usize>);

/// Plans a drafter keeps before it forgets the pruned ones.
const MAX_PLANS: usize = 256;

/// Choices made when preparing a drafter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftOptions {
    /// Draft from the adapter's draft vocabulary (when it has one) instead of the whole
    /// LM head. Verification always uses the whole head, so greedy output is unchanged.
    pub draft_vocab: bool,
    /// How a step applies the adapter's low-rank term.
    pub lora: LoraForm,
    /// The arithmetic of a step's mask rows.
    pub arithmetic: DraftArithmetic,
}

impl Default for DraftOptions {
    fn default() -> Self {
        Self { draft_vocab: true, lora: LoraForm::Auto, arithmetic: DraftArithmetic::Auto }
    }
}

/// The arithmetic of a decoding step's mask rows, whose outputs are only drafts: the
/// next-token rows are computed in the model's dtype either way (an f32 model's bit for
/// bit as AR computes them), so greedy output is AR's whatever the choice; the drafts, and
/// so the acceptance, may differ in near-ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftArithmetic {
    /// [`DraftArithmetic::Int8`] for an f32 model's steps where it runs (AVX2 and FMA):
    /// every mask row, or for a model whose weights are read from memory from
    /// [`AHEAD_MIN_MASK_ROWS`] of them on an AMD CPU before Zen 5 and
    /// [`BF16_MIN_MASK_ROWS`] elsewhere ([`auto_int8_min_rows`]); else
    /// [`DraftArithmetic::Bf16`] for an f32 model's steps with at least
    /// [`BF16_MIN_MASK_ROWS`] mask rows, where it runs and pays
    /// ([`few_rows::bf16_pairs_pay`]: an AMD CPU before Zen 5); [`DraftArithmetic::Exact`]
    /// otherwise (a bf16 model's included).
    #[default]
    Auto,
    /// The model's own dtype.
    Exact,
    /// On a CPU with AVX-512 BF16 (Zen 4, Sapphire Rapids and later): the mask rows' base
    /// products in bf16 (an f32 model's values rounded to bf16, a bf16 model's as they
    /// are; products summed in f32), twice the multiply-adds a core does in f32. Elsewhere
    /// the same as `Exact`.
    Bf16,
    /// On a CPU with AVX2 and FMA, an f32 model: the mask rows' base products in int8
    /// (each adapted group's weight quantized per output row when the drafter is prepared,
    /// a quarter of its f32 bytes held once more; the rows quantized per row as they come;
    /// sums in int32, the adapter's term in f32), four times the multiply-adds a core does
    /// in f32 with AVX-512 VNNI (Zen 4, Ice Lake and later), about 1.7 times with AVX2's
    /// `vpmaddubsw` (Zen 3, fifty-first session); the draft chain's head and its sampler's
    /// products too (on host vectors, [`Drafter::greedy_on_host`]). With AMX (Sapphire
    /// Rapids and later) a step's mask rows of large weights go through its tiles, the same
    /// sums. Elsewhere the same as `Bf16`.
    Int8,
}

/// The fewest mask rows for which `auto` multiplies them in bf16 (and in int8, for a model
/// whose weights are read from memory: [`auto_int8_min_rows`]): a step whose products
/// are bound by arithmetic (a 3- or 4-mask quadratic step, 12 or 20 mask rows). With fewer,
/// the products wait on reading the weights (SmolLM2-135M's 9-row products took as long
/// with the mask rows in bf16, docs/BENCHMARKS.md).
pub const BF16_MIN_MASK_ROWS: usize = 12;

impl DraftArithmetic {
    /// Every choice, as named on the command line.
    pub const ALL: [DraftArithmetic; 4] =
        [DraftArithmetic::Auto, DraftArithmetic::Exact, DraftArithmetic::Bf16, DraftArithmetic::Int8];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            DraftArithmetic::Auto => "auto",
            DraftArithmetic::Exact => "exact",
            DraftArithmetic::Bf16 => "bf16",
            DraftArithmetic::Int8 => "int8",
        }
    }

    /// The fewest mask rows a step multiplies in bf16 with `model`; `None`: never (the
    /// CPU or the model's device or dtype cannot, or `Exact`).
    pub fn bf16_min_rows(self, model: &Llama) -> Option<usize> {
        let f32_model = crate::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind());
        let bf16_model = bf16_on_our_kernel(model);
        match self {
            _ if !few_rows::bf16_available() || !(f32_model || bf16_model) => None,
            // A bf16 model's mask rows in pairs ([`few_rows::product_bf16_tail`]) measured
            // slower than widened to f32 as its next-token rows are, at 2 to 72 mask rows
            // (docs/BENCHMARKS.md, "bf16 models on the CPU").
            DraftArithmetic::Auto if bf16_model => None,
            // Where the pairs measured slower than the f32 tiles (an Intel Xeon): exact.
            DraftArithmetic::Auto if !few_rows::bf16_pairs_pay() => None,
            DraftArithmetic::Auto => Some(BF16_MIN_MASK_ROWS),
            DraftArithmetic::Bf16 | DraftArithmetic::Int8 => Some(1),
            DraftArithmetic::Exact => None,
        }
    }

    /// The fewest mask rows a step multiplies in int8 with `model`; `None`: never (the CPU
    /// has no AVX2, the model is not f32 on the CPU's few-row kernel, or not `Int8`).
    pub fn int8_min_rows(self, model: &Llama) -> Option<usize> {
        let f32_model = crate::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind());
        match self {
            DraftArithmetic::Int8 if f32_model && crate::model::int8::available() => Some(1),
            DraftArithmetic::Auto if f32_model && crate::model::int8::available() => {
                Some(auto_int8_min_rows(layer_bytes(model) * model.config.num_layers, few_rows::amd_before_zen5()))
            }
            _ => None,
        }
    }
}

named_choices!(DraftArithmetic, "draft arithmetic");

/// The f32 projection weights (all layers) above which a step reads them from memory rather
/// than from a cache: beyond the last-level cache of every CPU measured (32 MiB on the
/// EPYCs of docs/BENCHMARKS.md; the demo holds 18 MB, the proxy 4.3 MB, SmolLM2-135M 425 MB).
pub const FROM_MEMORY_BYTES: usize = 64 << 20;

/// The fewest mask rows `auto` multiplies in int8 for a model of `projection_bytes` (f32,
/// all layers), with `ahead` where the int8 tiles overlapping the next chunk's read pay
/// early (an AMD CPU before Zen 5: [`few_rows::amd_before_zen5`]). Where the weights come
/// from a cache (the demo, the proxy), every mask row: a step of 1, 2 or 4 masks cost the
/// same or less with them in int8 (Zen 4, one process, the forms in turns;
/// docs/BENCHMARKS.md, "Mask rows in int8"; on an Emerald Rapids Xeon, the sixty-third
/// session, the demo's 1 / 2 / 4-mask steps ran 1,872-2,158 / 2,183-2,223 / 1,362-1,480
/// tokens/s exact against 1,923-2,017 / 2,238-2,268 / 2,092-2,188 in int8). Where they
/// are read from memory, the int8 copy is a quarter of their bytes read once more, which
/// pays only once the f32 rows' arithmetic outweighs it:
/// - from [`BF16_MIN_MASK_ROWS`] (a 3- or 4-mask quadratic step's 12 or 20 mask rows)
///   elsewhere: the Intel Xeons and the Zen 5 measured, whose cores do twice a Zen 3 or 4
///   core's f32 multiply-adds a cycle, with or without AMX tiles (whose products run apart
///   from the f32 rows' read). SmolLM2-135M's
///   shape on an Emerald Rapids Xeon without AMX (`mtp bench`, in turns, sixty-third
///   session): 1 / 2 / 3 / 4 masks 1.13-1.14 / 1.34-1.36 / 1.60-1.63 / 2.05-2.09 AR steps
///   exact against 1.42 / 1.52 / 1.65-1.66 / 1.78-1.79 in int8 (the fortieth session's,
///   also without AMX, before the chunks: 1 / 2 / 4 masks 1.09 / 1.30 / 1.87 against 1.23
///   / 1.49 / 1.73, `step_profile`). With AMX tiles the same 12 (forty-third session). On a
///   Zen 5 EPYC (sixty-fourth session, four rounds in turns) the 2-mask step ran 1.13-1.15
///   AR steps exact against 1.17-1.19 in int8, the 3-mask step 1.21-1.23 against 1.20-1.23.
/// - from [`AHEAD_MIN_MASK_ROWS`] on an AMD CPU before Zen 5, where the chunks' int8
///   arithmetic (`model::int8`'s `AHEAD_CHUNK`) overlaps the read: on a Zen 3 (`mtp bench`, in turns,
///   fifty-first session) 1 / 2 / 4 masks 1.15-1.25 / 1.71-1.75 / 2.86-2.93 AR steps exact
///   against 1.31-1.37 / 1.47-1.58 / 2.23-2.39 in int8.
pub fn auto_int8_min_rows(projection_bytes: usize, ahead: bool) -> usize {
    match projection_bytes > FROM_MEMORY_BYTES {
        false => 1,
        true if ahead => AHEAD_MIN_MASK_ROWS,
        true => BF16_MIN_MASK_ROWS,
    }
}

/// Whether a drafter's int8 panels for `model` are short ([`Int8Panels::of`]: values in
/// `[-32, 32]`, for AVX2's faster tiles; VNNI's ignore it): where its weights come from a
/// cache, so that a step's mask rows wait on arithmetic. The demo's whole 4-mask int8 step
/// on a Zen 3 (`step_profile 4`, fastest rounds, three pairs of runs in turns) 3,027 /
/// 2,666 / 2,357 us with 127 levels against 2,799 / 2,423 / 2,132 short, for 2.63 -> 2.60
/// tokens per forward (2.62 exact). Where they are read from memory, the tiles overlap the
/// read and their speed bought nothing (SmolLM2-135M's shape, `mtp bench`, 4-mask step
/// 2.13-2.25 AR steps either way, three rounds), while the coarser weights cost real models drafts:
/// SmolLM2-135M-Instruct with every projection's rows in int8 agreed with f32 on 99.5% of
/// its confident next tokens (top probability over 0.5, 1,536 tokens of README, Python and
/// METHOD.md text) at 127 levels and 97.9% at 32 (docs/BENCHMARKS.md, fifty-second
/// session).
pub fn int8_short_panels(model: &Llama) -> bool {
    layer_bytes(model) * model.config.num_layers <= FROM_MEMORY_BYTES
}

/// The fewest mask rows `auto` multiplies in int8 for a model whose weights are read from
/// memory, where the tiles overlap the read and pay early (an AMD CPU before Zen 5:
/// [`auto_int8_min_rows`]): a 2-mask quadratic step's 6 (a 1-mask step's 2 stay f32, whose
/// arithmetic is too short to hide a read).
pub const AHEAD_MIN_MASK_ROWS: usize = 6;

/// How a decoding step applies the adapter's term to the mask rows. Either way the
/// next-token rows are untouched (the base model's, bit for bit) and greedy output is
/// AR's; the forms differ in cost only (and in the last bits of the drafts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraForm {
    /// [`LoraForm::Merged`] where a layer's weights are small enough that a step's time is
    /// the number of operations and the weights held once more cost little to read (on the
    /// CPU up to 1 MiB per layer, on CUDA up to 64 MiB; never for a bf16 model on the CPU,
    /// whose products our kernel runs without a second weight), else [`LoraForm::LowRank`].
    /// On the CPU the two measured: the launch-bound proxy (width 64, 24 layers, 0.18 MB a
    /// layer) 1.66-1.72 AR steps a 2-mask step merged against 1.74-1.79 low-rank; the demo
    /// (2.9 MB a layer) 1.84 against 1.46-1.53 (docs/BENCHMARKS.md).
    #[default]
    Auto,
    /// Two small products per projection group on the mask rows, added in place: no
    /// memory beyond the factors, two more operations per group (none on a CPU whose
    /// few-row kernel runs them with the base product).
    LowRank,
    /// Each group's weight with the delta merged in (`W + s B A`, made once). Where the
    /// CPU's few-row kernel runs: the mask rows read it and the next-token rows the base
    /// weight, in one call (no term to compute, the adapted weights held once more).
    /// Elsewhere: stacked with the base weight and the step's rows packed as two halves
    /// ([`crate::model::Gate::Halves`]): one batched product per group, no operation
    /// beyond AR's, the layer weights held twice more, and padding rows when the halves
    /// differ in length.
    Merged,
    /// Each group's base weight held once more with the `A` factors stacked after it
    /// (`[W; A]`, made once): on libtorch's general path (a GPU) one product gives a step's
    /// base outputs and the mask rows' `x A^T`, then one in-place product adds their term:
    /// one operation per group beyond AR's where [`LoraForm::LowRank`] issues two, the
    /// layer weights held once more (not read twice, as the merged form's halves are).
    /// Where the CPU's few-row kernel runs the products, [`LoraForm::LowRank`] (the kernel
    /// computes the term with the base product already). Never chosen by `auto` until a GPU
    /// has measured it (docs/BENCHMARKS.md).
    Folded,
}

impl LoraForm {
    /// Every form, as named on the command line.
    pub const ALL: [LoraForm; 4] = [LoraForm::Auto, LoraForm::LowRank, LoraForm::Merged, LoraForm::Folded];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            LoraForm::Auto => "auto",
            LoraForm::LowRank => "low-rank",
            LoraForm::Merged => "merged",
            LoraForm::Folded => "folded",
        }
    }

    /// The form to run with `model` for an adapter (`gated`: the method's gate; a plain
    /// LoRA adapter changes every row and always runs low-rank).
    pub fn resolve(self, model: &Llama, gated: bool) -> LoraForm {
        if !gated {
            return LoraForm::LowRank;
        }
        match self {
            // Where our kernel runs a bf16 model's products, only its f32 form reads merged
            // weights ([`few_rows::product_two_weights`]): the term runs on its own.
            LoraForm::Auto if bf16_on_our_kernel(model) => LoraForm::LowRank,
            LoraForm::Folded if crate::model::linear::few_row_products_ours(model.device(), model.dtype().kind()) => {
                LoraForm::LowRank
            }
            LoraForm::Auto => {
                let limit = if model.device().is_cuda() { 64 << 20 } else { 1 << 20 };
                if layer_bytes(model) <= limit { LoraForm::Merged } else { LoraForm::LowRank }
            }
            form => form,
        }
    }
}

/// Whether `model` is a bf16 model whose products our CPU kernel runs.
fn bf16_on_our_kernel(model: &Llama) -> bool {
    model.dtype().kind() == Kind::BFloat16
        && crate::model::linear::few_row_products_ours(model.device(), model.dtype().kind())
}

/// Bytes of one decoder layer's projection weights in the model's dtype.
fn layer_bytes(model: &Llama) -> usize {
    let c = &model.config;
    let params: usize = crate::model::Proj::ALL
        .iter()
        .map(|&p| {
            let (i, o) = crate::mtp::gated_lora::proj_dims(c, p);
            i * o
        })
        .sum();
    params * model.dtype().kind().elt_size_in_bytes()
}

named_choices!(LoraForm, "adapter form");

/// An [`MtpAdapter`] prepared for decoding with one model. Build it once per adapter (it
/// copies the adapter's weights) and share it between generations (on one thread: it
/// caches step constants as they are first needed).
pub struct Drafter {
    /// The method's config of the adapter.
    pub config: MtpConfig,
    /// `[k, d]` in the model's dtype.
    mask_embeddings: Tensor,
    lora: PreparedLora,
    /// The form the adapter's term runs in (resolved: never `Auto`).
    form: LoraForm,
    /// Steps pack their rows as two halves ([`Gate::Halves`]): merged weights where the
    /// CPU's few-row kernel does not run.
    halves: bool,
    /// The arithmetic of the mask rows, as asked for.
    arithmetic: DraftArithmetic,
    sampler: Option<PreparedSampler>,
    /// `[N]` int64: token id of each row of `head`, when drafting from a draft vocabulary.
    vocab: Option<Tensor>,
    /// The same ids in host memory, for the chain on the CPU.
    vocab_ids: Option<Vec<i64>>,
    /// `[N, d]` (or the whole `[V, d]` head, shared, not copied): the LM-head rows drafts
    /// are chosen from, multiplied like a projection ([`crate::model::linear::linear`]:
    /// on the CPU our few-row kernel, which streams the rows once).
    head: Tensor,
    /// `head` quantized to int8 panels where the mask rows are multiplied in int8: the
    /// draft chain on host vectors reads it (a quarter of the bytes, four times the
    /// multiply-adds an instruction) in place of `head`.
    head_int8: Option<Int8Panels>,
    /// Step constants by shape, built on first use and shared by every generation.
    plans: RefCell<HashMap<PlanKey, Rc<StepPlan>>>,
    /// What the last generation's `auto` mask controller learned (per layout), so that the
    /// next one starts from it rather than from nothing.
    controllers: RefCell<HashMap<Layout, MaskController>>,
    /// With fixed-shape steps: per layout and mask count, the last generation's cache and
    /// its recorded steps, kept so that the next generation replays them (with the address
    /// of the model they were recorded with).
    pub(super) kept: RefCell<HashMap<(Layout, MaskCount), Kept>>,
}

/// A speculative generation's cache and recorded steps, left for the next one.
pub(super) struct Kept {
    /// The model they were recorded with (its address).
    pub model: usize,
    /// The cache whose buffers the recordings write to.
    pub cache: KvCache,
    /// The recordings, by step shape.
    pub fixed: FixedSteps,
}

impl std::fmt::Debug for Drafter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drafter")
            .field("config", &self.config)
            .field("draft_vocab", &self.vocab.as_ref().map(|v| v.size()[0]))
            .finish()
    }
}

impl Drafter {
    /// Prepare `adapter` for decoding with `model` (the model it was loaded for).
    pub fn new(model: &Llama, adapter: &MtpAdapter, options: DraftOptions) -> Result<Self> {
        let kind = model.dtype().kind();
        let device = model.device();
        if adapter.device() != device {
            return Err(Error::Invalid(format!(
                "the adapter is on {:?} and the model on {device:?}: load both on one device",
                adapter.device()
            )));
        }
        tch::no_grad(|| {
            let vocab_ids = match (&adapter.draft_vocab, options.draft_vocab) {
                (Some(ids), true) => Some(ids.clone()),
                _ => None,
            };
            let vocab = vocab_ids.as_ref().map(|ids| Tensor::from_slice(ids).to_device(device));
            let head = match &vocab {
                Some(ids) => model.lm_head.index_select(0, ids),
                None => model.lm_head.shallow_clone(),
            };
            let form = options.lora.resolve(model, adapter.config.gated);
            let int8_rows = options.arithmetic.int8_min_rows(model);
            let short = int8_short_panels(model);
            // The chain drafts one token at a time: a row of mask rows' arithmetic.
            let head_int8 =
                int8_rows.filter(|_| crate::model::int8::available()).and_then(|_| Int8Panels::of(&head, short));
            Ok(Self {
                config: adapter.config.clone(),
                mask_embeddings: adapter.mask_embeddings.detach().to_kind(kind),
                lora: adapter
                    .prepared_lora(model, form == LoraForm::Merged)
                    .with_folded_base(form == LoraForm::Folded)
                    .with_bf16_tail(options.arithmetic.bf16_min_rows(model))
                    .with_int8_tail(int8_rows, short),
                form,
                halves: form == LoraForm::Merged
                    && !crate::model::linear::few_row_products_ours(model.device(), model.dtype().kind()),
                arithmetic: options.arithmetic,
                // The chain's first product for each previous token, computed once for the
                // tokens drafts come from (the draft vocabulary, else a small vocabulary).
                sampler: adapter.sampler().map(|s| {
                    let prepared = s.prepare().with_int8(head_int8.is_some(), short);
                    if crate::model::linear::few_row_kernel_runs(device, kind) {
                        prepared.with_prev_table(&model.embed_tokens, vocab_ids.as_deref())
                    } else {
                        prepared
                    }
                }),
                vocab,
                vocab_ids,
                head,
                head_int8,
                plans: RefCell::default(),
                controllers: RefCell::default(),
                kept: RefCell::default(),
            })
        })
    }

    /// The device constants of a step of `layout` with `drafts` drafts and `masks` masks,
    /// built once per shape and shared by every generation with this drafter.
    pub fn plan(&self, model: &Llama, layout: Layout, drafts: usize, masks: usize) -> Result<Rc<StepPlan>> {
        self.plan_of(model, StepLayout::new(layout, drafts, masks))
    }

    /// [`Drafter::plan`] for any layout, a pruned one ([`StepLayout::with_blocks`]) too.
    pub fn plan_of(&self, model: &Llama, rows: StepLayout) -> Result<Rc<StepPlan>> {
        let key = (rows.layout, rows.drafts, rows.masks, rows.blocks.clone());
        if let Some(plan) = self.plans.borrow().get(&key) {
            return Ok(Rc::clone(plan));
        }
        let plan = Rc::new(StepPlan::new(model, self, rows)?);
        let mut plans = self.plans.borrow_mut();
        // Pruned layouts come in up to 2^(drafts + 1) subsets of blocks: past a few hundred
        // plans, forget them (the full layouts stay).
        if plans.len() >= MAX_PLANS {
            plans.retain(|(layout, drafts, _, blocks), _| *layout == Layout::Linear || blocks.len() == drafts + 1);
        }
        plans.insert(key, Rc::clone(&plan));
        Ok(plan)
    }

    /// The form the adapter's term runs in.
    pub fn form(&self) -> LoraForm {
        self.form
    }

    /// The arithmetic of the mask rows, as asked for.
    pub fn arithmetic(&self) -> DraftArithmetic {
        self.arithmetic
    }

    /// The fewest mask rows a step multiplies in bf16 (`None`: never).
    pub fn bf16_min_rows(&self) -> Option<usize> {
        self.lora.bf16_min_rows()
    }

    /// The fewest mask rows a step multiplies in int8 (`None`: never).
    pub fn int8_min_rows(&self) -> Option<usize> {
        self.lora.int8_min_rows()
    }

    /// True when steps pack their rows as two halves (merged weights in a batched
    /// product; where the CPU's few-row kernel runs, merged weights take one sequence).
    pub fn packs_halves(&self) -> bool {
        self.halves
    }

    /// Bytes the drafter holds beyond the adapter itself (merged or folded weights, int8
    /// panels).
    pub fn extra_bytes(&self) -> usize {
        self.lora.merged_bytes()
            + self.lora.folded_bytes()
            + self.lora.int8_bytes()
            + self.head_int8.as_ref().map_or(0, Int8Panels::bytes)
            + self.sampler.as_ref().map_or(0, |s| s.prev_table_bytes() + s.int8_bytes())
    }

    /// True when the draft chain on host vectors multiplies by the head in int8 (and by the
    /// sampler's weights, where the adapter has a sampler).
    pub fn int8_head(&self) -> bool {
        self.head_int8.is_some()
    }

    /// The chain's logits of host rows `x` (`rows x d`) into `logits` (`rows x N`): by the
    /// int8 head where there is one, else by the f32 head's few-row kernel. False when
    /// neither takes them.
    fn head_into(&self, x: &[f32], logits: &mut [f32]) -> bool {
        match &self.head_int8 {
            Some(panels) => crate::model::int8::product_into(x, panels, logits),
            None => few_rows::product_into(x, &self.head, None, logits),
        }
    }

    /// A mask controller for a generation with `count` masks: for `auto`, the last one
    /// this drafter ran with `layout` (its acceptance and timing estimates carry over).
    pub fn controller(&self, layout: Layout, count: MaskCount) -> MaskController {
        match (count, self.controllers.borrow().get(&layout)) {
            (MaskCount::Auto, Some(c)) => c.clone(),
            _ => MaskController::new(count, layout, self.k()),
        }
    }

    /// Keep an `auto` controller's estimates for the next generation.
    pub fn remember(&self, controller: &MaskController, layout: Layout) {
        if controller.is_auto() {
            self.controllers.borrow_mut().insert(layout, controller.clone());
        }
    }

    /// What the adapter's mask rows read.
    pub fn recipe(&self) -> crate::mtp::Recipe {
        self.config.recipe
    }

    /// The number of masks the adapter was trained with.
    pub fn k(&self) -> usize {
        self.config.k
    }

    /// The LoRA rank the adapter was trained with.
    pub fn rank(&self) -> usize {
        self.config.lora.rank
    }

    /// Size of the vocabulary drafts are chosen from (`None`: the whole vocabulary).
    pub fn draft_vocab_size(&self) -> Option<usize> {
        self.vocab.as_ref().map(|v| v.size()[0] as usize)
    }

    /// The draft vocabulary's token ids, sorted (`None`: drafts come from the whole
    /// vocabulary).
    pub fn draft_vocab_ids(&self) -> Option<Vec<i64>> {
        let mut ids = self.vocab_ids.clone()?;
        ids.sort_unstable();
        Some(ids)
    }

    /// `[k, d]`: the mask embeddings in the model's dtype.
    pub fn mask_embeddings(&self) -> &Tensor {
        &self.mask_embeddings
    }

    /// The adapter as a step of `plan` applies it: to its mask rows (the second half of
    /// two, or the rows after the regular ones), or to every row for a plain-LoRA adapter.
    pub fn step_gate(&self, plan: &StepPlan) -> Gated<'_> {
        let gate = match (self.config.gated, plan.halves()) {
            (false, _) => Gate::All,
            (true, true) => Gate::Halves,
            (true, false) => Gate::Tail(plan.layout.regular() as i64),
        };
        Gated { delta: &self.lora, gate }
    }

    /// Free what decoding kept for the next generation (caches and recorded steps), for
    /// work that needs the memory more.
    pub fn release_kept(&self) {
        self.kept.borrow_mut().clear();
    }

    /// The adapter for a prefill of `prompt` rows followed by one mask block: the block's
    /// rows only for a gated adapter (prompt rows are next-token rows, which it leaves
    /// alone, bit for bit), every row for a plain-LoRA one.
    pub fn prefill_block_gate(&self, prompt: i64) -> Gated<'_> {
        let gate = if self.config.gated { Gate::Tail(prompt) } else { Gate::All };
        Gated { delta: &self.lora, gate }
    }

    /// Logits over the draft vocabulary (or the whole head) for final hidden states `h`.
    fn draft_logits(&self, h: &Tensor, kind: Kind) -> Tensor {
        let h = if h.kind() == kind { h.shallow_clone() } else { h.to_kind(kind) };
        crate::model::linear::linear(&h, &self.head, None)
    }

    /// Token ids of draft-vocabulary indices.
    fn ids(&self, index: &Tensor) -> Tensor {
        match &self.vocab {
            Some(v) => v.index_select(0, index),
            None => index.shallow_clone(),
        }
    }

    /// Greedy drafts for one mask block, on the device: the sampler's chain seeded with the
    /// verified token `prev`, or the LM head's choice at each mask without a sampler. With
    /// `probs`, also each slot's draft distribution over the whole vocabulary (`[m, V]`,
    /// for the step view).
    ///
    /// # Shapes
    /// `z`: `[m, d]` final hidden states of the masks; `prev`: `[1]` int64 -> `[m]` int64.
    pub fn greedy(&self, model: &Llama, z: &Tensor, prev: &Tensor, probs: Option<&mut Tensor>) -> Tensor {
        let kind = model.dtype().kind();
        tch::no_grad(|| {
            let mut logits_rows = Vec::new();
            let drafts = match &self.sampler {
                Some(head) => {
                    let block = head.block(z);
                    let mut prev = prev.shallow_clone();
                    let mut chosen = Vec::with_capacity(z.size()[0] as usize);
                    for j in 0..z.size()[0] {
                        let h = head.step(&block, j, &model.embed(&prev));
                        let logits = self.draft_logits(&h, kind);
                        prev = self.ids(&logits.argmax(-1, false));
                        chosen.push(prev.shallow_clone());
                        if probs.is_some() {
                            logits_rows.push(logits);
                        }
                    }
                    Tensor::cat(&chosen, 0)
                }
                None => {
                    let logits = self.draft_logits(z, kind);
                    let drafts = self.ids(&logits.argmax(-1, false));
                    logits_rows.push(logits);
                    drafts
                }
            };
            if let Some(out) = probs {
                *out = self.full_vocab(&Tensor::cat(&logits_rows, 0).softmax(-1, Kind::Float), model);
            }
            drafts
        })
    }

    /// [`Drafter::greedy`] in host memory on the CPU (f32, where the few-row kernel runs):
    /// the chain's products through the kernel, what lies between them on plain vectors,
    /// so that a draft costs no libtorch operation but reading its previous token's
    /// embedding row (a demo draft took about 120 us as a dozen operations). Returns the
    /// drafts, or `None` where the kernel does not run (the caller then drafts with
    /// [`Drafter::greedy`]); the drafts are those of [`Drafter::greedy`] but where two
    /// tokens' logits tie to within the last bits (the two sum in different orders). Where
    /// the mask rows are multiplied in int8 ([`DraftArithmetic::Int8`], and `auto` where it
    /// runs) the chain's head is too, and the sampler's products after its first layer's
    /// `E(prev)` half ([`Drafter::int8_head`]: a quarter of the bytes, the demo's 4-draft
    /// chain 119 -> 87 us with the head alone), and the drafts may then differ in near-ties
    /// (docs/BENCHMARKS.md, "The draft chain's head in int8"). That half is a row of a table
    /// made when the drafter is prepared, for the tokens drafts come from
    /// ([`PreparedSampler::with_prev_table`]), in any arithmetic. With `scored`, also each
    /// draft's confidence ([`HostDrafts::confidence`]).
    ///
    /// # Shapes
    /// `z`: `[m, d]` final hidden states of the masks.
    pub fn greedy_on_host(&self, model: &Llama, z: &Tensor, prev: i64, scored: bool) -> Result<Option<HostDrafts>> {
        if !crate::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind()) || z.kind() != Kind::Float {
            return Ok(None);
        }
        let (m, d) = (z.size()[0] as usize, z.size()[1] as usize);
        let mut z_rows = vec![0f32; m * d];
        z.contiguous().f_copy_data(&mut z_rows, m * d)?;
        let n = self.head.size()[0] as usize;
        let mut confidence = Vec::with_capacity(if scored { m } else { 0 });
        let mut pick = |logits: &[f32]| -> i64 {
            let i = first_largest(logits);
            if scored {
                confidence.push(top_probability(logits, i));
            }
            self.vocab_ids.as_ref().map_or(i as i64, |ids| ids[i])
        };
        let Some(head) = &self.sampler else {
            let mut logits = vec![0f32; m * n];
            if !self.head_into(&z_rows, &mut logits) {
                return Ok(None);
            }
            let ids = logits.chunks(n).map(&mut pick).collect();
            return Ok(Some(HostDrafts { ids, confidence }));
        };
        let mut part = vec![0f32; m * d];
        if !head.host_block(&z_rows, &mut part) {
            return Ok(None);
        }
        let (mut e, mut state, mut logits) = (vec![0f32; d], vec![0f32; d], vec![0f32; n]);
        let (mut prev, mut ids) = (prev, Vec::with_capacity(m));
        for j in 0..m {
            let rows = j * d..(j + 1) * d;
            if !head.host_prev(prev, &model.embed_tokens, &mut e)?
                || !head.host_state(&part[rows.clone()], &z_rows[rows], &e, &mut state)
                || !self.head_into(&state, &mut logits)
            {
                return Ok(None);
            }
            prev = pick(&logits);
            ids.push(prev);
        }
        Ok(Some(HostDrafts { ids, confidence }))
    }

    /// Sampled drafts for one mask block: each draft drawn from the sampler's (processed)
    /// distribution given the previous one. Returns the drafts and each one's distribution
    /// over the whole vocabulary (zero outside the draft vocabulary), which speculative
    /// sampling needs to accept or correct them.
    pub fn sampled(
        &self,
        model: &Llama,
        z: &Tensor,
        prev: i64,
        params: &SamplingParams,
        sampler: &mut Sampler,
    ) -> Result<(Vec<i64>, Vec<Vec<f32>>)> {
        let kind = model.dtype().kind();
        let device = model.device();
        tch::no_grad(|| {
            let m = z.size()[0];
            let (mut drafts, mut q) = (Vec::with_capacity(m as usize), Vec::with_capacity(m as usize));
            let block = self.sampler.as_ref().map(|head| head.block(z));
            let mut prev = prev;
            for j in 0..m {
                let logits = match (&self.sampler, &block) {
                    (Some(head), Some(zp)) => {
                        let e = model.embed(&Tensor::from_slice(&[prev]).to_device(device));
                        self.draft_logits(&head.step(zp, j, &e), kind)
                    }
                    _ => self.draft_logits(&z.narrow(0, j, 1), kind),
                };
                let dist = self.full_vocab(&params.distribution(&logits), model).view([-1]);
                let row: Vec<f32> = Vec::try_from(dist.to_device(Device::Cpu))?;
                prev = sampler.draw_slice(&row);
                drafts.push(prev);
                q.push(row);
            }
            Ok((drafts, q))
        })
    }

    /// Rows over the draft vocabulary scattered into the whole vocabulary (zeros elsewhere).
    fn full_vocab(&self, rows: &Tensor, model: &Llama) -> Tensor {
        match &self.vocab {
            None => rows.shallow_clone(),
            Some(ids) => {
                let n = rows.size()[0];
                let full = Tensor::zeros([n, model.config.vocab_size as i64], (rows.kind(), rows.device()));
                full.index_copy(1, ids, rows)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` takes every mask row in int8 for weights a cache holds; for weights read from
    /// memory, 2-mask steps' rows and more where the chunked tiles pay early (AMD), else
    /// 3- or 4-mask steps' only.
    #[test]
    fn auto_int8_rows_follow_where_the_weights_are_read_from() {
        for ahead in [false, true] {
            // The demo (6 layers of 2.9 MB) and the proxy (24 of 0.18 MB): every mask row.
            assert_eq!(auto_int8_min_rows(6 * 737_280 * 4, ahead), 1);
            assert_eq!(auto_int8_min_rows(24 * 45_312 * 4, ahead), 1);
            assert_eq!(auto_int8_min_rows(FROM_MEMORY_BYTES, ahead), 1);
        }
        // SmolLM2-135M (30 layers of 3.54 M parameters): on AMD from a 2-mask quadratic
        // step's 2 x 3 = 6 mask rows, a 1-mask step's 2 staying f32; elsewhere from a 3-mask
        // step's 3 x 4 = 12, a 2-mask step's 6 staying f32.
        let smollm2 = 30 * 3_538_944 * 4;
        assert_eq!(auto_int8_min_rows(smollm2, true), AHEAD_MIN_MASK_ROWS);
        const { assert!(AHEAD_MIN_MASK_ROWS > 2 && AHEAD_MIN_MASK_ROWS <= 2 * 3) };
        assert_eq!(auto_int8_min_rows(smollm2, false), BF16_MIN_MASK_ROWS);
        const { assert!(BF16_MIN_MASK_ROWS > 2 * 3 && BF16_MIN_MASK_ROWS <= 3 * 4) };
        assert_eq!(auto_int8_min_rows(FROM_MEMORY_BYTES + 1, false), BF16_MIN_MASK_ROWS);
        assert_eq!(auto_int8_min_rows(FROM_MEMORY_BYTES + 1, true), AHEAD_MIN_MASK_ROWS);
    }
}
