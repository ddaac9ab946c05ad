"""What a researcher watches while a sweep runs (no Ray here; callbacks.Progress feeds it).

On a terminal: a line when a trial starts or ends, and one status line redrawn in place (a bar
over all iterations of all trials, trials running and ended, the best value so far). Elsewhere
(a log file, CI): a plain line per report. In both, every `every_s` seconds, a summary and a
table of the trials: the axes the sweep varies (the configuration keys whose values differ
between trials, never data paths or URIs that are the same for all), iteration / max, best
metric and how each trial ended so far. Ray's own messages go to the sweep's log file
(`ray_messages_to`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from tlcore.config import flatten_config
from tlcore.text import format_table

CLEAR_LINE = "\r\033[K"


def prepare_ray_worker() -> None:
    """Run in every Ray worker process as it starts (cluster.connect: runtime_env's
    worker_process_setup_hook): quiet_ray_workers, and no MLflow in the process. The driver is
    the only MLflow client (no credential leaves it), so a worker must never become one: an import
    of mlflow there fails at once instead of reaching a server. (MONAI would import mlflow for
    its MLflow handler, ~1 CPU-s per worker; its optional_import takes the refusal quietly.)"""
    quiet_ray_workers()
    refuse_import("mlflow")


# What MONAI imports for features a 3D trial or evaluation never uses: torchvision for its 2D
# backbones (and torchvision imports torch's compiler stack: 1.6 of the ~6 CPU-s each worker
# spent on imports), scikit-learn for its metrics' ROC code and matplotlib for its image
# utilities (0.55 of the 1.7 CPU-s MONAI and tlcore's worker modules take after torch and
# ray.tune; docs/testing.md). tlcore's own users of them run in the driver. Not pandas, which
# MONAI would also load for its CSV datasets: ray.tune needs it in a trial's worker.
UNUSED_IN_3D_WORKERS = ("torchvision", "sklearn", "matplotlib")


def prepare_3d_ray_worker() -> None:
    """prepare_ray_worker for a 3D sweep's workers, and none of UNUSED_IN_3D_WORKERS in them
    either. MONAI's optional_import takes the refusals quietly, and a 2D sweep's workers
    (DenseNet121, torchvision's) get prepare_ray_worker."""
    prepare_ray_worker()
    for module in UNUSED_IN_3D_WORKERS:
        refuse_import(module)


def refuse_import(module: str) -> None:
    if module not in sys.modules:
        sys.modules[module] = None  # Python's own way to make an import fail (ModuleNotFoundError)


def quiet_ray_workers() -> None:
    """Tune's and Train's info lines in a worker ("Restored on <ip> from checkpoint", "Checkpoint
    successfully created") stay out of the sweep's output, and so does the traceback of a worker
    that Ray stops (SIGTERM, when the driver exits) while it runs a finaliser; warnings and
    errors still come through."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.unraisablehook = _unraisable_except_stop


def _unraisable_except_stop(unraisable) -> None:
    # Ray's SIGTERM handler raises SystemExit wherever the worker is; inside a weakref callback
    # or __del__ Python cannot raise it and prints "Exception ignored in ... Traceback" instead.
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def ray_messages_to(path: Path):
    """Ray's own log messages (the driver's "ray" loggers) go to `path`, the sweep's log file;
    on the console only its errors remain, beside tlcore's progress view."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles = [h for h in ray_logger.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in consoles]
    for h in consoles:
        h.setLevel(logging.ERROR)
    ray_logger.addHandler(to_file)
    try:
        yield
    finally:
        ray_logger.removeHandler(to_file)
        to_file.close()
        for h, level in zip(consoles, levels):
            h.setLevel(level)


def swept_axes(configs: list[dict]) -> list[str]:
    """Configuration keys whose values differ between trials, in the order the first trial has them."""
    flat = [flatten_config(c) for c in configs]
    keys = list(dict.fromkeys(k for c in flat for k in c))
    return [k for k in keys if len({repr(c.get(k)) for c in flat}) > 1]


def cell_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text.replace("models:/", "") if len(text) <= 40 else "..." + text[-37:]


class SweepProgress:
    """The sweep's progress view. `stream` defaults to stdout; TLCORE_PROGRESS=plain or =bar
    overrides the terminal check (plain lines suit `tee` into a log file)."""

    def __init__(self, max_iterations: int, metric: str = "val_dice", mode: str = "max", every_s: float = 120.0,
                 stream: TextIO | None = None):
        self.max_iterations, self.metric, self.mode, self.every_s = max_iterations, metric, mode, every_s
        self.stream = stream
        self.labels: dict[str, str] = {}
        self.configs: dict[str, dict] = {}
        self.best: dict[str, float] = {}
        self.done: dict[str, int] = {}
        self.ended: dict[str, str] = {}
        self.running = self.trials = 0
        self._drawn_at = 0.0
        self._t0, self._next = time.time(), time.time() + every_s

    def __getstate__(self):  # pickled with Tune's experiment state; a stream is not picklable
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):  # a sweep resumed from an older tlcore lacks the newer fields
        self.__dict__.update({"configs": {}, "done": {}, "stream": None, "running": 0, "trials": 0, "_drawn_at": 0.0,
                              **state})

    # ---------------------------------------------------------------- output
    @property
    def out(self) -> TextIO:
        return self.stream or sys.stdout

    @property
    def on_terminal(self) -> bool:
        choice = os.environ.get("TLCORE_PROGRESS", "")
        if choice in ("plain", "bar"):
            return choice == "bar"
        return bool(getattr(self.out, "isatty", lambda: False)())

    def say(self, text: str) -> None:
        """A line of its own; on a terminal the status line is cleared first and drawn again below it."""
        if self.on_terminal:
            self.out.write(CLEAR_LINE)
        self.out.write(f"[tlcore] {text}\n")
        if self.on_terminal:
            self.out.write(self.status_line())
        self.out.flush()

    def redraw(self) -> None:
        self.out.write(CLEAR_LINE + self.status_line())
        self.out.flush()
        self._drawn_at = time.time()

    def _trial(self, trial_id: str, text: str) -> None:
        self.say(f"{trial_id} {self.labels.get(trial_id, '')}: {text}")

    # ---------------------------------------------------------------- events
    def started(self, trial_id: str, config: dict, label: str) -> None:
        if trial_id in self.labels:  # a paused trial starting again says nothing new
            return
        self.labels[trial_id], self.configs[trial_id] = label, dict(config)
        self._trial(trial_id, "started")

    def reported(self, trial_id: str, result: dict) -> None:
        self.done[trial_id] = int(result.get("iteration", self.done.get(trial_id, 0)))
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return
        if self._better(value, self.best.get(trial_id)):
            self.best[trial_id] = value
        if self.on_terminal:
            self.redraw()
        else:
            self._trial(trial_id, f"iteration {result.get('iteration', '?')}/{self.max_iterations}  "
                                  f"{self.metric} {value:.3f} (best {self.best[trial_id]:.3f})")

    def finished(self, trial_id: str, done: int) -> None:
        self.done[trial_id] = done
        self.ended[trial_id] = "finished" if done >= self.max_iterations else "stopped early"
        self._trial(trial_id, f"{self.ended[trial_id]} at {done}/{self.max_iterations}")

    def failed(self, trial_id: str, error_file: str | None) -> None:
        self.ended[trial_id] = "failed"
        self._trial(trial_id, f"failed; its traceback: {error_file or 'see above'}")

    def retried(self, trial_id: str, done: int, error_file: str | None) -> None:
        """A trial failed and Tune starts it again from its last checkpoint (--max-failures)."""
        self._trial(trial_id, f"failed at {done}/{self.max_iterations}, retried from its last checkpoint "
                              f"(traceback: {error_file or 'see above'})")

    def tick(self, running: int, trials: int) -> None:
        """Every `every_s` seconds: the summary and the table of trials (on a terminal, above the
        status line, which is redrawn at every tick)."""
        self.running, self.trials = running, trials
        if time.time() < self._next:
            if self.on_terminal and time.time() - self._drawn_at >= 1.0:  # Tune steps ~10 times a second
                self.redraw()
            return
        self._next = time.time() + self.every_s
        self.say(self.summary() + "\n" + self.table())

    def end(self) -> None:
        if self.on_terminal:
            self.out.write(CLEAR_LINE)
        self.out.write(f"[tlcore] {self.summary()}\n")
        self.out.flush()

    # ---------------------------------------------------------------- views
    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def iterations(self) -> tuple[int, int]:
        """(iterations done, iterations in all): an ended trial counts in full, its budget spent."""
        trials = max(self.trials, len(self.labels))
        done = sum(self.max_iterations if t in self.ended else self.done.get(t, 0) for t in self.labels)
        return done, trials * self.max_iterations

    def status_line(self, width: int = 24) -> str:
        done, total = self.iterations()
        filled = round(width * done / total) if total else 0
        text = (f"[tlcore] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} iterations, "
                f"{self.running} running, {len(self.ended)} ended")
        best = self.best_trial()
        if best:
            text += f", best {self.metric} {self.best[best]:.3f}"
        return text + f", {time.time() - self._t0:.0f} s"

    def best_trial(self) -> str | None:
        if not self.best:
            return None
        return (max if self.mode == "max" else min)(self.best, key=self.best.get)

    def summary(self) -> str:
        ended = list(self.ended.values())
        trials = max(self.trials, len(self.labels))
        text = (f"{len(ended)}/{trials} trials ended ({ended.count('stopped early')} stopped early, "
                f"{ended.count('failed')} failed), {self.running} running, "
                f"{time.time() - self._t0:.0f} s")
        best = self.best_trial()
        if best:
            text += f"; best {self.metric} {self.best[best]:.3f} ({self.labels.get(best, best)})"
        return text

    def table(self) -> str:
        """One row per trial: the swept axes, iteration / max, best metric, status."""
        ids = list(self.labels)
        axes = swept_axes([self.configs[t] for t in ids])
        rows = []
        for t in ids:
            c = flatten_config(self.configs[t])
            best = self.best.get(t)
            rows.append({"trial": t, **{k: cell_text(c.get(k, "")) for k in axes},
                         "iteration": f"{self.done.get(t, 0)}/{self.max_iterations}",
                         f"best {self.metric}": "" if best is None else f"{best:.3f}",
                         "status": self.ended.get(t, "running")})
        return format_table(rows)
