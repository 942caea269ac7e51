"""scripts/nuclei_halves.py: a nucleus on both sides of the split line belongs to neither half."""

import numpy as np

from tests.conftest import load_script

nuclei_halves = load_script("nuclei_halves")


def test_nuclei_crossing_the_middle_become_crowd_in_both_halves():
    ids = np.zeros((4, 8), np.uint16)
    ids[0, 1:3] = 7  # left only
    ids[1, 3:6] = 9  # across columns 3 | 4
    ids[2, 5:8] = 300  # right only, an id past 8 bits
    left, right, crossing = nuclei_halves.halves(ids)
    assert crossing == [9]
    assert left.shape == right.shape == (4, 4) and left.dtype == np.uint16
    assert set(np.unique(left)) == {0, 7, nuclei_halves.CROWD}
    assert set(np.unique(right)) == {0, 300, nuclei_halves.CROWD}
    assert (left[1, 3] == nuclei_halves.CROWD) and (right[1, :2] == nuclei_halves.CROWD).all()
