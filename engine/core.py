"""The one generation core: continuous batching of Sequences over a pool of KV rows.

Engine.generate/stream/generate_batch (through Generator), AsyncEngine (and with it the HTTP server,
`gpt2-onnx batch` and the Ray replicas) all drive `Core.step`; there is no other decode loop. Each
running sequence owns one row of a KV pool on the session's device. Rows stay packed at the front of
the pool: a step prefills the sequences that join (into the next free rows, reusing cached prefixes),
decodes one token for every row that was already running, then closes the gaps left by rows that
finished (`Model.copy_kv`, on the device), so a step costs what its live rows cost.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence as Seq

import numpy as np

from gpt2_onnx.constraints import prefetch
from gpt2_onnx.errors import InvalidInput
from gpt2_onnx.groups import BeamSearch
from gpt2_onnx.model import DecodeStep, Model
from gpt2_onnx.prefix_cache import PrefixCache, common_prefix
from gpt2_onnx.processors import process
from gpt2_onnx.sequence import Sequence, workers
from gpt2_onnx.types import Prefix, Step

DEFER_MIN = 32  # a sequence waits one step when an admitted one shares this many more tokens than the cache has
MAX_PREFILL_TOKENS = 4096  # prompt tokens (not counting cached ones) prefilled in one step
PAD_WASTE = 1.5  # prompts are prefilled together while padding makes at most 1.5x their real tokens


class Core:
    """Continuous batching of Sequences over a pool of KV rows on the model's device.

    submit() and cancel() may be called from any thread; step() from one thread at a time. Sequences
    join at step boundaries and leave when they finish, fail, or are cancelled (their rows are free
    after that step). A held sequence (its consumer is behind) keeps its row but does not advance. A
    failure of one sequence (numerics, tokenizer, its on_step callback) ends it alone; a failure of
    the model run ends the sequences in that run.
    """

    def __init__(self, model: Model, *, slots: int, max_length: int, prefix_cache_bytes: int = 0):
        self.model = model
        self.pool = model.new_cache(slots, max_length)
        self.decoder = DecodeStep(model, self.pool) if max_length > 1 else None
        self.prefixes = PrefixCache(model, prefix_cache_bytes)
        self.running: list[Sequence] = []  # running[i] owns pool row i
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Lock()
        self.steps = 0  # steps that ran the model
        self.closing = False  # cancel_all was called: whatever runs or joins from now on is cancelled
        self.submitted = 0  # submit() calls: each request's ticket

    @property
    def slots(self) -> int:
        return self.pool.rows

    @property
    def busy(self) -> bool:
        """Sequences are running or waiting."""
        return bool(self.running or self.waiting)

    @property
    def runnable(self) -> bool:
        """A step would do something: a sequence waits and a row is free, a running one is not held, or one
        was cancelled."""
        return (bool(self.waiting) and (len(self.running) < self.slots or self.closing
                                        or any(s.cancelled for s in self.waiting))) \
            or any(not s.held or s.cancelled for s in self.running)

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences (they start at the next step; a group's workers run for its outputs). Each must fit
        the pool: Engine.sequences checks that against n_positions, the pool's length here. One call is one
        request: requests take free rows in turns (`_fair`)."""
        with self.lock:
            self.submitted += 1
            for s in workers(seqs):
                s.ticket = self.submitted
            self.waiting.extend(workers(seqs))

    def cancel(self, seqs: Seq[Sequence]) -> None:
        """Stop these sequences: waiting ones leave the queue now, running ones free their rows within one step."""
        with self.lock:
            for s in seqs:
                s.cancelled = True
        self._drop_cancelled([])

    def cancel_all(self) -> None:
        """Stop every sequence, those being admitted by a step right now and those submitted later included."""
        with self.lock:
            self.closing = True
        self.cancel([*self.running, *self.waiting])

    def _drop_cancelled(self, events: list[Step]) -> None:
        """Cancelled sequences leave the queue; they never ran: tell their owners here."""
        with self.lock:
            ended = [s for s in self.waiting if s.cancelled or self.closing]
            if ended:
                kept = [s for s in self.waiting if not (s.cancelled or self.closing)]
                self.waiting.clear()
                self.waiting.extend(kept)
        for s in ended:
            if not s.done:
                self._emit(s, s.end("cancelled", s.cancel_error), events)

    def fail_all(self, error: Exception) -> None:
        """End every running and waiting sequence with `error` (a failure of the step itself)."""
        with self.lock:
            stuck = [*self.running, *self.waiting]
            self.waiting.clear()
        for s in stuck:
            if not s.done:
                self._fail(s, error, [])
        self._release()

    def step(self) -> list[Step]:
        """Admit waiting sequences (prefill), decode one token for the others, release finished rows."""
        if self.model.lora is None:
            return self._step()
        with self.model.lora.lock:  # no LoRA slot is loaded or unloaded during a step
            return self._step()

    def _step(self) -> list[Step]:
        events: list[Step] = []
        self._drop_cancelled(events)
        for s in self.running:
            if (s.cancelled or self.closing) and not s.done:
                self._emit(s, s.end("cancelled", s.cancel_error), events)
            elif s.lora is not None and not s.lora.loaded and not s.done:
                self._fail(s, InvalidInput(f"LoRA adapter {s.lora.name!r} was unloaded while this request ran",
                                           "adapter"), events)
        self._release()
        before = len(self.running)
        ran = self._admit(events)
        if before and any(not s.held for s in self.running[:before]):
            self._decode(before, events)
            ran = True
        self.steps += ran
        self._release()
        return events

    # ---- a sequence's events ------------------------------------------------------------------
    def _emit(self, seq: Sequence, step: Step, events: list[Step]) -> None:
        if seq.group is not None:  # a group's worker: the group decides what its outputs see
            for out, out_step in seq.group.on_step(seq, step):
                self._emit(out, out_step, events)
            return
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

    def _take(self, token: int, logits: np.ndarray | None, seq: Sequence, events: list[Step],
              scores: np.ndarray | None = None) -> None:
        """Choose and append one token for seq, isolating its failures."""
        try:
            step = seq.push(seq.choose(token, logits, scores))
        except Exception as e:
            self._fail(seq, e, events)
            return
        self._emit(seq, step, events)

    # ---- admission ----------------------------------------------------------------------------
    def _pop_waiting(self) -> list[tuple[Sequence, int, Prefix | None]]:
        """(sequence, cached tokens, cache entry) for the free rows, in order, within the prefill budget.
        A sequence waits a step when one taken now shares a longer prefix with it than the cache has:
        it then reuses that prefix's KV."""
        take, later = [], []
        free, budget = self.slots - len(self.running), MAX_PREFILL_TOKENS
        lead = None  # where the last unit's first sequence went: one prompt's rows join in one step
        with self.lock:
            self._fair()
            while self.waiting and len(take) < free:
                s = self.waiting.popleft()
                ids = np.array(s.context, np.int64)
                cached, entry = self.prefixes.match(ids, s.prefix, s.lora_key)
                if s.join == 0 and lead is not None:
                    lead.append((s, cached, entry) if lead is take else s)
                    continue
                if s.join > free - len(take):
                    self.waiting.appendleft(s)
                    break
                shared = max((min(common_prefix(np.array(t.context, np.int64), ids), len(ids) - 1)
                              for t, _, _ in take if t.context != s.context and t.lora_key == s.lora_key), default=0)
                if self.prefixes.max_bytes and shared >= cached + DEFER_MIN:
                    later.append(s)
                    lead = later
                    continue
                if take and len(s.context) - cached > budget:
                    self.waiting.appendleft(s)
                    break
                budget -= len(s.context) - cached
                take.append((s, cached, entry))
                lead = take
            self.waiting.extendleft(reversed(later))
        return take

    def _fair(self) -> None:
        """Order the waiting units (a sequence with the ones that join with it) round-robin by request, counting
        the units each request already runs: a request with none running goes first, then each one's next
        unit in turn. So a new request's first unit waits only for the rows to free up (and for the first
        unit of each request queued before it with nothing running), however many prompts and samples the
        requests ahead of it have."""
        units: list[list[Sequence]] = []
        for s in self.waiting:
            if s.join != 0 or not units:
                units.append([s])
            else:
                units[-1].append(s)
        rank: dict[int, int] = {}
        for s in self.running:
            if s.join != 0 and not s.done:
                rank[s.ticket] = rank.get(s.ticket, -1) + 1
        order = []
        for i, u in enumerate(units):
            t = u[0].ticket
            rank[t] = rank.get(t, -1) + 1
            order.append((rank[t], i))
        if any(a > b for a, b in zip(order, order[1:])):
            self.waiting.clear()
            self.waiting.extend(s for _, i in sorted(order) for s in units[i])

    def _plan(self, new: list[tuple[Sequence, int, Prefix | None]]):
        """Split joining sequences into fresh prompts (in prefill groups), cache hits (sequence, cached
        tokens, entry) and copies (sequence, the one with the same context that is computed)."""
        fresh, hits, copies, first = [], [], [], {}
        for s, m, entry in new:
            key = (s.lora_key, *s.context)
            if key in first and s.options.prompt_logprobs is None:
                copies.append((s, first[key]))
                first[key].share_logits |= s.needs_logits
                continue
            first.setdefault(key, s)
            if s.options.prompt_logprobs is not None and s.virtual:  # only the adapter's KV is reused
                hits.append((s, s.virtual, s.prefix))
            elif entry is None or s.options.prompt_logprobs is not None:
                fresh.append(s)
            else:
                hits.append((s, m, entry))
        return self._groups(sorted(fresh, key=lambda s: len(s.context))), hits, copies

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

    def _admit(self, events: list[Step]) -> bool:
        """Sequences join: fresh prompts prefilled in groups, cache hits as chunks after the cached KV, repeats
        of a context as copies of its row. Each gets its first token as soon as its own run is done."""
        new = []
        for s, m, entry in self._pop_waiting():
            if s.cancelled or self.closing:
                self._emit(s, s.end("cancelled"), events)
            elif s.lora is not None and not s.lora.loaded:
                self._fail(s, InvalidInput(f"LoRA adapter {s.lora.name!r} was unloaded before this request ran",
                                           "adapter"), events)
            elif s.options.max_new_tokens == 0 and s.options.prompt_logprobs is None:
                self._emit(s, s.end("length"), events)
            else:
                s.first, s.share_logits = None, False
                new.append((s, m, entry))
        if not new:
            return False
        groups, hits, copies = self._plan(new)
        order = [s for g in groups for s in g] + [s for s, _, _ in hits] + [s for s, _ in copies]
        for i, s in enumerate(order, len(self.running)):
            s.slot = i
        self.running.extend(order)
        for group in groups:
            self._prefill(group, events)
        for s, m, entry in hits:
            self._prefill_after(s, m, entry, events)
        for s, src in copies:
            try:
                if src.first is None:
                    raise RuntimeError("the sequence whose prompt it shares failed")
                self.model.copy_kv(self.pool, src.slot, self.pool, s.slot, len(s.context))
                self._start(s, *src.first, events)
            except Exception as e:
                self._fail(s, e, events)
        beams = {id(s.group): s.group for s in order if isinstance(s.group, BeamSearch)}
        for g in beams.values():
            firsts = [w.first for w in g.running]
            if all(f is not None and f[1] is not None for f in firsts):
                self._beam_step(g, np.stack([f[1] for f in firsts]), events)
            else:
                for w in g.running:
                    self._fail(w, RuntimeError("a beam's prefill failed"), events)
        self._remember([s for g in groups for s in g] + [s for s, _, _ in hits])
        self.prefixes.misses += sum(len(g) for g in groups)
        for s in order:
            s.first = None  # (V,) logits: not kept beyond admission
        return True

    def _start(self, s: Sequence, greedy: int, logits: np.ndarray | None, events: list[Step]) -> None:
        """A joining sequence's first token, from its prefill's (greedy id, logits)."""
        s.first = greedy, logits
        if isinstance(s.group, BeamSearch):  # the beams take their first step together, after admission
            return
        if s.options.max_new_tokens == 0:  # scored only
            self._emit(s, s.end("length"), events)
        else:
            self._take(greedy, logits if s.needs_logits else None, s, events)

    def _prefill(self, group: list[Sequence], events: list[Step]) -> None:
        """Fresh prompts of similar length in one ragged run (right-padded), in consecutive rows."""
        try:
            if len(group) == 1:
                (s,) = group
                self._start(s, *self._first_logits(s, 0), events)
                return
            lens = np.array([len(s.context) for s in group])
            ids = np.zeros((len(group), lens.max()), np.int64)  # (B, S)
            for b, s in enumerate(group):
                ids[b, : lens[b]] = s.context
            want = [b for b, s in enumerate(group) if s.needs_logits or s.share_logits]
            nxt, lg = self.model.run(self.pool, ids, lens, (lens - 1)[:, None], start=group[0].slot,
                                     logits_rows=want, lora=self._lora(group))
            at = {b: k for k, b in enumerate(want)}
            for b, s in enumerate(group):
                self._start(s, int(nxt[b, 0]), lg[at[b], 0] if b in at else None, events)
        except Exception as e:  # the model run failed: the sequences joining in it fail, the rest go on
            for s in group:
                self._fail(s, e, events)

    def _prefill_after(self, s: Sequence, m: int, entry: Prefix, events: list[Step]) -> None:
        """A cache hit: the first m tokens' KV copied from the entry, the rest run as one chunk."""
        try:
            self.model.copy_kv(entry.cache, 0, self.pool, s.slot, m)
            if m == len(s.context):  # a pinned prefix that is the whole context: its logits are known
                lg = entry.last_logits
                self._start(s, int(np.argmax(lg)) if np.isfinite(lg).all() else -1, lg, events)
            else:
                self._start(s, *self._first_logits(s, m), events)
            self.prefixes.hits += 1
            self.prefixes.hit_tokens += m
        except Exception as e:
            self._fail(s, e, events)

    def _first_logits(self, s: Sequence, start: int) -> tuple[int, np.ndarray | None]:
        """Run the context after `start` cached tokens of s in its row; (greedy id, logits) of its first token."""
        rest = np.array([s.context[start:]], np.int64)  # (1, S)
        S = rest.shape[1]
        every = s.options.prompt_logprobs is not None
        wants = s.needs_logits or s.share_logits or start > 0
        nxt, lg = self.model.run(self.pool, rest, np.array([S]), np.arange(S)[None] if every else np.array([[S - 1]]),
                                 start=s.slot, logits_rows=[0] if wants or every else [], lora=self._lora([s]))
        if every:  # after a prefix-tuning adapter: its virtual tokens have no logprobs, nor the first real one
            s.score_prompt(lg[0], skip=start)
        return int(nxt[0, -1]), lg[0, -1] if wants or every else None

    def _lora(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Each row's LoRA slot (B,), or None on an export without slots."""
        if self.model.lora is None:
            return None
        return np.array([s.lora.slot if s.lora is not None else 0 for s in seqs], np.int64)

    def _remember(self, computed: list[Sequence]) -> None:
        """Offer the contexts just computed to the prefix cache."""
        try:
            for s in computed:
                if s.first is not None:
                    self.prefixes.insert(s.context, self.pool, s.slot, s.lora_key)
        except Exception:  # keeping a prefix is an optimisation: a failed copy loses it, nothing else
            pass

    # ---- decoding and release -------------------------------------------------------------------
    def _decode(self, count: int, events: list[Step]) -> None:
        """One token for each of the first `count` rows; held rows run in place without advancing."""
        seqs = self.running[:count]
        tokens = np.array([s.tokens[-1] if s.tokens else 0 for s in seqs], np.int64)
        hold = np.array([s.held or s.done for s in seqs])
        want = np.array([i for i, s in enumerate(seqs) if s.needs_logits and not hold[i]], np.int64)
        masks = prefetch([])
        try:
            masks = prefetch([seqs[i].constraint for i in want if seqs[i].constraint is not None])  # beside the graph
            lora = self._lora(seqs)
            more = {**({"hold": hold} if hold.any() else {}), **({"lora": lora} if lora is not None else {})}
            nxt, lg = self.decoder(tokens, want, **more)
        except Exception as e:
            masks()
            for s in seqs:
                if not s.done:
                    self._fail(s, e, events)
            return
        masks()
        rows = {int(i): k for k, i in enumerate(want)}
        for i in want:  # a constraint's failure ends its own row
            s = seqs[i]
            if s.constraint is not None:
                try:
                    s.constraint.allowed()
                except Exception as e:
                    self._fail(s, e, events)
        scored = [seqs[i] for i in want if not seqs[i].done]
        try:  # every row's processors at once
            live = lg if len(scored) == len(want) else lg[[rows[s.slot] for s in scored]]
            scores = process(live, scored) if any(s.options.processed for s in scored) else None
        except Exception as e:
            for s in scored:
                self._fail(s, e, events)
            return
        at = {s.slot: k for k, s in enumerate(scored)}  # row -> its index in scores
        beams: dict[int, BeamSearch] = {}
        for i, s in enumerate(seqs):
            if isinstance(s.group, BeamSearch):
                beams[id(s.group)] = s.group
            elif not hold[i] and not s.done:
                k = rows.get(i)
                self._take(int(nxt[i]), None if k is None else lg[k],
                           s, events, None if k is None or scores is None else scores[at[i]])
        for g in beams.values():
            if not g.ended:
                self._beam_step(g, lg[[rows[w.slot] for w in g.running]], events)

    def _beam_step(self, g: BeamSearch, logits: np.ndarray, events: list[Step]) -> None:
        """Advance a beam search from its beams' logits (B, V): each next beam continues its parent's row
        (a parent's first child keeps the row; other children take rows of dropped beams, forked on the
        device), or the search ends and its outputs get the best hypotheses."""
        try:
            moves = g.advance(logits)
            if g.done:
                for out, step in g.finish():
                    self._emit(out, step, events)
                return
            old = g.running
            tokens = [list(w.tokens) for w in old]
            new: list[Sequence | None] = [None] * len(moves)
            kept = set()
            for j, (k, _) in enumerate(moves):
                if k not in kept:
                    kept.add(k)
                    new[j] = old[k]
            spare = [w for k, w in enumerate(old) if k not in kept]
            for j, (k, t) in enumerate(moves):
                if new[j] is None:
                    new[j] = spare.pop()
                    shared = common_prefix(np.array(tokens[k]), np.array(new[j].tokens))  # KV already equal
                    self.model.copy_kv(self.pool, old[k].slot, self.pool, new[j].slot,
                                       int(self.pool.lengths[old[k].slot]), start=len(new[j].context) + shared)
                new[j].tokens = tokens[k] + [t]
            if old[0].constraint is not None:  # each beam's constraint: its parent's, advanced by its token
                states = [old[k].constraint if new[j] is old[k] else old[k].constraint.fork()
                          for j, (k, _) in enumerate(moves)]  # copies first: a parent's own state advances last
                for w, c, (_, t), alive in zip(new, states, moves, g.alive):
                    w.constraint = c
                    if alive:  # a dead beam (-inf: its constraint allowed nothing else) never takes a disallowed token
                        c.advance(t)
            g.running = new
        except Exception as e:
            for w in g.workers:
                self._fail(w, e, events)

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
            self.running[i].slot = i
        self.pool.lengths[k:] = 0
        del self.running[k:]
