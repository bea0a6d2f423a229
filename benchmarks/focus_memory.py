"""Peak memory of --focus and of the selfcrop view's prefill passes, against a plain answer.

Each measurement runs in a fresh subprocess that loads the model through the `hf` backend, resets the kernel's
peak-RSS counter (`/proc/self/clear_refs`), answers one request and reads the peak back (`VmHWM`). So the peak
covers the request only, from the loaded state; both the whole-process peak and its rise above the loaded
process are printed. Modes:

- `plain`: `backend.generate` (prefill + a few greedy tokens), as gap-report asks;
- `focus`: the same with `--focus` (the last prompt row's attention captured in every LM layer);
- `selfcrop`: `selfcrop.locate`, the view's two prefill-only passes (question and generic prompt);
- `eager-matrices` (reference only): one prefill with eager attention and `output_attentions=True`, the cost of
  materialising every layer's full attention matrix, which the focus path never does.

Models: `toy` (224² images, 64 image tokens) and a random Qwen2.5-VL-class model with a 1400 × 1120 image,
i.e. 2,000 image tokens. It has the 3B model's LM attention (width 2048, 16 query heads, 2 KV heads, head dim
128), which is what the focus row's cost depends on, but 2 LM layers, a narrow MLP and a narrow 2-block
window-attention vision tower, so that a prefill fits a shared CPU.

    .venv/bin/python benchmarks/focus_memory.py [--models toy,qwen2.5-vl] [--tokens 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODES = ("plain", "focus", "selfcrop", "eager-matrices")
IMAGE = {"toy": (224, 224), "qwen2.5-vl": (1400, 1120)}


def build_qwen25_class(out: Path) -> None:
    """A random Qwen2.5-VL with the 3B model's LM attention shapes, 2 LM layers, saved like a hub checkpoint."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from vopd_bench.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer()
    pixels = IMAGE["qwen2.5-vl"][0] * IMAGE["qwen2.5-vl"][1]
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size={"shortest_edge": pixels,
                                                                               "longest_edge": pixels}),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=128, out_hidden_size=2048, num_heads=4, intermediate_size=256,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], vocab_size=len(tok),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(model: str, mode: str, size: tuple[int, int], tokens: int) -> dict:
    """Runs in the child: load, reset the peak, one request, read the peak."""
    import torch
    from PIL import Image

    from vopd_bench import selfcrop
    from vopd_bench.backends.base import GenerationConfig, Request
    from vopd_bench.backends.hf import HFBackend

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    backend = HFBackend(model)
    image = Image.effect_noise(size, 64).convert("RGB")
    req = Request("r", image, "What colour is the small object near the centre? Answer with one word.")
    gen = GenerationConfig(max_new_tokens=tokens)
    if mode == "eager-matrices":  # the language model only: the vision tower's matrices are not the question
        backend.model.config.text_config._attn_implementation_internal = "eager"
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    if mode in ("plain", "focus"):
        backend.capture_focus = mode == "focus"
        resp = backend.generate([req], gen)[0]
        assert resp.error is None, resp.error
    elif mode == "selfcrop":
        from vopd_bench.attention import resolve_layer

        cfg = selfcrop.SelfCrop("paper", resolve_layer(backend.model, None), 224)
        win = selfcrop.locate(backend, [(req.prompt, selfcrop.GENERIC_PROMPT, image)], gen, cfg)[0]
        assert not isinstance(win, str), win
    else:
        from vopd_bench.modeling import encode

        inputs = encode(backend.processor, [image], [req.prompt])
        with torch.inference_mode():
            out = backend.model(**inputs, output_attentions=True)
        assert out.attentions[0].shape[-1] == inputs["input_ids"].shape[1]
    n_image = IMAGE.get(model, size)[0] * IMAGE.get(model, size)[1] // (28 * 28)
    return {"model": model, "mode": mode, "loaded": loaded, "peak": _status("VmHWM"), "image_tokens": n_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,qwen2.5-vl")
    ap.add_argument("--tokens", type=int, default=4, help="new tokens per answer")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, mode, size = args.child
        w, h = (int(v) for v in size.split("x"))
        print(json.dumps(measure(model, mode, (w, h), args.tokens)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name in args.models.split(","):
            path = "toy" if name == "toy" else str(Path(tmp) / name)
            if name == "qwen2.5-vl":
                build_qwen25_class(Path(path))
            w, h = IMAGE[name]
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", path, mode,
                                      f"{w}x{h}"], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["model"] = name
                results.append(r)
                print(json.dumps(r), flush=True)
    mib = 2**20
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| model | image tokens | mode | peak RSS (MiB) | vs plain | rise above loaded (MiB) | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        base = next(b for b in results if b["model"] == r["model"] and b["mode"] == "plain")
        rise, base_rise = r["peak"] - r["loaded"], base["peak"] - base["loaded"]
        print(f"| {r['model']} | {r['image_tokens']:,} | {r['mode']} | {r['peak'] / mib:,.0f} | "
              f"{r['peak'] / base['peak']:.3f} | {rise / mib:,.0f} | {rise / max(base_rise, 1):.2f} |")


if __name__ == "__main__":
    main()
