//! AdamW with decoupled weight decay over candle `Var`s, global gradient-norm clipping and the learning-rate
//! schedule. Our own so that the moments are plain named tensors a checkpoint can save and restore exactly.
//!
//! The moments are f32 whatever the weights' dtype, and the update is computed in f32 and rounded to the
//! weights' dtype once: in bf16 (8 mantissa bits) the second moment's (1 − β₂) = 0.001 share of g² would be
//! rounded away against v, and m̂ / √v̂ would carry bf16 error into every step. Weights stored in bf16/f16 also
//! get an f32 master copy (`OptimConfig::master_weights`, on by default) that accumulates the updates: rounding
//! the weight itself after every step would drop any update smaller than half its spacing, which at lr 1e-6 is
//! nearly all of them. For f32 weights every operation is what it was before, bit for bit.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use crate::config::{LrSchedule, OptimConfig};
use crate::fused_adamw::{self, Scalars};
use pairuni_model::config::Toggle;

/// AdamW state: the trained variables and their first/second moments.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// First moments, f32, one per variable.
    m: Vec<Tensor>,
    /// Second moments, f32, one per variable.
    v: Vec<Tensor>,
    /// f32 master weights of the variables stored in a narrower float dtype (when enabled), else `None`.
    master: Vec<Option<Tensor>>,
    /// Number of updates applied so far (bias correction uses it).
    pub t: u64,
    cfg: OptimConfig,
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f64,
}

impl AdamW {
    /// Zero moments (f32) for `vars`.
    pub fn new(vars: Vec<(String, Var)>, cfg: &OptimConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>>>()?;
        let master = vars
            .iter()
            .map(|(_, var)| master_of(var, cfg.master_weights))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            master,
            t: 0,
            cfg: cfg.clone(),
        })
    }

    /// The trained variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Global L2 norm of the gradients of the trained variables (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f32> {
        // Squares are summed in f32 per variable (a bf16 sum of ~10⁶ squares would be off by percents), and the
        // per-variable sums in f64 on the host in variable order, after one read-back for all of them (one
        // device synchronisation instead of one per variable).
        let mut sums = Vec::with_capacity(self.vars.len());
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
            }
        }
        if sums.is_empty() {
            return Ok(0.0);
        }
        let sums = Tensor::stack(&sums, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let sq = sums.iter().fold(0f64, |acc, s| acc + s);
        Ok(sq.sqrt() as f32)
    }

    /// One AdamW update at learning rate `lr`, after clipping the global gradient norm to `max_grad_norm`.
    /// The caller checks the returned norm for non-finite values *before* calling (see [`AdamW::grad_norm`]).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let norm = self.grad_norm(grads)?;
        self.step_with_norm(grads, lr, norm)
    }

    /// [`AdamW::step`] with the gradients' global norm already computed by [`AdamW::grad_norm`] (a trainer that
    /// checks the norm first saves computing it twice).
    pub fn step_with_norm(&mut self, grads: &GradStore, lr: f64, norm: f32) -> Result<StepInfo> {
        let clip = if self.cfg.max_grad_norm > 0.0 && norm as f64 > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / (norm as f64 + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let scalars = Scalars::of(&self.cfg, self.t, lr, clip);
        // `auto` is on: it acts on CUDA devices only, where the composed update ran the step out of memory.
        let fused = self.cfg.fused != Toggle::Off && fused_adamw::TRUST.usable();
        for i in 0..self.vars.len() {
            let var = self.vars[i].1.clone();
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if fused
                && pairuni_model::nvrtc::runs_kernels(var.device())
                && self.fused_update(i, &var, g, &scalars)?
            {
                continue;
            }
            let (m, v, theta) = self.composed_update(i, &var, g, &scalars)?;
            self.assign(i, &var, m, v, theta)?;
        }
        Ok(StepInfo {
            grad_norm: norm,
            lr,
        })
    }

    /// The update of variable `i` from its gradient `g` composed of candle ops: the new moments and the new f32
    /// weight θ, leaving the state as it was.
    fn composed_update(
        &self,
        i: usize,
        var: &Var,
        g: &Tensor,
        s: &Scalars,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let f = f64::from;
        let g = g.to_dtype(DType::F32)?.affine(f(s.clip), 0.0)?;
        let m = ((&self.m[i] * f(s.b1))? + (&g * f(s.one_minus_b1))?)?;
        let v = ((&self.v[i] * f(s.b2))? + (g.sqr()? * f(s.one_minus_b2))?)?;
        let update = ((&m * f(s.inv_bc1))? / ((&v * f(s.inv_bc2))?.sqrt()? + f(s.eps))?)?;
        // Decoupled decay: shrink the weights directly, not through the gradient.
        let theta = match &self.master[i] {
            Some(w) => w.clone(),
            None => var.as_tensor().to_dtype(DType::F32)?,
        }
        .affine(f(s.decay), 0.0)?;
        let theta = (theta - (update * f(s.lr))?)?;
        Ok((m, v, theta))
    }

    /// Makes (m, v, θ) variable `i`'s state and θ, rounded, its value.
    fn assign(&mut self, i: usize, var: &Var, m: Tensor, v: Tensor, theta: Tensor) -> Result<()> {
        var.set(&theta.to_dtype(var.dtype())?)?;
        if self.master[i].is_some() {
            self.master[i] = Some(theta);
        }
        self.m[i] = m;
        self.v[i] = v;
        Ok(())
    }

    /// Variable `i`'s update through the fused kernel, in place; `false` when the kernel does not take it (the
    /// caller composes it). The process's first call also composes the update first and compares: on a
    /// difference the composed values are kept and the kernel is turned off.
    fn fused_update(&mut self, i: usize, var: &Var, g: &Tensor, s: &Scalars) -> Result<bool> {
        let check = fused_adamw::TRUST.needs_check();
        let composed = if check {
            Some(self.composed_update(i, var, g, s)?)
        } else {
            None
        };
        let w = var.as_tensor();
        let launched =
            fused_adamw::launch(g, &self.m[i], &self.v[i], self.master[i].as_ref(), w, s);
        let launched = match launched {
            Ok(l) => l,
            Err(e) => {
                fused_adamw::TRUST.record(Err(format!("launch: {e}")));
                false
            }
        };
        let Some((m, v, theta)) = composed else {
            return Ok(launched);
        };
        if !launched {
            self.assign(i, var, m, v, theta)?;
            return Ok(true);
        }
        // Without a master copy the kernel's θ is the weight itself, rounded to its dtype: compare it with the
        // composed θ rounded the same way (a bf16 weight would otherwise differ by its rounding, ≈ 4e-3).
        let (theta_now, theta_want) = match &self.master[i] {
            Some(t) => (t.clone(), theta.clone()),
            None => (
                w.to_dtype(DType::F32)?,
                theta.to_dtype(w.dtype())?.to_dtype(DType::F32)?,
            ),
        };
        // The kernel does the composition's f32 operations in its order: the values are expected to be equal.
        const TOLERANCE: f32 = 1e-6;
        let ours = [self.m[i].clone(), self.v[i].clone(), theta_now];
        let theirs = [m.clone(), v.clone(), theta_want];
        if !fused_adamw::TRUST.check(&ours, &theirs, TOLERANCE)? {
            self.assign(i, var, m, v, theta)?;
        }
        Ok(true)
    }

    /// Moments and master weights as named f32 tensors (`m.<name>`, `v.<name>`, `w.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
            if let Some(w) = &self.master[i] {
                out.insert(format!("w.{name}"), w.clone());
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the update count; every trained variable must be
    /// present with its shape, else an error names the first missing or mismatched one. Moments of any float
    /// dtype (older checkpoints kept them in the weights' dtype) are converted to f32. Master weights come from
    /// `w.<name>`; a checkpoint without them (older, or saved with master weights off) starts them from the
    /// variables' current values, so restore the weights first.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            self.master[i] = match (
                master_of(var, self.cfg.master_weights)?,
                tensors.get(&format!("w.{name}")),
            ) {
                (Some(_), Some(saved)) => {
                    if saved.shape() != var.shape() {
                        candle_core::bail!(
                            "optimizer tensor `w.{name}` has shape {:?}, parameter has {:?}",
                            saved.shape(),
                            var.shape()
                        )
                    }
                    Some(saved.to_device(var.device())?.to_dtype(DType::F32)?)
                }
                (fresh, _) => fresh,
            };
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let Some(tensor) = tensors.get(&key) else {
                    candle_core::bail!("optimizer state has no tensor `{key}`")
                };
                if tensor.shape() != var.shape() {
                    candle_core::bail!(
                        "optimizer tensor `{key}` has shape {:?}, parameter has {:?}",
                        tensor.shape(),
                        var.shape()
                    )
                }
                *slot = tensor.to_device(var.device())?.to_dtype(DType::F32)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// An f32 copy of `var` when it is stored in a narrower float dtype and master weights are `enabled`.
fn master_of(var: &Var, enabled: bool) -> Result<Option<Tensor>> {
    Ok(match var.dtype() {
        DType::BF16 | DType::F16 if enabled => Some(var.as_tensor().to_dtype(DType::F32)?),
        _ => None,
    })
}

/// Gradient accumulation: adds the gradients `add` holds for the trained variables `vars` into `acc` and drops the
/// rest of `add` (frozen variables that were differentiated), so that micro-batches' backward passes sum to the
/// whole batch's.
pub fn accumulate_grads(
    acc: &mut GradStore,
    mut add: GradStore,
    vars: &[(String, Var)],
) -> Result<()> {
    for (_, v) in vars {
        if let Some(g) = add.remove(v.as_tensor()) {
            let sum = match acc.remove(v.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Learning rate at 0-based `step` of `total` steps.
pub fn learning_rate(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    let peak = cfg.lr;
    if step < cfg.warmup_steps {
        return peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    match cfg.schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
            let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
            let floor = peak * cfg.min_lr_ratio;
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 0.1,
            max_grad_norm: 0.0,
            ..OptimConfig::default()
        }
    }

    /// The fused kernel's source, run on the CPU by the emulator over the state before each step, gives the
    /// composed update's values bit for bit: f32 weights and bf16 weights with f32 master copies, with clipping
    /// and weight decay, over several steps.
    #[test]
    fn the_fused_kernel_source_computes_the_composed_update_bit_for_bit() {
        let c = OptimConfig {
            lr: 3e-3,
            weight_decay: 0.1,
            max_grad_norm: 0.05,
            ..OptimConfig::default()
        };
        let bits =
            |t: &Tensor| -> Vec<u8> { pairuni_model::kernel_emulator::storage_bytes(t).unwrap() };
        for dtype in [DType::F32, DType::BF16] {
            // More elements than one block's 256 threads.
            let n = 300;
            let init: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
                .collect();
            let w = Tensor::from_vec(init.clone(), n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let var = Var::from_tensor(&w).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], &c).unwrap();
            assert_eq!(opt.master[0].is_some(), dtype == DType::BF16);
            for step in 1..=3u64 {
                let g: Vec<f32> = (0..n)
                    .map(|i| (((i as u64 * 13 + step * 7) % 29) as f32 - 14.0) / 50.0)
                    .collect();
                let gt = Tensor::from_vec(g.clone(), n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                // The state before the step, copied: the step replaces the moments and sets the weight in place.
                let (m0, v0) = (opt.m[0].copy().unwrap(), opt.v[0].copy().unwrap());
                let master0 = opt.master[0].as_ref().map(|t| t.copy().unwrap());
                let w0 = var.as_tensor().copy().unwrap();
                let mut grads = GradStore::default();
                grads.insert(var.as_tensor(), gt.clone());
                let info = opt.step(&grads, c.lr).unwrap();
                let clip = if f64::from(info.grad_norm) > c.max_grad_norm {
                    c.max_grad_norm / (f64::from(info.grad_norm) + 1e-6)
                } else {
                    1.0
                };
                assert!(clip < 1.0, "clipping is exercised");
                let scalars = Scalars::of(&c, step, c.lr, clip);
                let launch = fused_adamw::launch_of(&gt, &m0, &v0, master0.as_ref(), &w0, &scalars)
                    .expect("the kernel takes it");
                let out = pairuni_model::kernel_emulator::emulate(&fused_adamw::MODULE, &launch)
                    .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
                let mut written = out.in_place.iter();
                let mut next = || written.next().expect("an in-place operand");
                assert_eq!(bits(next()), bits(&opt.m[0]), "{dtype:?} step {step}: m");
                assert_eq!(bits(next()), bits(&opt.v[0]), "{dtype:?} step {step}: v");
                if let Some(master) = &opt.master[0] {
                    assert_eq!(bits(next()), bits(master), "{dtype:?} step {step}: θ");
                }
                assert_eq!(
                    bits(next()),
                    bits(var.as_tensor()),
                    "{dtype:?} step {step}: the weight is θ rounded"
                );
            }
            let moved: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_ne!(moved, init, "the weights moved");
        }
    }

    #[test]
    fn a_fused_optimiser_on_the_cpu_composes_its_update() {
        let c = OptimConfig {
            fused: Toggle::On,
            ..cfg()
        };
        let run = |c: &OptimConfig| {
            let var = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap())
                .unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], c).unwrap();
            let mut grads = GradStore::default();
            grads.insert(
                var.as_tensor(),
                Tensor::new(&[0.1f32, 0.2, -0.3], &Device::Cpu).unwrap(),
            );
            opt.step(&grads, 0.1).unwrap();
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        // `on` and `auto` (on since the eighteenth session) both compose on the CPU, as `off` does.
        let composed = run(&OptimConfig {
            fused: Toggle::Off,
            ..cfg()
        });
        assert_eq!(run(&c), composed);
        let auto = OptimConfig {
            fused: Toggle::Auto,
            ..cfg()
        };
        assert_eq!(run(&auto), composed);
        assert!(fused_adamw::TRUST.needs_check(), "no kernel ran on the CPU");
    }

    #[test]
    fn first_adam_step_moves_by_lr_times_sign() {
        // After one step, m̂ = g and v̂ = g², so the update is lr·g/(|g|+ε) ≈ lr·sign(g).
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], &cfg()).unwrap();
        let loss = (x.as_tensor() * &Tensor::new(&[3.0f32, -0.5], &Device::Cpu).unwrap()).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let info = opt.step(&grads, 0.1).unwrap();
        assert!((info.grad_norm - (9.25f32).sqrt()).abs() < 1e-5);
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-5 && (got[1] + 1.9).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn weight_decay_is_decoupled() {
        // Zero gradient: Adam's update is 0, only the decay acts: θ ← θ(1 − lr·wd). (Like PyTorch, a parameter
        // with no gradient at all is left untouched.)
        let x = Var::new(&[2.0f32], &Device::Cpu).unwrap();
        let c = OptimConfig {
            weight_decay: 0.5,
            ..cfg()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], &c).unwrap();
        let zero = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let grads = (x.as_tensor() * &zero)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.1).unwrap();
        let got = x.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 1.9).abs() < 1e-6, "{got}");
    }

    #[test]
    fn clipping_scales_the_gradient_used() {
        // Norm 5 clipped to 1: second-step update differs from the unclipped run only through the moments.
        let run = |clip: f64| {
            let x = Var::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
            let c = OptimConfig {
                max_grad_norm: clip,
                eps: 1.0, // large ε makes the update sensitive to the gradient's magnitude
                ..cfg()
            };
            let mut opt = AdamW::new(vec![("x".into(), x.clone())], &c).unwrap();
            let w = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
            let grads = (x.as_tensor() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let info = opt.step(&grads, 0.1).unwrap();
            assert!((info.grad_norm - 5.0).abs() < 1e-5);
            x.as_tensor().to_vec1::<f32>().unwrap()
        };
        let clipped = run(1.0);
        let free = run(0.0);
        // Clipped g = (.6, .8): update = .1·.6/(.6+1) = .0375; unclipped: .1·3/(3+1) = .075.
        assert!((clipped[0] + 0.0375).abs() < 1e-5, "{clipped:?}");
        assert!((free[0] + 0.075).abs() < 1e-5, "{free:?}");
    }

    #[test]
    fn state_round_trips() {
        let x = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], &cfg()).unwrap();
        let grads = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.1).unwrap();
        let state = opt.state_tensors();
        let y = Var::new(&[5.0f32, 5.0], &Device::Cpu).unwrap();
        let mut fresh = AdamW::new(vec![("x".into(), y)], &cfg()).unwrap();
        fresh.load_state(&state, opt.t).unwrap();
        assert_eq!(fresh.t, 1);
        assert_eq!(
            fresh.state_tensors()["m.x"].to_vec1::<f32>().unwrap(),
            state["m.x"].to_vec1::<f32>().unwrap()
        );
        let err = fresh
            .load_state(&HashMap::new(), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.x"), "{err}");
    }

    #[test]
    fn bf16_weights_keep_f32_moments_and_round_once() {
        // The same step on bf16 weights and on their f32 copy: the bf16 result is the f32 one rounded, and the
        // moments stay f32 (in bf16, m would hold 0.1·g only to 3 significant digits).
        let dev = Device::Cpu;
        let w0 = [1.0f32, -2.0, 0.375, 1000.0];
        let coef = Tensor::new(&[3.0f32, -0.5, 0.0078125, 0.0009765625], &dev).unwrap();
        let c = OptimConfig {
            weight_decay: 0.1,
            ..cfg()
        };
        // `steps` AdamW steps on the linear loss Σ coef·x from w0 in `dtype`: the weights and the first moment.
        let run = |dtype: DType, steps: usize| {
            let x = Var::from_tensor(&Tensor::new(&w0, &dev).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
            let mut opt = AdamW::new(vec![("x".into(), x.clone())], &c).unwrap();
            for _ in 0..steps {
                let loss = x
                    .as_tensor()
                    .broadcast_mul(&coef.to_dtype(dtype).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
            }
            let m = opt.state_tensors()["m.x"].clone();
            (x.as_tensor().clone(), m)
        };
        let (x16, m16) = run(DType::BF16, 3);
        let (x32, m32) = run(DType::F32, 3);
        assert_eq!(
            (x16.dtype(), m16.dtype(), m32.dtype()),
            (DType::BF16, DType::F32, DType::F32)
        );
        // The gradients (the coefficients) are exact in bf16, so the moments agree exactly...
        assert_eq!(m16.to_vec1::<f32>().unwrap(), m32.to_vec1::<f32>().unwrap());
        // ...and each weight is within one bf16 rounding per step of the f32 run.
        let a = x16.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let b = x32.to_vec1::<f32>().unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 3.0 * q.abs() / 256.0 + 1e-6, "{p} vs {q}");
        }
        // One step from the same start rounds exactly once: bf16(f32 step) == bf16 step.
        let one = |dtype: DType| {
            run(dtype, 1)
                .0
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        assert_eq!(
            one(DType::BF16).to_vec1::<f32>().unwrap(),
            one(DType::F32).to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn master_weights_accumulate_updates_below_the_bf16_spacing() {
        // The paper's lr 1e-6 on a bf16 weight of 0.02 (spacing 2⁻¹³ ≈ 1.22e-4 there): every Adam step moves by
        // ≈ lr, 1/120 of the spacing. 300 steps must move the weight by ≈ 3e-4 with master weights; without
        // them each step rounds back and the weight never moves.
        let dev = Device::Cpu;
        let run = |master_weights: bool| {
            let x = Var::from_tensor(
                &Tensor::new(&[0.02f32, -0.02], &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            )
            .unwrap();
            let start = x
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let c = OptimConfig {
                master_weights,
                ..cfg()
            };
            let mut opt = AdamW::new(vec![("x".into(), x.clone())], &c).unwrap();
            // A master copy exists from the start exactly when asked for.
            assert_eq!(opt.state_tensors().contains_key("w.x"), master_weights);
            let coef = Tensor::new(&[1.0f32, -1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            for _ in 0..300 {
                let loss = (x.as_tensor() * &coef).unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap(), 1e-6).unwrap();
            }
            let end = x
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (start, end, opt)
        };
        let (start, end, opt) = run(true);
        for (i, sign) in [(0, -1.0f32), (1, 1.0)] {
            let moved = end[i] - start[i];
            assert!(
                (moved - sign * 3e-4).abs() < 1.3e-4,
                "weight {i} moved {moved}"
            );
        }
        let w = opt.state_tensors()["w.x"].to_vec1::<f32>().unwrap();
        assert!((w[0] - (start[0] - 3e-4)).abs() < 1e-6, "master {w:?}");
        let (start, end, opt) = run(false);
        assert_eq!(
            start, end,
            "without master weights every update rounds away"
        );
        assert!(!opt.state_tensors().contains_key("w.x"));
    }

    #[test]
    fn master_weights_round_trip_and_start_from_the_weights_when_absent() {
        let dev = Device::Cpu;
        let bf16 = |v: [f32; 2]| {
            Var::from_tensor(
                &Tensor::new(&v, &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            )
            .unwrap()
        };
        let x = bf16([0.5, -0.25]);
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], &cfg()).unwrap();
        let loss = x.as_tensor().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 1e-3).unwrap();
        let state = opt.state_tensors();
        let saved = state["w.x"].to_vec1::<f32>().unwrap();
        // A fresh optimiser over other weights takes the saved master, not its own weights.
        let mut fresh = AdamW::new(vec![("x".into(), bf16([9.0, 9.0]))], &cfg()).unwrap();
        fresh.load_state(&state, 1).unwrap();
        assert_eq!(
            fresh.state_tensors()["w.x"].to_vec1::<f32>().unwrap(),
            saved
        );
        // Without `w.x` (an older checkpoint), the master starts from the (already restored) weights.
        let y = bf16([1.5, 2.5]);
        let mut older = AdamW::new(vec![("x".into(), y.clone())], &cfg()).unwrap();
        y.set(
            &Tensor::new(&[3.0f32, 4.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let mut without = state.clone();
        without.remove("w.x");
        older.load_state(&without, 1).unwrap();
        assert_eq!(
            older.state_tensors()["w.x"].to_vec1::<f32>().unwrap(),
            [3.0, 4.0]
        );
        // A master of the wrong shape is named.
        let mut bad = state;
        bad.insert("w.x".into(), Tensor::zeros(3, DType::F32, &dev).unwrap());
        let err = older.load_state(&bad, 1).unwrap_err().to_string();
        assert!(err.contains("w.x"), "{err}");
    }

    #[test]
    fn moments_of_another_dtype_load_as_f32() {
        // Checkpoints written before the moments were f32 hold them in the weights' dtype (bf16 on a GPU).
        let dev = Device::Cpu;
        let x = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), x)], &cfg()).unwrap();
        let old: HashMap<String, Tensor> = [("m.x", [0.5f32, -0.25]), ("v.x", [0.125f32, 4.0])]
            .into_iter()
            .map(|(k, v)| {
                let t = Tensor::new(&v, &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                (k.to_string(), t)
            })
            .collect();
        opt.load_state(&old, 7).unwrap();
        let st = opt.state_tensors();
        assert_eq!(st["m.x"].dtype(), DType::F32);
        assert_eq!(st["v.x"].to_vec1::<f32>().unwrap(), [0.125, 4.0]);
        assert_eq!(opt.t, 7);
    }

    #[test]
    fn schedules() {
        let mut c = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            ..OptimConfig::default()
        };
        assert_eq!(learning_rate(&c, 0, 100), 0.25);
        assert_eq!(learning_rate(&c, 3, 100), 1.0);
        assert_eq!(learning_rate(&c, 50, 100), 1.0);
        c.schedule = LrSchedule::Cosine;
        c.min_lr_ratio = 0.0;
        assert!((learning_rate(&c, 4, 104) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 54, 104) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&c, 103, 104) < 0.01);
    }
}
