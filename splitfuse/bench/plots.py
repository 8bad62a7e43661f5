"""PNG plots of a results dict: every system of the run in the same figure."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.lines import Line2D


def _clients_axis(ax, xs) -> None:
    """Client counts on a log2 axis, labelled with the counts themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()


_MODES = {"closed": ("clients", "concurrent clients"), "open": ("rate", "request rate (requests/s)")}


def _series(results: dict, mode: str) -> dict[str, list[dict]]:
    """system name -> its points of one load mode, in sweep order."""
    out = {}
    for name, system in results["systems"].items():
        points = [p for p in system.get("points", []) if p["mode"] == mode and p["completed"]]
        if points:
            out[name] = points
    return out


def subtitle(results: dict) -> str:
    """Model, workload and machine of a run, for every figure: a plot read alone says what it measured."""
    options, workload, machine = results.get("options", {}), results.get("workload", {}), results.get("machine", {})
    model = Path(options["model"]).name if options.get("model") else ", ".join(options.get("endpoints") or []) or "demo model"
    shape = (f"prompts ~{workload.get('prompt_len')} / generations ~{workload.get('gen_len')} tokens, "
             f"{workload.get('requests_per_point')} requests per point")
    if workload.get("clipped_requests"):
        shape += f" ({workload['clipped_requests']} shortened to max length {workload.get('max_len')})"
    where = machine.get("gpu") or f"{machine.get('cpu') or 'CPU'}, {machine.get('cpu_count')} cores"
    return f"{model} · {shape} · {where}"


def _finish(fig, path: Path, title: str, note: str | None = None) -> None:
    """Subtitle on top and an optional note under the plots, both wrapped to the figure's width; save."""
    width_in, height_in = fig.get_size_inches()
    chars = int(width_in * 13)  # about how many 9 pt characters fit across
    title = textwrap.fill(title, chars)
    fig.suptitle(title, fontsize=9)
    top = 1 - (0.1 + 0.18 * (title.count("\n") + 1)) / height_in
    bottom = 0.0
    if note:
        note = textwrap.fill(note, int(chars * 1.2))
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray", va="bottom")
        bottom = (0.15 * (note.count("\n") + 1) + 0.1) / height_in
    fig.tight_layout(rect=(0, bottom, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_throughput(series: dict, mode: str, path: Path, title: str) -> None:
    key = _MODES[mode][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in series.items():
        x = [p["request_throughput"] for p in points]
        line, = axes[0].plot(x, [p["e2e"]["mean"] for p in points], marker="o", label=name)
        for p, xi in zip(points, x):
            axes[0].annotate(f"{p[key]:g}", (xi, p["e2e"]["mean"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points", color=line.get_color())
        axes[1].plot([p["output_throughput"] for p in points], [p["itl"]["p95"] or 0 for p in points], marker="o",
                     label=name)
    axes[0].set(xlabel="throughput (requests/s)", ylabel="mean end-to-end latency (s)",
                title=f"latency vs throughput (labels: {key})")
    axes[1].set(xlabel="output tokens/s", ylabel="p95 inter-token latency (s)", title="token latency vs throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _finish(fig, path, title)


def _effective(series: dict, mode: str, path: Path, title: str) -> None:
    key, label = _MODES[mode]
    rates = list(next(iter(series.values()))[0]["effective_throughput"])
    cols = min(3, len(rates))
    rows = -(-len(rates) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 8.0), 3.8 * rows + 0.8), squeeze=False)
    for ax in axes.flat[len(rates):]:
        ax.set_visible(False)
    for ax, rate in zip(axes.flat, rates):
        for name, points in series.items():
            x = [p[key] for p in points]
            ax.plot(x, [p["effective_throughput"][rate] for p in points], marker="o", label=name)
            ax.plot(x, [p["effective_throughput_cumulative"][rate] for p in points], ls=":", marker=".",
                    color=ax.lines[-1].get_color(), label=f"{name} (cumulative)")
        ax.set(xlabel=label, ylabel="effective throughput (requests/s)", title=f"SLA {rate} tokens/s")
        if mode == "closed":
            _clients_axis(ax, [p[key] for points in series.values() for p in points])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    _finish(fig, path, title, note=(
        "Solid: FastGen's effective throughput, requests per second whose first token came within the prompt's "
        "SLA and whose generation averaged at least the SLA's tokens/s. Dotted (cumulative): stricter, every token "
        "i within i / rate seconds of the first."))


def _token_latency(series: dict, mode: str, path: Path, title: str) -> None:
    key, label = _MODES[mode]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"p50": "-", "p90": "--", "p95": "-.", "p99": ":"}
    colors = {name: f"C{i}" for i, name in enumerate(series)}
    for metric, ax in zip(("itl", "ttft"), axes):
        for name, points in series.items():
            x = [p[key] for p in points]
            for pct, style in styles.items():
                ax.plot(x, [p[metric][pct] or 0 for p in points], ls=style, marker="o", ms=3, color=colors[name])
        ax.set(xlabel=label, ylabel=f"{metric} (s)", title=f"{metric} percentiles", yscale="log")
        if mode == "closed":
            _clients_axis(ax, [p[key] for points in series.values() for p in points])
        ax.grid(alpha=0.3, which="both")
    # one legend entry per system (colour) and per percentile (line style), not one per line
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in colors.items()]
    handles += [Line2D([], [], color="gray", ls=style, label=pct) for pct, style in styles.items()]
    axes[1].legend(handles=handles, fontsize=7, ncol=2)
    _finish(fig, path, title)


def write_plots(results: dict, out: str | Path) -> list[Path]:
    """Latency-throughput, effective-throughput and token-latency figures for each load mode run."""
    out = Path(out)
    written = []
    for mode in _MODES:
        series = _series(results, mode)
        if not series:
            continue
        for stem, draw in (("latency_throughput", _latency_throughput), ("effective_throughput", _effective),
                           ("token_latency", _token_latency)):
            path = out / f"{stem}_{mode}.png"
            draw(series, mode, path, subtitle(results))
            written.append(path)
    return written
