//! The VQ at Janus-Pro size asks for exactly the weight names and shapes of a real transformers checkpoint.
//!
//! tests/fixtures/janus/janus_pro_1b_shapes.json lists every tensor of a Janus-Pro-1B-sized
//! `JanusForConditionalGeneration` (made by scripts/make_janus_fixtures.py on the meta device). A recording
//! VarBuilder backend hands out broadcast zeros, so nothing of real size is allocated.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use pairuni_model::image_tokenizer::ImageTokenizer;
use pairuni_model::vq::{JanusVq, JanusVqConfig};

struct Recorder {
    known: BTreeSet<String>,
    asked: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let prev = self
            .asked
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        assert!(prev.is_none(), "{name} requested twice");
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.known.contains(name)
    }
}

#[test]
fn janus_pro_vq_requests_exactly_the_checkpoint_tensors() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/janus/janus_pro_1b_shapes.json");
    let all: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: BTreeMap<String, Vec<usize>> = all
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("model.vqmodel.")
                .map(|r| (r.to_string(), v.clone()))
        })
        .collect();
    assert!(
        want.len() > 300,
        "shape list looks truncated: {} VQ tensors",
        want.len()
    );
    let rec = Recorder {
        known: want.keys().cloned().collect(),
        asked: Mutex::new(BTreeMap::new()),
    };
    let rec = std::sync::Arc::new(rec);
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            h: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
    let cfg = JanusVqConfig::default();
    let vq = JanusVq::new(&cfg, vb).unwrap();
    let asked = rec.asked.lock().unwrap().clone();
    let missing: Vec<_> = want.keys().filter(|k| !asked.contains_key(*k)).collect();
    let extra: Vec<_> = asked.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "unused: {missing:?}\nunknown: {extra:?}"
    );
    for (k, shape) in &want {
        assert_eq!(&asked[k], shape, "shape of {k}");
    }
    assert_eq!(vq.image_size(), 384);
    assert_eq!(vq.grid(), (24, 24));
    assert_eq!(vq.codebook_size(), 16384);
}
