"""`platform serve` and `platform canary ...`: registered into the main CLI by ``register_commands``."""

from __future__ import annotations

import argparse
import getpass
import json


def _actor(args) -> str:
    return args.actor or f"{getpass.getuser()}@cli"


def cmd_serve(args) -> int:
    from pipelines.serving.app import run

    run(args.host, args.port)
    return 0


def cmd_status(args) -> int:
    from pipelines.canary import controller

    status = controller.status(dataset=args.dataset)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    s = status["state"]
    print(f"model      {status['model_name']}  aliases {status['aliases']}")
    print(f"rollout    {s['rollout_id'] or '-'}  status {s['status']}")
    if s["rollout_id"]:
        print(
            f"step       {s['step_name']} ({s['step_index'] + 1}/{len(status['steps'])})"
            f"  weight {s['weight']}%"
            f"  shadow {s['shadow']}  since {s['step_started_at']}"
        )
        print(f"versions   challenger v{s['challenger_version']} vs champion v{s['champion_version']}")
        print(f"updated    {s['updated_at']} by {s['updated_by']}: {s['reason']}")
        for name, m in (s.get("last_verdict") or {}).get("metrics", {}).items():
            print(
                f"  {name:<12} {m['verdict']:<12} champion={m['champion']} challenger={m['challenger']} "
                f"p={m['p_value']} n={m['n_champion']}/{m['n_challenger']}  {m['detail']}"
            )
    return 0


def cmd_history(args) -> int:
    from pipelines.canary import controller

    events = controller.history_events(dataset=args.dataset)
    if args.json:
        print(json.dumps(events, indent=2, default=str))
        return 0
    for e in events:
        print(f"{e['at']:<29} v{e['version']:<4} {e['event']:<40} by {e['actor']:<20} {e['reason'][:120]}")
    return 0


def cmd_start(args) -> int:
    from pipelines.canary import controller

    state = controller.start_rollout(actor=_actor(args), reason=args.reason, dataset=args.dataset)
    print(controller.stage_note(state))
    return 0


def cmd_step(args) -> int:
    from pipelines.canary import controller

    result = controller.evaluate_step(actor=_actor(args), dataset=args.dataset)
    print(result["note"])
    return 0


def cmd_promote(args) -> int:
    from pipelines.canary import controller

    print(
        controller.promote(
            actor=_actor(args), reason=args.reason, version=args.version, force=args.force, dataset=args.dataset
        )
    )
    return 0


def cmd_rollback(args) -> int:
    from pipelines.canary import controller

    result = controller.rollback(actor=_actor(args), reason=args.reason, dataset=args.dataset)
    print(result.get("note") or result)
    return 0


def cmd_set_weight(args) -> int:
    from pipelines.canary import controller

    state = controller.set_weight(
        args.weight, args.shadow, actor=_actor(args), reason=args.reason, dataset=args.dataset
    )
    print(controller.stage_note(state))
    return 0


def register_commands(subparsers) -> None:
    """Add `serve` and `canary ...` to the `platform` parser's subparsers."""
    p = subparsers.add_parser("serve", help="run the scoring service (champion/challenger, canary routing)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)

    canary = subparsers.add_parser("canary", help="canary rollout of the challenger: status, history, actions")
    canary.add_argument("--dataset", help="the dataset whose model rolls out (default: PLATFORM_DATASET)")
    sub = canary.add_subparsers(dest="canary_command", required=True)

    def with_actor(parser: argparse.ArgumentParser, reason_required: bool = True) -> argparse.ArgumentParser:
        parser.add_argument("--reason", required=reason_required, default="", help="recorded with the change")
        parser.add_argument("--actor", help="who makes the change (default: <user>@cli)")
        return parser

    p = sub.add_parser("status", help="current step, weight and the numbers behind the last verdict")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("history", help="every rollout event and alias change, with who and why")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    with_actor(
        sub.add_parser("start", help="start a rollout of `challenger` against `champion`"),
        reason_required=False,
    ).set_defaults(func=cmd_start)
    with_actor(
        sub.add_parser("step", help="evaluate the current step once (what the DAG does)"),
        reason_required=False,
    ).set_defaults(func=cmd_step)
    p = with_actor(sub.add_parser("promote", help="champion <- challenger (or --version) now"))
    p.add_argument("--version")
    p.add_argument("--force", action="store_true", help="promote even without a passed offline gate")
    p.set_defaults(func=cmd_promote)
    with_actor(sub.add_parser("rollback", help="abort the running rollout, or champion <- previous")).set_defaults(
        func=cmd_rollback
    )
    p = with_actor(sub.add_parser("set-weight", help="override the running rollout's challenger weight"))
    p.add_argument("weight", type=int, help="percent of devices routed to the challenger (0..100)")
    p.add_argument("--shadow", choices=["none", "challenger", "champion"])
    p.set_defaults(func=cmd_set_weight)
