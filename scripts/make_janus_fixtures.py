#!/usr/bin/env python3
"""Build the tiny Janus parity fixtures in tests/fixtures/janus/ from the real transformers implementation.

The Rust tests in crates/pairuni-model compare our candle Janus (LLaMA decoder, vision encoder + aligner,
generation embedding/aligner/head, VQ tokenizer) against these numbers. CI never runs this script: its
outputs are committed. Run it again only when the fixture design changes:

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fx/bin/python scripts/make_janus_fixtures.py            # writes tests/fixtures/janus/
    /tmp/fx/bin/python scripts/make_janus_fixtures.py --out DIR  # somewhere else

Everything is seeded (torch.manual_seed and explicit generators), CPU only, so a rerun with the pinned versions
reproduces the files. Reference outputs are computed in float64 from the float32 weights and stored as float32, so
the Rust f32 result is compared against a value more accurate than torch's own f32 run. See docs/FIXTURES.md for
every tensor's meaning.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import JanusConfig, JanusForConditionalGeneration

SEED = 20261128

# Janus-Pro's special tokens, in our tiny tokenizer's first ids.
SPECIALS = [
    "<｜begin▁of▁sentence｜>",  # 0 bos
    "<｜end▁of▁sentence｜>",  # 1 eos
    "<｜▁pad▁｜>",  # 2 pad
    "<image_placeholder>",  # 3 image placeholder (config.image_token_id)
    "<begin_of_image>",  # 4
    "<end_of_image>",  # 5
]
BOS, EOS, PAD, IMAGE, BOI, EOI = range(6)
VOCAB = 300

IMAGE_SIZE = 32  # pixels, both for the vision encoder and the VQ
PATCH = 4  # vision patch: (32/4)^2 = 64 understanding tokens
VQ_GRID = 8  # VQ downsamples 4x (3 resolutions): 8x8 = 64 codes
N_IMG_TOKENS = VQ_GRID * VQ_GRID
TEXT_HIDDEN = 64


def build_config() -> JanusConfig:
    text = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so the Rust side exercises the kv repeat
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        mlp_ratio=4.0,
        attention_bias=True,
        projection_dim=TEXT_HIDDEN,  # the aligner maps into the LLM width
        use_qk_norm=False,
        depth=2,
        num_image_tokens=N_IMG_TOKENS,
    )
    vq = dict(
        embed_dim=8,
        num_embeddings=64,
        double_latent=False,
        latent_channels=32,
        in_channels=3,
        # GroupNorm has 32 groups, so every width is a multiple of 32; the 64-wide level gives 2 channels per
        # group so a wrong grouping shows up, and the 32<->64 changes exercise both nin_shortcut directions.
        base_channels=32,
        channel_multiplier=[1, 2, 1],
        num_res_blocks=1,
        dropout=0.0,
        out_channels=3,
        projection_dim=TEXT_HIDDEN,  # gen_aligner output and gen_head inner width
        num_hidden_layers=2,
        hidden_act="gelu",
        image_token_embed_dim=TEXT_HIDDEN,
    )
    cfg = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=IMAGE,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


def reinit_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace the 0.02-std init by one that keeps activations O(1) so the parity checks are not vacuous."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.split(".")[-2]
            if is_norm and p.dim() == 1:
                if leaf == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name and p.dim() == 2 and "patch" not in name:
                # token/position/generation embeddings and the VQ codebook
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def toy_images(gen: torch.Generator) -> torch.Tensor:
    """Two 32x32 RGB u8 images, [2, 32, 32, 3]: uniform noise, and flat-colour rectangles on a background."""
    noise = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=gen, dtype=torch.int64)
    rects = torch.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.int64)
    rects[:] = torch.tensor([230, 225, 210])
    rects[4:14, 6:20] = torch.tensor([200, 30, 40])
    rects[18:30, 12:28] = torch.tensor([30, 60, 190])
    rects[8:24, 24:30] = torch.tensor([40, 170, 60])
    return torch.stack([noise, rects]).to(torch.uint8)


def to_pixel_values(images_u8: torch.Tensor) -> torch.Tensor:
    """Janus' preprocessing in f32: x/255 (rescale) then (x - 0.5) / 0.5; HWC -> CHW."""
    x = images_u8.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    x = (x - 0.5) / 0.5
    return x.permute(0, 3, 1, 2).contiguous()


def write_tokenizer(out: Path) -> int:
    """Tiny byte-level BPE tokenizer.json with Janus-Pro's special tokens as ids 0..5; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "a red circle left of a blue square",
        "what color is the triangle? answer: green",
        "is there a cat in the image? yes",
        "generate an image of two yellow squares",
        "the quick brown fox jumps over the lazy dog",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok.get_vocab_size()


def write_janus_pro_shapes(out: Path) -> int:
    """Every weight name and shape of a Janus-Pro-1B-sized model (METHOD.md §5), built on the meta device.

    Lets the Rust loaders check that they ask for exactly the names and shapes of a real checkpoint without
    storing one. transformers' JanusConfig defaults are the Janus-Pro-1B architecture except the LLaMA part.
    """
    text = dict(
        model_type="llama",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    cfg = JanusConfig(text_config=text, tie_word_embeddings=False)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(cfg)
    shapes = {k: list(v.shape) for k, v in sorted(model.state_dict().items())}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items()]
    (out / "janus_pro_1b_shapes.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return len(shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/janus"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)

    cfg = build_config()
    model = JanusForConditionalGeneration(cfg).eval()
    reinit_(model, gen)
    model.save_pretrained(out, safe_serialization=True)
    ref = copy.deepcopy(model).double().eval()

    t: dict[str, torch.Tensor] = {}

    # (a) understanding: image + text -> text logits
    images_u8 = toy_images(gen)
    pixel_values = to_pixel_values(images_u8)
    prefix = [BOS, 20, 41, 7, 99, BOI]
    suffix = [EOI, 55, 120, 9, 250, 31]
    ids = []
    for b in range(2):
        pre = list(prefix)
        pre[1] += 7 * b  # the two rows differ in text too
        ids.append(pre + [IMAGE] * N_IMG_TOKENS + suffix)
    input_ids = torch.tensor(ids, dtype=torch.int64)
    with torch.no_grad():
        o = ref(input_ids=input_ids, pixel_values=pixel_values.double(), use_cache=False)
        t["und.input_ids"] = input_ids
        t["und.images_u8"] = images_u8
        t["und.pixel_values"] = pixel_values
        t["und.logits"] = o.logits.float()
        lm = ref.model(input_ids=input_ids, pixel_values=pixel_values.double(), use_cache=False)
        t["und.last_hidden_state"] = lm.last_hidden_state.float()

        # (b) vision features
        vis = ref.model.vision_model(pixel_values.double())
        t["vision.last_hidden_state"] = vis.last_hidden_state.float()
        t["vision.image_embeds"] = ref.model.aligner(vis.last_hidden_state).float()

        # (c) generation: prompt token embeddings, then gen_embed -> gen_aligner of the codes, one causal pass.
        prompt = torch.tensor([[BOS, 12, 77, 130, 8, BOI], [BOS, 200, 3 + 60, 45, 19, BOI]], dtype=torch.int64)
        codes = torch.randint(0, cfg.vq_config.num_embeddings, (2, N_IMG_TOKENS), generator=gen)
        p_emb = ref.model.language_model.embed_tokens(prompt)
        c_emb = ref.prepare_embeddings_for_image_generation(codes)
        emb = torch.cat([p_emb, c_emb], dim=1)
        h = ref.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state
        t["gen.prompt_ids"] = prompt
        t["gen.codes"] = codes
        t["gen.code_embeds"] = c_emb.float()
        t["gen.last_hidden_state"] = h.float()
        t["gen.logits"] = ref.model.generation_head(h).float()

        # (d) VQ encode
        vq = ref.model.vqmodel
        enc = vq.encode(pixel_values.double(), return_dict=True)
        z = vq.quant_conv(vq.encoder(pixel_values.double()))
        zf = z.permute(0, 2, 3, 1).reshape(-1, cfg.vq_config.embed_dim)
        d = torch.cdist(zf, vq.quantize.embedding.weight)
        two = d.topk(2, largest=False).values
        margin = (two[:, 1] - two[:, 0]).min().item()
        # The encoded images are und.pixel_values (not stored twice).
        t["vq.encode_latent"] = z.float()
        t["vq.encode_codes"] = enc.image_tokens.view(2, -1).to(torch.int64)
        assert torch.equal(enc.image_tokens.view(-1), d.argmin(dim=1))

        # (e) VQ decode
        dcodes = torch.randint(0, cfg.vq_config.num_embeddings, (2, N_IMG_TOKENS), generator=gen)
        t["vq.decode_codes"] = dcodes
        t["vq.decode_pixels"] = vq.decode(dcodes).float()
        # Round trip of (d) for a second decode check that uses encoder-chosen codes.
        t["vq.roundtrip_pixels"] = vq.decode(t["vq.encode_codes"]).float()

    save_file({k: v.contiguous() for k, v in sorted(t.items())}, str(out / "fixtures.safetensors"))

    # Sharded copy of the same weights, in transformers' index layout (2 shards).
    shard_dir = out / "sharded"
    shard_dir.mkdir(exist_ok=True)
    for f in shard_dir.iterdir():
        f.unlink()
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(shard_dir, safe_serialization=True, max_shard_size=f"{(total // 2 + 65536) // 1000}KB")
    # Only the index is kept: the two shard files would double the fixture size, and the Rust test rebuilds them
    # from ../model.safetensors by following this index's weight_map (tensor bytes are identical).
    for f in shard_dir.iterdir():
        if f.name != "model.safetensors.index.json":
            f.unlink()
    index = json.loads((shard_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ], index["weight_map"].values()

    vocab = write_tokenizer(out)
    n_real = write_janus_pro_shapes(out)

    stats = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sorted(t.items())}
    print(json.dumps(stats, indent=1))
    for k in ["und.logits", "vision.image_embeds", "gen.logits", "vq.decode_pixels", "vq.encode_latent"]:
        v = t[k]
        print(f"{k}: std {v.std().item():.4f} max|x| {v.abs().max().item():.4f}")
    print(f"vq encode: min distance margin between best and second code = {margin:.5f}")
    print(f"tokenizer vocab {vocab}; params {sum(p.numel() for p in model.parameters())}; Janus-Pro-1B names {n_real}")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{os.path.getsize(f):>9}  {f.relative_to(out)}")


if __name__ == "__main__":
    main()
