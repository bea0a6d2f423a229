"""What a tiny family is made of: its special tokens and chat template (`TokenSpec`), how its processor and
config are assembled around a tokenizer (`Family`), and the byte-level BPE tokenizer every family shares."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vopd_bench.tiny.qwen2_vl import DEFAULT_CORPUS


@dataclass(frozen=True)
class TokenSpec:
    """One family's special tokens, as its real tokenizer declares them.

    `specials` get the lowest ids, in this order. `named` are the attributes the family's processor reads off
    the tokenizer (`tokenizer.image_token`, `tokenizer.boi_token_id`, ...). `vision` is every token that marks
    or fills an image or video in a prompt: the set a model must never sample.
    """

    specials: tuple[str, ...]
    eos: str
    pad: str
    vision: tuple[str, ...]
    chat_template: str
    bos: str | None = None
    named: dict[str, str] = field(default_factory=dict)
    stop: tuple[str, ...] = ()  # end-of-turn tokens that end generation besides `eos` (generation_config)

    def __post_init__(self) -> None:
        declared = set(self.specials)
        missing = [t for t in (self.eos, self.pad, self.bos, *self.vision, *self.named.values(), *self.stop)
                   if t is not None and t not in declared]
        if missing:
            raise ValueError(f"tokens used but not declared special: {missing}")


# The text model every family shares (the vision towers differ too much to share one shape). Whole models come
# to 0.13-0.27M parameters, so that gap-report and a 2-step distill on every family fit CI's budget.
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS


@dataclass(frozen=True)
class Family:
    """One model family: its tokens, and `assemble(tokenizer) -> (processor, config)` with the family's own
    transformers classes. `model_class` names the class in `transformers` that the config instantiates."""

    name: str
    tokens: TokenSpec
    assemble: Callable[[Any], tuple[Any, Any]]
    model_class: str


def make_tokenizer(spec: TokenSpec, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384, *,
                   specials_last: bool = False):
    """A `TokenizersBackend` trained on `corpus`: deterministic, no downloads, every special token atomic.

    Special tokens take the lowest ids, or with `specials_last` the ids after the learned vocabulary (as in
    most released checkpoints, whose image tokens sit at the top of the id range)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, 256 + len(spec.specials)),
                                  special_tokens=[] if specials_last else list(spec.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    if specials_last:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=spec.eos, pad_token=spec.pad, bos_token=spec.bos,
        extra_special_tokens=dict(spec.named), chat_template=spec.chat_template, padding_side="left",
    )


def message_loop(image: str, *, turn_open: str, turn_close: str, role_names: dict[str, str] | None = None) -> str:
    """Jinja for the messages loop most chat formats share: each turn is `turn_open` + role + newline, then the
    content (a string, or a list of text and image parts with `image` standing for each image), then
    `turn_close`. `role_names` renames roles (Gemma calls the assistant `model`)."""
    role = "message['role']"
    for src, dst in (role_names or {}).items():
        role = f"('{dst}' if message['role'] == '{src}' else {role})"
    return (
        "{% for message in messages %}" + turn_open + "{{ " + role + " }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + turn_close + "{% endfor %}"
    )
