#!/usr/bin/env python3
"""Splits the pipeline cases (fixtures/cases) into fixtures roots small enough for one device-tool
call each: all of them together are over 100 MiB, and a call carries at most 64 MiB.

Each root, .gpu-cases/<n>/, holds some case folders and every file their case.json names (the
pipeline folder or single file, a `config` folder, ControlNets, LoRA and embedding files: any
string in case.json that is a path under the fixtures root), hard-linked with symbolic links
resolved, so that diffuse-pipelines' `cases` test finds each case complete there
(DIFFUSE_FIXTURES=.gpu-cases/<n>); a case is never split from what it needs. The default
budget is a call's 64 MiB less the sparse working tree (about 6 MiB) and cases.xz (about 9).
Prints one line a root: its size and cases.

    bench/gpu-cases.py [--budget-mib 46] [--fixtures fixtures] [--out .gpu-cases]
"""
import argparse
import json
import os
import random
import shutil
from pathlib import Path


def files(path: Path):
    """The files of `path` (itself when it is one), through symbolic links: a root holds what a
    link points at as files of its own, since links may not survive the trip."""
    if path.is_file():
        yield path
    for parent, _, names in os.walk(path, followlinks=True):
        for name in names:
            yield Path(parent) / name


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in files(path))


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)


def needs(root: Path, case: Path) -> set:
    """The case folder and the paths (relative to the root) its case.json names."""
    spec = json.loads((case / "case.json").read_text())
    paths = {case.relative_to(root).as_posix()}
    for s in strings({k: v for k, v in spec.items() if k != "expected"}):
        parts = Path(s).parts  # none for "" or "."
        if parts and not os.path.isabs(s) and ".." not in parts and (root / s).exists():
            paths.add(Path(s).as_posix())
    # A path inside another one that is already there adds nothing.
    return {p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-mib", type=float, default=46)
    ap.add_argument("--fixtures", default="fixtures")
    ap.add_argument("--out", default=".gpu-cases")
    args = ap.parse_args()
    root, out, budget = Path(args.fixtures), Path(args.out), args.budget_mib * 2**20
    cases = sorted(d for d in (root / "cases").iterdir() if (d / "case.json").is_file())
    if not cases:
        raise SystemExit(f"no cases under {root / 'cases'}")
    sizes = {}
    wanted = {}
    for case in cases:
        wanted[case.name] = needs(root, case)
        for p in wanted[case.name]:
            sizes[p] = size(root / p)

    def total(paths):
        return sum(sizes[p] for p in paths)

    for name, paths in wanted.items():
        if total(paths) > budget:
            raise SystemExit(f"case {name} alone is over {args.budget_mib} MiB")

    def pack(order):
        """Each case in turn into the root it adds the fewest bytes to (the models it shares
        with the cases there are in it already) while that root stays within the budget."""
        groups = []  # [set of paths, [case names]]
        for name in order:
            fits = [g for g in groups if total(g[0] | wanted[name]) <= budget]
            if fits:
                paths, names = min(fits, key=lambda g: total(g[0] | wanted[name]) - total(g[0]))
                paths |= wanted[name]
                names.append(name)
            else:
                groups.append([set(wanted[name]), [name]])
        return groups

    # Largest case first, then shuffled orders (a fixed seed, so the same roots every run): the
    # packing with the fewest roots, the largest of them smallest among equals.
    orders = [sorted(wanted, key=lambda n: -total(wanted[n]))]
    rng = random.Random(0)
    for _ in range(500):
        orders.append(rng.sample(orders[0], len(orders[0])))
    groups = min(
        (pack(o) for o in orders), key=lambda gs: (len(gs), max(total(g[0]) for g in gs))
    )
    shutil.rmtree(out, ignore_errors=True)
    for i, (paths, names) in enumerate(groups):
        dest = out / str(i)
        for p in sorted(paths):
            for f in files(root / p):
                target = dest / f.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
        print(f"{dest}: {total(paths) / 2**20:.1f} MiB, {len(names)} cases: {' '.join(sorted(names))}")


if __name__ == "__main__":
    main()
