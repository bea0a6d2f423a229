"""The `hf` backend: transformers `AutoModelForImageTextToText` + `AutoProcessor`, batched generation."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

from vopd_bench import context
from vopd_bench.attention import ImageAttention, capture_last_row, image_attention
from vopd_bench.backends.base import GenerationConfig, Request, Response, decoding_settings
from vopd_bench.families import family_of
from vopd_bench.modeling import encode, first_line, load_model, resolve_model_path, say_once, vision_token_ids
from vopd_bench.token_grid import token_grid

# Hash whole weight files up to this size; above it, size plus head and tail (a 9B model is 18 GB).
_FULL_HASH_LIMIT = 256 * 2**20


class HFBackend:
    name = "hf"

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, batch_size: int = 16, threads: int | None = None):
        net, processor = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if threads and net.device.type == "cpu":
            import torch

            torch.set_num_threads(threads)
        self._attach(model, net, processor, batch_size)
        self._fingerprint: str | None = None

    def _attach(self, name: str, model, processor, batch_size: int) -> None:
        """Everything but loading: shared by a loaded model and one wrapped as it is (`from_loaded`)."""
        self.model_name, self.model, self.processor = name, model, processor
        self.preferred_batch_size = batch_size
        self._bad_ids = [[i] for i in vision_token_ids(self.processor, self.model.config)]
        self.prompt_length = context.for_model(self.model.config, self.processor)  # the runner checks prompts
        self.capture_focus = False  # --focus: each answer also carries its prompt's attention on the image
        self.batch_splits = 0  # batches that failed and were retried request by request (run.json counts them)
        self.lockstep = False  # see from_loaded
        family = family_of(self.model.config)
        image_processor = getattr(self.processor, "image_processor", None)
        # the most pixels the processor keeps of any image: larger JPEGs may be decoded at a reduced size
        self.view_pixels = family.pixel_budget(image_processor) if family.pixel_budget and image_processor else None

    @classmethod
    def from_loaded(cls, model, processor, *, name: str, batch_size: int = 16, lockstep: bool = False) -> HFBackend:
        """Wrap a model already in memory, as it is now (the trainer evaluates its live model this way: no reload,
        no copy). `name` stands in for the fingerprint: the weights change between calls. `lockstep`: the model
        is sharded over ranks that must all run the same forwards, so a failing batch raises instead of being
        retried request by request (which would leave the other ranks waiting)."""
        self = cls.__new__(cls)
        self._attach(name, model, processor, batch_size)
        self._fingerprint = name
        self.lockstep = lockstep
        return self

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(resolve_model_path(self.model_name), self.model)
        return self._fingerprint

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        if not requests:
            return []
        if self.lockstep:
            return self._generate_batch(requests, gen)
        try:
            return self._generate_batch(requests, gen)
        except Exception as e:  # noqa: BLE001 - isolate the request that broke the batch
            cause = f"{type(e).__name__}: {first_line(e)}"
            if len(requests) == 1:
                return [Response("", error=cause)]
            self.batch_splits += 1
            say_once(f"hf-split:{id(self)}", f"a batch of {len(requests)} requests failed ({cause}); its requests "
                     "are retried one at a time to isolate the failing one (slower; run.json counts such splits)")
            return [r for req in requests for r in self.generate([req], gen)]

    def _generate_batch(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        import torch

        start = time.perf_counter()
        inputs = encode(self.processor, [r.images for r in requests], [r.prompt for r in requests],
                        **gen.chat_template_kwargs).to(self.model.device)
        kwargs = dict(hf_generate_kwargs(decoding_settings(gen)), bad_words_ids=self._bad_ids or None)
        if kwargs["do_sample"]:
            torch.manual_seed(gen.seed)
        # Focus is measured on single-image prompts: a prompt with several images has no one token grid.
        if not self.capture_focus or any(r.extra_images for r in requests):
            # a sharded model keeps gathered parameters between calls: tensors made in inference mode could not be
            # written to by the training step afterwards
            with torch.no_grad() if self.lockstep else torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
            atts: list = [None] * len(requests)
        else:
            grid = token_grid(self.model, self.processor, inputs)
            with torch.inference_mode(), capture_last_row(self.model) as rows:
                out = self.model.generate(**inputs, **kwargs)
            atts = image_attention(rows, grid.positions, grid.grids, [r.image.size for r in requests])
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        lengths = generated_lengths(new, self.model.generation_config.eos_token_id)
        per = (time.perf_counter() - start) / len(requests)
        return [Response(t.strip(), seconds=per, tokens=n, attention=a)
                for t, n, a in zip(texts, lengths, atts, strict=True)]

    def prefill_attention(self, requests: Sequence[Request], gen: GenerationConfig) -> list[ImageAttention | str]:
        """One prefill-only pass per batch (no generation): each request's attention on its image, or the
        reason it failed."""
        if not requests:
            return []
        try:
            return list(self._prefill_batch(requests, gen))
        except Exception as e:  # noqa: BLE001 - isolate the request that broke the batch
            if len(requests) == 1:
                return [f"{type(e).__name__}: {first_line(e)}"]
            return [a for req in requests for a in self.prefill_attention([req], gen)]

    def _prefill_batch(self, requests: Sequence[Request], gen: GenerationConfig) -> list[ImageAttention]:
        import torch

        inputs = encode(self.processor, [r.image for r in requests], [r.prompt for r in requests],
                        **gen.chat_template_kwargs).to(self.model.device)
        grid = token_grid(self.model, self.processor, inputs)
        with torch.inference_mode(), capture_last_row(self.model) as rows:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        return image_attention(rows, grid.positions, grid.grids, [r.image.size for r in requests])

    def close(self) -> None:
        self.model = None


def hf_generate_kwargs(settings: dict) -> dict:
    """`decoding_settings` as transformers' `generate` keywords. Every sampling field is set explicitly: one left
    unset is filled from the model's generation_config, which the policy excludes."""
    if settings["greedy"]:
        return dict(max_new_tokens=settings["max_new_tokens"], do_sample=False, repetition_penalty=1.0,
                    temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=settings["max_new_tokens"], do_sample=True, temperature=settings["temperature"],
                top_p=settings["top_p"], top_k=0, repetition_penalty=settings["repetition_penalty"])


def generated_lengths(new_tokens, eos_token_id: int | list[int] | None) -> list[int]:
    """Tokens each row generated: up to and including its first end-of-sequence token (rows that finish early
    are padded to the batch's length)."""
    import torch

    width = new_tokens.shape[1]
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if not eos or width == 0:
        return [width] * new_tokens.shape[0]
    is_eos = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], width, dtype=torch.long))
    return first.tolist()


def model_fingerprint(path: str, model=None) -> str:
    """Local folders: a hash of config and weights. Hub ids: the resolved commit when known."""
    p = Path(path).expanduser()
    if not p.is_dir():
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        return f"hub:{path}@{commit or 'unknown'}"
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.suffix not in (".json", ".safetensors", ".bin", ".jinja", ".model", ".txt"):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(-(2**20), 2)
                h.update(fh.read())
    return f"sha256:{h.hexdigest()[:16]}"


__all__ = ["HFBackend", "hf_generate_kwargs", "model_fingerprint"]
