"""The published benchmarks, read from their Hugging Face dataset repositories (or a local copy of one).

Importing this package registers them all:

| name | source | views | own metrics |
|---|---|---|---|
| vstar | craigwu/vstar_bench | full, crop, box (1-2 xywh boxes) | — |
| zoombench | inclusionAI/ZoomBench | full, crop (shipped), box (bbox, or recovered from the crop) | — |
| treebench | HaochenWang/TreeBench | full, crop, box (0+ xyxy boxes) | — |
| hrbench-4k, hrbench-8k | DreamMr/HR-Bench | full | per cycle, cycle mean |
| mme-realworld, -cn, -lite | yifanzhang114/MME-RealWorld-Lmms-eval, -CN-Lmms-eval, -lite-lmms-eval | full | per task, per subtask |
| visualprobe[:level] | Mini-o3/VisualProbe_{Easy,Medium,Hard} | full | mean over levels |
| mmvp | MMVP/MMVP | full | per pair |
| cv-bench | nyu-visionx/CV-Bench | full | official, (2D+3D)/2 |
| mmstar | Lin-Chen/MMStar | full | mean over l2 categories |
| pope | lmms-lab/POPE | full | precision, recall, F1, yes_ratio_pred, yes_ratio_gt |

Each is registered with the paper's prompt (Appendix B) under its plain name, and with other conventions as
`name@variant`: `vstar@lmms`, `hrbench-4k@lmms`, `hrbench-8k@lmms`, `mme-realworld@lmms`, `mme-realworld-cn@lmms`,
`mme-realworld-lite@lmms`, `mmvp@lmms`, `cv-bench@lmms`, `mmstar@lmms`, `treebench@vlmeval`, and
`pope@original` (the original POPE script's reading of answers).

`--data-dir DIR` is a local copy of the repository (same files and layout), or a folder of such copies named
like their repositories (DIR/HR-Bench, DIR/DreamMr/HR-Bench); without it the files come from the hub.
"""

from vopd_bench.benchmarks.hub import (  # noqa: F401  (each module registers its benchmarks)
    cvbench,
    hrbench,
    mme_realworld,
    mmstar,
    mmvp,
    pope,
    treebench,
    visualprobe,
    vstar,
    zoombench,
)
