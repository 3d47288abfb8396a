"""Render a posmine `report.html` in a real headless browser and save a screenshot.

    apt-get install chromium          # Debian's package; any Chromium or Chrome works
    python benchmarks/render_report.py benchmarks/results/audit/cisi-survivors/report.html /tmp/shot.png

The page must render offline: it fails if the page asks for anything outside itself (the
report inlines its images as data: URLs and has no scripts).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("page", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--size", default="1200,2400")
    a = p.parse_args()
    html = a.page.read_text()
    outside = re.findall(r'(?:src|href)="(?!data:)([^"]+)"', html)
    if outside:
        print(f"{a.page}: refers to files outside the page: {outside[:3]}", file=sys.stderr)
        return 1
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no Chromium or Chrome on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={a.size}",
                    f"--screenshot={a.png.resolve()}", a.page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"{a.png}: {a.png.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
