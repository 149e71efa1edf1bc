"""llama-server's own test suite (the fetched llama.cpp v0.5.0 tools/server/tests), upstream's
whole default selection (-m "not slow"), against our server or the C++ llama-server, and a
comparison of the two by test file (= feature). docs/upstream-suite.md has the latest figures.

    python3 bench/upstream_suite.py                 # ours (python -m server, prebuilt .llama/lib)
    python3 bench/upstream_suite.py --cpp           # .llama/cpp-build/bin/llama-server
    python3 bench/upstream_suite.py --cpp PATH      # another llama-server binary
    python3 bench/upstream_suite.py --both          # one after the other, then compare
    python3 bench/upstream_suite.py --compare       # compare the last two runs only

Per-test outcomes go to OUT/{ours,cpp}.json (default OUT: /tmp/pyllama-upstream-suite), pytest's
output to OUT/{ours,cpp}.log. Both sides run with tests/upstream/llama_suite_plugin.py (same
model, same relaxations, --threads 1 per server); ~10-20 min a side on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "upstream"))
import suite  # noqa: E402

DEFAULT_CPP = ROOT / ".llama" / "cpp-build" / "bin" / "llama-server"
DEFAULT_OUT = Path("/tmp/pyllama-upstream-suite")


def run_side(side: str, cpp: Path, out: Path, timeout: float, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if side == "cpp":
        if not cpp.exists():
            sys.exit(f"{cpp} not found: build it (bench/_builds.py, or cmake as in the README)")
        server = str(cpp)
    print(f"== {side}: upstream suite, '{suite.SELECTION}' selection, server "
          f"{server or 'python -m server (this repo)'}", flush=True)
    r = suite.run(server, results=out / f"{side}.json", log=out / f"{side}.log",
                  per_test_timeout=timeout, extra=extra)
    res = r["results"]
    counts = defaultdict(int)
    for v in res.values():
        counts[v] += 1
    print(f"{side}: {counts['passed']} passed of {r['selection']} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()) if k != 'passed')}); "
          f"{r['seconds']:.0f} s; outcomes in {out / (side + '.json')}", flush=True)
    return r


def by_file(ids) -> dict[str, list[str]]:
    groups = defaultdict(list)
    for t in sorted(ids):
        groups[t.split("::")[0].removeprefix("unit/")].append(t.split("::", 1)[1])
    return dict(sorted(groups.items()))


def compare(out: Path) -> None:
    try:
        ours = json.loads((out / "ours.json").read_text())
        cpp = json.loads((out / "cpp.json").read_text())
    except FileNotFoundError as e:
        sys.exit(f"no run to compare: {e.filename}")
    po = {t for t, v in ours["results"].items() if v == "passed"}
    pc = {t for t, v in cpp["results"].items() if v == "passed"}
    print(f"\nours passes {len(po)}, C++ llama-server passes {len(pc)} of {cpp['selection']} "
          f"('{suite.SELECTION}'; ours' run saw {ours['selection']}); both {len(po & pc)}")
    for title, ids, other in (("passes on C++ and not ours", pc - po, ours),
                              ("passes on ours and not C++", po - pc, cpp)):
        groups = by_file(ids)
        print(f"\n{title}: {len(ids)}")
        for f, names in groups.items():
            print(f"  {f} ({len(names)})")
            for n in names:
                tid = f"unit/{f}::{n}"
                why = other.get("reasons", {}).get(tid, "")
                print(f"    {n}  [{other['results'].get(tid, 'not run')}] {why[:160]}")
    print("\n| test file (feature) | ids in the selection | ours | C++ | C++ and not ours | ours and not C++ |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    files = by_file(set(ours["results"]) | set(cpp["results"]))
    for f, names in files.items():
        ids = {f"unit/{f}::{n}" for n in names}
        print(f"| {f} | {len(ids)} | {len(ids & po)} | {len(ids & pc)} | {len(ids & (pc - po))} "
              f"| {len(ids & (po - pc))} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpp", nargs="?", const=DEFAULT_CPP, type=Path, default=None,
                    help=f"run the C++ llama-server (default path {DEFAULT_CPP.relative_to(ROOT)})")
    ap.add_argument("--both", action="store_true", help="run ours, then the C++ server, and compare")
    ap.add_argument("--compare", action="store_true", help="only compare OUT/ours.json and OUT/cpp.json")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    ap.add_argument("--timeout", type=float, default=300, help="per-test time-out, s (default 300)")
    ap.add_argument("extra", nargs="*", help="more pytest arguments (e.g. -- -k completion)")
    a = ap.parse_args(argv)
    if not a.compare:
        sides = ["ours", "cpp"] if a.both else ["cpp" if a.cpp else "ours"]
        for side in sides:
            run_side(side, a.cpp or DEFAULT_CPP, a.out, a.timeout, a.extra)
    if (a.out / "ours.json").exists() and (a.out / "cpp.json").exists():
        compare(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
