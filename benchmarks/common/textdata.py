"""A small text corpus generated in code (no download) for source-identification benchmarks.

Training sentences state facts ``subject – verb – object – place`` with a distinct vocabulary:
``"mira repaired the green lantern in the harbor"``. Every verb and some places have two surface
forms (synonyms) used interchangeably across the corpus, so both forms are seen in training.
Queries are paraphrases of particular training sentences, each with the id of its source:

* ``reorder``: the place clause moved to the front (or back);
* ``synonym``: the verb (and place, where it has one) replaced by its other surface form;
* ``passive``: ``"the green lantern was repaired by mira in the harbor"``;
* ``passive+synonym``: both.

A paraphrase keeps the fact (who, what, where) and changes the wording, so the training sentence
that taught the model the fact is the expected top attribution.

:func:`make_disjoint_corpus` builds the harder setting, where words do not give the answer: every
content word (name, verb, adjective, noun, place) has two surface forms (``"robert"``/``"bob"``,
``"boat"``/``"vessel"``), each concept's occurrences are split evenly (at random) between its two
forms, and a query restates its source fact with the *other* form in every slot, so it shares no
content word with its source (only ``"the"`` and ``"in"``, which every sentence has). Each concept occurs in many
training sentences under both forms, in the same slots and next to the same other concepts, so a
model trained on the corpus can learn that the two forms are interchangeable; a lexical method
cannot.

Example:
    >>> corpus = make_corpus(n_sentences=50, n_queries=5, seed=0)
    >>> len(corpus.sentences), len(corpus.queries)
    (50, 5)
    >>> ids = corpus.tokenizer.encode_batch(corpus.sentences[:2])
    >>> ids.shape[0], corpus.tokenizer.decode(ids[0].tolist()) == corpus.sentences[0]
    (2, True)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

NAMES = (
    "mira", "tomas", "ines", "karl", "yuki", "omar", "lena", "pavel", "sofia", "dario", "noor", "felix",
    "ana", "bruno", "chen", "dalia", "emil", "farah", "goran", "hana", "ivan", "jade", "kofi", "lucia",
    "marek", "nadia", "oskar", "priya", "quinn", "rosa", "samir", "tara", "ugo", "vera", "wren", "xavi",
    "yara", "zane", "alma", "boris",
)
VERBS = (  # two surface forms per action
    ("repaired", "fixed"), ("painted", "colored"), ("sold", "traded"), ("bought", "purchased"),
    ("cleaned", "washed"), ("found", "discovered"), ("carried", "moved"), ("hid", "concealed"),
    ("built", "assembled"), ("borrowed", "took"), ("broke", "damaged"), ("polished", "shined"),
)
ADJECTIVES = ("red", "green", "blue", "old", "small", "heavy", "silver", "wooden")
NOUNS = (
    "lantern", "boat", "violin", "clock", "bicycle", "kettle", "ladder", "mirror", "basket", "telescope",
    "drum", "chair", "compass", "umbrella", "anchor", "radio", "helmet", "teapot", "sled", "cabinet",
)
PLACES = (  # (form, synonym or None)
    ("harbor", "port"), ("garden", "yard"), ("kitchen", None), ("market", "bazaar"), ("attic", "loft"),
    ("library", None), ("workshop", "studio"), ("station", "depot"), ("forest", "woods"), ("village", None),
    ("cellar", "basement"), ("school", None),
)
PARTICIPLES = {"broke": "broken", "hid": "hidden", "took": "taken"}  # the rest: same as the past tense
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
QUERY_KINDS = ("reorder", "synonym", "passive", "passive+synonym")

# two surface forms per concept for the word-disjoint corpus (both forms are common English)
DISJOINT_NAMES = (
    ("robert", "bob"), ("william", "bill"), ("elizabeth", "liz"), ("katherine", "kate"), ("james", "jim"),
    ("margaret", "peggy"), ("thomas", "tom"), ("michael", "mike"), ("joseph", "joe"), ("daniel", "dan"),
    ("samuel", "sam"), ("alexander", "alex"), ("benjamin", "ben"), ("nicholas", "nick"), ("susan", "sue"),
    ("rebecca", "becky"), ("victoria", "vicky"), ("anthony", "tony"), ("edward", "ted"), ("henry", "hank"),
    ("frederick", "fred"), ("abigail", "abby"), ("eleanor", "ellie"), ("patricia", "patty"),
)
DISJOINT_VERBS = VERBS
DISJOINT_ADJECTIVES = (
    ("big", "large"), ("small", "tiny"), ("old", "ancient"), ("red", "crimson"), ("new", "modern"),
    ("heavy", "weighty"), ("shiny", "gleaming"), ("dirty", "filthy"),
)
DISJOINT_NOUNS = (
    ("boat", "vessel"), ("car", "automobile"), ("sofa", "couch"), ("cup", "mug"), ("rug", "carpet"),
    ("cap", "hat"), ("jar", "pot"), ("bag", "sack"), ("stone", "rock"), ("rope", "cord"), ("bin", "can"),
    ("cart", "wagon"), ("lamp", "lantern"), ("gift", "present"), ("jacket", "coat"), ("box", "crate"),
)
DISJOINT_PLACES = (
    ("harbor", "port"), ("garden", "yard"), ("market", "bazaar"), ("attic", "loft"), ("workshop", "studio"),
    ("station", "depot"), ("forest", "woods"), ("cellar", "basement"), ("shop", "store"), ("road", "street"),
)
DISJOINT_SLOTS = (DISJOINT_NAMES, DISJOINT_VERBS, DISJOINT_ADJECTIVES, DISJOINT_NOUNS, DISJOINT_PLACES)


@dataclass(frozen=True)
class Fact:
    """One training fact; ``verb_form``/``place_form`` select the surface forms used (0 or 1)."""

    subject: str
    verb: int
    adjective: str
    noun: str
    place: int
    verb_form: int
    place_form: int
    front_place: bool  # "in the harbor mira ..." instead of "mira ... in the harbor"

    def words(self, *, verb_form=None, place_form=None, front_place=None, passive=False) -> str:
        v = VERBS[self.verb][self.verb_form if verb_form is None else verb_form]
        forms = PLACES[self.place]
        pf = self.place_form if place_form is None else place_form
        p = forms[pf] if forms[pf] is not None else forms[0]
        obj = f"the {self.adjective} {self.noun}"
        if passive:
            clause = f"{obj} was {PARTICIPLES.get(v, v)} by {self.subject}"
        else:
            clause = f"{self.subject} {v} {obj}"
        front = self.front_place if front_place is None else front_place
        return f"in the {p} {clause}" if front else f"{clause} in the {p}"


class WordTokenizer:
    """Word-level tokenizer: whitespace split, ``<bos> words <eos>``, padded with ``<pad>`` (id 0).

    Args:
        vocabulary: the words (specials are added first: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3).
    """

    def __init__(self, vocabulary):
        words = list(SPECIALS) + sorted(set(vocabulary) - set(SPECIALS))
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentence: str) -> list[int]:
        """``[<bos>, word ids..., <eos>]`` (unknown words map to ``<unk>``)."""
        return [self.bos_id] + [self.stoi.get(w, self.unk_id) for w in sentence.split()] + [self.eos_id]

    def encode_batch(self, sentences, length: int | None = None) -> Tensor:
        """``[n, length]`` int64, right-padded with ``<pad>`` (length: the longest, by default)."""
        rows = [self.encode(s) for s in sentences]
        length = length or max(len(r) for r in rows)
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        for i, r in enumerate(rows):
            r = r[:length]
            out[i, : len(r)] = torch.tensor(r)
        return out

    def decode(self, ids) -> str:
        """Words of ``ids`` without specials."""
        return " ".join(self.itos[i] for i in ids if self.itos[i] not in SPECIALS)


@dataclass
class TextCorpus:
    """Training sentences, paraphrase queries with their source sentence ids, and a tokenizer.

    Attributes:
        sentences: training sentences (id = index).
        facts: the fact behind each training sentence.
        queries: paraphrases.
        query_source: for each query, the id of the training sentence it paraphrases.
        query_kind: for each query, one of :data:`QUERY_KINDS`.
        tokenizer: a :class:`WordTokenizer` over every word of sentences and queries.
    """

    sentences: list[str]
    facts: list[Fact]
    queries: list[str]
    query_source: list[int]
    query_kind: list[str]
    tokenizer: WordTokenizer = field(repr=False)


def paraphrase(fact: Fact, kind: str) -> str:
    """A paraphrase of ``fact``'s training sentence of the given kind (see :data:`QUERY_KINDS`)."""
    other_verb = 1 - fact.verb_form
    other_place = 1 - fact.place_form if PLACES[fact.place][1] is not None else fact.place_form
    if kind == "reorder":
        return fact.words(front_place=not fact.front_place)
    if kind == "synonym":
        return fact.words(verb_form=other_verb, place_form=other_place)
    if kind == "passive":
        return fact.words(passive=True)
    if kind == "passive+synonym":
        return fact.words(passive=True, verb_form=other_verb, place_form=other_place)
    raise ValueError(f"unknown paraphrase kind {kind!r}; one of {QUERY_KINDS}")


def disjoint_words(concepts: tuple[int, ...], forms: tuple[int, ...]) -> str:
    """``"{name} {verb} the {adjective} {noun} in the {place}"`` for concept and form indices per slot."""
    name, verb, adj, noun, place = (DISJOINT_SLOTS[k][c][f] for k, (c, f) in enumerate(zip(concepts, forms)))
    return f"{name} {verb} the {adj} {noun} in the {place}"


def make_disjoint_corpus(n_sentences: int = 240, n_queries: int = 40, seed: int = 0) -> TextCorpus:
    """The word-disjoint corpus (module docstring), generated deterministically from ``seed``.

    A fact is (name, verb, adjective, noun, place) concepts; each (name, verb) pair occurs in at
    most one training sentence, so the fact of a query ("what did bob fix, and where?") has
    exactly one source. Queries restate distinct source facts with every slot's form flipped;
    their kind is ``"disjoint"``. ``facts`` is empty (the :class:`Fact` type is the other corpus's).

    Args:
        n_sentences: training sentences (at most ``24 × 12 = 288``, the (name, verb) pairs).
        n_queries: queries (≤ n_sentences).
        seed: random seed.
    """
    limit = len(DISJOINT_NAMES) * len(DISJOINT_VERBS)
    if not 0 < n_queries <= n_sentences <= limit:
        raise ValueError(f"need 0 < n_queries <= n_sentences <= {limit}, got {n_queries} and {n_sentences}")
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(len(DISJOINT_NAMES)) for b in range(len(DISJOINT_VERBS))], n_sentences)
    concepts = [(a, b, rng.randrange(len(DISJOINT_ADJECTIVES)), rng.randrange(len(DISJOINT_NOUNS)),
                 rng.randrange(len(DISJOINT_PLACES))) for a, b in pairs]
    forms = [[0] * len(DISJOINT_SLOTS) for _ in concepts]
    for k in range(len(DISJOINT_SLOTS)):  # each concept's occurrences split evenly between its forms
        for c in {fact[k] for fact in concepts}:
            rows = [i for i, fact in enumerate(concepts) if fact[k] == c]
            rng.shuffle(rows)
            first = rng.randrange(2)
            for j, i in enumerate(rows):
                forms[i][k] = (first + j) % 2
    sentences = [disjoint_words(c, tuple(f)) for c, f in zip(concepts, forms)]
    sources = rng.sample(range(n_sentences), n_queries)
    queries = [disjoint_words(concepts[s], tuple(1 - f for f in forms[s])) for s in sources]
    forms = [tuple(f) for f in forms]
    vocab = {w for slot in DISJOINT_SLOTS for pair in slot for w in pair} | {"the", "in"}
    return TextCorpus(sentences, [], queries, sources, ["disjoint"] * n_queries, WordTokenizer(vocab))


def synonym_ids(tokenizer: WordTokenizer) -> Tensor:
    """``[vocab]`` int64: for each token id of the disjoint corpus, the id of its other surface
    form (itself for words with one form: specials, ``"the"``, ``"in"``)."""
    alt = torch.arange(len(tokenizer))
    for slot in DISJOINT_SLOTS:
        for a, b in slot:
            if a in tokenizer.stoi and b in tokenizer.stoi:
                alt[tokenizer.stoi[a]], alt[tokenizer.stoi[b]] = tokenizer.stoi[b], tokenizer.stoi[a]
    return alt


def make_corpus(n_sentences: int = 300, n_queries: int = 60, seed: int = 0) -> TextCorpus:
    """Generate the corpus deterministically from ``seed``.

    Each (subject, action, object) triple occurs at most once, so a query's fact has exactly one
    source sentence. Queries cycle through :data:`QUERY_KINDS` over distinct source sentences.

    Args:
        n_sentences: training sentences (at most a few thousand).
        n_queries: paraphrase queries (≤ n_sentences).
        seed: random seed.
    """
    if not 0 < n_queries <= n_sentences:
        raise ValueError(f"need 0 < n_queries <= n_sentences, got {n_queries} and {n_sentences}")
    rng = random.Random(seed)
    facts: list[Fact] = []
    seen = set()
    while len(facts) < n_sentences:
        f = Fact(
            subject=rng.choice(NAMES), verb=rng.randrange(len(VERBS)), adjective=rng.choice(ADJECTIVES),
            noun=rng.choice(NOUNS), place=rng.randrange(len(PLACES)), verb_form=rng.randrange(2),
            place_form=rng.randrange(2), front_place=rng.random() < 0.3,
        )
        key = (f.subject, f.verb, f.adjective, f.noun)
        if key in seen:
            continue
        seen.add(key)
        if PLACES[f.place][1] is None and f.place_form == 1:
            f = Fact(**{**f.__dict__, "place_form": 0})
        facts.append(f)
    sentences = [f.words() for f in facts]
    sources = rng.sample(range(n_sentences), n_queries)
    kinds = [QUERY_KINDS[i % len(QUERY_KINDS)] for i in range(n_queries)]
    queries = [paraphrase(facts[s], k) for s, k in zip(sources, kinds)]
    vocab = {w for s in sentences + queries for w in s.split()}
    vocab |= {w for pair in VERBS for w in pair} | {w for pair in PLACES for w in pair if w is not None}
    return TextCorpus(sentences, facts, queries, sources, kinds, WordTokenizer(vocab))
