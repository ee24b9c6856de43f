//! Device and dtype selection from command-line strings (`--device cpu|cuda|cuda:N`, `--dtype f32|bf16|f16`).
//!
//! In a CUDA build, cudarc panics when a CUDA device is created on a machine without an NVIDIA driver; the same
//! binary must still run on CPU there, so the driver is looked for (`/dev/nvidiactl`) before a CUDA device is
//! created, and any panic left is turned into an error.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device};

/// Device-selection failure, with the string that was given.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The string is not `cpu`, `cuda` or `cuda:N`.
    #[error("bad device {given:?}: expected cpu, cuda or cuda:N (N = GPU ordinal, e.g. cuda:0)")]
    BadDevice {
        /// What was given.
        given: String,
    },
    /// The string is not a dtype name this crate supports.
    #[error("bad dtype {given:?}: expected f32, bf16 or f16")]
    BadDType {
        /// What was given.
        given: String,
    },
    /// CUDA asked for, but this binary was compiled without the `cuda` feature.
    #[error("device {given:?}: this binary was built without CUDA (build it with scripts/build-cuda.sh)")]
    NoCudaSupport {
        /// What was given.
        given: String,
    },
    /// CUDA asked for, but the machine has no NVIDIA driver.
    #[error(
        "device {given:?}: no NVIDIA driver on this machine ({path} is missing); use --device cpu"
    )]
    NoDriver {
        /// What was given.
        given: String,
        /// The driver node that was looked for.
        path: String,
    },
    /// The CUDA runtime refused to open the device (bad ordinal, driver/library mismatch, …).
    #[error("device {given:?}: could not open the CUDA device: {reason}")]
    CudaOpen {
        /// What was given.
        given: String,
        /// The driver's or cudarc's message.
        reason: String,
    },
    /// A worker thread could not make the CUDA device current.
    #[error("could not make the CUDA device current on a worker thread: {reason}")]
    CudaBind {
        /// The driver's message.
        reason: String,
    },
}

/// A parsed `--device` value, before any device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// The CUDA GPU with this ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || DeviceError::BadDevice {
            given: s.to_string(),
        };
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => {
                let n = t.strip_prefix("cuda:").ok_or_else(bad)?;
                // Ordinals are plain decimal: "+1", " 1" and "" would be accepted by a looser parse.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The Linux device node that exists whenever the NVIDIA kernel driver is loaded.
pub const NVIDIA_CTL: &str = "/dev/nvidiactl";

impl DeviceSpec {
    /// True for a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Opens the device; a CUDA device only after the driver was found.
    pub fn open(&self) -> Result<Device, DeviceError> {
        self.open_with_driver_node(Path::new(NVIDIA_CTL))
    }

    /// `open` with the driver node to look for given (tests point it at a missing path).
    pub fn open_with_driver_node(&self, driver_node: &Path) -> Result<Device, DeviceError> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                let given = self.to_string();
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NoCudaSupport { given });
                }
                if !driver_node.exists() {
                    return Err(DeviceError::NoDriver {
                        given,
                        path: driver_node.display().to_string(),
                    });
                }
                // cudarc panics (rather than erroring) on some driver/library failures; keep the CLI's
                // promise of a clear error instead of a backtrace.
                // A stream of its own rather than the per-thread default stream: every thread then queues on the
                // same stream, and it can be captured as a CUDA graph (`crate::graphs`).
                let opened = std::panic::catch_unwind(|| Device::new_cuda_with_stream(ordinal));
                match opened {
                    Ok(Ok(dev)) => Ok(keeping_pool_memory(without_event_tracking(dev))),
                    Ok(Err(e)) => Err(DeviceError::CudaOpen {
                        given,
                        reason: e.to_string(),
                    }),
                    Err(panic) => {
                        let reason = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "cudarc panicked".to_string());
                        Err(DeviceError::CudaOpen { given, reason })
                    }
                }
            }
        }
    }
}

/// Turns off cudarc's per-allocation event tracking on a freshly opened CUDA device.
///
/// cudarc creates two CUDA events for every buffer it allocates (and destroys them when it is freed), and records
/// and waits on them at every use once a context has a stream of its own, so that it can order uses across
/// streams. pairuni runs everything on the one stream the device was opened with, so that is four to ten driver
/// calls per tensor for nothing: thousands per Janus-Pro decode step. It must happen before any tensor exists,
/// since it applies to buffers allocated afterwards.
#[cfg(feature = "cuda")]
fn without_event_tracking(dev: Device) -> Device {
    if let Device::Cuda(cuda) = &dev {
        // SAFETY: cudarc's condition is that the caller orders work across streams itself. This device has one
        // stream (pairuni never creates another; cuBLAS and cuRAND are bound to it), so there is nothing to order.
        unsafe { cuda.disable_event_tracking() };
    }
    dev
}

/// Makes `device` current on the calling thread before it issues work there (a CUDA context is per thread; cuBLAS
/// uses whichever is current). Nothing to do on the CPU.
pub fn bind_thread(device: &Device) -> Result<(), DeviceError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| DeviceError::CudaBind {
                reason: e.to_string(),
            });
    }
    let _ = device;
    Ok(())
}

/// The id candle gives the next tensor (its ids come from one global counter), spending one id to read it.
pub fn next_tensor_id() -> candle_core::Result<usize> {
    let probe = candle_core::Tensor::zeros((), DType::U8, &Device::Cpu)?;
    let text = format!("{:?}", probe.id());
    text.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .map_err(|_| {
            candle_core::Error::Msg(format!(
                "candle's tensor id `{text}` is not `TensorId(<n>)`"
            ))
        })
}

/// How the linked candle-core's backward pass starts each gradient it accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradAccumulation {
    /// From a tensor of zeros that the first contribution is added to (candle as published).
    Zeros,
    /// From the first contribution itself (candle patched by scripts/patch-candle.sh, as the CUDA builds are).
    FirstContribution,
    /// Neither: the backward creates this many tensors per node of a chain of scalings.
    Unknown(usize),
}

impl fmt::Display for GradAccumulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zeros => f.write_str("zeros"),
            Self::FirstContribution => f.write_str("first contribution"),
            Self::Unknown(n) => write!(f, "unknown ({n} tensors per node)"),
        }
    }
}

/// Tells, by counting the tensors one backward pass creates, how the linked candle accumulates gradients.
///
/// Each node of a chain of scalings costs candle's backward the scaled gradient; starting from zeros costs two
/// more (the zeros and the add). Two chain lengths cancel the fixed part, and the smallest count of a few tries
/// drops tensors other threads made meanwhile (the counter is global).
pub fn grad_accumulation() -> candle_core::Result<GradAccumulation> {
    let backward_tensors = |nodes: usize| -> candle_core::Result<usize> {
        let mut fewest = usize::MAX;
        for _ in 0..5 {
            let x = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu)?;
            let mut y = x.as_tensor().clone();
            for _ in 0..nodes {
                y = y.affine(3.0, 0.0)?;
            }
            let loss = y.sum_all()?;
            let before = next_tensor_id()?;
            let grads = loss.backward()?;
            let after = next_tensor_id()?;
            std::hint::black_box(grads);
            fewest = fewest.min(after - before - 1);
        }
        Ok(fewest)
    };
    let per_node = (backward_tensors(3)? - backward_tensors(1)?) / 2;
    Ok(match per_node {
        3 => GradAccumulation::Zeros,
        1 => GradAccumulation::FirstContribution,
        n => GradAccumulation::Unknown(n),
    })
}

/// Whether a CUDA device keeps the memory freed into its allocation pool (the default) or hands it back to the
/// driver at every synchronisation (`PAIRUNI_CUDA_POOL=release`, the driver's own default).
pub fn pool_keeps_memory() -> bool {
    std::env::var("PAIRUNI_CUDA_POOL").map_or(true, |v| v != "release")
}

/// Makes the device's default memory pool keep freed memory instead of returning it to the driver.
///
/// cudarc allocates every tensor with `cuMemAllocAsync` from the device's default pool, whose release threshold
/// is 0: at each synchronisation (a loss read back to the host, one per micro-batch) the pool hands every free
/// byte back, and the next pass maps it again, allocation by allocation. PyTorch's asynchronous allocator sets
/// the threshold to the whole memory for the same reason. A failure only costs that, so it is logged, not fatal.
#[cfg(feature = "cuda")]
fn keeping_pool_memory(dev: Device) -> Device {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = &dev else {
        return dev;
    };
    let ctx = cuda.cuda_stream().context().clone();
    if !pool_keeps_memory() || !ctx.has_async_alloc() {
        return dev;
    }
    let kept = ctx
        .bind_to_thread()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let mut threshold = u64::MAX;
            // SAFETY: the context is bound to this thread, `pool` receives the device's pool handle, and the
            // threshold attribute reads a u64 through the pointer during the call.
            unsafe {
                sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                    .result()
                    .map_err(|e| e.to_string())?;
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .result()
                .map_err(|e| e.to_string())
            }
        });
    if let Err(e) = kept {
        tracing::warn!(error = %e, "the CUDA memory pool will return freed memory at each synchronisation");
    }
    dev
}

/// A CPU build never opens a CUDA device.
#[cfg(not(feature = "cuda"))]
fn keeping_pool_memory(dev: Device) -> Device {
    dev
}

/// What a CUDA device's default memory pool has held, in bytes: the like-for-like counterpart of PyTorch's
/// `max_memory_allocated` (`used_high`, the most handed out to live tensors at once) and of what `nvidia-smi`
/// sees (`reserved_high`, the most the pool mapped, freed memory it keeps included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolMemory {
    /// Most bytes in use by allocations at once since the pool was created.
    pub used_high: u64,
    /// Most bytes the pool held from the driver at once.
    pub reserved_high: u64,
    /// Bytes the pool holds now.
    pub reserved_now: u64,
}

/// The high-water marks of `device`'s default memory pool; `None` off CUDA, or where the driver does not say.
#[cfg(feature = "cuda")]
pub fn pool_memory(device: &Device) -> Option<PoolMemory> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return None;
    };
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the context is bound to this thread and `pool` receives the device's pool handle.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .ok()?;
    let read = |attribute: sys::CUmemPool_attribute| -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: these attributes are u64 values, written through the pointer during the call.
        unsafe { sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()) }
            .result()
            .ok()?;
        Some(value)
    };
    use sys::CUmemPool_attribute as A;
    Some(PoolMemory {
        used_high: read(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        reserved_high: read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        reserved_now: read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
    })
}

/// A CPU build has no memory pool to report.
#[cfg(not(feature = "cuda"))]
pub fn pool_memory(_device: &Device) -> Option<PoolMemory> {
    None
}

/// A CPU build never opens a CUDA device.
#[cfg(not(feature = "cuda"))]
fn without_event_tracking(dev: Device) -> Device {
    dev
}

/// Parses and opens `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    s.parse::<DeviceSpec>()?.open()
}

/// Parses `f32`, `bf16` or `f16` (also `float32`, `bfloat16`, `float16`).
pub fn parse_dtype(s: &str) -> Result<DType, DeviceError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        _ => Err(DeviceError::BadDType {
            given: s.to_string(),
        }),
    }
}

/// The weight/activation dtype to use on a device when none is asked for: bf16 on CUDA (softmax, log-probs, loss
/// and optimizer moments stay f32 in the code that computes them), f32 on CPU (bf16 matmuls are slow there).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stock candle this test suite builds against starts gradients from zeros; the run of the suite against
    /// the patched copy (`.ci/run`, PAIRUNI_EXPECT_GRAD_ACCUMULATE=first) must see the patch at work.
    #[test]
    fn grad_accumulation_tells_the_linked_candle() {
        let expected = match std::env::var("PAIRUNI_EXPECT_GRAD_ACCUMULATE").as_deref() {
            Ok("first") => GradAccumulation::FirstContribution,
            _ => GradAccumulation::Zeros,
        };
        assert_eq!(grad_accumulation().unwrap(), expected);
    }

    #[test]
    fn parses_every_accepted_spelling() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CPU ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:0".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(
            "CUDA:12".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(12)
        );
    }

    #[test]
    fn rejects_malformed_devices_naming_the_input() {
        for bad in [
            "", "gpu0", "cuda:", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:x", "metal", "cuda:1:2",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(
                matches!(err, DeviceError::BadDevice { .. }),
                "{bad:?} gave {err:?}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn cpu_opens_and_computes() {
        let dev = parse_device("cpu").unwrap();
        assert!(dev.is_cpu());
        let t = candle_core::Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
        assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 6.0);
        assert_eq!(default_dtype(&dev), DType::F32);
    }

    #[test]
    fn cuda_without_driver_is_a_clear_error_not_a_panic() {
        let missing = Path::new("/nonexistent/pairuni-test/nvidiactl");
        let err = DeviceSpec::Cuda(0)
            .open_with_driver_node(missing)
            .unwrap_err();
        if candle_core::utils::cuda_is_available() {
            assert!(matches!(err, DeviceError::NoDriver { .. }), "{err:?}");
            assert!(err.to_string().contains("nvidiactl"), "{err}");
        } else {
            assert!(matches!(err, DeviceError::NoCudaSupport { .. }), "{err:?}");
            assert!(err.to_string().contains("built without CUDA"), "{err}");
        }
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }

    #[test]
    fn dtypes_parse_and_reject() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("F32").unwrap(), DType::F32);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        let err = parse_dtype("int8").unwrap_err();
        assert!(err.to_string().contains("\"int8\""), "{err}");
    }
}
