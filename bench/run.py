"""Run the benchmark suite, or regenerate bench/README.md's tables from its results.

    .venv/bin/python -m bench.run                      # the quick suite (what `make bench` runs)
    .venv/bin/python -m bench.run --full               # everything (hours on 2 cores)
    .venv/bin/python -m bench.run --full --only quality 'depth/speed-*'
    .venv/bin/python -m bench.run --list [--full]
    .venv/bin/python -m bench.run --report             # rewrite README tables from bench/results/

Every case runs in its own child process (bench/harness.py); results append to
bench/results/<suite>.jsonl. Tables show full-suite runs only, so `make bench` never changes them.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys
import time
from pathlib import Path

from bench import harness

SUITES = ("prune", "quality", "quant", "recover", "recipes", "kernels", "act_sparsity", "depth", "vision_tokens",
          "streaming", "cost", "e2e")


def suite_modules():
    return [importlib.import_module(f"bench.cases.{s}") for s in SUITES]


def all_cases() -> list[harness.Case]:
    return [c for m in suite_modules() for c in m.CASES]


def all_tables() -> dict:
    tables = {}
    for m in suite_modules():
        tables.update(m.TABLES)
    return tables


def select(cases, mode: str, only: list[str] | None) -> list[harness.Case]:
    cases = [c for c in cases if mode == "full" or c.quick is not None]
    if only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) or c.suite == p for p in only)]
    return cases


def report(readme: Path = harness.README, results: Path = harness.RESULTS) -> None:
    text = readme.read_text()
    new = harness.render(text, all_tables(), harness.load(results))
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(readme)  # atomic: a failed render never leaves half a README
    print(f"{readme}: tables regenerated" + (" (no change)" if new == text else ""))
    if results == harness.RESULTS:  # the shipped recipes state what their bench case measured
        from bench.cases.recipes import write_reaches

        for name in write_reaches(harness.load(results)):
            print(f"recipes/{name}: reaches updated")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick suite (default)")
    mode.add_argument("--full", action="store_true", help="every case at its measured size")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="suites or suite/case globs")
    ap.add_argument("--list", action="store_true", help="print the selected cases and exit")
    ap.add_argument("--report", action="store_true", help="regenerate bench/README.md's tables and exit")
    ap.add_argument("--max-load", type=float, metavar="L",
                    help="before each case, wait (up to 10 min) until the load average is at most L")
    ap.add_argument("--results", type=Path, default=harness.RESULTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.report:
        report(results=args.results)
        return 0
    run_mode = "full" if args.full else "quick"
    cases = select(all_cases(), run_mode, args.only)
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.id}  {c.params_for(run_mode)}")
        return 0
    failed = []
    t_all = time.perf_counter()
    for c in cases:
        t0 = time.perf_counter()
        try:
            rows = harness.run_case(c, run_mode, args.results, max_load=args.max_load)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            failed.append(c.id)
            continue
        print(f"{c.id}: {len(rows)} row(s) in {time.perf_counter() - t0:.0f}s", flush=True)
        for r in rows:
            shown = {k: v for k, v in r["metrics"].items() if harness.is_number(v)}
            ratios = f"  vs {r['ratio_to']['row']}: {r['ratio_to']['metrics']}" if r["ratio_to"] else ""
            print(f"    {r['row'] or '-'}: {shown}{ratios}", flush=True)
    print(f"{len(cases) - len(failed)}/{len(cases)} cases in {time.perf_counter() - t_all:.0f}s; "
          f"results in {args.results}")
    if failed:
        print("failed: " + " ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
