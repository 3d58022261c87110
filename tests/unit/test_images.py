"""Image workload, pure parts: the generator, decoding and its quarantine rules, histograms, the
layers' transforms, the silver gate's class balance, and the model (PCA inside it) on a local lake."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipelines.images import decode, generator, lake
from pipelines.images.contract import ImageContract, ImageContractError, load_image_contract, parse_input_name


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_generator_is_seeded_per_image_with_at_least_ten_distinct_classes():
    assert len(generator.CLASSES) >= 10
    a = generator.fruit_image("kiwi", 3, size=32, seed=7)
    assert a.tobytes() == generator.fruit_image("kiwi", 3, size=32, seed=7).tobytes()
    assert a.tobytes() != generator.fruit_image("kiwi", 4, size=32, seed=7).tobytes()
    assert a.tobytes() != generator.fruit_image("kiwi", 3, size=32, seed=8).tobytes()
    # classes differ in colour: the mean colour of a lime is greener than a strawberry's, on average
    mean = {
        c: np.mean([np.asarray(generator.fruit_image(c, i, size=32)) for i in range(8)], axis=(0, 1, 2))
        for c in ("lime", "strawberry")
    }
    assert mean["lime"][1] - mean["lime"][0] > mean["strawberry"][1] - mean["strawberry"][0]
    files = list(generator.fruit_files(2, size=24, classes=("lime", "kiwi")))
    assert [p for p, _ in files] == [
        "lime/lime-000000.jpg",
        "kiwi/kiwi-000000.jpg",
        "lime/lime-000001.jpg",
        "kiwi/kiwi-000001.jpg",
    ]


def test_decode_fits_to_the_contract_size_and_names_each_bad_file():
    photo = _encode(generator.fruit_image("orange", 0, size=64), "JPEG", quality=90)
    ok = decode.decode_image(photo, 16, 12)
    assert isinstance(ok, decode.Decoded)
    assert len(ok.pixels) == 16 * 12 * 3 and (ok.orig_width, ok.orig_height, ok.orig_format) == (64, 64, "JPEG")
    png = _encode(generator.fruit_image("orange", 0, size=64))
    cases = {
        "truncated": png[: len(png) // 2],
        "not_an_image": b"shopping list: 3 lemons\n",
        "corrupt": png[:100] + b"\x00" * 64 + png[164:],
        "too_small": _encode(Image.new("RGB", (8, 8))),
        "bad_aspect": _encode(Image.new("RGB", (100, 20))),
    }
    for rule, data in cases.items():
        got = decode.decode_image(data, 16, 16, min_width=10, min_height=10, max_aspect_ratio=3.0)
        assert isinstance(got, decode.Rejected) and got.rule == rule, (rule, got)
        assert got.reason and got.fix == decode.RULES[rule]
    assert decode.decode_image(photo, 16, 16, max_bytes=100).rule == "too_large"


def test_exif_orientation_transparency_and_grey_levels_become_upright_rgb():
    # 40 x 20, left half red, right half blue; EXIF 6 says "turn 90 degrees clockwise to view"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    turned = decode.decode_image(_encode(image, "PNG", exif=exif.tobytes()), 20, 40)
    assert (turned.orig_width, turned.orig_height, turned.exif_transposed) == (20, 40, True)
    pixels = np.frombuffer(turned.pixels, np.uint8).reshape(40, 20, 3)
    assert pixels[2, 10].tolist() == [255, 0, 0] and pixels[37, 10].tolist() == [0, 0, 255]  # red on top
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert set(decode.decode_image(_encode(clear), 10, 10).pixels) == {255}  # transparent -> white
    grey = decode.decode_image(_encode(Image.new("L", (10, 10), 128)), 10, 10)
    assert grey.orig_mode == "L" and set(grey.pixels) == {128}


def test_colour_histograms_sum_to_one_in_the_right_bins():
    red = np.tile([255, 0, 0], 16).astype(np.uint8)
    half = np.concatenate([np.tile([255, 0, 0], 8), np.tile([0, 0, 255], 8)]).astype(np.uint8)
    h = decode.colour_histograms(np.stack([red, half]))
    assert h.shape == (2, 64) and np.allclose(h.sum(axis=1), 1.0)
    assert h[0, 3 * 16] == 1.0 and h[1, 3 * 16] == 0.5 and h[1, 3] == 0.5


def test_archive_classes_come_from_sub_folders_and_a_wrapping_folder_is_skipped():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("fruits/lime/a.jpg", "fruits/kiwi/b.jpg", "fruits/.DS_Store", "__MACOSX/fruits/._a.jpg"):
            zf.writestr(name, b"x")
    with zipfile.ZipFile(buf) as zf:
        entries, root = lake._archive_entries(zf)
    assert [e.filename for e in entries] == ["fruits/kiwi/b.jpg", "fruits/lime/a.jpg"] and root == "fruits"
    assert lake._entry_label("fruits/lime/a.jpg".split("/"), root) == ("lime", "lime/a.jpg")
    assert lake._entry_label(["loose.jpg"], None) == (None, "loose.jpg")  # at the root: unlabelled


def test_split_by_content_hash_is_stable_and_near_the_fraction():
    hashes = [f"{i:064x}" for i in range(0, 2**32, 2**32 // 4000)][:4000]
    hashes = [__import__("hashlib").sha256(h.encode()).hexdigest() for h in hashes]
    splits = [lake.split_of(h, 0.25) for h in hashes]
    assert splits == [lake.split_of(h, 0.25) for h in hashes]
    assert 0.22 < splits.count("test") / len(splits) < 0.28


def _contract(**kw) -> ImageContract:
    base = {"name": "tiny", "width": 8, "height": 8, "min_width": 4, "min_height": 4, "classes": []}
    return ImageContract.model_validate({**base, **kw})


def test_contracts_load_and_an_unknown_key_or_dataset_is_named():
    fruit = load_image_contract("fruit_photos")
    assert fruit.input_name == f"rgb_{fruit.width}x{fruit.height}" and parse_input_name(fruit.input_name) == (32, 32)
    with pytest.raises(ImageContractError, match="no_such"):
        load_image_contract("no_such")
    with pytest.raises(Exception, match="colour"):
        ImageContract.model_validate({"name": "x", "width": 8, "height": 8, "colour": "red"})


def test_silver_and_gold_transforms_keep_lineage_and_quarantine_with_reasons():
    import pyarrow as pa

    images = [_encode(generator.fruit_image("lime", i, size=16)) for i in range(3)] + [b"not an image"]
    bronze = pa.Table.from_pylist(
        [
            {
                "content_sha256": f"{i:064x}",
                "label": "lime",
                "source_object": "x.zip",
                "source_path": f"lime/{i}.png",
                "byte_size": len(d),
                "delivery": "2026-03-01",
                "ingested_at": None,
                "image": d,
            }
            for i, d in enumerate(images)
        ],
        schema=lake.BRONZE_SCHEMA,
    )
    silver, bad = lake.to_silver(bronze, _contract())
    assert silver.num_rows == 3 and bad.num_rows == 1
    assert bad.column("rule").to_pylist() == ["not_an_image"] and bad.column("source_path").to_pylist() == [
        "lime/3.png"
    ]
    assert set(silver.column("pixel_bytes").to_pylist()) == {8 * 8 * 3}
    gold = lake.to_gold(silver, _contract())
    hist = np.column_stack([gold.column(c).to_numpy() for c in lake.HIST_COLUMNS])
    assert np.allclose(hist.sum(axis=1), 1.0) and gold.column("pixels").equals(silver.column("pixels"))


def test_silver_gate_fails_an_unbalanced_delivery_and_passes_a_balanced_one():
    import pandas as pd

    from pipelines.images.quality import silver_suite, validate_images, with_class_share

    contract = _contract(class_balance=(0.5, 2.0))

    def meta(counts: dict[str, int]) -> pd.DataFrame:
        labels = [c for c, n in counts.items() for _ in range(n)]
        return with_class_share(
            pd.DataFrame(
                {
                    "content_sha256": [f"{i:064x}" for i in range(len(labels))],
                    "label": labels,
                    "width": 8,
                    "height": 8,
                    "channels": 3,
                    "pixel_bytes": 192,
                    "orig_width": 8,
                    "orig_height": 8,
                }
            )
        )

    balanced = meta({"a": 10, "b": 12, "c": 9})
    assert validate_images(balanced, silver_suite(contract, "tiny", balanced), "silver", "tiny", "p").success
    skewed = meta({"a": 40, "b": 3, "c": 9})
    result = validate_images(skewed, silver_suite(contract, "tiny", skewed), "silver", "tiny", "p")
    failed = [o for o in result.critical_failures if o.column == "class_share"]
    assert not result.success and failed and failed[0].unexpected_count == 43  # a's 40 and b's 3
