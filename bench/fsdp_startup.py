"""Memory of each process when FSDP2 training starts: ``owl-lightning stage1 fit`` on owl-smol with
2 CPU processes (gloo), stopped when training starts.

Only rank 0 reads the weights; the other ranks build on the meta device and receive their shards
(``owl_lightning.train.parallel.shard_owl``). Figure per rank: peak resident memory (VmHWM) up to the start
of training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L

from common import record, rss_kib

ROOT = Path(__file__).resolve().parent.parent


class StartReport(L.Callback):
    """Writes ``rank<N>.json`` into ``out`` at train start, then ends the run."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak_mib = round(rss_kib("VmHWM") / 1024)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"peak_rss_mib": peak_mib}))
        raise SystemExit(0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "owl_lightning",
            "stage1",
            "fit",
            "--config",
            str(ROOT / "experiments/base.yaml"),
            "--config",
            str(ROOT / "experiments/stage1_smol.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.strategy",
            "owl_lightning.train.parallel.AtomicModelParallelStrategy",
            "--trainer.strategy.data_parallel_size",
            "2",
            "--trainer.strategy.tensor_parallel_size",
            "1",
            "--trainer.default_root_dir",  # moves the logger and the checkpoints too
            tmp,
            "--trainer.callbacks+=fsdp_startup.StartReport",
            "--trainer.callbacks.out",
            tmp,
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "2",
        ]
        # One thread per process: the two ranks share the machine's cores.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        ranks = {f"rank{r}": json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)}
    record(
        "fsdp_startup",
        {
            **ranks,
            "how": "owl-lightning stage1 fit, owl-smol, FSDP2 over 2 CPU processes (gloo), "
            "peak RSS (VmHWM) up to the start of training; rank 0 reads the weights",
        },
    )


if __name__ == "__main__":
    main()
