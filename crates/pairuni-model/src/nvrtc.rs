//! The project's CUDA kernels are compiled at run time by NVRTC (which candle already loads) from sources that
//! need no CUDA header, so that the build stays free of a CUDA toolchain and NVRTC need not find headers on the
//! GPU machine. This module holds what those sources share and the compile-and-load step.

use candle_core::{DType, Tensor};

/// Shared device helpers: bf16 travels as raw 16-bit words (`bf16_t`), read and written in f32 (round to nearest
/// even, NaN kept quiet), and warp-wide sums and maxima.
pub const BF16_PRELUDE: &str = r#"
typedef unsigned short bf16_t;

__device__ __forceinline__ float load_val(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load_val(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store_val(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_val(bf16_t* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    p[i] = (bf16_t)(u >> 16);
}

// `v` as an element of the array `p` would hold it (rounded to bf16 for bf16 arrays): what candle's ops store
// between two steps that a kernel does in one.
__device__ __forceinline__ float rounded(const float*, float v) { return v; }
__device__ __forceinline__ float rounded(const bf16_t*, float v) {
    bf16_t t;
    store_val(&t, 0, v);
    return load_val(&t, 0);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
"#;

thread_local! {
    /// Whether this thread's launches on CPU tensors run through the emulator ([`emulate_on_cpu`]).
    static EMULATING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes this thread run the hand-written kernels for CPU tensors through [`crate::kernel_emulator`], as if the
/// CPU were a CUDA device (`true`), or stop (`false`); returns the previous setting. For tests of the kernels'
/// integration: the model's own call sites, their first-call checks and fallbacks then run the kernels' sources
/// end to end, as a GPU would, only far slower (a C++ compiler and a subprocess per launch). Hidden: not for
/// production use. Kernel state that is per process (the first-call checks) is shared with other threads, so a
/// test that emulates belongs in a test binary of its own.
#[doc(hidden)]
pub fn emulate_on_cpu(on: bool) -> bool {
    EMULATING.with(|e| e.replace(on))
}

/// `PAIRUNI_EMULATE_KERNELS=1`: every thread emulates ([`emulate_on_cpu`]), so that a whole command (the device
/// script's `bench gpu-step` at tiny shapes, say) runs its hand-written kernels on the CPU. A developer's check
/// before a device call: slow, and it needs a C++ compiler with AddressSanitizer.
fn emulating_everywhere() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PAIRUNI_EMULATE_KERNELS").is_ok_and(|v| v == "1"))
}

/// Whether this thread emulates the kernels on CPU tensors.
fn emulating() -> bool {
    EMULATING.with(|e| e.get()) || emulating_everywhere()
}

/// Whether the hand-written kernels run for tensors on `device`: a CUDA device, or the CPU where the kernels are
/// emulated ([`emulate_on_cpu`], `PAIRUNI_EMULATE_KERNELS=1`).
pub fn runs_kernels(device: &candle_core::Device) -> bool {
    device.is_cuda() || (device.is_cpu() && emulating())
}

/// `launch` through the emulator when this thread emulates and its tensors are on the CPU: its outputs, its
/// in-place operands written back; `None` otherwise.
fn emulated(module: &Module, launch: &Launch) -> candle_core::Result<Option<Vec<Tensor>>> {
    if !emulating() || !launch.tensors().all(|t| t.device().is_cpu()) {
        return Ok(None);
    }
    let fail = |e: String| candle_core::Error::Msg(format!("emulated {}: {e}", launch.kernel));
    // One thread order: the kernels' own tests run both, for races; here the launches are many.
    let out = crate::kernel_emulator::emulate_once(module, launch).map_err(fail)?;
    let in_place = launch.args.iter().filter_map(|a| match a {
        Arg::InPlace(t) => Some(*t),
        _ => None,
    });
    for (t, written) in in_place.zip(&out.in_place) {
        if !t.is_contiguous() {
            return Err(fail(
                "in-place operands are written back only when contiguous".into(),
            ));
        }
        let value = written.narrow(0, 0, t.elem_count())?.reshape(t.shape())?;
        t.slice_set(&value, 0, 0)?;
    }
    Ok(Some(out.outputs))
}

/// The full source of a kernel module: the prelude, then `body`.
pub fn source(body: &str) -> String {
    format!("{BF16_PRELUDE}{body}")
}

/// A kernel module: the prelude + its body, compiled by NVRTC once per process (on first use, CUDA builds only).
/// [`Module::launch`] runs a [`Launch`] of one of its kernels; the tests run the same launches through the CPU
/// emulator ([`crate::kernel_emulator`]).
pub struct Module {
    name: &'static str,
    body: &'static str,
    #[cfg(feature = "cuda")]
    ptx: std::sync::OnceLock<std::result::Result<String, String>>,
}

impl Module {
    /// The module `name` of the kernels in `body` (after [`BF16_PRELUDE`]).
    pub const fn new(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            body,
            #[cfg(feature = "cuda")]
            ptx: std::sync::OnceLock::new(),
        }
    }

    /// The name to load the module's kernels under (`CudaDevice::get_or_load_custom_func`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The kernels' source after the prelude (what the CPU emulator compiles too).
    pub fn body(&self) -> &'static str {
        self.body
    }

    /// The module's PTX; an NVRTC failure is an error (kept for later calls).
    #[cfg(feature = "cuda")]
    pub fn ptx(&self) -> candle_core::Result<&str> {
        self.ptx
            .get_or_init(|| {
                candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source(self.body))
                    .map(|p| p.to_src())
                    .map_err(|e| format!("NVRTC ({}): {e}", self.name))
            })
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// Compiles the module with NVRTC as its first launch would (no GPU needed: NVRTC is a compiler library) and
    /// returns the PTX's size in bytes, or why it failed: a build without CUDA, NVRTC not found, or the compiler's
    /// own message.
    pub fn compile(&self) -> std::result::Result<usize, String> {
        #[cfg(feature = "cuda")]
        {
            self.ptx().map(str::len).map_err(|e| e.to_string())
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(
                "this binary was built without CUDA (scripts/build-cuda.sh builds one with it)"
                    .into(),
            )
        }
    }

    /// Launches `launch` on the CUDA device of its tensors: each [`Arg::Output`], in order; `None` when a tensor
    /// operand is not on a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn launch(&self, launch: &Launch) -> candle_core::Result<Option<Vec<Tensor>>> {
        if let Some(out) = emulated(self, launch)? {
            return Ok(Some(out));
        }
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, CudaView, LaunchConfig, PushKernelArg,
        };
        let err = |what: &str| candle_core::Error::Msg(format!("{}: {what}", launch.kernel));
        let Some(device) = launch.tensors().next().map(Tensor::device) else {
            return Err(err("a launch without a tensor operand"));
        };
        let candle_core::Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let func = dev.get_or_load_custom_func(launch.kernel, self.name, self.ptx()?)?;
        let operands: Vec<Option<Operand>> = launch
            .args
            .iter()
            .map(|a| match a {
                Arg::Input(t) | Arg::InPlace(t) => Some(Operand::of(t)),
                _ => None,
            })
            .collect();
        // One variant per buffer type the kernels take: cudarc's argument builder is typed per push.
        enum Pushed<'v> {
            Bf16(CudaView<'v, half::bf16>),
            F16(CudaView<'v, half::f16>),
            F32(CudaView<'v, f32>),
            U32(CudaView<'v, u32>),
            NewBf16(CudaSlice<half::bf16>),
            NewF16(CudaSlice<half::f16>),
            NewF32(CudaSlice<f32>),
            NewU32(CudaSlice<u32>),
            Int(i32),
            Long(i64),
            Uint(u32),
            Float(f32),
            Null(u64),
        }
        let mut pushed = Vec::with_capacity(launch.args.len());
        for (arg, operand) in launch.args.iter().zip(&operands) {
            macro_rules! view {
                ($o:expr, $variant:ident, $t:ty) => {
                    match $o.view::<$t>()? {
                        Some(v) => Pushed::$variant(v),
                        None => return Ok(None),
                    }
                };
            }
            pushed.push(match (arg, operand) {
                (Arg::Input(t) | Arg::InPlace(t), Some(o)) => match t.dtype() {
                    DType::BF16 => view!(o, Bf16, half::bf16),
                    DType::F16 => view!(o, F16, half::f16),
                    DType::F32 => view!(o, F32, f32),
                    DType::U32 => view!(o, U32, u32),
                    d => return Err(err(&format!("no kernel takes {d:?} buffers"))),
                },
                (Arg::Output(dtype, shape), _) => {
                    let n = shape.elem_count();
                    // SAFETY: a kernel writes every element of each output it is given (the emulator's tests
                    // check that no element is left as it was allocated).
                    unsafe {
                        match dtype {
                            DType::BF16 => Pushed::NewBf16(dev.alloc::<half::bf16>(n)?),
                            DType::F16 => Pushed::NewF16(dev.alloc::<half::f16>(n)?),
                            DType::F32 => Pushed::NewF32(dev.alloc::<f32>(n)?),
                            DType::U32 => Pushed::NewU32(dev.alloc::<u32>(n)?),
                            d => return Err(err(&format!("no kernel writes {d:?} buffers"))),
                        }
                    }
                }
                (Arg::Null(_) | Arg::NullInput(_), _) => Pushed::Null(0),
                (Arg::I32(x), _) => Pushed::Int(*x),
                (Arg::I64(x), _) => Pushed::Long(*x),
                (Arg::U32(x), _) => Pushed::Uint(*x),
                (Arg::F32(x), _) => Pushed::Float(*x),
                (Arg::Input(_) | Arg::InPlace(_), None) => {
                    return Err(err("a tensor argument without its operand"))
                }
            });
        }
        let cfg = LaunchConfig {
            grid_dim: launch.grid,
            block_dim: launch.block,
            shared_mem_bytes: launch.shared_bytes,
        };
        {
            let mut builder = func.builder();
            for p in &pushed {
                match p {
                    Pushed::Bf16(v) => builder.arg(v),
                    Pushed::F16(v) => builder.arg(v),
                    Pushed::F32(v) => builder.arg(v),
                    Pushed::U32(v) => builder.arg(v),
                    Pushed::NewBf16(s) => builder.arg(s),
                    Pushed::NewF16(s) => builder.arg(s),
                    Pushed::NewF32(s) => builder.arg(s),
                    Pushed::NewU32(s) => builder.arg(s),
                    Pushed::Int(x) => builder.arg(x),
                    Pushed::Long(x) => builder.arg(x),
                    Pushed::Uint(x) => builder.arg(x),
                    Pushed::Float(x) => builder.arg(x),
                    Pushed::Null(x) => builder.arg(x),
                };
            }
            // SAFETY: the launch's arguments follow the kernel's signature (the emulator's tests compile each
            // launch against it: a C++ function pointer of the argument types must take the kernel), and its
            // builder keeps strides and offsets inside the operands' storage (the emulator runs under
            // AddressSanitizer). In-place operands are written as the caller's `Var`s or caches would be.
            unsafe { builder.launch(cfg) }.map_err(|e| err(&e.to_string()))?;
        }
        let mut outputs = Vec::new();
        for (p, arg) in pushed.into_iter().zip(&launch.args) {
            let Arg::Output(_, shape) = arg else { continue };
            outputs.push(match p {
                Pushed::NewBf16(s) => wrap(s, dev, shape.clone()),
                Pushed::NewF16(s) => wrap(s, dev, shape.clone()),
                Pushed::NewF32(s) => wrap(s, dev, shape.clone()),
                Pushed::NewU32(s) => wrap(s, dev, shape.clone()),
                _ => unreachable!("outputs are allocated above"),
            });
        }
        Ok(Some(outputs))
    }

    /// Without CUDA nothing launches (unless the kernels are emulated): the callers run candle's ops.
    #[cfg(not(feature = "cuda"))]
    pub fn launch(&self, launch: &Launch) -> candle_core::Result<Option<Vec<Tensor>>> {
        emulated(self, launch)
    }
}

/// This crate's kernel modules (the trainer's fused AdamW is `pairuni_rl::fused_adamw`'s), for checks that compile
/// them all (`pairuni bench gpu-kernels`).
pub fn modules() -> [&'static Module; 6] {
    [
        &crate::decode_attention::MODULE,
        &crate::layer_kernels::MODULE,
        &crate::draw_kernel::MODULE,
        &crate::norm_kernel::MODULE,
        &crate::backward_kernels::MODULE,
        &crate::conv_kernel::MODULE,
    ]
}

/// Whether `ts` all have one float dtype the kernels are instantiated for (bf16 or f32).
pub fn one_kernel_dtype(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::BF16 | DType::F32) && ts.iter().all(|t| t.dtype() == dtype)
}

/// A kernel's bf16 or f32 instantiation, by `dtype`.
pub fn instantiation(dtype: DType, bf16: &'static str, f32: &'static str) -> &'static str {
    if dtype == DType::BF16 {
        bf16
    } else {
        f32
    }
}

/// One launch of a hand-written kernel as data: built once by the kernel's module for the GPU and for the tests'
/// CPU emulator alike, so that what the tests run is what the GPU is given.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The kernel's (`extern "C"`) name.
    pub kernel: &'static str,
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block.
    pub shared_bytes: u32,
    /// The kernel's arguments in order.
    pub args: Vec<Arg<'a>>,
}

/// One argument of a [`Launch`].
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    /// A tensor the kernel reads (`const T*` at its start offset).
    Input(&'a Tensor),
    /// A tensor the kernel writes in place (`T*` at its start offset).
    InPlace(&'a Tensor),
    /// A fresh buffer of this dtype and shape that the kernel fills whole, returned by the launch (`T*`).
    Output(DType, candle_core::Shape),
    /// A null pointer of this dtype (`T*`): an optional operand that is absent.
    Null(DType),
    /// A null pointer of this dtype (`const T*`): an optional input that is absent.
    NullInput(DType),
    /// `int`.
    I32(i32),
    /// `long` (64-bit).
    I64(i64),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
}

impl<'a> Launch<'a> {
    /// A one-dimensional launch of `kernel` over `blocks` × `threads`, without dynamic shared memory.
    pub fn linear(kernel: &'static str, blocks: u32, threads: u32, args: Vec<Arg<'a>>) -> Self {
        Self {
            kernel,
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
            args,
        }
    }

    /// A grid-stride launch of `kernel` over `n` elements: 256 threads a block, at most 65,536 blocks (the kernel
    /// loops over the rest).
    pub fn grid_stride(kernel: &'static str, n: usize, args: Vec<Arg<'a>>) -> Self {
        const THREADS: usize = 256;
        Self::linear(
            kernel,
            n.div_ceil(THREADS).min(1 << 16) as u32,
            THREADS as u32,
            args,
        )
    }

    /// A launch of `kernel` with one block per row of `cols` values: as many warps as the row fills, up to 8 (the
    /// kernel strides along longer rows).
    pub fn per_row(kernel: &'static str, rows: usize, cols: usize, args: Vec<Arg<'a>>) -> Self {
        let threads = cols.div_ceil(32).clamp(1, 8) as u32 * 32;
        Self::linear(kernel, rows as u32, threads, args)
    }

    /// The tensor operands (inputs and in-place ones), in order.
    pub fn tensors(&self) -> impl Iterator<Item = &'a Tensor> + '_ {
        self.args.iter().filter_map(|a| match a {
            Arg::Input(t) | Arg::InPlace(t) => Some(*t),
            _ => None,
        })
    }
}

/// Whether a hand-written kernel may run in this process: it starts unchecked, its first call is checked against
/// candle's ops on the same inputs (by its caller), and a failed check or launch turns it off for the process, as
/// does its environment variable set to `off`.
pub struct Trust {
    state: std::sync::atomic::AtomicU8,
    /// The first check's relative difference from candle's ops (f32 bits; `NO_DIFF` before a check).
    diff: std::sync::atomic::AtomicU32,
    /// Why the kernel was turned off, if it was.
    failure: std::sync::Mutex<Option<String>>,
    /// Whether `env` says `off`, read once (kernels ask at every launch).
    env_off: std::sync::OnceLock<bool>,
    env: &'static str,
    what: &'static str,
}

const NO_DIFF: u32 = u32::MAX;

const UNCHECKED: u8 = 0;
const TRUSTED: u8 = 1;
const OFF: u8 = 2;

impl Trust {
    /// An unchecked kernel named `what`, turned off by `env=off`.
    pub const fn new(env: &'static str, what: &'static str) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(UNCHECKED),
            diff: std::sync::atomic::AtomicU32::new(NO_DIFF),
            failure: std::sync::Mutex::new(None),
            env_off: std::sync::OnceLock::new(),
            env,
            what,
        }
    }

    fn state(&self) -> u8 {
        self.state.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the kernel may run.
    pub fn usable(&self) -> bool {
        let env_off = *self
            .env_off
            .get_or_init(|| std::env::var(self.env).is_ok_and(|v| v == "off"));
        self.state() != OFF && !env_off
    }

    /// Whether the next call has to be checked.
    pub fn needs_check(&self) -> bool {
        self.state() == UNCHECKED
    }

    /// Records a check: `Ok` trusts the kernel, an error turns it off for the process (with a warning).
    pub fn record(&self, outcome: std::result::Result<(), String>) {
        let state = match outcome {
            Ok(()) => TRUSTED,
            Err(reason) => {
                tracing::warn!(kernel = self.what, %reason, "kernel turned off; candle's ops run instead");
                if let Ok(mut f) = self.failure.lock() {
                    f.get_or_insert(reason);
                }
                OFF
            }
        };
        // `fetch_max`: off stays off, even when another thread's check of the same kernel passed meanwhile.
        self.state
            .fetch_max(state, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records a check that found the relative difference `diff` from candle's ops, against `tolerance`; `detail`
    /// says where (it is only called when the check fails).
    pub fn record_diff(&self, diff: f32, tolerance: f32, detail: impl FnOnce() -> String) {
        let _ = self.diff.compare_exchange(
            NO_DIFF,
            diff.to_bits(),
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        self.record(if diff.is_nan() || diff > tolerance {
            Err(format!(
                "differs from candle's ops by {diff:e} (tolerance {tolerance:e}): {}",
                detail()
            ))
        } else {
            tracing::info!(kernel = self.what, rel_err = diff, "kernel checked");
            Ok(())
        });
    }

    /// The relative difference the first check found, if one ran through [`Trust::record_diff`].
    pub fn check_rel_err(&self) -> Option<f32> {
        let bits = self.diff.load(std::sync::atomic::Ordering::SeqCst);
        (bits != NO_DIFF).then(|| f32::from_bits(bits))
    }

    /// Why the kernel was turned off, if a check or a launch did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The status, the first check's difference and any failure, for a benchmark's JSON.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "status": self.status(),
            "check_rel_err": self.check_rel_err(),
            "failure": self.failure(),
        })
    }

    /// Runs `kernel` under this trust, `composed` (candle's ops) where it may not: when the kernel is off, does
    /// not apply (`Ok(None)`) or fails to launch (which turns it off). The process's first call computes both and
    /// compares them ([`Compared`]) against `tolerance`: it returns the kernel's values if they pass, as every
    /// later call will (so that a sampling run does not differ from the next one in its first step only), and
    /// candle's if not. A first call while the stream is being captured (`capturing`) runs candle's ops: the
    /// check reads back to the host.
    pub fn run<T: Compared>(
        &self,
        tolerance: f32,
        capturing: impl FnOnce() -> candle_core::Result<bool>,
        kernel: impl FnOnce() -> candle_core::Result<Option<T>>,
        composed: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<T> {
        if !self.usable() || (self.needs_check() && capturing()?) {
            return composed();
        }
        let ours = match kernel() {
            Ok(Some(out)) => out,
            Ok(None) => return composed(),
            Err(e) => {
                self.record(Err(format!("launch: {e}")));
                return composed();
            }
        };
        if !self.needs_check() {
            return Ok(ours);
        }
        let reference = composed()?;
        Ok(if self.check(&ours, &reference, tolerance)? {
            ours
        } else {
            reference
        })
    }

    /// Compares a kernel's values with candle's and records the outcome: whether the check passed.
    pub fn check<T: Compared>(
        &self,
        ours: &T,
        theirs: &T,
        tolerance: f32,
    ) -> candle_core::Result<bool> {
        let (mut worst, mut at) = (0f32, None);
        for (i, (a, b)) in ours.pairs(theirs).into_iter().enumerate() {
            let d = crate::layers::rel_diff(a, b)?;
            if d.is_nan() || d > worst || at.is_none() {
                (worst, at) = (d, Some(i));
            }
            if d.is_nan() {
                break;
            }
        }
        let mut detail = String::new();
        let failed = worst.is_nan() || worst > tolerance;
        if failed {
            if let Some(i) = at {
                let (a, b) = ours.pairs(theirs)[i];
                detail = format!("output {i}: {}", describe_difference(a, b)?);
            }
        }
        self.record_diff(worst, tolerance, || detail);
        Ok(!failed)
    }

    /// `unchecked` (it has not run), `trusted` (its check passed) or `off`.
    pub fn status(&self) -> &'static str {
        match self.state() {
            _ if !self.usable() => "off",
            TRUSTED => "trusted",
            _ => "unchecked",
        }
    }
}

/// Values a kernel's check compares with candle's: one tensor or several, in matching pairs (an output a kernel
/// did not compute, `None` on either side, is skipped).
pub trait Compared {
    /// (ours, theirs) for each output.
    fn pairs<'a>(&'a self, theirs: &'a Self) -> Vec<(&'a Tensor, &'a Tensor)>;
}

impl Compared for Tensor {
    fn pairs<'a>(&'a self, theirs: &'a Self) -> Vec<(&'a Tensor, &'a Tensor)> {
        vec![(self, theirs)]
    }
}

impl<const N: usize> Compared for [Tensor; N] {
    fn pairs<'a>(&'a self, theirs: &'a Self) -> Vec<(&'a Tensor, &'a Tensor)> {
        self.iter().zip(theirs.iter()).collect()
    }
}

impl Compared for (Tensor, Tensor) {
    fn pairs<'a>(&'a self, theirs: &'a Self) -> Vec<(&'a Tensor, &'a Tensor)> {
        vec![(&self.0, &theirs.0), (&self.1, &theirs.1)]
    }
}

impl Compared for (Option<Tensor>, Option<Tensor>) {
    fn pairs<'a>(&'a self, theirs: &'a Self) -> Vec<(&'a Tensor, &'a Tensor)> {
        [(&self.0, &theirs.0), (&self.1, &theirs.1)]
            .into_iter()
            .filter_map(|(a, b)| Some((a.as_ref()?, b.as_ref()?)))
            .collect()
    }
}

/// Where two tensors of one shape differ most, for a failed check's message: the element (as a multi-index), both
/// values, and how many elements of ours are not finite. Computed on the tensors' device; three scalars come back.
pub fn describe_difference(ours: &Tensor, theirs: &Tensor) -> candle_core::Result<String> {
    let (a, b) = (ours.to_dtype(DType::F32)?, theirs.to_dtype(DType::F32)?);
    if a.shape() != b.shape() {
        return Ok(format!(
            "shapes differ: {:?} against {:?}",
            a.dims(),
            b.dims()
        ));
    }
    let (fa, fb) = (a.flatten_all()?, b.flatten_all()?);
    // 0 · x is NaN exactly where x is NaN or infinite, and NaN ≠ NaN: counts the elements that are not finite.
    let zeroed = fa.affine(0.0, 0.0)?;
    let not_finite = zeroed.ne(&zeroed)?.to_dtype(DType::F32)?.sum_all()?;
    // Non-finite elements count as the largest difference.
    let delta = (&fa - &fb)?.abs()?;
    let delta = delta.ne(&delta)?.where_cond(
        &Tensor::full(f32::INFINITY, delta.shape(), delta.device())?,
        &delta,
    )?;
    let i = delta.argmax(0)?.to_scalar::<u32>()? as usize;
    let (x, y) = (
        fa.get(i)?.to_scalar::<f32>()?,
        fb.get(i)?.to_scalar::<f32>()?,
    );
    let mut index = Vec::with_capacity(a.rank());
    let mut rest = i;
    for &d in a.dims().iter().rev() {
        index.push(rest % d.max(1));
        rest /= d.max(1);
    }
    index.reverse();
    Ok(format!(
        "largest at {index:?} of {:?}: {x:e} against candle's {y:e}; {} elements not finite",
        a.dims(),
        not_finite.to_scalar::<f32>()?
    ))
}

/// A tensor's storage held (read-locked) for a kernel launch, with the tensor's start offset in it.
#[cfg(feature = "cuda")]
pub struct Operand<'a> {
    storage: candle_core::StorageRef<'a>,
    offset: usize,
}

#[cfg(feature = "cuda")]
impl<'a> Operand<'a> {
    /// Holds `t`'s storage until the operand is dropped.
    pub fn of(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Self {
            storage,
            offset: layout.start_offset(),
        }
    }

    /// The tensor's elements on the device from its start offset; `None` when its storage is not on a CUDA device.
    pub fn view<T: candle_core::cuda_backend::CudaDType>(
        &self,
    ) -> candle_core::Result<Option<candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>>>
    {
        match &*self.storage {
            candle_core::Storage::Cuda(s) => Ok(Some(s.as_cuda_slice::<T>()?.slice(self.offset..))),
            _ => Ok(None),
        }
    }
}

/// A fresh CUDA tensor of `shape` holding a kernel's output buffer (outside autograd).
#[cfg(feature = "cuda")]
pub fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &candle_core::cuda_backend::CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> Tensor {
    use candle_core::{cuda_backend::CudaStorage, op::BackpropOp, Storage};
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape.into(), BackpropOp::none(), false)
}

/// Whether `device`'s stream is being captured into a CUDA graph (never on other devices).
#[cfg(feature = "cuda")]
pub fn capturing(device: &candle_core::Device) -> candle_core::Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(false);
    };
    let status = dev
        .cuda_stream()
        .capture_status()
        .map_err(|e| candle_core::Error::Msg(format!("stream capture status: {e}")))?;
    Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Whether `device`'s stream is being captured into a CUDA graph: never without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn capturing(_: &candle_core::Device) -> candle_core::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_keeps_the_kernel_off_whatever_passes_later() {
        static T: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        assert!(T.needs_check() && T.usable());
        assert_eq!(T.status(), "unchecked");
        T.record(Ok(()));
        assert_eq!(T.status(), "trusted");
        assert!(!T.needs_check());
        // Two threads checking at once: one fails after the other passed, or before it.
        T.record(Err("differs".into()));
        T.record(Ok(()));
        assert_eq!(T.status(), "off");
        assert!(!T.usable());
    }

    fn scalar(v: f32) -> Tensor {
        Tensor::new(&[v, 2.0], &candle_core::Device::Cpu).unwrap()
    }

    /// One call of `trust.run` with a stand-in kernel giving [`kernel`, 2], candle's ops giving [1, 2]: (the first
    /// value returned, whether candle's ops ran).
    fn run_once(
        trust: &Trust,
        capturing: bool,
        kernel: candle_core::Result<Option<f32>>,
    ) -> (f32, bool) {
        let composed_ran = std::cell::Cell::new(false);
        let out = trust
            .run(
                0.1,
                || Ok(capturing),
                || Ok(kernel?.map(scalar)),
                || {
                    composed_ran.set(true);
                    Ok(scalar(1.0))
                },
            )
            .unwrap();
        (out.to_vec1::<f32>().unwrap()[0], composed_ran.get())
    }

    #[test]
    fn the_first_call_is_checked_and_returns_candles_values_later_calls_the_kernels() {
        static T: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        // Under a capture the check waits: candle's ops run and nothing is recorded.
        assert_eq!(run_once(&T, true, Ok(Some(1.05))), (1.0, true));
        assert!(T.needs_check() && T.check_rel_err().is_none());
        // A kernel that does not take the operands leaves the check for later too.
        assert_eq!(run_once(&T, false, Ok(None)), (1.0, true));
        assert!(T.needs_check());
        // The check: both run, the kernel's value (it passed) is returned, the difference is kept.
        assert_eq!(run_once(&T, false, Ok(Some(1.05))), (1.05, true));
        assert_eq!(T.status(), "trusted");
        // max|Δ| / max|candle's| = 0.05 / 2.
        assert!((T.check_rel_err().unwrap() - 0.025).abs() < 1e-6);
        // Trusted: the kernel's value, candle's ops not run, even under a capture.
        assert_eq!(run_once(&T, true, Ok(Some(1.05))), (1.05, false));
        assert_eq!(T.report()["status"], "trusted");
    }

    #[test]
    fn a_kernel_that_differs_or_fails_to_launch_is_turned_off() {
        static DIFFERS: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        assert_eq!(run_once(&DIFFERS, false, Ok(Some(3.0))), (1.0, true));
        assert_eq!(DIFFERS.status(), "off");
        assert_eq!(DIFFERS.check_rel_err(), Some(1.0));
        let why = DIFFERS.failure().unwrap();
        assert!(
            why.contains("largest at [0] of [2]: 3e0 against candle's 1e0"),
            "{why}"
        );
        assert_eq!(run_once(&DIFFERS, false, Ok(Some(1.0))), (1.0, true));
        static NAN: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        run_once(&NAN, false, Ok(Some(f32::NAN)));
        assert_eq!(NAN.status(), "off");
        assert!(NAN.check_rel_err().unwrap().is_nan());
        assert!(NAN.failure().unwrap().contains("1 elements not finite"));
        static FAILS: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        let err = Err(candle_core::Error::Msg("no such function".into()));
        assert_eq!(run_once(&FAILS, false, err), (1.0, true));
        assert_eq!(FAILS.status(), "off");
        assert!(FAILS.check_rel_err().is_none());
        assert!(FAILS.failure().unwrap().contains("no such function"));
    }

    #[test]
    fn differences_are_located_and_nan_is_never_skipped() {
        let dev = candle_core::Device::Cpu;
        let theirs = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
        let ours = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.5, 6.0]], &dev).unwrap();
        let d = describe_difference(&ours, &theirs).unwrap();
        assert!(
            d.starts_with("largest at [1, 1] of [2, 3]: 5.5e0 against candle's 5e0; 0 elements"),
            "{d}"
        );
        // A NaN far from the largest finite difference is still what the check reports.
        let nan = Tensor::new(&[[f32::NAN, 2.0, 3.0], [4.0, 5.5, 6.0]], &dev).unwrap();
        assert!(crate::layers::rel_diff(&nan, &theirs).unwrap().is_nan());
        let d = describe_difference(&nan, &theirs).unwrap();
        assert!(
            d.starts_with("largest at [0, 0]") && d.ends_with("1 elements not finite"),
            "{d}"
        );
        static T: Trust = Trust::new("PAIRUNI_TEST_TRUST_UNSET", "test kernel");
        assert!(!T.check(&nan, &theirs, 1.0).unwrap());
        assert_eq!(T.status(), "off");
    }
}
