"""A generated English → French-like parallel corpus with a known word alignment.

Every sequence is ``<english sentence> = <french sentence>``: six English words, the separator
``=``, six "French" words. The translation is a fixed word-to-word dictionary (:data:`LEXICON`,
46 words per language: 20 nouns, 12 adjectives, 12 verbs, 2 articles) applied through one of two
templates that also reorder the words (the French adjective follows its noun)::

    T0: the ADJ N1 VERB the N2   =  le N1 ADJ VERB le N2
    T1: a N1 VERB the ADJ N2     =  un N1 VERB le N2 ADJ

So each French token has exactly one aligned English token (:attr:`BilingualCorpus.alignment`),
at a position that depends on the template, not only on its own position. This is a toy
dictionary (no gender or agreement), built to make "which training token taught the model this
output token" checkable: a French output word's translation is its aligned English word.

Token ids: 0 = padding (never used: every sequence has the same length), 1 = ``=``, then the
English words, then the French words. A sequence is 13 ids; a language model reads the first 12
and predicts ids 1..12, so prediction ``p`` (0-based) targets token ``p + 1``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NOUNS = [("cat", "chat"), ("dog", "chien"), ("bird", "oiseau"), ("fish", "poisson"), ("horse", "cheval"),
         ("mouse", "souris"), ("king", "roi"), ("queen", "reine"), ("child", "enfant"), ("man", "homme"),
         ("woman", "femme"), ("farmer", "fermier"), ("teacher", "professeur"), ("doctor", "medecin"),
         ("friend", "ami"), ("baker", "boulanger"), ("wolf", "loup"), ("bear", "ours"), ("fox", "renard"),
         ("cow", "vache")]
ADJECTIVES = [("big", "grand"), ("small", "petit"), ("old", "vieux"), ("young", "jeune"), ("red", "rouge"),
              ("black", "noir"), ("white", "blanc"), ("happy", "heureux"), ("sad", "triste"), ("fast", "rapide"),
              ("tired", "fatigue"), ("clever", "malin")]
VERBS = [("sees", "voit"), ("eats", "mange"), ("likes", "aime"), ("helps", "aide"), ("follows", "suit"),
         ("finds", "trouve"), ("calls", "appelle"), ("watches", "regarde"), ("hears", "entend"),
         ("chases", "chasse"), ("knows", "connait"), ("meets", "rencontre")]
ARTICLES = [("the", "le"), ("a", "un")]
LEXICON: dict[str, str] = dict(NOUNS + ADJECTIVES + VERBS + ARTICLES)
"""English word → its one French word."""
FUNCTION_WORDS = frozenset({"the", "a", "le", "un", "="})
SEPARATOR = "="
EN_LEN = FR_LEN = 6
SEQ_LEN = EN_LEN + 1 + FR_LEN
FR_START = EN_LEN + 1
"""Index of the first French token in a sequence (13 tokens: 6 English, ``=``, 6 French)."""

# French slot j takes the English word at position ALIGN[template][j].
ALIGN = ((0, 2, 1, 3, 4, 5), (0, 1, 2, 3, 5, 4))


def english(template: int, adj: str, n1: str, verb: str, n2: str) -> list[str]:
    """The six English words of a template filled with ``adj, n1, verb, n2``."""
    if template == 0:
        return ["the", adj, n1, verb, "the", n2]
    return ["a", n1, verb, "the", adj, n2]


@dataclass
class BilingualCorpus:
    """Token ids, words and alignments of the training and query sequences.

    Attributes:
        vocab: id → word (id 0 is ``<pad>``, id 1 is ``=``).
        train: ``[n, 13]`` int64 training sequences.
        queries: ``[m, 13]`` int64 held-out sequences (their (template, words) tuples never occur
            in training; every word does, many times).
        train_alignment: ``[n, 6]``: French slot j of training sequence i translates English
            position ``train_alignment[i, j]`` (0..5).
        query_alignment: ``[m, 6]``, the same for the queries.
    """

    vocab: list[str]
    train: torch.Tensor
    queries: torch.Tensor
    train_alignment: torch.Tensor
    query_alignment: torch.Tensor

    @property
    def stoi(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def words(self, ids) -> list[str]:
        """The words of a row of ids."""
        return [self.vocab[int(i)] for i in ids]

    def text(self, ids) -> str:
        return " ".join(self.words(ids))

    def translation_id(self, word_id: int) -> int:
        """Id of the other-language word of ``word_id`` (English ↔ French); -1 for ``=``/pad."""
        w = self.vocab[word_id]
        back = {fr: en for en, fr in LEXICON.items()}
        other = LEXICON.get(w, back.get(w))
        return -1 if other is None else self.stoi[other]

    def is_content(self, word_id: int) -> bool:
        """Nouns, adjectives and verbs (not articles, not ``=``)."""
        return self.vocab[word_id] not in FUNCTION_WORDS and word_id != 0


def make_bilingual_corpus(n_train: int = 300, n_queries: int = 24, seed: int = 0) -> BilingualCorpus:
    """Draw distinct (template, adjective, noun, verb, noun) tuples; the first ``n_train`` train.

    Each word class is dealt from a shuffled deck (refilled when empty), so every word occurs
    about equally often and all occur within the first 20 sequences.

    Args:
        n_train: training sequences.
        n_queries: held-out query sequences (distinct from every training tuple).
        seed: the draw's seed (``random.Random``).

    Raises:
        ValueError: a word of the lexicon never occurs in the training set (choose more
            sequences or another seed).
    """
    rng = random.Random(seed)
    decks: dict[str, list] = {}

    def deal(name: str, pool: list, k: int = 1) -> list[str]:
        # words come from a shuffled deck refilled when empty, so every word occurs early and evenly
        deck = decks.setdefault(name, [])
        if len(deck) < k:
            deck.extend(rng.sample([en for en, _ in pool], len(pool)))
        return [deck.pop() for _ in range(k)]

    en_words = [en for en, _ in ARTICLES + NOUNS + ADJECTIVES + VERBS]
    vocab = ["<pad>", SEPARATOR] + en_words + [LEXICON[w] for w in en_words]
    stoi = {w: i for i, w in enumerate(vocab)}
    seen: set = set()
    rows, aligns = [], []
    while len(rows) < n_train + n_queries:
        t = rng.randrange(2)
        (adj,), (verb,), (n1, n2) = deal("adj", ADJECTIVES), deal("verb", VERBS), deal("noun", NOUNS, 2)
        if n1 == n2:
            continue
        key = (t, adj, n1, verb, n2)
        if key in seen:
            continue
        seen.add(key)
        en = english(t, adj, n1, verb, n2)
        fr = [LEXICON[en[a]] for a in ALIGN[t]]
        rows.append([stoi[w] for w in en + [SEPARATOR] + fr])
        aligns.append(ALIGN[t])
    ids, align = torch.tensor(rows), torch.tensor(aligns)
    present = set(ids[:n_train].flatten().tolist())
    missing = [vocab[i] for i in range(2, len(vocab)) if i not in present]
    if missing:
        raise ValueError(f"training set of {n_train} sequences misses words {missing}: raise n_train or change seed")
    return BilingualCorpus(vocab, ids[:n_train], ids[n_train:], align[:n_train], align[n_train:])


__all__ = ["ALIGN", "BilingualCorpus", "FR_START", "FUNCTION_WORDS", "LEXICON", "SEQ_LEN", "make_bilingual_corpus"]
