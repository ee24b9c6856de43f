//! A teacher behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama…).
//!
//! Each exchange: render a versioned template, attach the image as a base64 PNG data URL, look the request up
//! in the [`TeacherCache`], and only on a miss send it — with a timeout, and retries with exponential backoff
//! and jitter on timeouts, connection errors, 429 and 5xx. The reply is cached the moment it arrives, before
//! it is parsed, so a reply that does not parse is still never paid for twice. The API key is read from the
//! environment variable the config names and lives only in memory.

use super::cache::{cache_key, CachedReply, TeacherCache};
use super::parse::{parse_caption, parse_question, parse_verdict};
use super::templates::{Template, Templates};
use super::{Completion, Failure, Sample, Teacher, TeacherInput, Verdict};
use crate::config::TeacherConfig;
use crate::error::{PairsError, Result};
use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counters of what the HTTP teacher did, for the stats file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HttpCounters {
    /// HTTP requests sent (including retries).
    pub requests: usize,
    /// Exchanges answered from the cache.
    pub cache_hits: usize,
    /// Requests retried after a timeout, connection error, 429 or 5xx.
    pub retries: usize,
    /// Exchanges that got no reply after every retry.
    pub gave_up: usize,
}

/// The OpenAI-compatible teacher.
pub struct HttpTeacher {
    url: String,
    model: String,
    api_key: Option<String>,
    temperature: f64,
    max_retries: u32,
    backoff_s: f64,
    agent: ureq::Agent,
    templates: Templates,
    cache: TeacherCache,
    requests: AtomicUsize,
    cache_hits: AtomicUsize,
    retries: AtomicUsize,
    gave_up: AtomicUsize,
}

impl HttpTeacher {
    /// Builds the client; reads the API key from the variable named by `cfg.api_key_env` (absent → no key).
    pub fn new(cfg: &TeacherConfig, templates: Templates, cache: TeacherCache) -> Result<Self> {
        if cfg.timeout_s <= 0.0 || !cfg.timeout_s.is_finite() {
            return Err(PairsError::Config(format!(
                "teacher.timeout_s must be > 0, got {}",
                cfg.timeout_s
            )));
        }
        let api_key = if cfg.api_key_env.is_empty() {
            None
        } else {
            match std::env::var(&cfg.api_key_env) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => {
                    tracing::warn!(variable = %cfg.api_key_env, "API key variable unset; sending no Authorization header");
                    None
                }
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            url: format!("{}/chat/completions", cfg.base_url.trim_end_matches('/')),
            model: cfg.model.clone(),
            api_key,
            temperature: cfg.temperature,
            max_retries: cfg.max_retries,
            backoff_s: cfg.backoff_s.max(0.0),
            agent,
            templates,
            cache,
            requests: AtomicUsize::new(0),
            cache_hits: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            gave_up: AtomicUsize::new(0),
        })
    }

    /// What the teacher has done so far.
    pub fn http_counters(&self) -> HttpCounters {
        HttpCounters {
            requests: self.requests.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
        }
    }

    /// One cached exchange: the reply text, or why there is none usable.
    fn exchange(
        &self,
        template: &Template,
        text: &str,
        image: &Path,
        attempt: u32,
    ) -> Result<std::result::Result<String, Failure>> {
        let (png, image_hash) = png_bytes(image)?;
        let seed = attempt.to_string();
        let temperature = format!("{}", self.temperature);
        let key = cache_key(&[
            self.model.as_bytes(),
            template.name.as_bytes(),
            template.version.as_bytes(),
            temperature.as_bytes(),
            seed.as_bytes(),
            text.as_bytes(),
            image_hash.as_bytes(),
        ]);
        if let Some(hit) = self.cache.get(&key)? {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(reply_text(hit));
        }
        let data_url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&png)
        );
        // The seed makes each retry after a failed verification a distinct request (and reproducible where
        // the server honours it).
        let body = serde_json::json!({
            "model": self.model,
            "temperature": self.temperature,
            "seed": attempt,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": data_url}}
                ]
            }]
        })
        .to_string();
        let mut jitter = ChaCha8Rng::seed_from_u64(u64::from_le_bytes(
            hex::decode(&key[..16])
                .expect("hex key")
                .try_into()
                .expect("8 bytes"),
        ));
        let mut last_err = String::new();
        for try_no in 0..=self.max_retries {
            if try_no > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
                let base = self.backoff_s * 2f64.powi(try_no as i32 - 1);
                let wait = base * (1.0 + 0.5 * jitter.random::<f64>());
                tracing::debug!(try_no, wait, error = %last_err, "teacher retry");
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .agent
                .post(&self.url)
                .header("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            let mut resp = match req.send(body.as_str()) {
                Ok(r) => r,
                Err(e) => {
                    last_err = format!("transport: {e}");
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let body_text = match resp.body_mut().read_to_string() {
                Ok(t) => t,
                Err(e) => {
                    last_err = format!("reading reply: {e}");
                    continue;
                }
            };
            if status == 429 || status >= 500 {
                last_err = format!("http status {status}");
                continue;
            }
            if status != 200 {
                // 4xx other than 429 will not get better by retrying (bad key, bad request).
                self.gave_up.fetch_add(1, Ordering::Relaxed);
                return Ok(Err(Failure::Unavailable(format!(
                    "http status {status}: {}",
                    snippet(&body_text)
                ))));
            }
            let reply = match extract_content(&body_text) {
                Some(content) => CachedReply {
                    text: content,
                    well_formed: true,
                },
                None => CachedReply {
                    text: body_text,
                    well_formed: false,
                },
            };
            self.cache
                .put(&key, &self.model, &template.version, &reply)?;
            return Ok(reply_text(reply));
        }
        self.gave_up.fetch_add(1, Ordering::Relaxed);
        Ok(Err(Failure::Unavailable(format!(
            "no reply after {} tries: {last_err}",
            self.max_retries + 1
        ))))
    }
}

/// A strict parser of one kind of reply.
type ReplyParser = fn(&str) -> std::result::Result<Completion, String>;

fn reply_text(r: CachedReply) -> std::result::Result<String, Failure> {
    if r.well_formed {
        Ok(r.text)
    } else {
        Err(Failure::Unparseable {
            message: "reply is not a chat-completions response".into(),
            raw: r.text,
        })
    }
}

fn snippet(s: &str) -> String {
    s.chars().take(200).collect()
}

/// `choices[0].message.content` of a chat-completions response body.
fn extract_content(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("choices")?
        .get(0)?
        .get("message")?
        .get("content")?
        .as_str()
        .map(str::to_string)
}

/// The image as PNG bytes (re-encoded when the file is another format) and the sha256 of the file.
fn png_bytes(path: &Path) -> Result<(Vec<u8>, String)> {
    let bytes = std::fs::read(path).map_err(|e| PairsError::io(path, e))?;
    let hash = hex::encode(Sha256::digest(&bytes));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok((bytes, hash));
    }
    let img = image::load_from_memory(&bytes).map_err(|e| PairsError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| PairsError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok((out.into_inner(), hash))
}

fn options_inline(options: &[String]) -> String {
    options
        .iter()
        .enumerate()
        .map(|(i, o)| format!("{}. {}", (b'A' + i as u8) as char, o))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Teacher for HttpTeacher {
    fn describe(&self) -> String {
        let t = &self.templates;
        format!(
            "openai-compatible model={} templates=[{}, {}, {}, {}]",
            self.model,
            t.caption.version,
            t.question.version,
            t.verify_caption.version,
            t.verify_question.version
        )
    }

    fn counters(&self) -> serde_json::Value {
        serde_json::to_value(self.http_counters()).expect("plain struct")
    }

    fn complete(
        &self,
        input: &TeacherInput<'_>,
    ) -> Result<std::result::Result<Completion, Failure>> {
        let (template, text, parse): (_, _, ReplyParser) = match input.sample {
            Sample::Understanding(s) => (
                &self.templates.caption,
                self.templates
                    .caption
                    .render(&[("question", &s.question), ("answer", &s.answer)])?,
                parse_caption,
            ),
            Sample::Generation(s) => (
                &self.templates.question,
                self.templates.question.render(&[("prompt", &s.prompt)])?,
                parse_question,
            ),
        };
        Ok(self
            .exchange(template, &text, &input.image, input.attempt)?
            .and_then(|raw| parse(&raw).map_err(|message| Failure::Unparseable { message, raw })))
    }

    fn verify(
        &self,
        input: &TeacherInput<'_>,
        completion: &Completion,
    ) -> Result<std::result::Result<Verdict, Failure>> {
        let t = &self.templates;
        let (template, text) = match (input.sample, completion) {
            (Sample::Understanding(s), Completion::Caption(c)) => (
                &t.verify_caption,
                t.verify_caption.render(&[
                    ("question", &s.question),
                    ("answer", &s.answer),
                    ("caption", c),
                ])?,
            ),
            (Sample::Generation(s), Completion::Question(q)) => (
                &t.verify_question,
                t.verify_question.render(&[
                    ("prompt", &s.prompt),
                    ("completion_question", &q.question),
                    ("completion_options", &options_inline(&q.options)),
                    ("completion_answer", &q.answer),
                ])?,
            ),
            _ => {
                return Ok(Ok(Verdict::Reject(
                    "completion kind does not match the sample's pool".into(),
                )))
            }
        };
        Ok(self
            .exchange(template, &text, &input.image, input.attempt)?
            .and_then(|raw| {
                parse_verdict(&raw).map_err(|message| Failure::Unparseable { message, raw })
            }))
    }
}
