"""Encoded prompts, the rollout interface, and the padded sequences both models score.

A prompt is run through the processor once per step; its tensors serve all n rollouts and, for the teacher,
the crop's tensors serve all n teacher sequences. Rollouts come from any `RolloutEngine`: `HFRolloutEngine`
uses transformers `generate`; a vLLM engine implements the same two methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from vopd_bench.modeling import chat_text, encode, vision_token_ids
from vopd_train.sampling import generate_options


@dataclass
class EncodedPrompt:
    """One prompt's processor outputs, unpadded. `text` is the chat-formatted prompt, `image` the view image
    (engines that preprocess on their own, like vLLM, take these two)."""

    input_ids: Tensor  # [L]
    mm_token_type_ids: Tensor  # [L]
    pixel_values: Tensor  # [patches, D]
    image_grid_thw: Tensor  # [1, 3]
    text: str
    image: Image.Image


def encode_prompts(processor: Any, images: Sequence[Image.Image], texts: Sequence[str]) -> list[EncodedPrompt]:
    """One batched processor call, split back into per-prompt tensors."""
    if not images:
        return []
    enc = encode(processor, images, texts)
    mask = enc["attention_mask"].bool()
    mm = enc.get("mm_token_type_ids")
    if mm is None:  # older processors: derive it from the image token
        image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        mm = (enc["input_ids"] == image_id).long()
    sizes = enc["image_grid_thw"].prod(-1).tolist()
    pixels = torch.split(enc["pixel_values"], sizes)
    chats = [chat_text(processor, t) for t in texts]
    return [EncodedPrompt(enc["input_ids"][i][mask[i]], mm[i][mask[i]], pixels[i], enc["image_grid_thw"][i:i + 1],
                          chats[i], images[i])
            for i in range(len(images))]


def collate_left(prompts: Sequence[EncodedPrompt], pad_id: int) -> dict[str, Tensor]:
    """Left-padded generation inputs (every row continues from its own end)."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    mm = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, width - n:], att[i, width - n:], mm[i, width - n:] = p.input_ids, 1, p.mm_token_type_ids
    return {"input_ids": ids, "attention_mask": att, "mm_token_type_ids": mm,
            "pixel_values": torch.cat([p.pixel_values for p in prompts]),
            "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts])}


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 1024
    prompt_seeds: tuple[int, ...] | None = None  # one per prompt: batch-invariant sampling (vopd_train.sampling)


@dataclass
class Rollout:
    prompt_index: int
    token_ids: list[int]  # the response, its final EOS included when it stopped
    logprobs: list[float] | None = None  # log π_rollout of each token, when the engine reports them


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[EncodedPrompt], settings: SamplingSettings) -> list[Rollout]:
        """`settings.n` rollouts per prompt, prompt-major: rollout j of prompt i at index i·n + j."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Called after every optimizer update; an in-process engine shares the weights and does nothing."""
        ...


class HFRolloutEngine:
    """Sampling with transformers `generate` on the training model itself (so `sync_weights` is a no-op).

    Vision special tokens are never sampled (drawing one breaks the image-token count); the prompt's tensors are
    repeated n times instead of being re-encoded.
    """

    def __init__(self, model: Any, processor: Any):
        self.model = model
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.bad_words = [[i] for i in vision_token_ids(processor)] or None

    def generate(self, prompts: Sequence[EncodedPrompt], settings: SamplingSettings) -> list[Rollout]:
        if not prompts:
            return []
        device = _device_of(self.model)
        repeated = [p for p in prompts for _ in range(settings.n)]
        inputs = {k: v.to(device) for k, v in collate_left(repeated, self.pad_id).items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), _autocast(device):
                if settings.n > 1 and _generate_accepts_encoder_outputs(self.model):
                    # each prompt's image through the vision tower once, its features shared by its n rollouts
                    from transformers.modeling_outputs import BaseModelOutputWithPooling

                    feats = backbone(self.model).get_image_features(
                        torch.cat([p.pixel_values for p in prompts]).to(device),
                        torch.cat([p.image_grid_thw for p in prompts]).to(device)).pooler_output
                    inputs.pop("pixel_values")
                    inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                        pooler_output=[feats[i // settings.n] for i in range(len(repeated))])}
                out = self.model.generate(**inputs, **generate_options(settings.prompt_seeds, settings.n,
                                                                       settings.temperature),
                                          max_new_tokens=settings.max_new_tokens,
                                          bad_words_ids=self.bad_words, pad_token_id=self.pad_id)
        finally:
            self.model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [Rollout(i // settings.n, self._trim(row)) for i, row in enumerate(new)]

    def _trim(self, row: list[int]) -> list[int]:
        """Up to and including the first EOS; rows that finished early are padded after it (pitfall 8)."""
        for j, t in enumerate(row):
            if t in self.eos_ids:
                return row[:j + 1]
        return row

    def sync_weights(self, model: Any) -> None:
        return None


@dataclass
class SeqBatch:
    """Prompt + response sequences, right-padded, with where each response token sits.

    `rows[k], pos[k]` is the position whose hidden state predicts response token k (flat over the batch, in
    sequence order): the position just before it.
    """

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    mm_token_type_ids: Tensor  # [B, L]: the prompt's, then zeros over the response (pitfall 3)
    image_grid_thw: Tensor  # [B, 3] one image per sequence
    prompt_pixels: list[Tensor]  # per distinct prompt
    prompt_grid: Tensor  # [P, 3]
    seq_prompt: list[int]  # sequence -> index into prompt_pixels
    rows: Tensor  # [N]
    pos: Tensor  # [N]
    targets: Tensor  # [N] the response tokens
    lengths: Tensor  # [B] response lengths

    def to(self, device: Any) -> SeqBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        moved["prompt_pixels"] = [p.to(device) for p in self.prompt_pixels]
        return SeqBatch(**moved)


def build_sequences(prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], seq_prompt: Sequence[int],
                    pad_id: int) -> SeqBatch:
    """Sequence k = prompts[seq_prompt[k]] followed by responses[k]. Only the prompts used are kept."""
    used = sorted(set(seq_prompt))
    remap = {p: i for i, p in enumerate(used)}
    width = max(len(prompts[p].input_ids) + len(r) for p, r in zip(seq_prompt, responses, strict=True))
    b = len(responses)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    mm = torch.zeros((b, width), dtype=torch.long)
    rows, pos, targets = [], [], []
    for k, (p, r) in enumerate(zip(seq_prompt, responses, strict=True)):
        pr = prompts[p]
        n = len(pr.input_ids)
        ids[k, :n], mm[k, :n] = pr.input_ids, pr.mm_token_type_ids
        ids[k, n:n + len(r)] = torch.tensor(list(r), dtype=torch.long)
        att[k, :n + len(r)] = 1
        rows += [k] * len(r)
        pos += range(n - 1, n - 1 + len(r))
        targets += list(r)
    return SeqBatch(
        input_ids=ids, attention_mask=att, mm_token_type_ids=mm,
        image_grid_thw=torch.cat([prompts[p].image_grid_thw for p in seq_prompt]),
        prompt_pixels=[prompts[p].pixel_values for p in used],
        prompt_grid=torch.cat([prompts[p].image_grid_thw for p in used]),
        seq_prompt=[remap[p] for p in seq_prompt],
        rows=torch.tensor(rows, dtype=torch.long), pos=torch.tensor(pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
    )


def backbone(model: Any) -> Any:
    """The transformer under the LM head (through a PEFT wrapper, whose LoRA layers are injected in place)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.model


def lm_head(model: Any) -> Any:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.get_output_embeddings()


def head_fn(model: Any):
    """The LM head as a function of hidden states, under the same autocast as the forward (bf16 on a GPU)."""
    head = lm_head(model)

    def apply(h: Tensor) -> Tensor:
        with _autocast(h.device):
            return head(h)

    return apply


def response_hidden(model: Any, batch: SeqBatch, vision_once: bool = True) -> Tensor:
    """Final hidden states `[N, H]` at the positions that predict the response tokens.

    The forward passes input_ids, mm_token_type_ids and image_grid_thw with no cache, so the M-RoPE positions
    are recomputed for these sequences (never the stale `rope_deltas` a previous `generate` left behind). With
    `vision_once`, each distinct image goes through the vision tower once and its features serve every sequence
    of that prompt (gradients from all of them add up in the tower).
    """
    base = backbone(model)
    kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
                                  use_cache=False)
    device = batch.input_ids.device
    with _autocast(device):
        if vision_once and _accepts_encoder_outputs(base):
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            feats = base.get_image_features(torch.cat(batch.prompt_pixels), batch.prompt_grid).pooler_output
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                pooler_output=[feats[i] for i in batch.seq_prompt])}
        else:
            kwargs["pixel_values"] = torch.cat([batch.prompt_pixels[i] for i in batch.seq_prompt])
        hidden = base(**kwargs).last_hidden_state
    return hidden[batch.rows, batch.pos]


def _accepts_encoder_outputs(base: Any) -> bool:
    import inspect

    try:
        return "mm_encoder_outputs" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _generate_accepts_encoder_outputs(model: Any) -> bool:
    check = getattr(model, "_supports_mm_encoder_outputs", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # noqa: BLE001 - a model that cannot say is treated as one that does not
        return False


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: Any):
    """bf16 autocast on a GPU; a no-op elsewhere (CPU runs in float32)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
