"""What a person sees in the terminal while a run starts and trains, for `launch` and `train`
alike: where the run resumes from, how many ranks this command really runs, and one live progress
line (step, loss, images/s, ETA, last evaluation) read from the progress file rank 0 writes."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from beitdist.recipe import Recipe


def resume_line(recipe: Recipe) -> str | None:
    """"resuming <name> from step N (<checkpoint>)" when the run directory has a complete
    checkpoint, else None; a newer checkpoint that had to be skipped is said too."""
    from beitdist.run.checkpoints import resume_point
    from beitdist.run.rundir import RunDir

    ckpt_dir = RunDir(recipe.run_dir).checkpoints
    if not ckpt_dir.is_dir():
        return None
    point = resume_point(ckpt_dir)
    if point.tag is None:
        return point.warning()
    step = point.tag.removeprefix("step_")
    line = f"resuming {recipe.name} from step {step} ({ckpt_dir / point.tag})"
    warning = point.warning()
    return f"{line}; {warning}" if warning else line


def world_note(recipe: Recipe, world_size: int) -> str | None:
    """`beitdist train` runs as many ranks as torchrun started, whatever scaling.num_workers says."""
    if recipe.scaling.num_workers == world_size:
        return None
    ranks = "1 rank" if world_size == 1 else f"{world_size} ranks"
    return (f"note: scaling.num_workers ({recipe.scaling.num_workers}) applies to `beitdist launch`; this "
            f"`beitdist train` runs {ranks} (torchrun --nproc-per-node N starts N)")


class ProgressBar:
    """A live one-line bar on the driver (step, loss, images/s, ETA), fed by the progress file rank 0
    writes about once a second; on a non-terminal it prints a line every 30 s instead. Each
    evaluation and each checkpoint gets a line of its own, above the bar."""

    def __init__(self, path: Path, stream: Any = None) -> None:
        self.path, self.stream = path, stream or sys.stderr
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last: str | None = None
        self.started = time.time() - 1.0  # file times have coarse resolution on some file systems
        self.printed: str | None = None
        """The last line written on a non-terminal."""
        self.announced: dict[str, Any] = {}
        """The last resume, evaluation and checkpoint a line was printed for."""

    def __enter__(self) -> ProgressBar:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._announce()
        final = self.render()  # the last state always shows, however short the run
        if self.tty:
            if final is not None and final != self.last:
                self.stream.write("\r" + final[:150])
            if final is not None or self.last:
                self.stream.write("\n")
        elif final is not None and final != self.printed:
            self.stream.write(final + "\n")
        self.stream.flush()

    def _read(self) -> dict[str, Any] | None:
        try:
            if self.path.stat().st_mtime < self.started:  # a line of an earlier attempt: not this run's
                return None
            progress = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return progress if isinstance(progress, dict) else None

    def events(self, p: dict[str, Any]) -> list[str]:
        """Lines for a resume (a restarted worker group, a relaunch), an evaluation or a checkpoint
        not announced yet."""
        lines = []
        resumed = p.get("resumed")
        if resumed is not None and self.announced.get("resumed") != resumed:
            lines.append(f"resumed from {resumed}")
            self.announced["resumed"] = resumed
        step = p.get("eval_step")
        if step is not None and self.announced.get("eval") != step:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(p.items()) if k.startswith("val_"))
            lines.append(f"step {step} eval: {metrics}")
            self.announced["eval"] = step
        step = p.get("checkpoint_step")
        if step is not None and self.announced.get("checkpoint") != step:
            lines.append(f"step {step} checkpoint: {p.get('checkpoint', '')}")
            self.announced["checkpoint"] = step
        return lines

    def _announce(self) -> None:
        p = self._read()
        lines = self.events(p) if p is not None else []
        for line in lines:
            self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        if lines:
            if self.tty and self.last:
                self.stream.write(self.last[:150])
            self.stream.flush()

    def render(self) -> str | None:
        p = self._read()
        if p is None:
            return None
        width = 24
        filled = int(width * p["step"] / max(p["steps"], 1))
        eta = int(p.get("eta_s", 0))
        extra = "".join(f" {k} {v:.3f}" for k, v in p.items() if k.startswith("val_") and k != "val_loss")
        return (f"[{'#' * filled}{'.' * (width - filled)}] step {p['step']}/{p['steps']} loss {p['loss']:.4f} "
                f"{p['images_per_s']:.0f} img/s ETA {eta // 60}:{eta % 60:02d}{extra}")

    def _loop(self) -> None:
        printed_at = 0.0
        while not self.stop.wait(1.0):
            self._announce()
            line = self.render()
            if line is None or line == self.last:
                continue
            if self.tty:
                self.stream.write("\r" + line[:150])
                self.stream.flush()
            elif time.monotonic() - printed_at >= 30:
                self.stream.write(line + "\n")
                self.printed, printed_at = line, time.monotonic()
            self.last = line
