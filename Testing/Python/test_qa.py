"""Tests of SARRegistrationLib.qa: the checkerboard helper and the QA figure, headless."""

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.figure import Figure

from SARRegistrationLib import qa

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _array(read_test_image, name):
    return sitk.GetArrayFromImage(read_test_image(name))


def _assert_is_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_checkerboard_alternates_tiles_2d():
    board = qa.checkerboard(np.zeros((16, 12)), np.ones((16, 12)), tiles=4)
    rows, cols = np.indices((16, 12))
    np.testing.assert_array_equal(board, (rows // 4 + cols // 3) % 2)


def test_checkerboard_alternates_tiles_3d():
    a, b = np.full((4, 6, 6), 5.0), np.full((4, 6, 6), -2.0)
    board = qa.checkerboard(a, b, tiles=2)
    parity = np.indices((4, 6, 6)) // np.reshape([2, 3, 3], (3, 1, 1, 1))
    np.testing.assert_array_equal(board, np.where(parity.sum(0) % 2 == 0, 5.0, -2.0))


@pytest.mark.parametrize("shape", [(4, 4), (1, 10), (7, 10), (2, 3, 9)])
def test_checkerboard_of_an_image_smaller_than_its_tiles_has_a_tile_per_voxel(shape):
    # ITK's filter divided by zero there, which killed the process.
    board = qa.checkerboard(np.zeros(shape), np.ones(shape), tiles=8)
    assert board.shape == shape and board.flat[0] == 0 and 0 < board.mean() < 1


def test_checkerboard_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        qa.checkerboard(np.zeros((8, 8)), np.zeros((8, 9)))


def test_qa_figure_2d(tmp_path, read_test_image):
    reference = _array(read_test_image, "brain_pd.nrrd")
    floating = _array(read_test_image, "sample_floating_t1.nrrd")
    rows, cols = np.indices(reference.shape)
    displacement = np.stack([2.0 * np.sin(cols / 15.0), 2.0 * np.cos(rows / 20.0)])
    path = tmp_path / "qa_2d.png"
    qa.save_qa_figure(path, reference, floating, floating, displacement,
                      reference_mask=_array(read_test_image, "brain_ventricles.nrrd"),
                      floating_mask=_array(read_test_image, "sample_floating_ventricles.nrrd"),
                      warped_mask=_array(read_test_image, "sample_floating_ventricles.nrrd"),
                      title="sample pair")
    _assert_is_png(path)


def test_qa_figure_3d_without_masks_and_with_folds(tmp_path, read_test_image):
    reference = _array(read_test_image, "brain3d_t1.nii.gz")
    floating = np.roll(reference, 2, axis=2)
    displacement = np.zeros((3, *reference.shape))
    displacement[2, :, 60:64, 60:64] = -4.0 * np.arange(4)  # folds the middle slice
    path = tmp_path / "qa_3d.png"
    qa.save_qa_figure(str(path), reference, floating, reference, displacement)
    _assert_is_png(path)


def test_qa_figure_3d_with_masks(tmp_path, read_test_image):
    reference = _array(read_test_image, "brain3d_t1.nii.gz")
    mask = _array(read_test_image, "brain3d_ventricles.nii.gz")
    path = tmp_path / "qa_3d_masks.png"
    qa.save_qa_figure(path, reference, reference, reference, np.zeros((3, *reference.shape)),
                      reference_mask=mask, floating_mask=np.roll(mask, 3, axis=2), spacing=(3.0, 2.0, 2.0))
    _assert_is_png(path)
    assert matplotlib.image.imread(path).shape[0] > 1000  # three rows of panels, one a plane


def test_planes_go_through_the_slices_where_the_mask_is_largest():
    mask = np.zeros((9, 12, 10), bool)
    mask[2:5, 3:9, 4:6] = True
    mask[3, 5, 1:9] = True  # slice k = 3, row j = 5 and columns 4 and 5 are the widest
    assert qa.focus(mask, mask.shape) == (3, 5, 4)
    assert qa.focus(None, mask.shape) == (4, 6, 5)
    edge = np.zeros((9, 12, 10), bool)
    edge[0] = edge[:, 11] = True
    assert qa.focus(edge, edge.shape)[:2] == (1, 10)  # moved inside: a neighbour on each side
    assert qa.focus(None, (2, 1, 5)) == (1, 0, 2)
    assert qa.plane_axes((9, 12, 10)) == [0, 1, 2] and qa.plane_axes((1, 12, 10)) == [0]
    for centre, size in ((1, 9), (4, 9), (7, 9), (1, 2), (0, 1)):
        rows = qa.slab(centre, size)
        assert list(range(size))[rows][len(range(size)[rows]) // 2] == centre


def test_a_plane_along_an_axis_is_its_middle_slice_drawn_to_scale():
    rng = np.random.default_rng(0)
    images = [rng.random((5, 3, 6)) for _ in range(3)]  # a slab 3 slices thick along axis 1 (j)
    displacement = rng.random((3, 5, 3, 6))
    cut = qa.plane(*images, displacement, {"warped_mask": images[0] > 0.5}, axis=1, spacing=(4.0, 1.0, 0.5),
                   name="j = 4")
    # The plane is rows k and columns i of the slab's middle slice.
    assert cut.reference.shape == (5, 6) and cut.in_plane.shape == (2, 5, 6)
    np.testing.assert_array_equal(cut.masks["warped_mask"], images[0][:, 1] > 0.5)
    np.testing.assert_array_equal(cut.in_plane, displacement[[0, 2]][:, :, 1])
    assert cut.aspect == 8.0 and cut.rows_up and cut.name == "j = 4"


@pytest.mark.parametrize("bad", ["floating", "displacement", "warped_mask"])
def test_mismatched_shapes_raise_and_write_nothing(tmp_path, bad):
    shape = (32, 40)
    arguments = {"reference": np.random.default_rng(0).random(shape), "floating": np.zeros(shape),
                 "warped": np.zeros(shape), "displacement": np.zeros((2, *shape)), "warped_mask": None}
    arguments[bad] = np.zeros((2, 40, 32) if bad == "displacement" else (40, 32))
    path = tmp_path / "qa.png"
    with pytest.raises(ValueError, match=bad):
        qa.save_qa_figure(path, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_failed_render_leaves_existing_file_untouched(tmp_path, monkeypatch):
    def failing_savefig(self, stream, **kwargs):
        stream.write(PNG_SIGNATURE)  # half a file, then the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    path = tmp_path / "qa.png"
    path.write_bytes(b"previous figure")
    image = np.random.default_rng(0).random((16, 16))
    with pytest.raises(RuntimeError, match="disk full"):
        qa.save_qa_figure(path, image, image, image, np.zeros((2, 16, 16)))
    assert path.read_bytes() == b"previous figure"
    assert list(tmp_path.iterdir()) == [path]


def _legend(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _square_labels(shape, values, shift=0):
    """A label map with one 6 x 6 square per value along the diagonal, moved ``shift`` columns."""
    labels = np.zeros(shape, dtype=np.int32)
    for index, value in enumerate(values):
        labels[4 + 8 * index:10 + 8 * index, 4 + 8 * index + shift:10 + 8 * index + shift] = value
    return labels


def test_label_maps_are_outlined_label_by_label():
    reference, moving = _square_labels((40, 40), [1, 2, 7]), _square_labels((40, 40), [1, 2], shift=2)
    ax = Figure().subplots()
    qa._draw_masks(ax, reference, moving, "lime", "warped", by_label=True)
    assert _legend(ax) == ["reference", "warped", "label 1", "label 2", "label 7"]
    outlines = [(tuple(c.get_edgecolor()[0]), c.get_linestyle()[0][1] is not None) for c in ax.collections]
    assert len(outlines) == 5  # labels 1 and 2 in both maps, label 7 in the reference only
    colours = {colour for colour, _ in outlines}
    assert len(colours) == 3  # one colour a label, shared by its reference (dashed) and moving (solid) outline
    assert sorted(dashed for _, dashed in outlines) == [False, False, True, True, True]


def test_one_structure_is_outlined_in_two_colours():
    reference, moving = _square_labels((40, 40), [1, 2]), _square_labels((40, 40), [1, 2], shift=2)
    ax = Figure().subplots()
    qa._draw_masks(ax, reference, moving, "yellow", "floating", by_label=False)
    assert _legend(ax) == ["reference", "floating"]
    assert len(ax.collections) == 2


def test_a_long_legend_ends_with_a_count():
    labels = np.arange(1, 16).repeat(16).reshape(15, 16)  # 15 labels, one row each
    ax = Figure().subplots()
    qa._draw_masks(ax, None, np.pad(labels, 2), "lime", "warped", by_label=True)
    legend = _legend(ax)
    assert len(legend) == 10 and legend[:2] == ["warped", "label 1"] and legend[-1] == "and 7 more"


@pytest.mark.parametrize("values, expected", [(([1, 2], [1, 2]), True), (([1], [255]), False),
                                              (([1, 2], [1]), False), ((None, [3, 4]), True)])
def test_masks_are_drawn_label_by_label_when_every_map_holds_two_labels(tmp_path, monkeypatch, values, expected):
    drawn = []
    monkeypatch.setattr(qa, "_draw_masks", lambda *arguments: drawn.append(arguments[-1]))
    image = np.random.default_rng(0).random((40, 40))
    maps = [None if value is None else _square_labels((40, 40), value) for value in values]
    qa.save_qa_figure(tmp_path / "qa.png", image, image, image, np.zeros((2, 40, 40)), reference_mask=maps[0],
                      floating_mask=maps[1], warped_mask=maps[1])
    assert drawn == [expected, expected]  # the before and after panels


@pytest.mark.parametrize("title", [None, "pair 1"])
def test_the_figure_title_is_the_one_given(tmp_path, monkeypatch, title):
    shown = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **kwargs: shown.append(text))
    image = np.random.default_rng(0).random((24, 24))
    mask = image > 0.5
    qa.save_qa_figure(tmp_path / "qa.png", image, image, image, np.zeros((2, 24, 24)), reference_mask=mask,
                      floating_mask=mask, warped_mask=mask, title=title)
    assert shown == ([] if title is None else [title])
