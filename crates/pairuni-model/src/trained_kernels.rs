//! Training forwards' ops with hand-written backwards: candle's fused RMSNorm, rotary and softmax kernels, and the
//! projections, head split and attention core of a decoder layer as one autograd node each.
//!
//! candle-nn's fused kernels have no backward, so training forwards composed them of basic ops (nine launches
//! for an RMSNorm, nine per rotary embedding, six for a softmax), and autograd turned each basic op into
//! several more: candle's backward creates a zero tensor and adds into it for every input of every node, and
//! a transpose or reshape becomes a strided copy. On a GPU a candle op costs tens of µs of host time whatever
//! its size, and a PairGRPO step at Janus-Pro shapes created about 82,000 tensors in its train phase
//! (`bench gpu-step`'s `train_split`), so the op count is the step's cost. Here each block computes its value
//! without a graph (the same kernels in the same order as the composition, so the value is bit for bit the
//! same), and one custom op puts that value into the graph of its inputs with a backward of a few ops.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

/// A contiguous copy of the tensor `l` lays out in `s`, to become a custom op's own result.
fn copy_result<S>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the fresh buffer is written by the strided copy below before it is read.
    let mut out = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, l.shape().clone()))
}

/// A value computed before its custom op ran, handed to the op's forward once and then dropped, so that the
/// graph keeps only the op's copy.
struct Stored(Mutex<Option<Tensor>>);

impl Stored {
    fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("a stored result's lock was poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("a stored result was taken twice".into()))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(s) => copy_result(s, l),
            _ => candle_core::bail!("a stored result on another device than the op's arguments"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(s) => copy_result(s, l),
            _ => candle_core::bail!("a stored result on another device than the op's arguments"),
        }
    }
}

/// The forwards of a custom op whose result is its [`Stored`] value (`self.out`); the arguments (named) are
/// what the backward differentiates.
macro_rules! result_is_stored {
    ($($arg:ident),*) => {
        fn cpu_fwd(&self, $($arg: &CpuStorage, _: &Layout,)*) -> candle_core::Result<(CpuStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($arg: &candle_core::CudaStorage, _: &Layout,)*
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cuda()
        }
    };
}

/// A bias-free dense layer y = x Wᵀ (x [.., in], W [out, in]): dx = g W, dW = gᵀ x. Its forward is the matmul
/// itself (no copy), through the same storage call as `x.reshape((rows, in)).matmul(&W.t())`.
struct LinearOp;

/// y = x Wᵀ on one backend's storages (x contiguous).
fn linear_storage<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (out, inner) = wl.shape().dims2()?;
    let dims = xl.dims();
    if dims.last() != Some(&inner) || !xl.is_contiguous() {
        candle_core::bail!(
            "linear: input {dims:?} (contiguous: {}) against a weight [{out}, {inner}]",
            xl.is_contiguous()
        );
    }
    let rows = xl.shape().elem_count() / inner;
    let x2 = Layout::contiguous_with_offset((rows, inner), xl.start_offset());
    let y = x.matmul(w, (1, rows, out, inner), &x2, &wl.transpose(0, 1)?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = out;
    Ok((y, Shape::from(out_dims)))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-with-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        linear_storage(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        linear_storage(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = w.dims2()?;
        let rows = x.elem_count() / inner;
        let g = grad.reshape((rows, out))?;
        // candle stores what a custom op returns even for an argument outside the graph (a frozen weight).
        let dx = tracked(x, || g.matmul(w)?.reshape(x.shape()))?;
        let dw = tracked(w, || g.t()?.matmul(&x.reshape((rows, inner))?))?;
        Ok((dx, dw))
    }
}

/// The gradient `f` computes, for an argument that is part of the graph (a variable or computed from one).
fn tracked(
    arg: &Tensor,
    f: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if arg.track_op() {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// `x` [.., in] times the transposed weight `w` [out, in], differentiable in both (values bit for bit those of
/// the reshape-and-matmul composition).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(w, LinearOp)
}

/// Heads [B, n, T, D] split out of x [B, T, n·D], with a rotate-half rotary embedding when `rope` holds tables
/// (cos, sin) [B, T, D/2]: a rotation, so its adjoint is the rotation by −sin (any scale folded into the tables
/// passes through both), followed by the merge of the heads.
struct HeadsOp {
    out: Stored,
    rope: Option<(Tensor, Tensor)>,
}

impl CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        "heads-rope-with-backward"
    }

    result_is_stored!(x);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = match &self.rope {
            Some((cos, sin)) => candle_nn::rotary_emb::rope(&grad.contiguous()?, cos, &sin.neg()?)?,
            None => grad.clone(),
        };
        Ok(Some(g.transpose(1, 2)?.reshape(x.shape())?))
    }
}

/// The `heads` heads [B, heads, T, D] of `x` [B, T, heads·D], rotated by candle's rotary kernel when `rope` holds
/// tables [B, T, D/2]; differentiable in `x` (the tables are constants).
pub(crate) fn heads(
    x: &Tensor,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("{width} features do not split into {heads} heads");
    }
    let split = x
        .detach()
        .reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()?;
    let out = match rope {
        Some((cos, sin)) => candle_nn::rotary_emb::rope(&split, cos, sin)?,
        None => split,
    };
    x.apply_op1(HeadsOp {
        out: Stored::new(out),
        rope: rope.map(|(c, s)| (c.clone(), s.clone())),
    })
}

/// Keys or values [B, kv, T, D] repeated for `rep` query heads each → [B, kv·rep, T, D].
pub(crate) fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, rep, t, d))?
        .reshape((b, kv * rep, t, d))
}

/// The adjoint of [`repeat_kv`]: the gradients of each group of `rep` heads summed.
fn fold_kv(g: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(g.clone());
    }
    let (b, n, t, d) = g.dims4()?;
    g.reshape((b, n / rep, rep, t, d))?.sum(2)
}

/// Attention o = softmax(q kᵀ + mask) v with its heads merged, [B, T, heads·D]; p the probabilities (f32, and
/// rounded to the inputs' dtype as the second matmul read them): dv = p̃ᵀ g, dp = g vᵀ,
/// ds = p ⊙ (dp − Σ dp ⊙ p) (f32, rounded back), dq = ds k, dk = dsᵀ q.
struct AttentionOp {
    out: Stored,
    probs: Tensor,
    probs_rounded: Tensor,
    rep: usize,
    /// Whether the softmax backward may run as one CUDA kernel ([`crate::backward_kernels`]).
    kernel: bool,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention-with-backward"
    }

    result_is_stored!(q, k, v);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, heads, t, d) = q.dims4()?;
        let g = grad
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let (ke, ve) = (repeat_kv(k, self.rep)?, repeat_kv(v, self.rep)?);
        let dv = tracked(v, || {
            fold_kv(&self.probs_rounded.t()?.matmul(&g)?, self.rep)
        })?;
        let dp = g.matmul(&ve.t()?)?;
        let ds = crate::backward_kernels::softmax_backward(&dp, &self.probs, self.kernel)?;
        let dq = tracked(q, || ds.matmul(&ke.contiguous()?))?;
        let dk = tracked(k, || fold_kv(&ds.t()?.matmul(q)?, self.rep))?;
        Ok((dq, dk, dv))
    }
}

/// Attention of queries `q` [B, heads, T, D] (the 1/√D scale already in them) over keys and values `k`, `v`
/// [B, kv_heads, T_all, D] under the additive f32 `mask` [B, 1, T, T_all], softmax in f32 through candle's
/// kernel: [B, T, heads·D], differentiable in `q`, `k` and `v`; with `kernel`, the softmax backward runs as one
/// CUDA kernel on a CUDA device ([`crate::backward_kernels`]).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    kernel: bool,
) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("{heads} query heads do not group over {kv_heads} key heads");
    }
    let rep = heads / kv_heads;
    let kt = repeat_kv(&k.detach(), rep)?.t()?.contiguous()?;
    let ve = repeat_kv(&v.detach(), rep)?.contiguous()?;
    let scores = q
        .detach()
        .matmul(&kt)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?
        .contiguous()?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let probs_rounded = probs.to_dtype(q.dtype())?;
    let out = probs_rounded
        .matmul(&ve)?
        .transpose(1, 2)?
        .reshape((b, t, heads * d))?;
    q.apply_op3(
        k,
        v,
        AttentionOp {
            out: Stored::new(out),
            probs,
            probs_rounded,
            rep,
            kernel,
        },
    )
}

/// y = silu(g) ⊙ u as one node: dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))), du = dy ⊙ silu(g)
/// ([`crate::backward_kernels`]).
struct SiluMulOp {
    out: Stored,
    /// Whether the backward may run as one CUDA kernel.
    kernel: bool,
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "silu-mul-with-backward"
    }

    result_is_stored!(g, u);

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = crate::backward_kernels::silu_mul_backward(g, u, grad, self.kernel)?;
        Ok((
            Some(dg).filter(|_| g.track_op()),
            Some(du).filter(|_| u.track_op()),
        ))
    }
}

/// silu(`g`) ⊙ `u` (one shape), differentiable in both: its value through the sampling forwards' SiLU · gate
/// kernel where `value_kernel` asks for it ([`crate::layer_kernels::silu_mul`], candle's arithmetic), its backward
/// through one CUDA kernel where `backward_kernel` does.
pub(crate) fn silu_mul(
    g: &Tensor,
    u: &Tensor,
    value_kernel: bool,
    backward_kernel: bool,
) -> candle_core::Result<Tensor> {
    let y = crate::layer_kernels::silu_mul(&g.detach(), &u.detach(), value_kernel)?;
    g.apply_op2(
        u,
        SiluMulOp {
            out: Stored::new(y),
            kernel: backward_kernel,
        },
    )
}

/// RMSNorm y = x · r · w with r = 1/√(mean(x²) + ε) per row; with n = x · r and dn = g ⊙ w:
/// dx = r ⊙ (dn − n ⊙ mean(dn ⊙ n)), dw = Σ_rows g ⊙ n (all in f32).
struct RmsNormBackward {
    out: Stored,
    eps: f64,
    /// Whether the backward may run as one CUDA kernel ([`crate::norm_kernel`]).
    kernel: bool,
}

impl RmsNormBackward {
    /// The backward composed of candle ops: (dx, dw) for the arguments in the graph.
    fn composed(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
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
        let dw = tracked(w, || {
            (gf * &n)?
                .reshape(((), hidden))?
                .sum(0)?
                .to_dtype(w.dtype())
        })?;
        Ok((Some(dx.to_dtype(x.dtype())?).filter(|_| x.track_op()), dw))
    }
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-with-backward"
    }

    result_is_stored!(x, w);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Through the kernel where it applies and is trusted; its first call in a process is checked against the
        // composition (whose values that call returns if the kernel's differ).
        if !self.kernel {
            return self.composed(x, w, grad);
        }
        // bf16 outputs are compared at bf16's rounding, f32 ones near f32's (the sums run in another order).
        let tolerance = if x.dtype() == DType::F32 { 1e-4 } else { 2e-2 };
        crate::norm_kernel::TRUST.run(
            tolerance,
            // Training is never captured.
            || Ok(false),
            || {
                Ok(
                    crate::norm_kernel::backward(x, w, grad, self.eps)?.map(|(dx, dw)| {
                        (
                            Some(dx).filter(|_| x.track_op()),
                            Some(dw).filter(|_| w.track_op()),
                        )
                    }),
                )
            },
            || self.composed(x, w, grad),
        )
    }
}

/// RMSNorm of `x` [.., H] with weight `w` [H] through candle's kernel, differentiable in both; with `kernel`, the
/// backward runs as one CUDA kernel on a CUDA device ([`crate::norm_kernel`]).
pub(crate) fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    kernel: bool,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::rms_norm(&x.detach(), &w.detach(), eps as f32)?;
    x.apply_op2(
        w,
        RmsNormBackward {
            out: Stored::new(y),
            eps,
            kernel,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{apply_rope, softmax_last as composed_softmax, Linear, RmsNorm};
    use candle_core::{Device, Module, Var};

    fn var(shape: &[usize], seed: usize) -> Var {
        let n: usize = shape.iter().product();
        let v = crate::layers::test_values(n, seed);
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::layers::checked_rel_diff(a, b, 1e-3)
    }

    /// A loss that weighs every output element differently, so that each one's gradient is tested.
    fn weighted_sum(y: &Tensor) -> Tensor {
        let w = var(y.dims(), 7).as_tensor().clone();
        (y * w).unwrap().sum_all().unwrap()
    }

    /// Values within `value_tol` and the gradient of every argument within 1e-5 of the composition's.
    fn matches_composition(
        args: &[&Var],
        op: impl Fn(&[&Tensor]) -> Tensor,
        composed: impl Fn(&[&Tensor]) -> Tensor,
        value_tol: f32,
    ) {
        let ts: Vec<&Tensor> = args.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (op(&ts), composed(&ts));
        assert_eq!(a.dims(), b.dims());
        assert!(max_rel(&a, &b) <= value_tol, "values: {}", max_rel(&a, &b));
        let ga = weighted_sum(&a).backward().unwrap();
        let gb = weighted_sum(&b).backward().unwrap();
        for v in args {
            let (p, q) = (
                ga.get(v.as_tensor()).expect("the op's gradient"),
                gb.get(v.as_tensor()).expect("the composition's gradient"),
            );
            assert!(
                max_rel(p, q) < 1e-5,
                "{:?} gradient: {}",
                v.dims(),
                max_rel(p, q)
            );
        }
    }

    #[test]
    fn linear_values_are_the_compositions_bit_for_bit_and_its_gradients_match() {
        let x = var(&[2, 3, 8], 1);
        let w = var(&[5, 8], 2);
        let composed = |t: &[&Tensor]| {
            Linear {
                weight: t[1].clone(),
                bias: None,
            }
            .forward(t[0])
            .unwrap()
        };
        matches_composition(&[&x, &w], |t| linear(t[0], t[1]).unwrap(), composed, 0.0);
        // A strided input (a transposed view) is made contiguous first.
        let xt = var(&[2, 8, 3], 3);
        let a = linear(&xt.as_tensor().transpose(1, 2).unwrap(), w.as_tensor()).unwrap();
        let b = composed(&[&xt.as_tensor().transpose(1, 2).unwrap(), w.as_tensor()]);
        assert_eq!(max_rel(&a, &b), 0.0);
    }

    #[test]
    fn frozen_arguments_get_no_gradient() {
        let x = var(&[2, 3, 8], 1);
        let frozen = var(&[5, 8], 2).as_tensor().detach();
        let grads = weighted_sum(&linear(x.as_tensor(), &frozen).unwrap())
            .backward()
            .unwrap();
        assert!(
            grads.get(&frozen).is_none(),
            "a frozen weight was differentiated"
        );
        assert!(grads.get(x.as_tensor()).is_some());
        let (w, xd) = (var(&[8], 3), x.as_tensor().detach());
        let grads = weighted_sum(&rms_norm(&xd, w.as_tensor(), 1e-6, false).unwrap())
            .backward()
            .unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
        assert!(
            grads.get(&xd).is_none(),
            "a frozen input was differentiated"
        );
    }

    /// Scaled rotary tables [B, T, D/2] (the queries' carry the attention scale, which must reach the gradient).
    fn tables(b: usize, t: usize, d: usize) -> (Tensor, Tensor) {
        let ang = Tensor::arange(0f32, (b * t * d / 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((b, t, d / 2))
            .unwrap()
            .affine(0.37, 0.1)
            .unwrap();
        (
            ang.cos().unwrap().affine(0.5, 0.0).unwrap(),
            ang.sin().unwrap().affine(0.5, 0.0).unwrap(),
        )
    }

    fn split_heads(x: &Tensor, n: usize) -> Tensor {
        let (b, t, w) = x.dims3().unwrap();
        x.reshape((b, t, n, w / n))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn head_splits_with_and_without_rotation_match_the_composition() {
        let (b, t, n, d) = (2, 4, 3, 8);
        let x = var(&[b, t, n * d], 2);
        let (cos, sin) = tables(b, t, d);
        let bcast = |u: &Tensor| u.reshape((b, 1, t, d / 2)).unwrap();
        matches_composition(
            &[&x],
            |a| heads(a[0], n, Some((&cos, &sin))).unwrap(),
            |a| apply_rope(&split_heads(a[0], n), &bcast(&cos), &bcast(&sin)).unwrap(),
            1e-6,
        );
        matches_composition(
            &[&x],
            |a| heads(a[0], n, None).unwrap(),
            |a| split_heads(a[0], n),
            0.0,
        );
    }

    /// The composition the attention op replaces, with the grouped heads repeated as the model's layers do.
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let (b, n, t, d) = q.dims4().unwrap();
        let rep = n / k.dim(1).unwrap();
        let (ke, ve) = (repeat_kv(k, rep).unwrap(), repeat_kv(v, rep).unwrap());
        let scores = q
            .matmul(&ke.t().unwrap().contiguous().unwrap())
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        composed_softmax(&scores)
            .unwrap()
            .matmul(&ve.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, n * d))
            .unwrap()
    }

    #[test]
    fn attention_values_and_gradients_match_the_composition_with_grouped_heads_and_masked_keys() {
        let (b, t, past, d) = (2, 3, 2, 8);
        for (heads, kv_heads) in [(4, 4), (4, 2)] {
            let q = var(&[b, heads, t, d], 5);
            let k = var(&[b, kv_heads, past + t, d], 6);
            let v = var(&[b, kv_heads, past + t, d], 7);
            // Causal over the new tokens, and row 1's first cached key masked out.
            let mut m = vec![0f32; b * t * (past + t)];
            for row in 0..b {
                for i in 0..t {
                    for j in 0..past + t {
                        let masked = j > past + i || (row == 1 && j == 0);
                        if masked {
                            m[(row * t + i) * (past + t) + j] = -1e9;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, t, past + t), &Device::Cpu).unwrap();
            matches_composition(
                &[&q, &k, &v],
                |a| attention(a[0], a[1], a[2], &mask, false).unwrap(),
                |a| composed_attention(a[0], a[1], a[2], &mask),
                1e-6,
            );
        }
    }

    /// The comparison can tell a wrong backward: an attention op that keeps the probabilities of another mask
    /// (its value is the right one) fails it.
    #[test]
    #[should_panic(expected = "gradient")]
    fn an_attention_backward_with_the_wrong_probabilities_fails_the_comparison() {
        let (b, heads, t, d) = (2, 2, 4, 8);
        let (q, k, v) = (
            var(&[b, heads, t, d], 5),
            var(&[b, heads, t, d], 6),
            var(&[b, heads, t, d], 7),
        );
        let causal: Vec<f32> = (0..b * t * t)
            .map(|i| if i % t > (i / t) % t { -1e9 } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (b, 1, t, t), &Device::Cpu).unwrap();
        let unmasked = Tensor::zeros((b, 1, t, t), DType::F32, &Device::Cpu).unwrap();
        let mutated = |a: &[&Tensor]| {
            let scores = a[0]
                .detach()
                .matmul(&a[1].detach().t().unwrap())
                .unwrap()
                .broadcast_add(&unmasked)
                .unwrap();
            let probs = composed_softmax(&scores).unwrap();
            let out = composed_attention(&a[0].detach(), &a[1].detach(), &a[2].detach(), &causal);
            let op = AttentionOp {
                out: Stored::new(out),
                probs_rounded: probs.clone(),
                probs,
                rep: 1,
                kernel: false,
            };
            a[0].apply_op3(a[1], a[2], op).unwrap()
        };
        matches_composition(
            &[&q, &k, &v],
            mutated,
            |a| composed_attention(a[0], a[1], a[2], &causal),
            1e-6,
        );
    }

    #[test]
    fn silu_mul_values_are_the_compositions_bit_for_bit_and_its_gradients_match() {
        let (g, u) = (var(&[2, 3, 16], 8), var(&[2, 3, 16], 9));
        matches_composition(
            &[&g, &u],
            |a| silu_mul(a[0], a[1], false, false).unwrap(),
            |a| (a[0].silu().unwrap() * a[1]).unwrap(),
            0.0,
        );
    }

    #[test]
    fn rms_norm_values_and_gradients_match_the_composition() {
        let x = var(&[2, 5, 16], 3);
        let w = var(&[16], 4);
        let composed = RmsNorm {
            weight: w.as_tensor().clone(),
            eps: 1e-6,
        };
        let a = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, false).unwrap();
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
