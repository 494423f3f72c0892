"""report.html: the Markdown the stages write becomes HTML; the page is self-contained and every
image on it decodes in a real headless Chromium (tests/browser.py; skipped where there is none)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
from PIL import Image

from browser import open_in_chromium
from synreal_ray import viz
from synreal_ray.report_html import markdown_to_html, render_html, write_html
from synreal_ray.segment import scores


def png(color=(200, 30, 30), size=(40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_markdown_tables_headings_lists_and_escaping():
    md = ("FID (lower is closer) <script>x</script>\n\n| run | FID | note |\n|---|---|---|\n"
          "| unit-method | 10.97 | `a|b` |\n| base | 3.5 ± 0.2 | **bold** |\n\n# Title\n\n*a caption*, 2 * 3 * 4\n\n- one\n- [two](runs/a.png)\n")
    out = markdown_to_html(md)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert out.count("<tr>") == 3 and '<td class="num">10.97</td>' in out and '<td class="num">3.5 ± 0.2</td>' in out
    assert "<th>FID</th>" in out and "<strong>bold</strong>" in out
    assert "<h3>Title</h3>" in out and '<ul><li>one</li><li><a href="runs/a.png">two</a></li></ul>' in out
    assert "<p><em>a caption</em>, 2 * 3 * 4</p>" in out


def test_markdown_images_are_embedded_or_named_missing(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    out = markdown_to_html("![grid](a.png)\n\n![gone](b.png)\n", lambda ref: str(tmp_path / ref))
    assert 'src="data:image/png;base64,' in out and 'alt="grid"' in out
    assert "(image b.png not found)" in out


def fake_run_folder(out) -> int:
    """A pipeline output's picture files, written by the same viz functions the stages use; returns
    the number of images the page must show."""
    (out / "runs" / "r1" / "train" / "grids").mkdir(parents=True)
    (out / "kliep").mkdir()
    (out / "segment" / "real" / "val").mkdir(parents=True)
    (out / "runs" / "r1" / "translated" / "x").mkdir(parents=True)
    (out / "report.md").write_text("FID\n\n| comparison | FID |\n|---|---|\n| r1: translated vs real | 4.20 |\n\n"
                                   "![before](before_after.png)\n")
    (out / "before_after.png").write_bytes(png((10, 200, 10), (80, 40)))
    records = [{"step": s, "gen_total": 5.0 / s, "dis_total": 1.0} for s in range(1, 6)]
    (out / "runs" / "r1" / "train" / "loss_curves.png").write_bytes(viz.loss_curves({"r1": records}))
    (out / "runs" / "r1" / "train" / "grids" / "step_000002.png").write_bytes(png())
    (out / "runs" / "r1" / "train" / "grids" / "step_000004.png").write_bytes(png((0, 0, 255)))
    (out / "runs" / "r1" / "consistency.png").write_bytes(png((9, 9, 9)))
    (out / "kliep" / "histogram.png").write_bytes(viz.weight_histograms({"syn": np.linspace(0.1, 3, 50)}))
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 50, (19, 19))
    cm[5] = 0  # a class absent from the ground truth: no bar
    (out / "segment" / "real" / "val" / "eval.json").write_text(json.dumps({**scores(cm), "num_images": 3}))
    (out / "segment" / "real" / "val" / "confusion.png").write_bytes(viz.confusion_matrix(cm, [str(i) for i in range(19)]))
    (out / "runs" / "r1" / "translated" / "x" / "eval.json").write_text("{}")  # a dataset's file: not shown
    # report.md's image, before/after, 2 run pictures + the last grid, histogram, IoU bars, confusion
    return 8


def test_page_is_self_contained_and_every_image_loads_in_chromium(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    expected = fake_run_folder(out)
    page = write_html(str(out))
    text = (out / "report.html").read_text()
    assert page.endswith("report.html")
    assert not re.findall(r'src="(?!data:)', text) and "http" not in text  # nothing is fetched
    assert text.count("data:image/png;base64,") == expected
    assert "step_000004.png" in text and "step_000002.png" not in text  # the last training grid only
    assert "mIoU" in text and text == render_html(str(out))  # written again: the same page

    seen = open_in_chromium(out / "report.html", tmp_path)
    assert seen["images"] == expected and seen["broken"] == []
    assert seen["tables"] == 1
    assert seen["headings"] == ["Results", "Before and after", "Runs", "KLIEP importance weights",
                                "Segmentation evaluations"]


def test_chromium_probe_sees_a_broken_image(tmp_path):
    page = tmp_path / "p.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="bad" src="data:image/png;base64,AAAA">'
                    '<img alt="ok" src="data:image/png;base64,' + __import__("base64").b64encode(png()).decode() +
                    '"></body></html>')
    seen = open_in_chromium(page, tmp_path)
    assert seen["images"] == 2 and seen["broken"] == ["bad"]
