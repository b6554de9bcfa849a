"""`medseg.Segmenter`: arrays in memory segmented as `medseg infer` segments the same pixels in files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import JURKAT_TINY_NET, NUCLEI_TINY_NET, TINY_NET, synthetic_cells, synthetic_em, synthetic_nuclei
from PIL import Image
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from medseg import Segmentation, Segmenter
from medseg.bundle import load_config, parse_override
from medseg.cli import app
from medseg.errors import BundleError, CheckpointError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"isbi_em": TINY_NET, "jurkat": JURKAT_TINY_NET, "nuclei": NUCLEI_TINY_NET}



def _as_csv(objects: list[dict]) -> list[dict]:
    """Rows of ``Segmentation.objects`` as a CSV reader gives them back (None: an empty cell)."""
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in objects]

def _example(bundle: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image the bundle takes (as a reader gives it, channels last) and its class-index target."""
    rng = np.random.default_rng(seed)
    if bundle == "isbi_em":
        image, label = synthetic_em(size=64, seed=seed)
        return image, (label > 0).astype(np.int64)
    if bundle == "jurkat":
        image, mask = synthetic_cells(rng, size=(72, 64))
        return image, np.searchsorted([0, 128, 255], mask)
    image, labels = synthetic_nuclei(rng, size=(64, 64), n_single=4, n_pairs=2)
    edge = find_boundaries(labels, mode="inner")
    return image, np.where(edge, 2, (labels > 0).astype(np.int64))


def _fit(bundle: str, path: Path) -> Path:
    """Tiny weights fitted for a few dozen steps to one example, so that masks are not constant."""
    torch.manual_seed(0)
    overrides = dict(parse_override(item) for item in TINY[bundle])
    parser = load_config(ROOT / "bundles" / bundle, "infer", overrides=overrides)
    network = parser.get_parsed_content("network_def")
    image, target = _example(bundle)
    Image.fromarray(image).save(path.with_suffix(".png"))  # read and normalised as the bundle does
    x = torch.as_tensor(parser.get_parsed_content("preprocessing")({"image": str(path.with_suffix(".png"))})["image"])
    optimiser = torch.optim.Adam(network.parameters(), lr=0.02)
    network.train()
    for _ in range(60):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(x[None]), torch.as_tensor(target)[None])
        loss.backward()
        optimiser.step()
    torch.save({"model": network.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("api_weights")
    return {bundle: _fit(bundle, folder / f"{bundle}.pt") for bundle in TINY}


def _segmenter(bundle: str, weights: dict[str, Path], **kwargs) -> Segmenter:
    overrides = {**dict(parse_override(item) for item in TINY[bundle]), **kwargs.pop("overrides", {})}
    kwargs.setdefault("device", "cpu")
    return Segmenter(ROOT / "bundles" / bundle, weights[bundle], overrides=overrides, **kwargs)


def _infer(bundle: str, inputs: Path, out: Path, ckpt: Path, *extra: str):
    args = ["infer", ROOT / "bundles" / bundle, inputs, out, "--checkpoint", ckpt, "--no-progress", "--device", "cpu",
            *extra, *[a for item in TINY[bundle] for a in ("--set", item)]]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("bundle", ["isbi_em", "jurkat", "nuclei"])
def test_an_array_segments_as_medseg_infer_segments_its_file(bundle, weights, tmp_path):
    image, target = _example(bundle, seed=1)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    _infer(bundle, tmp_path / "in", tmp_path / "out", weights[bundle])
    written = np.asarray(Image.open(tmp_path / "out" / "mask" / "a.png"))
    prob = tifffile.imread(tmp_path / "out" / "prob" / "a.tif")

    result = _segmenter(bundle, weights).segment(image)

    assert isinstance(result, Segmentation) and result.mask.shape == result.prob.shape == image.shape[:2]
    assert result.prob.dtype == np.float32 and np.array_equal(result.prob, prob)
    if bundle == "isbi_em":  # 0/1 here, 0/255 in a PNG
        assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) == {0, 1}
        assert np.array_equal(result.mask * 255, written) and result.objects is None
    elif bundle == "jurkat":  # class indices here, the bundle's class_values in a PNG
        assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) == {0, 1, 2}
        assert np.array_equal(np.array([0, 128, 255])[result.mask], written) and result.objects is None
    else:  # the same labels, and the table's rows
        assert result.mask.dtype == np.uint16 and np.array_equal(result.mask, written)
        with open(tmp_path / "out" / "table" / "a.csv", newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(result.objects) == len(table) == result.mask.max() >= 3
        assert _as_csv(result.objects) == table
    # the fitted weights segment the example's classes, not a constant
    assert np.mean((result.mask > 0) == (target > 0)) > 0.8


@pytest.mark.parametrize("bundle", ["isbi_em", "jurkat", "nuclei"])
def test_a_file_path_segments_as_medseg_infer_reads_it(bundle, weights, tmp_path):
    image, _ = _example(bundle, seed=1)
    (tmp_path / "in").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright: the reader turns it
    Image.fromarray(image).save(tmp_path / "in" / "a.png", exif=exif)
    _infer(bundle, tmp_path / "in", tmp_path / "out", weights[bundle])
    written = np.asarray(Image.open(tmp_path / "out" / "mask" / "a.png"))
    segmenter = _segmenter(bundle, weights)

    as_written = {"isbi_em": lambda m: m * 255, "jurkat": lambda m: np.array([0, 128, 255])[m],
                  "nuclei": lambda m: m}[bundle]
    for given in (tmp_path / "in" / "a.png", str(tmp_path / "in" / "a.png")):
        result = segmenter.segment(given)
        assert result.mask.shape == written.shape == image.shape[1::-1]
        assert np.array_equal(as_written(result.mask), written) and len(np.unique(written)) > 1
        assert np.array_equal(result.prob, tifffile.imread(tmp_path / "out" / "prob" / "a.tif"))
    with Image.open(tmp_path / "in" / "a.png") as opened:  # a PIL image is turned upright as the reader turns it
        assert np.array_equal(segmenter.segment(opened).prob, result.prob)
    if bundle == "nuclei":
        with open(tmp_path / "out" / "table" / "a.csv", newline="") as fh:
            assert _as_csv(result.objects) == list(csv.DictReader(fh))
    with pytest.raises(DataError, match="channel_axis 0 is for arrays"):
        segmenter.segment(tmp_path / "in" / "a.png", channel_axis=0)


def test_a_stack_file_segments_with_segment_stack_as_infer_segments_it(weights, tmp_path):
    slices = np.stack([_example("nuclei", seed=s)[0] for s in (1, 2)])
    (tmp_path / "in").mkdir()
    # calibrated as ImageJ writes it: 4 pixels per µm across, 2 down (0.25 x 0.5 µm pixels)
    tifffile.imwrite(tmp_path / "in" / "stack.tif", slices, imagej=True, resolution=(4.0, 2.0),
                     metadata={"unit": "um", "axes": "ZYX"})
    _infer("nuclei", tmp_path / "in", tmp_path / "out", weights["nuclei"])
    nuclei = _segmenter("nuclei", weights)
    result = nuclei.segment_stack(tmp_path / "in" / "stack.tif")
    assert np.array_equal(result.mask, tifffile.imread(tmp_path / "out" / "mask" / "stack.tif"))
    with open(tmp_path / "out" / "table" / "stack.csv", newline="") as fh:
        assert _as_csv(result.objects) == list(csv.DictReader(fh))
    assert result.objects and {row["slice"] for row in result.objects} == {0, 1}
    for row in result.objects:  # the table in micrometres too, from the file's calibration
        assert row["area_um2"] == pytest.approx(row["area"] * 0.125, rel=1e-6)
        assert row["centroid_y_um"] == pytest.approx(row["centroid_y"] * 0.5, rel=1e-6)
        assert row["centroid_x_um"] == pytest.approx(row["centroid_x"] * 0.25, rel=1e-6)
    assert nuclei.segment(slices[0]).objects[0]["area_um2"] is None  # an array states no pixel size
    with pytest.raises(DataError, match="a stack of 2 slices; segment it with segment_stack"):
        nuclei.segment(tmp_path / "in" / "stack.tif")
    with pytest.raises(DataError, match="missing.png"):
        nuclei.segment(tmp_path / "in" / "missing.png")


def test_an_rgb_image_gives_the_same_map_whatever_its_memory_layout(weights):
    # the luma was a dot product whose last bit followed the array's layout (1e-7 in the map; a PNG and a
    # planar TIFF of the same pixels differed so too)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)  # large enough for a blocked dot product
    em = _segmenter("isbi_em", weights, tta=False)
    expected = em.segment(rgb).prob
    for layout in (np.ascontiguousarray(rgb.transpose(2, 0, 1)), np.asfortranarray(rgb)):
        assert np.array_equal(em.segment(layout).prob, expected)


def test_channel_layouts_and_types_give_the_same_mask(weights):
    jurkat = _segmenter("jurkat", weights, tta=False)
    image, _ = _example("jurkat", seed=1)
    expected = jurkat.segment(image).mask
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    for layout in (np.moveaxis(image, -1, 0), rgba, torch.as_tensor(image), image.astype(np.float64)):
        assert np.array_equal(jurkat.segment(layout).mask, expected)
    assert np.array_equal(jurkat.segment(image.transpose(2, 0, 1), channel_axis=0).mask, expected)
    em = _segmenter("isbi_em", weights)
    gray, _ = _example("isbi_em", seed=1)
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)  # an RGB file of a gray image reads as the gray image
    assert np.array_equal(em.segment(as_rgb).prob, em.segment(gray).prob)
    assert set(np.unique(em.segment(gray > 128).mask)) <= {0, 1}  # a boolean image is taken as 0/1


@pytest.mark.parametrize(("array", "kwargs", "words"), [
    (np.zeros((3, 8, 4)), {}, "which axis holds the channels"),
    (np.zeros((2, 2, 8, 8)), {}, "segment_stack"),
    (np.zeros((8,)), {}, "1 axes"),
    (np.zeros((0, 8)), {}, "empty image"),
    (np.full((8, 8), "a"), {}, "give numbers"),
    (np.zeros((8, 8, 5)), {}, "channels"),
    (np.zeros((8, 8, 3)), {"channel_axis": 3}, "channel_axis 3"),
    (np.zeros((5, 16, 16)), {}, "no axis of 1–4 channels, so not one image; for a stack .* use segment_stack"),
    (np.zeros((8, 8)), {"channel_axis": 0}, "has no channel axis; leave it out"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), {}, "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), {}, "NaN or infinite"),
])
def test_arrays_the_model_cannot_take_are_one_line_errors(weights, array, kwargs, words):
    with pytest.raises(DataError, match=words) as err:
        _segmenter("isbi_em", weights).segment(array, **kwargs)
    assert "\n" not in str(err.value)


def test_a_stack_segments_slice_by_slice_as_a_tiff_stack(weights, tmp_path):
    slices = [_example("nuclei", seed=s)[0] for s in (1, 2, 3)]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "stack.tif", np.stack(slices), photometric="minisblack")
    _infer("nuclei", tmp_path / "in", tmp_path / "out", weights["nuclei"])
    written = tifffile.imread(tmp_path / "out" / "mask" / "stack.tif")
    with open(tmp_path / "out" / "table" / "stack.csv", newline="") as fh:
        table = list(csv.DictReader(fh))

    nuclei = _segmenter("nuclei", weights)
    result = nuclei.segment_stack(np.stack(slices))

    assert result.mask.shape == written.shape == (3, 64, 64) and np.array_equal(result.mask, written)
    assert _as_csv(result.objects) == table
    assert [row["slice"] for row in result.objects] == sorted(row["slice"] for row in result.objects)
    assert np.array_equal(result.mask[1], nuclei.segment(slices[1]).mask)  # labelled per slice, as one image
    rgb_stack = np.stack([np.repeat(s[..., None], 3, axis=-1) for s in slices])  # (Z, H, W, C)
    assert np.array_equal(nuclei.segment_stack(rgb_stack).mask, written)
    assert np.array_equal(nuclei.segment_stack(np.moveaxis(rgb_stack, -1, 1), channel_axis=1).mask, written)
    with pytest.raises(DataError, match="slice axis"):
        nuclei.segment_stack(rgb_stack, channel_axis=0)


def test_settings_checkpoints_and_errors(weights, tmp_path):
    image, _ = _example("isbi_em", seed=1)
    plain = _segmenter("isbi_em", weights)
    assert plain.kind == "binary" and plain.tta is False and "isbi_em" in repr(plain)
    with_tta = _segmenter("isbi_em", weights, tta=True)
    assert with_tta.tta is True and not np.array_equal(with_tta.segment(image).prob, plain.segment(image).prob)
    # the same weights twice average to themselves: an ensemble of copies segments as one member
    copy = tmp_path / "copy.pt"
    copy.write_bytes(weights["isbi_em"].read_bytes())
    pair = Segmenter(ROOT / "bundles" / "isbi_em", [weights["isbi_em"], copy], device="cpu",
                     overrides=dict(parse_override(item) for item in TINY_NET))
    np.testing.assert_allclose(pair.segment(image).prob, plain.segment(image).prob, atol=1e-6)
    assert _segmenter("nuclei", weights).kind == "instances" and _segmenter("jurkat", weights).kind == "classes"
    with pytest.raises(CheckpointError, match="models/model.pt: checkpoint not found"):
        Segmenter(ROOT / "bundles" / "isbi_em")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        Segmenter(ROOT / "bundles" / "isbi_em", weights["isbi_em"], device="cpu")
    with pytest.raises(BundleError):
        _segmenter("isbi_em", weights, overrides={"no_such_key": 1})
    # tta given twice, differently, is refused (overrides won silently); a word is read as meant
    with pytest.raises(BundleError, match=r"tta=True contradicts overrides \{'tta': False\}"):
        _segmenter("isbi_em", weights, tta=True, overrides={"tta": False})
    assert _segmenter("isbi_em", weights, tta="false").tta is False  # bool("false") was True
    # an empty list (a glob that matched nothing) is not the bundle's own weights; a duplicate is a weights error
    with pytest.raises(CheckpointError, match="an empty list of checkpoints"):
        Segmenter(ROOT / "bundles" / "isbi_em", [], device="cpu")
    with pytest.raises(CheckpointError, match="given twice"):
        Segmenter(ROOT / "bundles" / "isbi_em", [weights["isbi_em"], weights["isbi_em"]], device="cpu")
    with pytest.raises(BundleError, match="device='gpu': unknown device"):  # a settings error, as documented
        Segmenter(ROOT / "bundles" / "isbi_em", weights["isbi_em"], device="gpu")
    # one overlay file as a plain string is that file, not its letters
    overlay = tmp_path / "overlay.json"
    overlay.write_text('{"merge_threshold": 0.5}')
    assert _segmenter("isbi_em", weights, overlays=str(overlay)).inferer is not None


def test_weights_with_nan_are_refused_before_any_image(weights, tmp_path):
    state = torch.load(weights["isbi_em"])
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(CheckpointError, match=f"weight {name} holds NaN.*diverged"):
        Segmenter(ROOT / "bundles" / "isbi_em", tmp_path / "diverged.pt", device="cpu",
                  overrides=dict(parse_override(item) for item in TINY_NET))


def test_a_nan_image_file_fails_that_input_and_names_it(weights, tmp_path):
    good, _ = _example("isbi_em", seed=1)
    bad = good.astype(np.float32)
    bad[5:9, 5:9] = np.nan  # it reached the contour closing's watershed and hung it
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "bad.tif", bad)
    Image.fromarray(good).save(tmp_path / "in" / "good.png")
    args = ["infer", ROOT / "bundles" / "isbi_em", tmp_path / "in", tmp_path / "out", "--checkpoint",
            weights["isbi_em"], "--no-progress", "--device", "cpu", *[a for i in TINY_NET for a in ("--set", i)]]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1
    assert f"{tmp_path / 'in' / 'bad.tif'}: holds NaN or infinite values" in result.output
    assert (tmp_path / "out" / "mask" / "good.png").is_file()


def test_importing_medseg_loads_neither_torch_nor_monai():
    code = "import sys, medseg; print('torch' in sys.modules, 'monai' in sys.modules, medseg.Segmenter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "Segmenter"]


def test_config_values_no_component_takes_are_one_line_bundle_errors(weights):
    from medseg.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="diameter is used only with target_diameter") as err:
        _segmenter("nuclei", weights, overrides={"diameter": 30})  # a Cellpose habit, for a model without it
    with pytest.raises(BundleError, match="a config value does not work .* in overrides and overlays") as err2:
        _segmenter("nuclei", weights, overrides={"sw_batch_size": "$1 // 0"})
    assert "\n" not in str(err.value) + str(err2.value)


def test_a_varying_alpha_is_a_channel_of_data_not_dropped(weights):
    nuclei = _segmenter("nuclei", weights, tta=False)
    image, _ = _example("nuclei", seed=1)
    two = np.stack([np.zeros_like(image), image], axis=-1)  # [cyto, nuclei] as Cellpose takes them
    with pytest.raises(DataError, match="2 channels whose last is not a constant alpha"):
        nuclei.segment(two)
    opaque = np.stack([image, np.full_like(image, 255)], axis=-1)  # gray + alpha, as a PNG holds it
    assert np.array_equal(nuclei.segment(opaque).mask, nuclei.segment(image).mask)
    assert np.array_equal(nuclei.segment(image[..., None]).mask, nuclei.segment(image).mask)  # (H, W, 1)


def test_advice_is_worded_for_python(weights, tmp_path):
    # the readers' advice named command-line options (--set input_channels=[N]) a Python caller cannot give,
    # and a folder of pictures was "no DICOM files in this folder" without saying why a folder meant DICOM
    nuclei = _segmenter("nuclei", weights, tta=False)
    image, _ = _example("nuclei", seed=1)
    with pytest.raises(DataError) as err:
        nuclei.segment(np.stack([image] * 5, axis=-1), channel_axis=-1)
    assert "overrides={'input_channels': [N]}" in str(err.value) and "--set" not in str(err.value)
    (tmp_path / "pictures").mkdir()
    Image.fromarray(image).save(tmp_path / "pictures" / "a.png")
    with pytest.raises(DataError, match=r"no DICOM files in this folder \(a folder is read as one DICOM series; "
                                        r"give the path of an image file\)"):
        nuclei.segment_stack(tmp_path / "pictures")
    # an empty path was the current folder, "no DICOM files" there
    for segment in (nuclei.segment, nuclei.segment_stack):
        with pytest.raises(DataError, match=r"^an empty path: give the path of an image file, or the image as an "
                                            r"array$"):
            segment("")
    # the constructor's errors too: the options of the command line, as the arguments that take them
    with pytest.raises(BundleError) as err:
        _segmenter("isbi_em", weights, overrides={"threshold": "high"})
    assert str(err.value).startswith("overrides={'threshold': 'high'}: ") and "--set" not in str(err.value)
    # values that do not read as one Python value are left as written, not mangled into braces
    with pytest.raises(BundleError) as err:
        _segmenter("isbi_em", weights, overrides={"patch_size": [60, 60]})
    assert "e.g. overrides 'patch_size=[64, 64]'" in str(err.value) and "{''" not in str(err.value)
    with pytest.raises(BundleError) as err:
        _segmenter("jurkat", weights, overrides={"class_map": '{"0": 0'})
    assert str(err.value).startswith('overrides class_map={"0": 0: not valid JSON') and "--set" not in str(err.value)
    with pytest.raises(BundleError) as err:
        _segmenter("nuclei", weights, overrides={"stain": "foo"})
    assert "use overrides={'stain': 'luma'} or overrides={'stain': 'hematoxylin'}" in str(err.value)
    with pytest.raises(BundleError) as err:
        _segmenter("isbi_em", weights, overrides={"device": "cuda"})
    assert "--device" not in str(err.value) and "('auto', 'cpu', 'cuda' or 'cuda:N')" in str(err.value)
    with pytest.raises(BundleError) as err:  # a Python value is named as Python writes it, not as a string
        _segmenter("isbi_em", weights, overrides={"whole_max_pixels": True})
    assert str(err.value).startswith("overrides={'whole_max_pixels': True}: ")
    with pytest.raises(BundleError) as err:
        Segmenter(ROOT / "bundles" / "isbi_em", weights["isbi_em"], device="mps")
    assert str(err.value).startswith("device='mps': not supported") and "--device" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"models/model\.pt: checkpoint not found; give as checkpoint the "
                                              r"model\.pt of a training"):
        Segmenter(ROOT / "bundles" / "isbi_em", device="cpu")  # the bundles ship without weights


def test_an_error_class_that_takes_more_than_its_message_is_raised_as_it_is():
    from medseg.api import _python_words
    from medseg.errors import DataError

    class Detailed(DataError):
        def __init__(self, message, where):
            super().__init__(message)
            self.where = where

    with pytest.raises(Detailed) as caught, _python_words():
        raise Detailed("pick channels with --set input_channels=[N] (numbered from 0)", "x.tif")
    assert caught.value.where == "x.tif"
    with pytest.raises(DataError, match=r"with overrides=\{'input_channels': \[N\]\}"), _python_words():
        raise DataError("pick channels with --set input_channels=[N] (numbered from 0)")
    # a text given for a mapping is shown as the text it is, not as the mapping Python would read in it
    with pytest.raises(DataError, match=r"^overrides class_map=\{'0':0\}: not valid JSON$"), _python_words():
        raise DataError("--set class_map={'0':0}: not valid JSON")


def test_pil_images_of_other_modes_are_taken_as_their_colours(weights):
    # a CMYK picture (print JPEGs) was read as its C, M, Y samples taken for RGB, K dropped as a constant alpha
    jurkat = _segmenter("jurkat", weights, tta=False)
    image, _ = _example("jurkat", seed=1)
    picture = Image.fromarray(image)
    expected = jurkat.segment(picture).mask
    assert np.array_equal(jurkat.segment(picture.convert("CMYK")).mask, expected)  # CMYK -> RGB is exact here
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    assert np.array_equal(jurkat.segment(palette).mask, jurkat.segment(palette.convert("RGB")).mask)
    palette.info["transparency"] = 0  # a transparent palette entry: segmented as its file is (alpha dropped)
    assert np.array_equal(jurkat.segment(palette).mask, jurkat.segment(palette.convert("RGB")).mask)


def test_a_model_that_picks_its_channels_takes_every_channel_given(weights):
    # input_channels=[1] (the nuclear stain of a two-channel image): the second channel was taken for an alpha
    # and refused, and the gray image the message asked for was refused as having no channel 1
    nuclei = _segmenter("nuclei", weights, tta=False, overrides={"input_channels": [1]})
    image, _ = _example("nuclei", seed=1)
    two = np.stack([255 - image, image], axis=-1)
    expected = _segmenter("nuclei", weights, tta=False).segment(image).mask
    assert np.array_equal(nuclei.segment(two).mask, expected)
    assert np.array_equal(nuclei.segment(np.moveaxis(two, -1, 0), channel_axis=0).mask, expected)
    five = np.stack([image] * 5, axis=-1)  # more channels than 4: asked for the axis, not sent to segment_stack
    with pytest.raises(DataError, match="which axis holds the channels"):
        nuclei.segment(five)
    assert np.array_equal(nuclei.segment(five, channel_axis=-1).mask, expected)


def test_devices_types_warnings_and_the_callers_seeds(weights):
    import random
    import warnings

    image, _ = _example("isbi_em", seed=1)
    expected = _segmenter("isbi_em", weights).segment(image).prob
    for device in (torch.device("cpu"), "CPU"):
        assert _segmenter("isbi_em", weights, device=device).device.type == "cpu"
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    em = _segmenter("isbi_em", weights)  # builds (randomly initialises) a network before loading the weights
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    read_only = image.astype(np.float32)
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a notebook shows every warning
        assert np.array_equal(em.segment(read_only).prob, expected)
        em.segment(np.zeros((32, 32), np.uint8))  # blank: no divide-by-zero warning
    as_bf16 = torch.as_tensor(image).to(torch.bfloat16)  # holds 0-255 integers exactly
    assert np.array_equal(em.segment(as_bf16).prob, expected)
    # values far from 0 for their spread keep their levels (in float32 a float64 image around 1e6 kept 17 of
    # its 253, and 822 mask pixels changed; medseg infer read float64 TIFFs so too)
    for offset in (image.astype(np.float64) + 1e6, image.astype(np.uint32) + 2**25, image.astype(np.int64) - 2**40):
        np.testing.assert_allclose(em.segment(offset).prob, expected, atol=1e-5)


def test_stack_channel_axes_are_checked(weights):
    nuclei = _segmenter("nuclei", weights, tta=False)
    stack = np.stack([_example("nuclei", seed=s)[0] for s in (1, 2)])
    rgb = np.repeat(stack[..., None], 3, axis=-1)
    for axis in (4, 7, -4):
        with pytest.raises(DataError, match=f"channel_axis {axis}: the channel axis of a"):
            nuclei.segment_stack(rgb, channel_axis=axis)
    with pytest.raises(DataError, match="without one"):
        nuclei.segment_stack(stack, channel_axis=-1)
    with pytest.raises(DataError, match="empty stack"):
        nuclei.segment_stack(stack[:0])
    with pytest.raises(DataError, match=r"would be 64 slices of 64 x 3 pixels; for one colour image .* use segment"):
        nuclei.segment_stack(rgb[0])  # one RGB image given as a stack: it segmented 64 slices of 64 x 3
    assert np.array_equal(nuclei.segment_stack(stack[..., None]).mask, nuclei.segment_stack(stack).mask)


def test_a_diameter_per_image_as_infer_set_diameter(weights):
    from medseg.errors import ConfigValueError

    image, _ = _example("nuclei", seed=1)
    scaled = _segmenter("nuclei", weights, overrides={"target_diameter": 20})
    given = _segmenter("nuclei", weights, overrides={"target_diameter": 20, "diameter": 10})
    assert np.array_equal(scaled.segment(image, diameter=10).mask, given.segment(image).mask)
    assert scaled.inferer.diameter is None  # the Segmenter's own setting is left as it was
    assert not np.array_equal(scaled.segment(image, diameter=10).prob, scaled.segment(image, diameter=40).prob)
    stack = scaled.segment_stack(np.stack([image, image]), diameter=10)  # a stack's slices alike
    assert np.array_equal(stack.mask[1], given.segment(image).mask)
    for bad in (0, "abc", [10]):  # a word or a list: the same one line, not float()'s ValueError
        with pytest.raises(ConfigValueError, match="must be a positive number"):
            scaled.segment(image, diameter=bad)
    with pytest.raises(ConfigValueError, match="not trained at a standard object size"):
        _segmenter("nuclei", weights).segment(image, diameter=10)


def test_the_first_segmenter_of_a_process_leaves_pythons_generator_alone(weights):
    # importing MONAI on the first construction drew from Python's random generator
    import subprocess
    import sys

    overrides = dict(parse_override(item) for item in TINY["isbi_em"])
    script = (
        "import random, sys\n"
        "from medseg.api import Segmenter\n"
        "assert 'monai' not in sys.modules\n"
        "random.seed(5)\n"
        "before = random.getstate()\n"
        f"Segmenter({str(ROOT / 'bundles' / 'isbi_em')!r}, {str(weights['isbi_em'])!r}, device='cpu', "
        f"overrides={overrides!r})\n"
        "assert 'monai' in sys.modules and random.getstate() == before\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_segmenting_from_several_threads_leaves_the_warning_filters_as_they_were(weights):
    # each call quietened MONAI's warning on blank images with warnings.catch_warnings, which threads entering
    # and leaving at once left behind for good: the warning was silenced for the rest of the process
    import threading
    import warnings

    segmenter = _segmenter("isbi_em", weights, tta=False)
    image, _ = _example("isbi_em", seed=1)
    blank = np.zeros_like(image)
    expected = segmenter.segment(image).mask
    before = list(warnings.filters)
    masks, failures = [], []

    def work(k: int) -> None:
        try:
            for _ in range(4):
                masks.append(segmenter.segment(blank if k % 2 else image).mask)
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert list(warnings.filters) == before
    assert sum(np.array_equal(m, expected) for m in masks) == 12  # the images' masks, as alone


def test_a_callers_own_filter_for_the_blank_image_warning_is_kept(weights):
    import warnings

    segmenter = _segmenter("isbi_em", weights, tta=False)
    image, _ = _example("isbi_em", seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Divide by zero \(a_min == a_max\)")
        before = list(warnings.filters)
        segmenter.segment(np.zeros_like(image))
        assert list(warnings.filters) == before  # the equal filter medseg adds and removes took the caller's
        # the caller's filter behind one that shows every warning: the blank image is still segmented quietly
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with warnings.catch_warnings(record=True) as said:
            warnings.filters[:] = before
            segmenter.segment(np.zeros_like(image))
            assert list(warnings.filters) == before
        assert not [w for w in said if "Divide by zero" in str(w.message)]
    # filters added meanwhile: the caller's goes back behind the filter it followed, not to its old index
    from medseg.workflows import quiet_constant_images

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Divide by zero \(a_min == a_max\)")
        warnings.simplefilter("always")
        expected = list(warnings.filters)
        with quiet_constant_images():
            warnings.filterwarnings("ignore", message="a filter added meanwhile")
        assert list(warnings.filters) == [warnings.filters[0], *expected]
        assert warnings.filters[0][1].pattern == "a filter added meanwhile"
