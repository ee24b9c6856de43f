#!/usr/bin/env python3
"""One PairGRPO step in PyTorch + transformers (eager, no torch.compile) at Janus-Pro-1B shapes, random weights.

The baseline that `pairuni bench gpu-step` is compared against (scripts/device-bench.sh runs both on the same
card). The step matches docs/GPU.md and METHOD.md section 3 (beta = 0, mu = 1, conditional log-prob policy,
per-modality token mean):

  rollout_image  pairs x group CFG image rollouts: cond + uncond rows with a KV cache, logits mixed
                 l_u + w (l_c - l_u), one code sampled from softmax(l / T) and fed to both rows (written by hand:
                 transformers 5.17's generate(generation_mode="image") crashes)
  rollout_text   pairs x group answers of `answer_tokens` tokens to a question about a 384 px image
  decode_vq      VQ-decode every sampled image
  train          teacher-forced log-probs of both sides, GRPO loss, backward, AdamW on the language model

Prints one JSON object with the time breakdown in ms (same keys as `pairuni bench gpu-step --json`).
`--tiny` runs the same code at toy shapes on CPU for testing.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, JanusConfig, JanusForConditionalGeneration


def janus_config(tiny: bool) -> JanusConfig:
    """Janus-Pro-1B architecture (or a toy of the same structure); weights are random either way."""
    if tiny:
        text = dict(
            model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False,
        )
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                      projection_dim=64, num_image_tokens=16)
        # Five levels as in Janus (16x upsampling), so a 4x4 code grid decodes to the 64 px image size.
        vq = dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2, 2, 4],
                  num_res_blocks=1, latent_channels=32, projection_dim=64, image_token_embed_dim=64)
        image_token_id = 1000
    else:
        text = dict(
            model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=5632, vocab_size=102400, max_position_embeddings=16384,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        )
        vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16,
                      projection_dim=2048, num_image_tokens=576)
        vq = dict(embed_dim=8, num_embeddings=16384, projection_dim=2048, image_token_embed_dim=2048)
        image_token_id = 100581
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=False)


class Timer:
    """Wall-clock phases in ms; synchronises the device so that asynchronous kernels are counted."""

    def __init__(self, device):
        self.device = device
        self.ms = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def phase(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                timer.sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.ms[name] = timer.ms.get(name, 0.0) + (time.perf_counter() - self.t0) * 1e3

        return _Phase()


def sample(logits, temperature, gen):
    """Samples one token per row from softmax(logits / T) in f32; returns (tokens [B], log-probs [B])."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@torch.no_grad()
def rollout_images(model, prompt_ids, pad_id, cfg_weight, temperature, n_codes, gen):
    """CFG image rollouts: prompt_ids [B, P] (ends with begin-of-image) -> codes [B, N], cond log-probs [B, N]."""
    lm = model.model.language_model
    b = prompt_ids.shape[0]
    uncond = prompt_ids.clone()
    uncond[:, 1:-1] = pad_id
    ids = torch.cat([prompt_ids, uncond], dim=0)  # rows [0, B) conditional, [B, 2B) unconditional
    embeds = lm.embed_tokens(ids)
    cache = DynamicCache()
    codes = torch.empty(b, n_codes, dtype=torch.long, device=ids.device)
    logps = torch.empty(b, n_codes, dtype=torch.float32, device=ids.device)
    for k in range(n_codes):
        out = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = model.model.generation_head(out.last_hidden_state[:, -1, :]).float()
        cond, unc = logits[:b], logits[b:]
        mixed = unc + cfg_weight * (cond - unc)
        tok, _ = sample(mixed, temperature, gen)
        codes[:, k] = tok
        # Stored log-prob is the conditional branch's (the default CfgLogprobPolicy::Conditional).
        logps[:, k] = torch.log_softmax(cond / temperature, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        embeds = model.prepare_embeddings_for_image_generation(torch.cat([tok, tok])[:, None])
    return codes, logps


@torch.no_grad()
def rollout_text(model, prompt_ids, pixel_values, n_tokens, temperature, image_token_id, gen):
    """Answers of exactly n_tokens tokens (no stop: every row does the same work in both implementations)."""
    b = prompt_ids.shape[0]
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, pixel_values=pixel_values, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    answer = torch.empty(b, n_tokens, dtype=torch.long, device=prompt_ids.device)
    logps = torch.empty(b, n_tokens, dtype=torch.float32, device=prompt_ids.device)
    for t in range(n_tokens):
        logits = out.logits[:, -1, :].float()
        # The image placeholder id is never a valid answer token (teacher forcing would read it as an image slot).
        logits[:, image_token_id] = float("-inf")
        tok, lp = sample(logits, temperature, gen)
        answer[:, t] = tok
        logps[:, t] = lp
        if t + 1 < n_tokens:
            out = model(input_ids=tok[:, None], past_key_values=out.past_key_values, use_cache=True,
                        logits_to_keep=1)
    return answer, logps


def grpo_token_loss(new_logp, old_logp, adv, eps_low=0.2, eps_high=0.28):
    """Clipped surrogate per token: -min(rho A, clip(rho) A); [B, T]."""
    rho = torch.exp(new_logp - old_logp)
    a = adv[:, None]
    return -torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)


def group_advantages(rewards, group):
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def image_logprobs(model, prompt_ids, codes, temperature):
    """Teacher-forced conditional log-probs of each code: read at the position BEFORE the code."""
    lm = model.model.language_model
    p = prompt_ids.shape[1]
    emb = torch.cat([lm.embed_tokens(prompt_ids), model.prepare_embeddings_for_image_generation(codes[:, :-1])], 1)
    h = lm(inputs_embeds=emb, use_cache=False).last_hidden_state[:, p - 1:, :]
    logits = model.model.generation_head(h).float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, codes[..., None]).squeeze(-1)


def answer_logprobs(model, prompt_ids, pixel_values, answer, temperature):
    p = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, answer[:, :-1]], 1)
    h = model.model(input_ids=ids, pixel_values=pixel_values, use_cache=False).last_hidden_state[:, p - 1:, :]
    logits = model.lm_head(h).float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, answer[..., None]).squeeze(-1)


def run_step(model, opt, cfg, args, device, gen, n_codes, timer):
    """One PairGRPO step; phases accumulate into timer.ms."""
    tc = cfg.text_config
    b = args.pairs * args.group
    vocab = tc.vocab_size
    low = 10  # keep clear of special ids at the bottom of the vocabulary
    text_hi = min(cfg.image_token_id, vocab) - 1
    # Prompts: one per pair, repeated `group` times. Fixed lengths so no padding masks are needed on either side.
    gen_prompt = torch.randint(low, text_hi, (args.pairs, args.prompt_len), generator=gen, device=device)
    gen_prompt[:, 0] = 1  # BOS
    gen_prompt[:, -1] = 2  # begin-of-image stand-in
    gen_prompt = gen_prompt.repeat_interleave(args.group, 0)
    n_img = cfg.vision_config.num_image_tokens
    q = torch.randint(low, text_hi, (args.pairs, args.question_len), generator=gen, device=device)
    q[:, 0] = 1
    und_prompt = torch.cat([q[:, :4], torch.full((args.pairs, n_img), cfg.image_token_id, device=device), q[:, 4:]], 1)
    und_prompt = und_prompt.repeat_interleave(args.group, 0)
    size = cfg.vision_config.image_size
    pixels = torch.rand(args.pairs, 3, size, size, generator=gen, device=device) * 2 - 1
    pixels = pixels.to(model.dtype).repeat_interleave(args.group, 0)

    model.eval()
    with timer.phase("rollout_image"):
        codes, img_old = rollout_images(model, gen_prompt, args.pad_id, args.cfg_weight, args.temperature, n_codes, gen)
    with timer.phase("rollout_text"):
        answer, txt_old = rollout_text(model, und_prompt, pixels, args.answer_tokens, args.temperature, cfg.image_token_id, gen)
    with timer.phase("decode_vq"):
        with torch.no_grad():
            images = model.decode_image_tokens(codes)
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    # Rewards would come from the reward models; random here (their cost is not part of this benchmark).
    r_img = torch.rand(b, generator=gen, device=device)
    r_txt = (torch.rand(b, generator=gen, device=device) > 0.5).float()
    a_img = group_advantages(r_img, args.group)
    a_txt = group_advantages(r_txt, args.group)

    model.train()
    with timer.phase("train"):
        opt.zero_grad(set_to_none=True)
        mb = args.micro_batch
        n_img_tok = b * n_codes
        n_txt_tok = b * args.answer_tokens
        for s in range(0, b, mb):
            sl = slice(s, s + mb)
            lp = image_logprobs(model, gen_prompt[sl], codes[sl], args.temperature)
            loss = grpo_token_loss(lp, img_old[sl], a_img[sl]).sum() / n_img_tok
            loss.backward()
        for s in range(0, b, mb):
            sl = slice(s, s + mb)
            lp = answer_logprobs(model, und_prompt[sl], pixels[sl], answer[sl], args.temperature)
            loss = grpo_token_loss(lp, txt_old[sl], a_txt[sl]).sum() / n_txt_tok
            loss.backward()
        opt.step()
    return images


def profile_decode(model, cfg, args, device, gen):
    """Wall time against summed GPU-kernel time of the image rollout's decode steps (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    b = args.pairs * args.group
    tc = cfg.text_config
    prompt = torch.randint(10, min(cfg.image_token_id, tc.vocab_size) - 1, (b, args.prompt_len), generator=gen,
                           device=device)
    n = args.profile_decode
    timer = Timer(device)
    model.eval()
    rollout_images(model, prompt, args.pad_id, args.cfg_weight, args.temperature, n, gen)
    timer.sync()
    t0 = time.perf_counter()
    rollout_images(model, prompt, args.pad_id, args.cfg_weight, args.temperature, n, gen)
    timer.sync()
    wall = (time.perf_counter() - t0) * 1e3 / n
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        rollout_images(model, prompt, args.pad_id, args.cfg_weight, args.temperature, n, gen)
        timer.sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "impl": "pytorch", "profile_decode_steps": n, "rows": 2 * b,
        "wall_ms_per_step": round(wall, 3),
        "gpu_kernel_ms_per_step": round(sum(by_name.values()) / 1e3 / n, 3),
        "kernels_per_step": round(len(kernels) / n, 1),
        "top_kernels_ms_per_step": {k[:80]: round(v / 1e3 / n, 4) for k, v in top},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes (for testing on CPU)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--group", type=int, default=8, help="rollouts per task")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="generation prompt length incl. begin-of-image")
    ap.add_argument("--question-len", type=int, default=32, help="question tokens around the image slots")
    ap.add_argument("--image-tokens", type=int, default=None, help="cap the image rollout length (default: all)")
    ap.add_argument("--cfg-weight", type=float, default=5.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--pad-id", type=int, default=100002)
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward in the train step")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation: sdpa | eager")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps before the timed one")
    ap.add_argument("--warmup-codes", type=int, default=None,
                    help="image tokens of a warm-up step (default: as many as the timed step). A training run "
                         "repeats the same shapes every step, so the timed step must not pay for first-time "
                         "work per shape (the first lent call's 8-token warm-up left 84.8 ms per decode step; "
                         "warmed at the same lengths, the first 16 steps took 25.6 ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-decode", type=int, default=0, metavar="N",
                    help="instead of the step: N CFG image decode steps under torch.profiler, as one JSON line "
                         "(wall and GPU-kernel ms per step: is eager decode bound by the host or the GPU?)")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = janus_config(args.tiny)
    if args.tiny:
        args.answer_tokens = min(args.answer_tokens, 8)
        args.pad_id = min(args.pad_id, 999)
    cfg._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = JanusForConditionalGeneration(cfg)
    torch.set_default_dtype(prev)
    model.to(device=device, dtype=dtype)
    init_ms = (time.perf_counter() - t0) * 1e3
    # Only the language model trains (vision encoder, VQ, aligners and generation head are frozen).
    for p in model.parameters():
        p.requires_grad_(False)
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    for p in lm_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lm_params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    if args.profile_decode:
        print(json.dumps(profile_decode(model, cfg, args, device, gen)))
        return

    grid = cfg.vq_config.num_patches
    full_codes = grid * grid
    n_codes = min(args.image_tokens or full_codes, full_codes)
    if n_codes < full_codes:
        print(f"note: image rollouts capped at {n_codes} of {full_codes} codes; decode_vq pads with code 0",
              file=sys.stderr)

    # The VQ decoder needs all grid*grid codes: a capped (or warm-up) rollout is padded with code 0, so the decode
    # always does the full image's work.
    orig = model.decode_image_tokens

    def padded(codes):
        if codes.shape[1] == full_codes:
            return orig(codes)
        pad = torch.zeros(codes.shape[0], full_codes - codes.shape[1], dtype=codes.dtype, device=codes.device)
        return orig(torch.cat([codes, pad], 1))

    model.decode_image_tokens = padded
    timer = Timer(device)
    warm_ms = {}
    for _ in range(args.warmup):
        warm = Timer(device)
        t_warm = time.perf_counter()
        run_step(model, opt, cfg, args, device, gen, min(args.warmup_codes or n_codes, n_codes), warm)
        warm_ms = dict(warm.ms, total=(time.perf_counter() - t_warm) * 1e3)

    t_step = time.perf_counter()
    images = run_step(model, opt, cfg, args, device, gen, n_codes, timer)
    total = (time.perf_counter() - t_step) * 1e3
    # Proof that the backward reached the language model (the gradients survive until the next zero_grad).
    grads = [p.grad.float().norm() for p in lm_params if p.grad is not None]
    grad_norm = torch.stack(grads).norm().item() if grads else 0.0
    ms = timer.ms
    per_step = ms["rollout_image"] / n_codes
    result = {
        "impl": "pytorch",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shapes": "tiny" if args.tiny else "janus-pro-1b",
        "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn,
        "torch": torch.__version__,
        "pairs": args.pairs,
        "group": args.group,
        "image_tokens": n_codes,
        "image_tokens_full": full_codes,
        "answer_tokens": args.answer_tokens,
        "rollout_image": round(ms["rollout_image"], 1),
        "rollout_text": round(ms["rollout_text"], 1),
        "decode_vq": round(ms["decode_vq"], 1),
        "train": round(ms["train"], 1),
        "total": round(total, 1),
        # A capped rollout is extrapolated to the full image so totals compare.
        "total_full_estimate": round(total + per_step * (full_codes - n_codes), 1),
        "ms_per_image_step": round(per_step, 3),
        "init_ms": round(init_ms, 1),
        # The last warm-up step's phases: the cold numbers, when the warm-up ran at full length.
        "warmup_step": {k: round(v, 1) for k, v in warm_ms.items()},
        "images": list(images.shape),
        "grad_norm": grad_norm,
        "params_with_grad": f"{len(grads)}/{len(lm_params)}",
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
