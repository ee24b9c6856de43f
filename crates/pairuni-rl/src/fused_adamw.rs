//! AdamW's update of one variable as one CUDA kernel, in place (`[*.optim] fused`).
//!
//! [`crate::optim::AdamW`] composes the update of every variable of ~20 candle ops (casts, affines, the two
//! moments, the bias corrections, the square root, the division, decay, the master weight, the rounding to the
//! weight's dtype), each a kernel launch and a pass over the parameter: at Janus-Pro-1B's language model that is
//! ≈ 4,400 tensors per step and about 170 bytes of memory traffic per parameter. This kernel reads the gradient,
//! the moments and the master weight once and writes them and the weight once (28 bytes per bf16 parameter).
//!
//! It performs the composition's operations in the composition's order, each rounded to f32 (the `_rn`
//! intrinsics keep the compiler from fusing a multiply and an add), so its results are the composition's bit for
//! bit, which the tests check by running its source on the CPU (`pairuni_model::kernel_emulator`). Like the decode
//! attention kernel it is compiled by NVRTC from a header-free source, and its first call in a process is
//! checked against the composition on the same inputs: on a mismatch or a compilation failure the composition's
//! values are kept and the kernel is turned off for the process.

/// The update's scalars as the composition's candle ops take them (f64 settings rounded to f32 once).
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    /// Gradient-norm clipping factor (1 without clipping).
    pub clip: f32,
    /// β₁.
    pub b1: f32,
    /// 1 − β₁.
    pub one_minus_b1: f32,
    /// β₂.
    pub b2: f32,
    /// 1 − β₂.
    pub one_minus_b2: f32,
    /// 1 / (1 − β₁ᵗ), the first moment's bias correction.
    pub inv_bc1: f32,
    /// 1 / (1 − β₂ᵗ), the second moment's bias correction.
    pub inv_bc2: f32,
    /// ε.
    pub eps: f32,
    /// 1 − lr · weight decay.
    pub decay: f32,
    /// The learning rate.
    pub lr: f32,
}

impl Scalars {
    /// The scalars of step `t` (1-based) at learning rate `lr` with clipping factor `clip`.
    pub fn of(cfg: &crate::config::OptimConfig, t: u64, lr: f64, clip: f64) -> Self {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        Self {
            clip: clip as f32,
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            inv_bc1: (1.0 / (1.0 - b1.powi(t as i32))) as f32,
            inv_bc2: (1.0 / (1.0 - b2.powi(t as i32))) as f32,
            eps: cfg.eps as f32,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            lr: lr as f32,
        }
    }
}

/// CUDA source, after `pairuni_model::nvrtc::BF16_PRELUDE` (bf16 as raw 16-bit words: no header needed).
/// `master` may be null (f32 weights, or master weights off): the weight itself is then read as θ.
pub const SOURCE: &str = r#"
template <typename G, typename W>
__device__ void adamw(
    const G* g, float* m, float* v, float* master, W* w, long n,
    float clip, float b1, float omb1, float b2, float omb2, float ibc1, float ibc2, float eps, float decay,
    float lr)
{
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gf = __fmul_rn(load_val(g, i), clip);
        float mn = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gf, omb1));
        float vn = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gf, gf), omb2));
        float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vn, ibc2)), eps);
        float update = __fdiv_rn(__fmul_rn(mn, ibc1), den);
        float theta = master ? master[i] : load_val(w, i);
        theta = __fsub_rn(__fmul_rn(theta, decay), __fmul_rn(update, lr));
        m[i] = mn;
        v[i] = vn;
        if (master) master[i] = theta;
        store_val(w, i, theta);
    }
}

#define ADAMW(name, G, W) \
extern "C" __global__ void name( \
    const G* g, float* m, float* v, float* master, W* w, long n, float clip, float b1, float omb1, float b2, \
    float omb2, float ibc1, float ibc2, float eps, float decay, float lr) { \
    adamw<G, W>(g, m, v, master, w, n, clip, b1, omb1, b2, omb2, ibc1, ibc2, eps, decay, lr); \
}
ADAMW(adamw_bf16, bf16_t, bf16_t)
ADAMW(adamw_f32, float, float)
"#;

/// Whether the kernel may run, has been checked, or is off (`PAIRUNI_FUSED_ADAMW=off` turns it off).
pub static TRUST: pairuni_model::nvrtc::Trust =
    pairuni_model::nvrtc::Trust::new("PAIRUNI_FUSED_ADAMW", "fused AdamW kernel");

/// The kernel's module.
pub(crate) static MODULE: pairuni_model::nvrtc::Module =
    pairuni_model::nvrtc::Module::new("pairuni_fused_adamw", SOURCE);

/// The kernel's module, for checks that compile every kernel (`pairuni bench gpu-kernels`).
pub fn module() -> &'static pairuni_model::nvrtc::Module {
    &MODULE
}

/// The kernel's launch updating one variable in place: gradient `g` (the weight's dtype), moments `m`, `v` (f32),
/// master weight (f32, optional) and the weight `w` (bf16 or f32), all contiguous with `w`'s element count.
/// `None` when these tensors are not a case the kernel takes.
pub fn launch_of<'a>(
    g: &'a candle_core::Tensor,
    m: &'a candle_core::Tensor,
    v: &'a candle_core::Tensor,
    master: Option<&'a candle_core::Tensor>,
    w: &'a candle_core::Tensor,
    s: &Scalars,
) -> Option<pairuni_model::nvrtc::Launch<'a>> {
    use candle_core::DType;
    use pairuni_model::nvrtc::Arg;
    let n = w.elem_count();
    let f32s = [Some(m), Some(v), master];
    let shapes_fit = [g, m, v, w]
        .into_iter()
        .chain(master)
        .all(|t| t.is_contiguous() && t.elem_count() == n)
        && f32s.iter().flatten().all(|t| t.dtype() == DType::F32)
        && pairuni_model::nvrtc::one_kernel_dtype(&[g, w]);
    if !shapes_fit || n == 0 {
        return None;
    }
    let kernel = pairuni_model::nvrtc::instantiation(w.dtype(), "adamw_bf16", "adamw_f32");
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(THREADS as usize).min(1 << 20) as u32;
    let mut args = vec![
        Arg::Input(g),
        Arg::InPlace(m),
        Arg::InPlace(v),
        // A null pointer tells the kernel there is no master weight.
        master.map_or(Arg::Null(DType::F32), Arg::InPlace),
        Arg::InPlace(w),
        Arg::I64(n as i64),
    ];
    args.extend(
        [
            s.clip,
            s.b1,
            s.one_minus_b1,
            s.b2,
            s.one_minus_b2,
            s.inv_bc1,
            s.inv_bc2,
            s.eps,
            s.decay,
            s.lr,
        ]
        .map(Arg::F32),
    );
    Some(pairuni_model::nvrtc::Launch::linear(
        kernel, blocks, THREADS, args,
    ))
}

/// Updates one variable in place on a CUDA device (operands as [`launch_of`] takes them). The kernel writes m, v,
/// the master weight and the weight in place, as `Var::set` and the moments' replacement would; nothing else
/// reads them during the step. `Ok(false)` when the kernel does not take these tensors (the caller composes the
/// update instead), as on the CPU.
pub(crate) fn launch(
    g: &candle_core::Tensor,
    m: &candle_core::Tensor,
    v: &candle_core::Tensor,
    master: Option<&candle_core::Tensor>,
    w: &candle_core::Tensor,
    s: &Scalars,
) -> candle_core::Result<bool> {
    if !pairuni_model::nvrtc::runs_kernels(w.device()) {
        return Ok(false);
    }
    let Some(launch) = launch_of(g, m, v, master, w, s) else {
        return Ok(false);
    };
    Ok(MODULE.launch(&launch)?.is_some())
}
