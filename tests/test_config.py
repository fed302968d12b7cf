from __future__ import annotations

import pytest

from oncofm.cohort.splits import SplitSettings
from oncofm.errors import OncoFMError


def test_settings_roundtrip_and_validation(tmp_path):
    s = SplitSettings(run="r", folds=3, seed=7)
    path = s.save(tmp_path / "split.yaml")
    again = SplitSettings.from_yaml(path)
    assert again == s
    assert s.same_as_saved(path)
    assert not SplitSettings(run="r", folds=3, seed=8).same_as_saved(path)
    with pytest.raises(OncoFMError, match="folds"):
        SplitSettings.build(run="r", folds=1)
    with pytest.raises(OncoFMError, match="unknwn"):
        SplitSettings.build(run="r", unknwn=1)
