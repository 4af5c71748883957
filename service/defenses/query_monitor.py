"""The query monitor: a stateful detector of query-based (black-box) attacks.

Square, HopSkipJump, boundary attacks and random search send long runs of near-identical
queries. Following Blacklight (Li et al., USENIX Security 2022), every image a monitored
pipeline receives gets a probabilistic fingerprint:

  1. quantize each pixel to levels of `quantization`/255 (small perturbations vanish),
  2. flatten the levels column by column (`layout="columns"`; Blacklight's row order is
     `layout="rows"`), slide a window of `window` values over them and hash every window's
     contents with a keyed hash (the secret decides which windows a query keeps, so an
     attacker cannot aim at the kept ones; the position is not hashed, so shifting the image
     by a few pixels keeps most hashes),
  3. leave out uninformative windows (fewer than `informative` of their values differ from
     the image's most common level: MNIST's background with a stroke's edge, which thousands
     of different digits share),
  4. keep the `top_n` largest distinct hashes, and (`lines`) add one keyed hash per
     informative column (row, in the rows layout), whole and with its position.

With every window kept (Blacklight's rule) distinct benign MNIST digits matched: 925 of 5,000
shared 25+ of 50 hashes with earlier ones, through the background windows all digits share.
Leaving out the uninformative windows brought the worst benign digit to 5-8 (docs/query_monitor.md).

Why columns: Square (ART's L-inf version) starts from vertical stripes of +-eps and then sets
one large square (25 of 28 rows at first) to one sign per query. In row order nearly every
50-value window crosses the square, so few hashes survive until the squares shrink; in column
order every column whose stripe already has the square's sign is unchanged, and so are the
columns beside the square, so a candidate keeps a large share of its predecessor's windows,
and its unchanged columns whole. Two different digits rarely have the same informative column
at the same place, so the positioned column hashes count for attacks, not for benign traffic.
Perturbations spread over the whole image (HopSkipJump, boundary) vanish in the quantization
in either order.

One store of the fingerprints of *all* recent queries, from every client (many accounts do not
help an attacker), counts in how many remembered queries each hash occurs. A query whose
fingerprint shares at least `threshold` hashes with the store is flagged: in practice it is a
few pixels away from an earlier query.

Rules that keep benign traffic out (docs/query_monitor.md):
  * an exact repeat (the same decoded pixels) is not evidence against itself: its own earlier
    copies are subtracted before matching, so retries and many clients sending the same public
    image are not flagged; a repeat of a *flagged* query is still flagged, because it still
    matches the other queries it was flagged for;
  * only the hashes are remembered, for at least half of `memory_window_s` and never the
    whole of it, and at most `max_queries` queries (two generations, each begun in a slot of
    half the window; the oldest is dropped when the newest is full or in a later slot); and
    a suspect's last images, 8-bit (with `near_matches`, every client's; below).

Actions: `flag` (count and answer), `reject` (the image's answer is a rejection by
`query_monitor`), `block` (reject, and a client with more than `block_after` flags within
`block_window_s` gets 429 `attack_suspected` for `cooldown_s`). In every mode a client flagged
within `block_window_s` is a suspect, held to `suspect_threshold`: once an attack has been
seen, its later queries that happen to change more of the image (Square flipping a large
square's sign) are still caught. Other clients keep the normal threshold.

A suspect's queries are also compared in pixel space with its own last `suspect_history`
queries (8-bit, larger images averaged down to at most 32x32 per channel, for `block_window_s`):
one within `suspect_linf` in L-inf of one of them is flagged. Every query of one L-inf attack
lies within eps of the attacked image, so within 2 eps of every other; Square's early queries,
which re-sign squares of most of the image, can share fewer than `suspect_threshold` hashes with
anything remembered, and at a 5,000-query budget (ART scales the square sizes with it) one run
in ten found an adversarial among them. Two different digits rarely come that close (the nearest
of the other 4,999 mnist5k digits is within 0.62 for 3% of them); on low-resolution data with
few levels (the 8x8 UCI digits: nearly all) it would reject a suspect's benign queries too,
which the quality gate measures (`query_monitor:suspect_linf`). Averaging keeps the test sound: it never
makes two images' L-inf distance larger.

With `near_matches` set (0, off, by default) every client's query is compared the same way,
and flagged when that many of its remembered ones are that close: the hashes are exact over
fixed quantization steps, and an attacker who puts every pixel just beside a step boundary,
one side or the other per query, shares no hash at 1/255 apart. Off by default for what it
costs benign clients and for how it is evaded (docs/query_monitor.md, "Every client's
queries in pixel space").

The store is per process (`store: memory`) or shared by every replica through Redis
(`store: redis`). A Redis that cannot be reached degrades to the per-process store, with one
log line per outage and `shieldserve_query_monitor_degraded` = 1, never an error to the client;
one that answers but refuses writes (full) degrades too, but its blocks and suspect marks are
still read (QueryMonitor._judge).

Secrets: the hashing key (from `query_monitor.secret`, or generated: per process on the memory
store, once per Redis on the shared store, where every replica must hash alike) never appears
in a response, a log line or a metric; client ids are stored keyed-hashed.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from service.defenses.base import exact_rows

log = logging.getLogger("shieldserve")

Action = Literal["flag", "reject", "block"]
PUBLIC_POLICY = ("enabled", "action", "threshold", "suspect_threshold", "suspect_linf", "near_matches",
                 "block_after", "block_window_s", "cooldown_s")
NEAR_SIDE = 32  # suspects' remembered images: at most this many pixels a side per channel
NEAR_MEMORY_BYTES = 64 * 2**20  # the cap on suspects' remembered images (per process; on Redis, in all)
# on Redis each remembered image counts these bytes more, and each suspect these: Redis' own
# bookkeeping of the lists and of their index (measured on Redis 7: 64 MiB of one-image suspects
# took 111 MiB uncounted, of 128-image ones 68 MiB; counted, 64 MiB at most)
NEAR_REDIS_PER_IMAGE, NEAR_REDIS_PER_SUSPECT = 64, 512
# the memory store's per-client tables (flags, suspects, blocks): past MAX_CLIENTS entries the
# expired are forgotten, then those ending first, down to KEEP_CLIENTS (half: a trim, costing a
# pass over the table, is needed once per MAX_CLIENTS - KEEP_CLIENTS new clients, not each one)
MAX_CLIENTS = 100_000
KEEP_CLIENTS = 50_000
LIFT_CHECK_S = 1.0  # how often a replica asks Redis whether a block it holds was lifted


# the quality gate's key for the monitor (models/recipes/quality.py measures it on the
# bundle's own images; Bundle.unusable(GATE_KEY) says whether the service may run it)
GATE_KEY = "query_monitor"
NEAR_GATE_KEY = "query_monitor:suspect_linf"  # the suspect pixel check, measured on its own


class AttackSuspected(Exception):
    """The client is blocked (block mode): 429 `attack_suspected` with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many queries of this client looked like a query-based attack; "
                         f"retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Fingerprinter:
    """Blacklight's fingerprint: quantized pixels, keyed hashes of sliding windows, top N."""

    key: bytes = field(repr=False)  # the secret: never in a repr (a log line, a traceback)
    quantization: int = 25
    window: int = 50
    top_n: int = 80
    informative: float = 0.25
    layout: Literal["columns", "rows"] = "columns"
    lines: bool = True

    def __post_init__(self) -> None:
        if self.layout not in ("columns", "rows"):
            raise ValueError(f"query monitor layout must be columns or rows, got {self.layout!r}")
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"coefficients" + self.key).digest(), "big"))
        # a polynomial hash mod 2**64 with a secret odd base and a secret offset, mixed by
        # splitmix64's finaliser (see fingerprint)
        base, at = (rng.integers(0, 2**63, size=2, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
        inverse = pow(int(base), -1, 2**64)  # odd numbers are invertible mod 2**64
        object.__setattr__(self, "_base", int(base))
        object.__setattr__(self, "_inverse", inverse)
        object.__setattr__(self, "_at", at)
        object.__setattr__(self, "_line_at", rng.integers(0, 2**63, dtype=np.uint64))
        object.__setattr__(self, "_plans", {})
        object.__setattr__(self, "_digest_key", hashlib.sha256(b"digest" + self.key).digest()[:32])

    def _plan(self, length: int, n_lines: int, per: int) -> tuple[np.ndarray, ...]:
        """Per image shape, computed once: the powers of the base and of its inverse, and for
        the lines their ends, their powers and their keyed position terms."""
        key = (length, n_lines, per)
        plans = self._plans  # type: ignore[attr-defined]
        if key not in plans:
            m = 2**64
            fwd = [1] * length
            inv = [1] * length
            for t in range(1, length):
                fwd[t] = fwd[t - 1] * self._base % m  # type: ignore[attr-defined]
                inv[t] = inv[t - 1] * self._inverse % m  # type: ignore[attr-defined]
            f, i = np.array(fwd, dtype=np.uint64), np.array(inv, dtype=np.uint64)
            starts = np.arange(n_lines) * per
            with np.errstate(over="ignore"):
                line_at = self._line_at + np.arange(1, n_lines + 1, dtype=np.uint64) * _GOLDEN  # type: ignore[attr-defined]
            plans[key] = (f, i, starts, starts + per, f[starts + per - 1], line_at)
        return plans[key]

    def width(self, x: torch.Tensor) -> int:
        """Hashes per image: the top N windows, and one per line (column or row) when `lines`."""
        return fingerprint_width(tuple(x.shape[1:]), self.top_n, self.layout, self.lines)

    def fingerprint(self, x: torch.Tensor) -> tuple[list[bytes], np.ndarray]:
        """Per image: a keyed digest of its exact pixels (what makes two queries the same
        query) and its hashes, (B, width) uint64: the top-N distinct window hashes, then (with
        `lines`) one hash per informative line. Missing ones (a nearly uniform image, an
        uninformative line) are filled with values derived from the digest, which only the
        image's own exact copies share. Vectorised over the batch: the service fingerprints
        a whole batch in one call (numpy's cost per call is most of it for one digit)."""
        b = int(x.shape[0])
        a = x.detach().to("cpu", torch.float32).numpy().reshape(b, -1)
        # the exact copy (base.exact_bytes): 8-bit pixels on the grid (a gray digit as an RGB PNG
        # or /v2 UINT8 was taken for a near copy of itself), exact floats off it (/v2 FP32 queries
        # a fraction of a level apart, as 8-bit repeats, went unflagged)
        digests = [hashlib.blake2b(row, key=self._digest_key, digest_size=16).digest()  # type: ignore[attr-defined]
                   for row in exact_rows(a)]
        if self.layout == "columns" and x.dim() >= 3:  # (..., H, W) read column by column
            a = a.reshape(tuple(x.shape)).swapaxes(-1, -2).reshape(b, -1)
        # floor by the cast: the clipped values are >= 0
        lv = (np.clip(a, 0.0, 1.0) * np.float32(255.0 / self.quantization)).astype(np.uint8)
        length = lv.shape[1]
        w = self.window
        if length < w:
            raise ValueError(f"images of {length} values are smaller than the window ({w})")
        n_lines, per = _line_shape(tuple(x.shape[1:]), self.layout) if self.lines else (0, 0)
        fwd, inv, starts, ends, line_fwd, line_at = self._plan(length, n_lines, per)
        n = length - w + 1
        prefix = np.zeros((b, length + 1), dtype=np.uint64)
        with np.errstate(over="ignore"):
            # window k's polynomial sum(lv[k+j] * base**(w-1-j)) from prefix sums of
            # lv[t] * base**-t, all mod 2**64 (uint64 arithmetic wraps): O(length), not O(length*w)
            np.cumsum(lv * inv, axis=1, out=prefix[:, 1:])
            h = _mix((prefix[:, w:] - prefix[:, :n]) * fwd[w - 1:] + self._at)  # type: ignore[attr-defined]
        levels = int(255 // self.quantization) + 1
        # each row's most common level (its background), all rows in one bincount
        mode = np.bincount((lv + (np.arange(b) * levels)[:, None]).ravel(),
                           minlength=b * levels).reshape(b, levels).argmax(axis=1)
        off = np.zeros((b, length + 1), dtype=np.int32)
        np.cumsum(lv != mode[:, None], axis=1, out=off[:, 1:])
        keep = (off[:, w:] - off[:, :n]) >= int(np.ceil(self.informative * w))
        if n_lines:
            # each whole line (a column, in the columns layout) with its position: Square's
            # queries leave whole columns unchanged, and two different digits rarely share an
            # informative column at the same place
            with np.errstate(over="ignore"):
                line_h = _mix((prefix[:, ends] - prefix[:, starts]) * line_fwd + line_at)
            line_keep = (off[:, ends] - off[:, starts]) >= int(np.ceil(self.informative * per))
        out = np.empty((b, self.top_n + n_lines), dtype=np.uint64)
        for i in range(b):
            top = np.unique(h[i][keep[i]])[-self.top_n:]
            lines = line_h[i][line_keep[i]] if n_lines else top[:0]
            k = len(top)
            missing = self.top_n + n_lines - k - len(lines)
            out[i, :k] = top
            if missing:
                with np.errstate(over="ignore"):
                    seed = np.uint64(int.from_bytes(digests[i][:8], "big"))
                    out[i, k:k + missing] = _mix(seed + np.arange(1, missing + 1, dtype=np.uint64) * _GOLDEN)
            out[i, k + missing:] = lines
        return digests, out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: splitmix64's increment


def _line_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(lines per image, values per line) of an image of `shape` (no batch axis), flattened;
    (0, 0) for flat inputs."""
    if len(shape) < 2:
        return 0, 0
    per = int(shape[-2] if layout == "columns" else shape[-1])
    return int(np.prod(shape)) // per, per


def fingerprint_width(shape: tuple[int, ...], top_n: int, layout: str = "columns", lines: bool = True) -> int:
    """Hashes per image of `shape` (no batch axis): the most a query can share with a
    remembered one, so the highest threshold that can ever flag."""
    return top_n + (_line_shape(shape, layout)[0] if lines else 0)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (in place on uint64; wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def near_pixels(x: torch.Tensor) -> np.ndarray:
    """Images as the suspect check remembers them: (B, L) uint8 of the [0, 1] pixels, images
    larger than NEAR_SIDE a side averaged down to it (an average of differences is never larger
    than the largest difference, so a distance measured here is a lower bound of the true one)."""
    x = x.detach().to("cpu", torch.float32)
    if x.dim() >= 3 and (x.shape[-1] > NEAR_SIDE or x.shape[-2] > NEAR_SIDE):
        lead = tuple(x.shape[:-2])
        x = torch.nn.functional.adaptive_avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]),
                                                    (min(NEAR_SIDE, x.shape[-2]), min(NEAR_SIDE, x.shape[-1])))
        x = x.reshape(*lead, *x.shape[-2:])
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).reshape(x.shape[0], -1).numpy()


def near_distances(history: Sequence[np.ndarray], pixels: np.ndarray) -> list[float | None]:
    """For each image, its L-inf distance (in [0, 1] units) to the nearest remembered image of
    the same size or earlier image of the same request; None where there is none. An exact
    copy does not count: retries are not an attack (and teach an attacker nothing)."""
    return near_scan(history, pixels)[0]


def near_scan(history: Sequence[np.ndarray], pixels: np.ndarray, linf: float | None = None
              ) -> tuple[list[float | None], list[int]]:
    """`near_distances`, and for each image how many of those earlier images (exact copies
    left out) are near it, within `linf` as `is_near` allows (0s without `linf`)."""
    # the images of one request share a shape: the remembered ones of that shape, then the
    # request's own, stacked once; image i is compared with everything before it. Only the
    # first of equal rows counts (remembered or in the request): a retry, or a flood of one
    # image's copies, is one image, never counted twice towards near_matches
    same = [h for h in history if h.shape == pixels.shape[1:]]
    pool = np.concatenate([np.stack(same), pixels]) if same else pixels
    first: dict[bytes, int] = {}
    distinct = np.array([first.setdefault(row.tobytes(), j) == j for j, row in enumerate(pool)])
    pool = pool.astype(np.int16)
    reach = -1.0 if linf is None else _near_steps(linf)
    out: list[float | None] = []
    counts: list[int] = []
    for i in range(len(pixels)):
        k = len(same) + i
        d = np.abs(pool[:k] - pool[k]).max(axis=1)
        d = d[(d > 0) & distinct[:k]]
        out.append(float(d.min()) / 255.0 if d.size else None)
        counts.append(int((d <= reach).sum()))
    return out, counts


def _near_steps(linf: float) -> float:
    """The largest L-inf distance, in 8-bit steps, that is within `linf` allowing for the 8-bit
    rounding of both images (one bound for near_scan's counts and is_near)."""
    return linf * 255.0 + 1.5


def is_near(distance: float | None, linf: float) -> bool:
    """Within `linf` (a near_distances distance, a whole number of 8-bit steps), allowing for the
    8-bit rounding of both images."""
    return distance is not None and round(distance * 255.0) <= _near_steps(linf)


# --------------------------------------------------------------------------- stores
class MemoryStore:
    """Fingerprints and client flags in this process: two generations of hash counts."""

    def __init__(self, window_s: float, max_queries: int) -> None:
        self.half_s = window_s / 2.0
        self.cap = max(1, max_queries // 2)
        self._lock = threading.Lock()
        self._gens: list[tuple[dict[int, int], set[bytes]]] = [({}, set()), ({}, set())]  # [old, current]
        self._started = time.monotonic()
        self._flags: dict[str, list[float]] = {}
        self._blocked: dict[str, float] = {}
        # for a block this store holds as a copy of one in Redis, that Redis server's run id
        # (None: a block made here, while Redis was down): gone from the same server, it was
        # lifted there (an operator's unblock, a DEL); from a restarted one (another run id,
        # whether or not it kept its data), it was lifted only if the unblock says so
        self._block_run_id: dict[str, str | None] = {}
        self._suspects: dict[str, float] = {}  # client -> until when it is held to suspect_threshold
        # suspect -> (until when, its last images), least recently used first; NEAR_MEMORY_BYTES at most
        self._near: OrderedDict[str, tuple[float, list[np.ndarray]]] = OrderedDict()
        self._near_bytes = 0

    def _rotate(self, now: float) -> None:
        # time is cut into slots of half the window: a generation turns over at the first query
        # of a later slot (or when full) and becomes the old one, unless it began two slots ago
        # or more (then both go); so a query is matched for at least half the window (one that
        # came at the end of a slot), never for the whole of it (docs/query_monitor.md)
        cur = self._gens[1]
        slots = _slot(now, self.half_s) - _slot(self._started, self.half_s)
        if slots > 0 or len(cur[1]) >= self.cap:
            if slots >= 2:
                self._gens = [({}, set()), ({}, set())]  # both are a whole window old
            else:
                self._gens = [cur, ({}, set())]
            self._started = now

    def match(self, digests: Sequence[bytes], hashes: np.ndarray) -> list[int]:
        """For each query, how many of its hashes the store holds (its own exact earlier copies
        left out); then remember it."""
        out = []
        with self._lock:
            now = time.monotonic()
            for d, hs in zip(digests, hashes):
                self._rotate(now)
                (old_h, old_d), (cur_h, cur_d) = self._gens
                me = (d in cur_d) + (d in old_d)
                keys = hs.tolist()
                out.append(sum(1 for k in keys if cur_h.get(k, 0) + old_h.get(k, 0) - me >= 1))
                if d not in cur_d:
                    cur_d.add(d)
                    for k in keys:
                        cur_h[k] = cur_h.get(k, 0) + 1
        return out

    def remembered(self) -> int:
        return sum(len(d) for _, d in self._gens)

    def suspect(self, client: str) -> bool:
        return self._suspects.get(client, 0.0) > time.time()

    def mark_suspect(self, client: str, seconds: float) -> None:
        now = time.time()
        with self._lock:
            self._suspects[client] = now + seconds
            _trim(self._suspects, lambda until: until <= now, lambda until: until)

    def recall(self, client: str, pixels: np.ndarray, keep: int, seconds: float) -> list[np.ndarray]:
        """The client's remembered images (oldest first); then remember `pixels` too, the last
        `keep` for `seconds`."""
        now = time.time()
        with self._lock:
            until, images = self._near.pop(client, (0.0, []))
            self._near_bytes -= sum(a.nbytes for a in images)
            before = images if until > now else []
            # each row its own copy: kept as views, one row held its whole request's array alive
            # (64 images for one kept), while the bound below counts the rows' bytes
            kept = (before + [row.copy() for row in pixels[-keep:]])[-keep:]
            self._near[client] = (now + seconds, kept)
            self._near_bytes += sum(a.nbytes for a in kept)
            while self._near_bytes > NEAR_MEMORY_BYTES and len(self._near) > 1:
                _, (_, dropped) = self._near.popitem(last=False)
                self._near_bytes -= sum(a.nbytes for a in dropped)
        return before

    def blocked_for(self, client: str) -> float:
        until = self._blocked.get(client)
        if until is None:
            return 0.0
        left = until - time.time()
        if left <= 0:
            with self._lock:  # _trim walks these tables under the lock: never beside it
                if self._blocked.get(client, 0.0) <= time.time():
                    self._drop(client)
            return 0.0
        return left

    def block_run_id(self, client: str) -> str | None:
        """The Redis run id of the block this store holds for the client (None: made here, or none)."""
        return self._block_run_id.get(client) if self.blocked_for(client) > 0 else None

    def held_blocks(self) -> list[tuple[str, str | None]]:
        """(client, its block's Redis run id) for every block this store holds now."""
        now = time.time()
        return [(c, self._block_run_id.get(c)) for c, until in list(self._blocked.items()) if until > now]

    def _block(self, client: str, until: float, now: float, run_id: str | None) -> None:
        """Under the lock: hold the client's block until `until` (a later end of one it holds
        extends it); `run_id`: the Redis server that holds it too, if any."""
        if run_id is not None or self._blocked.get(client, 0.0) <= now:
            self._block_run_id[client] = run_id
        self._blocked[client] = max(self._blocked.get(client, 0.0), until)
        if len(self._blocked) > MAX_CLIENTS:
            _trim(self._blocked, lambda until: until <= now, lambda until: until)
            for c in [c for c in self._block_run_id if c not in self._blocked]:
                del self._block_run_id[c]

    def hold_block(self, client: str, seconds: float, run_id: str | None = None) -> None:
        """Keep a block the shared store reported (for `seconds` more; `run_id`: that server's),
        so that this replica still enforces it while Redis is down, or after a restart lost it."""
        now = time.time()
        with self._lock:
            self._block(client, now + seconds, now, run_id)

    def _drop(self, client: str) -> float:
        """Under the lock: forget the client's block; when it was to end (0: none)."""
        self._block_run_id.pop(client, None)
        return self._blocked.pop(client, 0.0)

    def drop_block(self, client: str) -> None:
        with self._lock:
            self._drop(client)

    def unblock(self, client: str) -> bool:
        """Lift the client's block, flags and suspect mark in this store; True if it was blocked."""
        now = time.time()
        with self._lock:
            was = self._drop(client) > now
            self._flags.pop(client, None)
            self._suspects.pop(client, None)
        return was

    def add_flags(self, client: str, count: int, window_s: float, block_after: int, cooldown_s: float) -> bool:
        """Record `count` flags of `client`; True when that blocks it."""
        now = time.time()
        with self._lock:
            times = [t for t in self._flags.get(client, []) if t > now - window_s] + [now] * count
            self._flags[client] = times[-(block_after + 1):]  # enough to decide, bounded
            if len(times) > block_after:
                # bounded (_block): without a bound, every client ever blocked would stay, an
                # entry going only when its own client asks again after its cooldown
                self._drop(client)  # a new block, made here
                self._block(client, now + cooldown_s, now, None)
                self._flags.pop(client, None)
                return True
            _trim(self._flags, lambda times: times[-1] <= now - window_s, lambda times: times[-1])
        return False

    def blocked_count(self) -> int:
        return len(self.held_blocks())


def _slot(t: float, half_s: float) -> int:
    """The half window that time `t` falls in (the Redis script computes it alike)."""
    return math.floor(t / half_s)


def _trim(table: dict[str, Any], expired: Any, ends: Any) -> None:
    """Bound a per-client table of the memory store (client -> value): past MAX_CLIENTS
    entries, forget those whose value is `expired`, then those that `ends` first (the earliest
    block or suspect status, the oldest last flag), down to KEEP_CLIENTS. Under the store's lock."""
    if len(table) <= MAX_CLIENTS:
        return
    for c in [c for c, v in table.items() if expired(v)]:
        del table[c]
    excess = len(table) - KEEP_CLIENTS
    if excess > 0:
        for c in heapq.nsmallest(excess, table, key=lambda c: ends(table[c])):
            del table[c]


# One round trip per request: the blocked check, the generation turn, the match and the insert.
# KEYS: none (every key derives from the prefix; single-instance Redis or one hash slot).
_SCREEN = """
local p = ARGV[1]
local now = tonumber(ARGV[2]); local half = tonumber(ARGV[3]); local cap = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5]); local n = tonumber(ARGV[6]); local client = ARGV[7]
local out = {}
out[1] = redis.call('PTTL', p .. 'blocked:' .. client)
out[2] = redis.call('PTTL', p .. 'suspect:' .. client)
-- block mode: a blocked client's queries are refused, so they are neither matched nor
-- remembered (remembered, they got other clients' copies of those images rejected)
if ARGV[8] == '1' and tonumber(out[1]) > 0 then return out end
local gen = tonumber(redis.call('GET', p .. 'gen') or '0')
local started = tonumber(redis.call('GET', p .. 'gen_started') or '0')
local count = tonumber(redis.call('GET', p .. 'g' .. gen .. ':n') or '0')
-- the memory store's turnover (MemoryStore._rotate): slots of half the window; a replica whose
-- clock is behind the one that started the generation does not turn it back
local slots = math.floor(now / half) - math.floor(started / half)
if slots > 0 or count >= cap then
  gen = gen + 1; count = 0
  redis.call('SET', p .. 'gen', gen); redis.call('SET', p .. 'gen_started', now)
  -- matching reads this generation and the last: the one before goes now, not at its TTL (an
  -- hour), so max_queries bounds Redis' memory under a flood of distinct queries too
  local old = p .. 'g' .. (gen - 2)
  redis.call('DEL', old .. ':h', old .. ':d', old .. ':n')
  if slots >= 2 then
    -- the last one began a whole window ago or more: it goes too, as in memory
    old = p .. 'g' .. (gen - 1)
    redis.call('DEL', old .. ':h', old .. ':d', old .. ':n')
  end
end
local ch, cd = p .. 'g' .. gen .. ':h', p .. 'g' .. gen .. ':d'
local oh, od = p .. 'g' .. (gen - 1) .. ':h', p .. 'g' .. (gen - 1) .. ':d'
local i = 9
while i <= #ARGV do
  local d = ARGV[i]
  local in_cur = redis.call('SISMEMBER', cd, d)
  local me = in_cur + redis.call('SISMEMBER', od, d)
  local hs = {}
  for j = 1, n do hs[j] = ARGV[i + j] end
  local a = redis.call('HMGET', ch, unpack(hs))
  local b = redis.call('HMGET', oh, unpack(hs))
  local m = 0
  for j = 1, n do
    if tonumber(a[j] or 0) + tonumber(b[j] or 0) - me >= 1 then m = m + 1 end
  end
  if in_cur == 0 then
    redis.call('SADD', cd, d)
    for j = 1, n do redis.call('HINCRBY', ch, hs[j], 1) end
    count = count + 1
  end
  out[#out + 1] = m
  i = i + 1 + n
end
redis.call('SET', p .. 'g' .. gen .. ':n', count, 'EX', ttl)
redis.call('EXPIRE', ch, ttl); redis.call('EXPIRE', cd, ttl)
return out
"""

_FLAGS = """
local p = ARGV[1]; local client = ARGV[2]; local count = tonumber(ARGV[3])
local window = tonumber(ARGV[4]); local after = tonumber(ARGV[5]); local cooldown = tonumber(ARGV[6])
local now = tonumber(ARGV[7])
local k = p .. 'flags:' .. client
local total = redis.call('INCRBY', k, count)
if total == count then redis.call('PEXPIRE', k, window) end
if total > after then
  redis.call('SET', p .. 'blocked:' .. client, '1', 'PX', cooldown)
  redis.call('DEL', k, p .. 'lifted:' .. client)  -- an earlier unblock lifts no copy of this block
  redis.call('ZADD', p .. 'blocked', now + cooldown / 1000, client)  -- now in s, cooldown in ms
  return 1
end
return 0
"""

# A suspect's remembered images: return them (oldest first), then push the new ones, the last
# `keep` for `ttl` ms. All suspects' images together are bounded as in the memory store
# (NEAR_MEMORY_BYTES): `near_lru` orders the suspects by last use, `near_bytes` holds the bytes of
# each one's list (its images', plus `per_image` each and `per_suspect`: Redis' bookkeeping) and
# `near_total` their sum; past the bound the least recently seen suspects' lists are deleted
# (never the caller's). A list gone by its TTL still counts until it is the oldest, as in memory.
# Reads first: on a full Redis the first write fails, and nothing is written.
_RECALL = """
local p = ARGV[1]; local client = ARGV[2]; local keep = tonumber(ARGV[3]); local ttl = tonumber(ARGV[4])
local limit = tonumber(ARGV[5]); local per_image = tonumber(ARGV[6]); local per_suspect = tonumber(ARGV[7])
local k = p .. 'near:' .. client
local lru, sizes, total = p .. 'near_lru', p .. 'near_bytes', p .. 'near_total'
local before = redis.call('LRANGE', k, 0, -1)
local lens = {}
for _, v in ipairs(before) do lens[#lens + 1] = #v end
for i = 8, #ARGV do lens[#lens + 1] = #ARGV[i] end
local size = per_suspect
for i = math.max(1, #lens - keep + 1), #lens do size = size + lens[i] + per_image end
local sum = redis.call('INCRBY', total, size - tonumber(redis.call('HGET', sizes, client) or '0'))
redis.call('HSET', sizes, client, size)
redis.call('ZADD', lru, redis.call('INCR', p .. 'near_seq'), client)
for i = 8, #ARGV do redis.call('RPUSH', k, ARGV[i]) end
redis.call('LTRIM', k, -keep, -1)
redis.call('PEXPIRE', k, ttl)
while sum > limit do
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  if oldest == nil or oldest == client then break end
  sum = redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, oldest) or '0'))
  redis.call('HDEL', sizes, oldest); redis.call('ZREM', lru, oldest); redis.call('DEL', p .. 'near:' .. oldest)
end
return before
"""


class RedisStore:
    """The same store in Redis, shared by every replica. Keys under `<prefix>qm:`: `gen`,
    `gen_started`, `g<N>:h` (hash -> count), `g<N>:d` (digests), `g<N>:n`, `flags:<client>`,
    `blocked:<client>`, `suspect:<client>`, `near:<client>` (a suspect's last images, 8-bit),
    `near_lru` (sorted set: suspects by last use), `near_bytes` (hash: bytes of each `near:` list),
    `near_total`, `near_seq`, `blocked` (sorted set), `key` (the shared hashing key),
    `lifted:<client>` (an operator's unblock, for the replicas holding a copy of the block
    made on an earlier run of this Redis)."""

    def __init__(self, url: str, prefix: str, window_s: float, max_queries: int, timeout_s: float = 0.25,
                 client: Any = None) -> None:
        from service.redis_store import connect, redact, refused_errors, unavailable_errors

        self.url, self.prefix = redact(url), prefix + "qm:"
        self.half_s, self.cap = window_s / 2.0, max(1, max_queries // 2)
        self.ttl_s = max(1, int(window_s + 1))
        self.client = client or connect(url, timeout_s)
        self.errors = unavailable_errors()
        self.refusals = refused_errors()  # Redis answered, and refused (full: OOM)
        self._screen = self.client.register_script(_SCREEN)
        self._flags = self.client.register_script(_FLAGS)
        self._recall = self.client.register_script(_RECALL)
        self._unblock = self.client.register_script(_UNBLOCK)

    def shared_key(self) -> bytes:
        """The hashing key every replica uses: the first replica's random key wins."""
        self.client.set(self.prefix + "key", os.urandom(32), nx=True)
        return bytes(self.client.get(self.prefix + "key"))

    def screen(self, client: str, digests: Sequence[bytes], hashes: np.ndarray,
               skip_blocked: bool = False) -> tuple[float, bool, list[int]]:
        """(seconds the client stays blocked, whether it is a suspect, matches per query);
        `skip_blocked` (block mode): a blocked client's queries are neither matched nor
        remembered (no matches returned)."""
        n = hashes.shape[1]
        args: list[Any] = [self.prefix, f"{time.time():.3f}", self.half_s, self.cap, self.ttl_s, n, client,
                           "1" if skip_blocked else "0"]
        for d, hs in zip(digests, hashes):
            raw = hs.astype(">u8").tobytes()
            args.append(d)
            args.extend(raw[k:k + 8] for k in range(0, 8 * n, 8))
        out = self._screen(args=args)
        pttl = int(out[0])
        return (pttl / 1000.0 if pttl > 0 else 0.0), int(out[1]) > 0, [int(m) for m in out[2:]]

    def mark_suspect(self, client: str, seconds: float) -> None:
        self.client.set(self.prefix + "suspect:" + client, "1", px=max(1, int(seconds * 1000)))

    def recall(self, client: str, pixels: np.ndarray, keep: int, seconds: float) -> list[np.ndarray]:
        """As MemoryStore.recall; NEAR_MEMORY_BYTES is shared by the replicas, and counts Redis'
        bookkeeping too (NEAR_REDIS_PER_IMAGE, NEAR_REDIS_PER_SUSPECT)."""
        out = self._recall(args=[self.prefix, client, keep, max(1, int(seconds * 1000)), NEAR_MEMORY_BYTES,
                                 NEAR_REDIS_PER_IMAGE, NEAR_REDIS_PER_SUSPECT, *(row.tobytes() for row in pixels)])
        return [np.frombuffer(bytes(b), dtype=np.uint8) for b in out]

    def status(self, client: str) -> tuple[float, bool]:
        """(seconds the client stays blocked, whether it is a suspect), by reads alone: what a
        Redis that refuses writes (full, `noeviction`) still answers, and `screen` then cannot."""
        pipe = self.client.pipeline(transaction=False)
        pipe.pttl(self.prefix + "blocked:" + client)
        pipe.pttl(self.prefix + "suspect:" + client)
        blocked, suspect = pipe.execute()
        return (int(blocked) / 1000.0 if int(blocked) > 0 else 0.0), int(suspect) > 0

    def add_flags(self, client: str, count: int, window_s: float, block_after: int, cooldown_s: float) -> bool:
        # the flags count from the first one for block_window_s (in ms, as the cooldown: whole
        # seconds would cut 1.5 s to 1), then start again
        return bool(self._flags(args=[self.prefix, client, count, max(1, int(window_s * 1000)), block_after,
                                      int(cooldown_s * 1000), f"{time.time():.3f}"]))

    def run_id(self) -> str:
        """This Redis server's run id: another after every restart, with or without its data."""
        return str(self.client.info("server")["run_id"])

    def unblock(self, client: str, hold_s: float) -> bool:
        """Lift the client's block, flags and suspect mark, in one script of deletions (which a
        full `noeviction` Redis still runs), and say so for `hold_s` to the replicas holding a
        copy of the block made on an earlier run of this Redis; True if Redis held a block."""
        return bool(self._unblock(args=[self.prefix, client, max(1, int(hold_s * 1000))]))

    def block_status(self, client: str) -> tuple[float, bool, str]:
        """(seconds the client stays blocked here, whether an operator lifted its block since its
        last one, this server's run id)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.pttl(self.prefix + "blocked:" + client)
        pipe.exists(self.prefix + "lifted:" + client)
        pttl, lifted = pipe.execute()
        return (int(pttl) / 1000.0 if int(pttl) > 0 else 0.0), bool(lifted), self.run_id()

    def blocked_count(self, also: Sequence[tuple[str, str | None]] = ()) -> tuple[int, list[str]]:
        """(clients blocked in Redis, and those of `also` that Redis does not hold: blocks a
        replica holds in its own store, (client, run id), made while Redis was down or lost by
        its restart; the clients of `also` whose block this Redis held and an operator lifted,
        to be dropped there: not counted)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.prefix + "blocked", "-inf", now)
        pipe.zcard(self.prefix + "blocked")
        for client, _ in also:
            pipe.zscore(self.prefix + "blocked", client)
            pipe.exists(self.prefix + "lifted:" + client)
        _, count, *rest = pipe.execute()
        run_id = self.run_id() if also else ""
        lifted, missing = [], 0
        for (client, mine), score, marked in zip(also, rest[0::2], rest[1::2]):
            if score is None:
                if mine is not None and (mine == run_id or marked):
                    lifted.append(client)
                else:
                    missing += 1
        return int(count) + missing, lifted


# An operator's unblock: deletions (a full noeviction Redis runs them), then the record for the
# copies of the block made on an earlier run of this server (refused on a full Redis: pcall,
# the deletions stand)
_UNBLOCK = """
local p = ARGV[1]; local c = ARGV[2]
local was = redis.call('DEL', p .. 'blocked:' .. c)
redis.call('DEL', p .. 'flags:' .. c, p .. 'suspect:' .. c)
redis.call('ZREM', p .. 'blocked', c)
redis.pcall('SET', p .. 'lifted:' .. c, '1', 'PX', ARGV[3])
return was
"""


# --------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class MonitorPolicy:
    """One pipeline's use of the monitor (its `query_monitor:` settings over the defaults)."""

    enabled: bool = True
    action: Action = "reject"
    threshold: int = 14
    suspect_threshold: int = 7  # for a client flagged within block_window_s
    suspect_linf: float = 0.62  # a suspect's query this close to one of its recent ones is flagged (0: off)
    near_matches: int = 0  # any client's query that close to this many of its recent ones is flagged (0: off)
    block_after: int = 10
    block_window_s: float = 600.0
    cooldown_s: float = 900.0

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PUBLIC_POLICY}


@dataclass
class Verdict:
    """What the monitor decided about one request's images."""

    matches: list[int]
    flagged: list[bool]
    top_n: int  # hashes per image (the fingerprint's width): scores are shared fractions of it
    threshold: int
    reject: bool  # flagged images are answered as rejections (reject and block modes)
    blocked_now: bool = False
    seconds: float = 0.0
    # the pixel check: each image's L-inf distance to the client's nearest remembered one (None:
    # none to compare) and how many are within suspect_linf; `near_needed` of them flag it
    near: list[float | None] = field(default_factory=list)
    suspect_linf: float = 0.0
    near_counts: list[int] = field(default_factory=list)
    near_needed: int = 0
    suspect: bool = False

    def score(self, i: int) -> float:
        return self.matches[i] / self.top_n

    def by_hashes(self, i: int) -> bool:
        """Whether image i is flagged by its fingerprint (else by the suspect pixel check)."""
        return self.matches[i] >= self.threshold


class QueryMonitor:
    """The fingerprinter, the store and the per-client flag counting, shared by every
    monitored pipeline of one runtime."""

    def __init__(self, *, store: Literal["memory", "redis"] = "memory", redis_url: str = "redis://127.0.0.1:6379/0",
                 redis_prefix: str = "shieldserve:", secret: str | None = None, quantization: int = 25,
                 window: int = 50, top_n: int = 80, informative: float = 0.25,
                 layout: Literal["columns", "rows"] = "columns", lines: bool = True, memory_window_s: float = 3600.0,
                 max_queries: int = 100_000, suspect_history: int = 128,
                 retry_redis_s: float = 5.0, redis_client: Any = None, on_degraded: Any = None) -> None:
        self.memory = MemoryStore(memory_window_s, max_queries)
        self.redis: RedisStore | None = None
        self.retry_redis_s = retry_redis_s
        self.suspect_history = suspect_history
        self._down_since: float | None = None
        self._refused = False  # the last failure was Redis answering with an error (full), not silence
        self._on_degraded = on_degraded or (lambda degraded: None)
        self._params = (quantization, window, top_n, informative, layout, lines)
        key = secret.encode() if secret else None
        self._key_pending = False  # the shared key is still to be read from Redis
        # the client key a replica had before it read the shared one: the blocks and suspect
        # marks its own store holds under it are still looked up under it (tagged anew, they
        # were dropped)
        self._earlier_client_key: bytes | None = None
        self._lift_asked: OrderedDict[str, float] = OrderedDict()  # client tag -> when Redis was last asked
        self._lift_lock = threading.Lock()
        if store == "redis":
            self.redis = RedisStore(redis_url, redis_prefix, memory_window_s, max_queries, client=redis_client)
            if key is None:
                try:
                    key = self.redis.shared_key()
                except self.redis.errors as exc:
                    # a replica must hash like the others: until Redis answers it runs on its own
                    # store with a key of its own, and reads the shared key when Redis is back
                    self._redis_failed("reading the shared key", exc)
                    self._key_pending = True
        self._set_key(key or os.urandom(32))

    def _set_key(self, key: bytes) -> None:
        self.fingerprinter = Fingerprinter(key, *self._params)
        self._client_key = hashlib.sha256(b"client" + key).digest()
        self._shared = key if self.redis is not None and not self._key_pending else None

    def shared_derived_key(self, purpose: bytes) -> bytes | None:
        """A key for `purpose` derived from the hashing key every replica sharing this Redis
        uses (the shared key it read there: `query_monitor.secret` unset), or None where this
        monitor's key is its own (a memory store, Redis unreachable when it started). Never the
        key itself."""
        return hashlib.sha256(purpose + self._shared).digest() if self._shared is not None else None

    def client_tag(self, client: str, key: bytes | None = None) -> str:
        """The keyed hash under which a client's flags are stored (no raw address or key name)."""
        return hashlib.blake2b(client.encode(), key=key or self._client_key, digest_size=12).hexdigest()

    # ------------------------------------------------------------------ the store, or its fallback
    def _use_redis(self) -> bool:
        if self.redis is None:
            return False
        return self._down_since is None or time.monotonic() - self._down_since >= self.retry_redis_s

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        assert self.redis is not None
        if self._down_since is None:
            log.warning("query monitor: Redis (%s) %s failed (%s); using this replica's own store until it is back",
                        self.redis.url, what, type(exc).__name__)
            self._on_degraded(True)
        self._down_since = time.monotonic()
        self._refused = isinstance(exc, self.redis.refusals)

    def _redis_ok(self) -> None:
        self._refused = False
        if self._down_since is not None:
            log.warning("query monitor: Redis is back; the replicas share the store again")
            self._down_since = None
            self._on_degraded(False)

    # ------------------------------------------------------------------ screening
    def screen(self, policy: MonitorPolicy, x: torch.Tensor, client: str) -> Verdict:
        """Check the client's block, fingerprint and match its images, remember them; in block
        mode record the flags and raise AttackSuspected for a blocked client."""
        verdict = self.screen_parts(policy, x, [(client, int(x.shape[0]))])[0]
        if isinstance(verdict, BaseException):
            raise verdict
        return verdict

    def screen_parts(self, policy: MonitorPolicy, x: torch.Tensor, parts: Sequence[tuple[str, int]]
                     ) -> list[Verdict | Exception]:
        """`screen` for a batch of several requests' images: `parts` is each request's client
        and image count, in the rows' order. The fingerprints are computed for the whole batch
        at once (numpy's per-call cost shared); each request is then matched, remembered and
        judged in turn, as if it came alone. A blocked client's entry is its AttackSuspected,
        and one that failed otherwise its error: that request's alone, not the batch's (one
        client's block failing was a 500 for every request batched with it)."""
        started = time.perf_counter()
        if self._key_pending and self._use_redis():
            assert self.redis is not None
            try:
                key = self.redis.shared_key()
                self._key_pending = False  # before _set_key: its shared derived keys are the replicas' now
                self._earlier_client_key = self._client_key
                self._set_key(key)
                self._redis_ok()
            except self.redis.errors as exc:
                self._redis_failed("reading the shared key", exc)
        digests, hashes = self.fingerprinter.fingerprint(x)
        per_image = (time.perf_counter() - started) / max(1, len(digests))
        out: list[Verdict | Exception] = []
        offset = 0
        for client, n in parts:
            t = time.perf_counter()
            try:
                verdict = self._judge(policy, client, digests[offset:offset + n], hashes[offset:offset + n],
                                      x[offset:offset + n])
                verdict.seconds = per_image * n + time.perf_counter() - t
                out.append(verdict)
            except AttackSuspected as exc:
                out.append(exc)
            except Exception as exc:  # noqa: BLE001 - this request's 500, logged where it is answered
                out.append(exc)
            offset += n
        return out

    def _judge(self, policy: MonitorPolicy, client: str, digests: list[bytes], hashes: np.ndarray,
               x: torch.Tensor) -> Verdict:
        """One request's fingerprints against the store (Redis, or this process's); a
        suspect's images also against its own recent ones in pixel space."""
        tag = self.client_tag(client)
        # a block or suspect mark this replica recorded in its own store while Redis was down,
        # or a block it saw in Redis (hold_block), holds until it ends, Redis back or not (read
        # from Redis alone, a block was dropped; and a Redis down or restarted lost them all)
        tags = [tag] if self._earlier_client_key is None else [tag, self.client_tag(client, self._earlier_client_key)]
        local_blocked = max(self.memory.blocked_for(t) for t in tags)
        local_suspect = any(self.memory.suspect(t) for t in tags)
        if policy.action == "block" and local_blocked > 0:
            if not self._lifted(tag, tags):
                raise AttackSuspected(max(1, int(np.ceil(local_blocked))))
            local_suspect = False
        blocked_for, suspect, matches = 0.0, False, None
        if self._use_redis() and not self._key_pending:
            assert self.redis is not None
            try:
                blocked_for, suspect, matches = self.redis.screen(tag, digests, hashes,
                                                                  skip_blocked=policy.action == "block")
                if policy.action == "block" and blocked_for > 0:
                    self.memory.hold_block(tag, blocked_for, self._run_id())
                if matches:
                    # not for a blocked client's script, which only reads: a full Redis answers it
                    # too, and a blocked client's queries would turn the outage off and on
                    self._redis_ok()
            except self.redis.errors as exc:
                self._redis_failed("screen", exc)
        suspect = suspect or local_suspect
        if matches is None:
            if self._refused and not self._key_pending:
                # Redis answers but refuses writes (a full noeviction Redis: the screen script
                # fails at its first write): a block or suspect mark recorded there still holds
                assert self.redis is not None
                try:
                    shared_for, shared_suspect = self.redis.status(tag)
                    blocked_for, suspect = max(blocked_for, shared_for), suspect or shared_suspect
                except self.redis.errors as exc:
                    self._redis_failed("reading the client's block", exc)
            if not (policy.action == "block" and blocked_for > 0):
                # a blocked client's queries are refused below: neither matched nor remembered
                # (remembered, they got other clients' copies of those images rejected)
                matches = self.memory.match(digests, hashes)
        if policy.action == "block" and blocked_for > 0:
            raise AttackSuspected(max(1, int(np.ceil(blocked_for))))
        assert matches is not None
        width = hashes.shape[1]  # the hashes per image: top_n windows and the lines
        # a client flagged within block_window_s is a suspect: held to the lower threshold
        threshold = min(policy.suspect_threshold if suspect else policy.threshold, width)
        flagged = [m >= threshold for m in matches]
        near: list[float | None] = []
        counts: list[int] = []
        needed = 1 if suspect else policy.near_matches
        if policy.suspect_linf > 0 and (needed > 0 or any(flagged)):
            # a client's recent images are remembered from its first flag on (with near_matches,
            # every client's: the hashes alone are evaded by an attacker who puts each pixel just
            # beside a quantization boundary, one side or the other per query, so that no window
            # hash survives, while every query of one L-inf attack stays within 2 eps of the others)
            pixels = near_pixels(x)
            history = self._recall(tag, pixels, policy.block_window_s)
            if needed > 0:
                near, counts = near_scan(history, pixels, policy.suspect_linf)
                flagged = [f or c >= needed for f, c in zip(flagged, counts)]
        verdict = Verdict(matches, flagged, width, threshold, policy.action != "flag", near=near,
                          suspect_linf=policy.suspect_linf, near_counts=counts, near_needed=needed,
                          suspect=suspect)
        if any(flagged):
            self._mark_suspect(tag, policy.block_window_s)
        if policy.action == "block" and any(flagged):
            verdict.blocked_now = self._add_flags(tag, sum(flagged), policy)
        return verdict

    def _mark_suspect(self, tag: str, seconds: float) -> None:
        if self._use_redis() and not self._key_pending:
            assert self.redis is not None
            try:
                self.redis.mark_suspect(tag, seconds)
                self._redis_ok()
                return
            except self.redis.errors as exc:
                self._redis_failed("mark_suspect", exc)
        self.memory.mark_suspect(tag, seconds)

    def _recall(self, tag: str, pixels: np.ndarray, seconds: float) -> list[np.ndarray]:
        if self._use_redis() and not self._key_pending:
            assert self.redis is not None
            try:
                history = self.redis.recall(tag, pixels, self.suspect_history, seconds)
                self._redis_ok()
                return history
            except self.redis.errors as exc:
                self._redis_failed("recall", exc)
        return self.memory.recall(tag, pixels, self.suspect_history, seconds)

    def _run_id(self) -> str | None:
        """The Redis server's run id, for a copy of a block it holds (None: not read; the copy
        then holds for its cooldown, as one made here)."""
        assert self.redis is not None
        try:
            return self.redis.run_id()
        except self.redis.errors:
            return None

    def _add_flags(self, tag: str, count: int, policy: MonitorPolicy) -> bool:
        args = (tag, count, policy.block_window_s, policy.block_after, policy.cooldown_s)
        if self._use_redis() and not self._key_pending:
            assert self.redis is not None
            try:
                blocked = self.redis.add_flags(*args)
                self._redis_ok()
                if blocked:
                    self.memory.hold_block(tag, policy.cooldown_s, self._run_id())
                return blocked
            except self.redis.errors as exc:
                self._redis_failed("add_flags", exc)
        return self.memory.add_flags(*args)

    def _lifted(self, tag: str, tags: list[str]) -> bool:
        """Whether the block this replica holds for the client, a copy of one in Redis, was
        lifted there: gone from the same Redis server (an operator's unblock, a DEL), or, from
        a restarted one (another run id: it may have lost the block), gone with an unblock's
        record (`lifted:<client>`). Then it goes here too, and the client is answered. A block
        made here while Redis was down holds for its cooldown."""
        mine = self.memory.block_run_id(tag)
        if mine is None or not (self._use_redis() and not self._key_pending):
            return False
        assert self.redis is not None
        # asked at most once a second per client: a blocked client's every request would
        # otherwise cost a Redis round trip on the thread the pipelines share
        now = time.monotonic()
        with self._lift_lock:
            if now - self._lift_asked.get(tag, -math.inf) < LIFT_CHECK_S:
                return False
            self._lift_asked[tag] = now
            self._lift_asked.move_to_end(tag)
            while len(self._lift_asked) > KEEP_CLIENTS:
                self._lift_asked.popitem(last=False)
        try:
            blocked_for, lifted, run_id = self.redis.block_status(tag)
        except self.redis.errors as exc:
            self._redis_failed("block_status", exc)
            return False
        if blocked_for > 0 or not (run_id == mine or lifted):
            return False
        self.memory.unblock(tag)
        return all(self.memory.blocked_for(t) <= 0 for t in tags)

    def unblock(self, client: str, hold_s: float) -> dict[str, Any]:
        """Lift the client's block, flags and suspect mark in this process, then in Redis (where
        the other replicas holding a copy of the block see it gone at the client's next
        request; `hold_s`: how long a copy may last, the longest cooldown). Raises the store's
        error when Redis cannot be told (this process's lifted)."""
        tags = [self.client_tag(client)]
        if self._earlier_client_key is not None:
            tags.append(self.client_tag(client, self._earlier_client_key))
        here = any([self.memory.unblock(t) for t in tags])
        if self.redis is None:
            return {"was_blocked": here, "scope": "process"}
        if self._key_pending:
            # this replica's client tags are not the shared ones until it has read the shared key
            raise self.redis.errors[0]("this replica has not reached Redis since it started")
        return {"was_blocked": self.redis.unblock(tags[0], hold_s) or here, "scope": "shared"}

    def blocked_count(self) -> int:
        # a full Redis (refusing writes) still answers this, as it does the client's block
        if (self._use_redis() or self._refused) and not self._key_pending:
            assert self.redis is not None
            try:
                # the blocks this replica holds for a Redis that lost them (or never had them)
                # are enforced here, so they are counted too; those lifted in Redis go here
                count, lifted = self.redis.blocked_count(also=self.memory.held_blocks())
                for tag in lifted:
                    self.memory.drop_block(tag)
                if not self._refused:  # Redis is back (a full one answers reads and still refuses writes)
                    self._redis_ok()
                return count
            except self.redis.errors as exc:
                self._redis_failed("blocked_count", exc)
        return self.memory.blocked_count()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.client.close()

    @classmethod
    def from_settings(cls, qm: Any, *, store: Literal["memory", "redis"] | None = None,
                      on_degraded: Any = None) -> QueryMonitor:
        """The monitor that `query_monitor:` settings (service.settings) describe; `store`
        overrides theirs (the quality gate measures in memory)."""
        return cls(store=store or qm.store, redis_url=qm.redis_url, redis_prefix=qm.redis_prefix,
                   secret=qm.secret.get_secret_value() if qm.secret else None,
                   quantization=qm.quantization, window=qm.window, top_n=qm.top_n,
                   informative=qm.informative, memory_window_s=qm.memory_window_s,
                   max_queries=qm.max_queries, suspect_history=qm.suspect_history, on_degraded=on_degraded)


def policy_from_config(pipeline: str, value: Any, defaults: MonitorPolicy) -> MonitorPolicy | None:
    """A pipeline's `query_monitor:` entry (absent, true/false, or a mapping over the defaults)
    as a policy; None where the monitor is off for it."""
    if value is None:
        value = {}
    if isinstance(value, bool):
        value = {"enabled": value}
    if not isinstance(value, dict):
        raise ValueError(f"pipeline {pipeline!r}: query_monitor must be true, false or a mapping, got {value!r}")
    unknown = set(value) - set(PUBLIC_POLICY)
    if unknown:
        raise ValueError(f"pipeline {pipeline!r}: unknown query_monitor settings {sorted(unknown)}; "
                         f"known: {list(PUBLIC_POLICY)}")
    merged = {k: getattr(defaults, k) for k in PUBLIC_POLICY}
    merged.update(value)
    if merged["action"] not in ("flag", "reject", "block"):
        raise ValueError(f"pipeline {pipeline!r}: query_monitor.action must be flag, reject or block, "
                         f"got {merged['action']!r}")
    from pydantic import ValidationError

    from service.settings import MonitorPolicyConfig

    # the same bounds and types as the global policy (settings.MonitorPolicyConfig): merged raw, a
    # threshold "14" stayed a string (every request a 500), cooldown_s <= 0 turned blocking off
    try:
        merged = MonitorPolicyConfig(**merged).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"pipeline {pipeline!r}: query_monitor: {problems}") from None
    policy = MonitorPolicy(**merged)
    return policy if policy.enabled else None
