import json
import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fitted_recompute_model(tmp_path):
    """A fitted latency model file whose stages differ (embedding, LM head), with every recomputation
    mode measured (``test_planner_recompute.recompute_profile``)."""
    from seqpipe_ds.cli.plan import main
    from test_planner_recompute import recompute_profile
    profile, model = tmp_path / "profile.json", tmp_path / "model.json"
    profile.write_text(json.dumps(recompute_profile()))
    assert main(["fit", str(profile), "--out", str(model)]) == 0
    return model
