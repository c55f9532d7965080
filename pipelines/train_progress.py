"""`er train`'s own console on Ray: rank 0 sends its steps and epochs to the driver through a Ray queue; the
driver draws one bar per epoch (steps, loss) and prints one line per epoch (loss, dev metric, time left).

Ray's own worker output stays in its log files (`ray_env`), so this is what the user sees of a run."""

from __future__ import annotations

import sys
import threading
import time


class Sender:
    """Worker side (rank 0): a step at most every `every` seconds, every epoch's end; never fails the run."""

    def __init__(self, queue, every: float = 0.5):
        self.queue, self.every, self.last = queue, every, 0.0

    def _put(self, item: dict) -> None:
        try:
            self.queue.put_nowait(item)
        except Exception:  # noqa: BLE001 - a full or gone queue costs the console a line, never the run
            pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or step == steps:
            self.last = now
            self._put({"epoch": epoch, "step": step, "steps": steps, "loss": loss})

    def epoch(self, row: dict) -> None:
        self._put({"row": row})


def epoch_line(row: dict, epochs: int, primary: str, seconds: float, left: float | None) -> str:
    dev = row.get(f"dev_{primary}")
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}"
            + (f"  dev {primary} {dev:.4f}" if dev is not None else "") + f"  {seconds:.0f} s"
            + (f"  (at most {_duration(left)} left)" if left else ""))


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class Console:
    """Driver side: drains the queue in a thread while `trainer.fit()` blocks the main thread."""

    def __init__(self, epochs: int, primary: str, out=None):
        from ray.util.queue import Queue

        self.epochs, self.primary, self.out = epochs, primary, out or sys.stderr
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stop, self.bar, self.started, self.ends = threading.Event(), None, None, []  # started: the first step
        self.thread = threading.Thread(target=self._drain, name="er-train-console", daemon=True)

    def __enter__(self) -> Console:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._close_bar()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:  # noqa: BLE001 - Ray may already be going down
            pass

    def sender(self) -> Sender:
        return Sender(self.queue)

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone with Ray at the end
                return
            self.show(item)

    def show(self, item: dict) -> None:
        if "row" in item:
            self._close_bar()
            row = item["row"]
            now = time.monotonic()
            self.started = self.started or now
            seconds = now - (self.ends[-1] if self.ends else self.started)
            self.ends.append(now)
            mean = (now - self.started) / len(self.ends)
            print(epoch_line(row, self.epochs, self.primary, seconds, mean * (self.epochs - row["epoch"])),
                  file=self.out, flush=True)
            return
        self.started = self.started or time.monotonic()
        if self.bar is None:
            from pipelines.bars import bar

            self.bar = bar(total=item["steps"], desc=f"epoch {item['epoch']}/{self.epochs}", unit="step", leave=False,
                           file=self.out)
        self.bar.set_postfix(loss=f"{item['loss']:.4f}", refresh=False)
        self.bar.update(item["step"] - self.bar.n)  # redraws as often as the stream takes (pipelines.bars)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
