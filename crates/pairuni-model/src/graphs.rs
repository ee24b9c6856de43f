//! CUDA graphs of static decode steps (`llama::StaticDecode`, docs/GPU.md).
//!
//! A Janus-Pro decode step launches about 600 kernels, each costing the host several µs in candle and the
//! driver; replaying them as one captured graph costs one launch. A step body is captured once per key (its
//! attention width): the first step of a width runs eagerly with candle's host-to-device cache on, which
//! uploads each kernel's shape parameters once and keeps them on the device; the second is captured, and every
//! later step of that width replays the graph. Capture records without running, so the captured step is
//! launched right after. Should anything fail while capturing, the runner says why once and runs the remaining
//! steps eagerly, which computes the same thing.
//!
//! On the CPU (and in a build without CUDA) the runner just runs the body: the step logic is the same, and that
//! is what the CPU tests check.

use std::collections::{HashMap, HashSet};

use candle_core::Device;

#[cfg(feature = "cuda")]
use crate::error::ModelError;
use crate::error::Result;

/// A captured step.
#[cfg(feature = "cuda")]
type Graph = candle_core::cuda_backend::cudarc::driver::CudaGraph;
/// Nothing is captured without CUDA.
#[cfg(not(feature = "cuda"))]
type Graph = ();

/// What the graphs of one decode did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphReport {
    /// Graphs captured.
    pub captured: usize,
    /// Steps run by replaying a graph (the launch that follows a capture included).
    pub replayed: usize,
    /// Steps run eagerly (warm-ups, or every step after a failure or without CUDA).
    pub eager: usize,
    /// Why capturing stopped, if it did.
    pub failure: Option<String>,
}

/// Runs step bodies, capturing each key's once as a CUDA graph on a CUDA device.
// Without CUDA nothing is captured, so the capture state is never read.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct StepGraphs {
    device: Device,
    capturing: bool,
    warmed: HashSet<usize>,
    graphs: HashMap<usize, Graph>,
    report: GraphReport,
}

impl StepGraphs {
    /// A runner on `device`: it captures only on CUDA devices.
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            capturing: device.is_cuda(),
            warmed: HashSet::new(),
            graphs: HashMap::new(),
            report: GraphReport::default(),
        }
    }

    /// What the runner has done so far.
    pub fn report(&self) -> GraphReport {
        self.report.clone()
    }

    /// Runs one step: `body` must queue the same kernels with the same arguments every time it runs for `key`,
    /// create no tensor from host data and read nothing back.
    pub fn run(&mut self, key: usize, body: impl Fn() -> Result<()>) -> Result<()> {
        if !self.capturing {
            self.report.eager += 1;
            return body();
        }
        self.run_captured(key, body)
    }

    #[cfg(not(feature = "cuda"))]
    fn run_captured(&mut self, _key: usize, body: impl Fn() -> Result<()>) -> Result<()> {
        // Unreachable: without the cuda feature no device is CUDA, so `capturing` is false.
        self.report.eager += 1;
        body()
    }

    #[cfg(feature = "cuda")]
    fn run_captured(&mut self, key: usize, body: impl Fn() -> Result<()>) -> Result<()> {
        let Device::Cuda(cuda) = &self.device else {
            self.report.eager += 1;
            return body();
        };
        if let Some(graph) = self.graphs.get(&key) {
            graph.launch().map_err(|e| graph_error("replay", e))?;
            self.report.replayed += 1;
            return Ok(());
        }
        // Kernel shape parameters go through candle's device-side cache while this guard lives: filled by the
        // warm-up, read by the capture (where an upload would be an error).
        let _params = cuda.enable_cuda_graph_htod_cache();
        if self.warmed.insert(key) {
            self.report.eager += 1;
            return body();
        }
        let failure = match self.capture(cuda, key, &body) {
            Ok(graph) => match graph.launch() {
                Ok(()) => {
                    self.report.captured += 1;
                    self.report.replayed += 1;
                    self.graphs.insert(key, graph);
                    return Ok(());
                }
                // A launch that fails at once has queued nothing, so the step can still run eagerly.
                Err(e) => format!("launching the graph of width {key}: {e}"),
            },
            Err(why) => why,
        };
        tracing::warn!(failure = %failure, "CUDA graph capture failed; decoding eagerly");
        self.report.failure = Some(failure);
        self.capturing = false;
        self.graphs.clear();
        // Nothing recorded has run, so this step still has to.
        self.report.eager += 1;
        body()
    }

    /// Records `body` as a graph, or says why it could not.
    #[cfg(feature = "cuda")]
    fn capture(
        &self,
        cuda: &candle_core::CudaDevice,
        key: usize,
        body: &impl Fn() -> Result<()>,
    ) -> std::result::Result<Graph, String> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = cuda.cuda_stream();
        // Relaxed: a library that allocates on first use (cuBLAS's workspace) may do so during the capture
        // without invalidating it; what the step queues is captured all the same.
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| format!("beginning the capture of width {key}: {e}"))?;
        let recorded = body();
        // The capture must end whatever happened in the body, or the stream stays in capture mode.
        let ended = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        match (recorded, ended) {
            (Ok(()), Ok(Some(graph))) => Ok(graph),
            (Err(e), _) => Err(format!("capturing a step of width {key}: {e}")),
            (Ok(()), Err(e)) => Err(format!("instantiating the graph of width {key}: {e}")),
            (Ok(()), Ok(None)) => Err(format!("capturing a step of width {key} recorded nothing")),
        }
    }
}

#[cfg(feature = "cuda")]
fn graph_error(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Device(format!("CUDA graph {what}: {e}"))
}
