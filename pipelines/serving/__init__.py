"""The scoring service: champion/challenger from the registry, micro-batched, routed, logged.

* ``config``   - the service's own settings (env prefix PLATFORM_SERVING_) and params.yaml ``serving``
* ``routing``  - pure: sticky per-device routing by weight
* ``batching`` - concurrent requests merged into one predict per model, each gets its own answer
* ``models``   - versions loaded by alias, polled, swapped atomically; rollout state from the lake
* ``predlog``  - the prediction log and feedback tables in the lake (batched Parquet writes)
* ``app``      - the HTTP endpoints (Starlette on uvicorn)
"""
