"""`platform land --images DIR --dataset NAME`: land a folder or zip of class sub-folders (the CLI's glue)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def land_command(args) -> int:
    from pipelines.images.contract import ImageContractError, load_image_contract
    from pipelines.images.lake import ImageDeliveryError, land_images

    dataset = args.dataset
    if not dataset:
        raise SystemExit("--images needs --dataset NAME: an image contract (pipelines/images/contracts/NAME.yaml)")
    try:
        load_image_contract(dataset)
        delivery = dt.date.fromisoformat(args.date).isoformat() if args.date else None
    except ImageContractError as exc:
        raise SystemExit(str(exc)) from None
    except ValueError:
        raise SystemExit(f"--date {args.date!r} is not a date: write YYYY-MM-DD") from None
    try:
        keys = land_images(Path(args.images), dataset, delivery)
    except ImageDeliveryError as exc:
        raise SystemExit(str(exc)) from None
    delivery = keys[0].split("/")[1] if keys else delivery
    print(f"landed {len(keys)} object(s) for image dataset {dataset}, delivery {delivery}")
    print(f'next: trigger DAG {dataset}_images with conf {{"delivery_date": "{delivery}"}}')
    return 0
