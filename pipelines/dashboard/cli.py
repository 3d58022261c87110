"""`platform dashboard`: registered on the `platform` parser."""

from __future__ import annotations

import argparse


def register_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="a live web page: readings per device with anomalies, alerts, drift, model versions, canary stage",
    )
    p.add_argument("--dataset", action="append", help="a dataset to show (repeatable; default: every dataset)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8720, help="port (default 8720)")
    p.add_argument("--hours", type=float, default=24.0, help="hours of readings shown per device (default 24)")
    p.add_argument("--refresh-seconds", type=float, default=2.0, help="how often the lake is re-read (default 2)")
    p.add_argument("--model-name", help="the registered model to show and score with (default: the dataset's)")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    import logging
    import os

    from pipelines.dashboard.app import run
    from pipelines.dashboard.data import DashboardConfig
    from pipelines.datasets import catalogue, get_dataset

    logging.basicConfig(
        level=os.environ.get("PLATFORM_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(message)s"
    )
    datasets = args.dataset or sorted(catalogue())
    for name in datasets:
        get_dataset(name)  # an unknown name fails here, with the known ones listed
    if args.model_name and len(datasets) != 1:
        raise ValueError("--model-name names one dataset's model: give exactly one --dataset with it")
    cfg = DashboardConfig(hours=args.hours, refresh_seconds=args.refresh_seconds)
    model_names = {datasets[0]: args.model_name} if args.model_name else None
    run(datasets, host=args.host, port=args.port, cfg=cfg, model_names=model_names)
    return 0
