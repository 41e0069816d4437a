#!/usr/bin/env python
"""Mutation check: break the method or a kernel on purpose, in a temporary copy of the repository, and expect
the tests that guard that piece to fail. Run by hand before a release (docs/TESTING.md lists the mutations):

    .venv/bin/python scripts/mutation_check.py            # every fast mutation (C++ ones rebuild saliq._C)
    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py --only ties-triton-up objective-aug-dropped
    .venv/bin/python scripts/mutation_check.py --slow     # also the end-to-end ones (minutes each, testbed)
    .venv/bin/python scripts/mutation_check.py --no-build # skip the mutations that need a C++ rebuild

First the unmutated copy must pass every selected test file (otherwise a "caught" would mean nothing). Then
each mutation is applied to a fresh copy (the exact text must be found once: when the code moves on, the
script says so instead of testing nothing) and its tests run with -x. Exit status 0 when every mutation was
caught. The working tree is never touched.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks",
                                "results")


@dataclass
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    build: bool = False  # csrc/ changed: saliq._C is rebuilt in the copy
    slow: bool = False


OBJECTIVE = ["tests/test_objective.py"]
TIES = "tests/test_rounding_ties.py"
MUTATIONS = [
    Mutation("objective-mixed-penalty-dropped", "the saliency penalty left out of the `mixed` stage loss",
             "saliq/calibrate.py", "pen = sum(m.penalty for m in fq.values())", "pen = zero", OBJECTIVE),
    Mutation("objective-wpt-penalty-halved", "the weight-only stage's penalty scaled by 0.5",
             "saliq/calibrate.py", "pen = sum(m.compute_penalty() for m in fq.values())",
             "pen = 0.5 * sum(m.compute_penalty() for m in fq.values())", OBJECTIVE),
    Mutation("objective-saliency-ones", "the saliency replaced by ones in the penalty",
             "saliq/calibrate.py", "saliency_mod.normalise(self.saliency[key].to(self.device)",
             "saliency_mod.normalise(torch.ones_like(self.saliency[key]).to(self.device)", OBJECTIVE),
    Mutation("objective-normalisation", "the relative normalisation without its mean(W^2)",
             "saliq/saliency.py", "return S / (S.sum().clamp_min(1e-30) * W.float().pow(2).mean().clamp_min(1e-30))",
             "return S / S.sum().clamp_min(1e-30)", OBJECTIVE),
    Mutation("objective-after-lora-ignored", "the LoRA update left out of the after-LoRA penalty",
             "saliq/nn.py", "delta = self.lora_delta() if self.after_lora else None", "delta = None", OBJECTIVE),
    Mutation("objective-aug-dropped", "the aug MSE (fp block on quantized inputs) left out",
             "saliq/calibrate.py", "mse = mse + ops.mse(y, t_aug)", "mse = mse + 0.0 * ops.mse(y, t_aug)",
             OBJECTIVE),
    Mutation("objective-multiplier-ignored", "the block multiplier m_i ignored",
             "saliq/calibrate.py", "lam_reg = cfg.lambda_reg * self.mult[i] * uses_reg",
             "lam_reg = cfg.lambda_reg * uses_reg", OBJECTIVE),
    Mutation("ties-ref-up", "the reference rounds ties up (floor(u + 0.5))",
             "saliq/ref.py", "r = torch.round(u)", "r = torch.floor(u + 0.5)", [TIES, "-k", "ref"]),
    Mutation("ties-triton-up", "Triton _round_half_even rounds ties up",
             "kernels/fake_quant.py", "m = (a + 8388608.0) - 8388608.0", "m = tl.floor(a + 0.5)",
             [TIES, "-k", "triton"]),
    Mutation("ties-triton-zero-point-up", "Triton rounds the zero point half up",
             "kernels/fake_quant.py", "z = _round_half_even(tl.minimum(tl.maximum(tl.div_rn(-xmin, s), -1e4), 1e4))",
             "z = tl.floor(tl.minimum(tl.maximum(tl.div_rn(-xmin, s), -1e4), 1e4) + 0.5)", [TIES, "-k", "triton"]),
    Mutation("ties-cpp-roundf", "C++ element rounding rintf -> roundf (ties away from zero)",
             "csrc/common/quant_math.h", "e.r = rintf(e.u);", "e.r = roundf(e.u);", [TIES, "-k", "cpp"], build=True),
    Mutation("ties-cpp-zero-point-roundf", "C++ zero point rintf -> roundf",
             "csrc/common/quant_math.h", "p.z = rintf(clamp_nan(", "p.z = roundf(clamp_nan(", [TIES, "-k", "cpp"],
             build=True),
    # end to end on the demo model: saliq's perplexity band (minutes per run; the testbed must be cached)
    Mutation("e2e-saliency-ones", "the saliency replaced by ones (end to end)",
             "saliq/calibrate.py", "saliency_mod.normalise(self.saliency[key].to(self.device)",
             "saliency_mod.normalise(torch.ones_like(self.saliency[key]).to(self.device)",
             ["tests/test_testbed_e2e.py", "-m", "slow", "-k", "band and saliq"], slow=True),
]


def make_copy(dest: Path, build: bool) -> Path:
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORE, symlinks=True)
    # the installed package maps saliq.kernels to kernels/; in the copy a link does it, so the copy's own
    # kernels are imported
    (repo / "saliq" / "kernels").symlink_to(Path("..") / "kernels")
    if build:
        for so in (repo / "saliq").glob("_C*.so"):
            so.unlink()
    return repo


def env_for(repo: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("MAX_JOBS", "2")
    return env


def run(cmd, repo: Path, timeout: int, log: Path, **extra_env) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=repo, env={**env_for(repo), **extra_env}, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ntimed out after {timeout} s\n")
            return 124


def check_imports(repo: Path) -> None:
    """saliq, saliq.kernels and saliq._C must come from the copy, or the mutations test the wrong tree."""
    code = ("import saliq, saliq.kernels.fake_quant as k, saliq._C as c; "
            "print(saliq.__file__); print(k.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env_for(repo), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 3 or not all(os.path.realpath(p).startswith(str(repo.resolve()))
                                                    for p in paths):
        raise SystemExit(f"the copy does not import its own code:\n{out.stdout}{out.stderr}")


def last_line(log: Path) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-1][:110] if lines else ""


def apply(m: Mutation, repo: Path) -> None:
    path = repo / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.path} (expected once); "
                         "update this script")
    path.write_text(text.replace(m.old, m.new))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run")
    ap.add_argument("--slow", action="store_true", help="also the end-to-end mutations")
    ap.add_argument("--no-build", action="store_true", help="skip the mutations that need a C++ rebuild")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per test run")
    args = ap.parse_args()

    chosen = [m for m in MUTATIONS if (args.only and m.name in args.only)
              or (not args.only and (args.slow or not m.slow) and not (args.no_build and m.build))]
    unknown = set(args.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations: {sorted(unknown)}; --list shows them")
    if args.list or not chosen:
        for m in MUTATIONS:
            flags = " [C++ rebuild]" if m.build else (" [slow]" if m.slow else "")
            print(f"{m.name:34} {m.what}{flags}\n{'':34} tests: {' '.join(m.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="saliq-mutation-"))
    logs = work / "logs"
    logs.mkdir()
    print(f"work folder: {work}")
    failed = False
    try:
        if not args.no_baseline:  # every test selection once, unmutated: it must pass
            repo = make_copy(work / "baseline", build=False)
            check_imports(repo)
            for n, tests in enumerate(dict.fromkeys(tuple(m.tests) for m in chosen)):
                t0, log = time.time(), logs / f"baseline-{n}.log"
                rc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], repo,
                         args.timeout, log)
                print(f"baseline {' '.join(tests)}: rc={rc} in {time.time() - t0:.0f} s: {last_line(log)}", flush=True)
                if rc != 0:
                    print(f"the unmutated tests fail: see {log}")
                    return 2
            shutil.rmtree(work / "baseline")
        rows = []
        for m in chosen:
            t0 = time.time()
            repo = make_copy(work / m.name, build=m.build)
            try:
                apply(m, repo)
            except ValueError as e:
                rows.append((m, "DOES NOT APPLY", 0.0, str(e)))
                print(e, flush=True)
                failed = True
                shutil.rmtree(work / m.name)
                continue
            log = logs / f"{m.name}.log"
            if m.build:
                # the CPU part only: csrc/common is shared, and the CPU tests catch what these mutations break
                rc = run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], repo, args.timeout,
                         logs / f"{m.name}.build.log", SALIQ_NO_CUDA="1")
                if rc != 0:
                    rows.append((m, "BUILD FAILED", time.time() - t0, last_line(logs / f"{m.name}.build.log")))
                    failed = True
                    continue
            check_imports(repo)
            rc = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests], repo,
                     args.timeout, log)
            verdict = "caught" if rc == 1 else ("NOT CAUGHT" if rc == 0 else f"caught? rc={rc}")
            failed |= rc != 1
            rows.append((m, verdict, time.time() - t0, last_line(log)))
            print(f"{m.name}: {verdict} ({time.time() - t0:.0f} s) {last_line(log)}", flush=True)
            shutil.rmtree(work / m.name)
        print("\n| mutation | tests | result | seconds |\n|---|---|---|---|")
        for m, verdict, secs, _ in rows:
            print(f"| {m.what} (`{m.name}`) | `{' '.join(m.tests)}` | {verdict} | {secs:.0f} |")
    finally:
        print(f"logs: {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
