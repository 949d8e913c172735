"""The CLI end to end, as a user runs it: subprocesses, real exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def cli(*args, env_extra=None, input=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, input=input, timeout=300)


def test_export_info_generate(tiny, tmp_path):
    _, engine, ck, _ = tiny
    out = tmp_path / "exp"
    r = cli("export", ck, "-o", out)
    assert r.returncode == 0, r.stderr
    r = cli("info", out)
    assert r.returncode == 0 and "n_layer" in r.stdout and "past_key_values.0.key" in r.stdout
    r = cli("generate", "-m", out, "the quick", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    expected = engine.generate("the quick", max_new_tokens=8)
    assert r.stdout == "the quick" + expected.text + "\n"


def test_generate_from_checkpoint_exports_once_into_cache(tiny, tmp_path):
    _, _, ck, _ = tiny
    env = {"GPT2_ONNX_CACHE": str(tmp_path / "cache")}
    r1 = cli("generate", "-m", ck, "hello", "-n", "4", env_extra=env)
    assert r1.returncode == 0, r1.stderr
    assert f"exporting {ck} once into the cache ({tmp_path / 'cache'}): done\n" in r1.stderr  # says why it waited
    exports = list((tmp_path / "cache").iterdir())
    assert len(exports) == 1 and (exports[0] / "manifest.json").is_file()
    mtime = (exports[0] / "model.onnx").stat().st_mtime_ns
    r2 = cli("generate", "-m", ck, "hello", "-n", "4", env_extra=env)
    assert r2.stdout == r1.stdout
    assert "exporting" not in r2.stderr, r2.stderr
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == mtime  # reused, not re-exported


def test_stream_prints_same_text_and_stats(tiny):
    _, engine, _, onnx_dir = tiny
    plain = cli("generate", "-m", onnx_dir, "to be", "-n", "10")
    r = cli("generate", "-m", onnx_dir, "to be", "-n", "10", "--stream", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout == "to be" + engine.generate("to be", max_new_tokens=10).text + "\n"
    assert "sample 0: 10 tokens, finish=length" in r.stderr and "tok/s" in r.stderr
    r = cli("generate", "-m", onnx_dir, "to be", "-n", "10", "--no-stream", "--no-echo")
    assert r.stdout == engine.generate("to be", max_new_tokens=10).text + "\n"


def test_several_streamed_samples_are_shown_one_after_another(tiny):
    _, engine, _, onnx_dir = tiny
    args = ["generate", "-m", onnx_dir, "the quick", "-n", "12", "--samples", "3", "--temperature", "1", "--seed", "2"]
    streamed, plain = cli(*args, "--stream"), cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    want = engine.generate_batch(["the quick"], n=3, max_new_tokens=12, temperature=1.0, seed=2)
    expected = "".join(f"{'' if i == 0 else chr(10)}--- sample {i} ---\nthe quick{w.text}\n" for i, w in enumerate(want))
    assert streamed.stdout == plain.stdout == expected


def test_version_eval_default_model_and_cache_commands(tiny, tmp_path):
    from gpt2_onnx import __version__

    _, _, ck, _ = tiny
    assert cli("--version").stdout == f"gpt2-onnx {__version__}\n"
    env = {"GPT2_ONNX_CACHE": str(tmp_path / "cache")}
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    r = cli("eval", text, "-m", ck, env_extra=env)
    assert r.returncode == 0 and "nats/token" in r.stdout, r.stderr
    listed = cli("cache", "list", env_extra=env)
    assert listed.returncode == 0 and "1 export(s)" in listed.stdout and str(ck) in listed.stdout
    name = listed.stdout.splitlines()[1].split()[0]
    assert cli("cache", "clear", "nope", env_extra=env).returncode == 2
    r = cli("cache", "clear", name, env_extra=env)
    assert r.returncode == 0 and name in r.stdout and not (tmp_path / "cache" / name).exists()


def test_text_in_brackets_survives_help_and_errors(tiny, tmp_path):
    r = cli("generate", "-m", tmp_path / "[models]" / "x", "hi")
    assert r.returncode == 2 and "[models]" in r.stderr
    assert "[default: 64]" in cli("generate", "--help").stdout


def test_prompt_from_stdin(tiny):
    _, engine, _, onnx_dir = tiny
    r = cli("generate", "-m", onnx_dir, "-", "-n", "5", input="the lazy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "the lazy" + engine.generate("the lazy", max_new_tokens=5).text + "\n"


@pytest.mark.parametrize("args, message", [
    (["generate", "-m", "{onnx}", "x", "-n", "100000"], "--max-new-tokens 100000 = 100001 exceeds the model's"),
    (["generate", "-m", "{onnx}", "x", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["generate", "-m", "{onnx}", "x", "--samples", "0"], "--samples must be an integer >= 1"),
    (["generate", "-m", "{missing}", "x"], "no such folder"),
    (["info", "{missing}"], "no such folder"),
    (["serve", "-m", "{onnx}", "--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["serve", "-m", "{onnx}", "--api-key", ""], "--api-key is empty"),
    (["generate", "-m", "{onnx}", "x", "--provider", "cuda"], "provider 'cuda' asked for"),
    (["generate", "-m", "{onnx}", "x", "--num-beams", "2", "--temperature", "0.5"],
     "--temperature is not supported with num_beams > 1"),
    (["generate", "-m", "{onnx}", "x", "--early-stopping", "maybe"], "--early-stopping must be true, false or never"),
    (["generate", "-m", "{onnx}", "x", "--logit-bias", "7"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["generate", "-m", "{onnx}", "x", "--logit-bias", "7=300"], "--logit-bias values must be in [-100, 100]"),
    (["generate", "-m", "{onnx}", "x", "--min-p", "2"], "--min-p must be in [0, 1]"),
    (["generate", "-m", "{onnx}", "x", "--samples", "3", "--vote", "("], "--vote is not a valid regular expression"),
    (["generate", "-m", "{onnx}", "x", "--samples", "3", "--vote", "number", "--temperature", "0"],
     "--temperature must be > 0 to vote"),
])
def test_errors_are_one_clear_line(tiny, tmp_path, args, message):
    import onnxruntime as ort

    if "cuda" in args and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA present")
    _, _, _, onnx_dir = tiny
    args = [a.format(onnx=onnx_dir, missing=tmp_path / "no" / "such") for a in args]
    r = cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bench_reports_medians_as_json(tiny):
    _, _, _, onnx_dir = tiny
    r = cli("bench", "-m", onnx_dir, "--prompt", "5", "--new", "6", "--batch", "2", "--runs", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["batch"], res["prompt_tokens"], res["new_tokens"], res["runs"], res["provider"]) == (2, 5, 6, 2, "cpu")
    assert res["ttft_ms"] > 0 and res["decode_tok_s"] > 0 and res["end_to_end_tok_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs must be >= 1, got 0"),
    (["--prompt", "120", "--new", "10"], "--new 10 = 130 exceeds the model's context of n_positions 128"),
])
def test_bench_bad_options_exit_2_with_a_message(tiny, args, message):
    _, _, _, onnx_dir = tiny
    r = cli("bench", "-m", onnx_dir, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_python_dash_m_gpt2_onnx_is_the_cli():
    from gpt2_onnx import __version__

    r = subprocess.run([sys.executable, "-m", "gpt2_onnx", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"gpt2-onnx {__version__}\n"


def test_a_closed_stdout_pipe_ends_quietly_with_exit_0(tiny):
    """`gpt2-onnx generate ... --stream | head -2`: the reader leaves early, as `yes | head` lets it."""
    import fcntl

    _, _, _, onnx_dir = tiny
    read_end, write_end = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # a small pipe: the CLI is still writing when the reader leaves
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    args = ["generate", "-m", onnx_dir, "a\nb\nc\n", "-n", "100", "--samples", "64", "--temperature", "1",
            "--seed", "0", "--stream"]  # ~15 KB of output, more than the pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as out:  # head -2
        lines = [out.readline(), out.readline()]
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert lines == [b"--- sample 0 ---\n", b"a\n"]
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr


PROBE = """import sys
from gpt2_onnx.cli import main
sys.argv = ["gpt2-onnx", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    print(e.code, sorted(m for m in ("onnx", "safetensors", "huggingface_hub") if m in sys.modules))
"""


@pytest.mark.parametrize("spec", ["./nope", "../no/such", "~/no-such-model-folder", "{tmp}/missing", "no/such/model",
                                  "models/missing"])
@pytest.mark.parametrize("command", ["generate -m {spec} hi", "info {spec}", "export {spec} -o out", "serve -m {spec}",
                                     "batch in.jsonl -o out.jsonl -m {spec}"])
def test_a_mistyped_local_model_path_fails_at_once_without_the_exporter(tmp_path, spec, command):
    (tmp_path / "models").mkdir()  # models/missing: a folder of this name is here, so it is a path, not a Hub id
    spec = spec.format(tmp=tmp_path)
    args = command.format(spec="SPEC").split()
    r = subprocess.run([sys.executable, "-c", PROBE, *[spec if a == "SPEC" else a for a in args]], capture_output=True,
                       text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert r.stdout.splitlines()[-1] == "2 []", r.stdout + r.stderr  # exit 2, nothing of the exporter imported
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{spec}: no such folder" in lines[0] and "Hub id like 'gpt2'" in lines[0], r.stderr


def test_hub_ids_are_still_hub_ids():
    from gpt2_onnx.config import check_model_spec, is_hub_id

    for spec in ("gpt2", "distilgpt2", "openai-community/gpt2", "org/name", "sshleifer/tiny-gpt2", "a.b_c-d/e.f"):
        assert is_hub_id(spec), spec
        check_model_spec(spec)  # not a local path: tried on the Hub, as before
    for spec in ("./gpt2", "../gpt2", "/gpt2", "~/gpt2", "a/b/c", ".gpt2", "a--b", "a..b", "org/", "my model"):
        assert not is_hub_id(spec), spec


def test_beam_search_best_of_and_vote_print_the_librarys_answers(tiny):
    """--num-beams and --best-of print the library's answers (--stats their scores); --vote prints each sample
    with its answer, then the majority answer and the counts, as Engine.vote finds them."""
    _, engine, _, onnx_dir = tiny
    r = cli("generate", "-m", onnx_dir, "the quick", "-n", "8", "--num-beams", "3", "--samples", "2",
            "--no-repeat-ngram-size", "2", "--stats")
    assert r.returncode == 0, r.stderr
    want = engine.generate_batch(["the quick"], max_new_tokens=8, num_beams=3, n=2, no_repeat_ngram_size=2)
    assert r.stdout == "".join(f"{'' if i == 0 else chr(10)}--- sample {i} ---\nthe quick{w.text}\n"
                               for i, w in enumerate(want))
    assert f"score {want[0].score:.4f}" in r.stderr
    r = cli("generate", "-m", onnx_dir, "to be", "-n", "6", "--best-of", "4", "--temperature", "1", "--seed", "2",
            "--no-echo")
    assert r.returncode == 0, r.stderr
    assert r.stdout == engine.generate("to be", max_new_tokens=6, best_of=4, temperature=1.0, seed=2).text + "\n"
    r = cli("generate", "-m", onnx_dir, "the lazy", "-n", "10", "--samples", "6", "--vote", "(\\w+)", "--seed", "1",
            "--no-echo")
    assert r.returncode == 0, r.stderr
    v = engine.vote("the lazy", n=6, answer_regex=r"(\w+)", max_new_tokens=10, seed=1)
    assert all(f"[answer: {a}]" in r.stdout for a in v.answers)
    counts = ", ".join(f"{a} x{c}" for a, c in v.counts.items())
    assert r.stdout.endswith(f"answer: {v.answer} ({v.counts[v.answer]} of 6 samples; {counts})\n")
