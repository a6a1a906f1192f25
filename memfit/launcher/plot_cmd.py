"""`memfit plot RUN [RUN ...] -o OUT.png`: one PNG of one or more runs' metrics, overlaid and
labelled: loss and validation loss, learning rate, throughput and memory, against the step.

A RUN is a JSONL file of memfit's JSONL monitor (or the example's --metrics), plotted against
"step", or a csv_monitor directory (output_path/job_name), plotted against DeepSpeed's step axis,
the number of samples. Needs matplotlib (`pip install "memfit[plot]"`)."""

import csv
import glob
import json
import os
import sys

EXIT_BAD = 2
# panel title -> (series label, JSONL keys tried in order, CSV event file)
PANELS = {
    "loss": [
        ("loss", ("loss", "train_loss"), "Train_Samples_train_loss"),
        ("val_loss", ("val_loss",), "Train_Samples_val_loss"),
    ],
    "learning rate": [("lr", ("lr",), "Train_Samples_lr")],
    "throughput (tokens/s, else samples/s)": [
        ("tokens/s", ("tokens_per_s",), "memfit_tokens_per_s"),
        ("samples/s", ("samples_per_s",), "memfit_samples_per_s"),
    ],
    "memory (GiB)": [
        ("peak RSS", ("peak_rss_bytes",), "memfit_peak_rss_bytes"),
        ("device peak", ("device_peak_bytes",), "memfit_device_peak_bytes"),
    ],
}
BYTES_PER_GIB = 2**30


def add_arguments(commands) -> None:
    plot = commands.add_parser("plot", help="a PNG of runs' loss, learning rate, throughput and memory")
    plot.add_argument("runs", nargs="+", help="JSONL metrics files or csv_monitor directories")
    plot.add_argument("-o", "--out", default="metrics.png", help="the PNG to write (default metrics.png)")
    plot.add_argument("--label", action="append", default=None, help="a run's label, once per run, in order")


def read_jsonl(path: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list] = {}
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            for panel in PANELS.values():
                for label, keys, _ in panel:
                    key = next((k for k in keys if isinstance(record.get(k), (int, float))), None)
                    if key is not None and "step" in record:
                        series.setdefault(label, []).append((record["step"], record[key]))
    return series


def read_csv_dir(path: str) -> dict[str, list[tuple[float, float]]]:
    series = {}
    for panel in PANELS.values():
        for label, _, file_name in panel:
            csv_path = os.path.join(path, file_name + ".csv")
            if os.path.exists(csv_path):
                with open(csv_path, newline="") as file:
                    rows = list(csv.reader(file))[1:]
                series[label] = [(float(step), float(value)) for step, value in rows if step != "step"]
    return series


def read_run(path: str) -> tuple[dict, str]:
    """(series by label, the x axis's name)."""
    if os.path.isdir(path):
        if not glob.glob(os.path.join(path, "*.csv")):
            raise ValueError(f"{path}: a directory without csv_monitor files")
        series, axis = read_csv_dir(path), "samples"
    elif os.path.isfile(path):
        series, axis = read_jsonl(path), "step"
    else:
        raise ValueError(f"{path}: no such file or directory")
    if not series:
        raise ValueError(f"{path}: no loss, learning rate, throughput or memory values")
    return series, axis


def plot(runs: list[str], out: str, labels: list[str] | None = None) -> str:
    """Writes the PNG; returns a one-line summary."""
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--label: given {len(labels)} times for {len(runs)} runs")
    try:
        import matplotlib
    except ImportError:
        raise ImportError('matplotlib is not installed: pip install matplotlib (or "memfit[plot]")') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    read = [read_run(path) for path in runs]
    labels = labels or [os.path.splitext(os.path.basename(os.path.normpath(path)))[0] for path in runs]
    axes_names = sorted({axis for _, axis in read})
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, panel) in zip(axes.flat, PANELS.items()):
        for run_label, (series, _) in zip(labels, read):
            for series_label, _, _ in panel:
                points = series.get(series_label)
                if not points:
                    continue
                xs, ys = zip(*points)
                if title.startswith("memory"):
                    ys = [y / BYTES_PER_GIB for y in ys]
                style = "o-" if series_label == "val_loss" else "-"
                ax.plot(xs, ys, style, markersize=3, label=f"{run_label}: {series_label}")
                if title.startswith("throughput"):
                    break  # tokens/s when the run has them, samples/s otherwise: one scale per panel
        ax.set_title(title)
        ax.set_xlabel(" / ".join(axes_names))
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    counts = ", ".join(
        f"{label}: {len(series.get('loss', []))} loss points" for label, (series, _) in zip(labels, read)
    )
    return f"{out}: {len(runs)} run(s) ({counts})"


def run(args) -> int:
    try:
        print(plot(args.runs, args.out, args.label))
    except (ValueError, ImportError, OSError) as error:
        print(f"memfit plot: {error}", file=sys.stderr)
        return EXIT_BAD
    return 0
