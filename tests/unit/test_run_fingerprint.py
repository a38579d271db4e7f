"""Stages refuse to resume into an output written with other inputs or another model."""
import pytest

from pseudobox.config import ConfigError
from pseudobox.pipelines.common import check_same_run


def test_same_run_resumes_and_a_different_one_is_refused(tmp_path):
    out = str(tmp_path / "run")
    fingerprint = {"stage": "pretrain", "corpus": "/c", "model": {"depth": 50, "min_size": [96, 160]}}
    check_same_run(out, fingerprint)
    assert (tmp_path / "run" / "run.json").exists()
    check_same_run(out, dict(fingerprint))  # a re-submission of the same run is fine
    with pytest.raises(ConfigError, match=r"\['model'\]"):
        check_same_run(out, {**fingerprint, "model": {"depth": 18, "min_size": [96, 160]}})
