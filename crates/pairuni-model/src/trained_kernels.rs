//! candle's fused RMSNorm, rotary and softmax kernels with a backward: the training forwards' kernels on a GPU.
//!
//! candle-nn's fused kernels have no backward, so training forwards composed them of basic ops (nine launches
//! for an RMSNorm, nine per rotary embedding, six for a softmax), and autograd turned each basic op into
//! several more. On a GPU a candle op costs tens of µs of host time whatever its size, and a PairGRPO step at
//! Janus-Pro shapes creates about 82,000 tensors in its train phase (`bench gpu-step`'s `train_split`), so
//! the op count is the step's cost. Here the fused kernel computes the value without a graph, and a custom op
//! puts that value back into the graph of its input (one copy) with a hand-written backward of a few ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

/// The storage of a fresh kernel output, copied to become the custom op's own result.
fn copy_result<S: BackendStorage>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("a re-attached kernel result must be a fresh contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// The forwards of a custom op whose result is a copy of its last argument (the kernel's value); the arguments
/// before it (named) are what the backward differentiates.
macro_rules! result_is_last_arg {
    ($($skip:ident),*) => {
        fn cpu_fwd(&self, $($skip: &CpuStorage, _: &Layout,)* s: &CpuStorage, l: &Layout)
            -> candle_core::Result<(CpuStorage, Shape)> {
            $(let _ = $skip;)*
            copy_result(s, l)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($skip: &candle_core::CudaStorage, _: &Layout,)*
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            $(let _ = $skip;)*
            copy_result(s, l)
        }
    };
}

/// Softmax over the last dim: d x = y ⊙ (g − Σ g ⊙ y).
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-backward"
    }

    result_is_last_arg!(x);

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok((Some(grad.broadcast_sub(&dot)?.mul(res)?), None))
    }
}

/// Softmax over the last dim of `x` through candle's kernel, differentiable.
pub(crate) fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    x.apply_op2(&y, SoftmaxBackward)
}

/// Rotate-half rotary embedding with tables (cos, sin) [T, D/2] or [B, T, D/2]: a rotation, so its adjoint is
/// the rotation by −sin (any scale folded into the tables passes through both).
struct RopeBackward {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp2 for RopeBackward {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    result_is_last_arg!(x);

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = candle_nn::rotary_emb::rope(&grad.contiguous()?, &self.cos, &self.sin.neg()?)?;
        Ok((Some(dx), None))
    }
}

/// Rotary embedding of `x` [B, H, T, D] through candle's kernel, differentiable in `x` (the tables are
/// constants).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&x.detach(), cos, sin)?;
    x.apply_op2(
        &y,
        RopeBackward {
            cos: cos.clone(),
            sin: sin.clone(),
        },
    )
}

/// RMSNorm y = x · r · w with r = 1/√(mean(x²) + ε) per row; with n = x · r and dn = g ⊙ w:
/// dx = r ⊙ (dn − n ⊙ mean(dn ⊙ n)), dw = Σ_rows g ⊙ n (all in f32).
struct RmsNormBackward {
    eps: f64,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-with-backward"
    }

    result_is_last_arg!(x, w);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xf = x.to_dtype(DType::F32)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let n = xf.broadcast_mul(&r)?;
        let gf = grad.to_dtype(DType::F32)?;
        let dn = gf.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let dot = (&dn * &n)?.mean_keepdim(D::Minus1)?;
        let dx = (dn - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        let hidden = w.elem_count();
        let dw = (gf * n)?.reshape(((), hidden))?.sum(0)?;
        Ok((
            Some(dx.to_dtype(x.dtype())?),
            Some(dw.to_dtype(w.dtype())?),
            None,
        ))
    }
}

/// RMSNorm of `x` [.., H] with weight `w` [H] through candle's kernel, differentiable in both.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::rms_norm(&x.detach(), &w.detach(), eps as f32)?;
    x.apply_op3(w, &y, RmsNormBackward { eps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{apply_rope, softmax_last as composed_softmax, RmsNorm};
    use candle_core::{Device, Module, Var};

    fn var(shape: &[usize], seed: usize) -> Var {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 2654435761usize) % 997) as f32 / 498.5 - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 1e-3, "a reference of zeros proves nothing");
        crate::layers::rel_diff(a, b).unwrap()
    }

    /// A loss that weighs every output element differently, so that each one's gradient is tested.
    fn weighted_sum(y: &Tensor) -> Tensor {
        let w = var(y.dims(), 7).as_tensor().clone();
        (y * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn softmax_values_and_gradients_match_the_composition() {
        let x = var(&[2, 3, 5, 9], 1);
        let a = softmax_last(x.as_tensor()).unwrap();
        let b = composed_softmax(x.as_tensor()).unwrap();
        assert!(max_rel(&a, &b) < 1e-6);
        let ga = weighted_sum(&a).backward().unwrap();
        let gb = weighted_sum(&b).backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(max_rel(ga, gb) < 1e-5, "{}", max_rel(ga, gb));
    }

    #[test]
    fn rope_values_and_gradients_match_the_composition() {
        let (b, h, t, d) = (2, 3, 4, 8);
        let x = var(&[b, h, t, d], 2);
        // Scaled tables, as the queries' are: the scale must reach the gradient too.
        let ang = Tensor::arange(0f32, (t * d / 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((t, d / 2))
            .unwrap()
            .affine(0.37, 0.1)
            .unwrap();
        let (cos, sin) = (
            ang.cos().unwrap().affine(0.5, 0.0).unwrap(),
            ang.sin().unwrap().affine(0.5, 0.0).unwrap(),
        );
        let a = rope(x.as_tensor(), &cos, &sin).unwrap();
        let bcast = |t: &Tensor| t.reshape((1, 1, t.dim(0).unwrap(), d / 2)).unwrap();
        let r = apply_rope(x.as_tensor(), &bcast(&cos), &bcast(&sin)).unwrap();
        assert!(max_rel(&a, &r) < 1e-6);
        let ga = weighted_sum(&a).backward().unwrap();
        let gr = weighted_sum(&r).backward().unwrap();
        let (ga, gr) = (
            ga.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
        );
        assert!(max_rel(ga, gr) < 1e-5, "{}", max_rel(ga, gr));
    }

    #[test]
    fn rms_norm_values_and_gradients_match_the_composition() {
        let x = var(&[2, 5, 16], 3);
        let w = var(&[16], 4);
        let composed = RmsNorm {
            weight: w.as_tensor().clone(),
            eps: 1e-6,
        };
        let a = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let b = composed.forward(x.as_tensor()).unwrap();
        assert!(max_rel(&a, &b) < 1e-5);
        let ga = weighted_sum(&a).backward().unwrap();
        let gb = weighted_sum(&b).backward().unwrap();
        for v in [&x, &w] {
            let (p, q) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(max_rel(p, q) < 1e-5, "{:?}: {}", v.dims(), max_rel(p, q));
        }
    }
}
