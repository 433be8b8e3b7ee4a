"""Profiled cost models: step costs measured by operator, read from a table.

A ``ProfileTable`` holds measured points of four operators, in seconds for a whole forward:

    linear       tokens-parallel work of a step of T tokens (projections, MLP, norms, rotary,
                 embedding, one row of LM head and sampling): interpolated in T
    attn_decode  what B decodes cost beyond linear(B) (attention, and for our profiles the
                 decode rows' LM head and sampling), by B and mean context: interpolated
                 between the measured batch sizes, and within one along the measured contexts
                 (beyond the last, extended with a slope fitted over all points)
    attn_prefill attention of one prefill chunk of N tokens after C cached, by (N, C)
    overhead     host time outside the forward (schedule, update): a + b * chunks

Two sources fill it: ``tierserve sim profile`` (this machine's real engine, see profile.py,
written as ``profile.csv``) and Vidur's ``mlp.csv``/``attention.csv`` (per-layer medians in ms,
summed over layers here; Vidur has no host overhead, so the roofline's default is used).
Points are interpolated (``Grid``); the host overhead is a least-squares line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tierserve.sim.cost import BatchShape, ChunkShape, Efficiency
from tierserve.sim.model_shape import ModelShape

OPS = ("linear", "attn_decode", "attn_prefill", "overhead")
PROFILE_COLUMNS = ("op", "num_tokens", "batch_size", "kv_cache_size", "seconds")


@dataclass(slots=True)
class ProfilePoint:
    """One measured median: ``num_tokens`` (linear: T; attn_prefill: N; overhead: chunks),
    ``batch_size`` (attn_decode: B), ``kv_cache_size`` (attn_decode: context summed over the
    batch; attn_prefill: C)."""

    op: str
    num_tokens: int
    batch_size: int
    kv_cache_size: int
    seconds: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown profile op {self.op!r}; expected one of {', '.join(OPS)}")


@dataclass(slots=True)
class ProfileTable:
    points: list[ProfilePoint] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def of(self, op: str) -> list[ProfilePoint]:
        return [p for p in self.points if p.op == op]

    def write(self, folder: str | Path) -> Path:
        """``folder/profile.csv`` and ``folder/meta.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "profile.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(PROFILE_COLUMNS)
            for p in self.points:
                writer.writerow((p.op, p.num_tokens, p.batch_size, p.kv_cache_size,
                                 f"{p.seconds:.9f}"))
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> ProfileTable:
        folder = Path(folder)
        path = folder / "profile.csv" if folder.is_dir() else folder
        if not path.is_file():
            raise ValueError(f"no profile at {path}; make one with `tierserve sim profile`")
        points = []
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                try:
                    points.append(ProfilePoint(row["op"], int(row["num_tokens"]),
                                               int(row["batch_size"]), int(row["kv_cache_size"]),
                                               float(row["seconds"])))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None
        meta_path = path.parent / "meta.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        return cls(points, meta)


def _fit(rows: list[list[float]], targets: list[float]) -> np.ndarray:
    """Least squares; the intercept (column 0) is free, the other coefficients are kept >= 0
    (a negative one is dropped and the rest refitted)."""
    if not rows:
        return np.zeros(0)
    x, y = np.asarray(rows, dtype=float), np.asarray(targets, dtype=float)
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    for _ in range(x.shape[1]):
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[:] = 0.0
        coef[active] = sol
        negative = coef < 0
        negative[0] = False
        if not negative.any():
            break
        active &= ~negative
    coef[1:] = np.maximum(coef[1:], 0.0)
    return coef


class Grid:
    """seconds(size, context) from measured points: per measured size, piecewise linear in the
    context (past the last point, the last segment's slope, >= 0); between sizes, linear in
    the size. Below the smallest and above the largest size: ``outside="scale"`` scales the
    nearest size's value by size (prefill attention grows with the chunk's tokens),
    ``"extend"`` continues the last two sizes' line (decode batches). ``anchor_zero`` adds
    (context 0, 0 s) to every curve (our prefill: a chunk at context 0 is all linear)."""

    def __init__(self, points: list[tuple[int, float, float]], outside: str = "extend",
                 anchor_zero: bool = False) -> None:
        groups: dict[int, dict[float, float]] = {}
        for size, context, seconds in points:
            groups.setdefault(size, {})[context] = seconds
        if anchor_zero:
            for curve in groups.values():
                curve.setdefault(0.0, 0.0)
        self.outside = outside
        self.sizes = sorted(groups)
        self.curves = {size: (np.array(sorted(curve), dtype=float),
                              np.array([curve[c] for c in sorted(curve)], dtype=float))
                       for size, curve in groups.items()}

    def _curve(self, size: int, context: float) -> float:
        contexts, seconds = self.curves[size]
        if context > contexts[-1] and len(contexts) > 1:
            slope = max(0.0, (seconds[-1] - seconds[-2]) / (contexts[-1] - contexts[-2]))
            return float(seconds[-1] + slope * (context - contexts[-1]))
        return float(np.interp(context, contexts, seconds))

    def seconds(self, size: int, context: float) -> float:
        sizes = self.sizes
        if not sizes:
            return 0.0
        if len(sizes) == 1 or size < sizes[0] or size > sizes[-1]:
            if self.outside == "scale" or len(sizes) == 1:
                nearest = sizes[0] if size < sizes[0] else sizes[-1]
                return self._curve(nearest, context) * size / nearest
            lower, upper = (sizes[0], sizes[1]) if size < sizes[0] else (sizes[-2], sizes[-1])
        else:
            upper = next(s for s in sizes if s >= size)
            if upper == size:
                return self._curve(size, context)
            lower = sizes[sizes.index(upper) - 1]
        low, high = self._curve(lower, context), self._curve(upper, context)
        return low + (high - low) * (size - lower) / (upper - lower)


class ProfiledCostModel:
    """Prices a step from a ProfileTable (module docstring); ``default_overhead_s`` is used
    when the table has no overhead points."""

    def __init__(self, table: ProfileTable, default_overhead_s: float | None = None) -> None:
        linear = sorted(table.of("linear"), key=lambda p: p.num_tokens)
        if len(linear) < 2:
            raise ValueError("a profile needs at least two linear points (tokens per step)")
        self.table = table
        self._linear_t = np.array([p.num_tokens for p in linear], dtype=float)
        self._linear_s = np.array([p.seconds for p in linear], dtype=float)
        # Decode by (batch, mean context per request); prefill by (chunk tokens, context).
        self.decode = Grid([(p.batch_size, p.kv_cache_size / p.batch_size, p.seconds)
                            for p in table.of("attn_decode")], outside="extend")
        self.prefill = Grid([(p.num_tokens, p.kv_cache_size, p.seconds)
                             for p in table.of("attn_prefill")], outside="scale",
                            anchor_zero=table.meta.get("prefill_at_zero_in_linear", False))
        overhead = table.of("overhead")
        if overhead:
            self.overhead_coef = _fit([[1.0, p.num_tokens] for p in overhead],
                                      [p.seconds for p in overhead])
        else:
            fixed = Efficiency().step_overhead_s if default_overhead_s is None else default_overhead_s
            self.overhead_coef = np.array([fixed, 0.0])

    def linear_seconds(self, num_tokens: int) -> float:
        t, s = self._linear_t, self._linear_s
        if num_tokens > t[-1]:  # extrapolate with the last segment's slope
            slope = (s[-1] - s[-2]) / (t[-1] - t[-2])
            return float(s[-1] + slope * (num_tokens - t[-1]))
        return float(np.interp(num_tokens, t, s))

    def step_seconds(self, batch: BatchShape) -> float:
        return sum(self.breakdown(batch).values())

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        if not batch.chunks:
            return {}
        decodes, prefills = batch.decodes, batch.prefills
        parts = {"linear": self.linear_seconds(batch.num_tokens)}
        if decodes:
            parts["attn_decode"] = self.decode.seconds(
                len(decodes), sum(c.context for c in decodes) / len(decodes))
        parts["attn_prefill"] = sum(self._prefill(c) for c in prefills)
        a, per_chunk = self.overhead_coef
        parts["overhead"] = a + per_chunk * len(batch.chunks)
        return parts

    def _prefill(self, chunk: ChunkShape) -> float:
        return self.prefill.seconds(chunk.num_tokens, chunk.context)


# -- Vidur's profiles ---------------------------------------------------------------------------
VIDUR_MLP_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
                 "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
VIDUR_ATTENTION_EXTRA = ("attn_input_reshape", "attn_kv_cache_save", "attn_output_reshape")


def _median_ms(row: dict, op: str) -> float:
    value = row.get(f"time_stats.{op}.median", "")
    return float(value) / 1000.0 if value not in ("", None) else 0.0


def read_vidur_profile(folder: str | Path, model: ModelShape, tensor_parallel: int = 1
                       ) -> ProfileTable:
    """A ProfileTable from Vidur's ``mlp.csv`` and ``attention.csv`` (per-layer medians, ms)
    for ``model`` at ``tensor_parallel``: rows of other shapes or degrees are skipped."""
    folder = Path(folder)
    mlp_path, attention_path = folder / "mlp.csv", folder / "attention.csv"
    for path in (mlp_path, attention_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing: point --vidur-profile at a folder holding "
                             "Vidur's mlp.csv and attention.csv for one model and device")
    layers = model.num_layers
    table = ProfileTable(meta={"source": f"vidur:{folder}", "tensor_parallel": tensor_parallel})
    with open(mlp_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if not _matches(row, model, tensor_parallel, ("n_embd", "n_head")):
                continue
            per_layer = sum(_median_ms(row, op) for op in VIDUR_MLP_OPS if op != "emb")
            table.points.append(ProfilePoint("linear", int(float(row["num_tokens"])), 0, 0,
                                             layers * per_layer + _median_ms(row, "emb")))
    with open(attention_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if not _matches(row, model, tensor_parallel, ("n_embd", "n_q_head")):
                continue
            extra = sum(_median_ms(row, op) for op in VIDUR_ATTENTION_EXTRA)
            if str(row["is_prefill"]).lower() in ("true", "1"):
                seconds = layers * (_median_ms(row, "attn_prefill") + extra)
                table.points.append(ProfilePoint(
                    "attn_prefill", int(float(row["prefill_chunk_size"])), 1,
                    int(float(row["kv_cache_size"])), seconds))
            else:
                batch = int(float(row["batch_size"]))
                seconds = layers * (_median_ms(row, "attn_decode") + extra)
                table.points.append(ProfilePoint(
                    "attn_decode", batch, batch, batch * int(float(row["kv_cache_size"])), seconds))
    if len(table.of("linear")) < 2:
        raise ValueError(f"{mlp_path} has fewer than two rows for {model.name} (hidden "
                         f"{model.hidden_size}, {model.num_heads} heads) at tensor parallel "
                         f"{tensor_parallel}")
    return table


def _matches(row: dict, model: ModelShape, tensor_parallel: int, shape_columns) -> bool:
    try:
        if int(float(row.get("num_tensor_parallel_workers", 1))) != tensor_parallel:
            return False
        embd, heads = (int(float(row[name])) for name in shape_columns)
    except (KeyError, ValueError):
        return False
    # Heads may be written for the whole model or per tensor-parallel rank.
    return embd == model.hidden_size and heads in (model.num_heads,
                                                   model.num_heads // tensor_parallel)
