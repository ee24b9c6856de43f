//! CUDA graphs of static decode steps (`llama::StaticDecode`, docs/GPU.md).
//!
//! A Janus-Pro decode step launches about 600 kernels, each costing the host several µs in candle and the
//! driver; replaying them as one captured graph costs one launch. A step body is captured once per key (its
//! attention width, a single one when the attention kernel reads the live keys from the device): the first step
//! of a width runs eagerly with candle's host-to-device cache on, which uploads each kernel's shape parameters
//! once and keeps them on the device; the second is captured, and every later step of that width replays the
//! graph. Capture records without running, so the captured step is
//! launched right after. Should a capture fail, the runner says why once and runs the remaining steps eagerly,
//! which computes the same thing.
//!
//! The runner's bookkeeping is written against [`Capture`], which CUDA implements and the tests fake. On the
//! CPU (and in a build without CUDA) there is no backend and every body just runs.

use std::collections::{HashMap, HashSet};

use candle_core::Device;

use crate::error::{ModelError, Result};

/// What the graphs of one decode did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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

/// A stream-capture backend.
pub(crate) trait Capture {
    /// A recorded, launchable graph.
    type Graph;
    /// Turns on the device-side cache of kernel parameters (warm-ups fill it; captures must only read it) until
    /// the returned guard is dropped.
    fn keep_params(&self) -> Box<dyn std::any::Any>;
    /// Starts recording instead of running.
    fn begin(&self) -> std::result::Result<(), String>;
    /// Stops recording; the graph of what was queued (`None` if nothing was).
    fn end(&self) -> std::result::Result<Option<Self::Graph>, String>;
    /// Runs a recorded graph.
    fn launch(&self, graph: &Self::Graph) -> std::result::Result<(), String>;
}

/// Runs step bodies, capturing each key's once as a graph when there is a backend.
pub(crate) struct StepGraphs<C: Capture> {
    backend: Option<C>,
    warmed: HashSet<usize>,
    graphs: HashMap<usize, C::Graph>,
    report: GraphReport,
}

impl<C: Capture> StepGraphs<C> {
    /// A runner that captures with `backend`, or runs every step eagerly without one.
    pub fn with_backend(backend: Option<C>) -> Self {
        Self {
            backend,
            warmed: HashSet::new(),
            graphs: HashMap::new(),
            report: GraphReport::default(),
        }
    }

    /// What the runner has done so far.
    pub fn report(&self) -> GraphReport {
        self.report.clone()
    }

    /// Runs one step eagerly, whatever the backend (a step that reads back to the host).
    pub fn run_eagerly(&mut self, body: impl Fn() -> Result<()>) -> Result<()> {
        self.report.eager += 1;
        body()
    }

    /// Runs one step: `body` must queue the same kernels with the same arguments every time it runs for `key`,
    /// create no tensor from host data and read nothing back.
    pub fn run(&mut self, key: usize, body: impl Fn() -> Result<()>) -> Result<()> {
        let Some(backend) = &self.backend else {
            self.report.eager += 1;
            return body();
        };
        if let Some(graph) = self.graphs.get(&key) {
            backend
                .launch(graph)
                .map_err(|e| ModelError::Device(format!("CUDA graph replay: {e}")))?;
            self.report.replayed += 1;
            return Ok(());
        }
        let _params = backend.keep_params();
        if self.warmed.insert(key) {
            self.report.eager += 1;
            return body();
        }
        let failure = match capture(backend, key, &body) {
            Ok(graph) => match backend.launch(&graph) {
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
        self.backend = None;
        self.graphs.clear();
        // Nothing recorded has run, so this step still has to.
        self.report.eager += 1;
        body()
    }
}

/// Records `body` as a graph, or says why it could not.
fn capture<C: Capture>(
    backend: &C,
    key: usize,
    body: &impl Fn() -> Result<()>,
) -> std::result::Result<C::Graph, String> {
    backend
        .begin()
        .map_err(|e| format!("beginning the capture of width {key}: {e}"))?;
    let recorded = body();
    // The capture must end whatever happened in the body, or the stream stays in capture mode.
    let ended = backend.end();
    match (recorded, ended) {
        (Ok(()), Ok(Some(graph))) => Ok(graph),
        (Err(e), _) => Err(format!("capturing a step of width {key}: {e}")),
        (Ok(()), Err(e)) => Err(format!("instantiating the graph of width {key}: {e}")),
        (Ok(()), Ok(None)) => Err(format!("capturing a step of width {key} recorded nothing")),
    }
}

/// A runner on `device`: with CUDA's stream capture on a CUDA device when `capture`, with no backend otherwise.
pub(crate) fn device_graphs(device: &Device, capture: bool) -> StepGraphs<DeviceCapture> {
    StepGraphs::with_backend(DeviceCapture::of(device).filter(|_| capture))
}

/// Stream capture on a CUDA device's stream.
#[cfg(feature = "cuda")]
pub(crate) struct DeviceCapture(candle_core::CudaDevice);

#[cfg(feature = "cuda")]
impl DeviceCapture {
    fn of(device: &Device) -> Option<Self> {
        match device {
            Device::Cuda(cuda) => Some(Self(cuda.clone())),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
impl Capture for DeviceCapture {
    type Graph = candle_core::cuda_backend::cudarc::driver::CudaGraph;

    fn keep_params(&self) -> Box<dyn std::any::Any> {
        Box::new(self.0.enable_cuda_graph_htod_cache())
    }

    fn begin(&self) -> std::result::Result<(), String> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // Relaxed: a library that allocates on first use (cuBLAS's workspace) may do so during the capture
        // without invalidating it; what the step queues is captured all the same.
        self.0
            .cuda_stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| e.to_string())
    }

    fn end(&self) -> std::result::Result<Option<Self::Graph>, String> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        self.0
            .cuda_stream()
            .end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
            .map_err(|e| e.to_string())
    }

    fn launch(&self, graph: &Self::Graph) -> std::result::Result<(), String> {
        graph.launch().map_err(|e| e.to_string())
    }
}

/// Without CUDA there is nothing to capture with.
#[cfg(not(feature = "cuda"))]
pub(crate) enum DeviceCapture {}

#[cfg(not(feature = "cuda"))]
impl DeviceCapture {
    fn of(_: &Device) -> Option<Self> {
        None
    }
}

#[cfg(not(feature = "cuda"))]
impl Capture for DeviceCapture {
    type Graph = std::convert::Infallible;

    fn keep_params(&self) -> Box<dyn std::any::Any> {
        match *self {}
    }
    fn begin(&self) -> std::result::Result<(), String> {
        match *self {}
    }
    fn end(&self) -> std::result::Result<Option<Self::Graph>, String> {
        match *self {}
    }
    fn launch(&self, graph: &Self::Graph) -> std::result::Result<(), String> {
        match *graph {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A backend that logs what the runner asks of it. While "recording", bodies that run are recorded, not
    /// executed, as on a GPU: the test's body only counts executions outside a recording.
    #[derive(Default)]
    struct Fake {
        recording: Cell<bool>,
        log: RefCell<Vec<String>>,
        fail_end_at: Option<usize>,
        guards: Cell<usize>,
    }

    impl Capture for &Fake {
        type Graph = usize;

        fn keep_params(&self) -> Box<dyn std::any::Any> {
            self.guards.set(self.guards.get() + 1);
            Box::new(())
        }
        fn begin(&self) -> std::result::Result<(), String> {
            self.recording.set(true);
            self.log.borrow_mut().push("begin".into());
            Ok(())
        }
        fn end(&self) -> std::result::Result<Option<usize>, String> {
            self.recording.set(false);
            let n = self.log.borrow().iter().filter(|l| *l == "begin").count();
            self.log.borrow_mut().push("end".into());
            if self.fail_end_at == Some(n) {
                return Err("out of graph memory".into());
            }
            Ok(Some(n))
        }
        fn launch(&self, g: &usize) -> std::result::Result<(), String> {
            self.log.borrow_mut().push(format!("launch {g}"));
            Ok(())
        }
    }

    /// Runs `keys` through a runner on `fake`; returns the report and how often the body executed eagerly.
    fn drive(fake: &Fake, keys: &[usize]) -> (GraphReport, usize) {
        let mut graphs = StepGraphs::with_backend(Some(fake));
        let executed = Cell::new(0);
        for &k in keys {
            graphs
                .run(k, || {
                    if !fake.recording.get() {
                        executed.set(executed.get() + 1);
                    }
                    Ok(())
                })
                .unwrap();
        }
        (graphs.report(), executed.get())
    }

    #[test]
    fn each_key_warms_up_once_is_captured_once_and_then_replays() {
        let fake = Fake::default();
        let (report, executed) = drive(&fake, &[64, 64, 64, 64, 128, 128, 128]);
        assert_eq!(
            report,
            GraphReport {
                captured: 2,
                replayed: 5,
                eager: 2,
                failure: None,
            }
        );
        // Only the two warm-ups ran the body outside a recording; every step ran once.
        assert_eq!(executed, 2);
        assert_eq!(
            fake.log.borrow().join(", "),
            "begin, end, launch 1, launch 1, launch 1, begin, end, launch 2, launch 2"
        );
        // The parameter cache was on for every warm-up and capture, and for nothing else.
        assert_eq!(fake.guards.get(), 4);
    }

    #[test]
    fn a_failed_capture_is_reported_and_the_rest_runs_eagerly() {
        let fake = Fake {
            fail_end_at: Some(2),
            ..Fake::default()
        };
        let (report, executed) = drive(&fake, &[64, 64, 64, 128, 128, 128, 64]);
        assert_eq!(report.captured, 1);
        let failure = report.failure.as_deref().unwrap();
        assert!(
            failure.contains("width 128") && failure.contains("out of graph memory"),
            "{failure}"
        );
        // 64: warm-up, capture, replay. 128: warm-up, failed capture then the same step eagerly, then eager.
        // After the failure nothing is replayed, not even the graph of 64 that worked.
        assert_eq!((report.replayed, report.eager), (2, 5));
        assert_eq!(executed, 5);
    }

    #[test]
    fn without_a_backend_every_step_runs_eagerly() {
        let mut graphs = StepGraphs::<&Fake>::with_backend(None);
        let executed = Cell::new(0);
        for k in [64, 64, 128] {
            graphs
                .run(k, || {
                    executed.set(executed.get() + 1);
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(executed.get(), 3);
        assert_eq!(graphs.report().eager, 3);
        assert_eq!(
            device_graphs(&Device::Cpu, true).report(),
            GraphReport::default()
        );
    }
}
