"""One place, however it is spelt (found by a helper probing every command with other spellings): SRC and DST as
one folder through a symlink are refused before the inputs are overwritten; a DST reached through a symlink into
SRC is left out of the listing, so a rerun resumes instead of taking its outputs as inputs; a "~/x" DST (quoted,
so the shell left it) is one place for every write and for verify; verify takes a file: DST; sample-photos and
training's --storage write where a file:// URI points, never under ./file:/ in the current folder."""

import os

from imgxlate.cli import main
from imgxlate.io import manifest

from conftest import photo
from fixtures import png, rows_of, summary_of, translate, write_tree

NAMES = ["a.png", "b.png"]


def _two_runs(dst) -> list[dict]:
    """The statuses of run r1's rows, and run r2's counts (named: two runs in one second have ids that sort by
    their random part)."""
    assert sorted(manifest.runs(str(dst))) == ["r1", "r2"]
    return sorted(r["status"] for r in rows_of(dst, "r1")), summary_of(dst, "r2")["counts"]


def _src(root):
    write_tree(root, {n: png(photo(12, 10, seed=i)) for i, n in enumerate(NAMES)})
    return {n: (root / n).read_bytes() for n in NAMES}


def test_src_and_dst_as_one_folder_through_a_symlink_are_refused_before_any_input_is_touched(tmp_path, capsys):
    before = _src(tmp_path / "src")
    os.symlink(tmp_path / "src", tmp_path / "link")
    assert translate(tmp_path / "src", tmp_path / "link", "--scale", "2", "--pipeline", "in-process") == 2
    assert "SRC and DST are the same folder" in capsys.readouterr().err
    assert {n: (tmp_path / "src" / n).read_bytes() for n in NAMES} == before
    assert not (tmp_path / "src" / "_manifest").exists()


def test_a_dst_inside_src_through_a_symlink_is_not_listed_so_a_rerun_resumes(tmp_path):
    _src(tmp_path / "src")
    os.symlink(tmp_path / "src", tmp_path / "link")
    dst = tmp_path / "link" / "out"
    for run in ("r1", "r2"):
        assert translate(tmp_path / "src", dst, "--scale", "2", "--pipeline", "in-process", "--run-id", run) == 0
    assert _two_runs(dst) == (["ok", "ok"], {"skipped_done": 2})
    assert not (tmp_path / "src" / "out" / "out").exists()


def test_a_tilde_dst_is_one_place_for_every_write_and_for_verify(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    _src(tmp_path / "src")
    for run in ("r1", "r2"):
        assert translate(tmp_path / "src", "~/out", "--scale", "2", "--pipeline", "in-process", "--run-id", run) == 0
    out = tmp_path / "home" / "out"
    assert sorted(p.name for p in out.glob("*.png")) == NAMES and (out / "_manifest").is_dir()
    assert _two_runs(out) == (["ok", "ok"], {"skipped_done": 2})
    assert main(["verify", "~/out"]) == 0 and main(["verify", f"file:{out}"]) == 0
    assert main(["verify", f"file://localhost{out}"]) == 0
    assert os.listdir(tmp_path / "cwd") == []                      # no ./~ and no ./file:


def test_sample_photos_and_training_storage_given_as_file_uris_write_there(tmp_path, monkeypatch):
    from imgxlate.train import tasks
    from imgxlate.train.tasks import RunConfig

    monkeypatch.chdir(tmp_path)
    assert main(["sample-photos", f"file://{tmp_path}/photos", "--max-side", "32", "--holdout", "1"]) == 0
    assert len(list((tmp_path / "photos").rglob("*.png"))) == 7 and not (tmp_path / "file:").exists()
    cfg = tasks.absolute_paths(RunConfig(task="sr", data=f"file:{tmp_path}/photos/train", storage="~/runs",
                                         name="x"))
    assert cfg.data == f"{tmp_path}/photos/train" and cfg.storage == os.path.expanduser("~/runs")
