"""Streamed features equal gold's: `StreamFeatures` (per-device running state, a pass of readings at a
time) replayed against `to_gold` on the same rows, on simulated fleets and the NAB series, with irregular
gaps, missing readings, stuck sensors, count and duration windows, micro-batches of any size, a
warm start, late and re-sent readings. Equal means equal as gold stores them (float32): at most one
float32 step apart (two float64 computations of a std may round to neighbouring float32 values).

Also: `SilverGate` passes a clean micro-batch exactly as `to_silver` would and hands anything with
something to quarantine to `to_silver` itself."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.contracts import load_contract
from pipelines.layers.bronze import parse_landing_csv
from pipelines.layers.gold import feature_columns, to_gold
from pipelines.layers.silver import to_silver
from pipelines.simulator import simulate_day_csv, stream_readings
from pipelines.streaming.features import StreamFeatures, feature_names

IOT = load_contract("iot_telemetry")
NAB = load_contract("nab_machine_temperature")
NOW = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)


def assert_features_equal(streamed: pd.DataFrame, gold: pd.DataFrame, names: list[str]) -> None:
    """Same keys, and every feature within one float32 step of gold's (or 1e-9 of it, near zero).

    One exception, gold's rounding noise: the std of a constant window (min == max, a stuck sensor)
    is 0, and streamed features give exactly 0 (z-score 0), but pandas' online variance in `to_gold`
    can leave ~1e-8 x |mean| (1.3e-6 for a humidity stuck at 66.1), above gold's _STD_EPSILON of
    1e-9 x (1 + |mean|). There gold's std must be that noise (< 1e-7 x (1 + |mean|)) and its z-score ~0."""
    assert names == feature_columns(gold)
    streamed = streamed.sort_values(["device", "ts"]).reset_index(drop=True)
    gold = gold.sort_values(["device", "ts"]).reset_index(drop=True)
    assert streamed["device"].tolist() == gold["device"].tolist()
    assert (streamed["ts"].to_numpy() == gold["ts"].to_numpy()).all()
    a = streamed[names].to_numpy().astype("float32")
    b = gold[names].to_numpy().astype("float32")
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    gap = np.abs(a.astype("float64") - b.astype("float64"))
    ok = (gap <= step) | (gap <= 1e-9)
    for col in {n.removesuffix("_roll_std") for n in names if n.endswith("_roll_std")}:
        constant = (gold[f"{col}_roll_min"] == gold[f"{col}_roll_max"]).to_numpy()
        std, z = names.index(f"{col}_roll_std"), names.index(f"{col}_zscore")
        noise = gold[f"{col}_roll_std"].to_numpy() < 1e-7 * (1 + gold[f"{col}_roll_mean"].abs().to_numpy())
        assert (streamed.loc[constant, [f"{col}_roll_std", f"{col}_zscore"]] == 0).all().all(), col
        assert noise[constant].all() and (gold.loc[constant, f"{col}_zscore"].abs() < 1e-6).all(), col
        ok[constant, std] = ok[constant, z] = True
    if not ok.all():
        rows, cols = np.nonzero(~ok)
        examples = [(names[c], int(r), float(a[r, c]), float(b[r, c])) for r, c in zip(rows[:5], cols[:5], strict=True)]
        raise AssertionError(
            f"{int((~ok).sum())} features differ from gold's, e.g. (feature, row, streamed, gold) {examples}"
        )
    assert (a != b).mean() < 1e-3, "neighbouring float32 values should be rare"


def replay(features: StreamFeatures, silver: pd.DataFrame, seed: int = 0, max_batch: int = 400) -> pd.DataFrame:
    """Feed `silver` as the stream delivers it: time-major micro-batches of random sizes, shuffled."""
    rng = np.random.default_rng(seed)
    ordered = silver.sort_values(["ts", "device"], kind="stable").reset_index(drop=True)
    out, i = [], 0
    while i < len(ordered):
        n = int(rng.integers(1, max_batch))
        out.append(features.features(ordered.iloc[i : i + n].sample(frac=1, random_state=i)))
        i += n
    return pd.concat(out, ignore_index=True)


def simulated_silver(days: int = 2, devices: int = 4, seed: int = 7) -> pd.DataFrame:
    """Simulated silver with what real fleets do: irregular gaps, a 5 h outage, missing readings (a
    device's very first ones too), a stuck sensor."""
    frames = []
    for i in range(days):
        raw = pd.read_csv(
            io.BytesIO(simulate_day_csv(dt.date(2026, 1, 5) + dt.timedelta(days=i), devices, 60, seed)), dtype=str
        )
        raw["_parse_error"] = None
        silver, _ = to_silver(raw, IOT, now=NOW)
        frames.append(silver)
    silver = pd.concat(frames, ignore_index=True)
    rng = np.random.default_rng(seed)
    silver = silver[rng.random(len(silver)) > 0.1]  # irregular gaps
    outage = (silver["device"] == "device-02") & silver["ts"].between(
        pd.Timestamp("2026-01-05 20:00", tz="UTC"), pd.Timestamp("2026-01-06 01:00", tz="UTC")
    )
    silver = silver[~outage].reset_index(drop=True)
    missing = rng.random(len(silver)) < 0.03
    silver.loc[missing, "temp"] = np.nan
    silver.loc[rng.random(len(silver)) < 0.02, "humidity"] = np.nan
    first = silver.groupby("device").head(3).index[:3]
    silver.loc[first, ["co", "lpg"]] = np.nan  # a device whose first readings are missing: 0.0 until known
    stuck = silver.index[(silver["device"] == "device-03")][300:360]
    silver.loc[stuck, "temp"] = 23.25  # a stuck sensor: flat count, std 0, z-score 0
    silver.loc[stuck, "smoke"] = silver.loc[stuck[0], "smoke"]
    return silver


@pytest.mark.parametrize(("window", "long_window"), [("15min", "4h"), (15, 240), ("15min", 240), (5, "1h")])
def test_streamed_features_equal_gold_on_a_simulated_fleet(window, long_window):
    silver = simulated_silver()
    features = StreamFeatures(IOT, window, long_window)
    assert features.names == feature_names(IOT)
    streamed = replay(features, silver)
    assert features.late == 0
    assert_features_equal(streamed, to_gold(silver, IOT, window, long_window=long_window), features.names)


def nab_silver(nab_csv) -> pd.DataFrame:
    table = parse_landing_csv(
        nab_csv.read_bytes(),
        source_key=f"landing/nab/{nab_csv.name}",
        source_etag="etag-1",
        run_id="run-1",
        ingested_at=NOW,
        contract=NAB,
    )
    silver, _ = to_silver(table, NAB, now=NOW)
    rng = np.random.default_rng(3)
    # Its readings come every 5 minutes: make the gaps irregular, and a 9 h outage.
    silver = silver[(rng.random(len(silver)) > 0.15) & ~silver.index.isin(range(9000, 9108))].reset_index(drop=True)
    silver.loc[rng.random(len(silver)) < 0.02, "temp"] = np.nan
    silver.loc[silver.index[5000:5100], "temp"] = 30.0  # stuck
    return silver


@pytest.mark.parametrize(("window", "long_window"), [("3600s", "86400s"), (12, 288), ("2h", 48)])
def test_streamed_features_equal_gold_on_the_nab_series(nab_csv, window, long_window):
    """One machine, real temperatures (5-minute readings made irregular; missing and stuck ones added)."""
    silver = nab_silver(nab_csv)
    assert silver["ts"].diff().dropna().nunique() > 5
    features = StreamFeatures(NAB, window, long_window)
    streamed = replay(features, silver, max_batch=50)
    assert_features_equal(streamed, to_gold(silver, NAB, window, long_window=long_window), features.names)


@pytest.mark.parametrize(("window", "long_window"), [(15, 240), ("15min", "4h")])
def test_passes_of_hundreds_of_readings_per_device_equal_gold_and_the_state_stays_bounded(window, long_window):
    """Each device's readings of a pass go through its windows together: a pass may hold hours of one
    device. What a device holds stays bounded: its windows twice over (for late readings) and a pass;
    at the stream's pass sizes the pool never widens."""
    silver = simulated_silver()
    features = StreamFeatures(IOT, window, long_window)
    streamed = replay(features, silver, seed=1, max_batch=3000)
    assert features.late == 0
    assert_features_equal(streamed, to_gold(silver, IOT, window, long_window=long_window), features.names)
    per_device = silver.groupby("device").size().min()  # ~2,600 readings each
    assert features._held[: len(features.devices)].max() <= 2 * 240 + 64 + 3000 // 2 < per_device
    assert all(len(ranked) <= 240 for dev in features.devices.values() for ranked in dev.ranked)
    small = StreamFeatures(IOT, window, long_window)
    cap = small._cap
    replay(small, silver, seed=2, max_batch=100)
    assert small._cap == cap and small._held[: len(small.devices)].max() <= cap


def test_one_pass_mixing_a_new_device_long_running_ones_and_a_late_reading():
    """device-03 starts at the cut (its first readings, missing values among them, in a pass with
    devices that have a day of history); device-01's reading from before the cut arrives in the same
    pass, after its later ones: that device takes the per-reading path, the others the vectorised one."""
    silver = simulated_silver()
    cut = pd.Timestamp("2026-01-06 00:00", tz="UTC")
    silver = silver[~((silver["device"] == "device-03") & (silver["ts"] < cut))].reset_index(drop=True)
    first = silver.index[(silver["device"] == "device-03")][:3]
    silver.loc[first[1:], "temp"] = np.nan  # forward-filled from its first reading
    held_back = silver.index[(silver["device"] == "device-01") & (silver["ts"] < cut)][-20]
    before, after = silver[silver["ts"] < cut].drop(index=[held_back]), silver[silver["ts"] >= cut]
    features = StreamFeatures(IOT, 15, 240)
    replay(features, before)
    big = after[after["ts"] < cut + pd.Timedelta(hours=2)]
    streamed = [features.features(pd.concat([big, silver.loc[[held_back]]]).sample(frac=1, random_state=2))]
    assert features.late == 1
    streamed.append(replay(features, after[after["ts"] >= cut + pd.Timedelta(hours=2)]))
    streamed = pd.concat(streamed, ignore_index=True)
    gold = to_gold(silver, IOT, 15, long_window=240)
    keys = pd.concat([big, silver.loc[[held_back]], after]).drop_duplicates(["device", "ts"])
    wanted = gold.set_index(["device", "ts"]).index.isin(keys.set_index(["device", "ts"]).index)
    assert len(streamed) == wanted.sum() == len(after) + 1
    assert_features_equal(streamed, gold[wanted], features.names)


def test_a_warm_start_from_earlier_rows_continues_as_gold_does():
    """The scorer restarts, warms each device's windows up from bronze's rows, then streams on."""
    silver = simulated_silver()
    cut = pd.Timestamp("2026-01-06 03:00", tz="UTC")
    features = StreamFeatures(IOT, "15min", "4h")
    features.warm_up(silver[silver["ts"] < cut])
    later = silver[silver["ts"] >= cut]
    gold = to_gold(silver, IOT, "15min", long_window="4h")
    assert_features_equal(replay(features, later), gold[gold["ts"] >= cut], features.names)


def test_late_and_resent_readings_take_their_place_in_the_windows():
    """A reading that arrives after later ones of its device is scored with the readings before it,
    and the readings after it see it, as gold (built afterwards from all rows) does. A reading re-sent
    with other values replaces the first delivery (silver keeps the latest)."""
    silver = simulated_silver(days=1).sort_values(["ts", "device"]).reset_index(drop=True)
    rng = np.random.default_rng(5)
    late = sorted(rng.choice(np.arange(500, len(silver) // 2), size=12, replace=False).tolist())
    resent = silver.loc[[700]].assign(temp=silver.loc[700, "temp"] + 3.0)
    features = StreamFeatures(IOT, "15min", "4h")
    delivered, held = [], []
    for i in range(0, len(silver), 40):
        batch = silver.iloc[i : i + 40]
        held += [(i + 80, k) for k in batch.index if k in late]  # two batches later: older than its device's latest
        delivered.append(features.features(batch.drop(index=[k for k in batch.index if k in late])))
        due = [k for when, k in held if when <= i]
        if due:
            delivered.append(features.features(silver.loc[due]))
            held = [(when, k) for when, k in held if when > i]
        if i == 1200:
            delivered.append(features.features(resent))
    assert not held and features.late == len(late) + 1
    final = silver.copy()
    final.loc[700, "temp"] = resent["temp"].iloc[0]
    gold = to_gold(final, IOT, "15min", long_window="4h")
    streamed = pd.concat(delivered, ignore_index=True)
    keys = silver.loc[late].set_index(["device", "ts"]).index
    late_rows = streamed[streamed.set_index(["device", "ts"]).index.isin(keys)]
    assert len(late_rows) == len(late)
    assert_features_equal(late_rows, gold[gold.set_index(["device", "ts"]).index.isin(keys)], features.names)
    # everything after the windows of the last late reading and the re-sent one sees them in its windows
    settled = silver.loc[[*late, 700], "ts"].max() + pd.Timedelta(hours=4, minutes=15)
    after = streamed[streamed["ts"] > settled]
    assert len(after) > 1000
    assert_features_equal(after, gold[gold["ts"] > settled], features.names)


# ------------------------------------------------------------------------------------- silver gate


def _table(records: list[dict]):
    from pipelines.streaming.messages import MessageReader, bronze_table

    reader = MessageReader("iot_telemetry", IOT)
    readings = [reader.read(f"sensors/iot_telemetry/{r['device']}", json.dumps(r).encode()) for r in records]
    return bronze_table(readings, reader.columns, batch_key="k", run_id="r", ingested_at=pd.Timestamp.now(tz="UTC"))


def test_the_silver_gate_passes_clean_batches_as_silver_does_and_hands_the_rest_to_silver():
    from pipelines.streaming.scoring import SilverGate

    records = [r for r in stream_readings(dt.date(2026, 1, 5), 1, devices=6, freq_seconds=60) if r["seq"] < 30]
    gate = SilverGate(IOT)
    table = _table(records)
    silver, quarantine = gate.split(table)
    expected, expected_quarantine = to_silver(table, IOT)
    pd.testing.assert_frame_equal(silver, expected)
    assert len(quarantine) == len(expected_quarantine) == 0 and gate.full_batches == 0

    future = int(dt.datetime.now(dt.UTC).timestamp()) + 86_400
    bad = {
        "range": {"temp": 300.0},
        "type": {"humidity": "wet"},
        "missing": {"co": None},
        "nan": {"lpg": "nan"},
        "bool": {"motion": "maybe"},
        "future": {"ts": future},
        "epoch text": {"ts": "yesterday"},
    }
    for i, (case, change) in enumerate(bad.items()):
        broken = [dict(r) for r in records]
        broken[10 + i] |= change
        table = _table(broken)
        silver, quarantine = gate.split(table)
        expected, expected_quarantine = to_silver(table, IOT)
        pd.testing.assert_frame_equal(silver, expected, obj=case)
        assert quarantine["rule"].tolist() == expected_quarantine["rule"].tolist() and len(quarantine) == 1, case
        assert gate.full_batches == i + 1, case
    # the same (device, ts) twice: different values (latest wins, the other quarantined), then identical
    for values, quarantined in (({"temp": 30.0, "seq": 10_000}, 1), ({"seq": 10_001}, 0)):
        table = _table([*records, records[3] | values])
        silver, quarantine = gate.split(table)
        expected, expected_quarantine = to_silver(table, IOT)
        pd.testing.assert_frame_equal(silver, expected)
        assert len(quarantine) == len(expected_quarantine) == quarantined
