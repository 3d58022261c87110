"""Contextual anomaly detector (after CAD OSE, Smirnov 2016, as described in NAB), causal and streaming.

Each reading is quantised to a few bits of its position in a value range; the set of "facts" (bit
positions) of the previous step plus the contexts that were active then form a left semi-context,
the current facts a right one. The detector remembers every (left, right) pair it has seen. The
raw anomaly of a reading is high when few of the remembered contexts selected by the previous step
are confirmed by the current facts, and when many new contexts have to be created to represent it.

Differences from NAB's CAD OSE, all to keep it causal and streaming:

* Value range: NAB passes the min/max of the *whole file* (future rows). Here it is learned from the
  series' own past, twice. The first ``warmup`` readings are buffered and scored 0; then the range is
  set to their min/max widened by ``range_margin`` times the span on each side, and the buffer is
  replayed into an empty context memory. At ``refit_at`` readings the range is learned again the same
  way from all readings so far (which were scored with the first range), the memory is rebuilt by
  replaying them, and the range stays fixed from then on. Readings outside the range get a bounded
  "above/below range by k octaves" fact, a new fact and so a novel context (no unbounded bit growth).
* Rest period: NAB uses a fifth of the probationary period (which depends on the file length);
  here it is a fixed number of readings (``rest_period``): after a raw score >= ``base_threshold``
  the next ``rest_period`` readings score 0, so an event gives one spike.
* NaN/inf readings score 0 and leave the state unchanged. The timestamp is not used (row order
  only), so irregular cadence is accepted as is.
* Measured worse on NAB and removed: raw scores through HTM's anomaly likelihood instead of the
  rest period (43.0 standard vs 64.5), and quantile ("rank") levels instead of the range (much slower).

Scale: the range is learned from the series itself, so scores are invariant to affine changes of
units (up to float rounding at quantisation edges).

The state is plain Python data (ints, lists, dicts with int keys); context identities are the
CPython hashes of tuples of ints, which are deterministic across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

NEURON_OFFSET = 2**31
BELOW_RANGE_FACT = -1


@dataclass
class ContextualConfig:
    base_threshold: float = 0.75
    rest_period: int = 120
    max_left_semi_context_len: int = 7
    max_active_neurons: int = 15
    num_value_bits: int = 3
    warmup: int = 150
    range_margin: float = 1.0
    max_octaves: int = 4
    refit_at: int = 750  # if > warmup: at this many readings re-learn the range from all of them and replay
    # Alarm at score >= this. Not used by the algorithm: the one threshold NAB's standard profile
    # chose for this detector over the 45 labelled series of ../shared (benchmarks/nab.py, 0.572),
    # i.e. set from labelled history of this kind of data, never from the dataset being trained.
    alarm_threshold: float = 0.572


@dataclass
class ContextualState:
    n_seen: int = 0
    warm_values: list = field(default_factory=list)
    min_value: float = math.nan
    value_step: float = math.nan
    # semi-contexts: side 0 = left, 1 = right
    semi_ids: list = field(default_factory=lambda: [{}, {}])  # hash -> id
    semi_len: list = field(default_factory=lambda: [[], []])  # id -> number of facts
    semi_crossed: list = field(default_factory=lambda: [[], []])  # id -> facts of the last crossing
    fact_semis: list = field(default_factory=lambda: [{}, {}])  # fact -> [semi ids]
    crossed_ids: list = field(default_factory=lambda: [[], []])  # ids with a non-empty crossing
    left_contexts: list = field(default_factory=list)  # left id -> {right id: context id}
    # contexts: id -> [count, zero_level, left hash, right hash]
    contexts: list = field(default_factory=list)
    new_context_id: int = -1
    left_facts: tuple = ()
    history: list = field(default_factory=lambda: [1.0])  # last rest_period raw scores

    # The compiled detector (``_contextual_jit.Engine``) keeps its own copy of this state and advances
    # that; the fields above are brought up to date from it only when they are read as data
    # (``sync``: serialising, copying, pickling), since converting is as slow as a few hundred steps.
    def sync(self) -> ContextualState:
        engine = self.__dict__.get("_engine")
        if engine is not None and self.__dict__.get("_stale"):
            engine.to_state(self)
            self.__dict__["_stale"] = False
        return self

    def detach(self) -> ContextualState:
        """Up-to-date plain fields, with the compiled copy dropped (the reference code edits the fields)."""
        self.sync()
        self.__dict__.pop("_engine", None)
        self.__dict__.pop("_stale", None)
        return self

    def __getstate__(self):
        self.sync()
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, value):
        self.__dict__.update(value)

    def __deepcopy__(self, memo):
        import copy

        return ContextualState(**copy.deepcopy(self.__getstate__(), memo))

    def __eq__(self, other):
        if not isinstance(other, ContextualState):
            return NotImplemented
        return self.__getstate__() == other.__getstate__()


class ContextualDetector:
    """``score_series`` and ``update`` run the compiled step (``_contextual_jit``, identical scores and
    state) unless ``engine="python"``, which runs the readable reference code below."""

    name = "contextual"
    Config = ContextualConfig

    def __init__(self, config: ContextualConfig | None = None, engine: str = "compiled", **overrides):
        self.config = config or ContextualConfig(**overrides)
        if config is not None and overrides:
            raise TypeError("give a config or overrides, not both")
        if engine not in ("compiled", "python"):
            raise ValueError(f"engine must be 'compiled' or 'python', got {engine!r}")
        cfg = self.config
        # the compiled layout: up to 64 left facts, value facts in a 48-bit mask, a rest window and a top-k
        self.compiled = (
            engine == "compiled"
            and cfg.num_value_bits + 1 + cfg.max_active_neurons <= 64
            and cfg.num_value_bits <= 8
            and cfg.max_octaves <= 15
            and cfg.rest_period >= 1
            and cfg.max_active_neurons >= 1
            and cfg.warmup >= 1
        )

    def new_state(self) -> ContextualState:
        return ContextualState()

    # --- context memory -------------------------------------------------------------------------

    def _semi(self, st: ContextualState, side: int, facts: tuple) -> int:
        h = hash(facts)
        ids = st.semi_ids[side]
        sid = ids.get(h)
        if sid is None:
            sid = len(st.semi_len[side])
            ids[h] = sid
            st.semi_len[side].append(len(facts))
            st.semi_crossed[side].append([])
            if side == 0:
                st.left_contexts.append({})
            fs = st.fact_semis[side]
            for f in facts:
                fs.setdefault(f, []).append(sid)
        return sid

    def _add_contexts(self, st: ContextualState, pairs, zero_level: bool):
        added = 0
        for left, right in pairs:
            lid = self._semi(st, 0, left)
            rid = self._semi(st, 1, right)
            lc = st.left_contexts[lid]
            cid = lc.get(rid)
            if cid is None:
                cid = len(st.contexts)
                lc[rid] = cid
                added += 1
                st.contexts.append([0, 1 if zero_level else 0, hash(left), hash(right)])
                if zero_level:
                    st.new_context_id = cid
                    return True
            elif zero_level:
                st.contexts[cid][1] = 1
                return False
        return added

    def _cross(self, st: ContextualState, side: int, facts) -> None:
        crossed = st.semi_crossed[side]
        for sid in st.crossed_ids[side]:
            crossed[sid] = []
        touched = set()
        fs = st.fact_semis[side]
        for f in facts:
            for sid in fs.get(f, ()):
                crossed[sid].append(f)
                touched.add(sid)
        st.crossed_ids[side] = sorted(touched)

    def _active(self, st: ContextualState, new_flag: bool):
        active = []
        n_selected = 0
        potential = []
        max_left = self.config.max_left_semi_context_len
        left_len, left_crossed = st.semi_len[0], st.semi_crossed[0]
        right_len, right_crossed = st.semi_len[1], st.semi_crossed[1]
        contexts = st.contexts
        for lid in st.crossed_ids[0]:
            l_cross = left_crossed[lid]
            n_l = len(l_cross)
            full_left = left_len[lid] == n_l
            for rid, cid in st.left_contexts[lid].items():
                if cid == st.new_context_id:
                    continue
                ctx = contexts[cid]
                r_cross = right_crossed[rid]
                n_r = len(r_cross)
                if full_left:
                    n_selected += 1
                    if n_r > 0:
                        if right_len[rid] == n_r:
                            ctx[0] += 1
                            active.append((ctx[0], ctx[2], ctx[3], cid))
                        elif ctx[1] and new_flag and n_l <= max_left:
                            potential.append((tuple(l_cross), tuple(r_cross)))
                elif ctx[1] and new_flag and n_r > 0 and n_l <= max_left:
                    potential.append((tuple(l_cross), tuple(r_cross)))
        st.new_context_id = -1
        return active, n_selected, potential

    def _facts(self, st: ContextualState, value: float) -> tuple:
        q = (value - st.min_value) / st.value_step
        top = 2**self.config.num_value_bits - 1
        facts = []
        if q < 0:
            # below the learned range: one fact per octave of the shortfall (bounded)
            facts.append(-1 - min(int(math.log2(1.0 - q)), self.config.max_octaves))
            n = 0
        elif q > top + 1:
            facts.append(-100 - min(int(math.log2(q / (top + 1))), self.config.max_octaves))
            n = top
        else:
            n = min(int(q), top)
        for b in range(self.config.num_value_bits):
            facts.append(2 * b + ((n >> b) & 1))
        return tuple(sorted(facts))

    def _raw(self, st: ContextualState, value: float) -> float:
        sens = self._facts(st, value)
        potential_all = set()
        if st.left_facts:
            zero = (st.left_facts, sens)
            potential_all.add(zero)
            new_flag = self._add_contexts(st, [zero], zero_level=True)
        else:
            new_flag = False
        self._cross(st, 1, sens)
        active, n_selected, potential = self._active(st, new_flag)
        potential_all.update(potential)
        frac_active = len(active) / n_selected if n_selected else 0.0
        active.sort()
        neurons = {NEURON_OFFSET + a[3] for a in active[-self.config.max_active_neurons :]}
        st.left_facts = tuple(sorted(set(sens) | neurons))
        n_new = self._add_contexts(st, potential, zero_level=False) if potential else 0
        self._cross(st, 0, st.left_facts)
        n_new += 1 if new_flag else 0
        frac_new = n_new / len(potential_all) if (new_flag and potential_all) else 0.0
        return (1.0 - frac_active + frac_new) / 2.0

    def _step(self, st: ContextualState, value: float) -> float:
        raw = self._raw(st, value)
        rest = self.config.rest_period
        score = raw if max(st.history[-rest:]) < self.config.base_threshold else 0.0
        st.history.append(raw)
        if len(st.history) > rest:
            del st.history[:-rest]
        return score

    # --- public API -----------------------------------------------------------------------------

    def update(self, state: ContextualState, timestamp, value) -> float:
        if self.compiled:
            return float(self.score_series(None, [np.nan if value is None else value], state)[0])
        state.detach()
        if value is None:
            return 0.0
        value = float(value)
        if not math.isfinite(value):
            return 0.0
        st = state
        st.n_seen += 1
        cfg = self.config
        if st.n_seen <= cfg.warmup:
            st.warm_values.append(value)
            if st.n_seen == cfg.warmup:
                self._start(st)
            return 0.0
        if cfg.refit_at > cfg.warmup and st.n_seen <= cfg.refit_at:
            st.warm_values.append(value)
            score = self._step(st, value)
            if st.n_seen == cfg.refit_at:
                values = st.warm_values
                fresh = self.new_state()
                fresh.n_seen = st.n_seen
                fresh.warm_values = values
                self._start(fresh)
                st.__dict__.update(fresh.__dict__)
            return score
        return self._step(st, value)

    def _start(self, st: ContextualState) -> None:
        st.min_value, st.value_step = self._range(min(st.warm_values), max(st.warm_values))
        for v in st.warm_values:
            self._step(st, v)
        if not (self.config.refit_at > self.config.warmup and st.n_seen < self.config.refit_at):
            st.warm_values = []

    def score_series(self, timestamps, values, state: ContextualState | None = None) -> np.ndarray:
        st = state if state is not None else self.new_state()
        values = np.asarray(values, dtype=float)
        if self.compiled:
            return self._score_compiled(values, st)
        st.detach()
        out = np.zeros(len(values))
        for i, v in enumerate(values.tolist()):
            out[i] = self.update(st, None, v)
        return out

    def score_many(self, states: list[ContextualState], series: list) -> list[np.ndarray]:
        """``[score_series(None, v, state=s) for s, v in zip(states, series)]``, each state at most
        once: the states past warm-up and refit with finite readings (a live pass's) step in one
        compiled call (``_contextual_jit.steps_many``); the others one by one."""
        if not self.compiled:
            return [self.score_series(None, v, state=st) for st, v in zip(states, series, strict=True)]
        from pipelines.detectors._contextual_jit import steps_many

        out: list = [None] * len(states)
        series = [np.asarray(v, dtype=float) for v in series]
        if not series:
            return []
        bounds = np.concatenate(([0], np.cumsum([len(v) for v in series])))
        gaps = np.concatenate(([0], np.cumsum(~np.isfinite(np.concatenate(series)))))  # gaps before each value
        finite = (gaps[bounds[1:]] == gaps[bounds[:-1]]).tolist()  # each state's readings all finite
        batch, engines, values = [], [], []
        for k, (st, v) in enumerate(zip(states, series, strict=True)):
            eng = self._engine(st)
            if finite[k] and self._settled(eng):
                eng.n_seen += len(v)
                batch.append(k)
                engines.append(eng)
                values.append(v)
            else:
                out[k] = self._score_compiled(v, st)
        for k, scores in zip(batch, steps_many(engines, values), strict=True):
            out[k] = scores
        return out

    # --- many states as a few arrays (a model's per-device states; see _contextual_jit.pack) ---------

    def pack_states(self, states: list[ContextualState]) -> dict | None:
        """The states as a dict of numpy arrays (None when this detector is not compiled)."""
        if not self.compiled:
            return None
        from pipelines.detectors._contextual_jit import pack

        return pack([self._engine(st) for st in states])

    def unpack_states(self, packed: dict) -> list[ContextualState]:
        """Inverse of ``pack_states``: each state is held by the compiled code, its fields filled from
        it only if they are read (``ContextualState.sync``)."""
        from pipelines.detectors._contextual_jit import prime, unpack

        prime(self.config)
        states = []
        for eng in unpack(packed, self.config):
            st = ContextualState()
            st.__dict__["_engine"], st.__dict__["_stale"] = eng, True
            states.append(st)
        return states

    # --- compiled path: the same phases as ``update``, a run of readings at a time --------------------

    def _engine(self, st: ContextualState):
        """The state's compiled engine, made from its fields if it has none (or one of another
        configuration); its fields are stale from here on (``ContextualState.sync``)."""
        eng = st.__dict__.get("_engine")
        if eng is None or eng.config is not self.config and eng.config != self.config:
            from pipelines.detectors._contextual_jit import Engine

            eng = st.__dict__["_engine"] = Engine.from_state(st.detach(), self.config)
        st.__dict__["_stale"] = True
        return eng

    def _settled(self, eng) -> bool:
        """Past warm-up and refit: what is left is stepping (the common case live)."""
        return eng.n_seen >= max(self.config.warmup, self.config.refit_at)

    def _score_compiled(self, values: np.ndarray, st: ContextualState) -> np.ndarray:
        from pipelines.detectors._contextual_jit import Engine

        cfg = self.config
        eng = self._engine(st)
        if self._settled(eng) and np.isfinite(values).all():
            eng.n_seen += len(values)  # the common case live: past warm-up and refit, no gaps
            return eng.steps(values)
        finite = np.flatnonzero(np.isfinite(values))
        vals = values[finite]
        scores = np.zeros(len(vals))
        refit = cfg.refit_at > cfg.warmup
        i = 0
        while i < len(vals):
            if eng.n_seen < cfg.warmup:
                k = min(len(vals) - i, cfg.warmup - eng.n_seen)
                eng.warm_values.extend(vals[i : i + k].tolist())
                eng.n_seen += k
                if eng.n_seen == cfg.warmup:
                    self._start_compiled(eng)
            elif refit and eng.n_seen < cfg.refit_at:
                k = min(len(vals) - i, cfg.refit_at - eng.n_seen)
                eng.warm_values.extend(vals[i : i + k].tolist())
                scores[i : i + k] = eng.steps(vals[i : i + k])
                eng.n_seen += k
                if eng.n_seen == cfg.refit_at:
                    fresh = Engine(cfg)
                    fresh.n_seen, fresh.warm_values = eng.n_seen, eng.warm_values
                    self._start_compiled(fresh)
                    eng = fresh
            else:
                k = len(vals) - i
                scores[i:] = eng.steps(vals[i:])
                eng.n_seen += k
            i += k
        st.__dict__["_engine"] = eng
        out = np.zeros(len(values))
        out[finite] = scores
        return out

    def _start_compiled(self, eng) -> None:
        """``_start`` on the compiled state."""
        lo, hi = min(eng.warm_values), max(eng.warm_values)
        eng.min_value, eng.value_step = self._range(lo, hi)
        eng.steps(np.asarray(eng.warm_values, dtype=np.float64))
        if not (self.config.refit_at > self.config.warmup and eng.n_seen < self.config.refit_at):
            eng.warm_values = []

    def _range(self, lo: float, hi: float) -> tuple[float, float]:
        span = hi - lo
        max_bin = 2**self.config.num_value_bits - 1.0
        if span <= 0:
            span = max(abs(lo), 1.0) * 0.1
        margin = span * self.config.range_margin
        return lo - margin, (span + 2 * margin) / max_bin
