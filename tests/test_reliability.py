"""Faults injected with real processes: concurrent and killed exports into the cache, unwritable caches,
unreadable and Git-LFS-pointer files, bad bytes on the command line. Every subprocess has a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.cache_faults import HOOK_LINE, TIMEOUT, exports, slow_cli, temp_dirs


def _env(cache: Path | None, **extra) -> dict:
    env = dict(os.environ, **extra)
    if cache is not None:
        env["GPT2_ONNX_CACHE"] = str(cache)
    return env


def cli(*args, cache: Path | None = None, input=None, env: dict | None = None, timeout: float = TIMEOUT, **kw):
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True,
                          input=input, env=_env(cache, **(env or {})), timeout=timeout, **kw)


def wait_for(cond, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fails_cleanly(r, *messages: str) -> None:
    """Exit code 2, one line on stderr, no traceback."""
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode == 2, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    for m in messages:
        assert m in err, err


def _drop_dac_capabilities() -> None:
    """preexec_fn: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH obeys file permissions (PR_CAPBSET_DROP:
    the capabilities are gone from the program it then runs)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def as_user(tmp_path):
    """subprocess kwargs under which chmod is obeyed: as is for a user; as root (CI, containers), without the
    capabilities that bypass permissions. Checked on a chmod 000 file."""
    kw = {"preexec_fn": _drop_dac_capabilities} if os.geteuid() == 0 else {}
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        r = subprocess.run([sys.executable, "-c", f"open({str(probe)!r})"], capture_output=True, timeout=60, **kw)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop root's permission override here: {e}")
    if r.returncode == 0:
        pytest.skip("file permissions are not enforced for this user")
    return kw


# ---- the export cache across processes ------------------------------------------------------
def test_concurrent_first_runs_all_succeed_and_share_one_export(tiny, tmp_path):
    _, engine, ck, _ = tiny
    cache = tmp_path / "cache"
    procs = [slow_cli(2, "generate", "-m", ck, "the quick", "-n", "4", cache=cache) for _ in range(4)]
    try:
        results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=TIMEOUT)]]
    finally:
        for p in procs:
            p.kill()
    for rc, out, err in results:
        assert rc == 0, err[-2000:]
    assert {out for _, out, _ in results} == {"the quick" + engine.generate("the quick", max_new_tokens=4).text + "\n"}
    assert sum(HOOK_LINE in err for _, _, err in results) == 1  # one process exported, the others waited for it
    (export,) = exports(cache)
    assert (export / "manifest.json").is_file() and list(cache.iterdir()) == [export]  # no temp folder, no lock
    assert export.stat().st_mode & 0o777 == 0o755  # readable by the other users of a shared cache


def test_exporting_over_an_export_replaces_it_whole(tiny, tmp_path):
    from gpt2_onnx import Engine
    from gpt2_onnx.export import export_model

    _, engine, ck, _ = tiny
    out = tmp_path / "exp"
    for _ in range(2):
        export_model(str(ck), out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # the previous export moved aside, then gone
    assert Engine.load(out, provider="cpu").generate("x", max_new_tokens=3).token_ids == \
        engine.generate("x", max_new_tokens=3).token_ids


def _kill_mid_export(ck: Path, cache: Path) -> Path:
    """Start an export of ck into cache, SIGKILL it once its temp folder is complete; returns the orphan."""
    p = slow_cli(120, "generate", "-m", ck, "x", "-n", "2", cache=cache)
    try:
        wait_for(lambda: any((d / "tokenizer.json").is_file() for d in temp_dirs(cache)), "the export's temp folder")
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
    finally:
        p.kill()
        p.communicate(timeout=30)
    (orphan,) = temp_dirs(cache)
    assert (orphan / "model.onnx").is_file() and exports(cache) == []
    return orphan


def test_export_killed_mid_way_leaves_an_orphan_that_the_next_run_removes(tiny, tmp_path):
    _, engine, ck, _ = tiny
    cache = tmp_path / "cache"
    _kill_mid_export(ck, cache)
    r = cli("generate", "-m", ck, "x", "-n", "2", cache=cache, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x" + engine.generate("x", max_new_tokens=2).text + "\n"
    assert list(cache.iterdir()) == exports(cache) and len(exports(cache)) == 1  # orphan and stale lock gone


def test_cache_clear_removes_orphans_but_not_an_export_under_way(tiny, tmp_path):
    _, _, ck, _ = tiny
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    p = slow_cli(gate, "generate", "-m", ck, "x", "-n", "2", cache=cache)
    try:
        wait_for(lambda: any((d / "tokenizer.json").is_file() for d in temp_dirs(cache)), "the export's temp folder")
        r = cli("cache", "clear", cache=cache, text=True)
        assert r.returncode == 0, r.stderr
        assert len(temp_dirs(cache)) == 1  # its exporter holds the lock: not an orphan
        gate.touch()
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    finally:
        p.kill()
    assert temp_dirs(cache) == [] and len(exports(cache)) == 1
    assert cli("cache", "clear", cache=cache).returncode == 0 and exports(cache) == []
    _kill_mid_export(ck, cache)
    r = cli("cache", "clear", cache=cache, text=True)
    assert r.returncode == 0, r.stderr
    assert list(cache.iterdir()) == []  # the orphan and the lock files are gone


# ---- where the cache is, and caches that cannot be written ----------------------------------
def test_an_empty_xdg_cache_home_means_the_home_cache_not_the_current_folder(tiny, tmp_path, monkeypatch):
    from gpt2_onnx.config import cache_root

    _, _, ck, _ = tiny
    monkeypatch.delenv("GPT2_ONNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_root() == Path.home() / ".cache" / "gpt2-onnx"
    monkeypatch.setenv("GPT2_ONNX_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "gpt2-onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gpt2-onnx"
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GPT2_ONNX_CACHE"}
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "generate", "-m", str(ck), "x", "-n", "2"], cwd=work,
                       env={**env, "XDG_CACHE_HOME": "", "HOME": str(home)}, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == [] and len(exports(home / ".cache" / "gpt2-onnx")) == 1


def test_a_cache_that_is_a_file_is_one_clear_error(tiny, tmp_path):
    _, _, ck, _ = tiny
    (tmp_path / "file").write_text("")
    for cache in (tmp_path / "file", tmp_path / "file" / "sub"):
        fails_cleanly(cli("generate", "-m", ck, "x", cache=cache, text=True),
                      f"the export cache {cache} is not a writable folder", "set GPT2_ONNX_CACHE to a writable folder")


def test_a_read_only_cache_is_one_clear_error_and_its_exports_still_run(tmp_path, as_user):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cache = ro / "cache"  # cannot even be made
    fails_cleanly(cli("generate", "ROMEO:", "-n", "4", cache=cache, text=True, **as_user),
                  f"the export cache {cache} is not a writable folder (Permission denied)", "GPT2_ONNX_CACHE")
    cache = tmp_path / "cache"  # the bundled model exported, then the cache made read-only
    first = cli("generate", "ROMEO:", "-n", "4", cache=cache, text=True)
    assert first.returncode == 0, first.stderr
    assert len(exports(cache)) == 1 and not any(p.name.startswith(".") for p in cache.iterdir())  # no lock left
    for p in [cache, *cache.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    r = cli("generate", "ROMEO:", "-n", "4", cache=cache, text=True, **as_user)
    assert r.returncode == 0 and r.stdout == first.stdout, r.stderr
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # nothing written: no lock needed to read
    ro.chmod(0o755)
    for p in [cache, *cache.rglob("*")]:
        p.chmod(0o755)


# ---- files that cannot be read, Git LFS pointers, corrupt JSON ------------------------------
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 691784\n"


@pytest.fixture
def ck_copy(tiny, tmp_path):
    import shutil

    _, _, ck, onnx_dir = tiny
    return shutil.copytree(ck, tmp_path / "hf"), shutil.copytree(onnx_dir, tmp_path / "onnx")


@pytest.mark.parametrize("kind, name", [("hf", "model.safetensors"), ("hf", "pytorch_model.bin"),
                                        ("hf", "tokenizer.json"), ("onnx", "tokenizer.json")])
def test_a_git_lfs_pointer_is_named_with_git_lfs_pull(ck_copy, tmp_path, kind, name):
    hf, onnx_dir = ck_copy
    folder = hf if kind == "hf" else onnx_dir
    if name == "pytorch_model.bin":
        (hf / "model.safetensors").unlink()
    (folder / name).write_text(LFS_POINTER)
    r = cli("generate", "-m", folder, "x", "-n", "2", cache=tmp_path / "cache", text=True)
    fails_cleanly(r, f"{folder / name} is a Git LFS pointer", "git lfs pull")


def test_corrupt_config_json_is_named(ck_copy, tmp_path):
    hf, _ = ck_copy
    for text, message in (("{bad", "is not valid JSON"), ("[1, 2]", "does not hold a JSON object"),
                          (b"\xff\xfe", "is not valid JSON")):
        (hf / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        fails_cleanly(cli("generate", "-m", hf, "x", cache=tmp_path / "cache", text=True),
                      f"{hf / 'config.json'} {message}")


@pytest.mark.parametrize("what", ["export folder", "manifest.json", "model.onnx", "tokenizer.json", "hf folder",
                                  "config.json"])
def test_unreadable_files_say_they_cannot_be_read(ck_copy, tmp_path, as_user, what):
    hf, onnx_dir = ck_copy
    target = {"export folder": onnx_dir, "hf folder": hf, "config.json": hf / "config.json"}.get(what, onnx_dir / what)
    target.chmod(0)
    try:
        r = cli("generate", "-m", hf if "hf" in what or what == "config.json" else onnx_dir, "x",
                cache=tmp_path / "cache", text=True, **as_user)
    finally:
        target.chmod(0o755)
    fails_cleanly(r, f"{target} cannot be read (PermissionError")
    assert "not valid JSON" not in r.stderr


# ---- the command line ------------------------------------------------------------------------
def test_bytes_that_are_not_utf8_in_argv_or_stdin(tiny):
    _, _, _, onnx_dir = tiny
    bad = os.fsdecode(b"\xff\xfe abc")  # what Python makes of them: lone surrogates (surrogateescape)
    fails_cleanly(cli("generate", "-m", onnx_dir, bad, "-n", "2"), "PROMPT is not valid UTF-8 text")
    fails_cleanly(cli("generate", "-m", onnx_dir, "x", "--stop", bad), "--stop is not valid UTF-8 text")
    for env in ({}, {"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}):
        fails_cleanly(cli("generate", "-m", onnx_dir, "-", "-n", "2", input=b"ok \xff\xfe", env=env),
                      "the prompt on stdin is not valid UTF-8 text (invalid start byte at byte 3)")
    r = cli("generate", "-m", onnx_dir, "-", "-n", "2", input="the lazy\r\n".encode())
    assert r.returncode == 0 and r.stdout.decode().startswith("the lazy\n"), r.stderr


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_refuses_a_port_outside_1_to_65535_before_loading(tmp_path, port):
    fails_cleanly(cli("serve", "-m", tmp_path / "no-such-model", "--port", port, text=True, timeout=60),
                  f"--port must be a TCP port 1..65535, got {port}")


def test_serve_refuses_an_empty_api_key_from_the_environment(tiny):
    _, _, _, onnx_dir = tiny
    # (without the fix the server would start: these would time out rather than wait for ever)
    fails_cleanly(cli("serve", "-m", onnx_dir, env={"GPT2_ONNX_API_KEY": ""}, text=True, timeout=60),
                  "GPT2_ONNX_API_KEY is set but empty")
    fails_cleanly(cli("serve", "-m", onnx_dir, "--api-key", "", text=True, timeout=60), "--api-key is empty")
