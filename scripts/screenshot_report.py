"""Screenshot an HTML report in headless Chromium: ``screenshot_report.py IN.html OUT.png``.

Used to check the report's layout by eye and in a slow test. Needs ``/usr/bin/chromium``
(Debian: ``apt-get update && apt-get install -y chromium``). ``screenshot_report.py --smoke
[OUT.png]`` (for the test suite) renders a one-table page of its own, by default to a PNG in a
temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL_HINT = "apt-get update && apt-get install -y chromium"
SMOKE_PAGE = ("<!doctype html><meta charset=utf-8><title>smoke</title><h1>tunelab</h1>"
              "<table><tr><th>metric</th><th>base</th><th>tuned</th></tr>"
              "<tr><td>accuracy</td><td>0.50</td><td>0.90</td></tr></table>")


def find_chromium() -> str:
    """Path of the Chromium binary, or a clear error that says how to install it."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError(f"headless Chromium not found; install it with: {INSTALL_HINT}")


def screenshot(report: Path, output: Path, *, width: int = 1280, height: int = 4000,
               timeout_s: float = 90) -> Path:
    """Render ``report`` at ``width`` x ``height`` CSS pixels and write a PNG to ``output``."""
    report, output = Path(report).resolve(), Path(output).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"{report} does not exist")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--screenshot={output}", report.as_uri(),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if completed.returncode != 0 or not output.is_file():
        raise RuntimeError(f"Chromium exited with {completed.returncode} and wrote no "
                           f"screenshot:\n{completed.stderr[-2000:]}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?", help="the report.html to render")
    parser.add_argument("output", type=Path, nargs="?", help="where to write the PNG")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--smoke", action="store_true",
                        help="render a page of its own; OUTPUT defaults to a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        folder = Path(tempfile.mkdtemp(prefix="tunelab-screenshot-smoke-"))
        args.output = args.report or folder / "smoke.png"  # the one path given is OUT.png
        args.report = folder / "smoke.html"
        args.report.write_text(SMOKE_PAGE)
        args.height = 600
    elif args.output is None:
        parser.error("give the report and the PNG to write (or --smoke)")
    try:
        path = screenshot(args.report, args.output, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
