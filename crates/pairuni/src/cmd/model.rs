//! `pairuni model forward` (raw model outputs as JSON, for checks against other implementations) and
//! `pairuni bench decode` (text and CFG image decode throughput).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use pairuni_model::device::{parse_device, parse_dtype};
use pairuni_model::{
    DType, Device, ImageSampling, Janus, JanusConfig, RgbImage, Tensor, TextSampling,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Arguments of `pairuni model`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ModelCommand {
    /// Print raw model outputs (text logits, generation-head logits, decoded pixels) as JSON.
    #[command(long_about = FORWARD_HELP)]
    Forward(ForwardArgs),
}

const FORWARD_HELP: &str = "\
Loads a checkpoint folder (config.json + model.safetensors or model.safetensors.index.json [+ tokenizer.json]
[+ patch_codebook.safetensors]) and prints, as one JSON object on stdout, the outputs asked for in --input.

Input file (JSON; every section optional):
{
  \"text\":   [ {\"ids\": [0, 20, 3, 3, ...],            // token ids, unpadded; image placeholders included
               \"image\": \"img.png\",                   // optional: image file (relative to the input file), resized
               \"pixel_values\": [[[...]]],             //   or [3][S][S] floats already normalised ((x/255-0.5)/0.5)
               \"last_only\": false } ],                // true: logits of the last position only
  \"gen\":    [ {\"prompt_ids\": [0, 12, 77, 4],         // generation prompt ids (usually ending with begin-of-image)
               \"codes\": [5, 17, ...],                  // image codes that follow the prompt (may be empty)
               \"last_only\": false } ],
  \"decode\": [ [5, 17, ...] ]                          // one code sequence per image (image_tokens_per_image codes)
}
Output: {\"text\": [{\"logits\": [[f32; vocab] per position]}], \"gen\": [{\"logits\": [[f32; codebook] per position]}],
         \"decode\": [{\"pixels\": [3][H][W] floats in [-1, 1] model space, \"rgb_png\": null}]}
text logits = lm_head(LLM(embeddings with the image features scattered into the placeholder run)); gen logits =
generation_head(LLM(prompt embeddings ++ generation_aligner(generation_embeddings(codes)))), one row per input position
(row i scores the token after position i); decode pixels = the image tokenizer's decoder output before clamping.";

/// Arguments of `pairuni model forward`.
#[derive(clap::Args, Debug)]
struct ForwardArgs {
    /// Checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// JSON input file (format in --help).
    #[arg(long)]
    input: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight dtype: f32, bf16 or f16 (logits are always f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct ForwardInput {
    text: Vec<TextItem>,
    gen: Vec<GenItem>,
    decode: Vec<Vec<u32>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TextItem {
    ids: Vec<u32>,
    #[serde(default)]
    image: Option<PathBuf>,
    #[serde(default)]
    pixel_values: Option<Vec<Vec<Vec<f32>>>>,
    #[serde(default)]
    last_only: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct GenItem {
    prompt_ids: Vec<u32>,
    #[serde(default)]
    codes: Vec<u32>,
    #[serde(default)]
    last_only: bool,
}

#[derive(Serialize)]
struct Logits {
    logits: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct Pixels {
    pixels: Vec<Vec<Vec<f32>>>,
}

#[derive(Serialize)]
struct ForwardOutput {
    text: Vec<Logits>,
    gen: Vec<Logits>,
    decode: Vec<Pixels>,
}

/// Runs `pairuni model …`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        ModelCommand::Forward(a) => run_forward(a),
    }
}

fn rows_of(t: &Tensor, last_only: bool) -> anyhow::Result<Vec<Vec<f32>>> {
    let t = t.get(0)?;
    let t = if last_only {
        t.narrow(0, t.dim(0)? - 1, 1)?
    } else {
        t
    };
    Ok(t.to_vec2::<f32>()?)
}

fn run_forward(a: ForwardArgs) -> anyhow::Result<ExitCode> {
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let input: ForwardInput =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let base = a.input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let model = Janus::load(&a.model, &device, dtype)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let mut out = ForwardOutput {
        text: Vec::new(),
        gen: Vec::new(),
        decode: Vec::new(),
    };
    for (i, item) in input.text.iter().enumerate() {
        let px = match (&item.image, &item.pixel_values) {
            (Some(_), Some(_)) => bail!(
                "{}: text[{i}] gives both `image` and `pixel_values`",
                a.input.display()
            ),
            (Some(p), None) => {
                let path = base.join(p);
                let img = image::open(&path)
                    .with_context(|| format!("text[{i}].image: reading {}", path.display()))?
                    .to_rgb8();
                Some(model.preprocess_image(&img)?.unsqueeze(0)?)
            }
            (None, Some(v)) => {
                let t = Tensor::new(v.clone(), &device)
                    .with_context(|| format!("text[{i}].pixel_values must be a [3][S][S] array"))?;
                Some(t.unsqueeze(0)?)
            }
            (None, None) => None,
        };
        let logits = model
            .text_logits(std::slice::from_ref(&item.ids), px.as_ref())
            .with_context(|| format!("text[{i}]"))?;
        out.text.push(Logits {
            logits: rows_of(&logits, item.last_only)?,
        });
    }
    for (i, item) in input.gen.iter().enumerate() {
        let logits = model
            .gen_logits(
                std::slice::from_ref(&item.prompt_ids),
                std::slice::from_ref(&item.codes),
            )
            .with_context(|| format!("gen[{i}]"))?;
        out.gen.push(Logits {
            logits: rows_of(&logits, item.last_only)?,
        });
    }
    if !input.decode.is_empty() {
        let it = model
            .image_tokenizer()
            .context("decode: this checkpoint has no image tokenizer")?;
        let codes = it.codes_to_tensor(&input.decode).context("decode")?;
        let px = it.decode_tensor(&codes).context("decode")?;
        for b in 0..px.dim(0)? {
            out.decode.push(Pixels {
                pixels: px.get(b)?.to_dtype(DType::F32)?.to_vec3::<f32>()?,
            });
        }
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `pairuni bench decode`.
#[derive(clap::Args, Debug)]
pub struct BenchDecodeArgs {
    /// Batch sizes to time (rows decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batch_sizes: Vec<usize>,
    /// New text tokens per row for the toy model (stop tokens are ignored: fixed-length decode).
    #[arg(long, default_value_t = 16)]
    text_tokens: usize,
    /// Also time Janus-Pro-1B shapes with random weights (slow: a few decode steps only).
    #[arg(long)]
    big: bool,
    /// Batch sizes for the 1B shapes.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    big_batch_sizes: Vec<usize>,
    /// Decode steps timed at 1B shapes.
    #[arg(long, default_value_t = 4)]
    big_steps: usize,
    /// Weight dtype of the 1B shapes (f32, bf16 or f16).
    #[arg(long, default_value = "bf16")]
    big_dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of weights and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Serialize)]
struct DecodeRow {
    model: String,
    mode: String,
    batch: usize,
    new_tokens_per_row: usize,
    prefill_s: f64,
    decode_s: f64,
    tokens_per_s: f64,
}

fn bench_scene(rng: &mut ChaCha8Rng) -> RgbImage {
    let mut img = RgbImage::from_pixel(32, 32, image::Rgb([235, 235, 230]));
    for _ in 0..3 {
        let c = [
            rng.next_u32() as u8,
            rng.next_u32() as u8,
            rng.next_u32() as u8,
        ];
        let (x0, y0) = (rng.next_u32() % 24, rng.next_u32() % 24);
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                img.put_pixel(x, y, image::Rgb(c));
            }
        }
    }
    img
}

/// Fixed-length decode loop on the model's public primitives (the samplers' inner loop without early stops).
/// Returns (prefill seconds, decode seconds).
fn time_decode(
    m: &Janus,
    prompts: &[Vec<u32>],
    image_mode: bool,
    steps: usize,
) -> anyhow::Result<(f64, f64)> {
    let b = prompts.len();
    let rows: Vec<Vec<u32>> = if image_mode {
        // cond rows then uncond rows, as in CFG sampling.
        prompts.iter().chain(prompts.iter()).cloned().collect()
    } else {
        prompts.to_vec()
    };
    let n = rows.len();
    let t0 = Instant::now();
    let emb = m.token_embeddings(&rows)?;
    let (h, mut cache) =
        m.decoder_step(&emb, &vec![vec![true; rows[0].len()]; n], &m.empty_cache(n))?;
    let mut last = h.narrow(1, h.dim(1)? - 1, 1)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..steps {
        let next: Vec<u32> = if image_mode {
            let l = m.gen_head(&last)?.squeeze(1)?;
            let (c, u) = (l.narrow(0, 0, b)?, l.narrow(0, b, b)?);
            let mixed = (&u + ((c - &u)? * 5.0)?)?;
            let codes = mixed.argmax(1)?.to_vec1::<u32>()?;
            codes.iter().chain(codes.iter()).copied().collect()
        } else {
            m.text_head(&last)?
                .squeeze(1)?
                .argmax(1)?
                .to_vec1::<u32>()?
        };
        let ids = Tensor::from_vec(next, (n, 1), m.device())?;
        let emb = if image_mode {
            m.code_embeddings(&ids)?.to_dtype(m.dtype())?
        } else {
            m.token_embeddings(&ids.to_vec2::<u32>()?)?
        };
        let (h, c) = m.decoder_step(&emb, &vec![vec![true]; n], &cache)?;
        cache = c.detach();
        last = h.detach();
    }
    Ok((prefill, t1.elapsed().as_secs_f64()))
}

/// Janus-Pro-1B shapes (METHOD.md §5), vision tower reduced to one layer: decode never runs it.
fn janus_pro_1b_shapes() -> JanusConfig {
    let mut c = JanusConfig::from_json_str(
        r#"{"text_config":{"vocab_size":102400,"hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":24,
            "num_attention_heads":16,"num_key_value_heads":16,"max_position_embeddings":16384,
            "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"}},
            "vision_config":{"num_hidden_layers":1}, "tie_word_embeddings": false}"#,
        "<janus-pro-1b shapes>",
    )
    .expect("valid built-in config");
    c.vision_config.num_hidden_layers = 1;
    c
}

/// Runs `pairuni bench decode` and prints one JSON line per measurement.
pub fn run_bench_decode(a: BenchDecodeArgs) -> anyhow::Result<ExitCode> {
    let device: Device = parse_device(&a.device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let words = pairuni_toyworld::text::vocabulary();
    let imgs: Vec<RgbImage> = (0..64).map(|_| bench_scene(&mut rng)).collect();
    let cfg = JanusConfig::toy(words.len() + 8, 512);
    let toy = Janus::new_toy(&cfg, &words, &imgs, a.seed, &device)?;
    let mut rows = Vec::new();
    let question = "How many objects are there ?".to_string();
    let prompt = "a photo of a red circle".to_string();
    for &b in &a.batch_sizes {
        // End-to-end samplers (prefill + sampling + bookkeeping; answers may stop early at eos).
        let s = TextSampling {
            max_new_tokens: a.text_tokens,
            temperature: 1.0,
            top_p: 1.0,
            greedy: false,
        };
        let images: Vec<RgbImage> = (0..b).map(|i| imgs[i % imgs.len()].clone()).collect();
        let t = Instant::now();
        let out = toy.sample_answers(&images, &vec![question.clone(); b], &s, &mut rng)?;
        let secs = t.elapsed().as_secs_f64();
        let toks: usize = out.iter().map(|r| r.answer_ids.len()).sum();
        rows.push(DecodeRow {
            model: "toy".into(),
            mode: "sample_answers (end to end)".into(),
            batch: b,
            new_tokens_per_row: toks / b,
            prefill_s: 0.0,
            decode_s: secs,
            tokens_per_s: toks as f64 / secs,
        });
        let t = Instant::now();
        let out = toy.sample_images(
            &vec![prompt.clone(); b],
            &ImageSampling::default(),
            &mut rng,
        )?;
        let secs = t.elapsed().as_secs_f64();
        let toks: usize = out.iter().map(|r| r.codes.len()).sum();
        rows.push(DecodeRow {
            model: "toy".into(),
            mode: "sample_images cfg (end to end)".into(),
            batch: b,
            new_tokens_per_row: toks / b,
            prefill_s: 0.0,
            decode_s: secs,
            tokens_per_s: toks as f64 / secs,
        });
        print_row(rows.last().expect("pushed"))?;
    }
    if a.big {
        let dtype = parse_dtype(&a.big_dtype)?;
        let cfg = janus_pro_1b_shapes();
        let t = Instant::now();
        let big = Janus::new_random(&cfg, None, None, a.seed, &device, dtype)?;
        tracing::info!(
            "built Janus-Pro-1B shapes ({dtype:?}) in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        for &b in &a.big_batch_sizes {
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|_| (0..16).map(|_| rng.next_u32() % 100_000).collect())
                .collect();
            for image_mode in [false, true] {
                let (pre, dec) = time_decode(&big, &prompts, image_mode, a.big_steps)?;
                rows.push(DecodeRow {
                    model: format!("janus-pro-1b shapes, random, {dtype:?}"),
                    mode: if image_mode {
                        "cfg image decode (2 rows per image)"
                    } else {
                        "text decode"
                    }
                    .into(),
                    batch: b,
                    new_tokens_per_row: a.big_steps,
                    prefill_s: pre,
                    decode_s: dec,
                    tokens_per_s: (b * a.big_steps) as f64 / dec,
                });
                print_row(rows.last().expect("pushed"))?;
            }
        }
    }
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_row(r: &DecodeRow) -> anyhow::Result<()> {
    eprintln!(
        "{:<40} {:<32} batch {:>3}  {:>4} tok/row  {:>9.1} tok/s",
        r.model, r.mode, r.batch, r.new_tokens_per_row, r.tokens_per_s
    );
    Ok(())
}
