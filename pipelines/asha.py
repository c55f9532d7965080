"""ASHA per task: a sweep's trials compete only with trials of their own task.

One Tune experiment holds every task of a sweep, but dev metrics of different tasks do not compare
(one task's 0.6 may be its best, another's 0.9 its worst), so each task gets its own ASHA rungs.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerTaskASHA(FIFOScheduler):
    def __init__(self, task_of: dict[str, str], **asha):
        super().__init__()
        self._task_of, self._asha, self._by_task = dict(task_of), asha, {}
        self._metric = self._mode = None

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _of(self, trial) -> ASHAScheduler:
        task = self._task_of[trial.config["trial"]]
        if task not in self._by_task:
            self._by_task[task] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._asha)
        return self._by_task[task]

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{task}: {s.debug_string()}" for task, s in self._by_task.items())
