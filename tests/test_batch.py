"""run_batch and the run record on their own: partial outputs, unfinished inputs, fingerprints, messages."""

from __future__ import annotations

from pathlib import Path


def _one_input(tmp_path):
    from medseg.discovery import InputItem

    (tmp_path / "a.png").write_bytes(b"x")
    out = tmp_path / "out"
    paths = {"mask": out / "mask" / "a.png", "prob": out / "prob" / "a.tif"}
    return InputItem(str(tmp_path / "a.png"), "png", "a"), out, paths


def test_partial_outputs_of_a_failed_input_are_removed(tmp_path):
    from medseg.batch import RunRecord, run_batch

    item, out, paths = _one_input(tmp_path)

    def segment(slices):
        paths["mask"].parent.mkdir(parents=True, exist_ok=True)
        paths["mask"].write_bytes(b"m")  # the mask is written, then the probability map fails
        raise ValueError("boom")

    res = run_batch([item], [], segment, paths_for=lambda i, n: paths, count=lambda i: 1,
                    manifest=out / "manifest.csv", record=RunRecord(out, {"c": 1}))
    assert res.count("failed") == 1 and not paths["mask"].exists()


def test_an_input_with_only_some_outputs_is_segmented_again(tmp_path):
    from medseg.batch import run_batch

    item, out, paths = _one_input(tmp_path)
    paths["mask"].parent.mkdir(parents=True)
    paths["mask"].write_bytes(b"m")  # prob missing
    calls = []
    res = run_batch([item], [], lambda s: calls.append(1), paths_for=lambda i, n: paths, count=lambda i: 1,
                    manifest=out / "manifest.csv")
    assert calls == [1] and res.count("ok") == 1


def test_fingerprint_of_a_file_edited_in_place_at_the_same_size_changes(tmp_path):
    import os

    from medseg.batch import input_fingerprint

    f = tmp_path / "a.raw"
    f.write_bytes(b"\x00" * 64)
    first = input_fingerprint(f)
    f.write_bytes(b"\x01" * 64)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert input_fingerprint(f) != first


def test_a_multi_line_data_error_is_one_manifest_line(tmp_path):
    from medseg.batch import run_batch
    from medseg.errors import DataError

    item, out, paths = _one_input(tmp_path)

    def segment(slices):
        raise DataError(f"{item.source}: bad header\nsecond line of detail")

    res = run_batch([item], [], segment, paths_for=lambda i, n: paths, count=lambda i: 1,
                    manifest=out / "manifest.csv")
    assert res.rows[0].message == f"{item.source}: bad header"


def _many_inputs(tmp_path, n):
    from medseg.discovery import InputItem

    (tmp_path / "in").mkdir()
    items = []
    for k in range(n):
        (tmp_path / "in" / f"{k}.png").write_bytes(b"x")
        items.append(InputItem(str(tmp_path / "in" / f"{k}.png"), "png", str(k)))
    out = tmp_path / "out"

    def paths_for(item, slices):
        return {"mask": out / "mask" / f"{item.rel}.png", "prob": out / "prob" / f"{item.rel}.tif"}

    return items, out, paths_for


def test_bookkeeping_writes_the_record_and_manifest_whole_a_fixed_number_of_times(tmp_path, monkeypatch):
    # a batch of N inputs rewrote run.json twice and manifest.csv once per input: O(N^2) bytes, minutes of
    # bookkeeping at 10 000 inputs; now each input appends a line to each, and both are written whole at the
    # start and the end
    import csv

    import medseg.batch as batch
    from medseg.batch import RunRecord, run_batch

    items, out, paths_for = _many_inputs(tmp_path, 30)
    whole: list[str] = []
    real = batch.atomic_output

    def counting(path, *args, **kwargs):
        whole.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(batch, "atomic_output", counting)
    seen = []

    def segment(slices):  # inputs come in order; write this one's outputs
        seen.append(slices)
        for p in paths_for(items[len(seen) - 1], 1).values():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"o")

    res = run_batch(items, [], segment, paths_for=paths_for, count=lambda i: 1, manifest=out / "manifest.csv",
                    record=RunRecord(out, {"c": 1}))
    assert res.count("ok") == 30
    assert whole.count("run.json") == 2 and whole.count("manifest.csv") == 2, whole
    assert not (out / batch.JOURNAL).exists()  # folded into run.json at the end
    record = RunRecord(out, {"c": 1})
    assert all(record.made_here(paths_for(item, 1)) for item in items)
    with open(out / "manifest.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 30
    # a second run skips them all, as before
    res = run_batch(items, [], segment, paths_for=paths_for, count=lambda i: 1, manifest=out / "manifest.csv",
                    record=RunRecord(out, {"c": 1}))
    assert res.count("skipped") == 30 and len(seen) == 30


def test_a_killed_batchs_journal_is_replayed_up_to_its_last_whole_line(tmp_path):
    import json

    from medseg.batch import JOURNAL, RunRecord

    out = tmp_path / "out"
    (out / "mask").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (out / "mask" / name).write_bytes(b"o")
    record = RunRecord(out, {"c": 1})
    record.save()
    record.record({"mask": out / "mask" / "a.png"}, made=True, fingerprint="fa")
    record.begin({"mask": out / "mask" / "b.png"})  # killed while writing b
    lines = (out / JOURNAL).read_text().splitlines()
    snapshot = json.loads((out / "run.json").read_text())
    assert json.loads(lines[0]) == {"generation": snapshot["generation"]}  # which run.json it continues
    assert len(lines) == 3 and snapshot["outputs"] == {}
    with open(out / JOURNAL, "a") as f:
        f.write('{"outputs": {"mask/c.png": "')  # the kill cut this line short
    again = RunRecord(out, {"c": 1})
    assert again.made_here({"mask": out / "mask" / "a.png"})
    assert again.unfinished(out / "mask" / "b.png")  # redone by the next run, not taken as another's
    assert not again.knows(out / "mask" / "c.png")
    again.save()
    assert not (out / JOURNAL).exists()
    assert json.loads((out / "run.json").read_text())["pending"] == {"mask/b.png": again.key}


def test_a_manifest_row_cut_short_by_a_kill_is_dropped_and_the_rows_before_kept(tmp_path):
    from medseg.batch import ManifestRow, _earlier_rows, append_manifest, write_manifest

    out = tmp_path / "out"
    out.mkdir()
    masks = []
    for k in range(2):
        masks.append(out / f"{k}.png")
        masks[-1].write_bytes(b"o")
    manifest = out / "manifest.csv"
    write_manifest(manifest, [])
    for k, mask in enumerate(masks):
        append_manifest(manifest, ManifestRow(input=str(tmp_path / f"{k}.png"), status="ok", mask=str(mask),
                                              message="a, \"quoted\" note"))
    whole = manifest.read_text()
    for cut in ('/tmp/x.png,png,,1,o', '/tmp/x.png,png,,1,ok,,,,,0.1,"an open quote'):
        manifest.write_text(whole + cut)
        rows = _earlier_rows(manifest, [])
        assert [r.input for r in rows] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")], cut
        assert rows[0].message == 'a, "quoted" note'


def test_a_journal_that_does_not_continue_the_record_is_ignored(tmp_path):
    # a killed run's journal, then run.json replaced (restored from a backup, copied in without the hidden
    # journal, moved aside): replaying it would credit this run with outputs another model made
    import json
    import shutil

    from medseg.batch import JOURNAL, RunRecord

    out = tmp_path / "out"
    (out / "mask").mkdir(parents=True)
    (out / "mask" / "a.png").write_bytes(b"o")
    record = RunRecord(out, {"c": 1})
    record.record({"mask": out / "mask" / "a.png"}, made=True)  # killed before the end: only in the journal
    assert RunRecord(out, {"c": 1}).made_here({"mask": out / "mask" / "a.png"})  # continues: replayed
    other = RunRecord(tmp_path / "other", {"c": 2})
    other.save()  # another folder's record put in its place
    shutil.copy(tmp_path / "other" / "run.json", out / "run.json")
    assert not RunRecord(out, {"c": 1}).knows(out / "mask" / "a.png")
    (out / "run.json").unlink()  # the record moved aside, the journal left
    assert not RunRecord(out, {"c": 1}).knows(out / "mask" / "a.png")
    # a record written again folds in (or drops) the old journal: what is appended next is replayed
    again = RunRecord(out, {"c": 1})
    again.record({"mask": out / "mask" / "a.png"}, made=True)
    first = json.loads((out / JOURNAL).read_text().splitlines()[0])
    assert first == {"generation": json.loads((out / "run.json").read_text())["generation"]}
    assert RunRecord(out, {"c": 1}).made_here({"mask": out / "mask" / "a.png"})


def test_outputs_of_two_models_are_never_taken_for_one_run_of_either(tmp_path):
    """Run A writes mask and prob; run B (another model, ``--no-prob --overwrite``) replaces the mask only; run
    A again must not skip the input as its own: its mask is B's."""
    import pytest

    from medseg.batch import RunRecord, run_batch
    from medseg.errors import DataError

    item, out, paths = _one_input(tmp_path)

    def write(keys):
        def segment(slices):
            for k in keys:
                paths[k].parent.mkdir(parents=True, exist_ok=True)
                paths[k].write_bytes(b"m")
        return segment

    common = {"count": lambda i: 1, "manifest": out / "manifest.csv"}
    run_batch([item], [], write(["mask", "prob"]), paths_for=lambda i, n: paths, record=RunRecord(out, {"c": "A"}),
              **common)
    only_mask = {"mask": paths["mask"]}
    run_batch([item], [], write(["mask"]), paths_for=lambda i, n: only_mask, overwrite=True,
              record=RunRecord(out, {"c": "B"}), **common)
    record = RunRecord(out, {"c": "A"})
    assert not record.made_here(paths) and RunRecord(out, {"c": "B"}).made_here(only_mask)
    with pytest.raises(DataError, match="another"):
        run_batch([item], [], write(["mask", "prob"]), paths_for=lambda i, n: paths, record=record, **common)


def test_journal_replay_stops_at_a_damaged_line(tmp_path):
    # lines after a damaged one are not trusted: the journal is append-only, so a damaged line is where a
    # kill cut it, and whatever follows was not written by this run's record
    import json

    from medseg.batch import JOURNAL, RunRecord

    out = tmp_path / "out"
    (out / "mask").mkdir(parents=True)
    (out / "mask" / "x.png").write_bytes(b"m")
    record = RunRecord(out, {"c": 1})
    record.save()
    generation = json.loads((out / "run.json").read_text())["generation"]
    lines = [json.dumps({"generation": generation}), '{"outputs": {"mask/a.png": "k',
             json.dumps({"outputs": {"mask/x.png": record.key}})]
    (out / JOURNAL).write_text("\n".join(lines) + "\n")
    assert not RunRecord(out, {"c": 1}).knows(out / "mask" / "x.png")


def test_output_names_taken_compare_ignoring_case(tmp_path):
    # outputs may land on a case-insensitive disk (macOS, Windows): scan.tif must not write over Scan.png's
    from medseg.batch import RunRecord
    from medseg.discovery import InputItem

    out = tmp_path / "out"
    (out / "mask").mkdir(parents=True)
    (out / "mask" / "Scan.png").write_bytes(b"m")
    first = InputItem(str(tmp_path / "Scan.png"), "png", "Scan", key="Scan.png")
    record = RunRecord(out, {"c": 1})
    record.record({"mask": out / "mask" / "Scan.png"}, made=True, item=first)
    later = InputItem(str(tmp_path / "scan.tif"), "tiff", "scan", key="scan.tif")
    assert [i.rel for i in RunRecord(out, {"c": 1}).keep_names([first, later])] == ["Scan", "scan_tif"]
    assert [i.rel for i in RunRecord(out, {"c": 1}).keep_names([later])] == ["scan_tif"]
    # and ignoring Unicode normalisation: macOS's disks take café composed and decomposed for one name
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    cafe = InputItem(str(tmp_path / f"{composed}.png"), "png", composed, key=f"{composed}.png")
    record.record({"mask": out / "mask" / "Scan.png"}, made=True, item=cafe)
    other = InputItem(str(tmp_path / f"{decomposed}.tif"), "tiff", decomposed, key=f"{decomposed}.tif")
    assert [i.rel for i in RunRecord(out, {"c": 1}).keep_names([other])] == [f"{decomposed}_tif"]


def test_output_names_found_together_compare_ignoring_unicode_normalisation(tmp_path):
    import numpy as np
    from PIL import Image

    from medseg.discovery import discover

    for name in ("caf\u00e9.png", "cafe\u0301.tif", "Cafe\u0301.bmp"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    items, _ = discover(tmp_path)
    assert {i.rel for i in items} == {"Cafe\u0301_bmp", "caf\u00e9_png", "cafe\u0301_tif"}


def test_a_stopped_run_keeps_the_rows_of_the_inputs_it_did_not_reach(tmp_path):
    # the manifest was written at the start without the earlier rows of every input the run takes, and a run
    # stopped by Ctrl-C or a full disk never wrote them back: finished inputs with their outputs went unlisted
    import csv

    import pytest

    from medseg.batch import run_batch
    from medseg.discovery import InputItem

    out = tmp_path / "out"
    items, paths = [], {}
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
        items.append(InputItem(str(tmp_path / f"{name}.png"), "png", name))
        paths[name] = {"mask": out / "mask" / f"{name}.png"}

    def write(slices):
        name = slices[0]["name"]
        paths[name]["mask"].parent.mkdir(parents=True, exist_ok=True)
        paths[name]["mask"].write_bytes(b"m")

    common = {"paths_for": lambda i, n: paths[i.rel], "count": lambda i: 1, "manifest": out / "manifest.csv"}
    assert run_batch(items, [], write, **common).count("ok") == 3

    def stopped(slices):
        if slices[0]["name"] == "b":
            raise KeyboardInterrupt
        write(slices)

    with pytest.raises(KeyboardInterrupt):
        run_batch(items, [], stopped, overwrite=True, **common)
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert sorted(Path(r["input"]).name for r in rows) == ["a.png", "b.png", "c.png"]
    assert all(r["status"] == "ok" for r in rows)


def test_the_record_keeps_an_input_a_run_was_killed_in_until_it_is_done_or_fails(tmp_path):
    from medseg.batch import RunRecord, run_batch

    item, out, paths = _one_input(tmp_path)
    out.mkdir()

    def killed_run():  # a run that began the input and was then killed: nothing after begin() happened
        RunRecord(out, {"c": 1}).begin(paths, item)

    killed_run()
    assert RunRecord(out, {"c": 1}).killed_making(item)
    # a run stopped by Ctrl-C while segmenting it was not killed by it: what was said of it stays as it was
    record = RunRecord(out, {"c": 1})
    record.begin(paths, item)
    record.stopped(item, failed=False)
    record.save()
    assert RunRecord(out, {"c": 1}).killed_making(item)
    (tmp_path / "other").mkdir()
    record = RunRecord(tmp_path / "other", {"c": 1})
    record.begin(paths, item)
    record.stopped(item, failed=False)
    record.save()
    assert not RunRecord(tmp_path / "other", {"c": 1}).killed_making(item)
    # failing as inputs fail (an error, not a kill) ends it, and so does a run that finishes it
    record = RunRecord(out, {"c": 1})
    record.stopped(item, failed=True)
    record.save()
    assert not RunRecord(out, {"c": 1}).killed_making(item)
    killed_run()

    def segment(slices):
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"o")

    res = run_batch([item], [], segment, paths_for=lambda i, n: paths, count=lambda i: 1,
                    manifest=out / "manifest.csv", record=RunRecord(out, {"c": 1}))
    assert res.count("ok") == 1 and "killed while segmenting" in res.rows[0].message
    assert not RunRecord(out, {"c": 1}).killed_making(item)
    # an input that is no longer there is forgotten
    killed_run()
    (tmp_path / "a.png").unlink()
    RunRecord(out, {"c": 1}).save()
    assert not RunRecord(out, {"c": 1}).killed_making(item)
