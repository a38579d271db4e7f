"""The driver-side filter of Ray's forwarded worker output (pseudobox/console.py)."""
from pseudobox import console


def test_ray_chatter_is_dropped_and_everything_else_kept():
    lines = [
        "Starting execution of Dataset train_0. Full logs are in /tmp/ray/session/logs/ray-data",
        "Execution plan of Dataset train_0: InputDataBuffer[Input] -> TaskPoolMapOperator[ReadShard]",
        "Requesting resources: {'CPU': 1} * 2",
        "- (ip=192.0.2.2, pid=16688) world_rank=0, local_rank=0, node_rank=0",
        "/x/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436: "
        "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
        "  self.exclude_resources = exclude_resources",
        "[2026-11-29 08:22:19,174 E 16525 16556] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'b5' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/w/ft/checkpoint_2026-11-29_11-08-06.97)",
        "pretrain  step 10/100  loss 1.2000  lr 0.01  5.0 img/s  ETA 1m00s",
        "Traceback (most recent call last):",
        "  File \"/x/pseudobox/engine.py\", line 10, in train_loop",
        "FloatingPointError: loss is nan at step 3",
        "/x/pseudobox/foo.py:3: UserWarning: something of ours",
        "  warnings.warn(...)",
    ]
    kept = console.drop_ray_chatter(lines)
    assert kept == lines[8:]  # progress, the traceback and our own warning with its source line


def test_the_printer_is_wrapped_once_and_filters_batches(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data["lines"]))])
    assert console.quiet_worker_logs() is True
    assert console.quiet_worker_logs() is False  # already wrapped: not wrapped twice
    dispatcher.emit({"lines": ["Progress bars disabled. To enable, set ..."], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": ["Moving model to device: cpu", "finetune  step 1/2  loss 1.0000"], "pid": 1,
                     "is_err": False})
    assert printed == [["finetune  step 1/2  loss 1.0000"]]
