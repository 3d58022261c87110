"""`platform stage`, `platform reproduce` and `platform dvc-remote`: the DVC side of the command line.

`pipelines.cli.build_parser` adds these with `register_commands(sub)`. This module also runs on its
own (`python -m pipelines.reproduce_cli stage ingest`) for checkouts whose cli.py predates it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_stage(args) -> int:
    from pipelines.dvc_stages import STAGES

    STAGES[args.name](Path(args.root).resolve())
    return 0


def cmd_reproduce(args) -> int:
    from pipelines.reproduce import reproduce
    from pipelines.settings import REPO_ROOT

    report = reproduce(
        args.model,
        repo=Path(args.repo).resolve() if args.repo else REPO_ROOT,
        force=args.force,
        keep=args.keep,
        progress=(lambda _msg: None) if args.json else print,
    )
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.summary())
    return 0 if report.identical else 3


def cmd_dvc_remote(args) -> int:
    from pipelines.reproduce import configure_remote
    from pipelines.settings import REPO_ROOT

    endpoint = configure_remote(Path(args.repo).resolve() if args.repo else REPO_ROOT)
    print(f"DVC remote 'store' (s3://dvc/store) -> {endpoint}, written to .dvc/config.local")
    return 0


def register_commands(subparsers) -> None:
    from pipelines.dvc_stages import STAGES

    p = subparsers.add_parser("stage", help="run one DVC pipeline stage (what dvc.yaml calls)")
    p.add_argument("name", choices=list(STAGES))
    p.add_argument("--root", default=".", help="the checkout holding dvc.yaml and params.yaml (default: .)")
    p.set_defaults(func=cmd_stage)

    p = subparsers.add_parser(
        "reproduce",
        help="rebuild a registered model from its git commit and DVC data, and compare metrics",
        description="Exit status: 0 identical, 3 differences found (listed), 1 error.",
    )
    p.add_argument("model", help="MODEL@ALIAS (iot-anomaly-detector@champion) or MODEL/VERSION")
    p.add_argument("--repo", help="git repository holding the run's commit (default: this checkout)")
    p.add_argument("--force", action="store_true", help="re-run every stage, not only changed ones")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktree for inspection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = subparsers.add_parser(
        "dvc-remote", help="point the DVC remote at this stack's object store (.dvc/config.local)"
    )
    p.add_argument("--repo", help="checkout to configure (default: this one)")
    p.set_defaults(func=cmd_dvc_remote)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="platform", description=__doc__)
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as e:  # noqa: BLE001 - one clear line, like pipelines.cli
        import os

        if os.environ.get("PLATFORM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
