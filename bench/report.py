"""Markdown table and the outage plot."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

COLUMNS = (
    ("events_per_s", "events/s", "{:,.0f}"),
    ("requests_per_s", "req/s", "{:,.0f}"),
    ("ratio", "ratio to baseline", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("p999_ms", "p99.9 ms", "{:.2f}"),
    ("cpu_us_per_event", "agent CPU µs/event", "{:.1f}"),
    ("pg_cpu_us_per_event", "PostgreSQL CPU µs/event", "{:.1f}"),
    ("peak_rss_mib", "agent peak RSS MiB", "{:.1f}"),
    ("peak_anon_rss_mib", "agent peak anon RSS MiB", "{:.1f}"),
)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, PostgreSQL {m['postgres']}.",
        f"Command: `{m['command']}` ({results['seconds']} s).",
        "",
        "| scenario | baseline | " + " | ".join(c[1] for c in COLUMNS) + " | other |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    shown = {c[0] for c in COLUMNS} | {"name", "baseline"}
    for row in results["scenarios"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append(fmt.format(value) if isinstance(value, int | float) else "")
        other = ", ".join(f"{k}={_short(v)}" for k, v in row.items()
                          if k not in shown and not k.endswith("baseline_events_per_s"))
        lines.append(f"| {row['name']} | {row.get('baseline', '')} | " + " | ".join(cells)
                     + f" | {other} |")
    if results.get("notes"):
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


def plot_outage(points: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in points]
    rate_in = [0.0] + [(b["accepted"] - a["accepted"]) / (b["t"] - a["t"])
                       for a, b in pairwise(points)]
    rate_out = [0.0] + [(b["flushed"] - a["flushed"]) / (b["t"] - a["t"])
                        for a, b in pairwise(points)]
    spool = [p["spool_bytes"] / 2**20 for p in points]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, rate_in, label="events/s accepted")
    ax.plot(t, rate_out, label="events/s flushed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("events/s")
    ax2 = ax.twinx()
    ax2.plot(t, spool, color="grey", linestyle="--", label="spool MiB")
    ax2.set_ylabel("spool MiB")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
    ax.set_title("PostgreSQL outage under steady load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
