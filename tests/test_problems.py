"""The problem registry (pysparsecl.testing.problems): every kernel family has problems,
and its small problems pass on every device, each family forced in turn."""

import numpy as np
import pytest

from pysparsecl import tuning
from pysparsecl.params import ROUTINES, SPECS
from pysparsecl.testing.problems import TUNABLES, small_problems

#: The package's kernel families (tests may register toy specs of their own).
FAMILIES = sorted(f for f in TUNABLES if f not in ROUTINES)
#: masked_dw runs inside masked_dx's problems: the backward computes both.
RIDES_WITH = {"masked_dw": "masked_dx"}


def test_every_family_has_small_problems_and_a_tuner_driver():
    small = small_problems()
    assert set(small) <= set(SPECS)
    for family in FAMILIES:
        assert small.get(RIDES_WITH.get(family, family)), family
    for routine in ROUTINES:
        assert routine in TUNABLES
        # Each routine's variants are kernel families with problems of their own.
        assert set(ROUTINES[routine].families) <= set(FAMILIES)
    assert all(small[family] for family in small)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in RIDES_WITH])
def test_small_problems_pass_with_each_family_forced(queue, rng, family):
    """The family's kernels, chosen by overriding them with their spec defaults (on any
    device: a GPU-shaped family runs on a CPU too), on each of its small problems."""
    spec = SPECS[family]
    with tuning.override(family, **spec.defaults()):
        for _label, run in small_problems()[family]:
            run(np.random.default_rng(rng.integers(1 << 31)), queue)
