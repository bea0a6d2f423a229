"""report.html: the gap report as one self-contained page, with a gallery of the failures that explain the gap.

The page holds the same tables as report.md (rendered from `report.render_report`), the figures as embedded
PNGs, and a gallery of recoverable cases (full view wrong, crop view right): the full image with the evidence
outlined, the crop, the question and options with the right answer marked, and the model's answer under each
view. Everything is inline (CSS, images as data URIs); the page needs no script and no network.

The gallery is capped (`max_gallery`) so a 20k-sample benchmark stays light: cases are taken round-robin
across benchmarks, smallest evidence first (then by sample id), and the page says how many it shows of how
many. Thumbnails are JPEGs of at most `THUMB_SIDE` pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw

from vopd_bench import analysis, plots, report, views
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image
from vopd_bench.samples import LETTERS, Sample
from vopd_bench.views import ViewConfig

THUMB_SIDE = 320
WINDOW_COLOUR = (255, 140, 0)  # the self-zoom window, orange next to the evidence's red
JPEG_QUALITY = 82
RESPONSE_CHARS = 400  # raw responses longer than this are cut in the gallery (samples.jsonl has them whole)
SampleLookup = Callable[[str, str], Sample | None]


@dataclass
class ViewAnswer:
    view: str
    response: str | None
    parsed: str | None
    right: bool
    parse_failed: bool
    error: str | None


@dataclass
class GalleryCase:
    """One recoverable sample with everything the gallery card shows."""

    benchmark: str
    sample_id: str
    category: str | None
    evidence_area: float | None
    question: str
    options: list[str]
    answer: str | None
    image: str | None  # path from the record; None for procedural benchmarks
    boxes: list[list[float]]
    answers: list[ViewAnswer] = field(default_factory=list)
    window: list[int] | None = None  # the selfcrop view's attention window, source pixels


# ---- selecting cases ----------------------------------------------------------------------------------------


def _opt(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def gallery_cases(records: Sequence[Any], max_gallery: int = 60) -> tuple[list[GalleryCase], dict[str, int]]:
    """The recoverable cases to show (at most `max_gallery`) and the total per benchmark.

    Same definition as failures.jsonl (`analysis.failures`). Deterministic: within a benchmark, smallest
    evidence first, then sample id; across benchmarks, round-robin in name order so none crowds out the rest.
    """
    fails = analysis.failures(records)
    totals: dict[str, int] = {}
    for f in fails:
        totals[f["benchmark"]] = totals.get(f["benchmark"], 0) + 1
    if not fails or max_gallery <= 0:
        return [], totals

    def order(f: dict) -> tuple:
        area = f.get("evidence_area")
        return (area if area is not None else math.inf, str(f["sample_id"]))

    queues = {b: sorted((f for f in fails if f["benchmark"] == b), key=order) for b in sorted(totals)}
    picked: list[dict] = []
    while len(picked) < max_gallery and any(queues.values()):
        for b in queues:
            if queues[b] and len(picked) < max_gallery:
                picked.append(queues[b].pop(0))
    picked.sort(key=lambda f: (f["benchmark"], order(f)))

    wanted = {(f["benchmark"], str(f["sample_id"])) for f in picked}
    # Only the shown samples' records are framed: a 20k-sample run costs one pass of `failures`, not two.
    shown = [r for r in records if (_field(r, "benchmark"), str(_field(r, "sample_id"))) in wanted]
    sub = analysis.records_frame(shown)
    by_sample: dict[tuple[str, str], list[ViewAnswer]] = {}
    windows = {(r.benchmark, r.sample_id): list(r.window) for r in sub.itertuples(index=False)
               if r.view == "selfcrop" and isinstance(r.window, list) and r.window}
    for r in sub.itertuples(index=False):
        by_sample.setdefault((r.benchmark, r.sample_id), []).append(ViewAnswer(
            r.view, _opt(r.response), _opt(r.parsed), bool(r.right), bool(r.parse_failed), _opt(r.error)))
    view_order = {v: i for i, v in enumerate(analysis.ordered_views(sub["view"].unique()))}
    cases = []
    for f in picked:
        answers = sorted(by_sample.get((f["benchmark"], str(f["sample_id"])), []), key=lambda a: view_order[a.view])
        cases.append(GalleryCase(
            benchmark=f["benchmark"], sample_id=str(f["sample_id"]), category=_opt(f.get("category")),
            evidence_area=_opt(f.get("evidence_area")), question=str(f.get("question") or ""),
            options=list(f.get("options") or []), answer=_opt(f.get("answer")), image=_opt(f.get("image")),
            boxes=[list(b) for b in (f.get("boxes") or [])], answers=answers,
            window=windows.get((f["benchmark"], str(f["sample_id"])))))
    return cases, totals


# ---- images -------------------------------------------------------------------------------------------------


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb(img: Image.Image, side: int = THUMB_SIDE) -> Image.Image:
    out = img.copy()
    out.thumbnail((side, side), Image.Resampling.LANCZOS)
    return out


def case_images(case: GalleryCase, cfg: ViewConfig, sample: Sample | None = None) -> tuple[str, str]:
    """Data URIs of (full image with the evidence outlined, crop as the model saw it), both thumbnails.

    The image comes from the Sample when one is given (procedural benchmarks keep none on disk), else from
    the record's path. The crop is the benchmark's own when it ships one, else `views.crop_view` with the run's
    view config. The outline is drawn on the thumbnail, 2 px wide, so it stays visible however large the
    source image is. Raises SampleError when the image cannot be loaded.
    """
    if sample is not None:
        image = load_image(sample.image)
        provided = load_image(sample.crop_image) if sample.crop_image is not None else None
    elif case.image:
        image, provided = load_image(case.image), None
    else:
        raise SampleError("no image reference in the records (pass a sample lookup for procedural benchmarks)")
    boxes: tuple = tuple(tuple(b) for b in case.boxes)
    if not boxes and sample is not None and sample.boxes:
        boxes, _ = views.clamp_boxes(sample.boxes, image.width, image.height)
    full = _thumb(image)
    if boxes:
        s = full.width / image.width
        full = views.box_view(full, [tuple(v * s for v in b) for b in boxes], ViewConfig(box_width=2))
    if case.window:
        s = full.width / image.width
        x1, y1, x2, y2 = (v * s for v in case.window)
        ImageDraw.Draw(full).rectangle((x1, y1, x2 - 1, y2 - 1), outline=WINDOW_COLOUR, width=2)
    if provided is not None:
        crop = provided
    elif boxes:
        crop, _ = views.crop_view(image, boxes, cfg)
    else:
        raise SampleError("no evidence box to crop")
    return _data_uri(full), _data_uri(_thumb(crop))


def _view_config(run_info: dict) -> ViewConfig:
    raw = (run_info.get("config") or {}).get("view_config") or {}
    known = {k: raw[k] for k in ViewConfig.__dataclass_fields__ if k in raw}
    try:
        return ViewConfig(**known)
    except TypeError:
        return ViewConfig()


# ---- HTML ---------------------------------------------------------------------------------------------------

CSS = """
:root { --full:#4C72B0; --crop:#55A868; --box:#C44E52; --ink:#1d2330; --mute:#5b6475; --line:#dde1e8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f6f7f9; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 6px; } h2 { font-size: 19px; margin-top: 34px; border-bottom: 1px solid var(--line);
padding-bottom: 4px; } h3 { font-size: 15px; margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: 4px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; white-space: normal; vertical-align: bottom; min-width: 3.5em; }
td:first-child, th:first-child { text-align: left; } td:first-child { white-space: normal; overflow-wrap: anywhere; }
td .ci { color: var(--mute); font-size: 12px; }
blockquote { margin: 10px 0 16px; padding: 8px 14px; border-left: 4px solid var(--box); background: #fcf0f0; }
blockquote p { margin: 0; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: #f6f7f9; padding: 10px; overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
.figures figure { margin: 0; flex: 1 1 460px; } .figures img { max-width: 100%; height: auto; }
figcaption { color: var(--mute); font-size: 12px; }
.note { color: var(--mute); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
.case { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.case h3 { margin: 0 0 8px; font-size: 14px; } .case h3 small { color: var(--mute); font-weight: normal; }
.pics { display: flex; gap: 10px; align-items: flex-start; }
.pics figure { margin: 0; } .pics img { height: 180px; width: auto; max-width: 300px; object-fit: contain;
  border: 1px solid var(--line); background: #eee; display: block; }
.missing { color: var(--box); font-size: 12px; }
.q { margin: 10px 0 4px; font-weight: 600; white-space: pre-wrap; }
ol.opts { list-style: none; padding: 0; margin: 0 0 8px; } ol.opts li { padding: 1px 6px; border-radius: 4px; }
ol.opts li.right { background: #e3f4e6; font-weight: 600; }
ol.opts li.right::after { content: "  ✓ right answer"; color: var(--crop); font-weight: normal; font-size: 12px; }
table.answers { display: table; width: 100%; }
table.answers td, table.answers th { white-space: normal; text-align: left; }
.ok { color: var(--crop); font-weight: 700; } .bad { color: var(--box); font-weight: 700; }
.resp { color: var(--mute); font-size: 12px; word-break: break-word; }
"""

_VIEW_LABEL = {"full": "full image", "crop": "evidence crop", "box": "full + red box",
               "selfcrop": "self-zoom window"}


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


# A table cell "value [low, high]" (and a suffix such as " (n=50)"): the interval goes under its value, so that the
# results table fits a 1,300 px window with every column showing (a value and its interval on one line did not).
_CI_CELL = re.compile(r"<td>([^<\[]+?) (\[[^\]<]+\])([^<]*)</td>")


def _markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    # Raw HTML in the markdown is escaped, not passed through: error reasons may contain angle brackets.
    page = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return _CI_CELL.sub(r'<td>\1<br><span class="ci">\2\3</span></td>', page)


def _figures_html(summary: pd.DataFrame, figures: Mapping[str, Path] | None = None) -> str:
    """Embed `figures` (name -> PNG already drawn, e.g. for report.md), or draw them afresh."""
    with tempfile.TemporaryDirectory() as tmp:
        written = figures if figures is not None else plots.plot_all(summary, tmp)
        parts = []
        for name, path in written.items():
            uri = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
            caption = report.FIGURES.get(name, name)
            parts.append(f'<figure><img src="{uri}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}'
                         "</figcaption></figure>")
    if not parts:
        return ""
    return '<h2 id="figures">Figures</h2>\n<div class="figures">' + "\n".join(parts) + "</div>"


def _answer_row(a: ViewAnswer) -> str:
    if a.error:
        verdict, shown = '<span class="bad">error</span>', _esc(a.error)
    else:
        verdict = '<span class="ok">✓ right</span>' if a.right else '<span class="bad">✗ wrong</span>'
        shown = "<i>could not be parsed</i>" if a.parse_failed or a.parsed is None else f"<b>{_esc(a.parsed)}</b>"
    resp = a.response or ""
    if len(resp) > RESPONSE_CHARS:
        resp = resp[:RESPONSE_CHARS] + " …"
    return (f"<tr><td>{_esc(_VIEW_LABEL.get(a.view, a.view))}</td><td>{shown}</td><td>{verdict}</td>"
            f'<td class="resp">{_esc(resp)}</td></tr>')


def _case_html(case: GalleryCase, cfg: ViewConfig, lookup: SampleLookup | None) -> str:
    try:
        sample = lookup(case.benchmark, case.sample_id) if lookup is not None else None
        full_uri, crop_uri = case_images(case, cfg, sample)
        zoom = "" if sample is not None and sample.crop_image is not None else f", ×{cfg.zoom:g}"
        window_note = ", self-zoom window in orange" if case.window else ""
        pics = (f'<div class="pics"><figure><img src="{full_uri}" alt="full image, evidence outlined">'
                f"<figcaption>full image, evidence outlined{window_note}</figcaption></figure>"
                f'<figure><img src="{crop_uri}" alt="evidence crop"><figcaption>evidence crop{zoom}</figcaption>'
                "</figure></div>")
    except VopdError as e:  # SampleError included: a bad image costs its pictures, never the page
        pics = f'<p class="missing">image not shown: {_esc(e)}</p>'
    meta = [case.benchmark]
    if case.category:
        meta.append(case.category)
    if case.evidence_area is not None:
        meta.append(f"evidence {case.evidence_area * 100:.2g}% of the image")
    if case.options:
        items = []
        for i, text in enumerate(case.options):
            letter = LETTERS[i]
            cls = ' class="right"' if case.answer is not None and str(case.answer).strip().upper() == letter else ""
            items.append(f"<li{cls}>({letter}) {_esc(text)}</li>")
        opts = '<ol class="opts">' + "".join(items) + "</ol>"
    else:
        opts = f'<ol class="opts"><li class="right">{_esc(case.answer)}</li></ol>'
    rows = "".join(_answer_row(a) for a in case.answers)
    return (f'<article class="case" id="case-{_esc(case.benchmark)}-{_esc(case.sample_id)}">'
            f"<h3>{_esc(case.sample_id)} <small>{_esc(' · '.join(meta))}</small></h3>{pics}"
            f'<p class="q">{_esc(case.question)}</p>{opts}'
            '<table class="answers"><tr><th>view</th><th>answer</th><th>verdict</th><th>response</th></tr>'
            f"{rows}</table></article>")


def _gallery_html(records: Sequence[Any], cfg: ViewConfig, lookup: SampleLookup | None, max_gallery: int) -> str:
    cases, totals = gallery_cases(records, max_gallery)
    total = sum(totals.values())
    out = ['<h2 id="gallery">Failure gallery: recoverable cases</h2>',
           '<p class="note">Wrong on the full image, right on the evidence crop: the model can read the evidence '
           "but does not find it in the whole picture. These are the cases <code>failures.jsonl</code> hands to "
           "<code>vopd distill</code>.</p>"]
    if total == 0:
        return "\n".join(out + ['<p class="note">No recoverable case in this run.</p>'])
    shown = {b: sum(c.benchmark == b for c in cases) for b in totals}
    per = "; ".join(f"{b}: {shown[b]} of {totals[b]}" for b in sorted(totals))
    out.append(f'<p class="note">Showing {len(cases)} of {total} recoverable cases ({_esc(per)}), smallest '
               "evidence first.</p>")
    out.append('<section class="gallery">')
    out += [_case_html(c, cfg, lookup) for c in cases]
    out.append("</section>")
    return "\n".join(out)


def render_html(summary: pd.DataFrame, records: Sequence[Any], run_info: dict,
                sample_lookup: SampleLookup | None = None, max_gallery: int = 60,
                figures: Mapping[str, Path] | None = None) -> str:
    """The whole page as a string (see the module docstring)."""
    records = list(records)
    body = _markdown_html(report.render_report(summary, records, run_info, figures=()))
    title = f"Gap report: {run_info.get('model') or 'unknown model'}"
    cfg = _view_config(run_info)
    run_json = json.dumps(run_info, indent=2, ensure_ascii=False, default=str)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>",
        body,
        _figures_html(summary, figures),
        _gallery_html(records, cfg, sample_lookup, max_gallery),
        '<h2 id="run">Run</h2><details><summary>run.json</summary>', f"<pre>{_esc(run_json)}</pre></details>",
        "</main></body></html>",
    ])


def write_html_report(out_dir: str | Path, summary: pd.DataFrame, records: Sequence[Any], run_info: dict,
                      sample_lookup: SampleLookup | None = None, max_gallery: int = 60,
                      figures: Mapping[str, Path] | None = None) -> Path:
    """Write `report.html` into `out_dir`; returns its path.

    `sample_lookup(benchmark, sample_id)` returns the `Sample` (or None) for records without an image path,
    e.g. procedural benchmarks; without it such cases show a note instead of their images. `figures` are PNGs
    already drawn for report.md (see `report.write_report`); without them the plots are drawn again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(render_html(summary, records, run_info, sample_lookup, max_gallery, figures), encoding="utf-8")
    return path
