"""A static HTML gallery of a filtered generation folder: every image with its boxes, kept or
rejected and why, its prompt and seed. Plain files that open from the file system (no server,
nothing fetched); pages of `per_page` images, so a million images stay browsable."""

from __future__ import annotations

import html
from collections import Counter
from urllib.parse import quote
from pathlib import Path

from diffplat.fileio import replace_dir

STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
header { margin-bottom: 1em; } nav a { margin-right: .6em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 260px; background: #fff; border: 3px solid #999; padding: 4px; }
figure.kept { border-color: #2a2; } figure.rejected { border-color: #c33; }
figure img { width: 100%; display: block; }
figcaption { font-size: 12px; line-height: 1.3; word-wrap: break-word; }
.verdict { font-weight: bold; } .kept .verdict { color: #2a2; } .rejected .verdict { color: #c33; }
.only-kept figure.rejected, .only-rejected figure.kept { display: none; }
"""
SCRIPT = "function show(c){document.getElementById('grid').className='grid '+c;}"


def _figure(name: str, verdict: dict, meta: dict, folder: Path) -> str:
    picture = "annotated" if (folder / "annotated" / name).is_file() else "images"
    kept = verdict.get("kept", False)
    why = "; ".join(verdict.get("reasons", [])) or "passes every rule"
    found = ", ".join(f"{n} {c}" for c, n in sorted(verdict.get("classes", {}).items())) or "no detections"
    lines = [
        f'<span class="verdict">{"kept" if kept else "rejected"}</span>: {html.escape(why)}',
        f"<b>{html.escape(name)}</b> · {html.escape(found)}",
    ]
    if meta.get("prompt") is not None:
        lines.append(f"prompt: {html.escape(str(meta['prompt']))}")
    if meta.get("seed") is not None:
        lines.append(f"seed: {html.escape(str(meta['seed']))}")
    src = html.escape(f"../{picture}/{quote(name)}", quote=True)  # `#`, `?`, `%` in a name stay in it
    return (f'<figure class="{"kept" if kept else "rejected"}"><a href="{src}"><img loading="lazy" src="{src}" '
            f'alt="{html.escape(name, quote=True)}"></a><figcaption>{"<br>".join(lines)}</figcaption></figure>')  # fmt: skip


def _page(title: str, counts: str, nav: str, figures: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><header><h2>{html.escape(title)}</h2>"
            f"<p>{counts}</p><p>show: <a href=\"#\" onclick=\"show('')\">all</a> "
            f"<a href=\"#\" onclick=\"show('only-kept')\">kept</a> "
            f"<a href=\"#\" onclick=\"show('only-rejected')\">rejected</a></p><nav>{nav}</nav></header>"
            f"<div id=\"grid\" class=\"grid\">{''.join(figures)}</div><nav>{nav}</nav></body></html>\n")  # fmt: skip


def write_gallery(folder: Path, per_image: dict[str, dict], metadata: dict[str, dict], per_page: int = 500) -> Path:
    """`folder/gallery/index.html` (+ `page_NNNN.html`); returns the index page."""
    names = sorted(per_image)
    kept = sum(1 for n in names if per_image[n].get("kept"))
    reasons = Counter(r.split(":")[0] for n in names for r in per_image[n].get("reasons", []))
    counts = f"{len(names)} images, {kept} kept, {len(names) - kept} rejected" + (
        " (" + ", ".join(f"{html.escape(r)}: {c}" for r, c in reasons.most_common()) + ")" if reasons else "")
    pages = [names[i : i + per_page] for i in range(0, len(names), per_page)] or [[]]
    files = ["index.html"] + [f"page_{i:04d}.html" for i in range(1, len(pages))]
    nav = " ".join(f'<a href="{f}">{i + 1}</a>' for i, f in enumerate(files)) if len(pages) > 1 else ""
    with replace_dir(folder / "gallery", "gallery", ("../filter_report.json",)) as tmp:
        for number, (file, chunk) in enumerate(zip(files, pages), 1):
            figures = [_figure(n, per_image[n], metadata.get(n, {}), folder) for n in chunk]
            title = f"{folder.name}: page {number} of {len(pages)}"
            (tmp / file).write_text(_page(title, counts, nav, figures), encoding="utf-8")
    return folder / "gallery" / "index.html"
