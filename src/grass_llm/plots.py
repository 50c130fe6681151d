"""Plots of a run directory's ``log.jsonl`` (schema: ``grass_llm.runlog``); ``grass-llm plot RUN_DIR``.

``plot_run`` writes up to four PNGs:

- ``layers_heatmap.png``: which decoder layers were trained at each step (layer on y, step on x),
  with the probing steps hatched and, beside it, how many steps each layer was trained;
- ``importance.png``: MGN per layer over time, raw (top) and as a share of the step's total (bottom);
  one line per layer up to 8 layers, a heatmap above that (readable for 22-32 layers);
- ``probabilities.png``: sampling probability per layer over time (heatmap; 1/L marked on the colorbar);
- ``loss.png``: the raw loss and an exponential moving average.

Probing steps are hatched in every plot. A plot whose data are absent from the log (no ``loss``,
no ``importance`` ...) is skipped and the skip reported; ``layers_heatmap.png`` is always written.
Matplotlib is imported inside the functions and used through its object API with the Agg canvas,
so plotting neither needs a display nor changes the caller's pyplot backend.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grass_llm.run_layout import PLOTS_DIR
from grass_llm.runlog import LOG_FILENAME, RunLogError, read_log

__all__ = [
    "LINE_PLOT_MAX_LAYERS",
    "activity_matrix",
    "add_cli_arguments",
    "cli_main",
    "infer_num_layers",
    "per_layer_matrix",
    "plot_run",
    "prepare_records",
]

LINE_PLOT_MAX_LAYERS = 8  # importance.png: one line per layer up to this many layers, else a heatmap
_DPI = 120
_PROBE_STYLE = {"facecolor": "none", "edgecolor": "0.45", "hatch": "///", "linewidth": 0.0}


# ----------------------------------------------------------------------------------------------
# data (pure functions, no matplotlib)
def prepare_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by step, keeping the last record of a step logged twice (a resume that was not
    truncated). Raises ``RunLogError`` when there is none."""
    if not records:
        raise RunLogError("the run log has no records")
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def infer_num_layers(records: Sequence[dict[str, Any]]) -> int:
    """Number of decoder layers: the longest ``importance``/``probabilities`` list, or one more than
    the highest active layer when those are absent. Raises ``RunLogError`` when nothing says."""
    n = 0
    for r in records:
        for key in ("importance", "probabilities"):
            if isinstance(r.get(key), list):
                n = max(n, len(r[key]))
        for layer in r.get("active_layers") or ():
            n = max(n, int(layer) + 1)
    if n == 0:
        raise RunLogError(
            "cannot tell the number of decoder layers: no importance, probabilities or active_layers"
        )
    return n


def activity_matrix(records: Sequence[dict[str, Any]], num_layers: int) -> np.ndarray:
    """``(num_layers, len(records))`` float array: 1 where the record's step trained that layer.

    Column j is ``records[j]``. Only ``train`` records set cells: a probing step updates no weight, so
    its column stays 0 whatever ``active_layers`` it lists. A record without ``active_layers`` gives
    an all-zero column. Raises ``ValueError`` for a layer index outside ``[0, num_layers)``.
    """
    out = np.zeros((num_layers, len(records)), dtype=np.float64)
    for j, r in enumerate(records):
        if r.get("phase") != "train":
            continue
        for layer in r.get("active_layers") or ():
            layer = int(layer)
            if not 0 <= layer < num_layers:
                raise ValueError(
                    f"step {r.get('step')}: active layer {layer} out of range for {num_layers} layers"
                )
            out[layer, j] = 1.0
    return out


def per_layer_matrix(records: Sequence[dict[str, Any]], key: str, num_layers: int) -> np.ndarray:
    """``(num_layers, len(records))`` float array of a per-layer list (``importance``,
    ``probabilities``); NaN where a record lacks the key, has null, or has a shorter list."""
    out = np.full((num_layers, len(records)), np.nan, dtype=np.float64)
    for j, r in enumerate(records):
        values = r.get(key)
        if not isinstance(values, list):
            continue
        for i, v in enumerate(values[:num_layers]):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i, j] = float(v)
    return out


def _scalar_series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    out = np.full(len(records), np.nan, dtype=np.float64)
    for j, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[j] = float(v)
    return out


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges for pcolormesh: midpoints between logged steps, half a gap beyond each end."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[:-1] + steps[1:]) / 2.0
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _probe_spans(records: Sequence[dict[str, Any]], edges: np.ndarray) -> list[tuple[float, float]]:
    """(x0, x1) of each run of consecutive probing records, in step units."""
    spans: list[tuple[float, float]] = []
    start = None
    for j, r in enumerate([*records, {"phase": None}]):
        if r.get("phase") == "probe" and start is None:
            start = j
        elif r.get("phase") != "probe" and start is not None:
            spans.append((float(edges[start]), float(edges[j])))
            start = None
    return spans


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average that skips NaN (TensorBoard-style smoothing)."""
    alpha = 2.0 / (span + 1.0)
    out = np.full_like(values, np.nan)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        if weight > 0:
            out[i] = avg / weight
    return out


# ----------------------------------------------------------------------------------------------
# figures
def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG beside ``path`` first and rename it into place: a plot of an earlier call is
    replaced only by a complete new one (a full disk leaves the old plot, and no partial file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _shade_probe(
    ax: Any, spans: Sequence[tuple[float, float]], label: bool = True, over: bool = True
) -> None:
    """Hatch the probing steps: over a heatmap's cells, or under a line plot's lines (``over=False``)."""
    style = _PROBE_STYLE if over else {**_PROBE_STYLE, "facecolor": "0.96", "edgecolor": "0.75"}
    for k, (x0, x1) in enumerate(spans):
        ax.axvspan(x0, x1, label="probing" if label and k == 0 else None, zorder=3 if over else 0, **style)


def _layer_axis(ax: Any, num_layers: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_ylabel("decoder layer")
    ax.set_ylim(-0.5, num_layers - 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(num_layers, 17), integer=True))


def _figure_height(num_layers: int) -> float:
    return min(12.0, max(3.8, 1.6 + 0.17 * num_layers))


def _plot_layers(records, steps, edges, spans, num_layers: int, path: Path) -> Path:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    active = activity_matrix(records, num_layers)
    fig = _new_figure(11.0, _figure_height(num_layers))
    ax, ax_count = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [6, 1]})
    cmap = ListedColormap(["#f4f4f4", "#1f4e9c"])
    ax.pcolormesh(edges, np.arange(num_layers + 1) - 0.5, active, cmap=cmap, vmin=0, vmax=1)
    _shade_probe(ax, spans, label=False)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("optimizer step")
    _layer_axis(ax, num_layers)
    n_train = sum(r.get("phase") == "train" for r in records)
    n_probe = len(records) - n_train
    ax.set_title(f"Trained decoder layers per step ({n_probe} probing, {n_train} training steps)")
    handles = [
        Patch(facecolor="#1f4e9c", label="trained"),
        Patch(facecolor="#f4f4f4", edgecolor="0.7", label="frozen"),
    ]
    if spans:
        handles.append(Patch(label="probing (MGN of all layers, no update)", **_PROBE_STYLE))
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False, fontsize=8
    )

    counts = active.sum(axis=1)
    ax_count.barh(np.arange(num_layers), counts, height=0.8, color="#1f4e9c")
    ax_count.set_xlabel("steps trained")
    ax_count.set_title("per layer", fontsize=9)
    ax_count.tick_params(axis="y", labelleft=False)
    if counts.max() == 0:
        ax_count.set_xlim(0, 1)
    return _save(fig, path)


def _heatmap(fig, ax, edges, values: np.ndarray, num_layers: int, label: str, cmap: str, log: bool) -> Any:
    from matplotlib.colors import LogNorm, Normalize

    data = np.ma.masked_invalid(values)
    norm: Any = Normalize()
    if log:
        positive = values[np.isfinite(values) & (values > 0)]
        data = np.ma.masked_where(~(np.isfinite(values) & (values > 0)), values)
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    mesh = ax.pcolormesh(edges, np.arange(num_layers + 1) - 0.5, data, cmap=cmap, norm=norm)
    cbar = fig.colorbar(mesh, ax=ax, pad=0.01)
    cbar.set_label(label)
    _layer_axis(ax, num_layers)
    return cbar


def _plot_importance(records, steps, edges, spans, num_layers: int, path: Path) -> Path:
    mgn = per_layer_matrix(records, "importance", num_layers)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(np.where(np.isfinite(mgn), mgn, 0.0), axis=0)
        share = np.where(total > 0, mgn / total, np.nan)
    fig = _new_figure(11.0, max(6.0, 2 * _figure_height(num_layers) - 1.0))
    ax_raw, ax_share = fig.subplots(2, 1, sharex=True)
    if num_layers <= LINE_PLOT_MAX_LAYERS:
        colors = _layer_colors(num_layers)
        for i in range(num_layers):
            ax_raw.plot(steps, mgn[i], color=colors[i], lw=1.2, label=f"layer {i}")
            ax_share.plot(steps, share[i], color=colors[i], lw=1.2)
        ax_raw.set_ylabel("MGN")
        ax_share.set_ylabel("share of the step's MGN sum")
        finite = mgn[np.isfinite(mgn)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax_raw.set_yscale("log")
        ax_raw.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        for ax in (ax_raw, ax_share):
            ax.grid(alpha=0.3)
            _shade_probe(ax, spans, label=ax is ax_share, over=False)
        if spans:
            ax_share.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        positive = mgn[np.isfinite(mgn) & (mgn > 0)]
        log = positive.size > 0 and positive.max() / positive.min() > 20
        _heatmap(fig, ax_raw, edges, mgn, num_layers, "MGN" + (" (log scale)" if log else ""), "magma", log)
        _heatmap(fig, ax_share, edges, share, num_layers, "share of the step's MGN sum", "magma", False)
        for ax in (ax_raw, ax_share):
            _shade_probe(ax, spans, label=False)
    ax_share.set_xlim(edges[0], edges[-1])
    ax_raw.set_title(
        "Layer importance: mean gradient norm (MGN) per decoder layer"
        + (", probing hatched" if spans else "")
    )
    ax_share.set_title("MGN normalised per step (relative layer importance)", fontsize=10)
    ax_share.set_xlabel("optimizer step")
    return _save(fig, path)


def _layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def _plot_probabilities(records, steps, edges, spans, num_layers: int, path: Path) -> Path:
    probs = per_layer_matrix(records, "probabilities", num_layers)
    fig = _new_figure(11.0, _figure_height(num_layers))
    ax = fig.subplots()
    cbar = _heatmap(fig, ax, edges, probs, num_layers, "sampling probability", "viridis", False)
    uniform = 1.0 / num_layers
    lo, hi = cbar.mappable.norm.vmin, cbar.mappable.norm.vmax
    if lo is not None and hi is not None and lo <= uniform <= hi and hi > lo:
        cbar.ax.axhline(uniform, color="white", lw=1.5)
        cbar.ax.axhline(uniform, color="black", lw=0.8, ls="--")
        cbar.ax.text(1.05, uniform, " 1/L", transform=cbar.ax.get_yaxis_transform(), va="center", fontsize=8)
    _shade_probe(ax, spans, label=False)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("optimizer step")
    ax.set_title("Layer sampling probabilities" + (" (probing hatched)" if spans else ""))
    return _save(fig, path)


def _plot_loss(records, steps, edges, spans, path: Path) -> Path:
    loss = _scalar_series(records, "loss")
    finite = np.isfinite(loss)
    span = max(1, min(100, int(finite.sum()) // 15))
    fig = _new_figure(9.0, 4.5)
    ax = fig.subplots()
    ax.plot(steps[finite], loss[finite], color="#9bb7e0", lw=0.8, label="loss")
    if span > 1:
        smooth = _ema(loss, span)
        ax.plot(steps, smooth, color="#1f4e9c", lw=2.0, label=f"EMA (span {span} steps)")
    _shade_probe(ax, spans, over=False)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_records(records: Sequence[dict[str, Any]], out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Write the plots of ``records``; returns (paths written, {file skipped: reason})."""
    records = prepare_records(records)
    num_layers = infer_num_layers(records)
    steps = np.array([r["step"] for r in records], dtype=np.float64)
    edges = _step_edges(steps)
    spans = _probe_spans(records, edges)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = [_plot_layers(records, steps, edges, spans, num_layers, out_dir / "layers_heatmap.png")]
    skipped: dict[str, str] = {}
    if np.isfinite(per_layer_matrix(records, "importance", num_layers)).any():
        written.append(_plot_importance(records, steps, edges, spans, num_layers, out_dir / "importance.png"))
    else:
        skipped["importance.png"] = "no record has 'importance'"
    if np.isfinite(per_layer_matrix(records, "probabilities", num_layers)).any():
        written.append(
            _plot_probabilities(records, steps, edges, spans, num_layers, out_dir / "probabilities.png")
        )
    else:
        skipped["probabilities.png"] = "no record has 'probabilities'"
    if np.isfinite(_scalar_series(records, "loss")).any():
        written.append(_plot_loss(records, steps, edges, spans, out_dir / "loss.png"))
    else:
        skipped["loss.png"] = "no record has a finite 'loss'"
    return written, skipped


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Plot ``RUN_DIR/log.jsonl`` into ``out_dir`` (default: ``RUN_DIR/plots``); returns the PNGs written.

    Raises ``FileNotFoundError`` when the log is missing and ``RunLogError`` when it is malformed or
    has no record. Plots whose data the log lacks are skipped (see the module docstring).
    """
    records = _load(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / PLOTS_DIR
    written, _ = _plot_records(records, out)
    return written


def _load(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    records = read_log(run_dir)
    if not records:
        raise RunLogError(f"{Path(run_dir) / LOG_FILENAME} is empty: no step has been logged yet")
    return records


# ----------------------------------------------------------------------------------------------
# CLI: grass-llm plot RUN_DIR [--out DIR]
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``grass-llm plot``."""
    parser.add_argument("run_dir", type=Path, help=f"run directory holding {LOG_FILENAME}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write the PNGs (default: RUN_DIR/plots)",
    )


def cli_main(args: argparse.Namespace) -> int:
    """Run ``grass-llm plot``: print each PNG written; exit 2 for bad input (a missing run directory, a
    missing, malformed or empty log), 1 when the log cannot be read or the plots cannot be written."""
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        print(f"grass-llm plot: run directory not found: {run_dir}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else run_dir / PLOTS_DIR
    if out.exists() and not out.is_dir():
        print(f"grass-llm plot: error: --out {str(out)!r} is a file; allowed: a directory", file=sys.stderr)
        return 2
    try:
        records = _load(run_dir)
    except FileNotFoundError as exc:
        print(f"grass-llm plot: {exc}", file=sys.stderr)
        return 2
    except (RunLogError, UnicodeDecodeError) as exc:  # (bad input: exit code 2, like every other)
        print(f"grass-llm plot: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"grass-llm plot: error: cannot read {run_dir / LOG_FILENAME}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        written, skipped = _plot_records(records, out)
    except OSError as exc:  # an unwritable run directory or --out, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"grass-llm plot: error: cannot write the plots in {out}: {exc.strerror or exc}{where}; plots "
            "already there are unchanged",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:  # e.g. an active layer out of range
        print(f"grass-llm plot: {run_dir / LOG_FILENAME}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a writer's own error (matplotlib, PIL)
        print(
            f"grass-llm plot: error: cannot write the plots in {out}: {type(exc).__name__}: {exc}; plots "
            "already there are unchanged",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(path)
    for name, reason in skipped.items():
        print(f"grass-llm plot: skipped {name}: {reason}", file=sys.stderr)
    return 0
