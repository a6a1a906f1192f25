"""The two file monitors: CSV, one file per event as DeepSpeed's csv_monitor writes them
(output_path/job_name/<event name with / and spaces as _>.csv, a `step,<last name part>` header,
then `step,value` rows), and JSONL, one JSON object per optimizer step with every metric of it.

Both open their files on the first write: a run whose first step is step 1 starts them afresh,
a resumed run appends. Each is flushed as it writes (one line, or a row per event, per step), so
a killed run loses at most the step it was in."""

import csv
import json
import os


def open_for_run(path: str, resumed: bool):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a" if resumed else "w", newline="")


class CsvMonitor:
    def __init__(self, config):
        self.directory = os.path.join(config.output_path, config.job_name)
        self._files: dict[str, tuple] = {}

    def write_events(self, events, resumed: bool) -> None:
        for name, value, step in events:
            entry = self._files.get(name)
            if entry is None:
                path = os.path.join(self.directory, name.replace("/", "_").replace(" ", "_") + ".csv")
                file = open_for_run(path, resumed)
                writer = csv.writer(file)
                if file.tell() == 0:
                    writer.writerow(["step", name.split("/")[-1]])
                entry = self._files[name] = (file, writer)
            entry[1].writerow([step, value])
        self.flush()  # a few short writes per step: a killed run loses nothing it wrote

    def flush(self) -> None:
        for file, _ in self._files.values():
            file.flush()

    def close(self) -> None:
        for file, _ in self._files.values():
            file.close()
        self._files.clear()


class JsonlMonitor:
    """One line per optimizer step: "step", "samples", and each event under the last part of its
    name ("train_loss", "lr", "tokens_per_s", ...); values the script adds for the same step
    (engine.log_metrics) join its line. The line is written and flushed when the next step's first
    forward starts (or the monitor closes), that is right after the script's own work on the step."""

    def __init__(self, config):
        self.path = config.path
        self._file = None
        self._pending: dict | None = None

    def start_record(self, step: int, samples: int, resumed: bool) -> None:
        self.write_pending()
        if self._file is None:
            self._file = open_for_run(self.path, resumed)
        self._pending = {"step": step, "samples": samples}

    def add(self, values: dict) -> None:
        if self._pending is not None:
            self._pending.update(values)

    def write_pending(self) -> None:
        if self._pending is not None and self._file is not None:
            self._file.write(json.dumps(self._pending) + "\n")
            self._file.flush()
        self._pending = None

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self, keep_pending: bool = True) -> None:
        """keep_pending False drops the last step's line (the monitor master's close says when)."""
        if keep_pending:
            self.write_pending()
        self._pending = None
        if self._file is not None:
            self._file.close()
            self._file = None
