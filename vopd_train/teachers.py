"""The teacher: the same architecture on the crop, scoring the student's tokens without gradient.

Which weights it uses (paper Table 3, reference_code §2.3):
- `ema`: a moving average of the student, θ̄ ← (1−r)·θ̄ + r·θ after every update (the paper's default, r=0.05);
- `frozen`: the starting weights;
- `current`: the live student (co-adapts with it and collapses; kept for the ablation);
- `trust-region`: the frozen teacher's logits moved toward the student's: (1−r)·z_frozen + r·z_student.

With LoRA the teacher is never a second full model: `frozen` and `trust-region` run the base with the adapter
switched off, and `ema` swaps a moving average of the adapter weights into the adapter for its forward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from vopd_train.prefix import scored_hidden
from vopd_train.rollout import SeqBatch, head_fn, lm_head


class Teacher:
    kind: str = ""
    trust_region_rate: float | None = None

    def hidden(self, batch: SeqBatch, share_prefix: bool = False) -> Tensor:
        with torch.no_grad(), self._weights():
            return scored_hidden(self._model(), batch, share_prefix)

    def head(self, h: Tensor) -> Tensor:
        with torch.no_grad(), self._weights():
            return head_fn(self._model())(h)

    def update(self) -> None:
        """After each optimizer step."""

    def state_tensors(self) -> dict[str, Tensor]:
        """What a resumed run needs to rebuild this teacher exactly (empty when the weights are derivable)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            raise ValueError(f"the {self.kind} teacher keeps no state")

    def network(self) -> Any:
        """The model whose hidden states and LM head this teacher uses (under FSDP the trainer gathers its head
        for the loss)."""
        return self._model()

    def _model(self) -> Any:
        raise NotImplementedError

    def _weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class CurrentTeacher(Teacher):
    kind = "current"

    def __init__(self, student: Any):
        self.student = student

    def _model(self) -> Any:
        return self.student


class CopyTeacher(Teacher):
    """Full fine-tuning: a frozen copy of the starting weights, optionally tracking the student by EMA.

    `copy` makes the copy: a deep copy by default; under FSDP, a model in the student's sharded layout filled from
    the student's own shards (`sharded_load.ShardedLoader.copy_of`), so no rank ever holds a whole copy."""

    def __init__(self, student: Any, kind: str, rate: float, copy: Callable[[Any], Any] | None = None):
        self.kind, self.student, self.rate = kind, student, rate
        self.model = (copy or _deep_copy)(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if kind == "trust-region":
            self.trust_region_rate = rate

    def _model(self) -> Any:
        return self.model

    @torch.no_grad()
    def update(self) -> None:
        if self.kind != "ema":
            return
        for t, s in zip(self.model.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s.detach().to(t.dtype), self.rate)

    def state_tensors(self) -> dict[str, Tensor]:
        if self.kind != "ema":
            return {}
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if self.kind != "ema":
            return super().load_state_tensors(tensors)
        _copy_into(dict(self.model.named_parameters()), tensors, "EMA teacher")


class AdapterOffTeacher(Teacher):
    """LoRA: the base model with the adapter disabled (the exact starting policy)."""

    def __init__(self, student: Any, kind: str, rate: float):
        self.kind, self.student = kind, student
        self._head_adapted: bool | None = None
        self._layers: list | None = None
        if kind == "trust-region":
            self.trust_region_rate = rate

    def _model(self) -> Any:
        return self.student

    def head(self, h: Tensor) -> Tensor:
        # the loss calls this per chunk, forward and backward: switching the adapter off walks every module, so it
        # is done only where the head itself has an adapter (it has none under `all-linear`)
        if self._head_adapted is None:
            from peft.tuners.tuners_utils import BaseTunerLayer  # only LoRA runs get here, with peft loaded

            self._head_adapted = any(isinstance(m, BaseTunerLayer) for m in lm_head(self.student).modules())
        if self._head_adapted:
            return super().head(h)
        with torch.no_grad():
            return head_fn(self.student)(h)

    def _weights(self) -> contextlib.AbstractContextManager:
        # peft's `disable_adapter` walks every module twice and builds a status report on each entry; the
        # adapter layers are found once here and switched off and on directly, as that context does
        if self._layers is None:
            self._layers = _plain_adapter_layers(self.student)
        return _switched_off(self._layers) if self._layers else self.student.disable_adapter()


class AdapterEMATeacher(Teacher):
    """LoRA: the student's base with a moving average of the adapter weights swapped in for the forward."""

    kind = "ema"

    def __init__(self, student: Any, rate: float):
        self.student, self.rate = student, rate
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}

    def _model(self) -> Any:
        return self.student

    def head(self, h: Tensor) -> Tensor:
        # only the head's own adapter weights (usually none): the student's graph may hold the others
        head_params = {id(p) for p in lm_head(self.student).parameters()}
        with torch.no_grad(), self._weights([n for n, p in self.params.items() if id(p) in head_params]):
            return head_fn(self._model())(h)

    @contextlib.contextmanager
    def _weights(self, names: list[str] | None = None) -> Iterator[None]:
        names = list(self.params) if names is None else names
        if any(isinstance(self.params[n], DTensor) for n in names):
            # FSDP: a parameter is a view of the storage it all-gathers from, so copy in and out in place
            live = {n: self.params[n].detach().clone() for n in names}
            with torch.no_grad():
                for n in names:
                    self.params[n].copy_(self.ema[n])
            try:
                yield
            finally:
                with torch.no_grad():
                    for n in names:
                        self.params[n].copy_(live[n])
            return
        live = {n: self.params[n].data for n in names}
        try:
            for n in names:
                self.params[n].data = self.ema[n]
            yield
        finally:
            for n in names:
                self.params[n].data = live[n]

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.ema[n].lerp_(p.detach(), self.rate)

    def state_tensors(self) -> dict[str, Tensor]:
        return {n: t.contiguous() for n, t in self.ema.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        _copy_into(self.ema, tensors, "EMA adapter")


def _plain_adapter_layers(model: Any) -> list:
    """The adapter layers of a PEFT model, where switching them one by one is all that switching the adapter
    off takes: every one enabled and nothing but tuner layers (no `modules_to_save` copies). Else []."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = []
    for m in model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            return []
        if isinstance(m, BaseTunerLayer):
            layers.append(m)
    return layers if layers and not any(m.disable_adapters for m in layers) else []


@contextlib.contextmanager
def _switched_off(layers: list) -> Iterator[None]:
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def make_teacher(kind: str, student: Any, rate: float, lora: bool,
                 copy: Callable[[Any], Any] | None = None) -> Teacher:
    """Build the teacher for a student that has just been loaded (before any update). `copy` copies the student
    where the teacher needs weights of its own (full fine-tuning, frozen or EMA); a deep copy by default."""
    if kind == "current":
        return CurrentTeacher(student)
    if lora:
        return AdapterEMATeacher(student, rate) if kind == "ema" else AdapterOffTeacher(student, kind, rate)
    return CopyTeacher(student, kind, rate, copy)


def _deep_copy(student: Any) -> Any:
    return copy.deepcopy(student)


def _copy_into(dest: dict[str, Tensor], src: dict[str, Tensor], what: str) -> None:
    missing, extra = set(dest) - set(src), set(src) - set(dest)
    if missing or extra:
        raise ValueError(f"saved {what} does not match the model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    with torch.no_grad():
        for n, t in dest.items():
            t.copy_(src[n])
