"""Image workload: photos of one class per folder through the same lake, gates, registry and canary.

landing (a folder or zip, one sub-folder per class) -> bronze (image bytes + metadata + lineage,
one row per distinct content hash) -> silver (decoded, EXIF-oriented, RGB, resized to the contract's
size; bad files quarantined with their reason; GX gate on the metadata) -> gold (pixels, colour
histogram, a stable train/test split by content hash) -> a model (IncrementalPCA fitted on the
training split inside the MLflow run, a classifier on top; both in one logged sklearn Pipeline)
registered with aliases, gated, and served by ``POST /classify``.

Modules: ``contract`` (what an image dataset is), ``generator`` (seeded photo-like fruit), ``decode``
(pure functions: bytes -> pixels or a quarantine reason), ``lake`` (the layer jobs), ``quality``
(the GX suites), ``model`` (training and the offline gate), ``serving`` (the endpoint).
"""
