"""Lightning Callbacks: what a run does beside training the model (Lightning's style guide: the
LightningModule is the system; cross-cutting concerns are callbacks)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that every run that finishes ends with its final state in
    ``last.ckpt``.

    Lightning writes ``last.ckpt`` at the end of training only when it saved none during the run, so
    with ``max_steps`` not a multiple of ``every_n_train_steps`` the run's last steps would be missing
    from it (``max_steps: 200`` saving every 7 steps: ``last.ckpt`` at step 196), and stage 2's
    ``init_from``, ``eval``, ``export`` and ``chat`` would use a model short of the steps asked for.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""  # Lightning's "nothing saved yet": it then saves last.ckpt now
        super().on_train_end(trainer, pl_module)
