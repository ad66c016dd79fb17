"""The evaluation runner: task files in, one prediction row per (method, sample) out.

Protocol (the kvpress "question" protocol)
------------------------------------------
For each sample and method, with a fresh cache from the method's factory:

1. **prefill** the context (``sample["context"]``, tokenized with the tokenizer's
   special tokens, i.e. with BOS) into the cache in one forward call (or in chunks of
   ``prefill_chunk`` tokens). Compression happens here; the question is not yet known,
   so it can never help compression.
2. feed ``sample["question"] + sample["answer_prefix"]`` (no special tokens) through the
   same cache; its last logit gives the first answer token.
3. **decode** greedily up to ``sample["max_new_tokens"]`` tokens, stopping at an EOS
   token and, by default, at the first newline after some non-blank text. RULER itself
   decodes the full budget; every task we run answers on one line, and cutting the
   continuation can only remove text, so for ``string_match_*`` metrics the stop is
   never more lenient than RULER (``--no-stop-newline`` restores the full budget).

KV bytes are measured when decoding starts (after step 2): by then transformers'
sliding-window layers have dropped the view onto the whole prefill they hold right
after step 1, so the numbers are what the cache keeps while it answers.

Output layout (``DIR`` = ``--out``)
-----------------------------------
::

    DIR/tasks/<stem>.jsonl                      task samples (spectralcache.eval.tasks format;
                                                or <stem>.jsonl.gz, as published results keep them)
    DIR/predictions/<method-slug>/<stem>.jsonl  one row per sample (format below), appended
    DIR/predictions/<method-slug>/<stem>.summary.json   per-(method, task file) summary
    DIR/summary.json, DIR/summary.md            every summary in the directory (all methods)

``<stem>`` is ``<task>_<length>`` (e.g. ``niah_single_4096``) or, for the needle sweep,
``<task>_<length>_d<depth*100:03d>`` (``niah_single_4096_d025``). The method slug is
:attr:`spectralcache.eval.methods.Method.slug` (for peers: any directory-safe name).

Prediction row format (JSON object, one per line) -- outside drivers (``benchmarks/peers``)
write the same rows, into their own ``DIR/predictions/<slug>/<stem>.jsonl``:

=====================  ========  =================================================================
field                  required  meaning
=====================  ========  =================================================================
``id``                 yes       sample id from the task file (the join key)
``method``             yes       method name (groups rows; e.g. ``kvpress:snapkv,ratio=0.5``)
``prediction``         yes       decoded answer text (without the prompt)
``kv_bytes``           yes       bytes the cache holds when decoding starts, measured from tensor
                                 storage (``null`` only with ``error`` set)
``kv_bytes_full``      no        the same restricted to full-attention layers (what a compressor
                                 may touch)
``error``              yes       ``null``, or the exact error text when the method could not run
                                 this sample (such rows are reported, not scored)
``task``, ``target_length``, ``depth``, ``context_tokens``   copied from the sample
``score``              no        the scorer's value in [0, 1]; :func:`summarize` re-scores every
                                 row from the task file's answers, so peers may omit it
``baseline_kv_bytes``  no        the baseline's ``kv_bytes`` for the same id. A peer that measured
                                 its own uncompressed baseline (its environment, its transformers
                                 version) writes it here and :func:`summarize` uses it for the
                                 ratio; otherwise our baseline row for the id is used
                                 (``baseline_kv_bytes_full`` likewise)
``compression_ratio``  no        ``baseline_kv_bytes / kv_bytes`` (likewise);
                                 ``compression_ratio_full`` on full-attention layers
``prefill_s``          no        seconds for step 1; ``question_s`` step 2; ``decode_s`` step 3
``new_tokens``         no        tokens generated
``device``, ``dtype``, ``model``, ``seed``   run conditions
=====================  ========  =================================================================

Order: sample index outermost, then task file, then method (baseline first), so a run
stopped at any time leaves every method with the same (paired) samples.

A row is final once written; a resumed run skips every ``id`` that has a row without
``error`` in the method's file (rows with ``error`` are retried; the last row per id
wins). A partially written last line (killed process) is dropped on resume.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectralcache.eval.methods import (
    Method,
    full_attention_layers,
    measure_kv_bytes_per_layer,
    with_baseline_first,
)
from spectralcache.integrations.compat import cache_kwargs

SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------- paths
def task_stem(task: str, length: int, depth: float | None = None) -> str:
    if depth is None:
        return f"{task}_{int(length)}"
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    return f"{task}_{int(length)}_d{round(float(depth) * 100):03d}"


def task_path(out: Path, task: str, length: int, depth: float | None = None) -> Path:
    return Path(out) / "tasks" / f"{task_stem(task, length, depth)}.jsonl"


def predictions_path(out: Path, method_slug: str, stem: str) -> Path:
    return Path(out) / "predictions" / method_slug / f"{stem}.jsonl"


# ---------------------------------------------------------------------------- rows io
def read_rows(path: Path, *, repair: bool = False) -> list[dict]:
    """Rows of a predictions file; an unterminated last line (killed writer) is ignored,
    and with ``repair`` cut off so that appending continues on a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
        if repair:
            with path.open("r+b") as f:
                f.truncate(cut)
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON row ({err})") from None
    return rows


def latest_rows(rows: Iterable[dict]) -> dict[str, dict]:
    """Last row per sample id (a retried sample's new row replaces the failed one)."""
    out: dict[str, dict] = {}
    for r in rows:
        out[str(r["id"])] = r
    return out


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- decoding
@dataclass
class Answer:
    text: str
    new_tokens: int
    prefill_s: float
    question_s: float
    decode_s: float
    kv_bytes: int
    kv_bytes_full: int
    context_tokens: int


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    for tok in ("<end_of_turn>", "<eos>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Run ``ids`` [1, T] through the model into ``cache``; returns last-position logits.

    ``logits_to_keep=1`` matters: full logits of an 8K prompt over Gemma's 262K vocabulary
    would take 8 GiB.
    """
    step = ids.shape[1] if not chunk else int(chunk)
    logits = None
    for s in range(0, ids.shape[1], step):
        out = model(
            input_ids=ids[:, s : s + step], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1
        )
        logits = out.logits[:, -1]
    assert logits is not None
    return logits


@torch.inference_mode()
def answer(
    model: Any,
    tokenizer: Any,
    cache: Any,
    context: str,
    question: str,
    *,
    max_new_tokens: int,
    stop_newline: bool = True,
    prefill_chunk: int | None = None,
    one_call: bool = False,
) -> Answer:
    """The question protocol on one sample (see the module docstring).

    ``one_call``: prefill the context and the question in *one* forward (the same token ids), so
    the last prefill queries are the question's (``benchmarks/fidelity_study.py run --one-call``,
    for ``outlier_selection``'s observation window); ``prefill_s`` is then that call and
    ``question_s`` 0."""
    if one_call and prefill_chunk:
        raise ValueError("one_call prefills context and question in one forward; it takes no prefill_chunk")
    device = next(model.parameters()).device
    ctx = tokenizer(context, return_tensors="pt", add_special_tokens=True).input_ids.to(device)
    q = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    if q.shape[1] == 0:
        raise ValueError("empty question: the answer prefix must give the model something to continue")
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    _sync(device)
    t0 = time.perf_counter()
    if one_call:
        logits = prefill(model, cache, torch.cat([ctx, q], dim=1))
        _sync(device)
        t1 = t2 = time.perf_counter()
    else:
        prefill(model, cache, ctx, prefill_chunk)
        _sync(device)
        t1 = time.perf_counter()
        out = model(input_ids=q, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        _sync(device)
        t2 = time.perf_counter()
    per_layer = measure_kv_bytes_per_layer(cache)
    full = full_attention_layers(model.config)
    kv_full = sum(per_layer[i] for i in full if i < len(per_layer))
    kv_total = sum(per_layer)
    stops = eos_ids(model, tokenizer)
    generated: list[int] = []
    text = ""
    t3 = time.perf_counter()
    for _ in range(int(max_new_tokens)):
        nxt = int(logits.argmax(-1)[0])
        if nxt in stops:
            break
        generated.append(nxt)
        piece = tokenizer.decode([nxt])
        if stop_newline and "\n" in piece and text.strip():
            break
        text += piece
        if len(generated) == max_new_tokens:
            break
        logits = model(
            input_ids=torch.tensor([[nxt]], device=device), **cache_kwargs(model, cache), use_cache=True
        ).logits[:, -1]
    _sync(device)
    t4 = time.perf_counter()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if stop_newline:
        text = text.strip("\n").split("\n")[0] if text.strip() else text
    return Answer(
        text=text.strip(),
        new_tokens=len(generated),
        prefill_s=t1 - t0,
        question_s=t2 - t1,
        decode_s=t4 - t3,
        kv_bytes=int(kv_total),
        kv_bytes_full=int(kv_full),
        context_tokens=int(ctx.shape[1]),
    )


def sample_seed(seed: int, sample_id: str, method_name: str) -> int:
    """Per-(sample, method) torch seed: stable across runs, resumes and method order."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{sample_id}|{method_name}".encode())) % (2**31 - 1)


# ---------------------------------------------------------------------------- task files
def prepare_task_files(
    out: Path,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    depths: Sequence[float] | None = None,
) -> list[Path]:
    """Generate each (task, length[, depth]) file once; later runs reuse it unchanged, so
    every method (and every peer) answers exactly the same samples."""
    from spectralcache.eval.tasks import (
        TASKS,
        generate_samples,
        read_task_file,
        stored_task_file,
        write_task_file,
    )

    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; known tasks: {sorted(TASKS)}")
    paths = []
    for task in tasks:
        for length in lengths:
            for depth in depths if depths is not None else [None]:
                path = stored_task_file(task_path(out, task, length, depth))
                if path.exists():
                    have = read_task_file(path)
                    if len(have) < samples:
                        raise ValueError(
                            f"{path} holds {len(have)} samples but --samples {samples} was asked; "
                            "use a new --out directory or a smaller --samples"
                        )
                else:
                    rows = generate_samples(
                        task,
                        tokenizer=tokenizer,
                        length=int(length),
                        num_samples=samples,
                        seed=seed,
                        depth=depth,
                    )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".jsonl.tmp")
                    write_task_file(tmp, rows)
                    tmp.replace(path)
                paths.append(path)
    return paths


# ---------------------------------------------------------------------------- the run
@dataclass
class RunOptions:
    out: Path
    samples: int
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    model_name: str = "gemma3-270m"
    stop_newline: bool = True
    prefill_chunk: int | None = None
    max_new_tokens: int | None = None  # override of the sample's budget (None: the sample's)
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


def run_one(model: Any, tokenizer: Any, sample: dict, method: Method, opts: RunOptions) -> dict:
    """One (sample, method): a prediction row (``error`` set instead of raising)."""
    from spectralcache.eval.scoring import score

    s = sample
    torch.manual_seed(sample_seed(opts.seed, str(s["id"]), method.name))
    row: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "id": str(s["id"]),
        "method": method.name,
        "task": s["task"],
        "target_length": s["target_length"],
        "depth": s.get("depth"),
        "context_tokens": s.get("context_tokens"),
        "device": opts.device,
        "dtype": opts.dtype,
        "model": opts.model_name,
        "seed": opts.seed,
        "answers": s["answers"],
        "metric": s["metric"],
    }
    try:
        row["method_config"] = method.describe()
        cache = method.make_cache(model)
        a = answer(
            model,
            tokenizer,
            cache,
            s["context"],
            s["question"] + s["answer_prefix"],
            max_new_tokens=opts.max_new_tokens or s["max_new_tokens"],
            stop_newline=opts.stop_newline,
            prefill_chunk=opts.prefill_chunk,
        )
        del cache
        row.update(
            prediction=a.text,
            score=float(score(s["metric"], a.text, s["answers"])),
            kv_bytes=a.kv_bytes,
            kv_bytes_full=a.kv_bytes_full,
            context_tokens=a.context_tokens,
            prefill_s=round(a.prefill_s, 4),
            question_s=round(a.question_s, 4),
            decode_s=round(a.decode_s, 4),
            new_tokens=a.new_tokens,
            error=None,
        )
    except (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError, AssertionError) as err:
        row.update(prediction="", score=None, kv_bytes=None, error=f"{type(err).__name__}: {err}")
    return row


def run_task_files(
    model: Any, tokenizer: Any, task_files: Sequence[Path], methods: Sequence[Method], opts: RunOptions
) -> list[dict]:
    """Every method on the first ``opts.samples`` samples of every task file.

    Order: sample index outermost, then task file, then method (baseline first). So
    whenever a long CPU run is stopped, every method and task has answered the same
    samples (paired comparisons), and a resumed run continues where it stopped:
    finished (method, id) pairs are skipped.
    """
    from spectralcache.eval.tasks import read_task_file, task_file_stem

    methods = with_baseline_first(list(methods))
    files = [(task_file_stem(f), read_task_file(f)[: opts.samples]) for f in task_files]
    done: dict[tuple[str, str], dict[str, dict]] = {}
    for stem, _ in files:
        for m in methods:
            done[(m.slug, stem)] = latest_rows(
                read_rows(predictions_path(opts.out, m.slug, stem), repair=True)
            )

    def finished(m: Method, stem: str, sid: str) -> bool:
        r = done[(m.slug, stem)].get(sid)
        return r is not None and r.get("error") is None

    total = sum(len(samples) for _, samples in files) * len(methods)
    left = sum(
        not finished(m, stem, str(s["id"])) for stem, samples in files for s in samples for m in methods
    )
    bar = _progress(total, "eval", opts.progress)
    bar.update(total - left)
    failed: dict[str, str] = {}
    for i in range(max((len(x) for _, x in files), default=0)):
        for stem, samples in files:
            if i >= len(samples):
                continue
            s = samples[i]
            sid = str(s["id"])
            base = done[(methods[0].slug, stem)].get(sid)
            for m in methods:
                if finished(m, stem, sid):
                    continue
                bar.set_description(f"{stem} #{i} {m.name}")
                row = run_one(model, tokenizer, s, m, opts)
                _fill_ratio(row, base)
                if m.is_baseline and row["error"] is None:
                    base = row
                path = predictions_path(opts.out, m.slug, stem)
                append_row(path, row)
                done[(m.slug, stem)][sid] = row
                bar.update(1)
                if row["error"] is not None:
                    if failed.get(m.name) != row["error"]:
                        bar.write(f"[{m.name}] {sid}: {row['error']}")
                    failed[m.name] = row["error"]
                else:
                    bar.set_postfix(
                        score=f"{row['score']:.2f}", ratio=f"{row.get('compression_ratio') or 1:.2f}"
                    )
    bar.close()
    return [summarize_file(opts.out, m.slug, stem) for stem, _ in files for m in methods]


def _fill_ratio(row: dict, base: dict | None) -> None:
    """Compression ratios against the baseline row of the same sample (if it ran)."""
    if row.get("kv_bytes") in (None, 0):
        return
    if row["method"] == "baseline":
        row.update(baseline_kv_bytes=row["kv_bytes"], compression_ratio=1.0, compression_ratio_full=1.0)
        return
    if base is None or base.get("error") is not None or not base.get("kv_bytes"):
        return
    row["baseline_kv_bytes"] = base["kv_bytes"]
    row["compression_ratio"] = base["kv_bytes"] / row["kv_bytes"]
    if base.get("kv_bytes_full") and row.get("kv_bytes_full"):
        row["compression_ratio_full"] = base["kv_bytes_full"] / row["kv_bytes_full"]


# ---------------------------------------------------------------------------- summaries
def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _stem_depth(stem: str) -> float | None:
    last = stem.rsplit("_", 1)[-1]
    return int(last[1:]) / 100 if last.startswith("d") and last[1:].isdigit() else None


def _rescore(samples: dict[str, dict], rows: dict[str, dict], where: str) -> dict[str, float]:
    """``{id: score}`` of the rows answered without error, scored again from the task file's
    answers (a row's own ``score`` field is not trusted: peers write theirs)."""
    from spectralcache.eval.scoring import score_sample

    scores = {}
    for sid, r in rows.items():
        if sid not in samples:
            raise ValueError(f"{where}: prediction for unknown sample id {sid!r}")
        if r.get("error") is None:
            scores[sid] = float(score_sample(samples[sid], r["prediction"]))
    return scores


def sample_scores(out: Path, method_slug: str, stem: str) -> dict[str, float]:
    """Each answered sample's score as :func:`summarize_file` counts it (re-scored from the task
    file), by sample id: what a paired comparison of two methods reads."""
    from spectralcache.eval.tasks import read_task_file

    out = Path(out)
    samples = {str(s["id"]): s for s in read_task_file(out / "tasks" / f"{stem}.jsonl")}
    rows = latest_rows(read_rows(predictions_path(out, method_slug, stem)))
    return _rescore(samples, rows, f"{method_slug}/{stem}")


def summarize_file(out: Path, method_slug: str, stem: str) -> dict:
    """Score (again, from the task file's answers) and summarize one predictions file."""
    from spectralcache.eval.tasks import read_task_file

    out = Path(out)
    samples = {str(s["id"]): s for s in read_task_file(out / "tasks" / f"{stem}.jsonl")}
    rows = latest_rows(read_rows(predictions_path(out, method_slug, stem)))
    base_rows = latest_rows(read_rows(predictions_path(out, "baseline", stem)))
    scores = _rescore(samples, rows, f"{method_slug}/{stem}")
    scored, errors, ratios, ratios_full, agree = [], [], [], [], []
    kv, kv_full, base_kv, pre, dec, ntok = [], [], [], [], [], []
    method = None
    for sid, r in rows.items():
        method = r.get("method", method)
        if r.get("error") is not None:
            errors.append(r["error"])
            continue
        scored.append(scores[sid])
        b = base_rows.get(sid)
        if b is not None and b.get("error") is None:
            agree.append(float(r["prediction"].strip() == b["prediction"].strip()))
        if r.get("kv_bytes"):
            kv.append(r["kv_bytes"])
            # A row that measured its own baseline (a peer driver, in its own environment)
            # is compared with that; otherwise with our baseline row for the same sample.
            own_b, own_bf = r.get("baseline_kv_bytes"), r.get("baseline_kv_bytes_full")
            if own_b and r.get("method") != "baseline":
                base_kv.append(own_b)
                ratios.append(own_b / r["kv_bytes"])
                if own_bf and r.get("kv_bytes_full"):
                    ratios_full.append(own_bf / r["kv_bytes_full"])
                elif r.get("compression_ratio_full"):
                    ratios_full.append(r["compression_ratio_full"])
            elif b and b.get("error") is None and b.get("kv_bytes"):
                base_kv.append(b["kv_bytes"])
                ratios.append(b["kv_bytes"] / r["kv_bytes"])
                if b.get("kv_bytes_full") and r.get("kv_bytes_full"):
                    ratios_full.append(b["kv_bytes_full"] / r["kv_bytes_full"])
        if r.get("kv_bytes_full"):
            kv_full.append(r["kv_bytes_full"])
        pre.append(r.get("prefill_s"))
        dec.append(r.get("decode_s"))
        ntok.append(r.get("new_tokens"))
    first = next(iter(samples.values()))
    summary = {
        "method": method or method_slug,
        "method_slug": method_slug,
        "stem": stem,
        "task": first["task"],
        "target_length": first["target_length"],
        # the depth asked for (from the file name); samples record where the needle landed
        "depth": _stem_depth(stem),
        "placed_depth_mean": _mean([x.get("depth") for x in samples.values()])
        if _stem_depth(stem) is not None
        else None,
        "n": len(scored),
        "n_errors": len(errors),
        "first_error": errors[0] if errors else None,
        "score": 100.0 * _mean(scored) if scored else None,
        # fidelity independent of the ceiling: identical answer text to the baseline's
        "agree_with_baseline": 100.0 * _mean(agree) if agree else None,
        "kv_bytes": _mean(kv),
        "kv_bytes_full": _mean(kv_full),
        "baseline_kv_bytes": _mean(base_kv),
        "compression_ratio": _mean(ratios),
        "compression_ratio_full": _mean(ratios_full),
        "prefill_s": _mean(pre),
        "decode_s": _mean(dec),
        "new_tokens": _mean(ntok),
        "device": next((r.get("device") for r in rows.values()), None),
        "dtype": next((r.get("dtype") for r in rows.values()), None),
    }
    path = predictions_path(out, method_slug, stem).with_suffix(".summary.json")
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def task_summaries(out: Path) -> list[dict]:
    """:func:`summarize_file` of every predictions file under ``out`` whose task file is there
    (ours and peers'), by method folder then task file; nothing written but each file's summary."""
    from spectralcache.eval.tasks import stored_task_file

    out = Path(out)
    return [
        summarize_file(out, mdir.name, f.stem)
        for mdir in sorted(p for p in (out / "predictions").glob("*") if p.is_dir())
        for f in sorted(mdir.glob("*.jsonl"))
        if stored_task_file(out / "tasks" / f.name).exists()
    ]


def summarize(out: Path) -> list[dict]:
    """Summaries of every predictions file under ``out`` (ours and peers'), written to
    ``summary.json`` and a markdown table ``summary.md``."""
    out = Path(out)
    summaries = task_summaries(out)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(summary_table(summaries))
    return summaries


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def summary_table(summaries: list[dict]) -> str:
    """Markdown: one row per (task file, method), baseline first within each file."""
    rows = sorted(
        summaries,
        key=lambda s: (
            s["task"],
            s["target_length"],
            s["depth"] or 0,
            s["method"] != "baseline",
            s["method"],
        ),
    )
    lines = [
        "| task | length | depth | method | n | score % | same answer as baseline % | KV MiB | ratio (all layers) | ratio (full-attn layers) "
        "| prefill s | decode s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        err = f"{s['n_errors']}: {s['first_error'][:60]}" if s["n_errors"] else ""
        kv = None if s["kv_bytes"] is None else s["kv_bytes"] / 2**20
        lines.append(
            f"| {s['task']} | {s['target_length']} | {_fmt(s['depth'], '.2f')} | {s['method']} | {s['n']} "
            f"| {_fmt(s['score'], '.1f')} | {_fmt(s.get('agree_with_baseline'), '.0f')} | {_fmt(kv, '.2f')} | {_fmt(s['compression_ratio'], '.2f')} "
            f"| {_fmt(s['compression_ratio_full'], '.2f')} | {_fmt(s['prefill_s'], '.2f')} "
            f"| {_fmt(s['decode_s'], '.2f')} | {err} |"
        )
    return "\n".join(lines) + "\n"


def run_eval(
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[Method],
    opts: RunOptions,
    *,
    depths: Sequence[float] | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> list[dict]:
    """Generate/reuse task files, run every method on them, write all summaries."""
    if opts.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {opts.samples}")
    if model is None or tokenizer is None:
        from spectralcache.eval.model import load_model

        model, tokenizer = load_model(opts.model_name, device=opts.device, dtype=opts.dtype)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    files = prepare_task_files(out, tokenizer, tasks, lengths, opts.samples, opts.seed, depths)
    run_task_files(model, tokenizer, files, methods, opts)
    return summarize(out)
