"""Saving what a run produces and what it needs to resume. Tensors go to safetensors, the rest to JSON:
nothing is ever pickled.

    OUT/state/            the resumable training state, replaced atomically at each save
        trainer_state.json    step, optimizer/scheduler bookkeeping, python/numpy RNG, config, skipped prompts
        student.safetensors   the trainable parameters
        optimizer.safetensors AdamW moments
        teacher.safetensors   the EMA teacher (only when it cannot be rebuilt from the starting weights)
        rng.safetensors       torch CPU (and CUDA) generator states
    OUT/model/            the result in `save_pretrained` format (safetensors + processor): gap-report and vLLM load it
    OUT/adapter/          with LoRA, the adapter itself (PEFT format; `merge_lora` merges it into a base)

Beside them (written by the trainer and the re-measure): config.yaml, train_log.jsonl, train_curves.png,
skipped.jsonl, before/ and after/ (gap-report folders), before_after.csv and before_after.png.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vopd_bench.errors import VopdError

STATE = "state"


def state_dir(out: Path) -> Path | None:
    """The latest complete state folder, if any (a save interrupted between its two renames leaves `.old`)."""
    for name in (STATE, STATE + ".old"):
        p = out / name
        if (p / "trainer_state.json").is_file():
            return p
    return None


def save_state(out: Path, *, meta: dict[str, Any], student: dict[str, torch.Tensor], optimizer: Any,
               scheduler: Any, teacher: dict[str, torch.Tensor]) -> None:
    tmp = out / (STATE + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file({k: v.detach().contiguous().cpu() for k, v in student.items()}, tmp / "student.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if teacher:
            save_file({k: v.detach().contiguous().cpu() for k, v in teacher.items()}, tmp / "teacher.safetensors")
        save_file(_torch_rng(), tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        body = {**meta, "optimizer": opt_meta, "scheduler": sched, "python_rng": _py_rng(), "numpy_rng": _np_rng()}
        (tmp / "trainer_state.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
    except BaseException:  # a full disk: the previous state stands, and the half-written one gives its space back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_state(out)


def publish_state(out: Path) -> None:
    """Swap the finished `state.tmp` in as `state`: the previous state becomes `state.old` first and goes last,
    so a save interrupted at any point leaves one complete state for `state_dir`."""
    tmp, final, old = out / (STATE + ".tmp"), out / STATE, out / (STATE + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def load_state(path: Path) -> dict[str, Any]:
    """Everything `save_state` wrote: {"meta", "student", "optimizer", "scheduler", "teacher"}; RNGs restored."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        student = load_file(path / "student.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        teacher = load_file(path / "teacher.safetensors") if (path / "teacher.safetensors").is_file() else {}
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError) as e:
        raise VopdError(f"cannot read the saved training state in {path}: {e}; use --restart") from None
    _set_torch_rng(rng)
    random.setstate(_tuples(meta.pop("python_rng")))
    np_state = meta.pop("numpy_rng")
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    optimizer = _unflatten_optimizer(opt_tensors, meta.pop("optimizer"))
    return {"meta": meta, "student": student, "optimizer": optimizer, "scheduler": meta.pop("scheduler"),
            "teacher": teacher}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}/{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "indices": [int(i) for i in sd["state"]]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {i: {} for i in meta["indices"]}
    for name, t in tensors.items():
        idx, key = name.split("/", 1)
        state[int(idx)][key] = t
    for idx, extra in meta["scalars"].items():
        state[int(idx)].update(extra)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _torch_rng() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_torch_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _py_rng() -> list:
    return _lists(random.getstate())


def _np_rng() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _lists(x: Any) -> Any:
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def trainable_tensors(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        raise VopdError("the saved student does not match this model's trainable parameters; use --restart")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def save_final(model: Any, processor: Any, out: Path, lora: bool) -> Path:
    """Write OUT/model (and OUT/adapter with LoRA). With LoRA the adapter is saved first, then merged into the
    in-memory model, which is then a plain transformers model."""
    model_dir = out / "model"
    if lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    return model_dir


def merge_lora(base_model: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a saved adapter into its base model and save the result in `save_pretrained` format."""
    from peft import PeftModel

    from vopd_bench.modeling import load_model

    net, processor = load_model(base_model, device="cpu", dtype="float32")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(net, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
