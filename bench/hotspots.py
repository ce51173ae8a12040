"""Summarize py-spy raw (collapsed) stacks: where the gateway's CPU went, by package and function.

    .venv/bin/python bench/hotspots.py bench-profile/capacity.txt [--top 25]

`bench/run.py --profile DIR` records one file per phase (py-spy record --format raw).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]+?)(?::\d+)?\)$")
# Frames that only carry the event loop: time under them belongs to whoever they run.
_LOOP = {"asyncio", "uvloop", "khqr-gateway", "apscheduler", "other"}


def _frame(text: str) -> tuple[str, str]:
    """(function (file), package) of one py-spy frame such as `tick (khqr_gateway/x.py:12)`."""
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), "other"
    path = match["file"]
    parts = Path(path).parts
    package = parts[0].removesuffix(".py") if len(parts) > 1 or path.endswith(".py") else "other"
    return f"{match['func']} ({path})", package


def summarize(path: Path, top: int = 25) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf, leaf_package = frames[-1]
        self_time[leaf] += count
        # The innermost frame of a known package other than asyncio/uvloop says who asked.
        owner = next((pkg for _, pkg in reversed(frames) if pkg not in _LOOP), leaf_package)
        by_package[owner] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count
    if not total:
        return f"{path.name}: no samples"

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    out = [f"{path.name}: {total} samples (CPU only: idle time is not sampled)", "", "by package:"]
    out += [f"  {share(n)}  {pkg}" for pkg, n in by_package.most_common()]
    out += ["", f"self time, top {top}:"]
    out += [f"  {share(n)}  {name}" for name, n in self_time.most_common(top)]
    out += ["", f"inclusive time (khqr_gateway functions), top {top}:"]
    ours = [(name, n) for name, n in inclusive.most_common() if "(khqr_gateway/" in name]
    ours = [(name, n) for name, n in ours if not name.startswith(("main ", "_run "))]
    out += [f"  {share(n)}  {name}" for name, n in ours[:top]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarize(path, args.top))
        print()


if __name__ == "__main__":
    main()
