"""The forward pass: onnxruntime sessions over model.onnx and kv_copy.onnx, KV bound in place by address."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gpt2_onnx import config as C
from gpt2_onnx.errors import option_error
from gpt2_onnx.kv_cache import KVCache
from gpt2_onnx.lora import LoraStacks

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# GPT2_ONNX_PREPACKED=1: <export>/prepacked/<key>/, model.onnx as onnxruntime optimized it on this machine, its
# data file holding the weights and their prepacked copies, which onnxruntime then maps instead of keeping on the heap
PREPACKED = "prepacked"
PREPACKED_INFO = "prepacked.json"  # in each key folder: what the key was made of and the files' sizes
PREPACKED_KEEP = 2  # key folders kept per export (another machine's or onnxruntime's beside this one's)
log = logging.getLogger(__name__)


def resolve_provider(provider: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> a provider that is really available (no silent fallback)."""
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if provider not in PROVIDERS:
        raise option_error("provider", f"must be 'auto', 'cpu' or 'cuda', got {provider!r}")
    if PROVIDERS[provider] not in available:
        raise ValueError(
            f"provider {provider!r} asked for, but onnxruntime {ort.__version__} offers only {available}. "
            "For CUDA install the GPU build instead of the CPU one: "
            "pip uninstall -y onnxruntime && pip install 'gpt2-onnx[gpu]'"
        )
    return provider


def _check_file(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"{path} not found: the exported folder is incomplete; re-export with gpt2-onnx export")
    if C.is_lfs_pointer(path):
        raise ValueError(f"{path} is a Git LFS pointer, not the {what}: run `git lfs pull` or re-export")
    size = path.stat().st_size
    if expected and size != expected:
        raise ValueError(f"{path} has {size} bytes but the manifest says {expected}: the file is truncated "
                         "or was changed; copy it again or re-export")


def cpu_features() -> dict[str, str]:
    """The CPU's architecture, model and instruction-set flags: prepacked weight layouts depend on them."""
    info = {"machine": platform.machine(), "processor": platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():  # the first core's (Linux: "flags" on x86, "Features" on Arm)
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in info:
            info[key] = " ".join(sorted(value.split())) if key in ("flags", "Features") else value
    return info


def prepacked_key(folder: Path, cfg: C.ModelConfig) -> tuple[str, dict]:
    """(16 hex digits, the facts they hash): onnxruntime's version, the CPU, the export's weights digest,
    model.onnx's bytes and the identity of its data file (size, mtime, inode: a replaced file gets a new key)."""
    facts = {"onnxruntime": ort.__version__, **cpu_features(), "weights_digest": cfg.weights_digest,
             C.MODEL_NAME: hashlib.sha256((folder / C.MODEL_NAME).read_bytes()).hexdigest()}
    if cfg.external_data:
        st = (folder / cfg.external_data).stat()
        facts[cfg.external_data] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16], facts


def _prepacked_valid(folder: Path) -> bool:
    """A key folder whose files have the sizes its info file recorded when it was made."""
    try:
        sizes = json.loads((folder / PREPACKED_INFO).read_text())["bytes"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _session(path: Path, opts: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:
        raise ValueError(f"onnxruntime could not load {path}: {str(e).strip()[:500]}; re-export the model") from e


class Model:
    """model.onnx in an onnxruntime session over KV caches on the session's device.

    `run` feeds tokens (prefill or a chunk), `DecodeStep` one token per row with bindings reused,
    `copy_kv` moves rows between caches on the device (kv_copy.onnx). `transfers` counts the bytes
    that cross to host memory: logits of sampling rows only, never the KV pool.
    """

    def __init__(self, folder: str | Path, cfg: C.ModelConfig, *, provider: str = "auto", threads: int | None = None,
                 cuda_graph: bool = False):
        self.folder = folder = Path(folder)
        self.cfg = cfg
        self.provider = resolve_provider(provider)
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        path = folder / C.MODEL_NAME
        _check_file(path, cfg.onnx_bytes, "ONNX model")
        _check_file(folder / C.COPY_MODEL_NAME, cfg.kv_copy_bytes, "KV copy graph")
        if cfg.external_data:
            _check_file(folder / cfg.external_data, cfg.external_data_bytes, "ONNX weights")
        if threads is not None and threads < 1:
            raise option_error("threads", f"must be >= 1, got {threads}")
        self.threads = threads
        self._opts = opts = self.session_options()
        if cuda_graph and self.provider != "cuda":
            raise ValueError("cuda_graph=True needs provider='cuda'")
        # CPU: this machine's prepacked model (made on first load, mapped on later ones), or model.onnx
        load = self._prepacked(path) if self.provider == "cpu" else path
        try:
            self.session = _session(load, opts, [PROVIDERS[self.provider]])
        except ValueError:
            if load == path:
                raise
            log.warning("%s could not be loaded; loading %s", load, path)
            if not _prepacked_valid(load.parent):  # damaged: made again by the next load (a valid one may be
                shutil.rmtree(load.parent, ignore_errors=True)  # another process's, failing here for want of memory)
            self.session = _session(path, opts, [PROVIDERS[self.provider]])
        self.prepacked = load if load != path else None  # the prepacked model loaded, or None
        # decode steps replay captured CUDA graphs; they need their own session (static shapes only)
        self.step_session = (_session(path, opts, [(PROVIDERS["cuda"], {"enable_cuda_graph": "1"})]) if cuda_graph
                             else self.session)
        self.cuda_graph = cuda_graph
        self._graph_ids = 0
        self._copy_session: ort.InferenceSession | None = None
        # CPU caches copy rows with numpy; device caches with kv_copy.onnx on the device ("graph" also works on CPU)
        self.kv_copy_mode = "numpy" if self.device == "cpu" else "graph"
        self.transfers: Counter = Counter()  # bytes to host memory by kind ("logits"), row copies ("kv_rows")
        got = self.session.get_providers()
        if PROVIDERS[self.provider] not in got:
            raise ValueError(f"session for {path} runs on {got}, not {PROVIDERS[self.provider]}")
        self.kv_names = list(zip(cfg.past_names(), cfg.present_names()))  # (past, present) per KV buffer
        want = [C.INPUT_IDS, C.POSITION_IDS, C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH, C.LOGITS_INDEX,
                C.LOGITS_ROWS] + cfg.past_names() + ([C.LORA_SLOT, *cfg.lora_inputs()] if cfg.lora_slots else [])
        have = [i.name for i in self.session.get_inputs()]
        if sorted(have) != sorted(want):
            raise ValueError(f"{folder / C.MANIFEST_NAME} does not describe {path} (graph inputs {have}, expected "
                             f"{want}): the files come from different exports; re-export the model")
        self._check_graph(folder, path)
        # the stacked LoRA adapters of an export with lora_slots (Engine.load_lora writes them)
        self.lora = LoraStacks(cfg, self.device) if cfg.lora_slots else None

    def session_options(self) -> ort.SessionOptions:
        """Options of this model's sessions: every graph optimization, its threads, quiet logs."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        # Without this the CPU arena kept ~26 KB per decode step (124M shape: +12.9 MB over 500 steps,
        # 0.55 MB without it, same tok/s within noise): resident memory must stay flat.
        opts.enable_cpu_mem_arena = self.provider != "cpu"
        return opts

    def _prepacked(self, path: Path) -> Path:
        """With GPT2_ONNX_PREPACKED=1, this machine's prepacked model.onnx for the export, made if missing (a temp
        folder renamed into place: concurrent loads each make one and the first rename wins); else, or when the
        export's folder cannot be written, `path` itself (the weights are prepacked on the heap at each load).

        onnxruntime 1.32 still prepacks each weight at load and then swaps in the mapped copy, so a process's
        peak RSS grows by its largest weight twice over (124M shape, fp32: 870 MB against 584 MB) while its
        anonymous memory falls (74 MB against 529 MB): processes that load one export share the packed weights
        in the page cache (two processes: 329 MB PSS each against 553 MB). Hence off by default."""
        switch = os.environ.get("GPT2_ONNX_PREPACKED", "0")
        if switch not in ("0", "1"):
            raise ValueError(f"GPT2_ONNX_PREPACKED must be 0 (prepack the weights in memory at each load, the default) "
                             f"or 1 (map this machine's prepacked weights from a file beside the export), got {switch!r}")
        if switch == "0":
            return path
        key, facts = prepacked_key(self.folder, self.cfg)
        root = self.folder / PREPACKED
        dst = root / key
        if _prepacked_valid(dst):
            return dst / C.MODEL_NAME
        try:
            root.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        except OSError as e:
            log.info("%s cannot be written (%s): weights are prepacked in memory at each load", self.folder,
                     e.strerror)
            return path
        try:
            if dst.exists() and not _prepacked_valid(dst):  # a damaged one (sizes not as recorded): made again
                shutil.rmtree(dst, ignore_errors=True)  # (not one another load has just renamed into place)
            opts = self.session_options()
            opts.optimized_model_filepath = str(tmp / C.MODEL_NAME)
            data = C.MODEL_NAME + ".data"
            for k, v in (("session.optimized_model_external_initializers_file_name", data),
                         ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                         ("session.save_external_prepacked_constant_initializers", "1")):
                opts.add_session_config_entry(k, v)
            ort.InferenceSession(str(path), opts, providers=[PROVIDERS["cpu"]])  # writes the model, then is dropped
            sizes = {n: (tmp / n).stat().st_size for n in (C.MODEL_NAME, data) if (tmp / n).exists()}
            (tmp / PREPACKED_INFO).write_text(json.dumps({**facts, "bytes": sizes}, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from other users of a shared export
            os.rename(tmp, dst)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _prepacked_valid(dst):  # not another load's
                log.info("no prepacked model for %s (%s): weights are prepacked in memory", self.folder, e)
                return path
        except Exception as e:  # onnxruntime's own: loading model.onnx itself reports it
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("no prepacked model for %s (%s)", self.folder, str(e).strip()[:200])
            return path
        self._prune_prepacked(root, key)
        return dst / C.MODEL_NAME

    @staticmethod
    def _prune_prepacked(root: Path, key: str) -> None:
        """Keep the newest PREPACKED_KEEP key folders (`key` among them) and no temp folder older than an hour
        (a killed load's)."""
        try:
            folders = sorted(((f.stat().st_mtime, f) for f in root.iterdir() if f.is_dir()), reverse=True)
        except OSError:  # a folder removed meanwhile by another load: the next load prunes
            return
        keys = [f for _, f in folders if not f.name.startswith(".") and f.name != key]
        old = keys[PREPACKED_KEEP - 1:] + [f for t, f in folders if f.name.startswith(".tmp-") and time.time() - t > 3600]
        for f in old:
            shutil.rmtree(f, ignore_errors=True)

    def _check_graph(self, folder: Path, path: Path) -> None:
        """The manifest must describe this graph: its KV and logits shapes and the facts in its metadata."""
        cfg, graph = self.cfg, {}
        past = {i.name: i.shape for i in self.session.get_inputs()}[C.PAST_KEY.format(i=0)]  # (B, nh, T, hs)
        logits = {o.name: o.shape for o in self.session.get_outputs()}[C.LOGITS]  # (R, K, V)
        graph.update(n_head=past[1], kv_head_size=past[3], vocab_size=logits[2])
        shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        graph.update({f"{n} shape": shapes[n] for n in cfg.lora_inputs()})
        facts = {**cfg.graph_facts(), **{f"{n} shape": str(s) for n, s in cfg.lora_inputs().items()}}
        graph.update(self.session.get_modelmeta().custom_metadata_map)
        wrong = [f"{k} {v} in the manifest, {graph.get(k)} in the graph" for k, v in facts.items()
                 if str(graph.get(k)) != v]
        if wrong:
            raise ValueError(f"{folder / C.MANIFEST_NAME} does not describe {path} ({'; '.join(wrong)}): the files "
                             "come from different exports; re-export the model with gpt2-onnx export")

    def new_cache(self, rows: int, max_length: int) -> KVCache:
        """An empty KV cache of `rows` sequences on this model's device."""
        return KVCache(self.cfg, rows, max_length, device=self.device)

    def bind_kv(self, io: ort.IOBinding, cache: KVCache, start: int, count: int) -> None:
        """Bind rows [start, start + count) of cache as past and present (the same memory: in place)."""
        shape = [count, *cache.shape[1:]]
        for j, (name_in, name_out) in enumerate(self.kv_names):
            address = cache.address(j, start)
            io.bind_input(name_in, self.device, 0, cache.dtype, shape, address)
            io.bind_output(name_out, self.device, 0, cache.dtype, shape, address)

    def bind_lora(self, io: ort.IOBinding, B: int, lora: np.ndarray | None, inputs: set[str] | None = None) -> None:
        """Bind each row's LoRA slot (B,) and the adapter stacks (those among a graph's `inputs`, default all);
        nothing on an export without slots."""
        if self.lora is None:
            if lora is not None and np.any(lora):
                raise ValueError("this export has no LoRA slots")
            return
        io.bind_cpu_input(C.LORA_SLOT, np.zeros(B, np.int64) if lora is None else np.asarray(lora, np.int64))
        self.lora.bind(io, inputs)

    def run(self, cache: KVCache, input_ids: np.ndarray, n_new: np.ndarray, logits_index: np.ndarray, *,
            start: int = 0, logits_rows: np.ndarray | None = None,
            lora: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run tokens through rows [start, start + B) of cache, appending their KV.

        input_ids (B, S) holds n_new[b] real tokens per row, right-padded. Either those rows are empty
        (a prefill of ragged rows), or S == 1, or B == 1 (a chunk after cached tokens: GroupQueryAttention's
        rule). logits_index (B, K) names the positions (0..S-1) wanted; logits_rows (R,) the rows whose
        logits come back (default: all); lora (B,) each row's LoRA slot (default 0: none). Returns
        (greedy ids (B, K), logits (R, K, V) float32).
        """
        B, S = input_ids.shape
        past = cache.lengths[start : start + B]
        if B != len(past) or not 0 <= start:
            raise ValueError(f"rows {start}..{start + B - 1} are outside the KV cache of {cache.rows} rows")
        if S > 1 and past.any() and B > 1:
            raise ValueError("a multi-token chunk after cached tokens needs a batch of one row")
        total = past + n_new
        if int(total.max()) > cache.max_length:
            raise ValueError(f"{int(total.max())} tokens do not fit the KV cache of {cache.max_length}")
        rows = np.arange(B, dtype=np.int64) if logits_rows is None else np.asarray(logits_rows, dtype=np.int64)
        position_ids = np.minimum(past[:, None] + np.arange(S), self.cfg.n_positions - 1)  # (B, S)
        io = self.session.io_binding()
        io.bind_cpu_input(C.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(C.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        io.bind_cpu_input(C.SEQLENS_K, (total - 1).astype(np.int32))
        # empty rows: GQA wants total == S (first prompt); otherwise the longest row's total
        tsl = S if not past.any() else int(total.max())
        io.bind_cpu_input(C.TOTAL_SEQUENCE_LENGTH, np.array(tsl, dtype=np.int32))
        io.bind_cpu_input(C.LOGITS_INDEX, np.ascontiguousarray(logits_index, dtype=np.int64))
        io.bind_cpu_input(C.LOGITS_ROWS, rows)
        io.bind_output(C.NEXT_TOKEN, "cpu")
        io.bind_output(C.LOGITS, "cpu")
        self.bind_kv(io, cache, start, B)
        self.bind_lora(io, B, lora)
        self.session.run_with_iobinding(io)
        next_ids, logits = (v.numpy() for v in io.get_outputs()[:2])
        cache.lengths[start : start + B] = total
        self.transfers["logits"] += logits.nbytes
        return next_ids, logits

    def forward(self, input_ids: np.ndarray, n_new: np.ndarray, cache: KVCache,
                logits_index: np.ndarray) -> np.ndarray:
        """`run` on rows 0..B-1 returning only the logits (B, K, V): for scoring and tests."""
        return self.run(cache, input_ids, n_new, logits_index)[1]

    def run_embeds(self, cache: KVCache, embeds: np.ndarray) -> None:
        """Run input embeddings (B, T, n_embd) (a prompt-tuning adapter's virtual tokens) into the empty rows
        0..B-1 of cache at positions 0..T-1, as tokens would be: their KV, through embeds.onnx."""
        B, T, E = embeds.shape
        if E != self.cfg.n_embd or not 1 <= T <= cache.max_length or B > cache.rows or cache.lengths[:B].any():
            raise ValueError(f"input embeddings {embeds.shape} need n_embd {self.cfg.n_embd}, 1..{cache.max_length} "
                             f"positions and {B} empty rows of the KV cache ({cache.rows} rows)")
        session = self._open_embeds()  # for this run only: loading adapters leaves memory as it was
        io = session.io_binding()
        io.bind_cpu_input(C.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=self.cfg.np_dtype))
        io.bind_cpu_input(C.POSITION_IDS, np.tile(np.arange(T, dtype=np.int64), (B, 1)))  # (B, T)
        io.bind_cpu_input(C.SEQLENS_K, np.full(B, T - 1, np.int32))
        io.bind_cpu_input(C.TOTAL_SEQUENCE_LENGTH, np.array(T, dtype=np.int32))
        self.bind_kv(io, cache, 0, B)
        # an export with LoRA slots: the virtual tokens run on slot 0 (no adapter); embeds.onnx lacks the last MLP's
        self.bind_lora(io, B, None, inputs={i.name for i in session.get_inputs()})
        session.run_with_iobinding(io)
        cache.lengths[:B] = T

    def _open_embeds(self) -> ort.InferenceSession:
        """embeds.onnx's session, for one run: prepacking off, so it reads the weights where the data file is
        mapped and opens in a fraction of the time (124M shape: 0.05 s, against 0.7 s and 290 MB of prepacked
        copies with it; one 20-token pass 0.2 s against 0.1 s). Plain use never opens it."""
        path = self.folder / C.EMBEDS_MODEL_NAME
        _check_file(path, self.cfg.embeds_bytes, "embeddings graph")
        opts = self.session_options()
        opts.add_session_config_entry("session.disable_prepacking", "1")
        session = _session(path, opts, [PROVIDERS[self.provider]])
        digest = session.get_modelmeta().custom_metadata_map.get("weights_digest")
        if digest != self.cfg.weights_digest:
            raise ValueError(f"{path} belongs to another export (weights {digest}, the manifest's "
                             f"{self.cfg.weights_digest}); re-export the model with gpt2-onnx export")
        return session

    def copy_kv(self, src: KVCache, src_row: int, dst: KVCache, dst_row: int, length: int, start: int = 0) -> None:
        """dst row <- the first `length` positions of src row, on the device (no trip through host memory).
        `start`: dst already holds src's first `start` positions (a beam forked from a common ancestor); on
        the CPU only the rest is copied."""
        if not 0 <= length <= min(src.lengths[src_row], dst.max_length):
            raise ValueError(f"cannot copy {length} positions from a row of {src.lengths[src_row]} into a cache of "
                             f"{dst.max_length}")
        self.transfers["kv_rows"] += 1
        if length and self.kv_copy_mode == "numpy":
            for a, b in zip(src._host, dst._host):
                b[dst_row, :, start:length] = a[src_row, :, start:length]  # (nh, length - start, hs)
        elif length:
            self._copy_graph(src, src_row, dst, dst_row, length)
        dst.lengths[dst_row] = length

    def _copy_graph(self, src: KVCache, src_row: int, dst: KVCache, dst_row: int, length: int) -> None:
        if self._copy_session is None:
            self._copy_session = ort.InferenceSession(str(self.folder / C.COPY_MODEL_NAME), self._opts,
                                                      providers=[PROVIDERS[self.provider]])
        io = self._copy_session.io_binding()
        io.bind_cpu_input(C.COPY_LENGTH, np.array([length], np.int64))
        io.bind_cpu_input(C.COPY_PADS, np.array([0, 0, 0, 0, 0, 0, dst.max_length - length, 0], np.int64))
        for j in range(len(src.values)):
            io.bind_input(C.COPY_SRC.format(j=j), self.device, 0, src.dtype, [1, *src.shape[1:]],
                          src.address(j, src_row))
            io.bind_output(C.COPY_DST.format(j=j), self.device, 0, dst.dtype, [1, *dst.shape[1:]],
                           dst.address(j, dst_row))
        self._copy_session.run_with_iobinding(io)


class DecodeStep:
    """One token for each of rows 0..B-1 of a KV cache, with every input and output bound to fixed buffers.

    A step writes the new ids and lengths into small buffers (on the device for CUDA), runs, and reads
    back the greedy ids (B int64) plus the logits of the rows that sample (R x vocab), nothing else.
    GroupQueryAttention reads each row's length from `seqlens_k`; `total_sequence_length` is the
    longest row's (attention spans no more), or with cuda_graph the buffer length, so that each
    (B, R) has constant inputs and addresses and one captured graph per (B, R) is replayed.
    Bindings are kept per (B, R).
    """

    def __init__(self, model: Model, cache: KVCache, *, device_buffers: bool | None = None):
        """device_buffers: keep ids, lengths and outputs in OrtValues as on CUDA (default: on devices other
        than the CPU; True on the CPU runs the device path there)."""
        if cache.max_length < 2:
            raise ValueError("a decode step needs a KV buffer of at least 2 positions")
        self.model, self.cache = model, cache
        n, V = cache.rows, model.cfg.vocab_size
        self.host = {"ids": np.zeros((n, 1), np.int64), "pos": np.zeros((n, 1), np.int64),
                     "seqlens": np.zeros(n, np.int32), "rows": np.zeros(n, np.int64)}
        if model.lora is not None:  # each row's LoRA slot
            self.host["lora"] = np.zeros(n, np.int64)
        self.next = np.zeros((n, 1), np.int64)
        self.logits = np.zeros((n, 1, V), np.float32)
        self.index = np.zeros((n, 1), np.int64)  # logits at position 0 of the one new token
        if not (model.device != "cpu" if device_buffers is None else device_buffers):  # numpy buffers, bound directly
            self.dev = None
            self.addr = {k: a.ctypes.data for k, a in {**self.host, "next": self.next, "logits": self.logits,
                                                        "index": self.index}.items()}
        else:
            self.dev = {k: ort.OrtValue.ortvalue_from_numpy(a, model.device, 0)
                        for k, a in {**self.host, "next": self.next, "index": self.index}.items()}
            self.addr = {k: v.data_ptr() for k, v in self.dev.items()}
        self.total_host = np.array(cache.max_length, np.int32)  # a CPU input of GQA
        self.total = ort.OrtValue.ortvalue_from_numpy(self.total_host)
        self._bindings: dict[tuple[int, int], tuple] = {}
        self._logits_out: dict[int, ort.OrtValue] = {}

    def _binding(self, B: int, R: int) -> tuple:
        m, dev = self.model, self.model.device
        io = m.step_session.io_binding()
        for name, key, dtype, shape in [(C.INPUT_IDS, "ids", np.int64, [B, 1]), (C.POSITION_IDS, "pos", np.int64, [B, 1]),
                                        (C.SEQLENS_K, "seqlens", np.int32, [B]), (C.LOGITS_INDEX, "index", np.int64, [B, 1]),
                                        (C.LOGITS_ROWS, "rows", np.int64, [R])]:
            io.bind_input(name, dev, 0, dtype, shape, self.addr[key])
        io.bind_ortvalue_input(C.TOTAL_SEQUENCE_LENGTH, self.total)
        io.bind_output(C.NEXT_TOKEN, dev, 0, np.int64, [B, 1], self.addr["next"])
        out = None
        if self.dev is None:
            io.bind_output(C.LOGITS, dev, 0, np.float32, [R, 1, m.cfg.vocab_size], self.addr["logits"])
        elif m.cuda_graph:  # graphs need fixed device buffers: one of exactly R rows per R, shared by every B
            if R not in self._logits_out:
                self._logits_out[R] = ort.OrtValue.ortvalue_from_shape_and_type([R, 1, m.cfg.vocab_size], np.float32,
                                                                               dev, 0)
            out = self._logits_out[R]
            io.bind_ortvalue_output(C.LOGITS, out)
        else:  # onnxruntime copies the R sampling rows' logits to host memory, nothing more
            io.bind_output(C.LOGITS, "cpu")
        m.bind_kv(io, self.cache, 0, B)
        if m.lora is not None:  # the adapter stacks by address, as the KV: load_lora writes them in place
            io.bind_input(C.LORA_SLOT, dev, 0, np.int64, [B], self.addr["lora"])
            m.lora.bind(io)
        opts = None  # (RunOptions without an entry cost ~0.8 ms a run in onnxruntime 1.32's Python layer)
        if m.cuda_graph:  # one captured graph per set of shapes and addresses
            m._graph_ids += 1
            opts = ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(m._graph_ids))
        return io, opts, out

    def __call__(self, tokens: np.ndarray, logits_rows: np.ndarray, hold: np.ndarray | None = None,
                 lora: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token to each of rows 0..B-1; returns (greedy next ids (B,), logits (R, V) of logits_rows).
        `lora` (B,): each row's LoRA slot (an export with lora_slots; default 0, none).

        Rows where `hold` (B,) is true do not advance: their token is written at the same position
        again by the next step that feeds it, so holding a row changes none of its results. The logits
        array is reused by the next call.
        """
        B, R = len(tokens), len(logits_rows)
        lengths = self.cache.lengths[:B]
        if int(lengths.max()) + 1 > self.cache.max_length:
            raise ValueError(f"{int(lengths.max()) + 1} tokens do not fit the KV cache of {self.cache.max_length}")
        h = self.host
        h["ids"][:B, 0] = tokens
        h["pos"][:B, 0] = np.minimum(lengths, self.model.cfg.n_positions - 1)
        h["seqlens"][:B] = lengths  # total after this step - 1
        h["rows"][:R] = logits_rows
        if "lora" in h:
            h["lora"][:B] = 0 if lora is None else lora
        elif lora is not None and np.any(lora):
            raise ValueError("this export has no LoRA slots")
        if (B, R) not in self._bindings:
            self._bindings[(B, R)] = self._binding(B, R)
        io, opts, out = self._bindings[(B, R)]
        if not self.model.cuda_graph:  # attention spans the longest row, not the whole buffer
            self.total_host[()] = int(lengths.max()) + 1
            self.total.update_inplace(self.total_host)
        if self.dev is not None:  # a few bytes per row to the device
            for k in h:
                self.dev[k].update_inplace(h[k])
        self.model.step_session.run_with_iobinding(io, opts)
        self.cache.lengths[:B] += 1 if hold is None else ~hold
        if self.dev is None:
            next_ids, logits = self.next[:B, 0].copy(), self.logits[:R, 0]
        else:
            next_ids = self.dev["next"].numpy()[:B, 0]
            logits = (out if out is not None else io.get_outputs()[1]).numpy()[:, 0]
        self.model.transfers["logits"] += logits.nbytes
        return next_ids, logits
