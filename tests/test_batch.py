"""run_batch and the run record on their own: partial outputs, unfinished inputs, fingerprints, messages."""

from __future__ import annotations


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
