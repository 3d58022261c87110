"""A throwaway object store for the benchmarks: a temporary state directory with its own keys and a
free port, started, exported to this process's environment (so the children a benchmark runs reach
it), and stopped and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def object_store(prefix: str):
    """`with object_store("lake-bench-") as state:` the state directory of a running store."""
    from pipelines import services
    from pipelines.settings import get_settings

    state = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["PLATFORM_STATE_DIR"] = str(state)
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(var, None)
    try:
        settings = services.ensure_credentials(get_settings())
        services.write_stack_env(settings, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{services.free_port()}"})
        print(f"object store in {state} ...", flush=True)
        services.start_object_store(get_settings())
        os.environ.update(get_settings().client_env())
        yield state
    finally:
        services.down(progress=lambda _m: None)
        shutil.rmtree(state, ignore_errors=True)  # the store's data: GBs at the larger sizes
