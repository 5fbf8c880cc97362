"""Judging generated Shapes images: an analyser of flat-colour objects (judge.py) and the quality
report over a fixed prompt list for any sampler (quality.py, `dalle-fast eval`)."""
from .judge import DetectedObject, ObjectSpec, Spec, Verdict, analyse, judge, parse_caption, relation_holds

__all__ = ["DetectedObject", "ObjectSpec", "Spec", "Verdict", "analyse", "judge", "parse_caption", "relation_holds"]
