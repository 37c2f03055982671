"""MIRe's stage-1 "response-to-passage" (R2P) pairs, built from the synthetic world.

MIRe pretrains its query-guided pooling on ViD2R: (image, question) -> pseudo-passage pairs
made from visual-dialogue turns. This module holds the pure part of that recipe, following
MIRe's reference code:

* ``filter_turn``: the rules of ``runs/data_filtering.py`` (``filter_1st_stage`` and
  ``is_bad_question``) for one (question, response) turn, in the reference's order:
  the ``<image>`` tag is removed from the question; the response is lower-cased; responses
  containing "unanswerable." or "answering does not require reading" are dropped
  ("unanswerable"), then purely numeric ones, one trailing "." ignored ("numeric"); the
  boilerplate regexes (BOILERPLATE, kept as written: no word boundaries) are deleted, and a
  response left empty is dropped ("empty"); a response of at most 4 words gets the nouns of
  the question's first line appended in parentheses; questions containing "How many",
  "What color", "What is the color", "What are the colors" or "a short description for this
  region:" are dropped ("bad_question"), then responses shorter than ``drop_len`` (30)
  characters, measured before the final strip as in the reference ("short"); the first
  character is upper-cased; with a "," in the question, its first ", "-clause is deleted from
  the response. Where the reference has a slip this follows its intent: the numeric check
  always looks at the response (the reference reads a stale ``ref`` when the response does
  not end in "."), and the nouns come from the question's first line whether or not it has
  several (the reference's ``phrase`` is set only for multi-line questions).
  The reference finds nouns with spaCy (``NOUN``/``PROPN`` of ``en_core_web_sm``); this
  approximation takes the words of the world's vocabulary that are nouns (shapes, positions,
  "object", "image", ...: WORLD_NOUNS) and capitalised words after the first (a proper-noun
  stand-in), in order.
* ``truncate_passage`` and ``pseudo_passage``: ``runs/convert_tasks.py`` (lines 41-66): each
  passage keeps its first two "."-separated sentences (``".".join(p.split(".")[:2])``, so
  the kept text loses its last "."), and the document is ``" ".join([D1, R, D2, D3])`` with
  ".." replaced by ".": the response R right after the first passage. The filtered R is kept
  as ``answer``. The reference's ``--remove_bracket`` mode is not offered.
* ``build_r2p_pairs``: turns -> (image, question) -> document pairs, as ``dataset/vid2r.py``
  reads them, with the count each filter dropped. The reference retrieves D1..Dk for R with
  ColBERTv2 from 6M Wikipedia passages; here they are *sampled*, deterministically per
  (seed, turn id), from ``knowledge_passages``, an encyclopedia of the world's entities
  (one passage per colour and shape), among the entities not in the turn's image.

Not reproduced: the Visual Genome (``VG_100K``) image skip (the world has none), Ret_XKnow's
neural filtering, the ``--save_negative`` negatives (no released config uses them) and the
512-pair validation hold-out (a random split at training time in ``train_retrieval.py``).
The synthetic dialogues and the writer are in ``r2p_write.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jfe_jax.data.synthetic.world import COLOURS, POSITIONS, SHAPES, derive_seed

logger = logging.getLogger(__name__)

DROP_LEN = 30  # the reference's --drop_len
N_DISTRACTORS = 3  # the reference's --n_cands in convert_tasks.py
PASSAGE_SENTENCES = 2
DROP_REASONS: tuple[str, ...] = ("unanswerable", "numeric", "empty", "bad_question", "short")
BAD_QUESTION_PARTS: tuple[str, ...] = (
    "How many",
    "What color",
    "What is the color",
    "What are the colors",
)
REGION_PROMPT = "a short description for this region:"
# runs/data_filtering.py's substitutions, applied in this order to the lower-cased response.
BOILERPLATE: tuple[str, ...] = (
    r"(yes|no|answerable)([,.!])",
    r"(certainly|sure)[!.]",
    r"in (the|this) (image|scene|photo|picture)([,\s])?",
    r"the image (showcases|features|captures|depicts|shows|presents|displays) ",
)
_BOILERPLATE = tuple(re.compile(p) for p in BOILERPLATE)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


_COMMON_NOUNS = ("shape", "object", "image", "picture", "photo", "scene", "color", "colour")
_COMMON_NOUNS += ("side", "label", "text", "sign", "region", "card", "thing")
WORLD_NOUNS: frozenset[str] = frozenset(
    [*SHAPES, *POSITIONS, *_COMMON_NOUNS, *(_plural(n) for n in (*SHAPES, *_COMMON_NOUNS))]
)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One (human, gpt) dialogue turn about an image, before filtering.

    ``entities`` names the image's entities ("red circle"); their passages are never drawn
    as its distractors."""

    id: str
    image_path: str
    question: str
    response: str
    entities: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Filtered:
    """What ``filter_turn`` made of a turn: ``reason`` is None when it is kept."""

    question: str
    response: str | None
    reason: str | None = None
    stripped: bool = False  # a boilerplate regex changed the response
    nouns_appended: bool = False


@dataclasses.dataclass(frozen=True)
class R2PPair:
    """One training pair: (image, question) -> document; ``answer`` is the filtered response
    inside it and ``distractors`` the entities whose passages surround it (D1 first)."""

    id: str
    image_path: str
    question: str
    document: str
    answer: str
    distractors: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class R2PResult:
    """The pairs kept and what the filters did: ``dropped`` {reason: turns} for every
    DROP_REASONS entry, ``stripped`` and ``nouns_appended`` counts among all turns."""

    pairs: list[R2PPair]
    turns: int
    dropped: dict[str, int]
    stripped: int
    nouns_appended: int

    def counts(self) -> dict[str, Any]:
        """The summary the writer's manifest keeps and the builder logs."""
        return {
            "turns": self.turns,
            "kept": len(self.pairs),
            "dropped": dict(self.dropped),
            "boilerplate_stripped": self.stripped,
            "nouns_appended": self.nouns_appended,
        }


def is_bad_question(question: str) -> bool:
    """The reference's ``is_bad_question``: counting, colour and region prompts (case as
    written: "what color" passes)."""
    return REGION_PROMPT in question or any(p in question for p in BAD_QUESTION_PARTS)


def strip_boilerplate(response: str) -> str:
    """The BOILERPLATE substitutions on an already lower-cased response."""
    for pattern in _BOILERPLATE:
        response = pattern.sub("", response)
    return response


def question_nouns(question: str) -> list[str]:
    """The nouns of the question's first line, approximated (module docstring)."""
    words = re.findall(r"[A-Za-z]+", question.split("\n")[0])
    return [
        w for i, w in enumerate(words) if w.lower() in WORLD_NOUNS or (i > 0 and w[0].isupper())
    ]


def filter_turn(question: str, response: str, *, drop_len: int = DROP_LEN) -> Filtered:
    """One turn through ``runs/data_filtering.py``'s rules (module docstring)."""
    question = question.replace("<image>", "").strip()
    doc = response.strip().lower()
    if "unanswerable." in doc or "answering does not require reading" in doc:
        return Filtered(question, None, "unanswerable")
    if doc.removesuffix(".").strip().isdigit():
        return Filtered(question, None, "numeric")
    cleaned = strip_boilerplate(doc)
    stripped = cleaned != doc
    if not cleaned.strip():
        return Filtered(question, None, "empty", stripped)
    nouns = question_nouns(question) if len(cleaned.split()) <= 4 else []
    if nouns:
        cleaned = f"{cleaned} ({', '.join(nouns)})"
    if is_bad_question(question) or len(cleaned) < drop_len:
        reason = "bad_question" if is_bad_question(question) else "short"
        return Filtered(question, None, reason, stripped, bool(nouns))
    cleaned = cleaned.strip()
    cleaned = cleaned[0].upper() + cleaned[1:]
    if "," in question:
        cleaned = cleaned.replace(question.split(", ")[0], "")
    return Filtered(question, cleaned, None, stripped, bool(nouns))


# ---------------------------------------------------------------------------------------------
# Passages
# ---------------------------------------------------------------------------------------------

SHAPE_FACTS: dict[str, str] = {
    "circle": "a round shape with no corners and no straight sides",
    "square": "a shape with four equal sides and four right angles",
    "triangle": "a shape with three straight sides and three corners",
    "diamond": "a square turned to stand on one of its corners",
    "star": "a shape with five points around a small centre",
    "pentagon": "a shape with five straight sides of equal length",
    "hexagon": "a shape with six straight sides, like a honeycomb cell",
    "cross": "two bars of equal length that meet at their middles",
}
COLOUR_FACTS: dict[str, str] = {
    "red": "the colour of ripe strawberries",
    "green": "the colour of fresh grass",
    "blue": "the colour of a clear sky",
    "yellow": "the colour of lemons",
    "purple": "a mix of red and blue",
    "orange": "a mix of red and yellow",
    "pink": "a pale red",
    "cyan": "a mix of green and blue",
    "brown": "the colour of wood",
    "black": "the darkest colour of all",
}


def entity_name(colour: str, shape: str) -> str:
    """ "red circle": an entity of the encyclopedia."""
    return f"{colour} {shape}"


def knowledge_passages() -> dict[str, str]:
    """{entity: passage} for every colour and shape of the world, four sentences each (the
    stand-in for the reference's Wikipedia passages)."""
    passages = {}
    for shape in SHAPES:
        for colour in COLOURS:
            passages[entity_name(colour, shape)] = (
                f"The {colour} {shape} is {SHAPE_FACTS[shape]}. "
                f"It is drawn in {colour}, {COLOUR_FACTS[colour]}. "
                f"A {colour} {shape} comes in a small and a large size and may stand on the "
                "left, at the top, in the center, at the bottom or on the right of a scene. "
                f"Its encyclopedia card shows one {colour} {shape} alone in the center."
            )
    return passages


def truncate_passage(passage: str, sentences: int = PASSAGE_SENTENCES) -> str:
    """The first ``sentences`` "."-separated pieces, joined by "." (convert_tasks.py)."""
    return ".".join(passage.split(".")[:sentences])


def pseudo_passage(response: str, passages: Sequence[str]) -> str:
    """ "D1 R D2 ... Dk" with ".." made "." (convert_tasks.py); ``passages`` are truncated."""
    if not passages:
        raise ValueError("pseudo_passage needs at least one passage (D1 comes before R)")
    return " ".join([passages[0], response, *passages[1:]]).replace("..", ".")


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------

_TURN_FIELDS = ("id", "image_path", "question", "response")


def _as_turn(record: Turn | Mapping[str, Any], index: int) -> Turn:
    if isinstance(record, Turn):
        turn = record
    elif isinstance(record, Mapping):
        missing = [f for f in _TURN_FIELDS if f not in record]
        if missing:
            raise ValueError(f"turn {index} ({record.get('id', '?')!r}) has no {missing}")
        entities = record.get("entities", ())
        turn = Turn(*(record[f] for f in _TURN_FIELDS), tuple(entities))
    else:
        raise ValueError(f"turn {index} is a {type(record).__name__}; expected a Turn or mapping")
    for field in _TURN_FIELDS:
        value = getattr(turn, field)
        if not isinstance(value, str) or (field != "response" and not value.strip()):
            raise ValueError(f"turn {index} ({turn.id!r}): {field} {value!r} must be a string")
    return turn


def _check_build(n_distractors: int, drop_len: int, passages: Mapping[str, str]) -> None:
    if not isinstance(n_distractors, int) or n_distractors < 1:
        raise ValueError(f"n_distractors={n_distractors!r}: expected >= 1 (D1 precedes R)")
    if n_distractors > len(passages):
        raise ValueError(f"n_distractors={n_distractors} but only {len(passages)} passages")
    if not isinstance(drop_len, int) or drop_len < 0:
        raise ValueError(f"drop_len={drop_len!r}: expected a non-negative int")


def build_r2p_pairs(
    turns: Iterable[Turn | Mapping[str, Any]],
    *,
    seed: int,
    n_distractors: int = N_DISTRACTORS,
    drop_len: int = DROP_LEN,
    passages: Mapping[str, str] | None = None,
) -> R2PResult:
    """MIRe's R2P pairs from dialogue turns (Turns, or mappings with id, image_path,
    question, response and optional entities): each turn is filtered (``filter_turn``), and
    a kept response R becomes the document [D1, R, D2, ..., Dk] of ``n_distractors`` passages
    truncated to two sentences. The passages (default ``knowledge_passages()``) are sampled,
    not retrieved as in the reference: without replacement, among the entities not in the
    turn's ``entities``, from a generator seeded by (seed, turn id), so the same seed gives
    the same pairs. ValueError names a bad turn (its index and id), a repeated id or a bad
    setting; the drop counts are logged too."""
    passages = dict(knowledge_passages() if passages is None else passages)
    _check_build(n_distractors, drop_len, passages)
    pairs, seen = [], {}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    stripped = nouns = count = 0
    for index, record in enumerate(turns):
        turn = _as_turn(record, index)
        if turn.id in seen:
            raise ValueError(f"turn {index}: id {turn.id!r} already used by turn {seen[turn.id]}")
        seen[turn.id] = index
        count += 1
        result = filter_turn(turn.question, turn.response, drop_len=drop_len)
        stripped += result.stripped
        nouns += result.nouns_appended
        if result.reason is not None:
            dropped[result.reason] += 1
            continue
        pool = sorted(e for e in passages if e not in set(turn.entities))
        if len(pool) < n_distractors:
            raise ValueError(f"turn {index} ({turn.id!r}): {len(pool)} passages left to draw")
        chosen = random.Random(derive_seed(seed, "r2p distractors", turn.id)).sample(
            pool, n_distractors
        )
        document = pseudo_passage(result.response, [truncate_passage(passages[e]) for e in chosen])
        pairs.append(
            R2PPair(
                turn.id, turn.image_path, result.question, document, result.response, tuple(chosen)
            )
        )
    out = R2PResult(pairs, count, dropped, stripped, nouns)
    logger.info("R2P pairs: %s", out.counts())
    return out
