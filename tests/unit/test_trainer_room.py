"""Training with streaming data refuses to start when the workers leave Ray no CPU for the data."""
import pytest
import ray

from pseudobox.config import ConfigError
from pseudobox.pipelines import common, trainer


class Streaming:
    """Stands for a Ray Dataset that is not materialized (it streams during training)."""


@pytest.mark.parametrize("local,cpus,workers,cpus_per_worker,refused", [
    (True, 2.0, 2, 1.0, True),    # the 2-core default: both CPUs to training, none for data
    (True, 4.0, 2, 1.0, False),
    (True, 2.0, 1, 2.0, True),
    (False, 2.0, 2, 1.0, False),  # a cluster may autoscale: a warning, not an error
])
def test_workers_must_leave_a_cpu_for_streaming_data(monkeypatch, pseudobox_log, local, cpus, workers,
                                                     cpus_per_worker, refused):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    monkeypatch.setattr(common, "_STARTED_LOCAL_RAY", local)
    cfg = trainer.WorkersConfig(num_workers=workers, cpus_per_worker=cpus_per_worker)
    if refused:
        with pytest.raises(ConfigError, match="workers.cpus_per_worker.*ray.num_cpus"):
            trainer.check_room_for_data(cfg, {"train": Streaming()})
    else:
        trainer.check_room_for_data(cfg, {"train": Streaming()})
        assert ("leaves none" in pseudobox_log.text) == (not local and cpus - workers * cpus_per_worker < 1)
