"""Image workload throughput: landing -> bronze -> silver -> gold, PCA fit and accuracy beside the baseline.

    python benchmarks/image_throughput.py                      # 6,000 generated 100x100 photos
    python benchmarks/image_throughput.py --images 100000      # the issue's scale (generation ~10 min)
    python benchmarks/image_throughput.py --images 3000 --size 64 --contract-size 32

Generates seeded fruit photos (``pipelines.images.generator``, 12 classes, JPEG) into a folder, then
runs each task in a process of its own, as Airflow does: land (the folder as zip shards), bronze,
silver, gold, and training (IncrementalPCA on the training split + logistic regression, and the
colour-histogram nearest-centroid baseline; no MLflow, whose logging is not the figure here). Prints
images/s per layer and landing -> gold, the PCA fit time, each task's peak memory (VmHWM; target
< 1.5 GB) and test accuracy beside the baseline. The lake is a ``LocalStore`` in a temp directory:
the same layer jobs and commit protocol as on the object store, without its network round trips.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATASET = "fruit_bench"
DELIVERY = "2026-04-01"
TARGET_MB = 1500


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _generate_share(args: tuple[str, int, int, int, int, int]) -> int:
    root, start, stop, per_class, size, seed = args
    from pipelines.images.generator import CLASSES, fruit_image

    n = 0
    for k in range(start, stop):
        i, c = divmod(k, len(CLASSES))
        name = CLASSES[c]
        if i >= per_class:
            break
        path = Path(root) / name / f"{name}-{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        fruit_image(name, i, size=size, seed=seed).save(path, format="JPEG", quality=90)
        n += 1
    return n


def generate(root: Path, images: int, size: int, seed: int, workers: int) -> int:
    from pipelines.images.generator import CLASSES

    per_class = -(-images // len(CLASSES))
    total = per_class * len(CLASSES)
    step = -(-total // (workers * 8))
    shares = [(str(root), s, min(s + step, total), per_class, size, seed) for s in range(0, total, step)]
    with multiprocessing.Pool(workers) as pool:
        return sum(pool.map(_generate_share, shares))


def run_phase(phase: str, root: Path) -> dict:
    """One task, in this process: its seconds, its result and this process's peak memory."""
    from pipelines.images import lake, model
    from pipelines.images.contract import load_image_contract
    from pipelines.storage import LocalStore

    store = LocalStore(root / "lake")
    started = time.perf_counter()
    if phase in ("silver", "gold"):  # the process's fixed start (GX import, context): reported apart
        from pipelines.quality import quality_context

        quality_context()
    startup = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    quiet = lambda _: None  # noqa: E731
    if phase == "land":
        result = {"objects": len(lake.land_images(root / "photos", DATASET, DELIVERY, store=store, progress=quiet))}
    elif phase == "bronze":
        result = lake.build_image_bronze(DELIVERY, "bench", dataset=DATASET, store=store, progress=quiet)
    elif phase == "silver":
        result = lake.build_image_silver(DELIVERY, "bench", dataset=DATASET, store=store, progress=quiet)
    elif phase == "gold":
        result = lake.build_image_gold(DELIVERY, "bench", dataset=DATASET, store=store, progress=quiet)
    else:
        snapshot = lake.gold_snapshot(store, DATASET)
        fit = model.fit_image_model(store, snapshot, load_image_contract(DATASET), progress=quiet)
        result = {"metrics": fit.metrics, "baseline": fit.baseline_metrics}
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "startup_seconds": startup,
        "peak_mb": _peak_mb(),
        "result": result,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000, help="photos to generate (12 classes)")
    ap.add_argument("--size", type=int, default=100, help="generated photos are SIZE x SIZE")
    ap.add_argument("--contract-size", type=int, help="silver resizes to this (default: --size)")
    ap.add_argument("--components", type=int, default=40, help="PCA components")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="processes generating photos (not measured)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, Path(args.root)), default=str))
        return 0

    size = args.contract_size or args.size
    root = Path(tempfile.mkdtemp(prefix="image-bench-"))
    contracts = root / "contracts" / "images"
    contracts.mkdir(parents=True)
    (contracts / f"{DATASET}.yaml").write_text(
        f"name: {DATASET}\nwidth: {size}\nheight: {size}\nmin_width: 16\nmin_height: 16\n"
        f"class_balance: [0.5, 2.0]\ntrain:\n  pca_components: {args.components}\n"
        f"  pca_batch_size: {2 * args.components}\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PLATFORM_"))},
        "PLATFORM_CONTRACTS_DIR": str(root / "contracts"),
        "PLATFORM_STATE_DIR": str(root / "state"),
    }
    try:
        print(f"generating {args.images:,} photos of {args.size}x{args.size} in {root} ...", flush=True)
        started = time.perf_counter()
        n = generate(root / "photos", args.images, args.size, args.seed, args.workers)
        mb = sum(p.stat().st_size for p in (root / "photos").rglob("*.jpg")) / 1e6
        print(
            f"  {n:,} photos, {mb:.0f} MB of JPEG, in {time.perf_counter() - started:.0f}s (not measured)\n", flush=True
        )
        phases: dict[str, dict] = {}
        for phase in ("land", "bronze", "silver", "gold", "train"):
            out = subprocess.run(
                [sys.executable, __file__, "--phase", phase, "--root", str(root)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode != 0:
                print(out.stdout[-2000:], out.stderr[-4000:], sep="\n")
                return 1
            phases[phase] = json.loads(out.stdout.strip().splitlines()[-1])
            p = phases[phase]
            print(
                f"  {phase:6s} {p['seconds']:7.1f}s ({p['cpu_seconds']:6.1f}s CPU) {n / p['seconds']:7.0f} images/s"
                f"  peak {p['peak_mb']:5.0f} MB  (+{p['startup_seconds']:.1f}s process start)",
                flush=True,
            )
        layers = sum(phases[p]["seconds"] for p in ("land", "bronze", "silver", "gold"))
        layers_cpu = sum(phases[p]["cpu_seconds"] for p in ("land", "bronze", "silver", "gold"))
        metrics, baseline = phases["train"]["result"]["metrics"], phases["train"]["result"]["baseline"]
        peak = max(p["peak_mb"] for p in phases.values())
        silver = phases["silver"]["result"]
        print()
        print(
            f"images: {n:,} generated at {args.size}x{args.size}, "
            f"silver at {size}x{size} ({size * size * 3:,} values each)"
        )
        print(f"quarantined: {silver['quarantined'] or 'none'}; GX silver gate passed: {silver['quality_success']}")
        print(
            f"landing -> gold: {layers:.1f}s = {n / layers:,.0f} images/s "
            f"({layers_cpu:.1f}s CPU; land, bronze, silver, gold: one process each, process starts excluded)"
        )
        print(
            f"PCA fit: {metrics['pca_fit_seconds']:.1f}s for {int(metrics['train_images']):,} training images, "
            f"{int(metrics['pca_components'])} components, explained variance {metrics['pca_explained_variance']:.3f}; "
            f"training task in all {phases['train']['seconds']:.1f}s"
        )
        verdict = "met" if peak < TARGET_MB else "NOT met"
        print(f"peak memory of a task: {peak:.0f} MB (target < {TARGET_MB} MB: {verdict})")
        print(
            f"test accuracy ({int(metrics['test_images']):,} images, {int(metrics['classes'])} classes): "
            f"model {metrics['accuracy']:.3f} (macro F1 {metrics['macro_f1']:.3f}) | baseline colour histogram + "
            f"nearest centroid {baseline['accuracy']:.3f} (macro F1 {baseline['macro_f1']:.3f}) | "
            f"majority class {metrics['chance_accuracy']:.3f}"
        )
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
