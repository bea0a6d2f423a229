"""Encoded prompts, the rollout interface, and the padded sequences both models score.

The input layer is family-agnostic: an encoded prompt is whatever the model's own processor returned for it,
split into per-token tensors (aligned with `input_ids`) and vision tensors (everything else). Appending a
response extends every per-token tensor with text values; the vision tensors travel with their sequence;
batches are built from the keys the processor produced. What differs between families lives in
`vopd_bench.families`.

A prompt is run through the processor once per step; its tensors serve all n rollouts and, for the teacher,
the crop's tensors serve all n teacher sequences. Rollouts come from any `RolloutEngine`: `HFRolloutEngine`
uses transformers `generate`; a vLLM engine implements the same two methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from vopd_bench.errors import VopdError
from vopd_bench.families import GENERIC, Family, family_of
from vopd_bench.modeling import chat_text, encode, first_line, say_once, vision_token_ids
from vopd_train.prefill import (
    continue_from_prefill,
    detached_cache,
    generate_from_shared_prefill,
    why_not_prefilled_once,
)
from vopd_train.sampling import generate_options


@dataclass
class EncodedPrompt:
    """One prompt as its processor returned it, unpadded.

    `tokens`: every output aligned with the token sequence, each `[L]`: `input_ids`, `attention_mask` and any
    per-token mask the processor adds (`mm_token_type_ids`, `token_type_ids`, …).
    `vision`: every other tensor, exactly as the processor returned it for this prompt alone (`pixel_values`,
    `image_grid_thw`, `image_sizes`, `pixel_attention_mask`, …; leading dimension = this prompt's images,
    patches or rows).
    `text` is the chat-formatted prompt and `image` the view image: engines that preprocess on their own (vLLM)
    take these two.
    """

    tokens: dict[str, Tensor]
    vision: dict[str, Tensor]
    text: str
    image: Image.Image

    @property
    def input_ids(self) -> Tensor:
        return self.tokens["input_ids"]

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])


def encode_prompts(processor: Any, images: Sequence[Image.Image], texts: Sequence[str],
                   family: Family | None = None) -> list[EncodedPrompt]:
    """Each prompt with exactly the tensors the processor makes for it alone: unpadded, owning its pixels.

    With a `family` that knows how to cut a batch's vision tensors per prompt (`Family.split_vision`), every
    prompt goes through the processor in one call (one image-processor pass, one tokenizer pass, each distinct
    text templated once) and the batch is cut apart; otherwise one call per prompt, which needs no rule at all."""
    try:
        if family is not None and len(images) > 1:
            batched = _encode_batched(processor, images, texts, family)
            if batched is not None:
                return batched
            say_once(f"encode-per-prompt:{family.name}", f"{family.name} models: one processor call per prompt "
                     "(vopd has no rule yet to cut a batched call's vision tensors per prompt; slower, same tensors)")
        return [encode_one(processor, image, text) for image, text in zip(images, texts, strict=True)]
    except Exception as e:  # noqa: BLE001 - a processor outside the standard API: one line, no traceback
        raise unsupported(type(processor).__name__, "encode its prompts", e) from e


def _encode_batched(processor: Any, images: Sequence[Image.Image], texts: Sequence[str],
                    family: Family) -> list[EncodedPrompt] | None:
    """One processor call for all prompts, cut into per-prompt tensors; None where the family cannot cut it."""
    if family.split_vision is None:
        return None
    chat = {t: chat_text(processor, t) for t in dict.fromkeys(texts)}
    enc = processor(text=[chat[t] for t in texts], images=[[im] for im in images], return_tensors="pt",
                    padding=True)
    tokens, vision = _split_outputs(enc)
    parts = family.split_vision(vision, len(images))
    if parts is None:
        return None
    out = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        own = _unpadded({k: v[i] for k, v in tokens.items()})
        out.append(EncodedPrompt(own, parts[i], chat[text], image))
    return out


def _split_outputs(enc: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A processor's outputs as per-token tensors (shaped like `input_ids`) and vision tensors (the rest)."""
    ids = enc["input_ids"]
    tokens: dict[str, Tensor] = {}
    vision: dict[str, Tensor] = {}
    for key, value in enc.items():
        if not isinstance(value, Tensor):
            continue  # metadata lists some processors add; the model reads only tensors
        (tokens if value.shape == ids.shape else vision)[key] = value
    return tokens, vision


def _unpadded(tokens: dict[str, Tensor]) -> dict[str, Tensor]:
    """One row's per-token tensors without the batch's padding (wherever the processor put it)."""
    ids = tokens["input_ids"]
    keep = tokens["attention_mask"].bool() if "attention_mask" in tokens else torch.ones_like(ids, dtype=torch.bool)
    tokens = {k: v[keep] for k, v in tokens.items()}
    tokens.setdefault("attention_mask", torch.ones_like(tokens["input_ids"]))
    return tokens


def unsupported(model: str, what: str, e: BaseException) -> VopdError:
    """The run-level error when a model's own code cannot do what training needs: which model, what, and why."""
    return VopdError(f"{model} cannot {what} in vopd distill ({type(e).__name__}: {first_line(e)})")


def encode_one(processor: Any, image: Image.Image, text: str) -> EncodedPrompt:
    tokens, vision = _split_outputs(encode(processor, [image], [text]))
    return EncodedPrompt(_unpadded({k: v[0] for k, v in tokens.items()}), vision, chat_text(processor, text), image)


def collate_vision(parts: Sequence[Mapping[str, Tensor]], family: Family = GENERIC) -> dict[str, Tensor]:
    """Concatenate per-prompt vision tensors along their first dimension. Where sizes differ beyond it (more
    anyres patches, more image splits, larger pixels), pad to the largest as the processors do in a batch: with
    zeros (padded pixels and masks the model drops), or the family's own pad value."""
    out: dict[str, Tensor] = {}
    for key in parts[0] if parts else ():
        tensors = [p[key] for p in parts]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        pad = family.vision_pad.get(key, 0)
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape:
                grown = t.new_full((t.shape[0], *shape), pad)
                grown[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
                t = grown
            padded.append(t)
        out[key] = torch.cat(padded)
    return out


def _pad_value(key: str, pad_id: int) -> int:
    return pad_id if key == "input_ids" else 0


def collate_left(prompts: Sequence[EncodedPrompt], pad_id: int, family: Family = GENERIC) -> dict[str, Tensor]:
    """Left-padded generation inputs (every row continues from its own end), with the prompts' vision tensors."""
    width = max(len(p) for p in prompts)
    out: dict[str, Tensor] = {}
    for key, first in prompts[0].tokens.items():
        t = torch.full((len(prompts), width), _pad_value(key, pad_id), dtype=first.dtype)
        for i, p in enumerate(prompts):
            t[i, width - len(p):] = p.tokens[key]
        out[key] = t
    out.update(collate_vision([p.vision for p in prompts], family))
    return out


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

    Vision special tokens are never sampled (drawing one breaks the image-token count). With `prefix_sharing`,
    where the family allows it (`vopd_train.prefill`), each prompt is prefilled once, its image through the vision
    tower once, and its n rollouts decode from that cache. Otherwise the prompt's tensors are repeated n times
    instead of being re-encoded, and where the family has a vision-once path each prompt's image goes through the
    vision tower once for its n rollouts. Both paths draw the same tokens under per-row seeds.
    """

    def __init__(self, model: Any, processor: Any, prefix_sharing: bool = True):
        self.model = model
        self.prefix_sharing = prefix_sharing
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.family = model_family(model)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.bad_words = [[i] for i in vision_token_ids(processor, _config(model))] or None
        self.reuse: Any = None  # a `vopd_train.reuse.PrefillReuse`: the student's prefill serves the rollouts

    def generate(self, prompts: Sequence[EncodedPrompt], settings: SamplingSettings) -> list[Rollout]:
        if not prompts:
            return []
        device = _device_of(self.model)
        options = {**generate_options(settings.prompt_seeds, settings.n, settings.temperature),
                   "max_new_tokens": settings.max_new_tokens, "bad_words_ids": self.bad_words,
                   "pad_token_id": self.pad_id}
        inputs = None  # the prompts, each once, left padded
        reused = None  # the student's own prefill of the prompts (with gradient), where the trainer reuses it
        if self.reuse is not None:
            inputs = _to(collate_left(prompts, self.pad_id, self.family), device)
            why = self.reuse.why_not(prompts, inputs)
            if why is None:
                reused = self.reuse.prefill(prompts, inputs)
            else:
                say_once(f"reuse:{why}", f"{why}: the rollouts and the student's forward each prefill the prompts "
                         "(slower, same result)")
        once = None  # the prompts, each once, where their rollouts share its prefill
        if reused is None and self.prefix_sharing and settings.n > 1:
            once = inputs if inputs is not None else _to(collate_left(prompts, self.pad_id, self.family), device)
            reason = why_not_prefilled_once(getattr(_config(self.model), "model_type", None), once)
            if reason is not None:
                once = None
                say_once(f"prefill-once:{reason}", f"{reason}: each rollout prefills its own copy of the prompt "
                         "(slower, same samples)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), _autocast(device):
                if reused is not None:
                    out = continue_from_prefill(self.model, backbone(self.model), reused.tokens,
                                                detached_cache(reused.cache), reused.deltas, settings.n, **options)
                elif once is not None:
                    out = generate_from_shared_prefill(self.model, backbone(self.model), once, set(prompts[0].tokens),
                                                       settings.n, **options)
                else:
                    out = self._generate_repeated(prompts, settings.n, device, options)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise unsupported(_model_name(self.model), "sample rollouts", e) from e
        finally:
            self.model.train(was_training)
        new = out[:, max(len(p) for p in prompts):].tolist()
        return [Rollout(i // settings.n, self._trim(row)) for i, row in enumerate(new)]

    def _generate_repeated(self, prompts: Sequence[EncodedPrompt], n: int, device: torch.device,
                           options: dict[str, Any]) -> Tensor:
        """The plain path: every prompt repeated n times, prefilled once per rollout."""
        repeated = [p for p in prompts for _ in range(n)]
        why_not = why_no_vision_once(self.model, self.family, generate=True) if n > 1 else None
        shared = n > 1 and why_not is None
        if why_not:
            _say_no_vision_once(self.family, why_not)
        inputs = collate_left(repeated, self.pad_id, self.family)
        if shared:  # the pixels go in once per prompt below, not once per rollout
            inputs = {k: v for k, v in inputs.items() if k not in self.family.tower_inputs}
        inputs = _to(inputs, device)
        if shared:
            feats = self.family.vision_once(backbone(self.model), _to(collate_vision(
                [p.vision for p in prompts], self.family), device))
            inputs["mm_encoder_outputs"] = {"image": per_sequence(feats, [i // n for i in range(len(repeated))])}
        return self.model.generate(**inputs, **options)

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

    `tokens` holds every per-token tensor `[B, L]` (the prompt's values, then text values over the response:
    pitfall 3); `prompt_vision[seq_prompt[k]]` is sequence k's vision tensors (one entry per distinct prompt, so
    the vision-once path can encode each image once). `rows[k], pos[k]` is the position whose hidden state
    predicts response token k (flat over the batch, in sequence order): the position just before it.
    """

    tokens: dict[str, Tensor]
    prompt_vision: list[dict[str, Tensor]]
    seq_prompt: list[int]
    rows: Tensor  # [N]
    pos: Tensor  # [N]
    targets: Tensor  # [N] the response tokens
    lengths: Tensor  # [B] response lengths
    family: Family = GENERIC

    @property
    def input_ids(self) -> Tensor:
        return self.tokens["input_ids"]

    @property
    def attention_mask(self) -> Tensor:
        return self.tokens["attention_mask"]

    def vision(self) -> dict[str, Tensor]:
        """Every sequence's vision tensors, in sequence order (the plain path: an image per sequence)."""
        return collate_vision([self.prompt_vision[i] for i in self.seq_prompt], self.family)

    def to(self, device: Any) -> SeqBatch:
        """The model's inputs on `device`. The bookkeeping (`rows`, `pos`, `lengths`) stays on the host, where it
        is read: reading it back from a GPU would wait for the GPU in every micro-batch; indexing a GPU tensor
        with it copies it over without waiting."""
        return SeqBatch(_to(self.tokens, device), [_to(v, device) for v in self.prompt_vision], self.seq_prompt,
                        self.rows, self.pos, self.targets.to(device), self.lengths, self.family)


def build_sequences(prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], seq_prompt: Sequence[int],
                    pad_id: int, family: Family = GENERIC) -> SeqBatch:
    """Sequence k = prompts[seq_prompt[k]] followed by responses[k]. Only the prompts used are kept."""
    used = sorted(set(seq_prompt))
    remap = {p: i for i, p in enumerate(used)}
    width = max(len(prompts[p]) + len(r) for p, r in zip(seq_prompt, responses, strict=True))
    b = len(responses)
    tokens = {key: torch.full((b, width), _pad_value(key, pad_id), dtype=t.dtype)
              for key, t in prompts[seq_prompt[0]].tokens.items()}
    rows, pos, targets = [], [], []
    for k, (p, r) in enumerate(zip(seq_prompt, responses, strict=True)):
        pr = prompts[p]
        n = len(pr)
        for key, t in tokens.items():
            t[k, :n] = pr.tokens[key]
            t[k, n:n + len(r)] = (torch.tensor(list(r), dtype=t.dtype) if key == "input_ids"
                                  else 1 if key == "attention_mask" else family.text_value(key))
        rows += [k] * len(r)
        pos += range(n - 1, n - 1 + len(r))
        targets += list(r)
    return SeqBatch(
        tokens=tokens, prompt_vision=[prompts[p].vision for p in used], seq_prompt=[remap[p] for p in seq_prompt],
        rows=torch.tensor(rows, dtype=torch.long), pos=torch.tensor(pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in responses], dtype=torch.long), family=family,
    )


def per_sequence(features: Any, index: Sequence[int]) -> Any:
    """A vision tower's output for P images, re-indexed to one entry per sequence: every field that holds one
    tensor per image (`pooler_output`, and per layer `deepstack_features`) is picked by `index`; the unsplit
    fields (`last_hidden_state`, …) are dropped, as no forward reads them."""
    fields = {}
    for name, value in features.items():
        if _per_image(value):
            fields[name] = [value[i] for i in index]
        elif isinstance(value, (list, tuple)) and value and all(_per_image(v) for v in value):
            fields[name] = [[v[i] for i in index] for v in value]
    return type(features)(**fields)


def _per_image(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Tensor) for v in value)


def model_family(model: Any) -> Family:
    """The `vopd_bench.families` entry of a (possibly PEFT-wrapped) model."""
    return family_of(_config(model))


def _model_name(model: Any) -> str:
    config = _config(model)
    return f"{getattr(config, 'model_type', None) or type(model).__name__} models"


def _config(model: Any) -> Any:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, "config", None)


def backbone(model: Any) -> Any:
    """The transformer under the LM head (through a PEFT wrapper, whose LoRA layers are injected in place)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.model


def lm_head(model: Any) -> Any:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.get_output_embeddings()


def head_fn(model: Any):
    """The LM head as a function of hidden states, under the same autocast as the forward (bf16 on a GPU).

    Under FSDP it calls the head's `forward` without the unit's hooks: the loss gathers the head once and applies
    it chunk by chunk (`fsdp.gathered_heads`), which the hooks would turn into one collective per chunk."""
    from torch.distributed.fsdp import FSDPModule

    head = lm_head(model)
    call = head.forward if isinstance(head, FSDPModule) else head

    def apply(h: Tensor) -> Tensor:
        with _autocast(h.device):
            return call(h)

    return apply


def response_hidden(model: Any, batch: SeqBatch, vision_once: bool = True) -> Tensor:
    """Final hidden states `[N, H]` at the positions that predict the response tokens.

    The forward gets every per-token tensor and the sequences' vision tensors, with no cache, so positions that
    depend on the image layout (Qwen's M-RoPE) are recomputed for these sequences (never the stale
    `rope_deltas` a previous `generate` left behind). With `vision_once`, where the family has that path, each
    distinct image goes through the vision tower once and its features serve every sequence of that prompt
    (gradients from all of them add up in the tower); elsewhere every sequence carries its own pixels.
    """
    base = backbone(model)
    family = model_family(model)
    kwargs: dict[str, Any] = {**batch.tokens, "use_cache": False}
    device = batch.input_ids.device
    with _autocast(device):
        why_not = why_no_vision_once(model, family) if vision_once else None
        if vision_once and not why_not:
            feats = family.vision_once(base, collate_vision(batch.prompt_vision, family))
            kwargs["mm_encoder_outputs"] = {"image": per_sequence(feats, batch.seq_prompt)}
            kwargs.update({k: v for k, v in batch.vision().items() if k not in family.tower_inputs})
        else:
            if why_not and len(batch.seq_prompt) > len(batch.prompt_vision):
                _say_no_vision_once(family, why_not)
            kwargs.update(batch.vision())
        try:
            hidden = base(**kwargs).last_hidden_state
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise unsupported(_model_name(model), "score sequences", e) from e
    return hidden[batch.rows, batch.pos]


def why_no_vision_once(model: Any, family: Family, generate: bool = False) -> str | None:
    """None when each prompt's image can go through the vision tower once for all its sequences (the forward,
    or with `generate` the generation loop, takes the tower's outputs); otherwise why not."""
    if family.vision_once is None:
        return f"{family.name} models have no vision-once path in vopd (it is built for the Qwen-VL families)"
    accepts = _generate_accepts_encoder_outputs(model) if generate else _accepts_encoder_outputs(backbone(model))
    if not accepts:
        import transformers

        return (f"transformers {transformers.__version__}'s {type(backbone(model)).__name__} takes no precomputed "
                "image features (`mm_encoder_outputs`; a later release does)")
    return None


def _say_no_vision_once(family: Family, why: str) -> None:
    say_once(f"vision-once:{family.name}",
             f"{why}, so each rollout's copy of a prompt's image goes through the vision tower separately "
             "(slower, same result)")


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


def _to(tensors: Mapping[str, Tensor], device: Any) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: Any):
    """bf16 autocast on a GPU; a no-op elsewhere (CPU runs in float32)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
