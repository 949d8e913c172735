"""The one generation core: per-sequence state and one batched step over a KV slot pool.

`Engine.generate`, `stream`, `generate_batch`, `Generator` and the HTTP server all drive `Core.step`;
there is no other decode loop. Each running sequence owns one row of a KV pool on the session's
device. Rows stay packed at the front of the pool: a step prefills the sequences that join (into
the next free rows, reusing cached prefixes), decodes one token for every row that was already
running, then closes the gaps left by rows that finished (`Model.copy_kv`, on the device), so a
step costs what its live rows cost.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from gpt2_onnx.kv_cache import KVCache
from gpt2_onnx.model import DecodeStep, Model
from gpt2_onnx.sampling import SamplingParams, choose, log_softmax
from gpt2_onnx.tokenizer import TextStream, Tokenizer

DEFER_MIN = 32  # a sequence waits one step when an admitted one shares this many more tokens than the cache has
MAX_PREFILL_TOKENS = 4096  # prompt tokens (not counting cached ones) prefilled in one step
PAD_WASTE = 1.5  # prompts are prefilled together while padding makes at most 1.5x their real tokens
BLOCK = 16  # tokens per block of the prefix cache's index


@dataclass(frozen=True)
class Step:
    """One generated token of one sequence, with the text it completes (valid UTF-8, maybe '')."""

    row: int  # the sequence's index in its call or request (prompt p, sample i: p * n + i)
    index: int  # 0-based position among the sequence's new tokens (-1 for a failure before any token)
    token_id: int
    text: str
    finish_reason: str | None  # set on the sequence's last step: "length" | "eos" | "stop" | "error" | "cancelled"
    time: float  # seconds since the sequence was submitted
    logprob: float | None = None  # log p(token) under the model, when logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # the `logprobs` most likely (id, log p), best first
    error: Exception | None = None  # with finish_reason "error"


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How to generate; the one options type of the library, the Generator loop and the server.

    max_new_tokens: tokens to generate at most. temperature 0 (or < 1e-5) is greedy; > 0 samples with
    top_k (0 = off), top_p (1 = off), repetition_penalty (1 = off) and seed. stop: strings that end a
    sequence (the stop text is not returned). ignore_eos: keep going past <|endoftext|>. logprobs:
    None = off, 0 = log p of each new token, N = also the N most likely tokens there; prompt_logprobs:
    the same for the prompt's tokens (the first has none). Log-probabilities are log_softmax of the
    model's fp32 logits, before temperature and filters. n: samples per prompt (one prefill).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        stop = self.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else None
        if stop is None:
            stops = ()
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        object.__setattr__(self, "stop", stops)
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {m!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise ValueError(f"{name} must be None (off), 0 (the token's own) or N > 0 (also the N most likely "
                                 f"tokens), got {v!r}")
        self.sampling.validate()

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


class StopText:
    """Holds back text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.buf += delta
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Sequence:
    """One sequence being generated: context ids, new tokens, RNG, text and stop holder, finish rule,
    logprobs and outcome. Seeded sequences draw from numpy's default_rng([seed, row])."""

    def __init__(self, context: list[int], options: GenerationOptions, *, row: int, eos_token_id: int | None,
                 tokenizer: Tokenizer | None = None, on_step: Callable[[Step], None] | None = None, virtual: int = 0):
        self.context, self.options, self.row = context, options, row
        self.virtual = virtual  # leading virtual tokens (a prefix-tuning adapter): no text, no repetition penalty
        self.eos_token_id = None if options.ignore_eos else eos_token_id
        self.sampling = options.sampling
        self.rng = np.random.default_rng(None if options.seed is None else [options.seed, row])
        self.stream = TextStream(tokenizer, context[virtual:][-5:]) if tokenizer is not None else None
        self.stop = StopText(options.stop)
        self.on_step = on_step
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.prompt_logprobs: list[float | None] = []  # with prompt_logprobs: one per context token, the first None
        self.prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        # plain greedy needs no logits on the host: the graph's argmax output is enough
        self.needs_logits = (not self.sampling.greedy or self.sampling.repetition_penalty != 1.0
                             or options.logprobs is not None)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choose(self, greedy_id: int, logits: np.ndarray | None) -> int:
        """The next token: the graph's argmax, or a choice from this row's logits (V,)."""
        if logits is None:
            return int(greedy_id)
        seen = (np.array(self.context[self.virtual:] + self.tokens, np.int64)
                if self.sampling.repetition_penalty != 1.0 else None)
        tok = choose(logits, self.sampling, self.rng, seen)
        if self.options.logprobs is not None:  # under the model's own distribution, before sampling filters
            lp = log_softmax(logits)
            self.logprobs.append(float(lp[tok]))
            self.top_logprobs.append(top_n(lp, self.options.logprobs))
        return tok

    def score_prompt(self, logits: np.ndarray, skip: int = 0) -> None:
        """Prompt logprobs from the logits (S - skip, V) of the context positions after the first skip; those
        first skip tokens (and the one after them, which no run here predicts) get none."""
        n, ids = self.options.prompt_logprobs, self.context
        self.prompt_logprobs, self.prompt_top_logprobs = [None] * (skip + 1), [None] * (skip + 1)
        for at in range(0, len(ids) - skip - 1, 64):  # (64, V) at a time: float64 log_softmax of long prompts is big
            lp = log_softmax(logits[at : min(at + 64, len(ids) - skip - 1)])
            for k, row in enumerate(lp):
                self.prompt_logprobs.append(float(row[ids[skip + at + k + 1]]))
                self.prompt_top_logprobs.append(top_n(row, n))

    def push(self, tok: int) -> Step:
        """Append a token and apply the finish rule: a stop string, then eos, then max_new_tokens."""
        self.tokens.append(tok)
        delta, hit = "", False
        if self.stream is not None:
            delta, hit = self.stop.push(self.stream.push(tok))
        if hit:
            self.finish_reason = "stop"
        elif tok == self.eos_token_id:
            self.finish_reason = "eos"
        elif len(self.tokens) >= self.options.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason in ("eos", "length") and self.stream is not None:  # text held back until now
            tail, hit = self.stop.push(self.stream.flush())
            delta += tail if hit else tail + self.stop.flush()
            self.finish_reason = "stop" if hit else self.finish_reason
        now = time.perf_counter()
        self.t_first = self.t_first or now
        on = self.options.logprobs is not None
        return Step(self.row, len(self.tokens) - 1, tok, delta, self.finish_reason, now - self.t_submit,
                    self.logprobs[-1] if on else None, self.top_logprobs[-1] if on else None)

    def end(self, reason: str, error: Exception | None = None) -> Step:
        """Finish without a token (failure, cancellation, or max_new_tokens 0)."""
        self.finish_reason, self.error = reason, error
        return Step(self.row, len(self.tokens) - 1, -1, "", reason, time.perf_counter() - self.t_submit, error=error)


@dataclass(eq=False)
class Prefix:
    """Token ids and their KV (a one-row cache), reusable by sequences whose context starts with them.

    `model` is the weights digest of the model that computed it (another model refuses it). A
    prefix-tuning adapter's prefix has `virtual` leading tokens with no real ids: they get ids below
    zero, unique in the process, so they match only themselves.
    """

    token_ids: tuple[int, ...]
    cache: KVCache
    last_logits: np.ndarray | None = None  # (V,) logits after the last token, when computed by Engine.prefill
    model: str = ""
    virtual: int = 0
    name: str = ""
    ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = np.array(self.token_ids, np.int64)


_virtual_next = [-1]


def virtual_ids(n: int) -> tuple[int, ...]:
    """n placeholder ids (< 0) for virtual tokens, never handed out twice in this process."""
    start = _virtual_next[0]
    _virtual_next[0] -= n
    return tuple(range(start, start - n, -1))


def top_n(lp: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, log p) of one row of log-probabilities, best first."""
    if not n:
        return ()
    ids = np.argpartition(-lp, n - 1)[:n] if n < len(lp) else np.arange(len(lp))
    ids = ids[np.argsort(-lp[ids], kind="stable")]
    return tuple((int(i), float(lp[i])) for i in ids)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    k = min(len(a), len(b))
    eq = a[:k] == b[:k]
    return k if eq.all() else int(eq.argmin())


def block_hashes(ids: Seq[int]) -> list[int]:
    """Chained hashes of the full BLOCK-token blocks of ids: h[k] stands for ids[: (k + 1) * BLOCK]."""
    out, h = [], 0
    for k in range(len(ids) // BLOCK):
        h = hash((h, tuple(ids[k * BLOCK : (k + 1) * BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    """KV of recent contexts, matched on token ids (longest common prefix), LRU within a byte budget.

    Entries are indexed by the chained hashes of their BLOCK-token blocks, so matching walks the
    query's blocks instead of every entry; of the entries sharing the deepest block, the 8 newest are
    compared (any other there shares fewer than BLOCK more tokens). Contexts shorter than a block are
    not kept.
    Pinned prefixes (an explicit `prefix=` of a call) match at any length and are never evicted.
    """

    def __init__(self, model: Model, max_bytes: int = 0, pinned: Seq[Prefix] = ()):
        self.model, self.max_bytes = model, max_bytes
        cfg = model.cfg
        self.token_bytes = 2 * cfg.n_layer * cfg.n_head * cfg.kv_head_size * np.dtype(cfg.np_dtype).itemsize
        self.entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()  # least recently used first
        self.index: dict[int, dict[tuple[int, ...], None]] = {}  # block hash -> entries starting with those blocks
        self.ends: dict[int, set[tuple[int, ...]]] = {}  # last full block's hash -> entries ending in that block
        self.pinned = list(pinned)
        self.nbytes = 0  # kept up to date here, so another thread may read it at any time
        self.hits = self.misses = 0
        self.hit_tokens = 0

    def match(self, ids: np.ndarray) -> tuple[int, Prefix | None]:
        """(tokens reusable, entry) for a context. At most len(ids) - 1, so one token is left to run,
        unless a pinned prefix is the whole context and knows its last logits."""
        n, best, entry = len(ids), 0, None
        for p in self.pinned:
            m = common_prefix(p.ids, ids)
            if m == len(p.ids) == n and p.last_logits is not None:
                return n, p
            if min(m, n - 1) > best:
                best, entry = min(m, n - 1), p
        for h in reversed(block_hashes(ids)):
            bucket = self.index.get(h)
            if bucket:
                for key in list(bucket)[-8:]:  # the newest entries sharing the deepest block
                    m = min(common_prefix(self.entries[key].ids, ids), n - 1)
                    if m > best:
                        best, entry = m, self.entries[key]
                if entry is not None and entry.token_ids in self.entries:
                    self.entries.move_to_end(entry.token_ids)
                break
        return best, entry

    def insert(self, ids: list[int], pool: KVCache, row: int) -> None:
        """Keep the KV of a context that was just computed in `row` of pool (a copy on the device)."""
        key = tuple(ids)
        if not self.max_bytes or len(ids) < BLOCK or len(ids) * self.token_bytes > self.max_bytes:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        arr, hashes = np.array(ids, np.int64), block_hashes(ids)
        for other in list(self.index.get(hashes[-1], {}))[-8:]:  # a longer entry covers it already
            if common_prefix(self.entries[other].ids, arr) == len(ids):
                self.entries.move_to_end(other)
                return
        for h in hashes:  # entries that this context extends are replaced by it
            for other in list(self.ends.get(h, ())):
                if len(other) <= len(ids) and common_prefix(self.entries[other].ids, arr) == len(other):
                    self._drop(other)
        cache = self.model.new_cache(1, len(ids))
        self.model.copy_kv(pool, row, cache, 0, len(ids))
        entry = Prefix(key, cache)
        self.entries[key] = entry
        for h in hashes:
            self.index.setdefault(h, {})[key] = None
        self.ends.setdefault(hashes[-1], set()).add(key)
        self.nbytes += cache.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        hashes = block_hashes(key)
        for h in hashes:
            bucket = self.index[h]
            del bucket[key]
            if not bucket:
                del self.index[h]
        self.ends[hashes[-1]].discard(key)
        if not self.ends[hashes[-1]]:
            del self.ends[hashes[-1]]
        self.nbytes -= entry.cache.nbytes


class Core:
    """Continuous batching of Sequences over a pool of KV rows on the model's device.

    submit() and cancel() may be called from any thread; step() from one thread at a time. Sequences
    join at step boundaries and leave when they finish, fail, or are cancelled (their rows are free
    after that step). A failure of one sequence (numerics, tokenizer, its on_step callback) ends it
    alone; a failure of the model run ends the sequences in that run.
    """

    def __init__(self, model: Model, *, slots: int, max_length: int, prefix_cache_bytes: int = 0,
                 pinned: Seq[Prefix] = ()):
        self.model = model
        self.pool = model.new_cache(slots, max_length)
        self.decoder = DecodeStep(model, self.pool) if max_length > 1 else None
        self.prefixes = PrefixCache(model, prefix_cache_bytes, pinned)
        self.running: list[Sequence] = []  # running[i] owns pool row i
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Lock()
        self.steps = 0  # steps that ran the model

    @property
    def slots(self) -> int:
        return self.pool.rows

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences (they start at the next step). ValueError if one can never fit the pool."""
        for s in seqs:
            if len(s.context) + s.options.max_new_tokens > self.pool.max_length:
                raise ValueError(f"context of {len(s.context)} tokens + max_new_tokens {s.options.max_new_tokens} "
                                 f"does not fit this pool's {self.pool.max_length} positions")
            if s.virtual and not any(p.token_ids == tuple(s.context[: s.virtual]) for p in self.prefixes.pinned):
                raise ValueError("a sequence after a prefix-tuning prefix needs that prefix pinned in the core")
        with self.lock:
            self.waiting.extend(seqs)

    def cancel(self, seqs: Seq[Sequence]) -> None:
        """Stop these sequences: waiting ones leave the queue now, running ones free their rows within one step."""
        with self.lock:
            for s in seqs:
                s.cancelled = True
            gone = {id(s) for s in seqs}
            ended = [s for s in self.waiting if id(s) in gone and not s.done]
            if ended:
                kept = [s for s in self.waiting if id(s) not in gone]
                self.waiting.clear()
                self.waiting.extend(kept)
        for s in ended:  # they never ran: tell their owners here, in the caller's thread
            step = s.end("cancelled")
            if s.on_step is not None:
                try:
                    s.on_step(step)
                except Exception:
                    pass

    def step(self) -> list[Step]:
        """Admit waiting sequences (prefill), decode one token for the others, release finished rows."""
        events: list[Step] = []
        for s in self.running:
            if s.cancelled and not s.done:
                self._emit(s, s.end("cancelled"), events)
        self._release()
        before = len(self.running)
        ran = self._admit(events)
        if before:
            self._decode(before, events)
            ran = True
        self.steps += ran
        self._release()
        return events

    # ---- internals ----------------------------------------------------------------------------
    def _emit(self, seq: Sequence, step: Step, events: list[Step]) -> None:
        events.append(step)
        if seq.on_step is not None:
            try:
                seq.on_step(step)
            except Exception as e:  # the callback's failure ends its own sequence only
                if step.finish_reason != "error":
                    self._fail(seq, e, events)

    def _fail(self, seq: Sequence, error: Exception, events: list[Step]) -> None:
        if seq.finish_reason != "error":
            self._emit(seq, seq.end("error", error), events)

    def _take(self, token: int, logits: np.ndarray | None, seq: Sequence, events: list[Step]) -> None:
        """Choose and append one token for seq, isolating its failures."""
        try:
            step = seq.push(seq.choose(token, logits))
        except Exception as e:
            self._fail(seq, e, events)
            return
        self._emit(seq, step, events)

    def _pop_waiting(self) -> list[tuple[Sequence, int, Prefix | None]]:
        """(sequence, cached tokens, cache entry) for the free rows, in order, within the prefill budget.
        A sequence waits a step when one taken now shares a longer prefix with it than the cache has:
        it then reuses that prefix's KV."""
        take, later = [], []
        free, budget = self.slots - len(self.running), MAX_PREFILL_TOKENS
        with self.lock:
            while self.waiting and len(take) < free:
                s = self.waiting.popleft()
                ids = np.array(s.context, np.int64)
                cached, entry = self.prefixes.match(ids)
                shared = max((min(common_prefix(np.array(t.context, np.int64), ids), len(ids) - 1)
                              for t, _, _ in take if t.context != s.context), default=0)
                if self.prefixes.max_bytes and shared >= cached + DEFER_MIN:
                    later.append(s)
                    continue
                if take and len(s.context) - cached > budget:
                    self.waiting.appendleft(s)
                    break
                budget -= len(s.context) - cached
                take.append((s, cached, entry))
            self.waiting.extendleft(reversed(later))
        return take

    def _groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Fresh prompts (sorted by length) in ragged prefills of similar length, so padding stays small;
        a prompt whose logprobs are wanted is prefilled alone, with logits at every position."""
        groups, group = [[s] for s in seqs if s.options.prompt_logprobs is not None], []
        for s in (s for s in seqs if s.options.prompt_logprobs is None):
            n = len(s.context)
            if group and (len(group) + 1) * n > PAD_WASTE * (sum(len(t.context) for t in group) + n) + 64:
                groups.append(group)
                group = []
            group.append(s)
        return groups + [group] if group else groups

    def _first_logits(self, s: Sequence, start: int, row: int, wants: bool) -> tuple[int, np.ndarray | None]:
        """Run the context after `start` cached tokens of s in its row; (greedy id, logits) of its first token."""
        rest = np.array([s.context[start:]], np.int64)  # (1, S)
        S = rest.shape[1]
        every = s.options.prompt_logprobs is not None
        nxt, lg = self.model.run(self.pool, rest, np.array([S]), np.arange(S)[None] if every else np.array([[S - 1]]),
                                 start=row, logits_rows=[0] if wants or every else [])
        if every:  # after a prefix-tuning adapter: its virtual tokens have no logprobs, nor the first real one
            s.score_prompt(lg[0], skip=start)
        return int(nxt[0, -1]), lg[0, -1] if wants or every else None

    def _admit(self, events: list[Step]) -> bool:
        """Sequences join: fresh prompts prefilled in groups, cache hits as chunks after the cached KV, repeats
        of a context as copies of its row. Each gets its first token as soon as its own run is done."""
        new = []
        for s, m, entry in self._pop_waiting():
            if s.cancelled:
                self._emit(s, s.end("cancelled"), events)
            elif s.options.max_new_tokens == 0 and s.options.prompt_logprobs is None:
                self._emit(s, s.end("length"), events)
            else:
                new.append((s, m, entry))
        if not new:
            return False
        fresh, hits, copies, first = [], [], [], {}
        for s, m, entry in new:
            key = tuple(s.context)
            if key in first and s.options.prompt_logprobs is None:
                copies.append((s, first[key]))
                continue
            first.setdefault(key, s)
            if s.options.prompt_logprobs is not None and s.virtual:  # only the adapter's KV is reused
                entry = next(p for p in self.prefixes.pinned if p.token_ids == tuple(s.context[: s.virtual]))
                hits.append((s, s.virtual, entry))
            elif entry is None or s.options.prompt_logprobs is not None:
                fresh.append(s)
            else:
                hits.append((s, m, entry))
        groups = self._groups(sorted(fresh, key=lambda s: len(s.context)))
        order = [s for g in groups for s in g] + [s for s, _, _ in hits] + [s for s, _ in copies]
        base = len(self.running)
        self.running.extend(order)
        rows = {id(s): base + i for i, s in enumerate(order)}
        wants = {id(src) for c, src in copies if c.needs_logits}
        got: dict[int, tuple[int, np.ndarray | None]] = {}  # first token: (greedy id, logits)

        def start(s: Sequence, greedy: int, logits: np.ndarray | None) -> None:
            got[id(s)] = greedy, logits
            if s.options.max_new_tokens == 0:  # scored only
                self._emit(s, s.end("length"), events)
            else:
                self._take(greedy, logits if s.needs_logits else None, s, events)

        for group in groups:
            try:
                if len(group) == 1:
                    (s,) = group
                    start(s, *self._first_logits(s, 0, rows[id(s)], s.needs_logits or id(s) in wants))
                    continue
                lens = np.array([len(s.context) for s in group])
                ids = np.zeros((len(group), lens.max()), np.int64)  # right-padded (B, S)
                for b, s in enumerate(group):
                    ids[b, : lens[b]] = s.context
                want = [b for b, s in enumerate(group) if s.needs_logits or id(s) in wants]
                nxt, lg = self.model.run(self.pool, ids, lens, (lens - 1)[:, None], start=rows[id(group[0])],
                                         logits_rows=want)
                at = {b: k for k, b in enumerate(want)}
                for b, s in enumerate(group):
                    start(s, int(nxt[b, 0]), lg[at[b], 0] if b in at else None)
            except Exception as e:  # the model run failed: the sequences joining in it fail, the rest go on
                for s in group:
                    self._fail(s, e, events)
        for s, m, entry in hits:
            try:
                self.model.copy_kv(entry.cache, 0, self.pool, rows[id(s)], m)
                if m == len(s.context):  # a pinned prefix that is the whole context: its logits are known
                    start(s, int(np.argmax(entry.last_logits)), entry.last_logits)
                else:
                    start(s, *self._first_logits(s, m, rows[id(s)], True))
                self.prefixes.hits += 1
                self.prefixes.hit_tokens += m
            except Exception as e:
                self._fail(s, e, events)
        for s, src in copies:
            try:
                if id(src) not in got:
                    raise RuntimeError("the sequence whose prompt it shares failed")
                self.model.copy_kv(self.pool, rows[id(src)], self.pool, rows[id(s)], len(s.context))
                start(s, *got[id(src)])
            except Exception as e:
                self._fail(s, e, events)
        self.prefixes.misses += len(fresh)
        try:
            for s in fresh + [s for s, _, _ in hits]:
                if id(s) in got:
                    self.prefixes.insert(s.context, self.pool, rows[id(s)])
        except Exception:  # keeping a prefix is an optimisation: a failed copy loses it, nothing else
            pass
        return True

    def _decode(self, count: int, events: list[Step]) -> None:
        seqs = self.running[:count]
        tokens = np.array([s.tokens[-1] if s.tokens else 0 for s in seqs], np.int64)
        want = np.array([i for i, s in enumerate(seqs) if s.needs_logits and not s.done], np.int64)
        try:
            nxt, lg = self.decoder(tokens, want)
        except Exception as e:
            for s in seqs:
                if not s.done:
                    self._fail(s, e, events)
            return
        rows = {int(i): k for k, i in enumerate(want)}
        for i, s in enumerate(seqs):
            if not s.done:
                self._take(int(nxt[i]), lg[rows[i]] if i in rows else None, s, events)

    def _release(self) -> None:
        """Drop finished rows and move the last live rows into the gaps, so live rows stay packed."""
        live = [s for s in self.running if not s.done]
        if len(live) == len(self.running):
            return
        k = len(live)
        holes = [i for i in range(k) if self.running[i].done]
        movers = [j for j in range(k, len(self.running)) if not self.running[j].done]
        for i, j in zip(holes, movers):
            self.model.copy_kv(self.pool, j, self.pool, i, int(self.pool.lengths[j]))
            self.running[i] = self.running[j]
        self.pool.lengths[k:] = 0
        del self.running[k:]
