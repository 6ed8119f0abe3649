"""A web-like text corpus built from text that ships with Python: clean prose plus junk.

Nothing is downloaded. Clean documents are the English reference topics of
``pydoc_data.topics`` (79 topics, ~465 kB), split at paragraph boundaries into documents of
``doc_bytes`` bytes; the topics are split between training documents and held-out documents
(whole topics on each side, so no paragraph leaks into the held-out text).

Low-quality documents are the kinds web corpora hold (:data:`LOW_KINDS`), made from that text
or from scratch:

* ``boilerplate``: a license header, navigation bar and cookie notice (written here), repeated
  with small variations (year, organization): many near-copies of one block;
* ``near_duplicate``: a copy of a clean training document with ~2% of its characters edited;
* ``shuffled``: clean English (from topics not otherwise used) with its words in random order;
* ``base64``: base64 of random or compressed bytes, wrapped at 76 columns;
* ``garbage``: random printable characters and UTF-8 read as Latin-1 (mojibake);
* ``foreign``: Chinese, Japanese and Korean prose lines from CPython's own test data
  (``test/cjkencodings``), or, where the ``test`` package is not installed, English under a
  fixed letter substitution (a pseudo-language with English's structure).

Tokens are UTF-8 bytes (vocabulary 256; byte 0 is padding and never occurs in the text). A
document becomes ``ceil(len / length)`` training sequences of ``length + 1`` bytes (the last one
right-padded with 0); each sequence carries the id of its document.

Example:
    >>> c = make_corpus(n_docs=20, low_fraction=0.2, seed=0)
    >>> len(c.docs), sum(k != "clean" for k in c.kind)
    (20, 4)
    >>> seqs, doc_of = to_sequences(c.docs, 64)
    >>> seqs.shape[1], int(doc_of.max()) == 19
    (65, True)
"""

from __future__ import annotations

import base64
import codecs
import random
import string
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LOW_KINDS = ("boilerplate", "near_duplicate", "shuffled", "base64", "garbage", "foreign")

BOILERPLATE = (
    "Copyright (c) {year} {org}. All rights reserved.\n"
    "Licensed under the terms in the LICENSE file at the root of this source tree. This file is\n"
    "provided AS IS, WITHOUT WARRANTY OF ANY KIND, express or implied, including but not limited to\n"
    "the warranties of merchantability and fitness for a particular purpose.\n"
    "Home | About us | Products | Blog | Careers | Contact | Privacy policy | Terms of use\n"
    "We use cookies to improve your experience. By continuing to browse this site you agree to our\n"
    "use of cookies. Accept all | Reject all | Cookie settings\n"
    "Subscribe to our newsletter! Enter your email address: [          ] Sign up\n"
)
ORGS = ("Acme Corp", "Example Ltd", "Widget Inc", "Foo Systems", "Bar Media", "Nimbus LLC")


@dataclass
class WebCorpus:
    """Training documents (id = index) with their kind, and held-out clean documents.

    Attributes:
        docs: training documents (str).
        kind: ``"clean"`` or one of :data:`LOW_KINDS`, per training document.
        heldout: clean documents from topics no training document comes from.
    """

    docs: list[str]
    kind: list[str]
    heldout: list[str]

    @property
    def low(self) -> np.ndarray:
        """``[n_docs]`` bool: the document is one of the low-quality kinds."""
        return np.array([k != "clean" for k in self.kind])


def _topic_documents(text: str, doc_bytes: tuple[int, int], rng: random.Random) -> list[str]:
    """Split one topic into documents of about ``doc_bytes`` bytes at paragraph boundaries."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    docs, cur = [], ""
    target = rng.randint(*doc_bytes)
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur.encode()) >= target:
            docs.append(cur[: doc_bytes[1]])
            cur, target = "", rng.randint(*doc_bytes)
    if len(cur.encode()) >= doc_bytes[0] // 2:
        docs.append(cur)
    return [d.replace("\x00", "") for d in docs]


def _edit(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, int(rate * len(chars)))):
        chars[i] = rng.choice(string.ascii_lowercase) if rng.random() < 0.7 else ""
    return "".join(chars)


def _foreign_lines() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
    lines: list[str] = []
    for p in sorted(root.glob("*-utf8.txt")):
        for line in p.read_text("utf-8").splitlines():
            if line.strip() and not line.isascii() and line not in lines:
                lines.append(line)
    return lines


_SUBSTITUTION = str.maketrans(string.ascii_lowercase, "qwertzuiopasdfghjklyxcvbnm")


def _low_document(kind: str, size: int, rng: random.Random, clean: list[str], spare: list[str],
                  foreign: list[str]) -> str:
    """One low-quality document of about ``size`` bytes."""
    if kind == "boilerplate":
        out = ""
        while len(out) < size:
            out += BOILERPLATE.format(year=rng.choice(range(2015, 2025)), org=rng.choice(ORGS))
        return out[:size]
    if kind == "near_duplicate":
        return _edit(rng.choice(clean), 0.02, rng)
    if kind == "shuffled":
        words = rng.choice(spare).split()
        rng.shuffle(words)
        return " ".join(words)[:size]
    if kind == "base64":
        raw = rng.randbytes(size) if rng.random() < 0.5 else zlib.compress(rng.choice(spare).encode() * 2)
        text = base64.b64encode(raw).decode()[: size]
        return "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    if kind == "garbage":
        if rng.random() < 0.5:
            return "".join(rng.choice(string.printable[:94] + " ") for _ in range(size))
        mojibake = ("Ã©", "Ã¨", "â€™", "â€œ", "Ã¯Â»Â¿", "Ã¢", "Â")
        return "".join(c if rng.random() < 0.6 else rng.choice(mojibake) for c in rng.choice(spare))[:size]
    if kind == "foreign":
        if foreign:
            out = ""
            while len(out.encode()) < size:
                out += rng.choice(foreign) + "\n"
            return out
        return codecs.decode(rng.choice(spare), "rot13").translate(_SUBSTITUTION)[:size]
    raise ValueError(f"unknown low-quality kind {kind!r}; one of {LOW_KINDS}")


def make_corpus(n_docs: int = 200, low_fraction: float = 0.2, seed: int = 0, doc_bytes: tuple[int, int] = (600, 1600),
                heldout_topics: int = 12, kinds: tuple[str, ...] = LOW_KINDS) -> WebCorpus:
    """The corpus, deterministic given ``seed`` (see the module docstring).

    Args:
        n_docs: training documents in all.
        low_fraction: share of them that are low-quality (kinds cycled in order, so each kind
            gets an equal share up to one document).
        seed: random seed.
        doc_bytes: clean document sizes are drawn uniformly from this range (bytes).
        heldout_topics: pydoc topics set aside for the held-out documents (the largest
            ones are not chosen, so no single topic dominates).
        kinds: the low-quality kinds used.
    """
    if not 0.0 <= low_fraction < 1.0:
        raise ValueError(f"low_fraction must be in [0, 1), got {low_fraction}")
    import pydoc_data.topics

    rng = random.Random(seed)
    topics = sorted(pydoc_data.topics.topics.items())
    rng.shuffle(topics)
    small = [t for t in topics if len(t[1]) < 20_000]
    held_names = {name for name, _ in small[:heldout_topics]}
    heldout = [d for name, text in topics if name in held_names for d in _topic_documents(text, doc_bytes, rng)]
    pool = [d for name, text in topics if name not in held_names for d in _topic_documents(text, doc_bytes, rng)]
    rng.shuffle(pool)
    n_low = int(round(low_fraction * n_docs))
    n_clean = n_docs - n_low
    if n_clean + n_low > len(pool):
        raise ValueError(f"n_docs={n_docs} needs more clean text than pydoc_data.topics gives ({len(pool)} documents)")
    clean, spare = pool[:n_clean], pool[n_clean:] or pool
    foreign = _foreign_lines()
    low = [(kinds[i % len(kinds)], _low_document(kinds[i % len(kinds)], rng.randint(*doc_bytes), rng, clean, spare,
                                                  foreign)) for i in range(n_low)]
    docs = [(("clean", d)) for d in clean] + low
    rng.shuffle(docs)
    return WebCorpus([d for _, d in docs], [k for k, _ in docs], heldout)


def to_sequences(docs: list[str], length: int) -> tuple[torch.Tensor, np.ndarray]:
    """Byte sequences of the documents and the document of each.

    Args:
        docs: documents (id = index).
        length: tokens a model reads per sequence; each sequence holds ``length + 1`` bytes.

    Returns:
        ``(seqs [n_seq, length + 1] int64, doc_of [n_seq] int64)``; a document of ``b`` bytes
        gives ``ceil(b / length)`` sequences (consecutive windows overlapping by one byte, the last
        right-padded with 0), in document order.
    """
    rows, doc_of = [], []
    for d, text in enumerate(docs):
        data = text.encode("utf-8").replace(b"\x00", b"")
        for start in range(0, max(len(data) - 1, 1), length):
            chunk = data[start:start + length + 1]
            rows.append(list(chunk) + [0] * (length + 1 - len(chunk)))
            doc_of.append(d)
    return torch.tensor(rows, dtype=torch.int64), np.array(doc_of, dtype=np.int64)


# -- the filters practitioners use without a model (baselines of benchmarks/curation.py) --------

STOPWORDS = frozenset("the of and to a in is it that for as with be by this on are or an not if from at".split())


def gzip_score(docs: list) -> np.ndarray:
    """``-|log r - median log r|``, ``r`` = compressed / raw bytes: far from typical text = low."""
    raw = [d.encode("utf-8") for d in docs]
    logr = np.log([len(zlib.compress(b, 9)) / max(len(b), 1) for b in raw])
    return -np.abs(logr - np.median(logr))


def heuristic_score(docs: list) -> np.ndarray:
    """Classifier-free quality rules in the style of Gopher / C4 (higher = cleaner)."""
    out = []
    for d in docs:
        words = d.split()
        letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in d) / max(len(d), 1)
        stop = sum(w.lower().strip(".,;:()\"'") in STOPWORDS for w in words) / max(len(words), 1)
        mean_len = np.mean([len(w) for w in words]) if words else 0.0
        penalty = (0.0 if 3 <= mean_len <= 10 else 1.0) + (0.0 if len(words) >= 50 else 0.5)
        out.append(letters + stop - penalty)
    return np.array(out)


__all__ = ["LOW_KINDS", "STOPWORDS", "WebCorpus", "gzip_score", "heuristic_score", "make_corpus", "to_sequences"]
