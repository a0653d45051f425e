"""Output stems: the collision-free, stable output names of many inputs (batch_predict, serve_client).

Standard library only, so the TensorFlow-free serve_client can use the same rules as batch_predict: each input's
stem is its path relative to a fixed prefix (its pattern's, or the inputs' common folder) without the extension;
stems that would coincide (``a.png`` and ``a.dcm``, the same relative path under two patterns, names differing
only in case) all get ``-<first 8 hex of sha256(URI)>``; should such a name still meet another, those inputs get
the full 64-hex hash.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator

GLOB_CHARS = "*?["
SHORT_HASH = 8


def fixed_prefix(pattern: str) -> str:
    """The folder part of a pattern before its first glob character, ending in ``/`` (inputs' stems are relative
    to it): ``gs://b/x/**/*.png`` -> ``gs://b/x/``; a literal file -> its folder."""
    m = min((pattern.index(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[: pattern.rfind("/", 0, m) + 1]


def relative_stem(uri: str, prefix: str) -> str:
    """The stem candidate of an input: its path below `prefix` without the extension (``x/a.png`` -> ``x/a``)."""
    rel = uri[len(prefix):] if prefix and uri.startswith(prefix) else posixpath.basename(uri)
    rel = rel.replace("\\", "/").lstrip("/")
    head, tail = posixpath.split(rel)
    root = posixpath.splitext(tail)[0] or tail
    return posixpath.join(head, root) if head else root


def uri_hash(uri: str, n: int = SHORT_HASH) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:n]


def assign_stems(candidate_key: str, members: Iterable[tuple[str, str]]) -> Iterator[tuple[str, tuple[str, str]]]:
    """One group of inputs whose stem candidates are equal ignoring case: ``(candidate, uri)`` members.

    Yields ``(final stem lower-cased, (final stem, uri))``: the candidate itself when the group holds one input,
    else ``candidate-<8 hex of sha256(uri)>`` for each member.
    """
    members = sorted(set(members))
    for candidate, uri in members:
        stem = candidate if len(members) == 1 else f"{candidate}-{uri_hash(uri)}"
        yield stem.lower(), (stem, uri)


def resolve_collisions(stem_key: str, members: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """The second check: inputs whose final stems still coincide (a file literally named like another's hashed
    stem, or a short-hash collision) get ``-<full sha256 of the URI>`` instead. Yields ``(uri, stem)``."""
    members = sorted(set(members))
    for stem, uri in members:
        yield uri, stem if len(members) == 1 else f"{stem}-{uri_hash(uri, 64)}"


def plan_stems(uris_and_prefixes: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Outside Beam (tests, small runs): {uri: stem} with the pipeline's rules for ``(uri, prefix)`` pairs."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for uri, prefix in uris_and_prefixes:
        cand = relative_stem(uri, prefix)
        groups.setdefault(cand.lower(), []).append((cand, uri))
    second: dict[str, list[tuple[str, str]]] = {}
    for key, members in groups.items():
        for k, v in assign_stems(key, members):
            second.setdefault(k, []).append(v)
    return {uri: stem for key, members in second.items() for uri, stem in resolve_collisions(key, members)}
