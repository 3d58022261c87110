"""``python -m pipelines.serving [--host H] [--port P]``: the scoring service (same as ``platform serve``)."""

import argparse
import sys

from pipelines.services import StackNotOurs
from pipelines.serving.app import run

parser = argparse.ArgumentParser(prog="python -m pipelines.serving")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args = parser.parse_args()
try:
    run(args.host, args.port)
except StackNotOurs as exc:
    sys.exit(f"error: {exc}")
