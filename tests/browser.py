"""A page opened in a real headless Chromium (Debian's `chromium`), and what it saw.

    seen = open_in_chromium(Path("out/report.html"), tmp_path)   # or pytest.skip(reason) when absent
    seen["images"], seen["broken"], seen["tables"], seen["headings"]

A copy of the page gets a script that runs after the load event and writes, into the DOM, how many
images there are, which did not decode (alt texts), how many tables and the h2 headings;
`--dump-dom` prints the DOM after it ran. The flags are those this machine needs (its network is
closed: no background connections).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               tables: document.querySelectorAll("table").length,
               headings: [...document.querySelectorAll("h2")].map(h => h.textContent)};
  const pre = document.createElement("pre"); pre.id = "synreal-probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


NO_CHROMIUM = "no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"


def find_chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


def chromium() -> str:
    """The Chromium binary, or skip the test with the reason."""
    return find_chromium() or pytest.skip(NO_CHROMIUM)


def open_in_chromium(page: Path, tmp_path: Path) -> dict:
    text = page.read_text()
    assert "</body>" in text, f"{page}: no </body>"
    probe = tmp_path / f"probed-{page.name}"
    probe.write_text(text.replace("</body>", _PROBE + "</body>", 1))
    p = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="synreal-probe">(.*?)</pre>', p.stdout, re.S)
    assert m, f"Chromium did not run the page's probe (exit {p.returncode}):\n{p.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))
