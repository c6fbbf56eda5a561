"""Match a pretrained detector's class names (COCO) to a project's labels by meaning.

Why a table: projects name the same thing differently (VOC ``aeroplane``, KITTI ``Pedestrian``,
COCO ``airplane``); even the shared YOLOX class file uses VOC spellings (``motorbike``,
``tvmonitor``). Names are compared case-, space-, ``_`` and ``-``-insensitively, then through
:data:`CONCEPTS`: each concept lists the names that mean it, in order of preference.

Decisions (documented because they are judgement calls):

* ``Van`` takes COCO ``truck`` only when the project has no ``Truck`` label: COCO files most vans
  under ``car`` or ``truck``, and a project's ``Truck`` is the closer match for ``truck``.
* ``Person_sitting`` (KITTI) takes ``person`` only when there is no ``person``/``Pedestrian``.
* ``Cyclist`` (KITTI) is not mapped: a COCO ``person`` box is a cyclist only when it overlaps a
  ``bicycle``, and labelling every person a cyclist would be wrong far more often than right.
* ``Tram`` (KITTI) takes COCO ``train``: COCO's ``train`` class includes trams and streetcars.
* KITTI ``Misc`` and ``DontCare`` map to nothing.

Every source class maps to at most one project label, so no box is duplicated; a class with no
match is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["CONCEPTS", "canonical_name", "map_class_names", "same_name_index"]

#: concept → accepted spellings (canonical form), best first. Names not listed are their own concept.
CONCEPTS: dict[str, tuple[str, ...]] = {
    "person": ("person", "pedestrian", "people", "human", "personsitting"),
    "airplane": ("airplane", "aeroplane", "plane", "aircraft"),
    "motorcycle": ("motorcycle", "motorbike"),
    "tv": ("tv", "tvmonitor", "television", "monitor"),
    "couch": ("couch", "sofa"),
    "diningtable": ("diningtable", "table"),
    "pottedplant": ("pottedplant", "houseplant"),
    "truck": ("truck", "van"),
    "train": ("train", "tram"),
    "bicycle": ("bicycle", "bike"),
    "cellphone": ("cellphone", "mobilephone", "phone"),
    "hairdrier": ("hairdrier", "hairdryer"),
    "donut": ("donut", "doughnut"),
}
_SPELLING_TO_CONCEPT = {s: c for c, spellings in CONCEPTS.items() for s in spellings}


def canonical_name(name: str) -> str:
    """Lower case, with spaces, ``_`` and ``-`` removed (``Dining table`` → ``diningtable``)."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _concept_and_rank(name: str) -> tuple[str, int]:
    key = canonical_name(name)
    concept = _SPELLING_TO_CONCEPT.get(key, key)
    spellings = CONCEPTS.get(concept, (key,))
    return concept, spellings.index(key) if key in spellings else 0


def map_class_names(source: Sequence[str], targets: Sequence[str]) -> dict[int, int]:
    """``{source index: target index}`` for every source class that has a matching target.

    When several targets share a concept (``Truck`` and ``Van``), the best-ranked spelling wins,
    then the earlier target.
    """
    best: dict[str, tuple[int, int]] = {}
    for index, name in enumerate(targets):
        concept, rank = _concept_and_rank(name)
        if concept not in best or rank < best[concept][0]:
            best[concept] = (rank, index)
    mapping: dict[int, int] = {}
    for index, name in enumerate(source):
        concept, _ = _concept_and_rank(name)
        if concept in best:
            mapping[index] = best[concept][1]
    return mapping


def same_name_index(source: Sequence[str], targets: Sequence[str]) -> dict[int, int]:
    """``{source index: target index}`` for the labels spelled exactly alike in both.

    How a trained version's labels meet the project's after an admin edits the label config
    (adds, removes, reorders or renames a label): a version's labels *are* the project's label
    values, which Label Studio compares as exact strings, so no synonyms here. A renamed label is
    a new one; its old boxes drop.
    """
    where = {name: index for index, name in enumerate(targets)}
    return {i: where[name] for i, name in enumerate(source) if name in where}
