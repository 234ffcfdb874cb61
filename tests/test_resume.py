"""al.resume: one rule for reusing earlier work — same identity resumes, another is refused by
name unless overwrite, and a record that predates a field resumes at its default."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from al.config import ConfigError
from al.resume import ResumeConflictError, check_resume, differing_keys, identity


@dataclass
class Inner:
    lr: float = 0.1
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    output_dir: str = "out"
    seed: int = 0
    inner: Inner = field(default_factory=Inner)


def test_identity_is_plain_json_without_the_ignored_keys():
    assert identity(Outer(), ignore=("output_dir", "inner.lr", "absent.key")) == {"seed": 0, "inner": {"sizes": [1, 2]}}


def test_differing_keys_are_dotted_and_cover_both_sides():
    recorded = {"seed": 0, "inner": {"lr": 0.1, "gone": 1}, "list": [1]}
    current = {"seed": 0, "inner": {"lr": 0.2, "new": 2}, "list": [1, 2]}
    assert differing_keys(recorded, current) == ["inner.gone", "inner.lr", "inner.new", "list"]


def test_the_same_identity_resumes_and_none_recorded_starts():
    current = identity(Outer())
    assert check_resume(identity(Outer()), current, Path("x")) is True
    assert check_resume(None, current, Path("x")) is False


def test_another_identity_is_refused_by_name_unless_overwrite():
    recorded, current = identity(Outer()), identity(Outer(seed=3, inner=Inner(lr=0.5)))
    with pytest.raises(ResumeConflictError, match=r"x holds work made with other settings \(inner.lr: 0.1 there, "
                                                  r"0.5 now; seed: 0 there, 3 now\); use another output_dir"):
        check_resume(recorded, current, Path("x"))
    assert issubclass(ResumeConflictError, ConfigError)  # the scripts' one-line exit 2
    assert check_resume(recorded, current, Path("x"), overwrite=True) is False
    assert check_resume(recorded, recorded, Path("x"), overwrite=True) is True  # overwrite replaces only other work


def test_a_record_that_predates_a_field_resumes_at_its_default():
    older = identity(Outer())
    del older["inner"]["sizes"]
    defaults = identity(Outer())
    assert check_resume(older, identity(Outer()), Path("x"), defaults=defaults) is True
    with pytest.raises(ResumeConflictError, match=r"inner.sizes: \[1, 2\] there, \[3\] now"):
        check_resume(older, identity(Outer(inner=Inner(sizes=(3,)))), Path("x"), defaults=defaults)
