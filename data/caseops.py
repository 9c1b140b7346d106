"""CaseOps: a reversible case transform, in the format of parameter-golf's `lossless_caps_caseops_v1`.

Capitals are taken out of the text and written as private-use operator characters in front of lowercase letters, so
that a tokenizer spends its pieces on words rather than on their case variants ("the", "The", "THE"). Words are the
maximal runs of ASCII letters; nothing else is touched:

  lowercase word       unchanged                                 "quick"  -> "quick"
  all capitals (2+)    ALLCAPS + the word in lowercase           "FOX"    -> ALLCAPS "fox"
  any other with caps  TITLE before it if its first letter is a capital, CAPNEXT before every later capital,
                       every letter in lowercase                 "The"    -> TITLE "the", "A" -> TITLE "a",
                                                                 "iPhone" -> "i" CAPNEXT "phone"
  an operator character in the text   ESCAPE + that character

  TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESCAPE U+E004 (data.loader.CASEOPS_OPERATORS).

The transformed text holds no ASCII capital. `decode(encode(s)) == s` for every string s; `decode` raises CaseOpsError
for a string that `encode` cannot produce. The operators are user-defined pieces of a CaseOps tokenizer, so every
operator is a token of its own, and bits per byte counts the bytes of the original text: an operator stands for 0
bytes, an escaped operator character for its 3 UTF-8 bytes, every other character for its own. Per token, those counts
are the dataset's byte sidecar (`*_val_bytes_*.bin`, see data/loader.py).

`encode` and `decode` are regular-expression passes; `encode_reference` (one character at a time) and
`token_original_bytes_reference` (the bytes of each token, by walking the decoded characters) are the slow, obvious
versions the tests hold them to.
"""

from __future__ import annotations

import functools
import re

from data.loader import (CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESCAPE, CASEOPS_OPERATORS, CASEOPS_TITLE,
                         DataError)

TRANSFORM_NAME = "lossless_caps_caseops_v1"  # parameter-golf's name for this format (their tokenizer specs)


class CaseOpsError(ValueError):
    """A string that is not the CaseOps encoding of any text."""


# a word with a capital (lowercase words are left as they are, so they need not be matched), or an operator character
_WORD_OR_OPERATOR = re.compile(f"[a-z]*[A-Z][A-Za-z]*|[{CASEOPS_OPERATORS}]")
_ENCODED_UNIT = re.compile(f"{CASEOPS_ESCAPE}([\\s\\S])|{CASEOPS_ALLCAPS}([a-z]+)|[{CASEOPS_TITLE}{CASEOPS_CAPNEXT}]"
                           "([a-z])")


def _encode_word(word: str) -> str:
    if word.islower():
        return word
    if len(word) >= 2 and word.isupper():
        return CASEOPS_ALLCAPS + word.lower()
    head = (CASEOPS_TITLE if word[0].isupper() else "") + word[0].lower()
    return head + "".join(CASEOPS_CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


@functools.lru_cache(maxsize=1 << 16)
def _encode_unit(s: str) -> str:  # words repeat: the cache makes encode about twice as fast on the sample
    return CASEOPS_ESCAPE + s if s in CASEOPS_OPERATORS else _encode_word(s)


def _encode_match(m: re.Match) -> str:
    return _encode_unit(m.group())


def encode(text: str) -> str:
    """The CaseOps form of `text`."""
    return _WORD_OR_OPERATOR.sub(_encode_match, text)


def _decode_match(m: re.Match) -> str:
    escaped, allcaps, capital = m.groups()
    if escaped is not None:
        return escaped
    return (allcaps if allcaps is not None else capital).upper()


def decode(text: str) -> str:
    """The text whose CaseOps form is `text`; CaseOpsError when there is none (a dangling or misplaced operator, an
    ASCII capital, an escape of something that is not an operator)."""
    out = _ENCODED_UNIT.sub(_decode_match, text)
    if encode(out) != text:  # every other string: decode is the inverse of encode on exactly encode's image
        raise CaseOpsError(f"not a CaseOps string (first difference at character {_first_difference(encode(out), text)})")
    return out


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_reference(text: str) -> str:
    """encode, one character at a time: the slow and obvious version."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c in CASEOPS_OPERATORS:
            out.append(CASEOPS_ESCAPE + c)
            i += 1
            continue
        if not ("a" <= c <= "z" or "A" <= c <= "Z"):
            out.append(c)
            i += 1
            continue
        j = i
        while j < len(text) and ("a" <= text[j] <= "z" or "A" <= text[j] <= "Z"):
            j += 1
        word = text[i:j]
        capitals = [("A" <= c <= "Z") for c in word]
        if not any(capitals):
            out.append(word)
        elif all(capitals) and len(word) > 1:
            out.append(CASEOPS_ALLCAPS + word.lower())
        else:
            for k, (c, cap) in enumerate(zip(word, capitals)):
                if cap:
                    out.append(CASEOPS_TITLE if k == 0 else CASEOPS_CAPNEXT)
                out.append(c.lower())
        i = j
    return "".join(out)


def token_original_bytes_reference(sp, ids) -> list[int]:
    """Bytes of the original text each token of `ids` (one document after its BOS, a CaseOps tokenizer `sp`) stands
    for, by walking the characters the tokens decode to: an operator counts 0, the character after an ESCAPE and every
    other character its UTF-8 bytes. Byte-fallback pieces count 1 each; control pieces 0. The slow and obvious version
    of data.loader.token_original_bytes."""
    counts, escaped = [], False
    for token in (int(t) for t in ids):
        if sp.is_control(token) or sp.is_unknown(token):
            counts.append(0)
            continue
        if sp.is_byte(token):
            counts.append(1)
            escaped = False
            continue
        n = 0
        for c in sp.id_to_piece(token).replace("\u2581", " "):
            if escaped:
                n, escaped = n + len(c.encode("utf-8")), False
            elif c == CASEOPS_ESCAPE:
                escaped = True
            elif c not in CASEOPS_OPERATORS:
                n += len(c.encode("utf-8"))
        counts.append(n)
    return counts


def check_tokenizer(sp, path: str) -> None:
    """DataError naming `path` unless every CaseOps operator is a single piece of `sp` (so that every operator is one
    token, whose sidecar entry is 0)."""
    missing = [f"U+{ord(c):04X}" for c in CASEOPS_OPERATORS
               if sp.piece_to_id(c) == sp.unk_id() or sp.id_to_piece(sp.piece_to_id(c)) != c]
    if missing:
        raise DataError(f"{path}: not a CaseOps tokenizer: the operator(s) {', '.join(missing)} are not pieces of it"
                        " (train it with --caseops, which makes them user-defined symbols)")
