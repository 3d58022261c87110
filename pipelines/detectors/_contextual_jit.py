"""The contextual detector's step compiled with numba: the same algorithm as
``ContextualDetector._raw``/``_step`` (pipelines/detectors/contextual.py, which stays the readable
reference), on flat int64 arrays instead of Python lists and dicts.

Why: a step walks the contexts of the left semi-contexts the previous step crossed, which on a real
series grow to thousands (2,909 contexts after NAB's machine_temperature, 5,580 after
Twitter_volume_AAPL): 0.2-1 ms a reading in Python. Compiled it costs microseconds, which is what
scoring a fleet's readings live needs. The scores and the state are identical to the reference, bit
for bit (tests/unit/test_detectors.py checks both on NAB series), because everything that decides an
outcome is reproduced exactly: CPython's hash of a tuple of ints (the reference keys semi-contexts by
it and breaks the neurons' sort ties with it), the iteration orders of its dicts and lists, and the
same float operations in the same order.

Two shortcuts that do not change any outcome:
* Crossing. A semi-context's value facts (the quantised reading: at most 48 distinct) are a bit mask,
  so counting the ones a step shares is one pass over the masks; only neuron facts are looked up.
* The left crossing is left pending at the end of a step. The next step needs it in full only when
  it created a new zero-level context (a few % of steps); otherwise only the semi-contexts it covers
  completely matter, and ``_full_left`` finds those directly, most failing on their first fact.

Layout (side 0 = left semi-contexts, 1 = right). All arrays, so a call unboxes in microseconds
(numba's typed dicts cost ~2 us each per call, and the live path calls once per device and reading):
  ctx[cid]              count, zero_level, left hash, right hash, right id, next context of its left
  semi[side, col, sid]  n facts, start in pool, n crossed, first context, last context, hash,
                        value-fact mask, n value facts, two caches, first neuron's context (or -1);
                        column-major: the per-step scans read one column of every semi-context
  pool[side]            each semi-context's facts, sorted (value facts first: they are < 2**31)
  ent[side, e]          fact -> semi-contexts as linked entries: next entry, semi id
  fhead[side, fact ix]  first entry of a fact's list (ix: value bit 0..47, or 64 + neuron's context)
  forder[side, k]       facts in the order first seen (the reference's dict order)
  htab[side, slot]      open-addressing table: semi-context hash -> id
  crossed[side]         ids crossed by the last crossing (sorted); cross_facts[side] its facts
  meta                  counters (the M_* indices below)
Arrays never grow inside a call: a step first finds what it will create (reading only), and if that
does not fit, ``run`` stops before changing anything and returns how many values it did; the caller
grows what is short (``Engine._grow``, doubling) and calls again. Arrays stay within ~2x of use.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref

import numpy as np
from numba import njit

C_COUNT, C_ZERO, C_LH, C_RH, C_RIGHT, C_NEXT, C_MARK, C_LMARK = range(8)
N_CTX_COLS = 8
S_LEN, S_START, S_NCROSS, S_HEAD, S_TAIL, S_HASH, S_VMASK, S_NVAL, S_CSTAMP, S_CSID, S_FIRSTN = range(11)
N_SEMI_COLS = 11
E_NEXT, E_SEMI = range(2)
(
    M_NSEMI0,
    M_NSEMI1,
    M_POOL0,
    M_POOL1,
    M_NENT0,
    M_NENT1,
    M_NFACT0,
    M_NFACT1,
    M_NCTX,
    M_NEWCTX,
    M_NLEFT,
    M_NCROSSED0,
    M_NCROSSED1,
    M_NCF0,
    M_NCF1,
    M_HIST_N,
    M_HIST_POS,
    M_PENDING,
    M_CROSS_N0,
    M_STAMP,
    M_LSTAMP,
    M_NEED_CTX,
    M_NEED_POOL,
) = range(23)
N_META = 23
MAX_FACTS_ROW = 64  # left facts: value facts (<= 1 + value bits) + active neurons; checked by the caller
NEURON_BASE = 64  # fact index of neuron 0 (value facts use 0..47)

NEURON_OFFSET = 2**31
_P61 = (1 << 61) - 1
_XXPRIME_1 = np.uint64(11400714785074694791)
_XXPRIME_2 = np.uint64(14029467366897019727)
_XXPRIME_5 = np.uint64(2870177450012600261)
_LEN_MIX = np.uint64(2870177450012600261 ^ 3527539)
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------- hashing, as CPython


@njit(cache=True)
def int_hash(x):
    """CPython's hash of an int (as the bits of a Py_hash_t)."""
    if 0 <= x < _P61:
        return x
    if x >= 0:
        h = x % _P61
    else:
        h = -((-x) % _P61)
    if h == -1:
        h = -2
    return h


@njit(cache=True)
def _mix(acc, lane):
    acc = acc + np.uint64(lane) * _XXPRIME_2
    acc = (acc << np.uint64(31)) | (acc >> np.uint64(33))
    return acc * _XXPRIME_1


@njit(cache=True)
def _finish(acc, n):
    acc = acc + (np.uint64(n) ^ _LEN_MIX)
    if acc == _ALL_ONES:
        return 1546275796
    return np.int64(acc)


@njit(cache=True)
def tuple_hash(facts, start, n):
    """CPython's hash of ``tuple(facts[start:start + n])`` (ints)."""
    acc = _XXPRIME_5
    for i in range(n):
        acc = _mix(acc, int_hash(facts[start + i]))
    return _finish(acc, n)


@njit(cache=True)
def pair_hash(h1, h2):
    """CPython's hash of a 2-tuple whose items hash to h1 and h2."""
    acc = _mix(_XXPRIME_5, h1)
    acc = _mix(acc, h2)
    return _finish(acc, 2)


# --------------------------------------------------------------------------- small helpers


@njit(cache=True)
def _sort_small(a, n):
    """Insertion sort of ``a[:n]`` in place (np.sort allocates: ~0.5 us for 4 items)."""
    for i in range(1, n):
        x = a[i]
        j = i
        while j > 0 and a[j - 1] > x:
            a[j] = a[j - 1]
            j -= 1
        a[j] = x


@njit(cache=True)
def value_bit(f):
    """A value fact's bit in a semi-context's value mask: value bits (0..15), below the range (16..31),
    above it (32..47). Every other fact is a neuron (>= NEURON_OFFSET)."""
    if f >= 0:
        return f
    if f > -100:
        return 15 - f
    return -68 - f


@njit(cache=True)
def fact_index(f):
    return value_bit(f) if f < NEURON_OFFSET else NEURON_BASE + (f - NEURON_OFFSET)


@njit(cache=True)
def table_find(htab, side, h):
    mask = htab.shape[1] - 1
    i = h & mask
    while htab[side, i, 1] >= 0:
        if htab[side, i, 0] == h:
            return htab[side, i, 1]
        i = (i + 1) & mask
    return -1


@njit(cache=True)
def table_put(htab, side, h, sid):
    mask = htab.shape[1] - 1
    i = h & mask
    while htab[side, i, 1] >= 0:
        i = (i + 1) & mask
    htab[side, i, 0] = h
    htab[side, i, 1] = sid


@njit(cache=True)
def rebuild_table(htab, semi, meta):
    htab[:, :, 1] = -1
    for side in range(2):
        for sid in range(meta[M_NSEMI0 + side]):
            table_put(htab, side, semi[side, S_HASH, sid], sid)


@njit(cache=True)
def _intersect(pool, start, n, ref, nref, out):
    """Sorted facts of a semi-context that are also in the sorted ``ref[:nref]``, into ``out``."""
    i = 0
    j = 0
    m = 0
    while i < n and j < nref:
        a = pool[start + i]
        b = ref[j]
        if a == b:
            out[m] = a
            m += 1
            i += 1
            j += 1
        elif a < b:
            i += 1
        else:
            j += 1
    return m


# --------------------------------------------------------------------------- the context memory


@njit(cache=True)
def _semi(side, facts, nf, semi, pool, ent, fhead, forder, htab, meta):
    h = tuple_hash(facts, 0, nf)
    sid = table_find(htab, side, h)
    if sid >= 0:
        return sid, h
    sid = meta[M_NSEMI0 + side]
    meta[M_NSEMI0 + side] = sid + 1
    table_put(htab, side, h, sid)
    start = meta[M_POOL0 + side]
    mask = 0
    nval = 0
    first = -1
    for i in range(nf):
        f = facts[i]
        if f < NEURON_OFFSET:
            mask |= 1 << value_bit(f)
            nval += 1
        elif first < 0:
            first = f - NEURON_OFFSET
        pool[side, start + i] = f
        ix = fact_index(f)
        if fhead[side, ix] < 0:
            forder[side, meta[M_NFACT0 + side]] = f
            meta[M_NFACT0 + side] += 1
        e = meta[M_NENT0 + side]
        meta[M_NENT0 + side] = e + 1
        ent[side, e, E_NEXT] = fhead[side, ix]
        ent[side, e, E_SEMI] = sid
        fhead[side, ix] = e
    semi[side, S_LEN, sid] = nf
    semi[side, S_START, sid] = start
    semi[side, S_NCROSS, sid] = 0
    semi[side, S_HEAD, sid] = -1
    semi[side, S_TAIL, sid] = -1
    semi[side, S_HASH, sid] = h
    semi[side, S_VMASK, sid] = mask
    semi[side, S_NVAL, sid] = nval
    semi[side, S_CSTAMP, sid] = 0
    semi[side, S_CSID, sid] = -1
    semi[side, S_FIRSTN, sid] = first
    meta[M_POOL0 + side] = start + nf
    return sid, h


@njit(cache=True)
def _find_context(lid, rid, ctx, semi):
    cid = semi[0, S_HEAD, lid]
    while cid >= 0:
        if ctx[cid, C_RIGHT] == rid:
            return cid
        cid = ctx[cid, C_NEXT]
    return -1


@njit(cache=True)
def _context(lid, rid, zero_level, ctx, semi, meta):
    """The (left, right) context: its id and whether it was created. A left semi-context's contexts
    are few (one per right semi-context seen after it), so its list is searched."""
    cid = semi[0, S_HEAD, lid]
    while cid >= 0:
        if ctx[cid, C_RIGHT] == rid:
            return cid, False
        cid = ctx[cid, C_NEXT]
    cid = meta[M_NCTX]
    meta[M_NCTX] = cid + 1
    ctx[cid, C_COUNT] = 0
    ctx[cid, C_ZERO] = 1 if zero_level else 0
    ctx[cid, C_LH] = semi[0, S_HASH, lid]
    ctx[cid, C_RH] = semi[1, S_HASH, rid]
    ctx[cid, C_RIGHT] = rid
    ctx[cid, C_NEXT] = -1
    ctx[cid, C_MARK] = 0
    tail = semi[0, S_TAIL, lid]
    if tail < 0:
        semi[0, S_HEAD, lid] = cid
    else:
        ctx[tail, C_NEXT] = cid
    semi[0, S_TAIL, lid] = cid
    return cid, True


@njit(cache=True)
def _cross(side, facts, nf, n, semi, ent, fhead, crossed, cross_facts, meta, bits):
    """How many of ``facts`` each of the first ``n`` semi-contexts holds (S_NCROSS), and the ids
    holding any (sorted). Value facts are common to most semi-contexts, so they are counted from each
    one's value mask in one pass over the ids; neuron facts are rare, so their lists are walked."""
    nb = 0
    for i in range(nf):
        if facts[i] < NEURON_OFFSET:
            bits[nb] = value_bit(facts[i])
            nb += 1
    for sid in range(n):
        mask = semi[side, S_VMASK, sid]
        c = 0
        for j in range(nb):
            c += (mask >> bits[j]) & 1
        semi[side, S_NCROSS, sid] = c
    for i in range(nf):
        if facts[i] < NEURON_OFFSET:
            continue
        e = fhead[side, fact_index(facts[i])]
        while e >= 0:
            semi[side, S_NCROSS, ent[side, e, E_SEMI]] += 1
            e = ent[side, e, E_NEXT]
    m = 0
    for sid in range(n):
        if semi[side, S_NCROSS, sid] > 0:
            crossed[side, m] = sid
            m += 1
    meta[M_NCROSSED0 + side] = m
    for i in range(nf):
        cross_facts[side, i] = facts[i]
    meta[M_NCF0 + side] = nf


@njit(cache=True)
def resolve_left_crossing(semi, ent, fhead, crossed, cross_facts, meta):
    """The left crossing the last step left pending (see ``run``), done in full."""
    if meta[M_PENDING]:
        bits = np.empty(MAX_FACTS_ROW, dtype=np.int64)
        facts = cross_facts[0, : meta[M_NCF0]].copy()
        _cross(0, facts, meta[M_NCF0], meta[M_CROSS_N0], semi, ent, fhead, crossed, cross_facts, meta, bits)
        meta[M_PENDING] = 0


@njit(cache=True)
def _full_left(semi, pool, ctx, n, left, nleft, lstamp, out):
    """The ids among the first ``n`` left semi-contexts whose facts are all in ``left[:nleft]``
    (sorted: value facts, then neurons, which are marked ``lstamp`` in ctx[:, C_LMARK]), ascending.
    Most fail on their value mask or their first neuron, read from two contiguous columns."""
    vmask = 0
    nv = 0
    while nv < nleft and left[nv] < NEURON_OFFSET:
        vmask |= 1 << value_bit(left[nv])
        nv += 1
    masks = semi[0, S_VMASK]
    firsts = semi[0, S_FIRSTN]
    m = 0
    for sid in range(n):
        if masks[sid] & ~vmask:
            continue
        first = firsts[sid]
        if first >= 0:
            if ctx[first, C_LMARK] != lstamp:
                continue
            start = semi[0, S_START, sid]
            ok = True
            for i in range(start + semi[0, S_NVAL, sid] + 1, start + semi[0, S_LEN, sid]):
                if ctx[pool[0, i] - NEURON_OFFSET, C_LMARK] != lstamp:
                    ok = False
                    break
            if not ok:
                continue
        out[m] = sid
        m += 1
    return m


@njit(cache=True)
def _later(ctx, a, b):
    """Whether context a sorts after b by (count, left hash, right hash, id), as the reference's tuples."""
    for c in (C_COUNT, C_LH, C_RH):
        if ctx[a, c] != ctx[b, c]:
            return ctx[a, c] > ctx[b, c]
    return a > b


@njit(cache=True)
def _facts(value, min_value, value_step, num_value_bits, max_octaves, out):
    q = (value - min_value) / value_step
    top = 2**num_value_bits - 1
    m = 0
    if q < 0:
        out[m] = -1 - min(int(np.log2(1.0 - q)), max_octaves)
        m += 1
        n = 0
    elif q > top + 1:
        out[m] = -100 - min(int(np.log2(q / (top + 1))), max_octaves)
        m += 1
        n = top
    else:
        n = min(int(q), top)
    for b in range(num_value_bits):
        out[m] = 2 * b + ((n >> b) & 1)
        m += 1
    _sort_small(out, m)
    return m


@njit(cache=True)
def _room(ctx, semi, pool, ent, fhead, htab, meta, new_ctx, new_facts):
    """Whether the arrays hold ``new_ctx`` more contexts and semi-contexts per side, and ``new_facts``
    more facts per side; else the need is left in meta for ``Engine._grow``."""
    n_ctx = meta[M_NCTX]
    ok = (
        ctx.shape[0] >= n_ctx + new_ctx
        and semi.shape[2] >= max(meta[M_NSEMI0], meta[M_NSEMI1]) + new_ctx
        and pool.shape[1] >= max(meta[M_POOL0], meta[M_POOL1]) + new_facts
        and ent.shape[1] >= max(meta[M_NENT0], meta[M_NENT1]) + new_facts
        and fhead.shape[1] >= NEURON_BASE + ctx.shape[0]
        and htab.shape[1] >= 2 * semi.shape[2]
    )
    if not ok:
        meta[M_NEED_CTX] = new_ctx
        meta[M_NEED_POOL] = new_facts
    return ok


# --------------------------------------------------------------------------- the step


# nogil: a step reads and writes only its own state's arrays, so states step on several threads at
# once (StreamingScorer.continue_streams)
@njit(cache=True, nogil=True)
def run(
    values,
    out,
    fparams,
    iparams,
    ctx,
    semi,
    pool,
    ent,
    fhead,
    forder,
    htab,
    crossed,
    cross_facts,
    left,
    hist,
    work,
    meta,
):
    """Steps ``values`` (finite readings after warm-up) into the state, writing each score (raw score,
    or 0 inside the rest period) to ``out``. Returns how many it did: fewer than all when the arrays
    must grow first. fparams: min_value, value_step, base_threshold; iparams: num_value_bits,
    max_octaves, max_left_semi_context_len, max_active_neurons."""
    min_value, value_step, base_threshold = fparams[0], fparams[1], fparams[2]
    num_value_bits, max_octaves, max_left, max_active = iparams[0], iparams[1], iparams[2], iparams[3]
    max_facts = num_value_bits + 1 + max_active
    sens = np.empty(num_value_bits + 1, dtype=np.int64)
    old_left = np.empty(MAX_FACTS_ROW, dtype=np.int64)
    lbuf = np.empty(MAX_FACTS_ROW, dtype=np.int64)
    rbuf = np.empty(num_value_bits + 1, dtype=np.int64)
    top = np.empty(max_active, dtype=np.int64)
    bits = np.empty(MAX_FACTS_ROW, dtype=np.int64)
    full = np.empty(semi.shape[2], dtype=np.int64)
    rest = hist.shape[0]
    for i in range(values.shape[0]):
        # Room for what a step reads and writes before it knows what it creates; what it creates is
        # checked once it knows (below), before anything is changed: a step stops whole or not at all.
        n_ctx = meta[M_NCTX]
        if work.shape[0] < n_ctx + 2 or crossed.shape[1] < semi.shape[2]:
            meta[M_NEED_CTX] = 2
            meta[M_NEED_POOL] = 0
            return i
        if not _room(ctx, semi, pool, ent, fhead, htab, meta, 2, 2 * max_facts):
            return i
        ns = _facts(values[i], min_value, value_step, num_value_bits, max_octaves, sens)
        nleft = meta[M_NLEFT]
        for k in range(nleft):
            old_left[k] = left[k]
        # the zero-level context (previous facts, these facts): found, or new (created below)
        new_flag = False
        zero_cid = -1
        zero_rid = -1
        if nleft > 0:
            zero_lid = table_find(htab, 0, tuple_hash(old_left, 0, nleft))
            zero_rid = table_find(htab, 1, tuple_hash(sens, 0, ns))
            if zero_lid >= 0 and zero_rid >= 0:
                zero_cid = _find_context(zero_lid, zero_rid, ctx, semi)
            new_flag = zero_cid < 0
        _cross(1, sens, ns, meta[M_NSEMI1], semi, ent, fhead, crossed, cross_facts, meta, bits)
        # active contexts and potential new ones (the reference's _active; the new zero-level context,
        # which it skips, does not exist yet)
        n_active = 0
        n_selected = 0
        n_pot = 0
        pending = meta[M_PENDING] == 1
        if new_flag:
            resolve_left_crossing(semi, ent, fhead, crossed, cross_facts, meta)
            pending = False
        if pending:  # only the left semi-contexts covered in full can select a context
            n_lefts = _full_left(semi, pool, ctx, meta[M_CROSS_N0], old_left, nleft, meta[M_LSTAMP], full)
            lefts = full
        else:
            n_lefts = meta[M_NCROSSED0]
            lefts = crossed[0]
        for k in range(n_lefts):
            lid = lefts[k]
            n_l = semi[0, S_LEN, lid] if pending else semi[0, S_NCROSS, lid]
            full_left = semi[0, S_LEN, lid] == n_l
            if not full_left and (not new_flag or n_l > max_left):
                continue  # neither selects nor proposes a context
            cid = semi[0, S_HEAD, lid]
            while cid >= 0:
                rid = ctx[cid, C_RIGHT]
                n_r = semi[1, S_NCROSS, rid]
                if full_left:
                    n_selected += 1
                    if n_r > 0:
                        if semi[1, S_LEN, rid] == n_r:
                            work[n_active, 0] = cid
                            n_active += 1
                        elif ctx[cid, C_ZERO] == 1 and new_flag and n_l <= max_left:
                            work[n_pot, 1] = cid
                            work[n_pot, 3] = lid
                            n_pot += 1
                elif ctx[cid, C_ZERO] == 1 and n_r > 0:
                    work[n_pot, 1] = cid
                    work[n_pot, 3] = lid
                    n_pot += 1
                cid = ctx[cid, C_NEXT]
        # what the rest of the step can create, per side: the zero-level semi-contexts (at most
        # max_facts facts), then per potential context at most one left semi-context of the facts it
        # shares with the previous left (at most max_left: longer ones propose nothing) and one right
        # one of at most the reading's facts; a bound of max_facts a potential had most states
        # growing their arrays in a burst of new contexts (~0.5 ms each, in a live pass)
        per_pot = max(max_left, num_value_bits + 1)
        if not _room(ctx, semi, pool, ent, fhead, htab, meta, n_pot + 2, max_facts + n_pot * per_pot):
            return i
        # from here on the step changes the state, in the reference's order
        if nleft > 0:
            if new_flag:
                lid, _ = _semi(0, old_left, nleft, semi, pool, ent, fhead, forder, htab, meta)
                rid, _ = _semi(1, sens, ns, semi, pool, ent, fhead, forder, htab, meta)
                if zero_rid < 0:  # created after this step's right crossing, which covers it fully
                    semi[1, S_NCROSS, rid] = ns
                    crossed[1, meta[M_NCROSSED1]] = rid
                    meta[M_NCROSSED1] += 1
                zero_cid, _ = _context(lid, rid, True, ctx, semi, meta)
            else:
                ctx[zero_cid, C_ZERO] = 1
        for k in range(n_active):
            ctx[work[k, 0], C_COUNT] += 1
        meta[M_NEWCTX] = -1
        frac_active = n_active / n_selected if n_selected else 0.0
        # the max_active latest of the active contexts by (count, left hash, right hash, id) become neurons
        n_top = 0
        for k in range(n_active):
            c = work[k, 0]
            if n_top < max_active:
                j = n_top
                n_top += 1
            elif _later(ctx, c, top[0]):
                for s in range(1, n_top):
                    top[s - 1] = top[s]
                j = n_top - 1
            else:
                continue
            while j > 0 and _later(ctx, top[j - 1], c):
                top[j] = top[j - 1]
                j -= 1
            top[j] = c
        nl_new = ns + n_top
        for k in range(ns):
            left[k] = sens[k]
        for k in range(n_top):
            left[ns + k] = NEURON_OFFSET + top[k]
        _sort_small(left[ns:], n_top)
        meta[M_NLEFT] = nl_new
        lstamp = meta[M_LSTAMP] + 1  # the new left's neurons, for the next step's _full_left
        meta[M_LSTAMP] = lstamp
        for k in range(n_top):
            ctx[top[k], C_LMARK] = lstamp
        # potential contexts: (left crossing, right crossing) of each, and how many distinct pairs
        # there are with the zero-level one (distinct pairs are distinct contexts). A left
        # semi-context's crossing is the same for all its potentials (they come in a run) and a right
        # one's for all that share it (few), so each is looked up once.
        n_new = 0
        n_distinct = 0
        if new_flag:
            stamp = meta[M_STAMP] + 1
            meta[M_STAMP] = stamp
            ctx[zero_cid, C_MARK] = stamp
            n_distinct = 1
            prev_lid = -1
            lsid = -1
            for k in range(n_pot):
                cid = work[k, 1]
                lid = work[k, 3]
                rid = ctx[cid, C_RIGHT]
                if lid != prev_lid:
                    nl = _intersect(pool[0], semi[0, S_START, lid], semi[0, S_LEN, lid], old_left, nleft, lbuf)
                    lsid, _ = _semi(0, lbuf, nl, semi, pool, ent, fhead, forder, htab, meta)
                    prev_lid = lid
                if semi[1, S_CSTAMP, rid] == stamp:
                    rsid = semi[1, S_CSID, rid]
                else:
                    nr = _intersect(pool[1], semi[1, S_START, rid], semi[1, S_LEN, rid], sens, ns, rbuf)
                    rsid, _ = _semi(1, rbuf, nr, semi, pool, ent, fhead, forder, htab, meta)
                    semi[1, S_CSTAMP, rid] = stamp
                    semi[1, S_CSID, rid] = rsid
                pc, created = _context(lsid, rsid, False, ctx, semi, meta)
                if created:
                    n_new += 1
                if ctx[pc, C_MARK] != stamp:
                    ctx[pc, C_MARK] = stamp
                    n_distinct += 1
        # the left crossing for the next step, done there only if it is needed in full
        for k in range(nl_new):
            cross_facts[0, k] = left[k]
        meta[M_NCF0] = nl_new
        meta[M_CROSS_N0] = meta[M_NSEMI0]
        meta[M_PENDING] = 1
        frac_new = 0.0
        if new_flag:
            frac_new = (n_new + 1) / n_distinct
        raw = (1.0 - frac_active + frac_new) / 2.0
        # rest period: score 0 while a raw score of the last ``rest`` readings reached the threshold
        hn = meta[M_HIST_N]
        peak = hist[0]
        for k in range(1, hn):
            if hist[k] > peak:
                peak = hist[k]
        out[i] = raw if peak < base_threshold else 0.0
        if hn < rest:
            hist[hn] = raw
            meta[M_HIST_N] = hn + 1
        else:
            pos = meta[M_HIST_POS]
            hist[pos] = raw
            meta[M_HIST_POS] = (pos + 1) % rest
    return values.shape[0]


@njit(cache=True, nogil=True)
def run_many(items, which, values, bounds, out, done):
    """``run`` for each state of a batch: the k-th steps ``values[bounds[k]:bounds[k + 1]]`` into the
    state ``items[which[k]]`` (its arrays, ``Engine._arrays``), writing the scores to the same slice
    of ``out`` and how many it did to ``done[k]`` (fewer when its arrays must grow first). One call
    for a live pass's hundreds of states: no per-state dispatch from Python (~10 us a state, under
    the interpreter lock), and the lock is released for the whole batch."""
    for k in range(which.shape[0]):
        s = items[which[k]]
        a = bounds[k]
        b = bounds[k + 1]
        done[k] = run(values[a:b], out[a:b], *s)


# --------------------------------------------------------------------------- the Python side


class Engine:
    """One series' detector state on the compiled layout, plus the reference state's scalar fields
    (``n_seen``, ``warm_values``, ``min_value``, ``value_step``). ``from_state``/``to_state`` convert
    from and to the reference ``ContextualState`` exactly (same ids, orders and values)."""

    def __init__(self, config, capacity: int = 16):
        self.config = config
        self.n_seen = 0
        self.warm_values: list = []
        self.min_value = float("nan")
        self.value_step = float("nan")
        self.max_facts = config.num_value_bits + 1 + config.max_active_neurons
        self.iparams = np.array(
            [config.num_value_bits, config.max_octaves, config.max_left_semi_context_len, config.max_active_neurons],
            dtype=np.int64,
        )
        cap, grow = capacity, (capacity + 2) * 12  # facts: ~11 a left semi-context on NAB, ~3 a right
        self.ctx = np.zeros((cap, N_CTX_COLS), dtype=np.int64)
        self.semi = np.zeros((2, N_SEMI_COLS, cap), dtype=np.int64)
        self.pool = np.zeros((2, grow), dtype=np.int64)
        self.ent = np.zeros((2, grow, 2), dtype=np.int64)
        self.fhead = np.full((2, NEURON_BASE + cap), -1, dtype=np.int64)
        self.forder = np.zeros((2, NEURON_BASE + cap), dtype=np.int64)
        self.htab = np.full((2, _pow2(2 * cap), 2), -1, dtype=np.int64)
        self.crossed = np.zeros((2, cap), dtype=np.int64)
        self.work = np.zeros((cap + 2, 4), dtype=np.int64)  # run: n_ctx + 2 rows
        self.cross_facts = np.zeros((2, MAX_FACTS_ROW), dtype=np.int64)
        self.left = np.zeros(MAX_FACTS_ROW, dtype=np.int64)
        self.hist = np.zeros(config.rest_period, dtype=np.float64)
        self.hist[0] = 1.0
        self.meta = np.zeros(N_META, dtype=np.int64)
        self.meta[M_HIST_N] = 1
        self.meta[M_NEWCTX] = -1
        self.fparams = np.array([np.nan, np.nan, config.base_threshold])
        self._slot = -1  # this state's entry in _SLOTS (steps_many), refreshed when its arrays change
        self._slot_stale = True

    # -- capacity ------------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Room for the step ``run`` stopped before (its need is in meta), doubling what is short."""
        m = self.meta
        n, need_ctx, need_facts = int(m[M_NCTX]), int(m[M_NEED_CTX]), int(m[M_NEED_POOL])
        self.ctx = _bigger(self.ctx, 0, n + need_ctx)
        self.work = _bigger(self.work, 0, self.ctx.shape[0] + 2)
        self.fhead = _bigger(self.fhead, 1, NEURON_BASE + self.ctx.shape[0], fill=-1)
        self.forder = _bigger(self.forder, 1, self.fhead.shape[1])
        self.semi = _bigger(self.semi, 2, int(max(m[M_NSEMI0], m[M_NSEMI1])) + need_ctx)
        self.crossed = _bigger(self.crossed, 1, self.semi.shape[2])
        self.pool = _bigger(self.pool, 1, int(max(m[M_POOL0], m[M_POOL1])) + need_facts)
        self.ent = _bigger(self.ent, 1, int(max(m[M_NENT0], m[M_NENT1])) + need_facts)
        if self.htab.shape[1] < 2 * self.semi.shape[2]:
            self.htab = np.full((2, _pow2(2 * self.semi.shape[2]), 2), -1, dtype=np.int64)
            rebuild_table(self.htab, self.semi, m)
        self._slot_stale = True

    def _fparams(self) -> np.ndarray:
        """``run``'s float parameters, made again when the range was learned (again)."""
        fparams = self.fparams
        if fparams[0] != self.min_value or fparams[1] != self.value_step:
            fparams = self.fparams = np.array([self.min_value, self.value_step, self.config.base_threshold])
            self._slot_stale = True
        return fparams

    def _arrays(self) -> tuple:
        """``run``'s state arguments after ``values`` and ``out``, in order (``run_many``'s items)."""
        return (
            self._fparams(),
            self.iparams,
            self.ctx,
            self.semi,
            self.pool,
            self.ent,
            self.fhead,
            self.forder,
            self.htab,
            self.crossed,
            self.cross_facts,
            self.left,
            self.hist,
            self.work,
            self.meta,
        )

    def steps(self, values: np.ndarray) -> np.ndarray:
        """Scores of finite readings after warm-up, advancing the state (the reference's ``_step``)."""
        if values.dtype != np.float64 or not values.flags.c_contiguous:
            values = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty(len(values))
        done = 0
        while done < len(values):
            done += run(values[done:], out[done:], *self._arrays())  # the arrays again after a grow
            if done < len(values):
                self._grow()
        return out

    # -- conversion ----------------------------------------------------------------------------------
    @classmethod
    def _sized(cls, config, n_ctx: int, n_semi: int, n_facts: int) -> Engine:
        """An empty engine for a state of ``n_ctx`` contexts, ``n_semi`` semi-contexts and ``n_facts``
        facts a side (one being loaded or converted), with room for as many contexts and facts again:
        a step may create one context per potential context, hundreds in a burst of new patterns,
        and run's bound for the facts they may create is loose (most potentials find their
        semi-contexts). With a quarter spare, most of a loaded fleet's states grew in the first
        seconds of a live stream, ~0.5 ms each in a pass. Pages never written are never mapped."""
        eng = cls(config, capacity=max(16, 2 * n_ctx + 2, n_semi + n_semi // 4 + 2))
        size = 2 * n_facts + 16 * eng.max_facts
        eng.pool = np.zeros((2, size), dtype=np.int64)
        eng.ent = np.zeros((2, size, 2), dtype=np.int64)
        return eng

    @classmethod
    def from_state(cls, st, config) -> Engine:
        facts_by_side: list[list[list]] = []
        for side in range(2):
            facts_of: list[list] = [[] for _ in st.semi_len[side]]
            for f, sids in st.fact_semis[side].items():
                for sid in sids:
                    facts_of[sid].append(f)
            facts_by_side.append(facts_of)
        used = max(sum(len(f) for f in facts) for facts in facts_by_side)
        n_ctx, n_semi = len(st.contexts), max(len(st.semi_len[0]), len(st.semi_len[1]))
        eng = cls._sized(config, n_ctx, n_semi, used)
        eng.n_seen, eng.warm_values = int(st.n_seen), list(st.warm_values)
        eng.min_value, eng.value_step = float(st.min_value), float(st.value_step)
        m = eng.meta
        for side, facts_of in enumerate(facts_by_side):
            hash_of = {sid: h for h, sid in st.semi_ids[side].items()}
            pos = 0
            for sid, facts in enumerate(facts_of):
                facts.sort()
                values = [f for f in facts if f < NEURON_OFFSET]
                mask = sum(1 << int(value_bit(f)) for f in values)
                crossings = len(st.semi_crossed[side][sid])
                neurons = [f - NEURON_OFFSET for f in facts if f >= NEURON_OFFSET]
                first = neurons[0] if neurons else -1
                row = (len(facts), pos, crossings, -1, -1, hash_of[sid], mask, len(values), 0, -1, first)
                eng.semi[side, :, sid] = row
                eng.pool[side, pos : pos + len(facts)] = facts
                pos += len(facts)
            m[M_NSEMI0 + side], m[M_POOL0 + side] = len(facts_of), pos
            e = 0
            for k, (f, sids) in enumerate(st.fact_semis[side].items()):
                eng.forder[side, k] = f
                head = -1
                for sid in sids:
                    eng.ent[side, e] = (head, sid)
                    head = e
                    e += 1
                eng.fhead[side, fact_index(f)] = head
            m[M_NENT0 + side], m[M_NFACT0 + side] = e, len(st.fact_semis[side])
            crossed = st.crossed_ids[side]
            eng.crossed[side, : len(crossed)] = crossed
            m[M_NCROSSED0 + side] = len(crossed)
            seen = sorted({f for sid in crossed for f in st.semi_crossed[side][sid]})
            eng.cross_facts[side, : len(seen)] = seen
            m[M_NCF0 + side] = len(seen)
        rebuild_table(eng.htab, eng.semi, m)
        for cid, (count, zero, lh, rh) in enumerate(st.contexts):
            eng.ctx[cid] = (count, zero, lh, rh, -1, -1, 0, 0)
        for lid, row in enumerate(st.left_contexts):
            prev = -1
            for rid, cid in row.items():
                eng.ctx[cid, C_RIGHT] = rid
                if prev < 0:
                    eng.semi[0, S_HEAD, lid] = cid
                else:
                    eng.ctx[prev, C_NEXT] = cid
                prev = cid
            eng.semi[0, S_TAIL, lid] = prev
        m[M_NCTX] = n_ctx
        m[M_NEWCTX] = st.new_context_id
        m[M_NLEFT] = len(st.left_facts)
        eng.left[: len(st.left_facts)] = st.left_facts
        m[M_LSTAMP] = 1
        for f in st.left_facts:
            if f >= NEURON_OFFSET:
                eng.ctx[f - NEURON_OFFSET, C_LMARK] = 1
        hist = list(st.history)
        eng.hist[:] = 0.0
        eng.hist[: len(hist)] = hist
        m[M_HIST_N], m[M_HIST_POS] = len(hist), 0
        return eng

    def to_state(self, st) -> None:
        """Write this state into the reference ``ContextualState`` ``st`` (every field)."""
        m = self.meta
        resolve_left_crossing(self.semi, self.ent, self.fhead, self.crossed, self.cross_facts, m)
        st.n_seen, st.warm_values = self.n_seen, list(self.warm_values)
        st.min_value, st.value_step = self.min_value, self.value_step
        for side in range(2):
            n = int(m[M_NSEMI0 + side])
            semi = self.semi[side, :, :n]
            pool = self.pool[side]
            spans = zip(semi[S_LEN].tolist(), semi[S_START].tolist(), strict=True)
            facts_of = [pool[s : s + k].tolist() for k, s in spans]
            st.semi_ids[side] = {h: sid for sid, h in enumerate(semi[S_HASH].tolist())}
            st.semi_len[side] = semi[S_LEN].tolist()
            crossed = self.crossed[side, : m[M_NCROSSED0 + side]].tolist()
            ref = set(self.cross_facts[side, : m[M_NCF0 + side]].tolist())
            st.semi_crossed[side] = [[] for _ in range(n)]
            for sid in crossed:
                st.semi_crossed[side][sid] = [f for f in facts_of[sid] if f in ref]
            st.crossed_ids[side] = crossed
            fact_semis = {}
            for f in self.forder[side, : m[M_NFACT0 + side]].tolist():
                sids, e = [], int(self.fhead[side, fact_index(f)])
                while e >= 0:
                    sids.append(int(self.ent[side, e, E_SEMI]))
                    e = int(self.ent[side, e, E_NEXT])
                fact_semis[f] = sorted(sids)
            st.fact_semis[side] = fact_semis
        n_ctx = int(m[M_NCTX])
        ctx = self.ctx[:n_ctx]
        st.contexts = [list(row) for row in ctx[:, :4].tolist()]
        st.left_contexts = []
        for lid in range(int(m[M_NSEMI0])):
            row, cid = {}, int(self.semi[0, S_HEAD, lid])
            while cid >= 0:
                row[int(ctx[cid, C_RIGHT])] = cid
                cid = int(ctx[cid, C_NEXT])
            st.left_contexts.append(row)
        st.new_context_id = int(m[M_NEWCTX])
        st.left_facts = tuple(self.left[: m[M_NLEFT]].tolist())
        hn, pos = int(m[M_HIST_N]), int(m[M_HIST_POS])
        hist = self.hist[:hn].tolist()
        st.history = hist[pos:] + hist[:pos] if hn == len(self.hist) else hist


# --------------------------------------------------------------------------- many states in one call


class _Slots:
    """Each live Engine's arrays (``Engine._arrays``) as one entry of a numba typed List, so that
    ``run_many`` reaches a batch's states through one argument. An engine takes a slot on its first
    batch and refreshes it when its arrays change (grown, range learned again); when it is collected
    its slot is emptied and reused. The list is only changed under ``lock``, which a batch holds
    until its halves are done: a step never reads an entry that is being replaced."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = None
        self.size = 0  # entries in items (kept here: the typed List's len() compiles on first use)
        self.owners: list = []  # weak references to each slot's engine: a copied engine gets its own
        self.free: list[int] = []
        self.released: list[int] = []  # slots of collected engines (a finalizer's append, any thread)
        self.empty: tuple | None = None

    def slot_of(self, eng: Engine) -> int:
        """The engine's slot, up to date (call under ``lock``)."""
        if self.items is None:
            from numba import typed

            self.items = typed.List()
            self.empty = Engine(eng.config, capacity=1)._arrays()
        while self.released:
            slot = self.released.pop()
            self.items[slot] = self.empty
            self.free.append(slot)
        if eng._slot < 0 or self.owners[eng._slot]() is not eng:
            if self.free:
                eng._slot = self.free.pop()
                self.items[eng._slot] = eng._arrays()
                self.owners[eng._slot] = weakref.ref(eng)
            else:
                eng._slot = self.size
                self.items.append(eng._arrays())
                self.owners.append(weakref.ref(eng))
                self.size += 1
            weakref.finalize(eng, self.released.append, eng._slot)
        else:
            eng._fparams()  # marks the slot stale if the range was learned again
            if eng._slot_stale:
                self.items[eng._slot] = eng._arrays()
        eng._slot_stale = False
        return eng._slot

    def in_use(self) -> int:
        return self.size - len(self.free) - len(self.released)


_SLOTS = _Slots()


@functools.cache
def _step_pool():
    """The one worker thread that steps the second half of a batch's states (``steps_many``)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="detector-step")


def steps_many(engines: list[Engine], series: list[np.ndarray]) -> list[np.ndarray]:
    """``[e.steps(v) for e, v in zip(engines, series)]`` in one compiled call (``run_many``), each
    engine at most once. A live pass steps a few readings of each of hundreds of (device, reading)
    states: called one by one that costs more in Python than in the step. With 64 states or more and
    two CPUs the batch runs as two halves at once, the second on a worker thread (the step releases
    the interpreter lock); the scores are the same, each state being stepped by one thread only."""
    n = len(engines)
    if n == 0:
        return []
    lengths = np.fromiter((len(v) for v in series), dtype=np.int64, count=n)
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    values = np.concatenate(series).astype(np.float64, copy=False) if bounds[-1] else np.zeros(0)
    out = np.empty(len(values))
    done = np.zeros(n, dtype=np.int64)
    split = n >= 64 and (os.cpu_count() or 1) >= 2 and len({id(e) for e in engines}) == n
    with _SLOTS.lock:
        which = np.fromiter((_SLOTS.slot_of(e) for e in engines), dtype=np.int64, count=n)
        items = _SLOTS.items
        if split:  # halves of about the same number of readings
            half = int(np.clip(np.searchsorted(bounds, bounds[-1] / 2), 1, n - 1))
            other = _step_pool().submit(run_many, items, which[half:], values, bounds[half:], out, done[half:])
            run_many(items, which[:half], values, bounds[: half + 1], out, done[:half])
            other.result()
        else:
            run_many(items, which, values, bounds, out, done)
    # a state whose arrays had to grow stopped before that step, changing nothing: the rest on its own
    for k in np.flatnonzero(done < lengths).tolist():
        eng, a, b = engines[k], int(bounds[k]), int(bounds[k + 1])
        eng._grow()
        out[a + done[k] : b] = eng.steps(values[a + done[k] : b])
    return [out[bounds[k] : bounds[k + 1]] for k in range(n)]


_PRIMED: list = []


def prime(config) -> None:
    """Load the compiled step (from numba's cache, else compile it) now, once per process: its first
    call takes seconds, which a live scorer should spend when it loads a model, not on a reading."""
    if not _PRIMED:
        eng = Engine(config)
        eng.min_value, eng.value_step = 0.0, 1.0
        eng.steps(np.zeros(2))
        # the slots' typed List compiles each of its operations on first use, in every process
        # (append ~0.6 s, setitem ~0.3 s): all of them now, not when a live pass first needs one
        steps_many([eng], [np.zeros(2)])
        eng._slot_stale = True
        steps_many([eng], [np.zeros(2)])
        _PRIMED.append(True)


def _pow2(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


def _bigger(arr: np.ndarray, axis: int, need: int, fill: int = 0) -> np.ndarray:
    if arr.shape[axis] >= need:
        return arr
    shape = list(arr.shape)
    shape[axis] = max(need, 2 * arr.shape[axis])
    new = np.full(shape, fill, dtype=arr.dtype)
    new[tuple(slice(0, s) for s in arr.shape)] = arr
    return new


# --------------------------------------------------------------------------- many states in a few arrays

# A model stores its streams' states packed: each array cut to what it uses, one side at a time, and
# concatenated over streams; the fact lists (ent, fhead, forder) are not stored but rebuilt, exactly,
# by registering each semi-context's facts again in creation order. Loading 500 streams of ~1,000
# contexts takes milliseconds, against ~20 s to decode their JSON and convert it (from_state).
_PACKED = ("ctx", "semi0", "semi1", "pool0", "pool1", "crossed0", "crossed1", "cross_facts", "left", "hist", "meta")


def _used(eng: Engine, name: str) -> np.ndarray:
    m = eng.meta
    if name == "ctx":
        return eng.ctx[: m[M_NCTX]]
    if name.startswith("semi"):
        side = int(name[-1])
        return eng.semi[side, :, : m[M_NSEMI0 + side]]
    if name.startswith("pool"):
        side = int(name[-1])
        return eng.pool[side, : m[M_POOL0 + side]]
    if name.startswith("crossed"):
        side = int(name[-1])
        return eng.crossed[side, : m[M_NCROSSED0 + side]]
    return getattr(eng, name)


@njit(cache=True)
def rebuild_fact_lists(semi, pool, ent, fhead, forder, meta):
    """The fact -> semi-context lists and the facts' first-seen order, as ``_semi`` built them."""
    fhead[:, :] = -1
    for side in range(2):
        e = 0
        nfact = 0
        for sid in range(meta[M_NSEMI0 + side]):
            start = semi[side, S_START, sid]
            for i in range(start, start + semi[side, S_LEN, sid]):
                ix = fact_index(pool[side, i])
                if fhead[side, ix] < 0:
                    forder[side, nfact] = pool[side, i]
                    nfact += 1
                ent[side, e, E_NEXT] = fhead[side, ix]
                ent[side, e, E_SEMI] = sid
                fhead[side, ix] = e
                e += 1
        meta[M_NENT0 + side] = e
        meta[M_NFACT0 + side] = nfact


def pack(engines: list[Engine]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in _PACKED:
        arrays = [_used(e, name) for e in engines]
        dtype = np.float64 if name == "hist" else np.int64
        out[name] = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, dtype=dtype)
        out[f"{name}_shape"] = np.array([a.shape for a in arrays], dtype=np.int64).reshape(len(arrays), -1)
    out["n_seen"] = np.array([e.n_seen for e in engines], dtype=np.int64)
    out["range"] = np.array([[e.min_value, e.value_step] for e in engines], dtype=np.float64).reshape(-1, 2)
    out["warm"] = np.concatenate([np.asarray(e.warm_values, dtype=np.float64) for e in engines] or [np.zeros(0)])
    out["warm_len"] = np.array([len(e.warm_values) for e in engines], dtype=np.int64)
    return out


def unpack(packed: dict, config) -> list[Engine]:
    n = len(packed["n_seen"])
    columns: dict[str, list[np.ndarray]] = {}
    for name in _PACKED:
        flat, shapes = np.asarray(packed[name]), np.asarray(packed[f"{name}_shape"])
        sizes = np.prod(shapes, axis=1) if len(shapes) else np.zeros(0, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)))
        columns[name] = [flat[starts[i] : starts[i + 1]].reshape(shapes[i]) for i in range(n)]
    warm_ends = np.cumsum(packed["warm_len"])
    engines = []
    for i in range(n):
        part = {name: columns[name][i] for name in _PACKED}
        n_ctx = len(part["ctx"])
        n_semi = max(part["semi0"].shape[1], part["semi1"].shape[1])
        eng = Engine._sized(config, n_ctx, n_semi, max(len(part["pool0"]), len(part["pool1"])))
        m = eng.meta
        m[:] = part["meta"]
        eng.ctx[:n_ctx] = part["ctx"]
        eng.cross_facts[:] = part["cross_facts"]
        eng.left[:] = part["left"]
        eng.hist[:] = part["hist"]
        for side in range(2):
            semi, pool, crossed = part[f"semi{side}"], part[f"pool{side}"], part[f"crossed{side}"]
            eng.semi[side, :, : semi.shape[1]] = semi
            eng.pool[side, : len(pool)] = pool
            eng.crossed[side, : len(crossed)] = crossed
        rebuild_fact_lists(eng.semi, eng.pool, eng.ent, eng.fhead, eng.forder, m)
        rebuild_table(eng.htab, eng.semi, m)
        eng.n_seen = int(packed["n_seen"][i])
        eng.min_value, eng.value_step = (float(v) for v in packed["range"][i])
        eng.warm_values = packed["warm"][warm_ends[i] - packed["warm_len"][i] : warm_ends[i]].tolist()
        engines.append(eng)
    with _SLOTS.lock:  # their slots now, while the model loads, not in a live scorer's first pass
        for eng in engines:
            _SLOTS.slot_of(eng)
    return engines
