"""Text sources for the RULER-style task generators: noise, prose, words, needles.

Everything here is either written in this file or derived from text that ships with
every CPython (``pydoc_data.topics``), so task files can be regenerated offline on any
machine, and nothing copyrighted (RULER's Paul Graham essays) is redistributed.

Caveat on reproducibility: ``pydoc_data.topics`` is the Python reference manual of the
running interpreter and changes between Python minor versions, so prose-haystack tasks
are deterministic per (seed, Python minor version). The noise haystack, the word lists
and the coded words do not depend on the interpreter. The task JSONL file, not the
seed, is what every method and peer is scored on, so this does not affect comparisons.
"""

from __future__ import annotations

import functools
import random
import re
import string
import sys
import uuid

# RULER's repeated-noise haystack (niah_single_1, vt).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Hand-written word lists (common English words; no external list). Keys of needles are
# "adjective-noun" pairs as in RULER (which draws them from the wonderwords lists);
# the common-words task draws from the union. Sizes give 150 x 200 = 30,000 keys.
ADJECTIVES: tuple[str, ...] = tuple(
    """
    able absent active afraid agile alert ancient angry anxious bitter black bold brave
    brief bright broad broken busy calm careful cheap clean clever close cold cool
    crazy creamy crisp cruel curious damp dark dear deep direct dirty distant dizzy drab
    dry dull eager early easy elegant empty equal exact faint fair false famous fancy fast
    fierce final firm flat fluffy fond foolish fragile free fresh friendly frozen full
    funny gentle giant glad golden good graceful grand gray great green grumpy happy hard
    harsh heavy helpful hidden high hollow honest huge humble hungry icy idle jolly juicy
    keen kind large late lazy light little lively lonely long loud lucky mad massive mellow
    mighty mild misty modern narrow neat nervous new nice noble noisy odd old open orange
    pale patient plain polite poor proud purple quick quiet rapid rare raw ready red rich
    rough round royal rural rusty sad safe salty sharp shiny short shy silent silly simple
    slow small smooth soft solid sour spicy steady steep sticky stiff strange strong sunny
    sweet swift tall tame tender thick thin tidy tiny tough vast warm wild wise witty young
    """.split()
)

NOUNS: tuple[str, ...] = tuple(
    """
    acorn actor airport album anchor angle ankle apple apron arch arrow attic autumn badge
    bakery ball balloon bamboo banana banjo barn basket bath beach beard bell belt bench
    berry bicycle blanket boat bone book boot bottle branch bread brick bridge brush bucket
    butter button cabin cactus cake camel camera candle canoe canyon carpet carrot castle
    cattle cellar chair chalk cherry chess chimney circle cliff clock cloud coat coffee
    comet copper cotton couch crane crayon cricket crown cup curtain daisy desert diamond
    dolphin door dragon drawer drum eagle engine falcon feather fence ferry fiddle field
    finger flag flute forest fountain fox garden garlic gate ginger glacier glove goat
    grape guitar hammer harbor harp hat hazel helmet hill honey horse island ivory jacket
    jelly jungle kettle kitten ladder lake lantern lemon lettuce library lily lion lizard
    magnet mango maple marble meadow melon mirror monkey moon mountain muffin needle nest
    ocean olive onion orchard otter owl paddle palace panda parrot peach pearl pebble
    pencil pepper piano pillow pine planet plum pocket pony potato pumpkin puzzle quilt
    rabbit radio raven ribbon river robin rocket saddle sailor salmon sandal scarf shell
    shovel silver sled spoon squirrel stable statue stove sugar summit swan table teapot
    tiger tomato tower tractor trumpet tulip tunnel turtle umbrella valley velvet violin
    wagon walnut whale whistle willow window wolf yacht zebra
    """.split()
)


def english_words() -> tuple[str, ...]:
    """Sorted union of the adjective and noun lists (the common-words pool)."""
    return tuple(sorted(set(ADJECTIVES) | set(NOUNS)))


def word_key(rng: random.Random) -> str:
    """An "adjective-noun" needle key, like RULER's ``words`` keys."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
    """A decimal number with exactly ``digits`` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def uuid_string(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (deterministic, unlike ``uuid.uuid4``)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return number(rng)
    if kind == "words":
        return word_key(rng)
    if kind == "uuids":
        return uuid_string(rng)
    raise ValueError(f"unknown needle kind {kind!r}; expected 'numbers', 'words' or 'uuids'")


def coded_words(rng: random.Random, count: int, length: int = 6) -> list[str]:
    """``count`` distinct random lowercase words of ``length`` letters (RULER's fwe vocabulary)."""
    if count > 26**length // 2:
        raise ValueError(f"cannot draw {count} distinct {length}-letter coded words")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        w = "".join(rng.choices(string.ascii_lowercase, k=length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def pseudo_words(count: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Deterministic pronounceable pseudo-words (three syllables), for word pools longer than
    the hand-written lists; the order is fixed, so a pool prefix never changes."""
    out: list[str] = []
    n = len(_SYLLABLES)
    i = 0
    while len(out) < count:
        # a fixed bijective walk over the 70^3 syllable triples, spreading first letters
        j = (i * 7919) % (n**3)
        w = _SYLLABLES[j // (n * n)] + _SYLLABLES[(j // n) % n] + _SYLLABLES[j % n]
        if w not in exclude:
            out.append(w)
        i += 1
        if i >= n**3:
            raise ValueError(f"cannot make {count} pseudo-words")
    return out


def word_pool(count: int) -> list[str]:
    """The first ``count`` words of the common-words pool: English words, then pseudo-words."""
    base = list(english_words())
    if count <= len(base):
        return base[:count]
    return base + pseudo_words(count - len(base), exclude=frozenset(base))


_UNDERLINE = re.compile(r"^\s*([*=\-~^\"+#])\1{2,}\s*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_MAX_WORDS = 40  # long "sentences" (grammar listings) are cut so needles are not too far apart


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Sentences of the Python reference manual shipped as ``pydoc_data.topics``.

    Topics are taken in sorted order; headings' underlines are dropped and whitespace is
    collapsed; sentences over 40 words (grammar listings, tables) are cut into pieces,
    so that the possible needle positions stay dense.
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        text = _UNDERLINE.sub(" ", topics[name])
        text = " ".join(text.split())
        for sent in _SENTENCE_END.split(text):
            words = sent.split()
            for i in range(0, len(words), _MAX_WORDS):
                piece = " ".join(words[i : i + _MAX_WORDS])
                if piece:
                    out.append(piece)
    if not out:  # pragma: no cover - a CPython without its docs
        raise RuntimeError("pydoc_data.topics is empty; the prose haystack needs it")
    return tuple(out)


def prose_source() -> str:
    """Where the prose came from, recorded in each prose sample."""
    v = sys.version_info
    return f"pydoc_data.topics (Python {v.major}.{v.minor})"


@functools.lru_cache(maxsize=1)
def _prose_sentence_words() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(s.split()) for s in prose_sentences())


def prose_words(start: int, count: int) -> list[list[str]]:
    """``count`` words of prose from sentence ``start`` on (wrapping around the corpus),
    grouped by sentence; the last sentence is cut short when the budget runs out.

    Words are RULER's haystack unit for essays (it then re-splits into sentences and
    inserts needles between sentences); word granularity lets the prompt length be hit
    within a couple of tokens.
    """
    sents = _prose_sentence_words()
    n = len(sents)
    out: list[list[str]] = []
    left = count
    i = start
    while left > 0:
        words = list(sents[i % n][:left])
        out.append(words)
        left -= len(words)
        i += 1
    return out
