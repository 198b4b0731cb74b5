//! AdamW, the learning-rate schedule and gradient clipping.
//!
//! AdamW is written here rather than taken from `tch::nn::Optimizer` because that one
//! keeps its moments inside libtorch with no way to read or restore them, and a resumed run
//! must continue with exactly the moments it stopped with. The update is PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The shape of the learning rate over steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup, then constant (the paper's choice).
    #[default]
    Constant,
    /// Linear warmup, then a cosine decay to 10% of the peak at the last step.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(crate::error::Error::Invalid(format!(
                "unknown learning-rate schedule `{other}` (constant or cosine)"
            ))),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
        })
    }
}

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup: usize,
    /// After warmup.
    pub schedule: Schedule,
    /// Adam's beta1.
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// Adam's epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup: 20,
            schedule: Schedule::Constant,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
        }
    }
}

impl OptimConfig {
    /// The learning rate of 1-based step `step` of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup).max(1) as f64;
                let t = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
                let floor = 0.1 * self.lr;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// AdamW over named parameters, with its moments as plain tensors (saved in checkpoints).
///
/// Where every parameter is a distinct f32 tensor on one device (an adapter's always are),
/// they live in one flat buffer: each parameter's data becomes a view of it
/// ([`Tensor::set_data`]), and so do the moments. A step then gathers the gradients with one
/// concatenation and updates every parameter with a dozen operations on the whole buffer,
/// where one operation per parameter per term took some 20 operations a parameter (about
/// 5,000 for the SmolLM2-135M shape's 250 adapter tensors, each a kernel launch on a GPU).
/// The arithmetic per element is the same either way.
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    /// First moments, one per parameter (views of `flat.m` in the flat form).
    m: Vec<Tensor>,
    /// Second moments.
    v: Vec<Tensor>,
    /// The flat form's buffers, when the parameters allow it.
    flat: Option<Flat>,
    /// Updates taken.
    pub steps: u64,
    config: OptimConfig,
}

/// Parameters and moments, each one buffer of every parameter's elements in turn.
struct Flat {
    params: Tensor,
    m: Tensor,
    v: Tensor,
}

impl AdamW {
    /// An optimizer for `params` (name, tensor with `requires_grad`), sorted by name.
    pub fn new(params: Vec<(String, Tensor)>, config: OptimConfig) -> Self {
        Self::with_form(params, config, true)
    }

    /// [`AdamW::new`], choosing whether the flat form may be used (tests compare the two).
    pub fn with_form(mut params: Vec<(String, Tensor)>, config: OptimConfig, flat: bool) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let flat = if flat { Flat::adopt(&params) } else { None };
        let (m, v) = match &flat {
            Some(f) => (views(&f.m, &params), views(&f.v, &params)),
            None => {
                let zeros = |p: &Tensor| Tensor::zeros_like(p).to_kind(Kind::Float);
                (params.iter().map(|(_, p)| zeros(p)).collect(), params.iter().map(|(_, p)| zeros(p)).collect())
            }
        };
        Self { params, m, v, flat, steps: 0, config }
    }

    /// True when the parameters live in one flat buffer.
    pub fn is_flat(&self) -> bool {
        self.flat.is_some()
    }

    /// Clear every gradient.
    pub fn zero_grad(&self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).sum(Kind::Float).sqrt().double_value(&[])
    }

    /// Clip to the configured norm, then take one update at `lr`. Returns the norm before
    /// clipping.
    pub fn step(&mut self, lr: f64) -> f64 {
        // The flat form needs every gradient (a parameter without one is left alone).
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        let flat_grad = match &self.flat {
            Some(_) if grads.iter().all(Tensor::defined) => {
                Some(tch::no_grad(|| Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0)))
            }
            _ => None,
        };
        let norm = match &flat_grad {
            Some(g) => tch::no_grad(|| g.square().sum(Kind::Float).sqrt().double_value(&[])),
            None => self.grad_norm(),
        };
        let clip = if self.config.grad_clip > 0.0 && norm > self.config.grad_clip {
            self.config.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        self.steps += 1;
        let c = self.config.clone();
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        // One update of `p` from `g` (the step's own f32 copy of its gradient, clipped),
        // with its moments: the same operations on one parameter or on the flat buffer of
        // all of them. `g` is reused in place, so a step needs one more buffer of its size.
        let update = |p: &Tensor, mut g: Tensor, m: &mut Tensor, v: &mut Tensor| {
            let mut work = g.square();
            let _ = work.g_mul_scalar_(1.0 - c.beta2);
            let _ = v.g_mul_scalar_(c.beta2).g_add_(&work);
            let _ = g.g_mul_scalar_(1.0 - c.beta1);
            let _ = m.g_mul_scalar_(c.beta1).g_add_(&g);
            // The denominator sqrt(v / bc2) + eps in `work`, the update (m / bc1) / it in `g`.
            work.copy_(v);
            let _ = work.g_div_scalar_(bc2).sqrt_().g_add_scalar_(c.eps);
            g.copy_(m);
            let _ = g.g_div_scalar_(bc1).g_div_(&work).g_mul_scalar_(lr);
            let mut p = p.shallow_clone();
            if c.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = p.g_sub_(&g.to_kind(p.kind()));
        };
        tch::no_grad(|| match (&mut self.flat, flat_grad) {
            (Some(f), Some(mut g)) => {
                let _ = g.g_mul_scalar_(clip);
                update(&f.params, g, &mut f.m, &mut f.v)
            }
            _ => {
                for (i, g) in grads.iter().enumerate() {
                    if g.defined() {
                        update(&self.params[i].1, g.to_kind(Kind::Float) * clip, &mut self.m[i], &mut self.v[i]);
                    }
                }
            }
        });
        norm
    }

    /// The moments as named tensors (`adam_m.NAME`, `adam_v.NAME`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("adam_m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("adam_v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`]; `lookup` returns a saved tensor by name.
    pub fn restore(&mut self, steps: u64, mut lookup: impl FnMut(&str) -> crate::Result<Tensor>) -> crate::Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let m = lookup(&format!("adam_m.{name}"))?.to_device(p.device()).to_kind(Kind::Float);
            let v = lookup(&format!("adam_v.{name}"))?.to_device(p.device()).to_kind(Kind::Float);
            if m.size() != p.size() || v.size() != p.size() {
                return Err(crate::Error::Invalid(format!("optimizer state for `{name}` has the wrong shape")));
            }
            // Into the moments' own storage (views of the flat buffers in the flat form).
            tch::no_grad(|| {
                self.m[i].copy_(&m);
                self.v[i].copy_(&v);
            });
        }
        self.steps = steps;
        Ok(())
    }
}

impl Flat {
    /// Move `params` into one buffer (each one's data a view of it), with zeroed moments;
    /// `None` unless they are distinct f32 tensors on one device.
    fn adopt(params: &[(String, Tensor)]) -> Option<Self> {
        let (_, first) = params.first()?;
        let device = first.device();
        let mut seen = std::collections::HashSet::new();
        let fits = params.iter().all(|(_, p)| {
            p.kind() == Kind::Float && p.device() == device && p.is_contiguous() && seen.insert(p.data_ptr() as usize)
        });
        if !fits {
            return None;
        }
        let total: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        if total > FLAT_MAX_ELEMENTS {
            return None;
        }
        let buffer = Tensor::zeros([total], (Kind::Float, device));
        tch::no_grad(|| {
            for ((_, p), mut view) in params.iter().zip(views(&buffer, params)) {
                view.copy_(p);
                let mut p = p.shallow_clone();
                p.set_data(&view);
            }
        });
        // The moments after the parameters' old storage has gone.
        let zeros = || Tensor::zeros([total], (Kind::Float, device));
        Some(Self { params: buffer, m: zeros(), v: zeros() })
    }
}

/// The most elements the flat form takes (a full model's pretraining beyond this keeps one
/// update per tensor, whose temporaries are one tensor's, not the whole buffer's).
const FLAT_MAX_ELEMENTS: i64 = 1 << 26;

/// Each parameter's part of `buffer`, in its shape.
fn views(buffer: &Tensor, params: &[(String, Tensor)]) -> Vec<Tensor> {
    let mut offset = 0i64;
    params
        .iter()
        .map(|(_, p)| {
            let n = p.numel() as i64;
            let view = buffer.narrow(0, offset, n).view(p.size().as_slice());
            offset += n;
            view
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_holds_or_decays() {
        let c = OptimConfig { lr: 1.0, warmup: 10, ..OptimConfig::default() };
        assert_eq!(c.lr_at(5, 100), 0.5);
        assert_eq!(c.lr_at(10, 100), 1.0);
        assert_eq!(c.lr_at(80, 100), 1.0);
        let cos = OptimConfig { schedule: Schedule::Cosine, ..c };
        assert!((cos.lr_at(100, 100) - 0.1).abs() < 1e-12);
        assert!(cos.lr_at(50, 100) < 1.0 && cos.lr_at(50, 100) > 0.1);
    }

    /// The first AdamW step moves each parameter by lr * sign(g) (bias correction makes
    /// m / sqrt(v) = g / |g|), and repeated steps minimise a quadratic.
    #[test]
    fn first_step_and_convergence() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let config = OptimConfig { lr: 0.1, warmup: 0, grad_clip: 0.0, ..OptimConfig::default() };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], config);
        let mut values = Vec::new();
        for _ in 0..200 {
            opt.zero_grad();
            p.square().sum(Kind::Float).backward();
            opt.step(0.1);
            values.push(Vec::<f32>::try_from(&p.detach()).unwrap_or_default());
        }
        assert!((values[0][0] - 0.9).abs() < 1e-6 && (values[0][1] + 1.9).abs() < 1e-6, "{:?}", values[0]);
        assert!(values[199].iter().all(|x| x.abs() < 0.05), "{:?}", values[199]);
        assert_eq!(opt.state().len(), 2);
    }

    /// The flat form updates every parameter as the per-parameter form does, bit for bit
    /// without clipping and to rounding with it (the norm sums in another order), keeps its
    /// parameters shared with their holders, and saves and restores the same moments.
    #[test]
    fn flat_buffers_update_as_one_tensor_per_parameter() -> crate::Result<()> {
        let shapes: [&[i64]; 4] = [&[3, 5], &[7], &[2, 2, 4], &[1]];
        // Values from a formula, not the global generator: tests in other threads seed and
        // draw from it at the same time.
        let make = || -> Vec<(String, Tensor)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n = s.iter().product::<i64>();
                    let values = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.77 + i as f64)).sin() * 1.3;
                    (format!("p{i}"), values.reshape(*s).set_requires_grad(true))
                })
                .collect()
        };
        for grad_clip in [0.0, 0.5] {
            let config = OptimConfig { lr: 0.05, warmup: 0, grad_clip, weight_decay: 0.01, ..OptimConfig::default() };
            let (a, b) = (make(), make());
            let handles = |ps: &[(String, Tensor)]| ps.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
            let (mut flat, mut each) =
                (AdamW::with_form(handles(&a), config.clone(), true), AdamW::with_form(handles(&b), config, false));
            assert!(flat.is_flat() && !each.is_flat());
            for step in 0..30 {
                for params in [&a, &b] {
                    // A loss that mixes the parameters, different at every step.
                    let loss = params
                        .iter()
                        .enumerate()
                        .map(|(i, (_, p))| (p * (step as f64 + i as f64 + 1.0)).sin().sum(Kind::Float))
                        .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |x, y| x + y);
                    loss.backward();
                }
                let (na, nb) = (flat.step(0.05), each.step(0.05));
                assert!((na - nb).abs() <= 1e-6 * nb, "step {step}: norms {na} {nb}");
                flat.zero_grad();
                each.zero_grad();
            }
            for ((name, x), (_, y)) in a.iter().zip(&b) {
                let diff = (x - y).abs().max().double_value(&[]);
                if grad_clip == 0.0 {
                    assert!(x.equal(y), "{name}: differs by {diff}");
                } else {
                    assert!(diff < 1e-5, "{name}: differs by {diff}");
                }
            }
            // The moments restore into the flat buffers, where the next step reads them.
            let saved: std::collections::HashMap<String, Tensor> =
                each.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let mut restored = AdamW::with_form(make(), OptimConfig::default(), true);
            restored.restore(30, |n| Ok(saved[n].shallow_clone()))?;
            for (n, t) in restored.state() {
                assert!(t.equal(&saved[&n]), "{n}");
            }
            let flat_m = &restored.flat.as_ref().map(|f| f.m.shallow_clone()).expect("flat");
            let total: f64 = saved
                .iter()
                .filter(|(n, _)| n.starts_with("adam_m."))
                .map(|(_, t)| t.sum(Kind::Double).double_value(&[]))
                .sum();
            assert!((flat_m.sum(Kind::Double).double_value(&[]) - total).abs() < 1e-9);
        }
        Ok(())
    }
}
