"""The trainer's model under torchrun, sharded from the first byte: no rank ever holds a whole copy of it.

    1. the architecture is built from its config on the meta device (no memory, no random numbers drawn);
    2. the trainer's changes that add or wrap modules are applied there (activation recomputation, LoRA);
    3. `fsdp.shard_model` lays the units out, and each rank allocates only its own shards (`to_empty`);
    4. each rank reads, from the checkpoint's safetensors files, only the rows of each tensor that its shards
       hold (FSDP shards along the first dimension), cast to the training dtype;
    5. buffers that are not in the checkpoint (rotary frequencies) are computed by transformers' own rule, the
       one `from_pretrained` uses for them.

Checkpoint names are mapped to the model's by transformers' own renaming rules for the model type (old
checkpoints name Qwen2-VL's layers `model.layers.*`, the model `model.language_model.layers.*`). A tensor that
transformers would have to convert (fuse, split, transpose) rather than rename cannot be read by rows and is
refused in one line.

LoRA: the adapter's starting values are drawn exactly as in one process (the same random numbers, in the same
order, on every rank; the adapter is small) and each rank keeps its rows. Teachers that need their own weights
(frozen, EMA) are `copy_of` the student: the same layout, filled from the student's local shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from vopd_bench.errors import VopdError
from vopd_bench.modeling import load_processor, one_line, pick_device_dtype, quiet_loading, resolve_model_path
from vopd_train import fsdp

Prepare = Callable[[nn.Module], nn.Module]


@dataclass
class ShardedLoader:
    """Builds sharded copies of one checkpoint's architecture over one process group."""

    model: str
    device: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    group: dist.ProcessGroup | None = None
    path: Path = field(init=False)
    config: Any = field(init=False)

    def __post_init__(self) -> None:
        from transformers import AutoConfig

        quiet_loading()
        self.path = local_checkpoint(self.model)
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise VopdError(f"cannot read the config of {self.model!r}: {one_line(e)}") from None
        self.torch_dtype = pick_device_dtype(self.device, self.dtype)[1]

    def meta_model(self) -> nn.Module:
        """The architecture on the meta device, in eval mode, with the checkpoint's generation config."""
        from transformers import AutoModelForImageTextToText, GenerationConfig

        with torch.device("meta"):
            net = AutoModelForImageTextToText.from_config(self.config, dtype=self.torch_dtype,
                                                          trust_remote_code=self.trust_remote_code)
        if (self.path / "generation_config.json").is_file():
            net.generation_config = GenerationConfig.from_pretrained(self.path)
        return net.eval()

    def student(self, prepare: Prepare | None = None) -> tuple[nn.Module, Any]:
        """(model, processor): the checkpoint's weights, sharded over the group, with `prepare` applied on the
        meta device first (it may wrap the model, e.g. in PEFT, and may draw random numbers: LoRA's)."""
        net = self.meta_model()
        names = checkpoint_names(net, self.path)  # before any wrapper renames parameters
        with recorded_adapter_init() as adapter:
            model = prepare(net) if prepare is not None else net
        adapter_init = adapter.by_name(model)
        self._materialise(model, filled=set(names) | set(adapter_init))
        with torch.no_grad():
            _read_shards(model, self.path, names)
            for name, p in _named_tensors(model).items():
                if name in adapter_init:
                    _local(p).copy_(_rows(adapter_init[name], p))
        fsdp.prepare_root(model, self.device)
        processor = load_processor(str(self.path), self.model, trust_remote_code=self.trust_remote_code)
        return model, processor

    def copy_of(self, student: nn.Module) -> nn.Module:
        """A frozen copy of the student's current weights in the same sharded layout, filled from the student's
        local shards (no collective, no read from disk). The student must not be wrapped (full fine-tuning)."""
        net = self.meta_model()
        self._materialise(net)
        theirs = _named_tensors(student)
        with torch.no_grad():
            for name, t in _named_tensors(net).items():
                _local(t).copy_(_local(theirs[name]))
        for p in net.parameters():
            p.requires_grad_(False)
        fsdp.prepare_root(net, self.device)
        return net

    def _materialise(self, model: nn.Module, filled: set[str] | None = None) -> None:
        """Shard the meta model, give each rank its shards' memory, and initialise what will not be `filled`
        (by name; None: everything will be) as `from_pretrained` initialises what a checkpoint lacks."""
        fsdp.shard_model(model, self.device, self.group)
        model.to_empty(device=self.device)
        _init_missing(model, filled)


def local_checkpoint(model: str) -> Path:
    """The local folder of `model`: `toy`, a folder, or a hub id resolved through the hub's cache."""
    path = resolve_model_path(model)
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return local
    if local.exists() or path.startswith((".", "/", "~")):
        raise VopdError(f"model path {path!r} has no config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                            "*.model", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no network: one line
        raise VopdError(f"cannot load model {model!r} (not a local folder, and not found on the hub or in its "
                        f"cache): {one_line(e)}") from None


def checkpoint_names(net: nn.Module, path: Path) -> dict[str, tuple[Path, str]]:
    """Model tensor name → (safetensors file, checkpoint key), by transformers' renaming rules."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise VopdError(f"{path} holds no .safetensors weights (vopd loads safetensors only)")
    transforms = get_model_conversion_mapping(net)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = net.state_dict(keep_vars=True)
    out: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for key in h.keys():
                name, converted = rename_source_key(key, renamings, converters, net.base_model_prefix, wanted)
                if name not in wanted:
                    continue  # not a tensor of this model (transformers leaves such keys out too)
                if converted is not None:  # fused, split, transposed or permuted: not a matter of rows
                    raise VopdError(f"{path}: tensor {key} goes through transformers' weight conversion "
                                    f"({converted}), which loading sharded by rows does not do; train this model "
                                    "in one process")
                out[name] = (f, key)
    missing = [n for n, _ in net.named_parameters() if n not in out]
    if missing:
        raise VopdError(f"{path}: the checkpoint has no weights for {len(missing)} parameter(s) of the model, e.g. "
                        f"{missing[0]}")
    return out


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name, under the names of the unwrapped model with LoRA's
    `.base_layer` left out (the checkpoint's layout), tied weights once."""
    hf = fsdp._unwrapped(model)
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in hf.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name.replace(".base_layer", "")] = t
    return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _row_range(t: Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the full tensor that this rank's shard of `t` holds (all of them if whole)."""
    if not isinstance(t, DTensor) or t.dim() == 0:
        return 0, t.shape[0] if t.dim() else 0
    if tuple(t.placements) != (Shard(0),):
        raise RuntimeError(f"unexpected placement {t.placements}: FSDP shards along the first dimension")
    n, world = t.shape[0], t.device_mesh.size()
    per = -(-n // world)  # FSDP cuts dim 0 as torch.chunk does: ceil(n / world) rows per rank, the last ones short
    start = min(t.device_mesh.get_local_rank() * per, n)
    stop = start + t.to_local().shape[0]
    return start, stop


def _rows(full: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 0:
        return full
    start, stop = _row_range(like)
    return full[start:stop]


def _read_shards(model: nn.Module, path: Path, names: dict[str, tuple[Path, str]]) -> None:
    """Each of this rank's shards from the rows of its checkpoint tensor, one tensor at a time."""
    tensors = _named_tensors(model)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (f, key) in names.items():
        if name in tensors:
            by_file.setdefault(f, []).append((name, key))
    for f, items in by_file.items():
        table = SafetensorsTable(f)
        with f.open("rb") as fh:
            for name, key in items:
                dest = tensors[name]
                start, stop = _row_range(dest) if dest.dim() else (0, 0)
                if dest.dim() and stop <= start:
                    continue
                _local(dest).copy_(table.rows(fh, key, start, stop))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsTable:
    """The table of contents of a safetensors file, to read rows of a tensor with plain file reads.

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    every tensor's bytes, C-contiguous, so rows [a, b) of a tensor are one contiguous byte range. Reading them
    with `readinto` (not through a memory map) keeps the file's pages out of the process's memory: a rank holds
    its rows and nothing else of the checkpoint."""

    def __init__(self, path: Path):
        import json
        import struct

        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n

    def rows(self, fh: Any, key: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of tensor `key` (the whole tensor when it is 0-dimensional)."""
        entry = self.header[key]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        row_bytes = (end - begin) // shape[0] if shape else end - begin
        if not shape:
            start, stop = 0, 1
        buf = bytearray((stop - start) * row_bytes)
        fh.seek(self.base + begin + start * row_bytes)
        if fh.readinto(buf) != len(buf):
            raise VopdError(f"{fh.name}: tensor {key} is truncated")
        out = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return out.reshape([stop - start, *shape[1:]] if shape else [])


def _init_missing(model: nn.Module, filled: set[str] | None) -> None:
    """Compute what no checkpoint holds (non-persistent buffers: rotary frequencies) by transformers' own
    initialisation, which skips every tensor marked initialised: what will be filled is marked first."""
    for name, t in _named_tensors(model).items():
        if filled is None or name in filled:
            t._is_hf_initialized = True
    fsdp._unwrapped(model).initialize_weights()


class _AdapterRecord:
    """LoRA's starting values as peft drew them, before it moved them to the (meta) device of the base layer."""

    def __init__(self) -> None:
        self.values: list[tuple[nn.Module, str, dict[str, Tensor]]] = []  # (layer, "lora_A.default", tensors)

    def by_name(self, model: nn.Module) -> dict[str, Tensor]:
        """Full name (as `_named_tensors` gives it) → starting value."""
        where = {id(m): name for name, m in fsdp._unwrapped(model).named_modules()}
        out = {}
        for layer, prefix, tensors in self.values:
            for pname, value in tensors.items():
                full = ".".join(x for x in (where[id(layer)], prefix, pname) if x)
                out[full.replace(".base_layer", "")] = value
        return out


@contextlib.contextmanager
def recorded_adapter_init() -> Iterator[_AdapterRecord]:
    """Within: every adapter peft creates has its starting values recorded (on the CPU) just before peft moves
    it to its base layer's device, which for a meta-device model discards them."""
    record = _AdapterRecord()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        yield record
        return
    original = BaseTunerLayer._move_adapter_to_device_of_base_layer

    def recording(self: Any, adapter_name: str, device: Any = None) -> None:
        for layer_name in (*self.adapter_layer_names, *self.other_param_names):
            layer = getattr(self, layer_name, None)
            if not isinstance(layer, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in layer:
                continue
            item = layer[adapter_name]
            tensors = (dict(item.state_dict()) if isinstance(item, nn.Module) else {"": item})
            if all(t.device.type != "meta" for t in tensors.values()):
                record.values.append((self, f"{layer_name}.{adapter_name}",
                                      {k: v.detach().clone() for k, v in tensors.items()}))
        return original(self, adapter_name, device)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = recording
    try:
        yield record
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = original
