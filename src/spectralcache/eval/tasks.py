"""RULER-style synthetic tasks, generated offline and deterministically from a seed.

Public API (used by the runner, the demo and the kvpress peers):

* ``TASKS``: task name -> task object (a frozen dataclass per task family).
* ``generate_samples(task, *, tokenizer, length, num_samples, seed, depth=None)``:
  a list of JSON-serialisable sample dicts with keys ``id, task, target_length,
  prompt_tokens, context_tokens, depth, seed, context, question, answer_prefix,
  answers, metric, max_new_tokens`` (plus a few descriptive extras: ``phrasing``,
  ``haystack``, ``source``).
* ``write_task_file(path, samples)`` / ``read_task_file(path)``: JSONL (``.jsonl.gz``: gzipped).
* ``verify_sample(sample)``: the structural checks (answer placed exactly once, ...).

Protocol (as in kvpress): the runner prefills ``context`` (the only part a cache may
compress), then feeds ``question + answer_prefix`` and decodes greedily for
``max_new_tokens``; the score is ``scoring.score(metric, prediction, answers)``.
``context`` never contains the question, so query-aware compression cannot use it.
Concatenated, ``context + question + answer_prefix`` is exactly RULER's prompt for a
base model (RULER's "base" template is the bare task template), except where a
deviation is documented below. The tokenizer adds BOS; no chat template.

``target_length`` is the token count of the whole prompt in the given tokenizer
(``len(tokenizer(context + question + answer_prefix).input_ids)``, BOS included);
generated samples are within 2% of it (typically within one haystack unit). The
haystack size is fitted per sample by a secant search over the number of haystack
units, measuring the real token count each step (2-4 tokenizer calls per sample).

Randomness: every sample draws from ``random.Random("<rng_name>|<seed>|<index>")``.
The draws that do not depend on the haystack size (keys, values, needle depths, the
prose start) come first, so a given (seed, index) has the same needle at every length
and depth: sweeps over length x depth vary only what they claim to vary. Tasks that
differ only in phrasing share ``rng_name`` and thus have identical needles.

Task names follow RULER's ``synthetic.yaml``:

==================== =========== ========= ========= =============================
name                 haystack    keys      values    needles (k / v / q)
==================== =========== ========= ========= =============================
niah_single_1        noise       words     numbers   1 / 1 / 1
niah_single_1_plural noise       words     numbers   1 / 1 / 1, plural phrasing
niah_single_2        prose       words     numbers   1 / 1 / 1
niah_single_3        prose       words     uuids     1 / 1 / 1
niah_multikey_1      prose       words     numbers   4 / 1 / 1
niah_multikey_2      needles     words     numbers   1 / 1 / 1
niah_multikey_3      needles     uuids     uuids     1 / 1 / 1
niah_multivalue      prose       words     numbers   1 / 4 / 1
niah_multiquery      prose       words     numbers   4 / 1 / 4
vt                   noise       variable tracking, 1 chain, 4 hops, one worked example
cwe                  word list   10 common words (x30) among uncommon (x3); <4K: x6 / x1
fwe                  coded words Zipf(alpha=2) text, the three most frequent words
==================== =========== ========= ========= =============================

"prose" is the Python reference manual (``pydoc_data.topics``, see ``haystack``) in
place of RULER's Paul Graham essays; "needles" is a haystack of distractor needles.

Phrasing: RULER writes its niah template in the plural ("Some special magic numbers are
hidden ...") and rewrites it to the singular ("A special magic number is hidden ...",
"What is the special magic number ...") when one value is asked for; ``niah_single_1``
is that exact RULER prompt. ``niah_single_1_plural`` keeps the plural wording although
one value is asked for (same needles). ``docs/eval_protocol.md`` says which one the
fidelity comparisons use and why (measured).

Documented deviations from RULER: the trailing space of vt's answer prefix is dropped
(a SentencePiece tokenizer would otherwise end the prompt in a lone space token); vt's
worked example keeps its question intact (RULER's base-model path truncates the word
"above." from it) and cwe's worked example has a space after "are:"; cwe's worked
example uses words disjoint from the real list, and distractor keys/values never
contain the real ones as substrings, so "answer present exactly once" holds.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import math
import os
import random
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectralcache.eval import haystack as hs

METRICS = ("string_match_all", "string_match_part")
SAMPLE_KEYS = (
    "id",
    "task",
    "target_length",
    "context_tokens",
    "depth",
    "seed",
    "context",
    "question",
    "answer_prefix",
    "answers",
    "metric",
    "max_new_tokens",
)
LENGTH_TOLERANCE = 0.02
MAX_LENGTH = 1_048_576
# RULER's needle depths: 40 points on 0..100 %, drawn without replacement per sample.
DEPTH_GRID: tuple[float, ...] = tuple(round(100 * i / 39) / 100 for i in range(40))


@dataclass
class Draft:
    """One sample before its length is known to fit: the text parts and the answers."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix


# --------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Task:
    """A task family instance. Subclasses implement :meth:`draft` and :meth:`verify`.

    ``draft(rng_key, units, depth, target_length)`` must be a pure function of its
    arguments, and its token count must grow (roughly linearly) with ``units``.
    """

    name: str
    metric: str = "string_match_all"
    max_new_tokens: int = 32
    rng_name: str = ""
    supports_depth: bool = False
    min_units: int = 1
    tokens_per_unit: float = 20.0  # first guess only; the fit measures

    def rng_key(self, seed: int, index: int) -> str:
        return f"{self.rng_name or self.name}|{seed}|{index}"

    def draft(self, key: str, units: int, depth: float | None, target_length: int) -> Draft:
        raise NotImplementedError

    def verify(self, sample: dict[str, Any]) -> None:
        raise NotImplementedError


def _plural_to_singular(kind: str) -> str:
    return kind[:-1]  # RULER: "numbers" -> "number", "uuids" -> "uuid"


def _clashes(candidate: str, taken: Iterable[str]) -> bool:
    """True if either string contains the other (so a substring match could be fooled)."""
    return any(candidate in t or t in candidate for t in taken)


@functools.lru_cache(maxsize=1)
def _prose_corpus() -> str:
    return "\n".join(hs.prose_sentences())


# --------------------------------------------------------------------------- niah


@dataclass(frozen=True)
class NiahTask(Task):
    """Needle(s) in a haystack: "One of the special magic {values} for {key} is: {value}."."""

    haystack: str = "noise"  # noise | prose | needles
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    phrasing: str = "ruler"  # ruler (singular rewrite for one value, as RULER) | plural
    supports_depth: bool = True

    NEEDLE = "One of the special magic {kind} for {key} is: {value}."

    def _draws(self, key: str, depth: float | None):
        rng = random.Random(key)
        taken: list[str] = []
        corpus = _prose_corpus() if self.haystack == "prose" else ""

        def fresh(kind: str) -> str:
            while True:
                v = hs.random_value(kind, rng)
                if not _clashes(v, taken) and v not in corpus:
                    taken.append(v)
                    return v

        keys = [fresh(self.key_type) for _ in range(self.num_keys)]
        values = [[fresh(self.value_type) for _ in range(self.num_values)] for _ in keys]
        needles = [(ki, vi) for ki in range(len(keys)) for vi in range(self.num_values)]
        rng.shuffle(needles)
        queried = rng.sample(range(self.num_keys), self.num_queries)
        depths = [d for d in rng.sample(DEPTH_GRID, len(needles))]
        answers = [values[k][v] for k in queried for v in range(self.num_values)]
        # the first answer's needle is the one whose depth the caller controls
        first = needles.index((queried[0], 0))
        if depth is not None:
            depths[first] = depth
        start = rng.randrange(len(hs.prose_sentences())) if self.haystack == "prose" else 0
        return keys, values, needles, queried, depths, answers, first, start, taken

    def _distractors(self, key: str, count: int, taken: list[str]) -> list[str]:
        rng = random.Random(key + "|distractors")
        out = []
        while len(out) < count:
            k = hs.random_value(self.key_type, rng)
            v = hs.random_value(self.value_type, rng)
            if _clashes(k, taken) or _clashes(v, taken):
                continue
            out.append(self.NEEDLE.format(kind=self.value_type, key=k, value=v))
        return out

    def _texts(self, query: str) -> tuple[str, str, str]:
        single = self.num_queries * self.num_values == 1 and self.phrasing == "ruler"
        if single:
            kind = _plural_to_singular(self.value_type)
            pre = (
                f"A special magic {kind} is hidden within the following text. "
                f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
            )
            q = f"\nWhat is the special magic {kind} for {query} mentioned in the provided text?"
            ap = f" The special magic {kind} for {query} mentioned in the provided text is"
        else:
            kind = self.value_type
            pre = (
                f"Some special magic {kind} are hidden within the following text. "
                f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
            )
            q = f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
            ap = f" The special magic {kind} for {query} mentioned in the provided text are"
        return pre, q, ap

    def draft(self, key: str, units: int, depth: float | None, target_length: int) -> Draft:
        keys, values, needles, queried, depths, answers, first, start, taken = self._draws(key, depth)
        texts = [
            self.NEEDLE.format(kind=self.value_type, key=keys[k], value=values[k][v]) for k, v in needles
        ]
        if self.haystack == "noise":
            units_text = [hs.NOISE] * units
            sep = "\n"
        elif self.haystack == "prose":
            # units are words (as in RULER); needles go between sentences
            units_text = [" ".join(ws) for ws in hs.prose_words(start, units)]
            sep = " "
        elif self.haystack == "needles":
            units_text = self._distractors(key, units, taken)
            sep = "\n"
        else:
            raise ValueError(f"unknown haystack {self.haystack!r}")
        slots = len(units_text)
        positions = [math.floor(d * slots) for d in depths]
        order = sorted(range(len(texts)), key=lambda i: (positions[i], i))
        pieces: list[str] = []
        j = 0
        for i in order:
            pieces.extend(units_text[j : positions[i]])
            j = max(j, positions[i])
            pieces.append(texts[i])
        pieces.extend(units_text[j:])
        ks = [keys[k] for k in queried]
        query = ", ".join(ks[:-1]) + ", and " + ks[-1] if len(ks) > 1 else ks[0]
        pre, q, ap = self._texts(query)
        extra = {
            "haystack": self.haystack,
            "phrasing": self.phrasing,
            "needle_depths": [positions[i] / slots if slots else 0.0 for i in range(len(texts))],
        }
        if self.haystack == "prose":
            extra["source"] = hs.prose_source()
        return Draft(
            context=pre + sep.join(pieces),
            question=q,
            answer_prefix=ap,
            answers=answers,
            depth=positions[first] / slots if slots else 0.0,
            extra=extra,
        )

    def verify(self, sample: dict[str, Any]) -> None:
        ctx = sample["context"]
        for a in sample["answers"]:
            n = ctx.count(a)
            if n != 1:
                raise ValueError(f"{sample['id']}: answer {a!r} occurs {n} times in the context")
            if a in sample["question"] or a in sample["answer_prefix"]:
                raise ValueError(f"{sample['id']}: answer {a!r} leaks into the question")
        if len(sample["answers"]) != self.num_queries * self.num_values:
            raise ValueError(f"{sample['id']}: expected {self.num_queries * self.num_values} answers")


# --------------------------------------------------------------------------- vt


@dataclass(frozen=True)
class VariableTrackingTask(Task):
    """RULER variable tracking: "VAR X = 12345" then "VAR Y = VAR X" hops in noise; find all.

    As in RULER, one worked example (3-letter variables, a short noise haystack) comes
    first; it is part of the context and asks about a different value.
    """

    num_chains: int = 1
    num_hops: int = 4
    example_units: int = 20

    INSTR = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"

    def _question(self, value: str) -> tuple[str, str]:
        q = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        ap = (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{self.num_hops + 1} variables are assgined the value {value}, they are:"
        )
        return q, ap

    @staticmethod
    def _chains(rng: random.Random, num_chains: int, num_hops: int, letters: int, avoid: set[str]):
        names: list[str] = []
        while len(names) < num_chains * (num_hops + 1):
            v = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if v not in names and not _clashes(v, avoid):
                names.append(v)
        chains, values, var_lists = [], [], []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
            while True:
                value = str(rng.randint(10000, 99999))
                if value not in values and not _clashes(value, avoid):
                    break
            values.append(value)
            chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
            chains.append(chain)
            var_lists.append(vs)
        return var_lists, chains, values

    @staticmethod
    def _noise_with_chains(chains, fractions, units: int) -> str:
        sentences = [hs.NOISE + "\n"] * units
        for chain, fr in zip(chains, fractions):
            positions = sorted(math.floor(f * units) for f in fr)
            for j, (p, element) in enumerate(zip(positions, chain)):
                sentences.insert(p + j, element)
        return " ".join(sentences).replace(". \n", ".\n")

    def draft(self, key: str, units: int, depth: float | None, target_length: int) -> Draft:
        rng = random.Random(key)
        vars_, chains, values = self._chains(rng, self.num_chains, self.num_hops, 5, set())
        fractions = [[rng.random() for _ in chain] for chain in chains]
        avoid = {v for vs in vars_ for v in vs} | set(values)
        ex_vars, ex_chains, ex_values = self._chains(rng, self.num_chains, self.num_hops, 3, avoid)
        ex_fracs = [[rng.random() for _ in chain] for chain in ex_chains]
        ex_q, ex_ap = self._question(ex_values[0])
        example = (
            self.INSTR
            + self._noise_with_chains(ex_chains, ex_fracs, self.example_units)
            + ex_q
            + ex_ap
            + " "
            + " ".join(ex_vars[0])
            + "\n\n"
        )
        q, ap = self._question(values[0])
        context = example + self.INSTR + self._noise_with_chains(chains, fractions, units)
        return Draft(
            context=context,
            question=q,
            answer_prefix=ap,
            answers=list(vars_[0]),
            extra={"haystack": "noise", "example_answers": list(ex_vars[0])},
        )

    def verify(self, sample: dict[str, Any]) -> None:
        ctx = sample["context"]
        if len(sample["answers"]) != self.num_hops + 1:
            raise ValueError(f"{sample['id']}: expected {self.num_hops + 1} answers")
        for a in sample["answers"]:
            n = ctx.count(f"VAR {a} =")
            if n != 1:
                raise ValueError(f"{sample['id']}: variable {a!r} assigned {n} times")
        value = sample["answer_prefix"].split("the value ")[-1].split(",")[0]
        if ctx.count(f"= {value}") != 1:
            raise ValueError(f"{sample['id']}: value {value!r} not assigned exactly once")


# --------------------------------------------------------------------------- cwe


@dataclass(frozen=True)
class CommonWordsTask(Task):
    """RULER common words extraction: a numbered word list, the 10 most frequent words.

    RULER's frequencies: common x30 / uncommon x3 (example list 40 words, x10 / x3) at
    4K and above; below 4K common x6 / uncommon x1 (example 20 words, x3 / x1).
    """

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    short_threshold: int = 4096

    INSTR = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )

    @property
    def question_text(self) -> str:
        return f"\nQuestion: What are the {self.num_cw} most common words in the above list?"

    @property
    def answer_text(self) -> str:
        return f" Answer: The top {self.num_cw} words that appear most often in the list are:"

    def _freqs(self, target_length: int) -> tuple[int, int, int, int, int]:
        """(example words, example common x, example uncommon x, common x, uncommon x)."""
        if target_length < self.short_threshold:
            return 20, 3, 1, 6, 1
        return 40, 10, 3, self.freq_cw, self.freq_ucw

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def _pool_base() -> tuple[str, ...]:
        words = hs.english_words()
        # drop words contained in another one ("old" in "bold"): substring scoring could credit them
        return tuple(w for w in words if not any(w != o and w in o for o in words))

    def _listing(self, words: list[str], common_x: int, uncommon_x: int, rng: random.Random) -> str:
        entries = words[: self.num_cw] * common_x + words[self.num_cw :] * uncommon_x
        rng.shuffle(entries)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))

    def draft(self, key: str, units: int, depth: float | None, target_length: int) -> Draft:
        rng = random.Random(key)
        base = list(self._pool_base())
        rng.shuffle(base)
        n_ex, ex_c, ex_u, c, u = self._freqs(target_length)
        example_words = base[:n_ex]
        main = base[n_ex:]
        num_words = max(units, self.num_cw + 1)
        if num_words > len(main):
            main = main + hs.pseudo_words(num_words - len(main), exclude=frozenset(base))
        words = main[:num_words]
        ex_listing = self._listing(example_words, ex_c, ex_u, rng)
        ex_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[: self.num_cw]))
        example = self.INSTR + ex_listing + self.question_text + self.answer_text + " " + ex_answer + "\n"
        context = example + self.INSTR + self._listing(words, c, u, rng)
        return Draft(
            context=context,
            question=self.question_text,
            answer_prefix=self.answer_text,
            answers=words[: self.num_cw],
            extra={"freq_common": c, "freq_uncommon": u, "num_words": num_words},
        )

    def verify(self, sample: dict[str, Any]) -> None:
        ctx = sample["context"]
        main = ctx[ctx.rindex(self.INSTR) + len(self.INSTR) :]
        counts = Counter(tok for tok in main.split() if not tok.endswith("."))
        c = sample.get("freq_common", self.freq_cw)
        u = sample.get("freq_uncommon", self.freq_ucw)
        for a in sample["answers"]:
            if counts[a] != c:
                raise ValueError(f"{sample['id']}: common word {a!r} occurs {counts[a]} times, expected {c}")
        others = {w: n for w, n in counts.items() if w not in sample["answers"]}
        if others and max(others.values()) != u:
            raise ValueError(f"{sample['id']}: uncommon words occur up to {max(others.values())} times")


# --------------------------------------------------------------------------- fwe


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1 (partial sum + Euler-Maclaurin tail); no scipy needed."""
    if alpha <= 1:
        raise ValueError("zeta needs alpha > 1")
    s = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return s + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


@dataclass(frozen=True)
class FrequentWordsTask(Task):
    """RULER frequent words extraction: Zipf-distributed coded words; name the top three.

    As in RULER the most frequent "word" is the noise token "..." and the answers are
    ranks 2-4; the vocabulary has ``target_length // 50`` coded words of 6 letters.
    """

    alpha: float = 2.0
    coded_wordlen: int = 6

    INSTR = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. "
    )
    QUESTION = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"

    def draft(self, key: str, units: int, depth: float | None, target_length: int) -> Draft:
        rng = random.Random(key)
        vocab_size = max(target_length // 50, 10)
        vocab = hs.coded_words(rng, vocab_size, self.coded_wordlen)
        vocab[0] = "..."
        z = _zeta(self.alpha)
        counts = [int(units * (k**-self.alpha) / z) for k in range(1, vocab_size + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(words)
        return Draft(
            context=self.INSTR + " ".join(words),
            question=self.QUESTION,
            answer_prefix=self.ANSWER,
            answers=vocab[1:4],
            extra={"num_words": units},
        )

    def verify(self, sample: dict[str, Any]) -> None:
        text = sample["context"][len(self.INSTR) :]
        counts = Counter(w for w in text.split() if w != "...")
        top = [w for w, _ in counts.most_common()]
        if len(top) < 4 or set(top[:3]) != set(sample["answers"]):
            raise ValueError(f"{sample['id']}: answers are not the three most frequent words")
        if counts[top[2]] <= counts[top[3]]:
            raise ValueError(f"{sample['id']}: third and fourth most frequent words tie")


# --------------------------------------------------------------------------- registry

_NIAH_TOKENS = 32
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        NiahTask("niah_single_1", haystack="noise", max_new_tokens=_NIAH_TOKENS, tokens_per_unit=21),
        NiahTask(
            "niah_single_1_plural",
            haystack="noise",
            phrasing="plural",
            rng_name="niah_single_1",
            max_new_tokens=_NIAH_TOKENS,
            tokens_per_unit=21,
        ),
        NiahTask("niah_single_2", haystack="prose", max_new_tokens=_NIAH_TOKENS, tokens_per_unit=30),
        NiahTask(
            "niah_single_3", haystack="prose", value_type="uuids", max_new_tokens=64, tokens_per_unit=30
        ),
        NiahTask(
            "niah_multikey_1", haystack="prose", num_keys=4, max_new_tokens=_NIAH_TOKENS, tokens_per_unit=30
        ),
        NiahTask("niah_multikey_2", haystack="needles", max_new_tokens=_NIAH_TOKENS, tokens_per_unit=22),
        NiahTask(
            "niah_multikey_3",
            haystack="needles",
            key_type="uuids",
            value_type="uuids",
            max_new_tokens=64,
            tokens_per_unit=60,
        ),
        NiahTask("niah_multivalue", haystack="prose", num_values=4, max_new_tokens=96, tokens_per_unit=30),
        NiahTask(
            "niah_multiquery",
            haystack="prose",
            num_keys=4,
            num_queries=4,
            max_new_tokens=96,
            tokens_per_unit=30,
        ),
        VariableTrackingTask("vt", max_new_tokens=32, tokens_per_unit=21),
        CommonWordsTask("cwe", max_new_tokens=120, min_units=11, tokens_per_unit=18),
        FrequentWordsTask("fwe", max_new_tokens=50, min_units=200, tokens_per_unit=3.3),
    )
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a task name (str), got {type(task).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


# --------------------------------------------------------------------------- fitting

TokenCounter = Callable[[str], int]


def token_counter(tokenizer: Any) -> TokenCounter:
    """Count tokens the way the runner feeds them: ``tokenizer(text)`` with special tokens (BOS)."""
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}"
        )

    def count(text: str) -> int:
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return len(ids)

    return count


def _good_enough(target: int) -> float:
    """Fit error at which the search stops early: 0.25% of the target, at least 2 tokens."""
    return max(2.0, 0.0025 * target)


def _fit(
    task: Task,
    key: str,
    target: int,
    depth: float | None,
    count: TokenCounter,
    hint: tuple[int, float] | None,
) -> tuple[Draft, int, int, float]:
    """Find the haystack size whose prompt is closest to ``target`` tokens.

    Secant steps on the measured token count, then bisection between the closest sizes
    below and above the target; each step tokenizes one full prompt. ``hint`` is the
    (size, tokens-per-unit) found for the previous sample, which is usually within a
    unit or two. Returns (draft, units, prompt_tokens, tokens-per-unit).
    """
    cache: dict[int, tuple[int, Draft]] = {}

    def measure(n: int) -> int:
        if n not in cache:
            d = task.draft(key, n, depth, target)
            cache[n] = (count(d.prompt), d)
        return cache[n][0]

    lo = task.min_units
    if hint is None:
        t_lo = measure(lo)
        if t_lo > target * (1 + LENGTH_TOLERANCE):
            raise ValueError(
                f"length {target} is too short for task {task.name!r}: its prompt with the smallest "
                f"haystack already has {t_lo} tokens"
            )
        n = max(lo + 1, lo + round((target - t_lo) / task.tokens_per_unit))
        t = measure(n)
        slope = max((t - t_lo) / (n - lo), 1e-3)
    else:
        n, slope = max(hint[0], lo), hint[1]
        t = measure(n)
    for _ in range(8):  # secant: lands within a unit or two of the target
        step = round((target - t) / slope)
        if step == 0:
            break
        n_new = max(lo, n + step)
        if n_new in cache:
            break
        t_new = measure(n_new)
        if t_new != t and n_new != n:
            slope = max((t_new - t) / (n_new - n), 1e-3)
        n, t = n_new, t_new
    # close enough already (well inside the 2% contract): stop; else bracket [a, b] with
    # T(a) <= target < T(b) and bisect to adjacent sizes, i.e. the best achievable size
    if any(abs(v[0] - target) <= _good_enough(target) for v in cache.values()):
        best = min(cache, key=lambda k: (abs(cache[k][0] - target), cache[k][0] > target, k))
        return cache[best][1], best, cache[best][0], slope
    below = [k for k in cache if cache[k][0] <= target]
    a = max(below) if below else lo
    above = [k for k in cache if cache[k][0] > target and k > a]
    b = min(above) if above else None
    step = max(1, round(0.01 * target / slope))
    while b is None:
        cand = a + step
        if measure(cand) > target:
            b = cand
        else:
            a = cand
            step *= 2
    while b - a > 1:
        mid = (a + b) // 2
        if measure(mid) <= target:
            a = mid
        else:
            b = mid
    best = min(cache, key=lambda k: (abs(cache[k][0] - target), cache[k][0] > target, k))
    tokens, draft = cache[best]
    if abs(tokens - target) > LENGTH_TOLERANCE * target:
        raise ValueError(
            f"could not fit task {task.name!r} to {target} tokens (closest: {tokens}); "
            "the haystack unit is too coarse for this length"
        )
    return draft, best, tokens, slope


# --------------------------------------------------------------------------- API


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def generate_samples(
    task: str,
    *,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int,
    depth: float | None = None,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` samples of ``task`` whose prompts have ``length`` tokens (±2%).

    ``depth`` (0..1, fraction of the context before the needle) fixes where the first
    answer needle goes; ``None`` draws it per sample from RULER's 40-point grid. Only
    needle tasks accept a depth. Deterministic given (task, length, seed, depth, tokenizer).
    """
    t = get_task(task)
    _check_int("length", length, 1)
    if length > MAX_LENGTH:
        raise ValueError(f"length {length} exceeds the supported maximum {MAX_LENGTH}")
    _check_int("num_samples", num_samples, 0)
    _check_int("seed", seed, 0)
    if depth is not None:
        if not t.supports_depth:
            raise ValueError(f"task {t.name!r} has no needle, so it takes no depth (got {depth})")
        if isinstance(depth, bool) or not isinstance(depth, (int, float)):
            raise TypeError(f"depth must be a float in [0, 1], got {type(depth).__name__}")
        depth = float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    count = token_counter(tokenizer)
    samples: list[dict[str, Any]] = []
    hint: tuple[int, float] | None = None
    for i in range(num_samples):
        key = t.rng_key(seed, i)
        draft, units, tokens, slope = _fit(t, key, length, depth, count, hint)
        hint = (units, slope)
        sid = f"{t.name}-{length}-s{seed}-{i:04d}" + (f"-d{depth:g}" if depth is not None else "")
        sample: dict[str, Any] = {
            "id": sid,
            "task": t.name,
            "target_length": length,
            "prompt_tokens": tokens,
            "context_tokens": count(draft.context),
            "depth": draft.depth,
            "seed": seed,
            "context": draft.context,
            "question": draft.question,
            "answer_prefix": draft.answer_prefix,
            "answers": list(draft.answers),
            "metric": t.metric,
            "max_new_tokens": t.max_new_tokens,
            **draft.extra,
        }
        t.verify(sample)
        samples.append(sample)
    return samples


def verify_sample(sample: dict[str, Any]) -> None:
    """Raise ValueError if a sample is malformed or its task's invariants do not hold."""
    if not isinstance(sample, dict):
        raise TypeError(f"sample must be a dict, got {type(sample).__name__}")
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('id', '?')!r} lacks keys {missing}")
    if sample["metric"] not in METRICS:
        raise ValueError(f"sample {sample['id']!r}: unknown metric {sample['metric']!r}")
    if not isinstance(sample["answers"], list) or not sample["answers"]:
        raise ValueError(f"sample {sample['id']!r}: answers must be a non-empty list")
    get_task(sample["task"]).verify(sample)


def write_task_file(path: str | os.PathLike[str], samples: Sequence[dict[str, Any]]) -> Path:
    """Write samples as JSONL (one sample per line), atomically (temp file + rename); gzipped
    when ``path`` ends in ``.gz`` (reproducible bytes: no name or time in the gzip header)."""
    path = Path(path)
    for s in samples:
        missing = [k for k in SAMPLE_KEYS if k not in s]
        if missing:
            raise ValueError(f"sample {s.get('id', '?')!r} lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode("utf-8")
        with os.fdopen(fd, "wb") as f:
            f.write(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stored_task_file(path: str | os.PathLike[str]) -> Path:
    """Where the task file ``path`` (``<stem>.jsonl``) is on disk: ``path`` itself, or its
    gzipped copy ``<stem>.jsonl.gz`` when only that exists (published results keep task files
    gzipped: a folder's prompts repeat one haystack, ~150x smaller), else ``path`` (missing)."""
    path = Path(path)
    if path.exists() or path.suffix == ".gz":
        return path
    packed = path.with_name(path.name + ".gz")
    return packed if packed.exists() else path


def task_file_stem(path: str | os.PathLike[str]) -> str:
    """``<stem>`` of ``<stem>.jsonl`` or ``<stem>.jsonl.gz``."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl"):
        name = name.removesuffix(suffix)
    return name


def read_task_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL task file written by :func:`write_task_file` (keys checked per line);
    ``<stem>.jsonl`` is read from ``<stem>.jsonl.gz`` when only that exists
    (:func:`stored_task_file`)."""
    path = stored_task_file(path)
    out: list[dict[str, Any]] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(s, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in SAMPLE_KEYS if k not in s]
            if missing:
                raise ValueError(f"{path}:{lineno}: sample lacks keys {missing}")
            out.append(s)
    return out


def replace_task(task: Task, **changes: Any) -> Task:
    """A modified copy of a task (e.g. another phrasing), for studies outside the registry."""
    return dataclasses.replace(task, **changes)
