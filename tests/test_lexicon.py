"""The WordNet lexicon (data/lexicon.py) against NLTK's WordNet reader on the same database
files (Debian wordnet-base): noun morphology and hypernym chains, over thousands of
lemmas; then the expansion rule on hand-checked texts, and the task's tokenizer."""

import copy
import gzip
import pickle
import random
import re
import warnings

import pytest

from data.errors import UserError
from data.lexicon import (
    FUNCTION_WORDS,
    TOP,
    Lexicon,
    LexiconTokenizer,
    WordNet,
    check_spec,
    prepare_wordnet,
)
from data.parallel import apt_extract


@pytest.fixture(scope="module")
def wordnet_files(tmp_path_factory):
    """The whole wordnet-base package unpacked, with the ``lexnames`` file NLTK reads
    written from the package's lexnames(5WN) manual page (Debian does not ship it)."""
    root = apt_extract(["wordnet-base"], tmp_path_factory.mktemp("deb"))
    folder = root / "usr/share/wordnet"
    page = gzip.open(root / "usr/share/man/man5/lexnames.5WN.gz", "rt").read()
    category = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    rows = [f"{n}\t{name}\t{category[name.split('.')[0]]}"
            for n, name in re.findall(r"^(\d\d)\t(\S+)", page, re.M)]
    assert len(rows) == 45
    (folder / "lexnames").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def ours(wordnet_files):
    return WordNet(wordnet_files)


@pytest.fixture(scope="module")
def nltk_wn(wordnet_files):
    nltk = pytest.importorskip("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    nltk.data.path.insert(0, str(wordnet_files.parent))  # NLTK reads only under its paths

    class English(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # the multilingual mapping: not needed here
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return English(str(wordnet_files), None)


def _sample_lemmas(ours, n=3000):
    lemmas = sorted(ours.nouns)
    return random.Random(0).sample(lemmas, n)


def test_noun_morphology_matches_nltk(ours, nltk_wn):
    words = [w for lemma in _sample_lemmas(ours) if "_" not in lemma
             for w in (lemma, lemma + "s", lemma + "es")]
    words += sorted(ours.exceptions)[:500] + ["mice", "boxes", "churches", "women", "berries"]
    # NLTK adds a rule WordNet's own morphy lacks ("-ves" -> "-f"); those words are left out.
    words = [w for w in words if not w.endswith("ves")]
    differ = [(w, ours.noun(w), nltk_wn.morphy(w, "n")) for w in words
              if ours.noun(w) != nltk_wn.morphy(w, "n")]
    assert len(words) > 4000
    assert not differ, differ[:10]
    assert ours.noun("mice") == "mouse" and ours.noun("churches") == "church"


def test_hypernym_chains_match_nltk(ours, nltk_wn):
    """Each lemma's first sense is NLTK's first synset, each step is one of NLTK's
    hypernyms (or instance hypernyms) of the step before, named by its first lemma, and a
    chain stops short only where NLTK has no hypernym or a top-level one. (NLTK keeps a
    synset's pointers in a set, so which hypernym is first is the file's order, ours.)"""
    lemmas = _sample_lemmas(ours) + ["cockroach", "pizza", "niger", "ice_cream"]
    for lemma in lemmas:
        synset = nltk_wn.synsets(lemma, "n")[0]
        assert synset.offset() == int(ours.nouns[lemma][0]), lemma
        chain = ours.chain(lemma, 4)
        for offset, name in zip(chain, ours.hypernyms(lemma, 4)):
            up = synset.hypernyms() + synset.instance_hypernyms()
            synset = nltk_wn.synset_from_pos_and_offset("n", int(offset))
            assert synset in up, (lemma, name)
            assert name == synset.lemmas()[0].name().lower().replace("_", " "), lemma
        if len(chain) < 4:
            up = synset.hypernyms() + synset.instance_hypernyms()
            assert not up or any(u.lemmas()[0].name().lower() in TOP for u in up), lemma
    assert sum(bool(ours.chain(x, 4)) for x in lemmas) > 2500


def test_tag_counts_sum_nltk_lemma_counts(ours, nltk_wn, wordnet_files):
    """Per word, the tag counts of its noun and adjective senses as NLTK sums them, plus
    the counts cntlist.rev files under a sense key NLTK's lemmas do not have (the file
    keeps some keys of an earlier release: "dark%5:00:00:cheerless:00")."""
    lines = (wordnet_files / "cntlist.rev").read_text().split("\n")
    for word in ("dark", "light", "big", "face", "eye", "cold"):
        got = []
        for pos, types in (("n", "1"), ("a", "35")):  # NLTK's "a" takes the satellites
            lemmas = [x for x in nltk_wn.lemmas(word, pos) if x.name().lower() == word]
            keys = {x.key() for x in lemmas}
            unresolved = sum(int(line.split()[2]) for line in lines
                             if line.startswith(word + "%") and line.split("%")[1][0] in types
                             and line.split()[0] not in keys)
            got.append(sum(x.count() for x in lemmas) + unresolved)
        assert (ours.noun_tags.get(word, 0), ours.adjective_tags.get(word, 0)) == tuple(got), word
    assert ours.adjective_tags["dark"] > ours.noun_tags["dark"] > 0


def test_expansion_rule_on_hand_checked_texts(ours):
    lex = Lexicon(ours, depth=3)
    assert lex("cockroach") == "cockroach; dictyopterous insect, insect, arthropod"
    assert lex("pizza") == "pizza; dish, nutriment, food"
    assert lex("mice") == "mice; rodent, placental, mammal"              # the exception list
    assert lex("soft ice cream") == "soft ice cream; frozen dessert, dessert, course"  # a collocation
    # "dark" is tagged 99 times as an adjective and 23 as a noun: skipped.
    assert lex("dark") == "dark"
    assert lex("dark skin tone") == ("dark skin tone; connective tissue, manner of speaking, "
                                     "animal tissue, expressive style, tissue")
    assert lex.kinds("hot dogs") == lex.kinds("hot dog") != ["canine"]  # plural collocation
    assert lex("big") == "big" and lex("keycap: 0") == "keycap: 0"
    # nearest first: each noun's first kind, then each noun's second
    assert lex.kinds("snake and lemon")[:3] == ["diapsid", "citrus", "reptile"]
    assert Lexicon(ours, depth=3, max_kinds=2)("cockroach") == \
        "cockroach; dictyopterous insect, insect"
    # with the training words known, only the other words get kinds
    known = Lexicon(ours, depth=3, known={"snake", "and"})
    assert known("snake and lemon") == "snake and lemon; citrus, edible fruit, produce"
    assert known("snake") == "snake"
    assert known.kinds_text("snake") == "; diapsid, reptile, vertebrate"
    assert Lexicon(ours, known={"ice"})("ice cream") == "ice cream; frozen dessert, dessert, course"
    # "a" (vitamin A) and "in" (inch) are WordNet nouns, but function words here
    assert {"a", "in"} <= FUNCTION_WORDS and ours.noun("in") == "in"
    assert lex.kinds("a in") == []


def test_lexicon_pickles_and_copies(ours):
    """DataLoader workers started by spawn get the lexicon pickled; a module copy copies
    the tokenizer."""
    lex = Lexicon(ours, max_kinds=3, known={"snake"})
    lex("cockroach")
    back = pickle.loads(pickle.dumps(lex))
    assert back("cockroach") == lex("cockroach") and back("snake") == "snake"
    wrapped = LexiconTokenizer(object(), lex)
    assert copy.deepcopy(wrapped).lexicon.known == lex.known


@pytest.mark.parametrize("spec, message", [
    ("wordnet", "data.lexicon=wordnet; expected its fields"),
    ({"name": "babelnet"}, "data.lexicon.name='babelnet'; expected wordnet or null"),
    ({"name": "wordnet", "depth": "three"}, "data.lexicon.depth='three'; expected an integer"),
    ({"name": "wordnet", "depth": 0}, "data.lexicon.depth=0; expected an integer >= 1"),
    ({"name": "wordnet", "depth": 3, "max_kinds": 4.5}, "data.lexicon.max_kinds=4.5"),
    ({"name": "wordnet", "depth": 3, "kinds_only": "abc"}, "data.lexicon.kinds_only='abc'"),
    ({"name": "wordnet", "depth": 3, "kinds_only": 1.5}, "kinds_only=1.5; expected a share"),
])
def test_bad_settings_name_the_key(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_spec(spec)
    assert check_spec({"name": None, "depth": "anything"}) is None  # off: not read


def test_lexicon_tokenizer_encodes_the_expanded_text(ours):
    from data.text import Tokenizer
    lines = [Lexicon(ours)(t) for t in ("cockroach", "pizza", "a red ant", "lemon tree")] * 5
    tok = Tokenizer.train("\n".join(lines), 300)
    wrapped = LexiconTokenizer(tok, Lexicon(ours))
    assert wrapped.encode("cockroach") == tok.encode(
        "cockroach; dictyopterous insect, insect, arthropod")
    assert wrapped.vocab_size == tok.vocab_size and wrapped.EOS == tok.EOS


def test_prepare_wordnet_keeps_the_files_once(tmp_path):
    out = prepare_wordnet(tmp_path)
    stamp = (out / "data.noun").stat().st_mtime_ns
    assert prepare_wordnet(tmp_path) == out
    assert (out / "data.noun").stat().st_mtime_ns == stamp
    assert "WordNet" in (out / "copyright").read_text()
    assert WordNet(out).noun("geese") == "goose"
