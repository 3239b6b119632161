"""Atomic files and folders (owl_lightning.files): a kill at any step leaves a whole previous or new version."""

import os

import pytest

from owl_lightning import files


def _save_folder(path, content):
    """A stand-in for a sharded save: two files that must agree."""
    path.mkdir()
    (path / "meta.pt").write_text(content)
    (path / "__0_0.distcp").write_text(content)
    return path


def _saved_content(path):
    """What a whole save at ``path`` holds (None if there is none, the text of a plain file)."""
    if path.is_file():
        return path.read_text()
    if not ((path / "meta.pt").is_file() and (path / "__0_0.distcp").is_file()):
        return None  # none, or an old save half deleted after the new one was published
    contents = {(path / "meta.pt").read_text(), (path / "__0_0.distcp").read_text()}
    assert len(contents) == 1, f"{path} mixes two saves"
    return contents.pop()


@pytest.mark.parametrize("previous", ["published", "folder", "foreign-link", "file", "none"])
def test_publishing_killed_at_any_step_keeps_a_whole_save(tmp_path, monkeypatch, previous):
    """Kill ``publish_folder`` before each of its file-system steps in turn. The target always holds the
    old or the new save, whole, except (once, when moving from a plain folder or file) between moving
    the old one aside and linking the new one; the new save is never lost, and once it finishes only
    the new save is left (a link that was not ours stays, as Lightning's save_last="link" target must)."""
    steps = {name: getattr(os, name) for name in ("symlink", "rename", "replace", "unlink")}
    missing_at = []
    for kill_at in range(12):
        run = tmp_path / f"killed_before_step_{kill_at}"
        run.mkdir()
        last = run / "last.ckpt"
        if previous == "published":
            old = files.staging_folder(last)
            (old / "meta.pt").write_text("old")
            (old / "__0_0.distcp").write_text("old")
            files.publish_folder(old, last)
        elif previous == "folder":
            _save_folder(last, "old")
        elif previous == "foreign-link":
            last.symlink_to(_save_folder(run / "epoch=0-step=2.ckpt", "old").name)
        elif previous == "file":
            last.write_text("old")
        new = files.staging_folder(last)
        (new / "meta.pt").write_text("new")
        (new / "__0_0.distcp").write_text("new")
        done = []

        def killable(name, step, done=done, kill_at=kill_at):
            def run_step(*args, **kwargs):
                if len(done) == kill_at:
                    raise KeyboardInterrupt(f"killed before {name}")
                done.append(name)
                return step(*args, **kwargs)

            return run_step

        with monkeypatch.context() as patch:
            for name, step in steps.items():
                patch.setattr(os, name, killable(name, step))
            try:
                files.publish_folder(new, last)
            except KeyboardInterrupt:
                pass
            else:
                assert _saved_content(last) == "new", done
                leftovers = sorted(p.name for p in run.iterdir() if p.name != "epoch=0-step=2.ckpt")
                assert leftovers == sorted(["last.ckpt", os.readlink(last)]), done
                if previous == "foreign-link":
                    assert _saved_content(run / "epoch=0-step=2.ckpt") == "old"
                break
        assert "new" in {_saved_content(p) for p in run.iterdir()}, f"the new save is lost after {done}"
        if _saved_content(last) is None and previous != "none":
            missing_at.append(done)
    else:
        pytest.fail("publish_folder never finished")
    if previous in ("folder", "file"):
        assert missing_at == [["unlink", "symlink", "rename"]]  # the old one moved aside, the new one not yet linked
    else:
        assert not missing_at, f"last.ckpt held no whole save after {missing_at}"


def test_the_next_publication_clears_a_killed_one(tmp_path):
    last = tmp_path / "last.ckpt"
    killed = files.staging_folder(last)
    (killed / "meta.pt").write_text("half")
    first = files.staging_folder(last)
    (first / "meta.pt").write_text("whole")
    files.publish_folder(first, last)
    assert not killed.exists() and (last / "meta.pt").read_text() == "whole"


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "answers.jsonl"
    files.atomic_write(path, "old\n")

    def failing(file):
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, failing)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_writing_folder_publishes_on_success_and_leaves_the_old_on_error(tmp_path):
    out = tmp_path / "export"
    with files.writing_folder(out) as folder:
        (folder / "owl.json").write_text("1")
    with pytest.raises(RuntimeError):
        with files.writing_folder(out) as folder:
            (folder / "owl.json").write_text("2")
            raise RuntimeError("killed")
    assert (out / "owl.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", os.readlink(out)])
