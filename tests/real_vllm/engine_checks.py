"""What the real-engine distill tests compare: the engine's greedy answers against transformers' on the trainer's
own weights, on the trainer's own prompts."""

from __future__ import annotations

from typing import Any

import torch

from vopd_train.rollout_vllm import vllm_request

NEW_TOKENS = 8


def vllm_greedy(engine: Any, prompts: list) -> list[list[int]]:
    """The engine's greedy answers (the engine's own stop ids and banned vision tokens)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=engine.eos_ids,
                            bad_words=engine.bad_words or None, detokenize=False)
    outs = engine.llm.generate([vllm_request(p) for p in prompts], sampling_params=params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(model: Any, processor: Any, engine: Any, prompts: list) -> list[list[int]]:
    """transformers' greedy answers on `model` as it is now (a PEFT model with its adapter on), one prompt at a
    time, cut after the first stop id as vLLM cuts."""
    bad = [[processor.tokenizer.convert_tokens_to_ids(w)] for w in engine.bad_words]
    answers = []
    was_training = model.training
    model.eval()
    try:
        for p in prompts:
            inputs = {**{k: v[None] for k, v in p.tokens.items()}, **p.vision}
            with torch.no_grad():
                seq = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, bad_words_ids=bad or None,
                                     eos_token_id=engine.eos_ids, pad_token_id=processor.tokenizer.pad_token_id,
                                     temperature=None, top_p=None, top_k=None)
            ids = seq[0, p.input_ids.shape[0]:].tolist()
            end = next((j + 1 for j, t in enumerate(ids) if t in engine.eos_ids), len(ids))
            answers.append(ids[:end])
    finally:
        model.train(was_training)
    return answers


def rollout_logprob_gaps(engine: Any, model: Any, prompts: list, settings: Any) -> dict[str, float]:
    """Sample rollouts with the engine and score them with transformers on `model`: the largest difference
    between vLLM's log-prob of a sampled token (after the temperature and the ban on vision tokens: what it
    sampled from) and transformers' over the same renormalised distribution, and the mean log-ratio of the
    unbanned distribution (the trainer's π_θ) to vLLM's: the importance weight's log on a token."""
    rollouts = engine.generate(prompts, settings)
    banned = sorted(engine.vision_ids)
    worst, ratios = 0.0, []
    was_training = model.training
    model.eval()
    try:
        for r in rollouts:
            p = prompts[r.prompt_index]
            ids = torch.tensor([r.token_ids])
            n = p.input_ids.shape[0]
            inputs = {k: torch.cat([v[None], ids if k == "input_ids" else torch.full_like(ids, 1 if k ==
                                    "attention_mask" else 0)], 1) for k, v in p.tokens.items()}
            with torch.no_grad():
                logits = model(**inputs, **p.vision).logits[0, n - 1:n - 1 + len(r.token_ids)].float()
            logits = logits / settings.temperature
            free = torch.log_softmax(logits, -1)
            logits[:, banned] = float("-inf")
            kept = torch.log_softmax(logits, -1)
            at = torch.arange(len(r.token_ids))
            vl = torch.tensor(r.logprobs)
            worst = max(worst, float((kept[at, r.token_ids] - vl).abs().max()))
            ratios.append(free[at, r.token_ids] - vl)
    finally:
        model.train(was_training)
    return {"max_abs_diff_renormalised": worst, "mean_log_ratio_unbanned": float(torch.cat(ratios).mean())}
