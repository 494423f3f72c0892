"""report.html: a pipeline run's report as one self-contained page, readable offline.

    write_html("out/demo")        # -> out/demo/report.html (synreal run / demo / report write it)

Everything is read from the run's folder (local or s3://), so the page can be written again at any
time (`synreal report --run OUT`): report.md (every metric table), before_after.png, each run's
loss curves and pictures, the pairs report with a preview of real images beside their synthetic
neighbours, the KLIEP weight histograms, and for every segmentation evaluation (eval.json) its
per-class IoU bars and confusion matrix. Images are embedded as data: URIs; nothing is fetched
when the page opens. A part whose files are missing is left out, not faked.
"""

from __future__ import annotations

import base64
import html
import logging
import re

from synreal_ray import storage

log = logging.getLogger(__name__)

PREVIEW_QUERIES = 4  # real images shown beside their synthetic neighbours in the pairs section

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; } th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: .4em 0; display: block; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
nav a { margin-right: 1em; } code { background: #f4f4f4; padding: 0 .2em; }
"""


# --- Markdown, the subset the stages write: headings, tables, lists, images, paragraphs ---

def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)  # a file beside report.html


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?\s*(%|±.*)?", text) is not None


def _table(lines: list[str]) -> str:
    head, body = _cells(lines[0]), [_cells(r) for r in lines[2:]]
    out = ["<table><thead><tr>", *(f"<th>{_inline(c)}</th>" for c in head), "</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f'<td class="num">{_inline(c)}</td>' if _is_number(c) else f"<td>{_inline(c)}</td>"
                                    for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


_BULLET = re.compile(r"^\s*[-*]\s+")


def markdown_to_html(md: str, image_uri=None) -> str:
    """HTML of the Markdown the stages write. `image_uri(ref)` maps an image reference
    (`![alt](ref)`) to the file's URI; the image is embedded, or named as missing."""
    blocks, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
        elif m := re.fullmatch(r"(#{1,6})\s+(.*)", line.strip()):
            level = min(len(m.group(1)) + 2, 6)  # the page's own h1/h2 stay above the report's headings
            blocks.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            shown = figure(image_uri(m.group(2)), m.group(1)) if image_uri else ""
            blocks.append(shown or f"<p>(image {html.escape(m.group(2))} not found)</p>")
            i += 1
        elif _BULLET.match(line):
            items = []
            while i < len(lines) and _BULLET.match(lines[i]):
                items.append(f"<li>{_inline(_BULLET.sub('', lines[i]))}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "#", "![")):
                para.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(blocks)


# --- images ---

def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure(uri: str | None, caption: str, png: bytes | None = None) -> str:
    """A captioned image from a file (or from `png` bytes); '' when there is neither."""
    if png is None:
        if not uri or not storage.exists(uri):
            return ""
        png = storage.read_bytes(uri)
    return f"<figure>{img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


# --- the page ---

def _pngs(uri: str) -> list[str]:
    """PNG files directly in `uri` (its subfolders, a translated dataset among them, are not listed)."""
    return storage.list_files(uri, suffix=".png", recursive=False)


def _runs_section(out: str) -> str:
    parts = []
    for name in storage.list_dirs(storage.join(out, "runs")):
        run = storage.join(out, "runs", name)
        figs = [figure(u, f"{name}: {storage.relpath(u, run)}") for u in _pngs(run)]
        figs += [figure(u, f"{name}: {storage.relpath(u, run)}") for u in _pngs(storage.join(run, "train"))]
        grids = storage.list_files(storage.join(run, "train", "grids"), suffix=".png")
        if grids:  # the last training grid: what the generator made at the end
            figs.append(figure(grids[-1], f"{name}: training grid {storage.relpath(grids[-1], run)}"))
        parts.append(f"<h3>{html.escape(name)}</h3>" + "".join(figs))
    return "".join(parts)


def _pairs_section(out: str) -> str:
    pairs = storage.join(out, "pairs")
    if not storage.is_complete(pairs):
        return ""
    from synreal_ray.pairing import preview_grid

    md = storage.join(pairs, "report.md")
    body = markdown_to_html(storage.read_bytes(md).decode()) if storage.exists(md) else ""
    preview = preview_grid(pairs, PREVIEW_QUERIES)
    return body + figure(None, "query images (first column) beside their nearest neighbours, in rank order", preview)


def _iou_rows(evaluation: dict) -> list[tuple[str, float]]:
    return [(name, v) for name, v in evaluation.get("iou", {}).items() if v is not None]


def _evaluation_folders(out: str) -> list[str]:
    """Folders holding an eval.json where the pipeline writes them (pipeline.py's layout): segment
    outputs' val/, seg-eval outputs under consistency/, and the same per run. Only these folders
    are looked into, never a dataset's own tree."""
    folders = []
    for group in (storage.join(out, "segment"), storage.join(out, "consistency")):
        for name in storage.list_dirs(group):
            folders += [storage.join(group, name), storage.join(group, name, "val")]
    for name in storage.list_dirs(storage.join(out, "runs")):
        run = storage.join(out, "runs", name)
        folders += [storage.join(run, "consistency"), storage.join(run, "segment"), storage.join(run, "segment", "val")]
    return [f for f in folders if storage.exists(storage.join(f, "eval.json"))]


def _segmentation_section(out: str) -> str:
    from synreal_ray import viz

    parts = []
    for folder in _evaluation_folders(out):
        rel = storage.relpath(folder, out)
        evaluation = storage.read_json(storage.join(folder, "eval.json"))
        head = (f"<h3>{html.escape(rel)}</h3><p>mIoU {100 * evaluation['miou']:.1f}%, pixel accuracy "
                f"{100 * evaluation['pixel_accuracy']:.1f}%, {evaluation.get('num_images', '?')} images</p>"
                if evaluation.get("miou") is not None else f"<h3>{html.escape(rel)}</h3>")
        rows = _iou_rows(evaluation)
        bars = figure(None, f"{rel}: IoU per class", viz.iou_bars(rows, rel)) if rows else ""
        parts.append(head + bars + figure(storage.join(folder, "confusion.png"), f"{rel}: confusion matrix"))
    return "".join(parts)


def render_html(out: str) -> str:
    """The whole page for the pipeline output `out`."""
    report = storage.join(out, "report.md")
    sections: list[tuple[str, str]] = []
    if storage.exists(report):
        sections.append(("Results", markdown_to_html(storage.read_bytes(report).decode(),
                                                     lambda ref: storage.join(out, *ref.split("/")))))
    sections.append(("Before and after", figure(storage.join(out, "before_after.png"),
                                                "each row: a synthetic image, then each run's translation of it")))
    sections.append(("Runs", _runs_section(out)))
    sections.append(("Pairs (SP-Feat)", _pairs_section(out)))
    sections.append(("KLIEP importance weights", figure(storage.join(out, "kliep", "histogram.png"),
                                                        "importance weights per domain (log scale)")))
    sections.append(("Segmentation evaluations", _segmentation_section(out)))
    sections = [(title, body) for title, body in sections if body]
    anchor = lambda title: re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")  # noqa: E731
    nav = " ".join(f'<a href="#{anchor(t)}">{html.escape(t)}</a>' for t, _ in sections)
    body = "\n".join(f'<h2 id="{anchor(t)}">{html.escape(t)}</h2>\n{b}' for t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>synreal-ray report: '
            f"{html.escape(out)}</title><style>{_STYLE}</style></head>\n<body><h1>synreal-ray report</h1>"
            f"<p><code>{html.escape(out)}</code></p><nav>{nav}</nav>\n{body}\n</body></html>\n")


def write_html(out: str) -> str:
    """Write `out`/report.html; returns its URI."""
    uri = storage.join(out, "report.html")
    storage.write_bytes(uri, render_html(out).encode())
    log.debug("report page: %s", uri)
    return uri
