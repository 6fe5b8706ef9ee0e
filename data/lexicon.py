"""WordNet as a lexicon for text encoders: a text is followed by the more general kinds of
its nouns (of those the training texts never had, given them), so such a word still says
what it is.

"cockroach" -> "cockroach; dictyopterous insect, insect, arthropod": a model trained on
captions that name other insects has read "insect" and can place the cockroach near them.

Source: Princeton WordNet 3.0 (Debian ``wordnet-base``, the WordNet 3.0 licence, a BSD-style
permission notice), fetched once with ``apt-get download`` (no root) into the data cache by
``prepare_wordnet``. Only ``index.noun``, ``data.noun``, ``noun.exc`` and ``cntlist.rev`` (how
often each sense was tagged in WordNet's semantic concordance) are read. The rule (``Lexicon.kinds``):

1. Words are lower-cased runs of letters and digits. Two or three words that WordNet holds
   as one noun ("ice cream", "fishing rod", also in the plural) are taken together, longest
   first.
2. A word is looked up as a noun after WordNet's noun morphology (the word itself, else its
   bases in the exception list or, without one there, by the suffix rules: "boxes" ->
   "box", "mice" -> "mouse"). Function words, and words that
   WordNet's sense counts tag more often as adjectives than as nouns ("dark": 99 against
   23; "big"), are skipped, so "dark skin tone" is not read as "darkness".
3. From the noun's first (most frequent) sense, ``depth`` hypernym (or instance-of) steps
   are followed, each giving the first word of the more general synset, stopping before a
   synset whose first word is in ``TOP`` (entity, object, whole, artifact, ...: kinds so
   general that every noun would agree; a "state" or "unit" lower down stops it too).
   The first sense is WordNet's most frequent one, not always the one a text means:
   "kite" reads as a cheque, "bikini" as the atoll, "flag: Niger" as the river.
4. The kinds are ordered nearest first (each noun's first kind in word order, then each
   noun's second, ...) without repeats, the first ``max_kinds`` are kept, and the text
   becomes ``"<text>; <kind>, <kind>, ..."`` (the text alone when it has none).
5. Given the words of the training texts (``known``), only the nouns with a word outside
   them get kinds: what the model has read needs no help. A model learns what the kinds
   look like from training texts that are a caption's kinds alone (``kinds_text``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from .cache import DataError, atomic_dir, cache_dir, prepare_lock
from .parallel import apt_extract

PACKAGE = "wordnet-base"
FILES = ("index.noun", "data.noun", "noun.exc", "cntlist.rev")
_SRC = "usr/share/wordnet"

# Synsets at the top of the noun hierarchy: a kind this general says nothing about a word.
TOP = frozenset({
    "entity", "physical_entity", "abstraction", "object", "whole", "thing", "matter",
    "psychological_feature", "attribute", "relation", "group", "measure", "artifact",
    "causal_agent", "living_thing", "organism", "unit", "location", "instrumentality",
    "communication", "act", "event", "state", "part", "physical_object"})
# Function words; several are WordNet nouns ("a": vitamin A, "in": inch) by accident.
FUNCTION_WORDS = frozenset(
    "a an the of with without in on at to for from by and or but not no up down out over "
    "under off into onto as it its is be one two three".split())
# WordNet's noun morphology (morphy): the suffix rules after the exception list.
_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
             ("shes", "sh"), ("men", "man"), ("ies", "y"))
_WORD = re.compile(r"[^\W_]+")


def prepare_wordnet(root: Path | None = None) -> Path:
    """WordNet's noun files, once, into ``<cache>/wordnet/``; returns the folder.

    Needs ``apt-get`` once (6.5 MB download); a second call returns at once."""
    base = root or cache_dir()
    out = base / "wordnet"
    if all((out / f).is_file() for f in FILES):
        return out
    with prepare_lock("wordnet", base):
        if not all((out / f).is_file() for f in FILES):
            with atomic_dir(out) as staging, tempfile.TemporaryDirectory() as tmp:
                deb = apt_extract([PACKAGE], Path(tmp), instead=(
                    f"copy {', '.join(FILES)} of WordNet 3.0 into {out}, or set "
                    f"data.lexicon.name=null"))
                for f in (*FILES, "../doc/wordnet-base/copyright"):
                    shutil.copy(deb / _SRC / f, staging / Path(f).name)
    return out


def _index(path: Path) -> dict[str, list[str]]:
    """``index.noun``: lemma -> its synset offsets, most frequent sense first."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # the licence header
                continue
            p = line.split()
            n_synsets, n_pointers = int(p[2]), int(p[3])
            out[p[0]] = p[6 + n_pointers:6 + n_pointers + n_synsets]
    return out


def _tag_counts(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """``cntlist.rev`` (``sense_key sense_number tag_count`` a line): per lemma, how often
    its noun senses and its adjective senses were tagged."""
    nouns: dict[str, int] = {}
    adjectives: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, count = line.split()
            lemma, _, rest = key.partition("%")
            pos = rest[:1]
            if pos == "1":
                nouns[lemma] = nouns.get(lemma, 0) + int(count)
            elif pos in ("3", "5"):  # adjective, adjective satellite
                adjectives[lemma] = adjectives.get(lemma, 0) + int(count)
    return nouns, adjectives


class WordNet:
    """WordNet's nouns: lemmas, their synsets, and each synset's first word and
    hypernyms, read from the database files in ``folder`` (``prepare_wordnet``)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise DataError(f"WordNet folder {folder} lacks {missing}; expected the files of "
                            f"Debian's {PACKAGE} (prepare_wordnet)")
        self.nouns = _index(folder / "index.noun")
        self.noun_tags, self.adjective_tags = _tag_counts(folder / "cntlist.rev")
        self.exceptions: dict[str, list[str]] = {}
        for line in (folder / "noun.exc").read_text(encoding="utf-8").splitlines():
            p = line.split()
            if len(p) >= 2:
                self.exceptions[p[0]] = p[1:]
        # synset offset -> (its first word, its hypernym offsets)
        self.synsets: dict[str, tuple[str, list[str]]] = {}
        with open(folder / "data.noun", encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                p = line.split(" | ", 1)[0].split()
                n_words = int(p[3], 16)
                i = 4 + 2 * n_words
                hyper = [p[j + 1] for j in range(i + 1, i + 1 + 4 * int(p[i]), 4)
                         if p[j] in ("@", "@i") and p[j + 2] == "n"]
                self.synsets[p[0]] = (p[4].lower(), hyper)

    def noun(self, word: str) -> str | None:
        """The noun lemma of ``word`` (lower case, ``_`` between words), or None: the word
        itself, else its bases from the exception list or, if it has none there, from the
        suffix rules; the first that is a noun."""
        if word in self.exceptions:
            forms = self.exceptions[word]
        else:
            forms = [word[: -len(suffix)] + ending for suffix, ending in _SUFFIXES
                     if word.endswith(suffix)]
        return next((f for f in (word, *forms) if f in self.nouns), None)

    def chain(self, lemma: str, depth: int) -> list[str]:
        """Synset offsets of up to ``depth`` more general kinds of the lemma's first sense,
        nearest first: each step the first hypernym (or instance-of) pointer, stopping at
        a synset whose first word is in ``TOP``."""
        offset, out = self.nouns[lemma][0], []
        for _ in range(depth):
            up = self.synsets[offset][1]
            if not up or self.synsets[up[0]][0] in TOP:
                break
            offset = up[0]
            out.append(offset)
        return out

    def hypernyms(self, lemma: str, depth: int) -> list[str]:
        """The first words of ``chain``'s synsets (``_`` read as a space)."""
        return [self.synsets[o][0].replace("_", " ") for o in self.chain(lemma, depth)]


class Lexicon:
    """Appends WordNet kinds to texts (the rule in the module docstring).

    Args:
        wordnet: the database.
        depth: hypernym steps per noun (>= 1).
        max_kinds: at most this many kinds per text (the first ones), or None for all.
        known: the words of the training texts. When given, a text gets the kinds of its
            other words only: a word the model has read needs no help, and texts the
            model was trained on stay as they were.
    """

    def __init__(self, wordnet: WordNet, depth: int = 3, max_kinds: int | None = None,
                 known: Iterable[str] | None = None):
        if depth < 1:
            raise DataError(f"data.lexicon.depth={depth}; expected at least 1")
        if max_kinds is not None and max_kinds < 1:
            raise DataError(f"data.lexicon.max_kinds={max_kinds}; expected at least 1 or null")
        self.wordnet, self.depth, self.max_kinds = wordnet, depth, max_kinds
        self.known = frozenset(known) if known is not None else None
        self._caches()

    def _caches(self) -> None:
        self._kinds = lru_cache(maxsize=100_000)(self._word_kinds)
        self._texts = lru_cache(maxsize=100_000)(self._expand)

    def __getstate__(self) -> dict:  # to DataLoader workers: without the caches
        return {k: v for k, v in self.__dict__.items() if k not in ("_kinds", "_texts")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._caches()

    def _word_kinds(self, words: tuple[str, ...]) -> tuple[str, ...]:
        wn = self.wordnet
        if len(words) == 1:
            w = words[0]
            if w in FUNCTION_WORDS or w.isdigit():
                return ()
            lemma = wn.noun(w)
            if lemma is None:
                return ()
            if wn.adjective_tags.get(w, 0) > wn.noun_tags.get(lemma, 0):
                return ()
        else:
            lemma = wn.noun("_".join(words))  # "hot dogs" -> hot_dog
            if lemma is None:
                return ()
        return tuple(wn.hypernyms(lemma, self.depth))

    def kinds(self, text: str, unknown_only: bool = False) -> list[str]:
        """The more general kinds of the nouns of ``text``, nearest first: every noun's
        first kind in word order, then every noun's second, ...; without repeats. With
        ``unknown_only`` (and ``known`` given), only of nouns with a word not in ``known``."""
        words = words_of(text)
        chains: list[tuple[str, ...]] = []
        i = 0
        while i < len(words):
            for n in (3, 2, 1):
                span = tuple(words[i:i + n])
                found = self._kinds(span) if i + n <= len(words) else ()
                if found or n == 1:
                    if not (unknown_only and self.known is not None
                            and set(span) <= self.known):
                        chains.append(found)
                    i += n if found else 1
                    break
        out: list[str] = []
        for level in range(self.depth):
            for chain in chains:
                if len(chain) > level and chain[level] not in out:
                    out.append(chain[level])
        return out[: self.max_kinds]

    def kinds_text(self, text: str) -> str | None:
        """The kinds of all nouns of ``text`` alone, ``"; insect, arthropod"`` (None if it
        has none): a training text that teaches what the kinds look like."""
        kinds = self.kinds(text)
        return f"; {', '.join(kinds)}" if kinds else None

    def __call__(self, text: str) -> str:
        """``"<text>; <kind>, ..."``: the text with the kinds of its nouns (of its words
        not in ``known``, when given), or the text alone if there are none."""
        return self._texts(text)

    def _expand(self, text: str) -> str:
        kinds = self.kinds(text, unknown_only=True)
        return f"{text}; {', '.join(kinds)}" if kinds else text


def words_of(text: str) -> list[str]:
    """Lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=2)
def _wordnet(folder: str) -> WordNet:
    return WordNet(folder)


def check_spec(spec) -> dict | None:
    """``data.lexicon`` checked: ``{"name": "wordnet" | None, "depth": int >= 1,
    "max_kinds": int >= 1 | None, "kinds_only": share in [0, 1], ...}``; None when off. A
    bad value is one ``UserError`` naming its key."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DataError(f"data.lexicon={spec}; expected its fields, e.g. "
                        f"data.lexicon.name=wordnet")
    name = spec.get("name")
    if name is None:
        return None
    if name != "wordnet":
        raise DataError(f"data.lexicon.name={name!r}; expected wordnet or null")
    for key, least, optional in (("depth", 1, False), ("max_kinds", 1, True)):
        value = spec.get(key)
        if not (value is None and optional) and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise DataError(f"data.lexicon.{key}={value!r}; expected an integer >= {least}"
                            + (" or null" if optional else ""))
    share = spec.get("kinds_only", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise DataError(f"data.lexicon.kinds_only={share!r}; expected a share in [0, 1]")
    return spec


def load_lexicon(spec: dict | None) -> Lexicon | None:
    """The lexicon a config or checkpoint names (``check_spec``; with ``"known"``, the
    training words, as in ``Lexicon``), or None for none."""
    spec = check_spec(spec)
    if spec is None:
        return None
    return Lexicon(_wordnet(str(prepare_wordnet())), spec["depth"], spec.get("max_kinds"),
                   spec.get("known"))


class LexiconTokenizer:
    """A tokenizer that encodes each text with its WordNet kinds appended; everything else
    (ids, vocabulary, decoding, saving) is the wrapped tokenizer's."""

    def __init__(self, tok, lexicon: Lexicon):
        self.tok, self.lexicon = tok, lexicon

    def __getattr__(self, name):
        if name.startswith("__") or name in ("tok", "lexicon"):  # copying, unpickling
            raise AttributeError(name)
        return getattr(self.tok, name)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(self.lexicon(text))
