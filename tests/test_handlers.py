"""Weight averaging (WeightEMA) and its wiring into training, evaluation and resume; interruption-safe checkpoints;
progress bars and the log lines beside them."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from medseg.handlers import WeightEMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def _run(handler: WeightEMA, net: torch.nn.Module, iterations: int) -> Engine:
    def step(engine, batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
            net[1].running_mean.add_(1.0)

    engine = Engine(step)
    handler.attach(engine)
    engine.run([0] * iterations, max_epochs=1)
    return engine


def test_ema_follows_the_known_recurrence():
    net = _net()
    start = net[0].weight.detach().clone()
    ema = WeightEMA(net, momentum=0.1, warmup_momentum=0.1, warmup_iters=1)
    _run(ema, net, 5)
    # each step adds 1 to the weights; with a constant momentum m the average lags by
    # sum_k (1 - m)^k over the steps: after n steps, w_ema = w0 + sum_{i=1..n} m (1-m)^(n-i) i
    m, n = 0.1, 5
    expected_shift = sum(m * (1 - m) ** (n - i) * i for i in range(1, n + 1))
    assert torch.allclose(ema.ema_model[0].weight, start + expected_shift, atol=1e-5)
    assert torch.allclose(net[0].weight, start + n)
    # BatchNorm statistics are averaged too, not copied from the online network
    assert torch.allclose(ema.ema_model[1].running_mean, torch.full((2,), expected_shift), atol=1e-5)
    assert not ema.ema_model.training


def test_ema_warmup_ramps_from_the_warmup_momentum_to_the_final_one():
    net = _net()
    ema = WeightEMA(net, momentum=0.01, warmup_momentum=0.5, warmup_iters=10)
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    seen: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.ema_momentum))
    engine.run([0] * 20, max_epochs=1)
    assert seen[0] == pytest.approx(0.5)  # the first updates lean on the current weights
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False)) and 0.01 < seen[5] < 0.5
    assert seen[-1] == pytest.approx(0.01)


def test_no_momentum_means_no_averaging():
    net = _net()
    ema = WeightEMA(net, momentum=None)
    assert ema.ema_model is net
    engine = _run(ema, net, 3)
    assert not hasattr(engine.state, "ema_momentum")


def test_bad_momentum_is_refused():
    with pytest.raises(ValueError, match="ema_momentum"):
        WeightEMA(_net(), momentum=1.5)


def _saving_run(tmp_path, fail_at_epoch: int | None, monkeypatch, error: Exception | None = None, **saver_args):
    """A 3-epoch run whose network changes each epoch, saved by medseg's CheckpointSaver; torch.save fails
    (a full disk) while writing epoch ``fail_at_epoch``'s file, half of it written."""
    import errno

    from medseg.handlers import CheckpointSaver

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)

    def step_done(e):
        net.bias.data.fill_(float(e.state.epoch))
        e.state.metrics["score"] = float(e.state.epoch)  # a better model every epoch

    engine.add_event_handler(Events.EPOCH_COMPLETED, step_done)
    CheckpointSaver(str(tmp_path), {"model": net, "head": torch.nn.Linear(1, 1)}, **saver_args).attach(engine)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if engine.state.epoch == fail_at_epoch:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    engine.run([0], max_epochs=3)
    return net


def _bias(path) -> float:
    return float(torch.load(path, weights_only=True)["model"]["bias"])


def test_the_same_weights_save_to_the_same_bytes(tmp_path, monkeypatch):
    # torch names the archive inside a checkpoint after the file it is given; the temporary file's random
    # name made two saves of identical weights differ, so their SHA-256 (which infer's run record compares)
    # did too
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.manual_seed(0)  # the same initial weights
        _saving_run(tmp_path / name, None, monkeypatch, save_interval=1, n_saved=1, file_prefix="last")
    a, b = (tmp_path / n / "last_checkpoint_epoch=3.pt" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_last_checkpoints_replace_each_other_only_once_written(tmp_path, monkeypatch):
    from medseg.errors import DataError

    _saving_run(tmp_path, None, monkeypatch, save_interval=1, n_saved=1, file_prefix="last")
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint_epoch=3.pt"]
    assert _bias(tmp_path / "last_checkpoint_epoch=3.pt") == 3.0
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"last_checkpoint_epoch=2\.pt: cannot write the checkpoint \(.*No space "
                                        r"left.*free disk space .*--resume"):
        _saving_run(tmp_path, 2, monkeypatch, save_interval=1, n_saved=1, file_prefix="last")
    # epoch 1's checkpoint is kept whole; no half-written file under epoch 2's name, no temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint_epoch=1.pt"]
    assert _bias(tmp_path / "last_checkpoint_epoch=1.pt") == 1.0


def test_a_checkpoint_write_torch_cut_short_is_said_in_our_words(tmp_path, monkeypatch):
    # torch's archive writer reports a full disk in its own terms; and with no checkpoint yet, --resume has
    # nothing to continue from
    from medseg.errors import DataError

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4832896 vs 4832788")
    with pytest.raises(DataError, match=r"last_checkpoint_epoch=1\.pt: cannot write the checkpoint \(the write was "
                                        r"cut short: a full disk, or a quota or file-size limit .*then train again$"):
        _saving_run(tmp_path, 1, monkeypatch, error=torn, save_interval=1, n_saved=1, file_prefix="last")


def test_a_failed_best_model_save_keeps_the_previous_model(tmp_path, monkeypatch):
    from medseg.errors import DataError

    with pytest.raises(DataError, match=r"model\.pt: cannot write the checkpoint"):
        _saving_run(tmp_path, 3, monkeypatch, save_key_metric=True, key_metric_name="score",
                    key_metric_filename="model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and _bias(tmp_path / "model.pt") == 2.0


class _SigtermInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal

        return torch.tensor([float(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN), torch.randint(0, 10**6, ())])


def test_training_data_workers_leave_sigterm_to_the_main_process():
    # a process-group SIGTERM (timeout, Slurm) killed PyTorch's workers, failing the run instead of stopping it
    from monai.data import DataLoader

    from medseg.workflows import data_worker_init

    torch.manual_seed(0)
    batches = list(DataLoader(_SigtermInWorker(), batch_size=1, num_workers=2, worker_init_fn=data_worker_init))
    assert [float(b[0, 0]) for b in batches] == [1.0, 1.0]
    assert batches[0][0, 1] != batches[1][0, 1]  # MONAI's per-worker seeding still done


def test_training_curves_record_the_mean_loss_of_each_epoch(tmp_path):
    import json

    from medseg.handlers import TrainingCurves

    losses = iter([1.0, 2.0, 3.0, 5.0])
    engine = Engine(lambda e, b: {"loss": next(losses)})
    TrainingCurves(str(tmp_path)).attach(engine)
    engine.run([0, 0], max_epochs=2)
    assert json.loads((tmp_path / "history.json").read_text())["train_loss"] == [1.5, 4.0]


class _OnGpu(torch.Tensor):
    """Stands for a CUDA tensor: ``.cpu()`` gives a plain tensor, and pickled as it is, a machine without
    the class (a CPU-only one, for a CUDA tensor) cannot load it with ``weights_only``."""

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_checkpoints_hold_cpu_tensors_with_their_state_dict_metadata(tmp_path):
    from medseg.handlers import _AtomicSaver

    net = _net()
    state = net.state_dict()
    on_gpu = type(state)((k, v.as_subclass(_OnGpu)) for k, v in state.items())
    on_gpu._metadata = state._metadata
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(1, 1, 5, 5)).sum().backward()
    optimizer.step()
    opt_state = optimizer.state_dict()
    opt_state["state"] = {k: {n: t.as_subclass(_OnGpu) if torch.is_tensor(t) else t for n, t in v.items()}
                          for k, v in opt_state["state"].items()}
    _AtomicSaver(tmp_path, "model.pt")({"model": on_gpu, "optimizer": opt_state, "epoch": 3}, "ignored")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["model"]._metadata == state._metadata
    assert all(type(t) is torch.Tensor and torch.equal(t, state[k]) for k, t in saved["model"].items())
    assert all(type(t) is torch.Tensor for v in saved["optimizer"]["state"].values() for t in v.values()
               if torch.is_tensor(t))
    _net().load_state_dict(saved["model"])


def test_log_lines_go_above_the_bars_on_a_terminal(monkeypatch):
    # a logging handler keeps the stream it was made with, so its lines were drawn over by the live bars
    import io
    import logging
    import sys

    from rich.console import Console
    from rich.progress import Progress

    from medseg.handlers import start_bars, stop_bars

    screen = io.StringIO()
    progress = Progress(console=Console(file=screen, force_terminal=True, force_interactive=True, width=80))
    logger = logging.getLogger("medseg.tests.bars")
    handler, errors = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(logger, "handlers", [handler, errors])
    monkeypatch.setattr(logger, "propagate", False)
    own, errors_own = handler.stream, errors.stream
    moved = start_bars(progress)
    try:
        assert handler.stream is sys.stdout and sys.stdout is not own  # rich's stream, printed above the bars
        assert errors.stream is errors_own  # standard error stays there: rich would print it to standard output
        logger.warning("Epoch[1] Metrics -- train_loss_epoch: 1.0")
    finally:
        stop_bars(progress, moved)
    assert handler.stream is own and sys.stdout is own
    assert "Epoch[1] Metrics -- train_loss_epoch: 1.0\n" in screen.getvalue()


def test_a_long_file_name_is_cut_at_its_start_in_the_bar():
    from medseg.handlers import FileProgress

    name = "08151b19806eebd58e5acec7e138dbfbb1761f41a1ab9620466584ecc7d5fada/images/08151b19806e.png"
    with FileProgress(1) as bar:
        bar.start(name)
        shown = bar._progress.tasks[0].fields["name"]
    assert len(shown) == 40 and shown.startswith("…") and name.endswith(shown[1:])


def test_validations_since_the_best_count_those_the_resumed_checkpoint_has_seen(tmp_path):
    # a time limit inside epoch 4 validated on the way out (recorded as epoch 4); the run resumes from epoch 3's
    # checkpoint and trains epoch 4 anew: counting that validation used up patience the run had not used
    import json
    from types import SimpleNamespace

    from medseg.handlers import RestoreBest

    history = {"val_epoch": [1, 2, 3, 4], "val": [{"val_v_rand": v} for v in (0.5, 0.9, 0.8, 0.7)]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    evaluator = SimpleNamespace(state=SimpleNamespace(key_metric_name="val_v_rand"))
    restore = RestoreBest(tmp_path, evaluator)
    assert restore.recorded_best() == (2, 0.9, 2)
    assert restore.recorded_best(up_to=3) == (2, 0.9, 1)
    history["val"][3]["val_v_rand"] = 0.95  # the way-out validation is the best: model.pt holds it
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert restore.recorded_best(up_to=3) == (4, 0.95, 0)
    assert restore.recorded_best(up_to=3, scheduled=True) == (2, 0.9, 1)


@pytest.mark.parametrize("way_out", [0.95, 0.7], ids=["better", "worse"])
def test_a_way_out_validation_counts_for_the_model_but_not_for_early_stopping(tmp_path, way_out):
    # a time limit inside epoch 4 validated part-trained weights on the way out; the resumed run trains epoch 4
    # anew. Its validation tying or missing the way-out score must not use up patience the uninterrupted run
    # kept: early stopping starts from epochs 1-3, while model.pt (which may hold the way-out weights) is only
    # replaced by a better model
    import json
    from types import SimpleNamespace

    from ignite.engine import Engine
    from ignite.handlers import EarlyStopping

    from medseg.handlers import RestoreBest

    history = {"val_epoch": [1, 2, 3, 4], "val": [{"val_dice": v} for v in (0.5, 0.9, 0.8, way_out)]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    (tmp_path / "model.pt").write_bytes(b"")
    evaluator = SimpleNamespace(state=SimpleNamespace(key_metric_name="val_dice"))
    trainer = Engine(lambda engine, batch: None)
    trainer.state.epoch = 3
    inner = EarlyStopping(patience=2, score_function=lambda e: e.state.metrics["val_dice"], trainer=trainer)
    RestoreBest(tmp_path, evaluator, stoppers=[SimpleNamespace(_handler=inner)])(trainer)
    assert evaluator.state.best_metric == max(0.9, way_out)
    assert inner.best_score == 0.9 and inner.counter == 1 and not trainer.should_terminate


def test_a_store_failure_is_told_from_a_refused_request_or_a_bug():
    import sqlite3

    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from medseg.handlers import store_failure

    unreachable = MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                                  "HTTPConnectionPool(host='h', port=5000): Max retries exceeded")
    full = sqlalchemy.exc.OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))
    assert store_failure(unreachable) and store_failure(full) and store_failure(ConnectionRefusedError(111, "x"))
    refused = MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    assert not store_failure(refused, opening=True)  # the caller's mistake, while the run is opened
    assert store_failure(refused)  # later: the run deleted in the UI, a server restarted on a new database
    assert not store_failure(ValueError("Cannot set a deleted experiment"))
    assert not store_failure(TypeError("a bug in an output transform"))
