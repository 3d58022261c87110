"""Canary promotion of the `challenger` model: steps as data, pure analysis, a durable state machine.

Modules, in the order a rollout uses them:

* ``stages``   - the steps (shadow -> 10% -> 50% -> 100%) and analysis thresholds, read from params.yaml
* ``analysis`` - pure statistics: metrics of champion and challenger in, Pass/Inconclusive/Fail out
* ``state``    - the rollout state (``serving/rollout.json`` in the lake) and its pure transitions
* ``history``  - append-only log of every rollout event and alias change (lake + version tags)
* ``controller`` - the I/O edge: read the prediction log, analyse, move weights and aliases
"""
