//! Text tokenizer (Hugging Face `tokenizers`) and the prompt templates.
//!
//! Real checkpoints ship a `tokenizer.json`; the toy model builds a word-level one (Whitespace pre-tokenizer) from the
//! toy world's vocabulary with a fixed block of special tokens first, so ids of the specials never move. Templates
//! assemble prompts from separately encoded pieces plus special ids, so the image placeholder run and the
//! begin-of-image token are exact whatever the tokenizer's merges do.

use std::collections::BTreeSet;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::janus_config::{JanusConfig, PromptTemplate};

/// Toy special tokens, in id order.
pub const TOY_SPECIALS: [&str; 8] = [
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<image>",
    "<begin_of_image>",
    "<end_of_image>",
    "<sep>",
];
/// Toy `<pad>` id.
pub const TOY_PAD: u32 = 0;
/// Toy `<bos>` id.
pub const TOY_BOS: u32 = 1;
/// Toy `<eos>` id.
pub const TOY_EOS: u32 = 2;
/// Toy `<image>` (understanding placeholder) id.
pub const TOY_IMAGE: u32 = 4;
/// Toy `<begin_of_image>` id.
pub const TOY_BOI: u32 = 5;
/// Toy `<sep>` id (ends an understanding prompt).
pub const TOY_SEP: u32 = 7;

/// The text tokenizer plus the special ids the templates and samplers need.
#[derive(Clone)]
pub struct TextTokenizer {
    /// The underlying Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// Padding id (also the unconditional CFG filler).
    pub pad: u32,
    /// Begin-of-sequence id.
    pub bos: u32,
    /// End-of-sequence id (stops answers).
    pub eos: u32,
    /// Understanding image placeholder id.
    pub image: u32,
    /// Begin-of-image id.
    pub boi: u32,
    /// End-of-image id.
    pub eoi: u32,
    /// Toy separator id (None for Janus-Pro).
    pub sep: Option<u32>,
    /// Template used by `understanding_prompt` / `generation_prompt`.
    pub template: PromptTemplate,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Builds the word-level toy tokenizer: the 8 specials, then each distinct word of `words` in order.
pub fn build_toy_tokenizer(words: &[String]) -> Result<Tokenizer> {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, s) in TOY_SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), serde_json::json!(i));
        added.push(serde_json::json!({
            "id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    let mut seen: BTreeSet<&str> = TOY_SPECIALS.iter().copied().collect();
    for w in words {
        let w = w.trim();
        if w.is_empty() || w.chars().any(char::is_whitespace) {
            return Err(ModelError::input(format!(
                "toy vocabulary word `{w}` is empty or contains whitespace"
            )));
        }
        if seen.insert(w) {
            let id = vocab.len();
            vocab.insert(w.to_string(), serde_json::json!(id));
        }
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(tok_err)
}

impl TextTokenizer {
    /// Wraps the toy tokenizer.
    pub fn toy(inner: Tokenizer) -> Self {
        Self {
            inner,
            pad: TOY_PAD,
            bos: TOY_BOS,
            eos: TOY_EOS,
            image: TOY_IMAGE,
            boi: TOY_BOI,
            eoi: 6,
            sep: Some(TOY_SEP),
            template: PromptTemplate::Toy,
        }
    }

    /// Loads `tokenizer.json` and finds the special ids for `cfg`'s template.
    pub fn load(path: &Path, cfg: &JanusConfig) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer(inner, cfg, &path.display().to_string())
    }

    /// Finds the special ids of `inner` for `cfg`'s template; `origin` names the file in errors.
    pub fn from_tokenizer(inner: Tokenizer, cfg: &JanusConfig, origin: &str) -> Result<Self> {
        match cfg.pairuni.template {
            PromptTemplate::Toy => {
                for (i, s) in TOY_SPECIALS.iter().enumerate() {
                    if inner.token_to_id(s) != Some(i as u32) {
                        return Err(ModelError::Tokenizer(format!(
                            "{origin}: toy tokenizer must have `{s}` at id {i}"
                        )));
                    }
                }
                Ok(Self::toy(inner))
            }
            PromptTemplate::JanusPro => {
                let find = |names: &[&str], fallback: Option<u32>| -> Result<u32> {
                    names
                        .iter()
                        .find_map(|n| inner.token_to_id(n))
                        .or(fallback)
                        .ok_or_else(|| {
                            ModelError::Tokenizer(format!("{origin}: no token among {names:?}"))
                        })
                };
                let t = &cfg.text_config;
                Ok(Self {
                    pad: find(&["<｜▁pad▁｜>", "<pad>"], t.pad_token_id)?,
                    bos: find(&["<｜begin▁of▁sentence｜>", "<bos>", "<s>"], t.bos_token_id)?,
                    eos: find(&["<｜end▁of▁sentence｜>", "<eos>", "</s>"], t.eos_id())?,
                    image: find(&["<image_placeholder>"], Some(cfg.image_token_id))?,
                    boi: find(&["<begin_of_image>"], None)?,
                    eoi: find(&["<end_of_image>"], None)?,
                    sep: None,
                    template: PromptTemplate::JanusPro,
                    inner,
                })
            }
        }
    }

    /// Plain tokens of `text`, no specials added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let ids = enc.get_ids().to_vec();
        if self.template == PromptTemplate::Toy {
            // Unknown words silently become <unk> in a word-level vocabulary; say which word instead.
            if let Some(pos) = ids.iter().position(|&i| i == 3) {
                let word = enc.get_tokens().get(pos).cloned().unwrap_or_default();
                return Err(ModelError::Tokenizer(format!(
                    "word `{word}` of `{text}` is not in the toy vocabulary"
                )));
            }
        }
        Ok(ids)
    }

    /// Text of `ids` with special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Understanding prompt with `n_image` placeholder slots.
    pub fn understanding_prompt(&self, question: &str, n_image: usize) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        match self.template {
            PromptTemplate::Toy => {
                ids.extend(std::iter::repeat_n(self.image, n_image));
                ids.extend(self.encode(question)?);
                ids.push(self.sep.unwrap_or(TOY_SEP));
            }
            PromptTemplate::JanusPro => {
                ids.extend(self.encode("<|User|>: ")?);
                ids.push(self.boi);
                ids.extend(std::iter::repeat_n(self.image, n_image));
                ids.push(self.eoi);
                ids.extend(self.encode(&format!("\n{question}\n\n<|Assistant|>:"))?);
            }
        }
        Ok(ids)
    }

    /// Generation prompt ending with begin-of-image.
    pub fn generation_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        match self.template {
            PromptTemplate::Toy => ids.extend(self.encode(prompt)?),
            PromptTemplate::JanusPro => {
                ids.extend(self.encode(&format!("<|User|>: {prompt}\n\n<|Assistant|>:"))?)
            }
        }
        ids.push(self.boi);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Vec<String> {
        "how many red circles are there ? 2 3 yes no circle square red"
            .split(' ')
            .map(String::from)
            .collect()
    }

    #[test]
    fn toy_tokenizer_ids_and_templates() {
        let t = TextTokenizer::toy(build_toy_tokenizer(&words()).unwrap());
        // 8 specials + 13 distinct words ("red" repeats).
        assert_eq!(t.inner.get_vocab_size(true), 8 + 13);
        let q = t.encode("how many red circles are there?").unwrap();
        assert_eq!(q.len(), 7);
        assert_eq!(t.decode(&q).unwrap(), "how many red circles are there ?");
        let p = t.understanding_prompt("how many red circles ?", 4).unwrap();
        assert_eq!(
            p[..5],
            [TOY_BOS, TOY_IMAGE, TOY_IMAGE, TOY_IMAGE, TOY_IMAGE]
        );
        assert_eq!(*p.last().unwrap(), TOY_SEP);
        let g = t.generation_prompt("red circle").unwrap();
        assert_eq!(g.len(), 4);
        assert_eq!((g[0], g[3]), (TOY_BOS, TOY_BOI));
        let e = t.encode("purple circle").unwrap_err().to_string();
        assert!(e.contains("purple"), "{e}");
        assert!(build_toy_tokenizer(&["a b".to_string()]).is_err());
    }
}
