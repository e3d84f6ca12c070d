"""Print the headline metric of one or more probe runs as one markdown table (for the README's study tables).

    python bench/probe_table.py RUN [RUN ...]

One row per (run, encoder), one column per endpoint × training setting: the mean over seeds of the endpoint's
headline metric, with the first seed's 95 % bootstrap CI.
"""

import argparse
import json
from pathlib import Path

from braindino.probe.results import ProbeResults


def cell(endpoint, encoder: str, setting: str, seed: int) -> str:
    try:
        mean = endpoint.aggregate(encoder, setting, endpoint.headline).mean
        value = endpoint.score(encoder, setting, seed).metrics[endpoint.headline]
    except KeyError:
        return "—"
    if value.low is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{value.low:.2f}, {value.high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="probe run folders (each holding metrics.json)")
    args = parser.parse_args()
    runs = [ProbeResults.from_dict(json.loads((Path(r) / "metrics.json").read_text(encoding="utf-8")))
            for r in args.runs]
    columns = [(e.name, s, e.headline, e.higher_is_better[e.headline]) for e in runs[0].endpoints for s in e.settings]
    print("| run | encoder | " + " | ".join(f"{n} {s} ({h}{'↑' if up else '↓'})" for n, s, h, up in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for path, results in zip(args.runs, runs):
        endpoints = {e.name: e for e in results.endpoints}
        for encoder in results.encoders:
            cells = [cell(endpoints[n], encoder.name, s, results.seeds[0]) if n in endpoints else "—"
                     for n, s, _, _ in columns]
            print(f"| {Path(path).name} | {encoder.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
