//! Janus (transformers' `JanusForConditionalGeneration`) in candle: loading, prompting, sampling, log-probs.
//!
//! Reference: transformers 5.x `models/janus/modeling_janus.py` (numerics and weight names) and Janus-Pro
//! (arXiv 2501.17811). Understanding: pixels → ViT → aligner, scattered into the placeholder slots of the prompt's
//! token embeddings → LLaMA → `lm_head`. Generation: prompt → LLaMA, then each image code is embedded by
//! `generation_embeddings` + `generation_aligner` and read out by `generation_head`; classifier-free guidance
//! pairs every prompt with a pad-masked unconditional copy (METHOD.md §3). All weights are `Var`s in one `VarMap`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use pairuni_data::RgbImage;
use rand_chacha::ChaCha8Rng;

use crate::draw_kernel::DrawNoise;
use crate::error::{ModelError, Result};
use crate::graphs::{device_graphs, GraphReport};
use crate::image_codec::ImageCodec;
use crate::image_tokenizer::ImageTokenizer;
use crate::janus_config::{ImageTokenizerKind, JanusConfig};
use crate::layers::{log_softmax_last, Act, InitKind, Linear, ParamMode, Params};
use crate::llama::{last_position, static_capacity, KvCache, Llama, StaticDecode};
use crate::sampling::{
    argmax, cfg_draw, device_cfg_draw, device_token_draw, draw_rows, log_prob_t, sample_index_at,
    sample_with_logprob_at, token_draw, CfgLogprobPolicy, GumbelNoise, ImageRollout, ImageSampling,
    ParamSelection, SamplerSite, TextRollout, TextSampling,
};
use crate::tokenizer::TextTokenizer;
use crate::vision::{AlignerMlp, VisionModel};

/// Per row, the sampled ids (image codes or answer tokens) and their log-probs.
type CodesAndLogprobs = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Told a decode step's ids, says whether the decode is over.
type StopWhen<'a> = dyn FnMut(&[u32]) -> bool + 'a;

/// Logit added to tokens an answer may not contain: exp underflows to exactly 0 in f32 at any temperature ≥ 0.01.
pub(crate) const BANNED_LOGIT: f32 = -1e9;

/// Prefix of the frozen VQ image tokenizer's weights (never trainable).
pub const VQ_PREFIX: &str = "model.vqmodel.";

/// The modules built from a parameter store.
struct Modules {
    lm: Llama,
    lm_head: Tensor,
    vision: VisionModel,
    aligner: AlignerMlp,
    gen_embed: Tensor,
    gen_aligner: AlignerMlp,
    gen_proj: Linear,
    gen_out: Linear,
    gen_act: Act,
}

impl Modules {
    fn new(cfg: &JanusConfig, p: &Params) -> Result<Self> {
        let m = p.pp("model");
        let lm = Llama::new(&cfg.text_config, &m.pp("language_model"))?;
        let lm_head = if cfg.tie_word_embeddings {
            lm.embed_tokens.clone()
        } else {
            p.pp("lm_head").get(
                (cfg.text_config.vocab_size, cfg.text_config.hidden_size),
                "weight",
                InitKind::Normal(0.02),
            )?
        };
        let v = &cfg.vision_config;
        let vision = VisionModel::new(v, &m.pp("vision_model"))?;
        let aligner = AlignerMlp::new(
            &m.pp("aligner"),
            v.hidden_size,
            v.projection_dim,
            v.depth,
            &v.hidden_act,
        )?;
        let q = &cfg.vq_config;
        let gen_embed = m.pp("generation_embeddings").get(
            (q.num_embeddings, q.embed_dim),
            "weight",
            InitKind::Normal(1.0),
        )?;
        let gen_aligner = AlignerMlp::new(
            &m.pp("generation_aligner"),
            q.embed_dim,
            q.projection_dim,
            q.num_hidden_layers,
            &q.hidden_act,
        )?;
        let gh = m.pp("generation_head");
        let gen_proj = Linear::new(
            &gh.pp("proj_out"),
            q.image_token_embed_dim,
            q.projection_dim,
            true,
        )?;
        let gen_out = Linear::new(
            &gh.pp("vision_head"),
            q.projection_dim,
            q.num_embeddings,
            true,
        )?;
        Ok(Self {
            lm,
            lm_head,
            vision,
            aligner,
            gen_embed,
            gen_aligner,
            gen_proj,
            gen_out,
            gen_act: Act::from_name(&q.hidden_act)?,
        })
    }
}

/// A loaded checkpoint: weights (candle `Var`s, trainable), config, tokenizers.
pub struct Janus {
    cfg: JanusConfig,
    device: Device,
    dtype: DType,
    varmap: VarMap,
    m: Modules,
    tokenizer: Option<TextTokenizer>,
    image_tokenizer: Option<ImageCodec>,
    /// Whether the device-side CFG image decode runs fixed-shape steps, captured as CUDA graphs on CUDA devices.
    static_decode: bool,
    /// Whether answer rollouts of one (image, prompt) share its prompt's forward ([`Janus::prompt_sharing`]).
    prompt_sharing: bool,
    /// Whether those steps are captured (off: run eagerly, to check the graphs against).
    capture_graphs: bool,
    /// Whether the device samplers' draws run as one CUDA kernel ([`Janus::draw_kernel`]).
    draw_kernel: bool,
    /// How answers sharing a prompt are scored ([`Janus::shared_scoring`]).
    shared_scoring: SharedScoring,
    /// What the graphs of the last static image decode did.
    graph_report: Mutex<Option<GraphReport>>,
    /// What the graphs of the last static answer decode did.
    answer_graph_report: Mutex<Option<GraphReport>>,
    /// Which encoders feeding the language model are frozen, so that their outputs are detached.
    frozen: FrozenEncoders,
}

/// Encoders whose outputs enter the language model and that a training run does not update
/// ([`Janus::select_trained`]): their outputs are detached, so a backward pass stops at them instead of computing
/// gradients nobody applies (a SigLIP-L backward per answer image at Janus-Pro shapes).
#[derive(Debug, Clone, Copy, Default)]
struct FrozenEncoders {
    /// `model.vision_model.*` and `model.aligner.*`: the image features of understanding prompts.
    vision: bool,
    /// `model.generation_embeddings.*` and `model.generation_aligner.*`: the embeddings of image codes.
    codes: bool,
}

/// Parameter prefixes of the understanding-image encoder and its aligner.
const VISION_PREFIXES: [&str; 2] = ["model.vision_model.", "model.aligner."];
/// Parameter prefixes of the code embeddings and their aligner.
const CODE_PREFIXES: [&str; 2] = ["model.generation_embeddings.", "model.generation_aligner."];

/// Reads a single `model.safetensors` or a sharded `model.safetensors.index.json` from `dir`.
fn read_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let ck = |path: &Path, e: String| ModelError::Checkpoint {
        path: path.display().to_string(),
        msg: e,
    };
    if single.exists() {
        return candle_core::safetensors::load(&single, device)
            .map_err(|e| ck(&single, e.to_string()));
    }
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ck(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ck(&index, "no `weight_map` object".into()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut out = HashMap::new();
        for f in files {
            let p = dir.join(f);
            if !p.exists() {
                return Err(ck(
                    &index,
                    format!("shard `{f}` listed in weight_map is missing"),
                ));
            }
            out.extend(
                candle_core::safetensors::load(&p, device).map_err(|e| ck(&p, e.to_string()))?,
            );
        }
        for name in map.keys() {
            if !out.contains_key(name) {
                return Err(ck(
                    &index,
                    format!("tensor `{name}` not found in its shard"),
                ));
            }
        }
        return Ok(out);
    }
    Err(ModelError::Checkpoint {
        path: dir.display().to_string(),
        msg: "neither model.safetensors nor model.safetensors.index.json found".into(),
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    pairuni_data::atomic::write_atomic_bytes(path, bytes).map_err(|e| ModelError::Checkpoint {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// How the teacher-forced pass of answers that share a prompt runs ([`Janus::prompt_sharing`]): both compute the
/// unshared pass's values, and differ in how many ops and how much attention they take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedScoring {
    /// Packed unless its attention scores would be more than twice the cached form's (the default).
    #[default]
    Auto,
    /// One row per prompt: the prompt and then every answer, each answer seeing the prompt and itself. One pass
    /// through the layers, so half the ops of the cached form.
    Packed,
    /// The prompt once, then the answers over copies of its cache: two passes through the layers.
    Cached,
}

/// The rows of a batch that repeat an earlier row's image and prompt (the rollouts of one question), which can
/// then share that prompt's forward ([`Janus::prompt_sharing`]). Images are told apart by tensor identity: the
/// rollouts of one question carry clones of one pixel tensor ([`Janus::preprocess_images`]); equal pixels in
/// distinct tensors are simply not shared.
struct PromptGroups {
    /// The first row of each group, in order.
    first: Vec<usize>,
    /// The group of each row.
    of_row: Vec<usize>,
}

impl PromptGroups {
    fn of(pixels: &[Tensor], prompts: &[Vec<u32>]) -> Self {
        let mut first: Vec<usize> = Vec::new();
        let mut of_row = Vec::with_capacity(prompts.len());
        for (r, (px, prompt)) in pixels.iter().zip(prompts).enumerate() {
            let same = |&f: &usize| pixels[f].id() == px.id() && prompts[f] == *prompt;
            let g = match first.iter().rposition(same) {
                Some(g) => g,
                None => {
                    first.push(r);
                    first.len() - 1
                }
            };
            of_row.push(g);
        }
        Self { first, of_row }
    }

    /// Whether some rows repeat another's prompt.
    fn shares(&self) -> bool {
        self.first.len() < self.of_row.len()
    }

    /// Each group's pixels and prompt.
    fn firsts(&self, pixels: &[Tensor], prompts: &[Vec<u32>]) -> (Vec<Tensor>, Vec<Vec<u32>>) {
        self.first
            .iter()
            .map(|&r| (pixels[r].clone(), prompts[r].clone()))
            .unzip()
    }

    /// `of_row` as an index tensor, to take each row's copy of its group's values.
    fn row_index(&self, device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = self.of_row.iter().map(|&g| g as u32).collect();
        Ok(Tensor::from_vec(idx, self.of_row.len(), device)?)
    }
}

/// Left-pads rows to one length; returns (ids, validity).
fn left_pad(rows: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len());
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        let n = len - r.len();
        let mut row = vec![pad; n];
        row.extend_from_slice(r);
        let mut v = vec![false; n];
        v.extend(std::iter::repeat_n(true, r.len()));
        ids.push(row);
        valid.push(v);
    }
    (ids, valid)
}

/// Each rollout's answer tokens but the last (the teacher-forced inputs), right-padded to `width`; (ids, validity).
fn fed_answers(batch: &[TextRollout], width: usize, pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    batch
        .iter()
        .map(|r| {
            let fed = &r.answer_ids[..r.answer_ids.len() - 1];
            let mut row = fed.to_vec();
            let mut v = vec![true; fed.len()];
            row.resize(width, pad);
            v.resize(width, false);
            (row, v)
        })
        .unzip()
}

/// Whether [`SharedScoring::Auto`] packs `groups` rows, the widest `widest` tokens (a prompt and all its fed
/// answer tokens): when the packed rows' attention scores are at most twice the cached form's (the prompts' own,
/// then each answer's over its prompt and itself). Both count padding, as the tensors do. At Janus-Pro's
/// benchmark shapes (a 608-token prompt, 8 answers of 64) packing takes 1.7 times the scores for half the passes
/// through the layers; with many long answers its attention grows with the square of their sum, and the cached
/// form is kept.
fn packing_pays(groups: usize, widest: usize, rollouts: usize, pmax: usize, amax: usize) -> bool {
    let packed = groups * widest * widest;
    let cached = groups * pmax * pmax + rollouts * (amax - 1) * (pmax + amax - 1);
    packed <= 2 * cached
}

fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, |r| r.len());
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

impl Janus {
    fn from_parts(
        cfg: JanusConfig,
        varmap: VarMap,
        mode: ParamMode,
        dtype: DType,
        device: &Device,
        tokenizer: Option<TextTokenizer>,
        image_tokenizer: Option<ImageCodec>,
    ) -> Result<Self> {
        let p = Params {
            store: &varmap,
            prefix: String::new(),
            mode: &mode,
            dtype,
            device,
        };
        let m = Modules::new(&cfg, &p)?;
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype,
            varmap,
            m,
            tokenizer,
            image_tokenizer,
            // Measured on an H200 (docs/BENCHMARKS.md): captured steps match the eager ones bit for bit and halve
            // the image rollout, so CUDA devices take them by default.
            static_decode: device.is_cuda(),
            prompt_sharing: !device.is_cpu(),
            capture_graphs: true,
            // Measured on an H200 (docs/BENCHMARKS.md, eighteenth session): trusted, and 2.60 → 2.50 ms per
            // image step.
            draw_kernel: device.is_cuda(),
            shared_scoring: SharedScoring::Auto,
            graph_report: Mutex::new(None),
            answer_graph_report: Mutex::new(None),
            frozen: FrozenEncoders::default(),
        })
    }

    /// Loads `dir` (config.json + model.safetensors | model.safetensors.index.json [+ tokenizer.json]
    /// [+ patch_codebook.safetensors]); weights are cast to `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let cfg = JanusConfig::from_json_str(&text, &cfg_path.display().to_string())?;
        let weights = read_weights(dir, device)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in weights {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(TextTokenizer::load(&tok_path, &cfg)?)
        } else {
            None
        };
        let image_tokenizer = crate::image_codec::load_image_tokenizer(&cfg, dir, &varmap, device)?;
        let mode = ParamMode::Load {
            origin: dir.display().to_string(),
        };
        Self::from_parts(cfg, varmap, mode, dtype, device, tokenizer, image_tokenizer)
    }

    /// A model with seeded random weights for `cfg`, optional tokenizer and image tokenizer (tests, benchmarks).
    pub fn new_random(
        cfg: &JanusConfig,
        tokenizer: Option<TextTokenizer>,
        image_tokenizer: Option<ImageCodec>,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        cfg.validate("<in-memory config>")?;
        Self::from_parts(
            cfg.clone(),
            VarMap::new(),
            ParamMode::Init { seed },
            dtype,
            device,
            tokenizer,
            image_tokenizer,
        )
    }

    /// New toy model: word-level tokenizer from `words` (specials first), patch codebook learned from
    /// `codebook_images`, seeded random init; `cfg` is usually `JanusConfig::toy(..)` (vocab and codebook sizes
    /// are overwritten to match what was built).
    pub fn new_toy(
        cfg: &JanusConfig,
        words: &[String],
        codebook_images: &[RgbImage],
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let tok = crate::tokenizer::build_toy_tokenizer(words)?;
        let mut cfg = cfg.clone();
        cfg.text_config.vocab_size = tok.get_vocab_size(true);
        let codec = crate::image_codec::fit_patch_codebook(&cfg, codebook_images, seed, device)?;
        cfg.vq_config.num_embeddings = codec.as_dyn().codebook_size();
        Self::new_random(
            &cfg,
            Some(TextTokenizer::toy(tok)),
            Some(codec),
            seed,
            device,
            DType::F32,
        )
    }

    /// Atomic save in the layout `load` reads: config.json, model.safetensors, tokenizer.json (if any), and the
    /// image tokenizer's own files (patch_codebook.safetensors for the toy).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .all_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let path = dir.join("model.safetensors");
        // candle's tensors are safetensors views; the format orders them by alignment, then name.
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| ModelError::Checkpoint {
                path: path.display().to_string(),
                msg: e.to_string(),
            })?;
        write_atomic(&path, &bytes)?;
        // A stale index would shadow nothing (single file wins) but would confuse readers: remove it.
        let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
        if let Some(tok) = &self.tokenizer {
            let json = tok
                .inner
                .to_string(true)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        }
        if let Some(it) = &self.image_tokenizer {
            crate::image_codec::save_image_tokenizer(it, dir)?;
        }
        let cfg = serde_json::to_string_pretty(&self.cfg).expect("config serialises");
        // config.json last: a folder with a config is a complete checkpoint.
        write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
        Ok(())
    }

    /// Architecture config.
    pub fn config(&self) -> &JanusConfig {
        &self.cfg
    }
    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Whether sampling forwards run candle's fused RMSNorm, rotary and softmax kernels (default: on
    /// accelerators, where they cut the launches per decode step by more than half; not on the CPU).
    pub fn fused_sampling(&self) -> bool {
        self.m.lm.fused_sampling()
    }
    /// Chooses the kernels of sampling forwards; teacher-forced (training) forwards always use the
    /// differentiable compositions of basic ops.
    pub fn set_fused_sampling(&mut self, on: bool) {
        self.m.lm.set_fused_sampling(on);
    }
    /// Whether fused-kernel sampling forwards run q/k/v and gate/up as one batched matmul each, over copies of
    /// the weights stacked when a rollout's cache first runs (default: yes).
    pub fn stack_projections(&self) -> bool {
        self.m.lm.stack_projections()
    }
    /// Chooses whether fused-kernel sampling forwards stack their projections (to measure what it buys).
    pub fn set_stack_projections(&mut self, on: bool) {
        self.m.lm.set_stack_projections(on);
    }
    /// Whether differentiable forwards (teacher forcing, training) run candle's fused kernels with hand-written
    /// backwards (default: on accelerators, off on the CPU).
    pub fn fused_training(&self) -> bool {
        self.m.lm.fused_training()
    }
    /// Chooses the kernels of differentiable forwards.
    pub fn set_fused_training(&mut self, on: bool) {
        self.m.lm.set_fused_training(on);
    }
    /// Whether fused-kernel decode steps on a GPU run attention as one kernel (`decode_attention`).
    pub fn attention_kernel(&self) -> bool {
        self.m.lm.attention_kernel()
    }
    /// Chooses whether fused-kernel decode steps on a GPU run attention as one kernel.
    pub fn set_attention_kernel(&mut self, on: bool) {
        self.m.lm.set_attention_kernel(on);
    }

    /// Whether fused-kernel forwards on a GPU run the layer kernels ([`crate::layer_kernels`]).
    pub fn layer_kernels(&self) -> bool {
        self.m.lm.layer_kernels()
    }
    /// Turns the layer kernels on or off (they act on CUDA devices only, and are on by default there).
    pub fn set_layer_kernels(&mut self, on: bool) {
        self.m.lm.set_layer_kernels(on);
    }

    /// Whether training forwards' RMSNorm backward runs as one CUDA kernel ([`crate::norm_kernel`]).
    pub fn norm_kernel(&self) -> bool {
        self.m.lm.norm_kernel()
    }

    /// Turns the RMSNorm backward kernel on or off (it acts on CUDA devices only, and is on by default there).
    pub fn set_norm_kernel(&mut self, on: bool) {
        self.m.lm.set_norm_kernel(on);
    }

    /// Whether training forwards' SiLU · gate and attention softmax backwards run as one CUDA kernel each
    /// ([`crate::backward_kernels`]).
    pub fn backward_kernels(&self) -> bool {
        self.m.lm.backward_kernels()
    }

    /// Turns the SiLU · gate and softmax backward kernels on or off (they act on CUDA devices only, and are on by
    /// default there).
    pub fn set_backward_kernels(&mut self, on: bool) {
        self.m.lm.set_backward_kernels(on);
    }
    /// Whether the device-side samplers ([`SamplerSite::Device`], the default on CUDA: the CFG image decode, and
    /// the answer decode) take fixed-shape steps (`llama::StaticDecode`), captured as CUDA graphs
    /// ([`Llama::static_width`]: one per attention width, or one per decode with the attention kernel) and
    /// replayed on CUDA devices, run as they are elsewhere (the tests force it on the CPU). On by default on CUDA devices, off elsewhere.
    pub fn static_decode(&self) -> bool {
        self.static_decode
    }
    /// Chooses the device samplers' steps (see [`Janus::static_decode`]).
    pub fn set_static_decode(&mut self, on: bool) {
        self.static_decode = on;
    }
    /// Whether the answer rollouts of one image and prompt (a GRPO group) share the prompt's forward: the sampler
    /// prefills each distinct prompt once and continues every rollout from its copy of that cache, and the
    /// teacher-forced pass runs the prompt once and only the answers per rollout (gradients from all of them
    /// reach the shared prompt). The same values, computed once instead of G times; summed in another order,
    /// so the weights' gradients differ from the unshared pass by rounding. Default: on accelerators, where the
    /// prompt (576 image slots at Janus-Pro) is most of a rollout's tokens; off on the CPU, so that every recorded
    /// toy-world result stays bit for bit what it was.
    pub fn prompt_sharing(&self) -> bool {
        self.prompt_sharing
    }
    /// Chooses whether answer rollouts share their prompt's forward (see [`Janus::prompt_sharing`]).
    pub fn set_prompt_sharing(&mut self, on: bool) {
        self.prompt_sharing = on;
    }
    /// How the teacher-forced pass of answers sharing a prompt runs (with [`Janus::prompt_sharing`]): packed into
    /// one row per prompt (one pass through the layers) or as the prompt's pass and the answers' pass over its
    /// cache; `Auto` (the default) packs unless that would more than double the attention scores.
    pub fn shared_scoring(&self) -> SharedScoring {
        self.shared_scoring
    }
    /// Chooses how answers sharing a prompt are scored (see [`Janus::shared_scoring`]).
    pub fn set_shared_scoring(&mut self, how: SharedScoring) {
        self.shared_scoring = how;
    }
    /// Whether static decode steps are captured as CUDA graphs where they can be (default); off, they run eagerly
    /// on every device, which computes the same thing and is what a graph is checked against.
    pub fn set_graph_capture(&mut self, on: bool) {
        self.capture_graphs = on;
    }
    /// Whether the device samplers' draws (CFG mix or banned-token bias, temperature, Gumbel noise, argmax and the
    /// drawn class's log-prob) run as one CUDA kernel with noise of its own ([`crate::draw_kernel`]), so that a
    /// static decode draws no noise between its graphs. On by default on CUDA devices (measured on an H200); it
    /// acts on CUDA devices only.
    pub fn draw_kernel(&self) -> bool {
        self.draw_kernel
    }
    /// Turns the draw kernel on or off (see [`Janus::draw_kernel`]).
    pub fn set_draw_kernel(&mut self, on: bool) {
        self.draw_kernel = on;
    }
    /// What the CUDA graphs of the last image sampling call did (`None` when it ran no static decode).
    pub fn last_graph_report(&self) -> Option<GraphReport> {
        read_report(&self.graph_report)
    }
    /// What the CUDA graphs of the last answer sampling call did (`None` when it ran no static decode).
    pub fn last_answer_graph_report(&self) -> Option<GraphReport> {
        read_report(&self.answer_graph_report)
    }
    /// The text tokenizer, if the checkpoint has one.
    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }
    /// The image tokenizer, if the checkpoint has one.
    pub fn image_tokenizer(&self) -> Option<&dyn ImageTokenizer> {
        self.image_tokenizer.as_ref().map(ImageCodec::as_dyn)
    }

    /// All variables, sorted by name (checkpointing).
    pub fn all_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Trainable variables for `sel`, sorted by name; the VQ tokenizer is never included.
    pub fn trainable_vars(&self, sel: &ParamSelection) -> Vec<(String, Var)> {
        self.all_vars()
            .into_iter()
            .filter(|(n, _)| !n.starts_with(VQ_PREFIX))
            .filter(|(n, _)| match sel {
                ParamSelection::All => true,
                ParamSelection::LanguageModel => {
                    n.starts_with("model.language_model.") || n.starts_with("lm_head.")
                }
                ParamSelection::Custom(prefixes) => {
                    prefixes.iter().any(|p| n.starts_with(p.as_str()))
                }
            })
            .collect()
    }

    /// The variables a training run updates for `sel` ([`Janus::trainable_vars`]). The model also takes note of
    /// which encoders feeding the language model stay frozen (the vision tower and its aligner, the code
    /// embeddings and theirs) and detaches their outputs from then on, so that backward passes stop at them:
    /// the gradients of the trained variables are the same, and nobody computes the others. A later call with
    /// another selection replaces the note.
    pub fn select_trained(&mut self, sel: &ParamSelection) -> Vec<(String, Var)> {
        let vars = self.trainable_vars(sel);
        let trains = |prefixes: &[&str]| {
            vars.iter()
                .any(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)))
        };
        self.frozen = FrozenEncoders {
            vision: !trains(&VISION_PREFIXES),
            codes: !trains(&CODE_PREFIXES),
        };
        vars
    }

    /// Deep copy with its own storage (a frozen reference model for KL); tokenizers are shared by reload.
    pub fn clone_frozen(&self) -> Result<Self> {
        self.with_dtype(self.dtype)
    }

    /// A deep copy whose weights are stored in `dtype` (e.g. a toy model built in f32, trained in bf16).
    pub fn with_dtype(&self, dtype: DType) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (n, v) in self.all_vars() {
                // `copy` after the cast: casting to the same dtype would share the storage.
                data.insert(
                    n,
                    Var::from_tensor(&v.as_tensor().to_dtype(dtype)?.copy()?)?,
                );
            }
        }
        let image_tokenizer = self.image_tokenizer.clone();
        let mut clone = Self::from_parts(
            self.cfg.clone(),
            varmap,
            ParamMode::Load {
                origin: "<clone>".into(),
            },
            dtype,
            &self.device,
            self.tokenizer.clone(),
            image_tokenizer,
        )?;
        clone.set_fused_sampling(self.fused_sampling());
        clone.set_stack_projections(self.stack_projections());
        clone.set_static_decode(self.static_decode());
        clone.set_prompt_sharing(self.prompt_sharing());
        clone.set_graph_capture(self.capture_graphs);
        clone.set_draw_kernel(self.draw_kernel);
        clone.set_shared_scoring(self.shared_scoring);
        clone.frozen = self.frozen;
        Ok(clone)
    }

    fn tok(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Tokenizer("checkpoint has no tokenizer.json".into()))
    }

    fn codec(&self) -> Result<&dyn ImageTokenizer> {
        self.image_tokenizer
            .as_ref()
            .map(ImageCodec::as_dyn)
            .ok_or_else(|| ModelError::input("checkpoint has no image tokenizer"))
    }

    // ---- prompting ----

    /// Understanding prompt with the image placeholder slots.
    pub fn understanding_prompt(&self, question: &str) -> Result<Vec<u32>> {
        self.tok()?
            .understanding_prompt(question, self.cfg.vision_config.num_image_tokens)
    }
    /// Generation prompt ending with begin-of-image.
    pub fn generation_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tok()?.generation_prompt(prompt)
    }
    /// Plain tokens (answers, captions).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.tok()?.encode(text)
    }
    /// Text of ids, specials dropped.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.tok()?.decode(ids)
    }
    /// The stop token of answers.
    pub fn eos_token(&self) -> u32 {
        self.tokenizer
            .as_ref()
            .map(|t| t.eos)
            .or(self.cfg.text_config.eos_id())
            .unwrap_or(0)
    }
    /// Token ids an answer may never contain: every special token except the stop token (padding, bos, the
    /// image placeholder, begin/end of image, the toy separator and `<unk>`). An untrained or RL-drifted model
    /// can otherwise emit an `<image>` placeholder, which decodes to nothing and breaks the next forward pass's
    /// one-run-of-placeholders rule. Sampling and teacher forcing both apply this mask, so the policy whose
    /// log-probs are recorded is the one that is sampled.
    pub fn banned_answer_tokens(&self) -> Vec<u32> {
        let eos = self.eos_token();
        let mut ids = Vec::new();
        if let Some(t) = &self.tokenizer {
            ids.extend([t.pad, t.bos, t.image, t.boi, t.eoi]);
            ids.extend(t.sep);
            if t.template == crate::janus_config::PromptTemplate::Toy {
                ids.extend(0..crate::tokenizer::TOY_SPECIALS.len() as u32);
            }
        } else {
            ids.push(self.cfg.image_token_id);
            ids.extend(self.cfg.text_config.pad_token_id);
        }
        let vocab = self.cfg.text_config.vocab_size as u32;
        ids.retain(|&i| i != eos && i < vocab);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Additive logit mask of [`Janus::banned_answer_tokens`]: 0, or a large negative number (not −∞, so
    /// `0 × log p` stays 0 in the entropy).
    fn answer_logit_bias(&self, vocab: usize) -> Vec<f32> {
        let mut bias = vec![0f32; vocab];
        for id in self.banned_answer_tokens() {
            if let Some(b) = bias.get_mut(id as usize) {
                *b = BANNED_LOGIT;
            }
        }
        bias
    }

    fn pad_token(&self) -> u32 {
        self.tokenizer
            .as_ref()
            .map(|t| t.pad)
            .or(self.cfg.text_config.pad_token_id)
            .unwrap_or(0)
    }
    /// Codes per generated image (576 for Janus-Pro, 64 for the toy).
    pub fn image_tokens_per_image(&self) -> usize {
        self.image_tokenizer
            .as_ref()
            .map(|t| t.as_dyn().tokens_per_image())
            .unwrap_or_else(|| self.cfg.image_tokens_per_image())
    }
    /// Pixels [3, S, S] f32 in model space ((x/255 − 0.5)/0.5) at the vision encoder's size (resized if needed).
    pub fn preprocess_image(&self, img: &RgbImage) -> Result<Tensor> {
        let s = self.cfg.vision_config.image_size as u32;
        let resized;
        let img = if img.width() != s || img.height() != s {
            resized = image::imageops::resize(img, s, s, image::imageops::FilterType::CatmullRom);
            &resized
        } else {
            img
        };
        let t = crate::image_tokenizer::rgb_to_pixels(std::slice::from_ref(img), &self.device)
            .map_err(|e| ModelError::input(e.to_string()))?;
        Ok(t.squeeze(0)?)
    }

    /// [`Janus::preprocess_image`] of every image, each distinct image processed once: rows that show the same
    /// image (the rollouts of one question) get clones of one tensor, which is how [`Janus::prompt_sharing`]
    /// tells that they can share a prompt.
    pub fn preprocess_images(&self, images: &[RgbImage]) -> Result<Vec<Tensor>> {
        let mut distinct: Vec<(&RgbImage, Tensor)> = Vec::new();
        let mut out = Vec::with_capacity(images.len());
        for img in images {
            // Newest first: a group's rows are usually adjacent, and unequal images differ in their first bytes.
            let known = distinct.iter().rev().find(|(seen, _)| *seen == img);
            let px = match known {
                Some((_, px)) => px.clone(),
                None => {
                    let px = self.preprocess_image(img)?;
                    distinct.push((img, px.clone()));
                    px
                }
            };
            out.push(px);
        }
        Ok(out)
    }

    // ---- forward pieces ----

    /// Aligned image features [B, N, H] for pixels [B, 3, S, S] (detached when the vision tower is frozen:
    /// [`Janus::select_trained`]).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = self.m.vision.forward(pixels)?;
        let f = self.m.aligner.forward(&v)?;
        Ok(if self.frozen.vision { f.detach() } else { f })
    }

    /// Vision encoder output before the aligner [B, N, E] (parity checks).
    pub fn vision_hidden(&self, pixels: &Tensor) -> Result<Tensor> {
        self.m.vision.forward(pixels)
    }

    /// Token embeddings of equal-length `rows`, with image features scattered into each row's placeholder run.
    fn embed_rows(&self, rows: &[Vec<u32>], pixels: Option<&Tensor>) -> Result<Tensor> {
        let ids = ids_tensor(rows, &self.device)?;
        let emb = self.m.lm.embed(&ids)?;
        let Some(px) = pixels else {
            return Ok(emb);
        };
        let feats = self.image_features(px)?.to_dtype(emb.dtype())?;
        let n = feats.dim(1)?;
        let img = self.cfg.image_token_id;
        let mut out = Vec::with_capacity(rows.len());
        for (b, row) in rows.iter().enumerate() {
            let start = row.iter().position(|&t| t == img);
            let count = row.iter().filter(|&&t| t == img).count();
            let Some(s) = start.filter(|&s| count == n && row[s..s + n].iter().all(|&t| t == img))
            else {
                return Err(ModelError::input(format!(
                    "row {b}: expected one run of {n} image placeholder tokens (id {img}), found {count}"
                )));
            };
            let e = emb.get(b)?;
            let t = row.len();
            let mut parts = Vec::with_capacity(3);
            if s > 0 {
                parts.push(e.narrow(0, 0, s)?);
            }
            parts.push(feats.get(b)?);
            if s + n < t {
                parts.push(e.narrow(0, s + n, t - s - n)?);
            }
            out.push(Tensor::cat(&parts, 0)?);
        }
        Ok(Tensor::stack(&out, 0)?)
    }

    /// Text logits [B, T, V] f32 for unpadded equal-length `rows` (optionally with images), one full pass.
    pub fn text_logits(&self, rows: &[Vec<u32>], pixels: Option<&Tensor>) -> Result<Tensor> {
        let emb = self.embed_rows(rows, pixels)?;
        let valid = vec![vec![true; emb.dim(1)?]; rows.len()];
        let (h, _) = self
            .m
            .lm
            .forward(&emb, &valid, &self.m.lm.empty_cache(rows.len()))?;
        self.lm_logits(&h)
    }

    fn lm_logits(&self, h: &Tensor) -> Result<Tensor> {
        // 2-D matmul against the transposed head: broadcast_matmul would materialise a copy of the
        // [H, V] head per batch row (800 MB each at Janus-Pro-1B shapes).
        // Differentiated with the training kernels, one autograd node (the same values): the composition's
        // backward also writes a zero [V, H] head and adds the transposed gradient into it. Sampling keeps the
        // composition.
        if self.m.lm.fused_training() && h.track_op() {
            return Ok(crate::trained_kernels::linear(h, &self.m.lm_head)?.to_dtype(DType::F32)?);
        }
        let dims = h.dims().to_vec();
        let hidden = *dims.last().expect("rank ≥ 1");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let logits = h.reshape((rows, hidden))?.matmul(&self.m.lm_head.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.m.lm_head.dim(0)?;
        Ok(logits.reshape(out)?.to_dtype(DType::F32)?)
    }

    /// Generation-head logits (f32) for hidden states [.., H].
    pub fn gen_head(&self, h: &Tensor) -> Result<Tensor> {
        // As `lm_logits`: one node per layer when differentiated, the composition when sampling.
        let trained = self.m.lm.fused_training() && h.track_op();
        let x = self.m.gen_proj.forward_with(h, trained)?;
        let x = self
            .m
            .gen_out
            .forward_with(&self.m.gen_act.apply(&x)?, trained)?;
        Ok(x.to_dtype(DType::F32)?)
    }

    /// gen_aligner(gen_embed(codes)) for codes [B, N] (u32) → [B, N, H] (detached when frozen:
    /// [`Janus::select_trained`]).
    pub fn code_embeddings(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, n) = codes.dims2()?;
        let e = self.m.gen_embed.index_select(&codes.flatten_all()?, 0)?;
        let e = e.reshape((b, n, self.cfg.vq_config.embed_dim))?;
        let c = self.m.gen_aligner.forward(&e)?;
        Ok(if self.frozen.codes { c.detach() } else { c })
    }

    /// Generation-head logits [B, L+N, K] f32 for unpadded equal-length prompts followed by codes (one pass).
    pub fn gen_logits(&self, prompts: &[Vec<u32>], codes: &[Vec<u32>]) -> Result<Tensor> {
        let p = self.m.lm.embed(&ids_tensor(prompts, &self.device)?)?;
        let emb = if codes.first().is_some_and(|c| !c.is_empty()) {
            let c = self.code_embeddings(&ids_tensor(codes, &self.device)?)?;
            Tensor::cat(&[p, c.to_dtype(self.dtype)?], 1)?
        } else {
            p
        };
        let valid = vec![vec![true; emb.dim(1)?]; prompts.len()];
        let (h, _) = self
            .m
            .lm
            .forward(&emb, &valid, &self.m.lm.empty_cache(prompts.len()))?;
        self.gen_head(&h)
    }

    /// The decoder on embeddings with an explicit cache (incremental decoding for callers and tests).
    pub fn decoder_step(
        &self,
        emb: &Tensor,
        valid: &[Vec<bool>],
        cache: &KvCache,
    ) -> Result<(Tensor, KvCache)> {
        self.m.lm.forward(emb, valid, cache)
    }
    /// The decoder on one-token embeddings `steps` ([B, 1, H] each, every row real) after a prefilled cache, in
    /// the fixed-shape steps the samplers capture as CUDA graphs (run eagerly here): the final-normed hidden
    /// states [B, 1, H] of each step. For callers that check those steps against `decoder_step` or a reference.
    pub fn static_decoder_steps(&self, cache: KvCache, steps: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut sd = self.m.lm.static_decode(cache, steps.len())?;
        let mut out = Vec::with_capacity(steps.len());
        for x in steps {
            let width = self.m.lm.static_width(&sd);
            out.push(self.m.lm.static_step(x, &sd, width)?.unsqueeze(1)?);
            sd.count_step()?;
            sd.advance();
        }
        Ok(out)
    }
    /// An empty KV cache for `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> KvCache {
        self.m.lm.empty_cache(batch)
    }
    /// An empty KV cache for `batch` rows with buffers for `capacity` positions, written in place (sampling;
    /// no gradient reaches the cached keys). Going past the capacity reallocates at twice the size.
    pub fn empty_cache_with_capacity(&self, batch: usize, capacity: usize) -> KvCache {
        self.m.lm.empty_cache_with_capacity(batch, capacity)
    }
    /// Token embeddings [B, T, H] of `rows` (equal length, no images).
    pub fn token_embeddings(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        self.m.lm.embed(&ids_tensor(rows, &self.device)?)
    }
    /// lm_head logits (f32) of hidden states.
    pub fn text_head(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_logits(h)
    }

    // ---- sampling ----

    /// Samples one answer per (image, question); rows are batched with left padding.
    pub fn sample_answers(
        &self,
        images: &[RgbImage],
        questions: &[String],
        s: &TextSampling,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<TextRollout>> {
        if images.len() != questions.len() {
            return Err(ModelError::input(format!(
                "{} images but {} questions",
                images.len(),
                questions.len()
            )));
        }
        let pixels = self.preprocess_images(images)?;
        let prompts = questions
            .iter()
            .map(|q| self.understanding_prompt(q))
            .collect::<Result<Vec<_>>>()?;
        self.sample_answers_ids(&pixels, &prompts, s, rng)
    }

    /// `sample_answers` on preprocessed pixels [3, S, S] and prompt ids (custom templates). Draws where
    /// [`SamplerSite::Auto`] says: on the host on the CPU, on the device otherwise (with top-p, only with the draw
    /// kernel).
    pub fn sample_answers_ids(
        &self,
        pixels: &[Tensor],
        prompts: &[Vec<u32>],
        s: &TextSampling,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<TextRollout>> {
        self.sample_answers_ids_at(pixels, prompts, s, SamplerSite::Auto, rng)
    }

    /// `sample_answers_ids` with the site of the draws chosen by the caller (tests force the device path on the
    /// CPU; benchmarks compare the two). The host path is the reference: seeded runs reproduce it bit for bit.
    pub fn sample_answers_ids_at(
        &self,
        pixels: &[Tensor],
        prompts: &[Vec<u32>],
        s: &TextSampling,
        site: SamplerSite,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<TextRollout>> {
        let b = prompts.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        if pixels.len() != b {
            return Err(ModelError::input(format!(
                "{} images but {b} prompts",
                pixels.len()
            )));
        }
        if !s.greedy && s.temperature <= 0.0 {
            return Err(ModelError::input(
                "text temperature must be > 0 unless greedy",
            ));
        }
        let nucleus = !s.greedy && s.top_p < 1.0;
        let on_device = self.draws_on_device(site, nucleus);
        // The report describes this call's decode, or says that it ran none.
        write_report(&self.answer_graph_report, None);
        // A static decode reserves at least one step; an empty answer needs none.
        let fixed = on_device && self.static_decode && s.max_new_tokens > 0;
        let t_lp = s.logprob_temperature();
        let eos = self.eos_token();
        let pad = self.pad_token();
        let plen = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // Room for the prompt and every answer token, so no decode step copies the cache; a static decode rounds
        // its buffers up to whole attention widths, which it can then take over.
        let room = if fixed {
            static_capacity(plen, s.max_new_tokens)
        } else {
            plen + s.max_new_tokens
        };
        let groups = PromptGroups::of(pixels, prompts);
        let (mut last, mut cache) = if self.prompt_sharing && groups.shares() {
            let (px, prompts) = groups.firsts(pixels, prompts);
            let (last, cache) = self.prefill_prompts(&px, &prompts, room)?;
            (
                last.contiguous()?
                    .index_select(&groups.row_index(&self.device)?, 0)?,
                cache.select_rows(&groups.of_row)?,
            )
        } else {
            self.prefill_prompts(pixels, prompts, room)?
        };
        let bias = self.answer_logit_bias(self.m.lm_head.dim(0)?);
        let mut device_draws = if on_device {
            use rand::RngCore;
            // One value of the caller's stream whatever the device, as the image sampler takes.
            let noise =
                GumbelNoise::new(&self.device, rng.next_u64())?.with_draw_kernel(self.draw_kernel);
            let width = bias.len();
            Some((
                noise,
                Tensor::from_vec(bias.clone(), (1, width), &self.device)?,
            ))
        } else {
            None
        };
        if let (true, Some((noise, bias))) = (fixed, &mut device_draws) {
            let (answers, lps) = self.answer_decode_static(s, cache, last, noise, bias)?;
            return Ok(self.text_rollouts(pixels, prompts, answers, lps));
        }
        let mut answers: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut lps: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for step in 0..s.max_new_tokens {
            let active: Vec<usize> = (0..b).filter(|&r| !done[r]).collect();
            let logits = self.lm_logits(&last)?;
            let draws: Vec<(usize, f32)> = match &mut device_draws {
                Some((noise, bias)) => {
                    // Finished rows draw too (their tokens are dropped): the batch keeps its shape.
                    let (tok, lp) = device_token_draw(&logits, bias, s, noise)?;
                    let (tok, lp) = (
                        tok.flatten_all()?.to_vec1::<u32>()?,
                        lp.flatten_all()?.to_vec1::<f32>()?,
                    );
                    active.iter().map(|&r| (tok[r] as usize, lp[r])).collect()
                }
                None => {
                    let logits = logits.to_vec2::<f32>()?;
                    draw_rows(&active, bias.len(), !s.greedy, rng, |r, u| {
                        let row: Vec<f32> =
                            logits[r].iter().zip(&bias).map(|(l, b)| l + b).collect();
                        if s.greedy {
                            let tok = argmax(&row);
                            (tok, log_prob_t(&row, t_lp, tok))
                        } else {
                            sample_with_logprob_at(&row, s.temperature, s.top_p, u, t_lp)
                        }
                    })
                }
            };
            let mut next = vec![pad; b];
            for (&r, (tok, lp)) in active.iter().zip(draws) {
                lps[r].push(lp);
                answers[r].push(tok as u32);
                next[r] = tok as u32;
                if tok as u32 == eos {
                    done[r] = true;
                }
            }
            if done.iter().all(|&d| d) || step + 1 == s.max_new_tokens {
                break;
            }
            // Finished rows (including one that just sampled eos) feed padding, which is masked out.
            let step_valid: Vec<Vec<bool>> = done.iter().map(|&d| vec![!d]).collect();
            let rows: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            let emb = self.m.lm.embed(&ids_tensor(&rows, &self.device)?)?;
            let (h, c) = self.m.lm.forward(&emb, &step_valid, &cache)?;
            cache = c.detach();
            last = last_position(&h)?.detach();
        }
        Ok(self.text_rollouts(pixels, prompts, answers, lps))
    }

    /// Prefills left-padded `prompts` with their images into a preallocated cache of `room` positions; returns
    /// the last position's hidden state [B, H] and the cache, both detached (sampling differentiates nothing).
    fn prefill_prompts(
        &self,
        pixels: &[Tensor],
        prompts: &[Vec<u32>],
        room: usize,
    ) -> Result<(Tensor, KvCache)> {
        let (rows, valid) = left_pad(prompts, self.pad_token());
        let px = Tensor::stack(pixels, 0)?;
        let emb = self.embed_rows(&rows, Some(&px))?.detach();
        let empty = self.m.lm.empty_cache_with_capacity(rows.len(), room);
        let (h, cache) = self.m.lm.forward(&emb, &valid, &empty)?;
        Ok((last_position(&h)?.detach(), cache.detach()))
    }

    /// Rollouts of the drawn answer tokens (each ending at its eos, if drawn) and their log-probs.
    fn text_rollouts(
        &self,
        pixels: &[Tensor],
        prompts: &[Vec<u32>],
        answers: Vec<Vec<u32>>,
        lps: Vec<Vec<f32>>,
    ) -> Vec<TextRollout> {
        let eos = self.eos_token();
        pixels
            .iter()
            .zip(prompts)
            .zip(answers.into_iter().zip(lps))
            .map(|((px, prompt), (ids, logprobs))| {
                let text_ids: Vec<u32> = ids.iter().copied().filter(|&t| t != eos).collect();
                TextRollout {
                    image: px.clone(),
                    prompt_ids: prompt.clone(),
                    text: self.decode_text(&text_ids).unwrap_or_default(),
                    answer_ids: ids,
                    logprobs,
                }
            })
            .collect()
    }

    /// The device answer draws in fixed-shape steps ([`Janus::static_decode_loop`]), drawing as the eager device
    /// path does. A finished row keeps decoding its own draws instead of padding (attention is per row: the other
    /// rows never see them) and its tokens after eos are dropped; the host reads each step's tokens back to stop
    /// once every row has finished, as the eager path does. Returns each row's tokens (through its eos) and
    /// their log-probs.
    fn answer_decode_static(
        &self,
        s: &TextSampling,
        cache: KvCache,
        last: Tensor,
        noise: &mut GumbelNoise,
        bias: &Tensor,
    ) -> Result<CodesAndLogprobs> {
        let b = cache.batch();
        let eos = self.eos_token();
        let sd = self.m.lm.static_decode(cache, s.max_new_tokens)?;
        let mut done = vec![false; b];
        let mut all_done = |tokens: &[u32]| {
            for (d, &t) in done.iter_mut().zip(tokens) {
                *d |= t == eos;
            }
            done.iter().all(|&d| d)
        };
        let (tokens, lps) = self.static_decode_loop(
            sd,
            last,
            b,
            (!s.greedy).then_some(StepNoise {
                noise,
                classes: bias.dim(1)?,
                nucleus: s.top_p < 1.0,
            }),
            &self.answer_graph_report,
            |last, gumbel, key| {
                Ok(token_draw(
                    &self.lm_logits(last)?,
                    bias,
                    s,
                    self.draw_kernel,
                    key,
                    || Ok(gumbel.cloned()),
                )?)
            },
            |tok| self.m.lm.embed(tok),
            Some(&mut all_done),
        )?;
        Ok(tokens
            .into_iter()
            .zip(lps)
            .map(|(mut ids, mut lp)| {
                if let Some(end) = ids.iter().position(|&t| t == eos) {
                    ids.truncate(end + 1);
                    lp.truncate(end + 1);
                }
                (ids, lp)
            })
            .unzip())
    }

    /// Samples one image per prompt with classifier-free guidance (METHOD.md §3).
    pub fn sample_images(
        &self,
        prompts: &[String],
        s: &ImageSampling,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<ImageRollout>> {
        let ids = prompts
            .iter()
            .map(|p| self.generation_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        self.sample_images_ids(&ids, s, rng)
    }

    /// Unconditional copy of a (left-padded) prompt row: every real token except the first and the last → pad.
    fn uncond_row(row: &[u32], valid: &[bool], pad: u32) -> Vec<u32> {
        let first = valid.iter().position(|&v| v).unwrap_or(0);
        let last = row.len().saturating_sub(1);
        row.iter()
            .enumerate()
            .map(|(i, &t)| {
                if i == first || i == last || !valid[i] {
                    t
                } else {
                    pad
                }
            })
            .collect()
    }

    /// `sample_images` on prompt ids (each ending with begin-of-image).
    pub fn sample_images_ids(
        &self,
        prompts: &[Vec<u32>],
        s: &ImageSampling,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<ImageRollout>> {
        self.sample_image_codes(prompts, s, self.image_tokens_per_image(), rng)
    }

    /// `sample_images_ids` stopping after the first `n` codes (benchmarks; rollouts need the full count).
    /// Samples where [`SamplerSite::Auto`] says: on the host on the CPU, on the device otherwise.
    pub fn sample_image_codes(
        &self,
        prompts: &[Vec<u32>],
        s: &ImageSampling,
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<ImageRollout>> {
        self.sample_image_codes_at(prompts, s, n, SamplerSite::Auto, rng)
    }

    /// `sample_image_codes` with the sampling site chosen by the caller (tests force the device path on the CPU;
    /// benchmarks compare the two). The host path is the reference: seeded runs reproduce it bit for bit.
    pub fn sample_image_codes_at(
        &self,
        prompts: &[Vec<u32>],
        s: &ImageSampling,
        n: usize,
        site: SamplerSite,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<ImageRollout>> {
        // The report describes this call's decode, or says that it ran none.
        write_report(&self.graph_report, None);
        let p = prompts.len();
        if p == 0 || n == 0 {
            return Ok(prompts
                .iter()
                .map(|pr| ImageRollout {
                    prompt_ids: pr.clone(),
                    codes: vec![],
                    logprobs: vec![],
                })
                .collect());
        }
        if prompts.iter().any(|r| r.len() < 2) {
            return Err(ModelError::input(
                "generation prompts need at least bos and begin-of-image",
            ));
        }
        let on_device = self.draws_on_device(site, s.temperature > 0.0 && s.top_p < 1.0);
        let pad = self.pad_token();
        let (rows, valid) = left_pad(prompts, pad);
        let mut all_rows = rows.clone();
        for (r, v) in rows.iter().zip(&valid) {
            all_rows.push(Self::uncond_row(r, v, pad));
        }
        let mut all_valid = valid.clone();
        all_valid.extend(valid.iter().cloned());
        let emb = self.m.lm.embed(&ids_tensor(&all_rows, &self.device)?)?;
        // Room for the prompt and every code but the last (which is never fed back); a static decode feeds the
        // last one too and rounds its buffers up to whole attention widths, which it can then take over.
        let room = if on_device && self.static_decode {
            static_capacity(rows[0].len(), n)
        } else {
            rows[0].len() + n
        };
        let (h, cache) = self.m.lm.forward(
            &emb,
            &all_valid,
            &self.m.lm.empty_cache_with_capacity(2 * p, room),
        )?;
        let cache = cache.detach();
        let last = last_position(&h)?.detach();
        let (codes, lps) = if on_device && self.static_decode {
            self.cfg_decode_static(p, n, s, cache, last, rng)?
        } else if on_device {
            self.cfg_decode_on_device(p, n, s, cache, last, rng)?
        } else {
            self.cfg_decode_on_host(p, n, s, cache, last, rng)?
        };
        Ok(prompts
            .iter()
            .zip(codes)
            .zip(lps)
            .map(|((pr, c), l)| ImageRollout {
                prompt_ids: pr.clone(),
                codes: c,
                logprobs: l,
            })
            .collect())
    }

    /// Whether a decode at `site` draws on the device. [`SamplerSite::Auto`] does on an accelerator, with a top-p
    /// `nucleus` only when the draw kernel is asked for: without it each draw's nucleus is taken on the host from
    /// the device's logits, which costs what the host sampler costs and breaks a static decode's graphs.
    fn draws_on_device(&self, site: SamplerSite, nucleus: bool) -> bool {
        match site {
            SamplerSite::Auto => !self.device.is_cpu() && (!nucleus || self.draw_kernel),
            SamplerSite::Host => false,
            SamplerSite::Device => true,
        }
    }

    /// Feeds each prompt's new code to its conditional and unconditional rows; returns the next generation
    /// hidden states [2p, H] and the extended cache.
    fn feed_codes(&self, codes: &Tensor, cache: &KvCache) -> Result<(Tensor, KvCache)> {
        // The same code goes to the conditional and the unconditional row.
        let both = Tensor::cat(&[codes, codes], 0)?;
        let emb = self.code_embeddings(&both)?.to_dtype(self.dtype)?;
        let step_valid = vec![vec![true]; both.dim(0)?];
        let (h, c) = self.m.lm.forward(&emb, &step_valid, cache)?;
        Ok((last_position(&h)?.detach(), c.detach()))
    }

    /// The CFG decode loop with the logits copied to the host every step and drawn from the caller's stream.
    fn cfg_decode_on_host(
        &self,
        p: usize,
        n: usize,
        s: &ImageSampling,
        mut cache: KvCache,
        mut last: Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<CodesAndLogprobs> {
        let w = s.cfg_weight as f32;
        let lp_t = if s.temperature > 0.0 {
            s.temperature
        } else {
            1.0
        };
        let mut codes: Vec<Vec<u32>> = vec![Vec::with_capacity(n); p];
        let mut lps: Vec<Vec<f32>> = vec![Vec::with_capacity(n); p];
        let rows: Vec<usize> = (0..p).collect();
        for k in 0..n {
            let logits = self.gen_head(&last)?.to_vec2::<f32>()?;
            let width = logits.first().map_or(0, Vec::len);
            let draws = draw_rows(&rows, width, s.temperature > 0.0, rng, |r, u| {
                let (lc, lu) = (&logits[r], &logits[p + r]);
                let mixed: Vec<f32> = lc.iter().zip(lu).map(|(&c, &u)| u + w * (c - u)).collect();
                let code = sample_index_at(&mixed, s.temperature, s.top_p, u);
                (code, log_prob_t(lc, lp_t, code))
            });
            let mut step_codes = Vec::with_capacity(p);
            for (r, (code, lp)) in draws.into_iter().enumerate() {
                lps[r].push(lp);
                codes[r].push(code as u32);
                step_codes.push(code as u32);
            }
            if k + 1 == n {
                break;
            }
            let ct = Tensor::from_vec(step_codes, (p, 1), &self.device)?;
            (last, cache) = self.feed_codes(&ct, &cache)?;
        }
        Ok((codes, lps))
    }

    /// The CFG decode loop with mix, draw and log-prob on the device (`device_cfg_draw`): the codes stay on the
    /// device and feed the next step directly, so no step waits for the host; everything is read back once.
    fn cfg_decode_on_device(
        &self,
        p: usize,
        n: usize,
        s: &ImageSampling,
        mut cache: KvCache,
        mut last: Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<CodesAndLogprobs> {
        use rand::RngCore;
        // One value of the caller's stream whatever the device, so that what the caller draws next is the same.
        let mut noise =
            GumbelNoise::new(&self.device, rng.next_u64())?.with_draw_kernel(self.draw_kernel);
        let mut codes = Vec::with_capacity(n);
        let mut lps = Vec::with_capacity(n);
        for k in 0..n {
            let logits = self.gen_head(&last)?;
            let (code, lp) = device_cfg_draw(
                &logits.narrow(0, 0, p)?,
                &logits.narrow(0, p, p)?,
                s,
                &mut noise,
            )?;
            if k + 1 < n {
                (last, cache) = self.feed_codes(&code, &cache)?;
            }
            codes.push(code);
            lps.push(lp);
        }
        let codes = Tensor::cat(&codes, 1)?.to_vec2::<u32>()?;
        let lps = Tensor::cat(&lps, 1)?.to_vec2::<f32>()?;
        Ok((codes, lps))
    }

    /// `cfg_decode_on_device` through a static decode ([`Janus::static_decode_loop`]). The noise is drawn as
    /// `cfg_decode_on_device` draws it, so both paths sample the same codes from the same seed up to the rounding
    /// of the wider attention.
    fn cfg_decode_static(
        &self,
        p: usize,
        n: usize,
        s: &ImageSampling,
        cache: KvCache,
        last: Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<CodesAndLogprobs> {
        use rand::RngCore;
        let mut noise =
            GumbelNoise::new(&self.device, rng.next_u64())?.with_draw_kernel(self.draw_kernel);
        let codebook = self.m.gen_out.weight.dim(0)?;
        let sd = self.m.lm.static_decode(cache, n)?;
        self.static_decode_loop(
            sd,
            last,
            p,
            (s.temperature > 0.0).then_some(StepNoise {
                noise: &mut noise,
                classes: codebook,
                nucleus: s.top_p < 1.0,
            }),
            &self.graph_report,
            |last, gumbel, key| {
                let logits = self.gen_head(last)?;
                Ok(cfg_draw(
                    &logits.narrow(0, 0, p)?,
                    &logits.narrow(0, p, p)?,
                    s,
                    self.draw_kernel,
                    key,
                    || Ok(gumbel.cloned()),
                )?)
            },
            // Both rows of a prompt, conditional and unconditional, are fed its code.
            |code| {
                Ok(self
                    .code_embeddings(&Tensor::cat(&[code, code], 0)?)?
                    .to_dtype(self.dtype)?)
            },
            None,
        )
    }

    /// The step loop both static decodes share. Each step draws ids [rows, 1] (u32) and their log-probs (f32)
    /// from the last hidden states (which CFG doubles) (`draw`, given Gumbel noise [rows, classes] when `noise` says
    /// how to fill it, and the draw kernel's noise key: the noise's seed and the device step counter), writes them
    /// at the step's row of step-major buffers, and feeds the ids' embeddings (`embed`) through
    /// [`Llama::static_step`], whose hidden states the next step reads; the last ids are fed too, so that every
    /// step is the same graph. A step thus reads and writes only fixed device buffers, and on CUDA it is captured
    /// once per attention width ([`Llama::static_width`]: one for the whole decode when the attention kernel
    /// takes it) and replayed. The noise is filled outside the step, since cuRAND's offset is host state; not at
    /// all once the draw kernel makes its own ([`GumbelNoise::needed`]), and a draw is given the buffer only on a
    /// step that filled it; a step whose nucleus is drawn on the host (top-p without the draw kernel) runs eagerly.
    /// `stop`, if given, gets each step's ids on the host and ends the decode by returning
    /// true (step-major buffers make that read a plain copy). Stores the graph report in `report`; returns per row
    /// the ids and log-probs of the steps taken.
    #[allow(clippy::too_many_arguments)] // each is one part of the step; bundling them would only rename them
    fn static_decode_loop(
        &self,
        mut sd: StaticDecode,
        last: Tensor,
        rows: usize,
        mut noise: Option<StepNoise>,
        report: &Mutex<Option<GraphReport>>,
        draw: impl Fn(&Tensor, Option<&Tensor>, DrawNoise) -> Result<(Tensor, Tensor)>,
        embed: impl Fn(&Tensor) -> Result<Tensor>,
        mut stop: Option<&mut StopWhen>,
    ) -> Result<CodesAndLogprobs> {
        let dev = &self.device;
        let n = sd.reserved_steps();
        // `copy`: `last` gets storage of its own (`last_position` gives a strided view, and `contiguous` alone
        // may share the storage).
        let last = last.contiguous()?.copy()?;
        let gumbel = match &noise {
            Some(n) => Some(Tensor::zeros((rows, n.classes), DType::F32, dev)?),
            None => None,
        };
        // Greedy decodes draw no noise: any seed keys the kernel's.
        let seed = noise.as_ref().map_or(0, |n| n.noise.seed());
        let ids = Tensor::zeros((n, rows), DType::U32, dev)?;
        let lps = Tensor::zeros((n, rows), DType::F32, dev)?;
        let mut graphs = device_graphs(dev, self.capture_graphs);
        let mut taken = 0;
        while taken < n {
            let filled = match (&mut noise, &gumbel) {
                (Some(n), Some(g)) if n.noise.needed() => {
                    g.slice_set(&n.noise.sample((rows, n.classes))?, 0, 0)?;
                    true
                }
                _ => false,
            };
            // A nucleus the draw kernel does not take is drawn on the host, which a graph cannot hold.
            let on_host = noise
                .as_ref()
                .is_some_and(|n| n.nucleus && !crate::draw_kernel::ready(dev, self.draw_kernel));
            let width = self.m.lm.static_width(&sd);
            let step = || {
                let key = DrawNoise::Counter {
                    seed,
                    step: 0,
                    counter: Some(sd.counter()),
                };
                let (id, lp) = draw(&last, gumbel.as_ref().filter(|_| filled), key)?;
                let at = sd.step_indices(&[1, rows])?;
                ids.scatter_set(&at, &id.reshape((1, rows))?, 0)?;
                lps.scatter_set(&at, &lp.reshape((1, rows))?, 0)?;
                let h = self.m.lm.static_step(&embed(&id)?, &sd, width)?;
                last.slice_set(&h, 0, 0)?;
                sd.count_step()
            };
            if on_host {
                graphs.run_eagerly(step)?;
            } else {
                graphs.run(width, step)?;
            }
            sd.advance();
            taken += 1;
            if let Some(stop) = stop.as_mut() {
                if stop(&ids.get(taken - 1)?.to_vec1::<u32>()?) {
                    break;
                }
            }
        }
        write_report(report, Some(graphs.report()));
        let ids = ids.narrow(0, 0, taken)?.t()?.to_vec2::<u32>()?;
        let lps = lps.narrow(0, 0, taken)?.t()?.to_vec2::<f32>()?;
        Ok((ids, lps))
    }

    /// Images for code sequences (image tokenizer decode).
    pub fn decode_codes(&self, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        self.codec()?
            .decode(codes)
            .map_err(|e| ModelError::input(format!("decoding image codes: {e}")))
    }

    /// Codes of an image (image tokenizer encode; SFT targets).
    pub fn encode_image_codes(&self, img: &RgbImage) -> Result<Vec<u32>> {
        let it = self.codec()?;
        let s = it.image_size() as u32;
        let resized;
        let img = if img.width() != s || img.height() != s {
            resized = image::imageops::resize(img, s, s, image::imageops::FilterType::CatmullRom);
            &resized
        } else {
            img
        };
        it.encode(img)
            .map_err(|e| ModelError::input(format!("encoding image: {e}")))
    }

    // ---- teacher forcing (differentiable) ----

    /// Per-token log-probs [B, T_max] f32 of each rollout's answer at T = 1, and the mask [B, T_max].
    pub fn answer_logprobs(&self, batch: &[TextRollout]) -> Result<(Tensor, Tensor)> {
        self.answer_logprobs_at(batch, 1.0)
    }

    /// `answer_logprobs` under softmax(logits / temperature) (use the sampling temperature so ρ = 1 on-policy).
    pub fn answer_logprobs_at(
        &self,
        batch: &[TextRollout],
        temperature: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (lp, mask, _) = self.answer_forward(batch, temperature, false)?;
        Ok((lp, mask))
    }

    /// `answer_logprobs_at` plus per-token entropy [B, T_max] (detached, for metrics).
    pub fn answer_logprobs_entropy(
        &self,
        batch: &[TextRollout],
        temperature: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (lp, mask, ent) = self.answer_forward(batch, temperature, true)?;
        Ok((lp, mask, ent.expect("entropy requested")))
    }

    fn answer_forward(
        &self,
        batch: &[TextRollout],
        temperature: f64,
        entropy: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let b = batch.len();
        if b == 0 {
            return Err(ModelError::input("answer_logprobs on an empty batch"));
        }
        if temperature <= 0.0 {
            return Err(ModelError::input("log-prob temperature must be > 0"));
        }
        if let Some(i) = batch.iter().position(|r| r.answer_ids.is_empty()) {
            return Err(ModelError::input(format!(
                "rollout {i} has no answer tokens"
            )));
        }
        // The prompt's run of placeholders is where the image goes; one in an answer would be read as an image slot
        // by a full-row pass and as an ordinary token after a shared prompt.
        let img = self.cfg.image_token_id;
        if let Some(i) = batch.iter().position(|r| r.answer_ids.contains(&img)) {
            return Err(ModelError::input(format!(
                "rollout {i}: its answer contains the image placeholder id {img}"
            )));
        }
        let pmax = batch.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
        let amax = batch.iter().map(|r| r.answer_ids.len()).max().unwrap_or(0);
        let mut targets = Vec::with_capacity(b * amax);
        let mut mask = Vec::with_capacity(b * amax);
        for r in batch {
            for j in 0..amax {
                targets.push(r.answer_ids.get(j).copied().unwrap_or(0));
                mask.push(if j < r.answer_ids.len() { 1f32 } else { 0.0 });
            }
        }
        let h = self.answer_hidden(batch, pmax, amax)?;
        let logits = (self.lm_logits(&h)? / temperature)?;
        let bias = self.answer_logit_bias(logits.dim(D::Minus1)?);
        let bias = Tensor::from_vec(bias, logits.dim(D::Minus1)?, &self.device)?;
        let logits = logits.broadcast_add(&bias)?;
        let logp = log_softmax_last(&logits)?;
        let tgt = Tensor::from_vec(targets, (b, amax, 1), &self.device)?;
        let lp = logp.gather(&tgt, D::Minus1)?.squeeze(D::Minus1)?;
        let mask = Tensor::from_vec(mask, (b, amax), &self.device)?;
        let lp = (lp * &mask)?;
        let ent = if entropy {
            let l = logp.detach();
            Some(((l.exp()? * &l)?.sum(D::Minus1)?.neg()? * &mask)?)
        } else {
            None
        };
        Ok((lp, mask, ent))
    }

    /// The hidden states [B, amax, H] from which each rollout's answer tokens are scored: the prompt's last
    /// position, then each answer token but the last (whose output is unused). One pass over rows of left
    /// padding, prompt, answer and right padding; or, when rollouts share a prompt ([`Janus::prompt_sharing`]),
    /// each distinct prompt's forward once, in the form [`Janus::shared_scoring`] chooses.
    fn answer_hidden(&self, batch: &[TextRollout], pmax: usize, amax: usize) -> Result<Tensor> {
        let pad = self.pad_token();
        let pixels: Vec<Tensor> = batch.iter().map(|r| r.image.clone()).collect();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|r| r.prompt_ids.clone()).collect();
        let groups = PromptGroups::of(&pixels, &prompts);
        if self.prompt_sharing && groups.shares() {
            let (px, firsts) = groups.firsts(&pixels, &prompts);
            let packed = match self.shared_scoring {
                SharedScoring::Packed => true,
                SharedScoring::Cached => false,
                SharedScoring::Auto => {
                    let mut widths: Vec<usize> = firsts.iter().map(Vec::len).collect();
                    for (r, roll) in batch.iter().enumerate() {
                        widths[groups.of_row[r]] += roll.answer_ids.len() - 1;
                    }
                    let widest = widths.into_iter().max().unwrap_or(0);
                    packing_pays(firsts.len(), widest, batch.len(), pmax, amax)
                }
            };
            return if packed {
                self.answer_hidden_packed(batch, &groups, &px, &firsts, amax)
            } else {
                self.answer_hidden_cached(batch, &groups, &px, &firsts, pmax, amax)
            };
        }
        let (mut rows, mut valid) = left_pad(&prompts, pad);
        let (tails, tails_valid) = fed_answers(batch, amax - 1, pad);
        for (row, tail) in rows.iter_mut().zip(tails) {
            row.extend(tail);
        }
        for (v, tail) in valid.iter_mut().zip(tails_valid) {
            v.extend(tail);
        }
        let emb = self.embed_rows(&rows, Some(&Tensor::stack(&pixels, 0)?))?;
        let (h, _) = self
            .m
            .lm
            .forward(&emb, &valid, &self.m.lm.empty_cache(batch.len()))?;
        Ok(h.narrow(1, pmax - 1, amax)?)
    }

    /// [`Janus::answer_hidden`] for rollouts sharing prompts, packed: one row per group, its prompt (pixels `px`,
    /// ids `firsts`) and then the fed answer tokens of each of its rollouts, each answer at the positions after the
    /// prompt and seeing only the prompt and itself ([`Llama::forward_packed`]). One pass through the layers.
    fn answer_hidden_packed(
        &self,
        batch: &[TextRollout],
        groups: &PromptGroups,
        px: &[Tensor],
        firsts: &[Vec<u32>],
        amax: usize,
    ) -> Result<Tensor> {
        // `segment`: 0 for the prompt, r + 1 for rollout r's answer, `NONE` for padding.
        const NONE: u32 = u32::MAX;
        let mut rows = firsts.to_vec();
        let mut pos: Vec<Vec<u32>> = firsts
            .iter()
            .map(|p| (0..p.len() as u32).collect())
            .collect();
        let mut segment: Vec<Vec<u32>> = firsts.iter().map(|p| vec![0; p.len()]).collect();
        let mut starts = Vec::with_capacity(batch.len());
        for (r, roll) in batch.iter().enumerate() {
            let g = groups.of_row[r];
            let (p, fed) = (
                firsts[g].len(),
                &roll.answer_ids[..roll.answer_ids.len() - 1],
            );
            starts.push(rows[g].len());
            rows[g].extend_from_slice(fed);
            pos[g].extend((p..p + fed.len()).map(|i| i as u32));
            segment[g].extend(std::iter::repeat_n(r as u32 + 1, fed.len()));
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.pad_token();
        for ((row, ps), seg) in rows.iter_mut().zip(&mut pos).zip(&mut segment) {
            row.resize(width, pad);
            ps.resize(width, 0);
            seg.resize(width, NONE);
        }
        let emb = self.embed_rows(&rows, Some(&Tensor::stack(px, 0)?))?;
        let h = self.m.lm.forward_packed(&emb, &pos, |row, i, j| {
            let (si, sj) = (segment[row][i], segment[row][j]);
            sj == 0 || (sj == si && sj != NONE)
        })?;
        // Rollout r's answer is scored from its prompt's last position, then from each of its fed tokens; its
        // padding repeats the prompt's last position (masked by the caller).
        let mut idx = Vec::with_capacity(batch.len() * amax);
        for (r, roll) in batch.iter().enumerate() {
            let g = groups.of_row[r];
            let last = (g * width + firsts[g].len() - 1) as u32;
            let fed = roll.answer_ids.len() - 1;
            idx.push(last);
            idx.extend((0..fed).map(|t| (g * width + starts[r] + t) as u32));
            idx.extend(std::iter::repeat_n(last, amax - 1 - fed));
        }
        let hidden = h.dim(2)?;
        let idx = Tensor::from_vec(idx, batch.len() * amax, &self.device)?;
        Ok(h.reshape((rows.len() * width, hidden))?
            .index_select(&idx, 0)?
            .reshape((batch.len(), amax, hidden))?)
    }

    /// [`Janus::answer_hidden`] for rollouts sharing prompts, cached: one pass over each distinct prompt (pixels
    /// `px`, ids `firsts`), then one over every answer after its copy of that prompt's cache.
    fn answer_hidden_cached(
        &self,
        batch: &[TextRollout],
        groups: &PromptGroups,
        px: &[Tensor],
        firsts: &[Vec<u32>],
        pmax: usize,
        amax: usize,
    ) -> Result<Tensor> {
        let pad = self.pad_token();
        let (rows, valid) = left_pad(firsts, pad);
        let emb = self.embed_rows(&rows, Some(&Tensor::stack(px, 0)?))?;
        let (h, cache) = self
            .m
            .lm
            .forward(&emb, &valid, &self.m.lm.empty_cache(firsts.len()))?;
        let idx = groups.row_index(&self.device)?;
        let last = h
            .narrow(1, pmax - 1, 1)?
            .contiguous()?
            .index_select(&idx, 0)?;
        if amax == 1 {
            return Ok(last);
        }
        let (rows, valid) = fed_answers(batch, amax - 1, pad);
        let emb = self.m.lm.embed(&ids_tensor(&rows, &self.device)?)?;
        let (h, _) = self
            .m
            .lm
            .forward(&emb, &valid, &cache.select_rows(&groups.of_row)?)?;
        Ok(Tensor::cat(&[&last, &h], 1)?)
    }

    /// Per-code log-probs [B, N] f32 of each image rollout's codes at T = 1 under `policy`.
    pub fn image_logprobs(
        &self,
        batch: &[ImageRollout],
        policy: CfgLogprobPolicy,
    ) -> Result<Tensor> {
        self.image_logprobs_at(batch, policy, 1.0)
    }

    /// `image_logprobs` under softmax(l / temperature) (use the sampling temperature so ρ = 1 on-policy).
    pub fn image_logprobs_at(
        &self,
        batch: &[ImageRollout],
        policy: CfgLogprobPolicy,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(self.image_forward(batch, policy, temperature, false)?.0)
    }

    /// `image_logprobs_at` plus per-code entropy [B, N] (detached, for metrics).
    pub fn image_logprobs_entropy(
        &self,
        batch: &[ImageRollout],
        policy: CfgLogprobPolicy,
        temperature: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (lp, ent) = self.image_forward(batch, policy, temperature, true)?;
        Ok((lp, ent.expect("entropy requested")))
    }

    fn image_forward(
        &self,
        batch: &[ImageRollout],
        policy: CfgLogprobPolicy,
        temperature: f64,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = batch.len();
        if b == 0 {
            return Err(ModelError::input("image_logprobs on an empty batch"));
        }
        if temperature <= 0.0 {
            return Err(ModelError::input("log-prob temperature must be > 0"));
        }
        let n = batch[0].codes.len();
        if n == 0 || batch.iter().any(|r| r.codes.len() != n) {
            return Err(ModelError::input(
                "image rollouts must all have the same, non-zero number of codes",
            ));
        }
        let k = self.cfg.vq_config.num_embeddings as u32;
        if let Some(c) = batch.iter().flat_map(|r| r.codes.iter()).find(|&&c| c >= k) {
            return Err(ModelError::input(format!(
                "image code {c} ≥ codebook size {k}"
            )));
        }
        let pad = self.pad_token();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|r| r.prompt_ids.clone()).collect();
        let (rows, valid) = left_pad(&prompts, pad);
        let pmax = rows[0].len();
        let guided = match policy {
            CfgLogprobPolicy::Conditional => None,
            CfgLogprobPolicy::GuidedMix { cfg_weight } => Some(cfg_weight),
        };
        let (mut all_rows, mut all_valid) = (rows.clone(), valid.clone());
        if guided.is_some() {
            for (r, v) in rows.iter().zip(&valid) {
                all_rows.push(Self::uncond_row(r, v, pad));
            }
            all_valid.extend(valid.iter().cloned());
        }
        let nb = all_rows.len();
        // Codes 0..n−1 are inputs; the hidden state before code k scores code k (the last n positions of
        // prompt + n−1 codes; METHOD.md §3's off-by-one).
        let inputs: Vec<Vec<u32>> = batch.iter().map(|r| r.codes[..n - 1].to_vec()).collect();
        let mut code_rows = inputs.clone();
        if guided.is_some() {
            code_rows.extend(inputs.iter().cloned());
        }
        let p_emb = self.m.lm.embed(&ids_tensor(&all_rows, &self.device)?)?;
        let emb = if n > 1 {
            let c = self.code_embeddings(&ids_tensor(&code_rows, &self.device)?)?;
            Tensor::cat(&[p_emb, c.to_dtype(self.dtype)?], 1)?
        } else {
            p_emb
        };
        for v in all_valid.iter_mut() {
            v.extend(std::iter::repeat_n(true, n - 1));
        }
        let (h, _) = self
            .m
            .lm
            .forward(&emb, &all_valid, &self.m.lm.empty_cache(nb))?;
        let h = h.narrow(1, pmax - 1, n)?;
        let logits = self.gen_head(&h)?;
        let logits = match guided {
            None => logits,
            Some(w) => {
                let lc = logits.narrow(0, 0, b)?;
                let lu = logits.narrow(0, b, b)?;
                (&lu + ((lc - &lu)? * w)?)?
            }
        };
        let logp = log_softmax_last(&(logits / temperature)?)?;
        let flat: Vec<u32> = batch.iter().flat_map(|r| r.codes.iter().copied()).collect();
        let tgt = Tensor::from_vec(flat, (b, n, 1), &self.device)?;
        let lp = logp.gather(&tgt, D::Minus1)?.squeeze(D::Minus1)?;
        let ent = if entropy {
            let l = logp.detach();
            Some((l.exp()? * &l)?.sum(D::Minus1)?.neg()?)
        } else {
            None
        };
        Ok((lp, ent))
    }

    /// Paths the checkpoint folder layout uses (for callers that copy checkpoints).
    pub fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "patch_codebook.safetensors",
        ]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect()
    }

    /// Which image tokenizer this checkpoint generates with.
    pub fn image_tokenizer_kind(&self) -> ImageTokenizerKind {
        self.cfg.pairuni.image_tokenizer
    }
}

/// The noise of a sampled static decode's draws ([`Janus::static_decode_loop`]).
struct StepNoise<'a> {
    /// The noise, which also keys the draw kernel's.
    noise: &'a mut GumbelNoise,
    /// Classes per row: the noise buffer's width.
    classes: usize,
    /// Whether the draws keep to a top-p nucleus.
    nucleus: bool,
}

/// Replaces a graph report slot's content (a poisoned slot is left as it is: reports are diagnostics).
fn write_report(slot: &Mutex<Option<GraphReport>>, report: Option<GraphReport>) {
    if let Ok(mut r) = slot.lock() {
        *r = report;
    }
}

/// A graph report slot's content (`None` if it is empty or poisoned).
fn read_report(slot: &Mutex<Option<GraphReport>>) -> Option<GraphReport> {
    slot.lock().map(|r| r.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::packing_pays;

    #[test]
    fn packing_is_chosen_for_short_answers_and_not_for_many_long_ones() {
        // The benchmark's group: a 608-token prompt and 8 answers of 64 (63 fed tokens each).
        assert!(packing_pays(1, 608 + 8 * 63, 8, 608, 64));
        // 16 answers of 256 after the same prompt: the packed row's scores would be 5.6 times the cached form's.
        assert!(!packing_pays(1, 608 + 16 * 255, 16, 608, 256));
        // One-token answers feed nothing: the packed row is the prompt itself.
        assert!(packing_pays(2, 30, 6, 30, 1));
    }
}
