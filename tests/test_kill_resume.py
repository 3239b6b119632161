"""`kill -9` a training command at some moment; the same command again resumes from the last
checkpoint and finishes the run (stage 1, then stage 2 from it), as `make stage1` / `make stage2` do,
with the very weights an uninterrupted run ends with."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from owl_lightning.checkpoints import read_checkpoint
from tests.helpers import TINY_YAML

pytestmark = pytest.mark.slow  # real training processes killed and resumed

MAX_STEPS = 42  # not a multiple of the interval: last.ckpt must still hold the final step
EVERY = 4  # checkpoint interval: a kill loses at most this many steps


def command(stage: str, folder, manifest, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "owl_lightning",
        stage,
        "fit",
        "--model.config",
        str(TINY_YAML),
        "--data.manifest",
        str(manifest),
        "--data.num_workers",
        "1",
        "--data.batch_size",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(folder),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--model.optimizer.warmup_steps",
        "0",
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.callbacks+=owl_lightning.train.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={folder / 'checkpoints'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        f"--trainer.callbacks.every_n_train_steps={EVERY}",
        "--ckpt_path",
        "last",
        *extra,
    ]


def kill_after_first_checkpoint(args: list[str], last) -> None:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not last.exists():
            assert process.poll() is None, f"{' '.join(args)} ended (rc {process.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.02)
        time.sleep(random.uniform(0, 0.3))  # anywhere: mid-step, mid-save
    finally:
        process.send_signal(signal.SIGKILL)  # the whole process, DataLoader workers included by the session
        process.wait()


def resume(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, caption_manifest, instruction_manifest, stage):
    if stage == "stage1":
        args = command("stage1", tmp_path / "stage1", caption_manifest)
    else:
        init = tmp_path / "init.ckpt"
        resume(command("stage1", tmp_path / "init", caption_manifest, f"--trainer.max_steps={EVERY}"))
        (tmp_path / "init" / "checkpoints" / "last.ckpt").rename(init)
        args = command("stage2", tmp_path / "stage2", instruction_manifest, "--model.init_from", str(init), "--data.max_length", "256")
    last = tmp_path / stage / "checkpoints" / "last.ckpt"
    resume([arg.replace(str(tmp_path / stage), str(tmp_path / "uninterrupted")) for arg in args])

    kill_after_first_checkpoint(args, last)
    killed_at = read_checkpoint(last)["global_step"]  # loadable whatever the kill interrupted
    assert killed_at >= EVERY and killed_at % EVERY == 0

    output = resume(args)
    assert f"Restored all states from the checkpoint at {last}" in output
    resumed, reference = read_checkpoint(last), read_checkpoint(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, weight in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, rtol=0, atol=1e-6, msg=name)
