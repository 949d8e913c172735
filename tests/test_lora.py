"""LoRA adapters at run time (export --lora-slots): each row of a batch with its own adapter, vs peft's PeftModel."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_checkpoint
from peft import IA3Config, LoraConfig, PeftModel
from test_adapters import BASE, IDS, load_base, save_adapter

from gpt2_onnx import AsyncEngine, Engine, GenerationOptions, InvalidInput
from gpt2_onnx.core import Core
from gpt2_onnx.export import export_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's advice
ATOL = 1e-4
NEW = 16
SHAPES = {"head8": BASE, "head5": {**BASE, "n_embd": 10, "n_head": 2}}  # head size 5 is padded to 8 in the graph
ADAPTERS = {  # different ranks, targets and options; c_proj names both attn.c_proj and mlp.c_proj
    "all-bias": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True),
    "attn-rslora": LoraConfig(r=2, lora_alpha=32, target_modules=["c_attn"], use_rslora=True, lora_dropout=0.1),
    "patterns": LoraConfig(r=6, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                           rank_pattern={"h.1.mlp.c_fc": 2, "attn.c_proj": 3}, alpha_pattern={"c_fc": 5}),
}
PROMPTS = [IDS, [9, 8, 7, 6, 5], [100, 200, 30, 4, 41, 52, 63, 74, 85, 96, 107, 118, 129, 140, 151, 162, 173, 2]]


def peft_run(base, adapter, ids):
    """(logits of every position, greedy ids) of the adapter as peft loads it; the base model's with None."""
    model = load_base(base) if adapter is None else PeftModel.from_pretrained(load_base(base), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
    return logits, greedy


def logits_of(engine, ids, adapter=None):
    cache = engine.model.new_cache(1, len(ids))
    slots = None if adapter is None else np.array([adapter.slot])
    return engine.model.run(cache, np.array([ids]), np.array([len(ids)]), np.arange(len(ids))[None], lora=slots)[1][0]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def setup(request, tmp_path_factory):
    """(checkpoint, adapter folders, Engine of an export with 3 slots and the adapters loaded, handles)."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    make_checkpoint(root / "hf", seed=5, **SHAPES[request.param])
    folders = {}
    for k, (name, config) in enumerate(sorted(ADAPTERS.items())):
        folders[name] = root / name
        save_adapter(root / "hf", copy.deepcopy(config), folders[name], seed=k)
    engine = Engine.load(export_model(str(root / "hf"), root / "onnx", lora_slots=3, max_lora_rank=6), provider="cpu")
    handles = {name: engine.load_lora(folder, name=name) for name, folder in folders.items()}
    return root / "hf", folders, engine, handles


def test_each_adapter_matches_peft_model(setup):
    base, folders, engine, handles = setup
    assert sorted(h.slot for h in handles.values()) == [1, 2, 3]
    plain, _ = peft_run(base, None, IDS)
    for name, folder in folders.items():
        ref_logits, ref_ids = peft_run(base, folder, IDS)
        assert np.abs(plain - ref_logits).max() > 0.05  # the adapter matters
        np.testing.assert_allclose(logits_of(engine, IDS, handles[name]), ref_logits, atol=ATOL, rtol=0)
        assert engine.generate(IDS, max_new_tokens=NEW, ignore_eos=True, adapter=handles[name]).token_ids == ref_ids
    np.testing.assert_allclose(logits_of(engine, IDS), plain, atol=ATOL, rtol=0)  # slot 0: the base model


def test_a_batch_mixing_adapters_and_the_base_gives_each_row_its_answer_alone(setup):
    _, _, engine, handles = setup
    options = GenerationOptions(max_new_tokens=NEW, ignore_eos=True, logprobs=0)
    choices = [None, *handles.values()]
    alone = {(p, k): engine.generate(PROMPTS[p], adapter=a, max_new_tokens=NEW, ignore_eos=True, logprobs=0)
             for p in range(len(PROMPTS)) for k, a in enumerate(choices)}
    core = Core(engine.model, slots=len(alone), max_length=64)
    seqs = {key: engine.sequences([PROMPTS[key[0]]], options, adapter=choices[key[1]])[0] for key in alone}
    for s in seqs.values():  # one request each: every row joins the first step, then all decode together
        core.submit([s])
    while core.busy:
        core.step()
    assert core.steps == NEW
    for key, s in seqs.items():
        assert s.tokens == alone[key].token_ids, key
        np.testing.assert_allclose(s.logprobs, alone[key].logprobs, atol=1e-4)
    assert len({tuple(s.tokens) for key, s in seqs.items() if key[0] == 0}) == len(choices)  # the rows differ


def test_decode_steps_on_device_buffers_bind_the_slots_too(setup):
    """DecodeStep's device path (CUDA's; device_buffers=True runs it on the CPU) equals the numpy one."""
    from gpt2_onnx.model import DecodeStep

    _, _, engine, handles = setup
    slots = np.array([0, *sorted(h.slot for h in handles.values())])
    outs = []
    for device_buffers in (False, True):
        cache = engine.model.new_cache(4, 32)
        engine.model.run(cache, np.array([IDS[:5]] * 4), np.full(4, 5), np.full((4, 1), 4), lora=slots)
        step = DecodeStep(engine.model, cache, device_buffers=device_buffers)
        ids, logits = step(np.full(4, 7), np.arange(4), lora=slots)
        outs.append((ids.copy(), logits.copy()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6, rtol=0)
    assert min(np.abs(outs[0][1][0] - row).max() for row in outs[0][1][1:]) > 0.01  # each row its own adapter


def test_same_prompt_on_the_base_and_on_adapters_never_shares_kv(setup):
    _, _, engine, handles = setup
    prompt = PROMPTS[2]  # 18 tokens: more than one block of the prefix cache
    a, b = handles["all-bias"], handles["patterns"]
    alone = {k: engine.generate(prompt, adapter=h, max_new_tokens=NEW, ignore_eos=True).token_ids
             for k, h in (("base", None), ("a", a), ("b", b))}
    llm = AsyncEngine(engine, max_batch=4, prefix_cache_mb=64)
    try:
        opts = GenerationOptions(max_new_tokens=NEW, ignore_eos=True)
        assert llm.submit(prompt, opts).result()[0].token_ids == alone["base"]
        assert llm.submit(prompt, opts, adapter=a).result()[0].token_ids == alone["a"]
        assert llm.core.prefixes.hits == 0  # the base's KV of the same ids is not the adapter's
        assert llm.submit(prompt, opts, adapter=a).result()[0].token_ids == alone["a"]
        assert llm.core.prefixes.hits == 1  # the adapter's own KV is
        assert llm.submit(prompt, opts, adapter=b).result()[0].token_ids == alone["b"]
        assert llm.core.prefixes.hits == 1
        together = [llm.submit(prompt, opts, adapter=h) for h in (None, a, b)]  # one step: no row copies another
        assert [r.result()[0].token_ids for r in together] == [alone["base"], alone["a"], alone["b"]]
    finally:
        llm.shutdown()


def test_explicit_prefixes_belong_to_their_adapter(setup):
    _, _, engine, handles = setup
    a = handles["attn-rslora"]
    prefix = engine.prefill(PROMPTS[2][:10], adapter=a)
    want = engine.generate(PROMPTS[2], adapter=a, max_new_tokens=NEW, ignore_eos=True).token_ids
    assert engine.generate(PROMPTS[2][10:], prefix=prefix, adapter=a, max_new_tokens=NEW,
                           ignore_eos=True).token_ids == want
    with pytest.raises(InvalidInput, match=r"computed with another LoRA adapter.*prefill\(\.\.\., adapter=\)"):
        engine.generate(PROMPTS[2][10:], prefix=prefix, max_new_tokens=2)


def test_runtime_adapter_equals_the_adapter_merged_at_export(setup, tmp_path):
    base, folders, engine, handles = setup
    for name, folder in folders.items():
        merged = Engine.load(export_model(str(base), tmp_path / name, adapter=folder), provider="cpu")
        for p in PROMPTS:
            assert engine.generate(p, adapter=handles[name], max_new_tokens=NEW, ignore_eos=True).token_ids == \
                merged.generate(p, max_new_tokens=NEW, ignore_eos=True).token_ids


@pytest.mark.parametrize("kind", ["float16", "int8", "int4"])
def test_lora_on_fp16_and_quantized_bases(setup, tmp_path, kind):
    """The LoRA path runs in the activation dtype over the base's own (fp16 / MatMulNBits) projections: slot 0
    is the plain export of that kind; an adapter's row is about as close to peft as the adapter merged into an
    export of that kind."""
    base, folders, _, _ = setup
    opts = {"dtype": "float16"} if kind == "float16" else {"quantize": kind}
    plain = Engine.load(export_model(str(base), tmp_path / "plain", **opts), provider="cpu")
    slots = Engine.load(export_model(str(base), tmp_path / "slots", lora_slots=1, max_lora_rank=6, **opts),
                        provider="cpu")
    np.testing.assert_array_equal(logits_of(slots, IDS), logits_of(plain, IDS))
    folder = folders["all-bias"]
    merged = Engine.load(export_model(str(base), tmp_path / "merged", adapter=folder, **opts), provider="cpu")
    ref = peft_run(base, folder, IDS)[0]
    merged_error = np.abs(logits_of(merged, IDS) - ref).max()
    got = logits_of(slots, IDS, slots.load_lora(folder))
    effect = np.abs(ref - peft_run(base, None, IDS)[0]).max()
    error = np.abs(got - ref).max()  # fp16 on the CPU also rounds the low-rank products' sums to fp16
    assert error <= 2 * merged_error + 0.005 * np.abs(ref).max() and error < effect / 2


def test_slots_are_reused_after_unload_and_refusals_name_the_remedy(setup, tmp_path):
    base, folders, engine, handles = setup
    with pytest.raises(ValueError, match=r"all 3 LoRA slots .* hold adapters .*unload one .*larger --lora-slots"):
        engine.load_lora(folders["all-bias"])
    gone = handles.pop("patterns")
    core = Core(engine.model, slots=2, max_length=64)
    running = engine.sequences([IDS], GenerationOptions(max_new_tokens=20, ignore_eos=True), adapter=gone)
    core.submit(running)
    core.step()  # admitted: its first token
    engine.unload(gone)
    core.step()
    assert running[0].finish_reason == "error" and "was unloaded while this request ran" in str(running[0].error)
    with pytest.raises(InvalidInput, match="was unloaded"):
        engine.generate(IDS, adapter=gone, max_new_tokens=2)
    again = engine.load_lora(folders["patterns"], name="patterns")
    assert again.slot == gone.slot and again.key != gone.key
    handles["patterns"] = again
    assert engine.generate(IDS, adapter=again, max_new_tokens=NEW, ignore_eos=True).token_ids == \
        peft_run(base, folders["patterns"], IDS)[1]

    plain = Engine.load(export_model(str(base), tmp_path / "plain"), provider="cpu")
    with pytest.raises(ValueError, match=r"exported without LoRA slots.*--lora-slots K --max-lora-rank R"):
        plain.load_lora(folders["all-bias"])
    r4 = Engine.load(export_model(str(base), tmp_path / "r4", lora_slots=1, max_lora_rank=4), provider="cpu")
    with pytest.raises(ValueError, match=r"rank 6, above this export's max_lora_rank 4; re-export .*--max-lora-rank 6"):
        r4.load_lora(folders["patterns"])
    refused = {
        "bias-all": (LoraConfig(r=2, target_modules=["c_attn"], bias="all"),
                     r"bias 'all' trains the base model's biases.*export BASE --adapter"),
        "dora": (LoraConfig(r=2, target_modules=["c_fc"], use_dora=True), r"DoRA \(use_dora\) is not supported"),
        "ia3": (IA3Config(target_modules=["c_attn"], feedforward_modules=[]),
                r"peft_type 'IA3' is not LoRA.*export BASE --adapter"),
    }
    for name, (config, match) in refused.items():
        save_adapter(base, config, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            r4.load_lora(tmp_path / name)
    assert not r4.loras  # refusals take no slot
    assert r4.load_lora(folders["all-bias"]).slot == 1


def test_manifest_records_the_slots_and_bad_export_options_are_refused(setup, tmp_path):
    base, _, engine, _ = setup
    assert (engine.config.lora_slots, engine.config.max_lora_rank) == (3, 6)
    manifest = json.loads((engine.folder / "manifest.json").read_text())
    assert (manifest["lora_slots"], manifest["max_lora_rank"]) == (3, 6)
    with pytest.raises(ValueError, match="max_lora_rank needs lora_slots"):
        export_model(str(base), tmp_path / "x", max_lora_rank=8)
    with pytest.raises(ValueError, match="lora_slots must be an integer >= 0"):
        export_model(str(base), tmp_path / "x", lora_slots=-1)
    assert Engine.load(export_model(str(base), tmp_path / "d", lora_slots=2), provider="cpu").config.max_lora_rank == 16


# ---- the serving surfaces: serve --lora, generate --lora, batch rows by model name ----------------------------

@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    """(checkpoint, {name: adapter folder}, an export with 2 LoRA slots via the CLI, a plain export)."""
    from test_cli import cli

    root = tmp_path_factory.mktemp("lora-surface")
    make_checkpoint(root / "hf", seed=9, **BASE)
    folders = {"tuned-a": root / "a", "tuned-b": root / "b"}
    save_adapter(root / "hf", copy.deepcopy(ADAPTERS["all-bias"]), folders["tuned-a"], seed=11)
    save_adapter(root / "hf", copy.deepcopy(ADAPTERS["patterns"]), folders["tuned-b"], seed=12)
    r = cli("export", root / "hf", "-o", root / "onnx", "--lora-slots", 2, "--max-lora-rank", 8)
    assert r.returncode == 0, r.stderr
    return root / "hf", folders, root / "onnx", export_model(str(root / "hf"), root / "plain")


def test_server_serves_lora_adapters_chosen_by_model_name(surface):
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from helpers import Server, post

    from gpt2_onnx.server import create_app
    from gpt2_onnx.server.options import ServeOptions

    _, folders, out, _ = surface
    engine = Engine.load(out, provider="cpu")
    served = ServeOptions(served_model_name="base", lora_adapters={k: str(v) for k, v in folders.items()},
                          max_batch=8).served(engine)
    key = {"authorization": "Bearer sekrit"}
    s = Server(create_app(served, api_key="sekrit"))
    try:
        assert [m["id"] for m in httpx.get(s.url + "/v1/models", headers=key).json()["data"]] == \
            ["base", "tuned-a", "tuned-b"]
        want = {name: engine.generate(p, adapter=served.loras.get(name), max_new_tokens=NEW, ignore_eos=True).text
                for name in ("base", "tuned-a", "tuned-b") for p in [IDS]}
        asks = [(name, {"prompt": IDS, "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "model": name})
                for name in want for _ in range(3)]
        with ThreadPoolExecutor(len(asks)) as pool:  # concurrent: rows of the three models decode together
            got = list(pool.map(lambda a: post(s.url, a[1], headers=key).json(), asks))
        for (name, _), g in zip(asks, got):
            assert g["model"] == name and g["choices"][0]["text"] == want[name]
        assert len(set(want.values())) == 3

        load = lambda body: httpx.post(s.url + "/v1/load_lora_adapter", json=body, headers=key)  # noqa: E731
        unload = lambda body: httpx.post(s.url + "/v1/unload_lora_adapter", json=body, headers=key)  # noqa: E731
        r = load({"lora_name": "again", "lora_path": str(folders["tuned-a"])})
        assert r.status_code == 400 and "all 2 LoRA slots" in r.json()["error"]["message"]
        assert unload({"lora_name": "tuned-a"}).status_code == 200
        assert post(s.url, asks[3][1], headers=key).status_code == 404  # tuned-a is gone
        assert unload({"lora_name": "tuned-a"}).status_code == 404
        assert load({"lora_name": "tuned-b", "lora_path": str(folders["tuned-a"])}).status_code == 400  # name taken
        assert load({"lora_name": "again", "lora_path": str(folders["tuned-a"])}).status_code == 200
        again = post(s.url, {**asks[3][1], "model": "again"}, headers=key).json()
        assert again["model"] == "again" and again["choices"][0]["text"] == want["tuned-a"]
    finally:
        s.stop()
    s = Server(create_app(Engine.load(out, provider="cpu")))  # without an API key: no loading over HTTP
    try:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(folders["tuned-a"])})
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_cli_generate_and_batch_with_lora(surface, tmp_path):
    from helpers import read_rows, write_rows
    from test_cli import cli

    from gpt2_onnx.batch import run

    _, folders, out, plain = surface
    engine = Engine.load(out, provider="cpu")
    handles = {name: engine.load_lora(folder) for name, folder in folders.items()}
    want = {name: engine.generate("ab", adapter=handles.get(name), max_new_tokens=NEW).text
            for name in (None, *folders)}
    assert len(set(want.values())) == 3
    for name, folder in folders.items():
        r = cli("generate", "ab", "-m", out, "--lora", folder, "--max-new-tokens", NEW, "--no-echo")
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n") == want[name]
    r = cli("generate", "ab", "-m", plain, "--lora", folders["tuned-a"], "--max-new-tokens", 2)
    assert r.returncode == 2 and "--lora-slots K --max-lora-rank R" in r.stderr and "Traceback" not in r.stderr

    rows = [{"id": i, "prompt": "ab", "max_tokens": NEW, "temperature": 0,
             **({"model": name} if name else {})} for i, name in enumerate((None, *folders))]
    rows.append({"id": "score", "context": "ab", "continuation": "c", "model": "tuned-a"})
    run(write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", model=str(out),
        loras={k: str(v) for k, v in folders.items()})
    got = read_rows(tmp_path / "out.jsonl")
    for i, name in enumerate((None, *folders)):
        assert got[str(i)]["body"]["choices"][0]["text"] == want[name]
    assert got['"score"']["status"] == 400 and "scored by the base model" in got['"score"']["body"]["error"]["message"]


def test_serve_options_refuse_a_name_served_twice(surface):
    from gpt2_onnx.server.options import ServeOptions

    _, folders, out, _ = surface
    with pytest.raises(ValueError, match="lora_adapters and prefix_adapters both serve the name 'x'"):
        ServeOptions.from_args({"lora_adapters": {"x": "a"}, "prefix_adapters": {"x": "b"}})
    with pytest.raises(ValueError, match="lora_adapters must map served names to folders"):
        ServeOptions.from_args({"lora_adapters": ["a"]})
    options = ServeOptions.from_args({"served_model_name": "base", "lora_adapters": {"base": str(folders["tuned-a"])}})
    with pytest.raises(ValueError, match="lora_adapters name 'base' is the served model's own id"):
        options.served(Engine.load(out, provider="cpu"))


def test_concurrent_loads_take_their_own_slots_and_a_step_never_sees_a_half_written_slot(surface, monkeypatch):
    import threading
    import time

    import gpt2_onnx.sync_engine as sync_engine

    base, folders, out, _ = surface
    engine = Engine.load(out, provider="cpu")
    read = sync_engine.read_lora_adapter

    def slow(*args):  # a slow disk: both loads read at once
        time.sleep(0.3)
        return read(*args)

    monkeypatch.setattr(sync_engine, "read_lora_adapter", slow)
    got = {}
    threads = [threading.Thread(target=lambda n=n: got.update({n: engine.load_lora(folders[n], name=n)}))
               for n in ("tuned-a", "tuned-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(h.slot for h in got.values()) == [1, 2] and sorted(a.name for a in engine.loras.values()) == \
        ["tuned-a", "tuned-b"]
    for name, handle in got.items():  # each slot holds its own adapter's weights
        assert engine.generate(IDS, adapter=handle, max_new_tokens=NEW, ignore_eos=True).token_ids == \
            peft_run(base, folders[name], IDS)[1]
    lock = engine.model.lora.lock
    with lock:  # a step in progress: unload waits for it
        t = threading.Thread(target=engine.unload, args=(got["tuned-a"],))
        t.start()
        t.join(0.3)
        assert t.is_alive() and got["tuned-a"].loaded
    t.join()
    assert not got["tuned-a"].loaded
    with pytest.raises(InvalidInput, match="unload takes a handle from load_lora"):
        engine.unload(None)


def test_unload_during_a_request_is_a_client_error_and_bad_configs_are_named(surface, tmp_path):
    import httpx
    from helpers import Server, post
    from test_cli import cli

    from gpt2_onnx.server import create_app

    _, folders, out, _ = surface
    engine = Engine.load(out, provider="cpu")
    handle = engine.load_lora(folders["tuned-a"])
    core = Core(engine.model, slots=2, max_length=64)
    running = engine.sequences([IDS], GenerationOptions(max_new_tokens=20, ignore_eos=True), adapter=handle)
    core.submit(running)
    core.step()
    engine.unload(handle)
    core.step()
    assert isinstance(running[0].error, InvalidInput) and running[0].error.param == "adapter"

    bad = tmp_path / "bad"
    shutil.copytree(folders["tuned-a"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "8"}))
    with pytest.raises(ValueError, match=r"lora_alpha must be numbers, got '8'"):
        engine.load_lora(bad)
    r = cli("generate", "hi", "-m", out, "--lora", bad, "-n", 2)
    assert r.returncode == 2 and "lora_alpha must be numbers" in r.stderr and "Traceback" not in r.stderr

    key = {"authorization": "Bearer k"}
    s = Server(create_app(Engine.load(out, provider="cpu"), api_key="k"))
    try:
        load = lambda name, path: httpx.post(s.url + "/v1/load_lora_adapter", headers=key,  # noqa: E731
                                             json={"lora_name": name, "lora_path": str(path)})
        assert load("x", bad).status_code == 400
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # the same name twice at once: one is served, the other refused
            codes = sorted(r.status_code for r in pool.map(lambda p: load("twice", p), folders.values()))
        assert codes == [200, 400]
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models", headers=key).json()["data"]]
        assert ids.count("twice") == 1
        ask = {"prompt": IDS, "max_tokens": 4, "model": "twice"}
        assert post(s.url, ask, headers=key).status_code == 200
        assert httpx.post(s.url + "/v1/unload_lora_adapter", headers=key, json={"lora_name": "twice"}).status_code == 200
        assert post(s.url, ask, headers=key).status_code == 404
    finally:
        s.stop()
