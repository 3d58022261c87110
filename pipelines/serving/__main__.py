"""``python -m pipelines.serving [--host H] [--port P]``: the scoring service (same as ``platform serve``)."""

import argparse

from pipelines.serving.app import run

parser = argparse.ArgumentParser(prog="python -m pipelines.serving")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args = parser.parse_args()
run(args.host, args.port)
