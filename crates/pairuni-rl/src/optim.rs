//! AdamW with decoupled weight decay over candle `Var`s, global gradient-norm clipping and the learning-rate
//! schedule. Our own so that the moments are plain named tensors a checkpoint can save and restore exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::config::{LrSchedule, OptimConfig};

/// AdamW state: the trained variables and their first/second moments.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
    /// Zero moments for `vars`.
    pub fn new(vars: Vec<(String, Var)>, cfg: &OptimConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
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
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt() as f32)
    }

    /// One AdamW update at learning rate `lr`, after clipping the global gradient norm to `max_grad_norm`.
    /// The caller checks the returned norm for non-finite values *before* calling (see [`AdamW::grad_norm`]).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let norm = self.grad_norm(grads)?;
        let clip = if self.cfg.max_grad_norm > 0.0 && norm as f64 > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / (norm as f64 + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.affine(clip, 0.0)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            // Decoupled decay: shrink the weights directly, not through the gradient.
            let theta = var
                .as_tensor()
                .affine(1.0 - lr * self.cfg.weight_decay, 0.0)?;
            var.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(StepInfo {
            grad_norm: norm,
            lr,
        })
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the update count; every trained variable must be
    /// present with its shape, else an error names the first missing or mismatched one.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
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
                *slot = tensor.to_device(var.device())?.to_dtype(var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
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
