"""Offline generation and scoring over JSONL files: `gpt2-onnx batch INPUT.jsonl -o OUTPUT.jsonl`.

Each input line is one JSON object with an "id" (a string or an integer, unique in the file) and either
the fields of an OpenAI completion request (`prompt`, `max_tokens`, `temperature`, ... as
POST /v1/completions takes them, validated with the server's CompletionRequest) or a scoring row
(`context`, `continuation`: Engine.score). Each output line is `{"id": ..., "status": ..., "body": ...}`:
the HTTP status and JSON body the server would answer (a completion, or its OpenAI-shaped error), or
for a scoring row the continuation's log-probabilities. Rows come out as they finish, keyed by id.

A file may instead be in OpenAI's Batch format (as vLLM's run_batch takes it): each line
`{"custom_id": ..., "method": "POST", "url": "/v1/completions" or "/v1/chat/completions", "body": {...}}`,
each output line `{"id": "batch_req_...", "custom_id": ..., "response": {"status_code", "request_id", "body"},
"error": null}`. Such a line is read into the same internal row ({"id": custom_id, "url", "body"}) and
answered by the same code; its body is checked when it is answered, so a bad request is its own 400
response (as OpenAI answers it). A file is one format.

A row whose id can be read is always answered under it: a row that fails validation (a bad field, prompt and
context both or neither, stream, a bad OpenAI envelope: method, url, body) gets its own 400 line naming the
problem and the input line, and the job goes on; a rerun skips it like any answered row. There is no 1 MiB
limit (no HTTP): a huge row is answered on its merits (a prompt beyond n_positions is its 400). Only a line
whose id cannot be read (not JSON, not an object, no id, an id of the wrong type, an id already used, the
other format) stops the job before it starts: it could be neither answered nor skipped by a rerun.

Completion rows are answered by the server's completion service (gpt2_onnx.server.completions) over
one AsyncEngine, so answers are the server's and continuous batching runs across the rows of a batch;
no HTTP and no fastapi are involved. Without --replicas the job runs here without Ray; with it,
gpt2_onnx.distributed.data runs it on Ray Data (one engine per actor).

The output is append-only and flushed (fsync) after every batch; a rerun reads the ids already there
and skips them, after cutting a torn last line left by a kill. Every input row appears exactly once. OUTPUT
is locked (flock) for the whole job, so a second job on it is refused; an OUTPUT that is not a regular file
(/dev/stdout, a pipe, a device) is written without resuming or locking. A failed write (ENOSPC) is a
ValueError saying how many rows were kept.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gpt2_onnx.errors import option_error

MAX_QUEUE = 1 << 20  # a batch's sequences all wait in the core's queue: no 429 inside a job
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"  # the urls of OpenAI batch requests
REQUEST = ("custom_id", "method", "url", "body")  # the fields of an OpenAI batch request line


@dataclass(frozen=True)
class Job:
    """What is left to do: the input's rows not yet in the output."""

    total: int  # rows in the input
    done: set[str]  # ids (json.dumps of each) already in the output
    pending: list[str]  # raw JSON lines still to answer
    dropped_torn_line: bool  # a torn last line (a kill mid-write) was cut from the output
    lock: object = field(default=None, repr=False, compare=False)  # OUTPUT, opened and locked for this job
    openai: bool = False  # INPUT is in OpenAI's Batch format, and so is OUTPUT

    def release(self) -> None:
        """Let another job write OUTPUT (execute does this when it ends)."""
        if self.lock is not None:
            self.lock.close()


class ScoreRequest(BaseModel):
    """A scoring row (without its id): log p(continuation | context), as Engine.score computes it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="the served model id; omitted = the one loaded")
    context: str | list[int] = Field(description="text or token ids; empty = <|endoftext|>")
    continuation: str | list[int] = Field(description="text or token ids, not empty")


def _key(row_id) -> str:
    return json.dumps(row_id)  # 1 and "1" are different ids


# said by every error that stops a job before it starts (the rows with a readable id get error lines instead)
STOPS = "; nothing was answered: each row needs an id of its own, under which it is answered and a rerun skips it"


class Refused(ValueError):
    """A row with a readable id that cannot be answered: it gets its own error line (status, message, param)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def row(self, row_id) -> str:
        """The internal row that execute answers with this error."""
        return json.dumps({"refused": {"status": self.status, "message": self.message, "param": self.param},
                           "id": row_id})  # starts with REFUSED: a row of INPUT never does (it would be refused)


REFUSED = '{"refused": '


def _row_id(row, where: str):
    """The id of a gpt2-onnx row; a ValueError (the job stops) if it cannot be read."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}{STOPS}")
    if "id" not in row:
        raise ValueError(f'{where}: the row has no "id"; give every row a unique string or integer id{STOPS}')
    row_id = row["id"]
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ValueError(f'{where}: "id" must be a string or an integer, got {row_id!r}{STOPS}')
    return row_id


def _check_row(row, where: str):
    """Validate one input row; returns its id. A ValueError if its id cannot be read; Refused if it is bad."""
    from pydantic import ValidationError

    from gpt2_onnx.server.errors import validation_error
    from gpt2_onnx.server.protocol import CompletionRequest

    row_id = _row_id(row, where)
    fields = {k: v for k, v in row.items() if k != "id"}
    is_score = "context" in fields or "continuation" in fields
    if is_score and "prompt" in fields:
        raise Refused(f'{where}: a row has either "prompt" (generation) or "context" + "continuation" (scoring), '
                      "not both", "prompt")
    if not is_score and "prompt" not in fields:
        raise Refused(f'{where}: the row has neither "prompt" (generation) nor "context" + "continuation" '
                      "(scoring)", "prompt")
    if fields.get("stream"):
        raise Refused(f"{where}: stream is not supported in batch rows; remove it", "stream")
    kind = ScoreRequest if is_score else CompletionRequest
    try:
        kind.model_validate_json(json.dumps(fields))
    except ValidationError as e:
        error = validation_error(e.errors(), list(kind.model_fields))
        raise Refused(f"{where}: {error.message}", error.param) from None
    return row_id


def _check_request(row: dict, where: str) -> str:
    """Validate one OpenAI batch request line (not its body: that is answered, a bad one with a 400); returns
    the internal row. A ValueError if its custom_id cannot be read; Refused for a bad envelope."""
    if not isinstance(row["custom_id"], str):
        raise ValueError(f'{where}: "custom_id" must be a string, got {row["custom_id"]!r}{STOPS}')
    for name in REQUEST:
        if name not in row:
            raise Refused(f'{where}: the OpenAI batch request has no "{name}"; each line has custom_id, method, '
                          "url and body", name)
    for name in row:
        if name not in REQUEST:
            raise Refused(f"{where}: unknown field {name!r} in an OpenAI batch request; it has custom_id, method, "
                          "url and body", name)
    if row["method"] != "POST":
        raise Refused(f'{where}: "method" must be "POST", got {row["method"]!r}', "method")
    if row["url"] not in (COMPLETIONS, CHAT):
        raise Refused(f'{where}: "url" must be "{COMPLETIONS}" or "{CHAT}", got {row["url"]!r}', "url")
    if not isinstance(row["body"], dict):
        raise Refused(f'{where}: "body" must be a JSON object (the request), got {type(row["body"]).__name__}',
                      "body")
    if row["url"] == CHAT:
        try:
            import gpt2_onnx.server.chat  # noqa: F401
        except ImportError as e:  # this install, not the row: every chat row would fail; stop before starting
            raise ValueError(f'{where}: "url" {CHAT} is not available in this install ({e})') from None
    return json.dumps({"id": row["custom_id"], "url": row["url"], "body": row["body"]})


def read_input(path: Path) -> tuple[list[tuple[str, str]], bool]:
    """(id key, internal row) of every row of INPUT, and whether INPUT is in OpenAI's Batch format (a file is
    one format or the other). A row that fails validation is kept as a refused row (its own 400 line); a line
    whose id cannot be read, or repeats one, is a ValueError naming it (the job does not start)."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read INPUT {path}: {e.strerror}") from None
    rows, seen, first = [], {}, None  # first: (OpenAI format?, line) of the first row
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} is not JSON ({e.msg} at column {e.colno}); fix or remove it{STOPS}") \
                        from None
                except RecursionError:
                    raise ValueError(f"{where} is not JSON this reader can read (nested too deeply); fix or remove "
                                     f"it{STOPS}") from None
                openai = isinstance(row, dict) and "custom_id" in row
                first = first or (openai, n)
                if openai != first[0]:
                    kinds = {True: "an OpenAI batch request (custom_id, method, url, body)",
                             False: 'a gpt2-onnx batch row ({"id", ...})'}
                    raise ValueError(f"{where} is {kinds[openai]} but line {first[1]} is {kinds[first[0]]}: a file is "
                                     "one format or the other; put them in two files")
                name = "custom_id" if openai else "id"
                try:
                    internal = _check_request(row, where) if openai else line.strip()
                    row_id = row[name] if openai else _check_row(row, where)
                except Refused as e:
                    row_id = row[name] if openai else row["id"]
                    internal = e.row(row_id)
                key = _key(row_id)
                if key in seen:
                    raise ValueError(f"{where}: {name} {row_id!r} is already used on line {seen[key]}; {name}s "
                                     f"must be unique{STOPS}")
                seen[key] = n
                rows.append((key, internal))
        except UnicodeDecodeError as e:
            raise ValueError(f"INPUT {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"INPUT {path} has no rows")
    return rows, first[0]


def _regular(path: Path) -> bool:
    """Whether OUTPUT is (or will be) a regular file: one that can be read back to resume, and locked."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # not there yet (a regular file will be made), or open says what is wrong
        return True


def resume(path: Path, ids: set[str], openai: bool = False) -> tuple[set[str], bool]:
    """Ids already in OUTPUT (custom_ids with openai), after cutting whatever follows its last newline (a torn
    write)."""
    if not path.exists() or not _regular(path):
        return set(), False  # a pipe or a device (/dev/stdout) cannot be read back: nothing to resume
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read OUTPUT {path}: {e.strerror}") from None
    keep = data.rfind(b"\n") + 1
    torn = keep < len(data)
    if torn:
        try:
            with open(path, "r+b") as f:
                f.truncate(keep)
        except OSError as e:
            raise ValueError(f"cannot cut the torn last line of OUTPUT {path}: {e.strerror}") from None
    done: set[str] = set()
    name = "custom_id" if openai else "id"
    for n, line in enumerate(data[:keep].split(b"\n")[:-1], 1):
        where = f"OUTPUT {path} line {n}"
        try:
            row = json.loads(line)
            key = _key(row[name])
            if openai:
                row["response"]["status_code"]
        except (ValueError, KeyError, TypeError):
            what = "an OpenAI batch output line" if openai else "a row of gpt2-onnx batch"
            raise ValueError(f"{where} is not {what}; write to another file (-o)") from None
        if key not in ids:
            raise ValueError(f"{where} has {name} {row[name]!r}, which INPUT does not have: OUTPUT belongs to "
                             "another job; write to another file (-o)")
        if key in done:
            raise ValueError(f"{where} repeats {name} {row[name]!r}: OUTPUT was not written by one gpt2-onnx batch "
                             "job; write to another file (-o)")
        done.add(key)
    return done, torn


def lock_output(path: Path):
    """OUTPUT opened and locked (flock) for one job: a second job on the same file, in any process, is refused
    (two would write every row twice)."""
    import fcntl

    try:
        f = open(path, "ab")
    except OSError as e:
        raise ValueError(f"cannot write OUTPUT {path}: {e.strerror}") from None
    if not _regular(path):  # /dev/stdout, a pipe: each job writes its own stream
        f.close()
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"OUTPUT {path} is being written by another gpt2-onnx batch job; wait for it to end or "
                         "write to another file (-o)") from None
    return f


def plan(input_path: Path, output_path: Path) -> Job:
    rows, openai = read_input(input_path)
    lock = lock_output(output_path)
    try:
        done, torn = resume(output_path, {k for k, _ in rows}, openai)
    except BaseException:
        lock.close()
        raise
    return Job(total=len(rows), done=done, pending=[line for k, line in rows if k not in done],
               dropped_torn_line=torn, lock=lock, openai=openai)


def _openai_line(row: dict) -> dict:
    """An answered row in OpenAI's batch output shape: a request's error is its response (error stays null)."""
    return {"id": f"batch_req_{secrets.token_hex(16)}", "custom_id": row["id"],
            "response": {"status_code": row["status"], "request_id": secrets.token_hex(16), "body": row["body"]},
            "error": None}


class Output:
    """OUTPUT, appended to: each batch's rows written at once, flushed and fsynced; an id is written once
    (openai: in OpenAI's batch output shape)."""

    def __init__(self, path: Path, done: set[str], openai: bool = False):
        self.path, self.seen, self.openai = path, set(done), openai
        self.written = self.errors = 0
        self.failed = False
        try:
            self.file = open(path, "ab")
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> ValueError:
        self.failed = True
        kept = f"the {self.written} rows written before are kept; " if self.written else ""
        return ValueError(f"cannot write OUTPUT {self.path} ({e.strerror or e}); {kept}free space (or fix the "
                          "cause) and run the same command again to answer the rest")

    def write(self, lines: list[str]) -> int:
        fresh = []
        for line in lines:
            row = json.loads(line)
            key = _key(row["id"])
            if key not in self.seen:  # a batch Ray ran twice (a lost actor) is written once
                self.seen.add(key)
                fresh.append(json.dumps(_openai_line(row)) if self.openai else line)
                self.errors += row["status"] != 200
        if fresh:
            try:
                self.file.write("".join(line + "\n" for line in fresh).encode())
                self.file.flush()
                _sync(self.file)
            except OSError as e:  # ENOSPC, EIO: a torn last line is cut by the rerun
                raise self._error(e) from None
        self.written += len(fresh)
        return len(fresh)

    def close(self) -> None:
        """Flush and fsync what was written (after Ctrl-C too), and close; a failed write's leftovers are dropped."""
        try:
            if not self.failed:
                self.file.flush()
                _sync(self.file)
        except OSError as e:
            self.failed = True
            raise self._error(e) from None
        finally:
            try:
                self.file.close()
            except OSError:
                pass  # the buffer of a failed write: the rerun cuts a torn line


def _sync(f) -> None:
    try:
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a pipe or a device: nothing to sync
            raise


class BatchWorker:
    """One AsyncEngine answering batches of rows with the server's completion service: Ray Data's callable
    class, and the in-process runner's. A batch is {"row": array of raw JSON lines}; so is what it returns."""

    def __init__(self, model: str | None = None, *, provider: str = "auto", threads: int | None = None,
                 max_batch: int | None = None, prefix_cache_mb: float = 512, loras: dict[str, str] | None = None):
        from gpt2_onnx import AsyncEngine, Engine
        from gpt2_onnx.server.completions import Served

        self.engine = Engine.load(model, provider=provider, threads=threads)
        adapters = {name: self.engine.load_lora(folder, name=name) for name, folder in (loras or {}).items()}
        llm = AsyncEngine(self.engine, max_batch=max_batch, max_queue=MAX_QUEUE, prefix_cache_mb=prefix_cache_mb)
        self.served = Served(llm, self.engine.config.name or self.engine.folder.name, loras=adapters)
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(str(r)) for r in batch["row"]]
        out = self.loop.run_until_complete(self.answer(rows))
        return {"row": np.array([json.dumps(o) for o in out], dtype=object)}

    async def answer(self, rows: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if "refused" in r:
                out[i] = answer_refused(r)
        rows = [{} if "refused" in r else r for r in rows]
        gens = [i for i, r in enumerate(rows) if "prompt" in r or "url" in r]
        answers = await asyncio.gather(*[self.request(rows[i]) for i in gens])
        for i, (status, body) in zip(gens, answers):
            out[i] = {"id": rows[i]["id"], "status": status, "body": body}
        scores = [i for i, r in enumerate(rows) if r and "prompt" not in r and "url" not in r]
        for i, answer in zip(scores, self.score([rows[i] for i in scores])):
            out[i] = {"id": rows[i]["id"], **answer}
        return out

    async def request(self, row: dict) -> tuple[int, dict]:
        """(status, body) the server answers a generation row with: a gpt2-onnx row is a completion request
        (validated when the job was planned), an OpenAI one {"url", "body"} (a bad body is its 400)."""
        from pydantic import ValidationError

        from gpt2_onnx.server.errors import ApiError, validation_error

        if "url" in row:
            url, body = row["url"], row["body"]
        else:
            url, body = COMPLETIONS, {k: v for k, v in row.items() if k != "id"}
        if url == CHAT:
            from gpt2_onnx.server.chat import complete_chat as complete
            from gpt2_onnx.server.protocol import ChatCompletionRequest as kind
        else:
            from gpt2_onnx.server.completions import complete
            from gpt2_onnx.server.protocol import CompletionRequest as kind
        if body.get("stream"):
            return 400, ApiError(400, "stream is not supported in batch requests; remove it", "stream").body()
        try:
            request = kind.model_validate_json(json.dumps(body))
        except ValidationError as e:
            return 400, validation_error(e.errors(), list(kind.model_fields)).body()
        return await complete(self.served, request)

    def score(self, rows: list[dict]) -> list[dict]:
        """Engine.score of the rows together (one forward per length group); a bad row fails alone."""
        from gpt2_onnx.server.errors import ApiError

        if not rows:
            return []
        model = self.served.model_id
        known = {model, None}

        def body(s) -> dict:
            return {"object": "score", "model": model, "logprob": s.logprob, "is_greedy": s.is_greedy,
                    "tokens": s.token_ids, "token_logprobs": s.logprobs, "greedy": s.greedy}

        def fail(e: ApiError) -> dict:
            return {"status": e.status, "body": e.body()}

        def unknown(r: dict) -> dict:
            if r["model"] in self.served.loras:
                return fail(ApiError(400, f"scoring rows are scored by the base model {model!r}, not by LoRA adapter "
                                          f"{r['model']!r}; omit model or give {model!r}", "model"))
            return fail(ApiError(404, f"model {r['model']!r} is not served here; this job serves "
                                      f"{self.served.models}", "model", "model_not_found"))

        def too_long(r: dict) -> dict | None:
            """A pair beyond n_positions, said in its own terms (not as a prompt + max_tokens)."""
            try:
                ctx = self.engine.encode(r["context"])
                cont = self.engine.encode(r["continuation"], empty_ok=True)
            except ValueError:
                return None  # Engine.score names it
            n, limit = len(ctx) + len(cont), self.engine.config.n_positions
            if not cont or n <= limit:
                return None
            return fail(ApiError(400, f"context of {len(ctx)} tokens + continuation of {len(cont)} tokens = {n} "
                                      f"exceeds the model's context of n_positions {limit} tokens; shorten the context "
                                      "or the continuation", "context" if len(ctx) >= limit else "continuation"))

        answers: list[dict | None] = [unknown(r) if r.get("model") not in known else too_long(r) for r in rows]
        ok = [r for r, a in zip(rows, answers) if a is None]
        try:
            scored = iter(self.engine.score([(r["context"], r["continuation"]) for r in ok]))
            return [a if a is not None else {"status": 200, "body": body(next(scored))} for a in answers]
        except ValueError:  # some row is bad: score them one by one to say which
            out = []
            for r, a in zip(rows, answers):
                if a is not None:
                    out.append(a)
                    continue
                try:
                    out.append({"status": 200, "body": body(self.engine.score([(r["context"], r["continuation"])])[0])})
                except ValueError as e:
                    out.append(fail(ApiError.of(e)))
            return out

    def close(self) -> None:
        """Stop the engine. Requests still under way (Ctrl-C stopped the loop) are cancelled first, and the
        interrupt that a task may have died of is taken, so that nothing is logged when they are collected."""
        seen: set[asyncio.Task] = set()
        try:
            for _ in range(5):
                tasks = asyncio.all_tasks(self.loop)
                if not tasks:
                    break
                self.loop.set_exception_handler(lambda loop, context: None)  # interrupted: said once, by the CLI
                seen |= tasks
                for task in tasks:
                    task.cancel()
                try:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=5))
                except KeyboardInterrupt:
                    pass  # a task died of the interrupt: the others are still let finish
            for task in seen:
                if task.done() and not task.cancelled():
                    task.exception()
        finally:
            self.served.llm.shutdown(timeout=1.0)
            self.loop.close()


def prepare(input_path: Path, output_path: Path, *, batch_size: int = 64, max_batch: int | None = None,
            replicas: int | None = None, ray_address: str | None = None) -> Job:
    """Check the options and INPUT, cut a torn last line off OUTPUT: what is left to do. ValueError if bad."""
    for name, value in (("batch_size", batch_size), ("max_batch", max_batch), ("replicas", replicas)):
        if (value is not None or name == "batch_size") and (isinstance(value, bool) or not isinstance(value, int)
                                                         or value < 1):
            raise option_error(name, f"must be an integer >= 1, got {value!r}")
    if ray_address is not None and replicas is None:
        raise option_error("ray_address", "needs replicas: pass the number of Ray Data actors")
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError("OUTPUT is INPUT: write to another file (-o)")
    return plan(Path(input_path), Path(output_path))


def execute(job: Job, output_path: Path, *, model: str | None = None, provider: str = "auto",
            threads: int | None = None, max_batch: int | None = None, prefix_cache_mb: float = 512, batch_size: int = 64,
            replicas: int | None = None, ray_address: str | None = None,
            progress: Callable[[int, int], None] | None = None, loras: dict[str, str] | None = None) -> Output:
    """Answer the job's pending rows into OUTPUT: here (replicas None) or on Ray Data with `replicas` actors.
    progress(rows written, rows to do) after each batch. loras: {served name: peft LoRA folder}, chosen by
    a row's "model" (an export with --lora-slots)."""
    out = Output(Path(output_path), job.done, job.openai)
    finished = 0

    def on_rows(lines: list[str]) -> None:
        nonlocal finished
        finished += out.write(lines)
        if progress is not None:
            progress(finished, len(job.pending))

    worker = dict(model=model, provider=provider, threads=threads, max_batch=max_batch, prefix_cache_mb=prefix_cache_mb,
                  loras=loras)
    refused = [line for line in job.pending if line.startswith(REFUSED)]
    todo = [line for line in job.pending if not line.startswith(REFUSED)]
    try:
        try:
            if refused:  # rows that failed validation: their error lines need no engine
                on_rows([json.dumps(answer_refused(json.loads(line))) for line in refused])
            if not todo:
                pass  # everything is there already
            elif replicas is None:
                w = BatchWorker(**worker)
                try:
                    for start in range(0, len(todo), batch_size):
                        chunk = todo[start : start + batch_size]
                        on_rows([str(r) for r in w({"row": np.array(chunk, dtype=object)})["row"]])
                finally:
                    w.close()
            else:
                from gpt2_onnx.distributed.data import run_batch

                run_batch(todo, on_rows, worker=worker, replicas=replicas, address=ray_address, batch_size=batch_size)
        finally:
            out.close()  # flushed and fsynced, also when interrupted (Ctrl-C): a rerun resumes from there
    finally:
        job.release()
    return out


def answer_refused(row: dict) -> dict:
    """The output row of a row refused when the job was planned: its status and OpenAI-shaped error body."""
    from gpt2_onnx.server.errors import ApiError

    r = row["refused"]
    return {"id": row["id"], "status": r["status"], "body": ApiError(r["status"], r["message"], r["param"]).body()}


def run(input_path: Path, output_path: Path, *, model: str | None = None, provider: str = "auto",
        threads: int | None = None, max_batch: int | None = None, prefix_cache_mb: float = 512, batch_size: int = 64,
        replicas: int | None = None, ray_address: str | None = None,
        progress: Callable[[int, int], None] | None = None, loras: dict[str, str] | None = None) -> Output:
    """Answer every row of INPUT not yet in OUTPUT (prepare, then execute)."""
    job = prepare(input_path, output_path, batch_size=batch_size, max_batch=max_batch, replicas=replicas,
                  ray_address=ray_address)
    return execute(job, output_path, model=model, provider=provider, threads=threads, max_batch=max_batch,
                   prefix_cache_mb=prefix_cache_mb, batch_size=batch_size, replicas=replicas,
                   ray_address=ray_address, progress=progress, loras=loras)
