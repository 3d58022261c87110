"""`platform monitor`: a dataset's recent monitoring windows and what each drift alarm started."""

from __future__ import annotations

import json


def cmd_monitor(args) -> int:
    from pipelines.monitoring.loop import format_monitor, loop_records, recent_windows
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    settings = get_settings()
    dataset = args.dataset or settings.dataset
    store = ObjectStore(settings)
    windows = recent_windows(store, dataset, args.windows)
    records = loop_records(dataset, store=store)
    if args.json:
        print(json.dumps({"dataset": dataset, "windows": windows, "alarms": records}, indent=2, default=str))
    else:
        print(f"dataset {dataset}: the last {len(windows)} window(s)")
        print(format_monitor(windows, records))
    return 0


def register_commands(sub) -> None:
    p = sub.add_parser("monitor", help="recent drift windows and verdicts, each alarm's retraining and rollout")
    p.add_argument("--dataset", help="dataset (contract) name; default PLATFORM_DATASET or iot_telemetry")
    p.add_argument("--windows", type=int, default=12, help="how many recent windows to show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_monitor)
