"""Quality-assurance figure of one registration, written as a PNG without a display.

Arrays follow the conventions of :mod:`SARRegistrationLib.spatial`: numpy axis order ``z, y, x``, a
displacement ``(ndims, *spatial)`` in voxels. Only matplotlib's object-oriented API is used (no
pyplot), so the figure renders with Agg whatever backend the caller's process has selected.

A 2D registration is one row of panels. A volume is three, one plane along each array axis (one
for a single slice), each through the slice where the warped mask is largest across that axis
(the middle one without masks), so that the structure is in view. Arrays in LPS order (``S, P,
L``, as ``registration`` turns them) give the axial, coronal and sagittal planes, superior and
anterior at the top. Each plane is cut from a slab of at most three slices (:func:`slab`), the
slice with its neighbours, which is all its Jacobian needs: a caller holding a large volume
(``registration``) cuts the slabs itself and never makes whole-volume arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import CenteredNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .files import write_atomically
from .imageio import normalise_intensity
from .metrics import jacobian_determinant, label_values

_QUIVER_ARROWS_PER_AXIS = 16
_GRAY = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}  # images normalised to [0, 1]
_LEGEND_ENTRIES = 10
# Colours of a label map's labels, by value: matplotlib's ten categorical colours ("tab10").
_LABEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:gray", "tab:olive", "tab:cyan")


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    """Interleave two same-shaped 2D or 3D images in a checkerboard of ``tiles`` tiles per axis.

    The tile at the origin, and every other tile from it, shows ``a``; the rest show ``b``. When an
    axis does not divide evenly, the remainder forms a last, thinner tile; an axis shorter than
    ``tiles`` gets a tile per voxel (ITK divides by zero, and the process dies, on tiles of no
    voxel). Returns a float64 array.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"checkerboard needs two 2D or 3D images of the same shape, got {a.shape} and {b.shape}")
    board = sitk.CheckerBoard(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b),
                              [min(tiles, size) for size in a.shape[::-1]])
    return sitk.GetArrayFromImage(board)


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


@dataclass
class Plane:
    """One row of the figure: 2D cuts of the images, masks and field, on one plane of voxels."""

    name: str  # what the row's first panel is labelled with ("" for a 2D image)
    reference: np.ndarray  # intensities normalised to [0, 1]
    floating: np.ndarray
    warped: np.ndarray
    masks: dict  # reference_mask, floating_mask, warped_mask: 2D arrays or None
    determinant: np.ndarray  # the field's Jacobian determinant on the plane
    in_plane: np.ndarray  # (2, rows, columns): the displacement along the plane's rows and columns, voxels
    aspect: float = 1.0  # a voxel's height over its width, as drawn
    rows_up: bool = False  # rows drawn from the bottom: array axis 0 of a volume's planes along axes 1 and 2 (S in LPS)


def focus(mask, shape) -> tuple:
    """For each array axis, the slice where ``mask`` (an array or None) covers most voxels, or the
    middle one, moved inside by a slice where needed so that it has a neighbour on each side."""
    centre = [n // 2 for n in shape]
    covered = None if mask is None else np.asarray(mask) != 0
    if covered is not None and covered.any():
        for axis in range(covered.ndim):
            areas = np.count_nonzero(covered, axis=tuple(k for k in range(covered.ndim) if k != axis))
            centre[axis] = int(np.argmax(areas))
    return tuple(min(max(c, 1), n - 2) if n >= 3 else n // 2 for c, n in zip(centre, shape))


def plane_axes(shape) -> list:
    """The array axes a volume of ``shape`` is cut along, one plane each: those whose plane is two
    voxels or more across both ways (a single slice has one plane, its own)."""
    return [axis for axis in range(len(shape)) if all(n >= 2 for k, n in enumerate(shape) if k != axis)]


def slab(centre: int, size: int) -> slice:
    """The slice ``centre`` of an axis of ``size`` with its neighbours; its middle entry (index
    ``length // 2``) is ``centre`` for the centres :func:`focus` picks."""
    return slice(max(centre - 1, 0), min(centre + 2, size))


def plane(reference, floating, warped, displacement, masks: dict, axis: int | None = None, spacing=None,
          name: str = "") -> Plane:
    """The :class:`Plane` of 2D arrays (``axis`` None), or of the middle slice along ``axis`` of
    3D slabs (:func:`slab`) of the images, the masks (any may be None) and the voxel field
    ``(ndims, *spatial)``; ``spacing`` (mm per array axis) sets the voxels' drawn shape."""
    ndims = np.ndim(reference)
    spacing = (1.0,) * ndims if spacing is None else tuple(spacing)
    shown = (0, 1) if axis is None else tuple(k for k in range(3) if k != axis)
    middle = None if axis is None else np.shape(reference)[axis] // 2

    def middle_of(array):
        return np.asarray(array) if axis is None else np.take(np.asarray(array), middle, axis=axis)

    determinant = jacobian_determinant(displacement)
    return Plane(name, *(normalise_intensity(middle_of(image)) for image in (reference, floating, warped)),
                 {key: None if mask is None else middle_of(mask) for key, mask in masks.items()},
                 middle_of(determinant), np.stack([middle_of(np.asarray(displacement)[k]) for k in shown]),
                 aspect=spacing[shown[0]] / spacing[shown[1]], rows_up=axis is not None and axis != 0)


def _show_image(ax, image: np.ndarray, title: str | None, cut: Plane, **style) -> None:
    ax.imshow(image, aspect=cut.aspect, origin="lower" if cut.rows_up else "upper", **style)
    if title:
        ax.set_title(title)
    ax.set_axis_off()


def _draw_contours(ax, outlines, styles=()) -> None:
    """Outline each ``(mask, colour, linestyle, label)`` that is given and not empty.

    The legend holds the ``styles`` (``(colour, linestyle, label)`` entries that explain the line
    styles), then each label drawn, once, at most :data:`_LEGEND_ENTRIES` entries in all with a
    count of the others after them.
    """
    handles = {}
    for mask, colour, linestyle, label in outlines:
        if mask is not None and mask.any():
            ax.contour(mask.astype(np.float64), levels=[0.5], colors=[colour], linewidths=1.0, linestyles=linestyle)
            handles.setdefault(label, Line2D([], [], color=colour, label=label))
    handles = list(handles.values())
    room = _LEGEND_ENTRIES - len(styles)
    if len(handles) > room:
        handles = [*handles[:room - 1], Line2D([], [], linestyle="none", label=f"and {len(handles) - room + 1} more")]
    if handles:
        handles = [Line2D([], [], color=colour, linestyle=linestyle, label=label)
                   for colour, linestyle, label in styles] + handles
        ax.legend(handles=handles, loc="lower right", fontsize="small")


def _draw_masks(ax, reference, moving, moving_colour: str, moving_name: str, by_label: bool) -> None:
    """The outlines of one mask panel.

    One structure: the reference mask in red, the moving one in ``moving_colour``. Label maps: each
    label in its own colour, picked by its value so that a label has one colour in every panel and
    every pair of a batch; the reference's outlines dashed, the moving ones solid.
    """
    if not by_label:
        _draw_contours(ax, [(None if mask is None else mask != 0, colour, "solid", name) for mask, colour, name
                            in ((reference, "red", "reference"), (moving, moving_colour, moving_name))])
        return
    values = [label_values(mask) for mask in (reference, moving) if mask is not None]
    outlines = []
    for value in np.unique(np.concatenate(values)) if values else ():
        colour = _LABEL_COLOURS[int(value) % len(_LABEL_COLOURS)]
        outlines += [(None if mask is None else mask == value, colour, style, f"label {value}")
                     for mask, style in ((reference, "dashed"), (moving, "solid"))]
    styles = [("0.6", "dashed", "reference")] if reference is not None else []
    _draw_contours(ax, outlines, [*styles, ("0.6", "solid", moving_name)])


def _draw_jacobian(fig, ax, cut: Plane, title: str | None) -> None:
    """Determinant map centred at 1, folds in magenta, and a sparse quiver of the in-plane displacement."""
    determinant = cut.determinant
    # A robust range: a few extreme voxels (folds are shown apart) would otherwise flatten the map.
    halfrange = max(float(np.percentile(np.abs(determinant - 1.0), 99)), 1e-3)
    norm = CenteredNorm(vcenter=1.0, halfrange=halfrange)
    _show_image(ax, determinant, title, cut, cmap="RdBu_r", norm=norm)
    fig.colorbar(ax.images[0], ax=ax, fraction=0.046, pad=0.02, extend="both")
    folded = determinant <= 0
    if folded.any():
        _show_image(ax, np.ma.masked_where(~folded, folded), None, cut, cmap=ListedColormap(["magenta"]),
                    interpolation="nearest")
    step = max(1, max(determinant.shape) // _QUIVER_ARROWS_PER_AXIS)
    rows, cols = np.mgrid[0:determinant.shape[0]:step, 0:determinant.shape[1]:step]
    # Data-unit arrows: true length in voxels, in the directions of the drawn rows and columns.
    ax.quiver(cols, rows, cut.in_plane[1, ::step, ::step], cut.in_plane[0, ::step, ::step],
              angles="xy", scale_units="xy", scale=1.0, color="black", width=0.004)


def _render_png(fig: Figure, path) -> None:
    with open(path, "wb") as stream:
        fig.savefig(stream, format="png")


def save_qa_figure(path, reference, floating, warped, displacement, reference_mask=None,
                   floating_mask=None, warped_mask=None, title=None, folded_fraction=None, by_label=None,
                   spacing=None) -> None:
    """Write a PNG summarising a registration of ``floating`` onto ``reference``.

    Panels: checkerboards of reference/floating (before) and reference/warped (after); when masks
    are given, the reference with contours of the reference mask (red) and the floating mask
    (yellow, before) or the warped mask (lime green, after), or, for label maps, of each label in
    a colour of its own (the reference's dashed); the Jacobian determinant of the field on a
    diverging colormap centred at 1, folded voxels (det <= 0) in magenta, the percentage folded over
    the whole field in its title, and a sparse quiver of the in-plane displacement. Intensities are
    normalised per image to their 1st-99th percentiles. A volume shows three planes (see the
    module's docstring).

    Args:
        path: PNG file to write; its directory must exist. Written atomically: on any error no file
            is left behind, and an existing file is left unchanged.
        reference, floating, warped: images of one shape, ``(H, W)`` or ``(D, H, W)``.
        displacement: ``(ndims, *spatial)`` field in voxels that produced ``warped``.
        reference_mask, floating_mask, warped_mask: optional masks or label maps of the same shape;
            any of them may be None (an atlas's floating label map alone, say).
        title: optional figure title.
        folded_fraction: the folded fraction for the Jacobian panel's title, when the arrays are
            only part of a larger field (default: that of ``displacement``).
        by_label: outline each label of the masks apart, or their union as one structure. Default:
            label by label when every mask given holds two labels or more (as the metrics do;
            pass the decision when the arrays are only part of the masks).
        spacing: voxel size per array axis (mm), for the voxels' drawn shape; square if None.

    Raises:
        ValueError: if the images are not 2D/3D or any array's shape does not match the reference.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim not in (2, 3):
        raise ValueError(f"reference must be 2D or 3D, got shape {reference.shape}")
    shape = reference.shape
    floating, warped = np.asarray(floating, dtype=np.float64), np.asarray(warped, dtype=np.float64)
    displacement = np.asarray(displacement, dtype=np.float64)
    _check_shape("floating", floating, shape)
    _check_shape("warped", warped, shape)
    _check_shape("displacement", displacement, (len(shape), *shape))
    masks = {"reference_mask": reference_mask, "floating_mask": floating_mask, "warped_mask": warped_mask}
    masks = {name: None if mask is None else np.asarray(mask) for name, mask in masks.items()}
    for name, mask in masks.items():
        if mask is not None:
            _check_shape(name, mask, shape)
    if folded_fraction is None:
        folded_fraction = float(np.mean(jacobian_determinant(displacement) <= 0))
    if by_label is None:
        given = [mask for mask in masks.values() if mask is not None]
        by_label = bool(given) and all(len(label_values(mask)) > 1 for mask in given)

    if reference.ndim == 2:
        planes = [plane(reference, floating, warped, displacement, masks, spacing=spacing)]
    else:
        centre, planes = focus(masks["warped_mask"], shape), []
        for axis in plane_axes(shape):
            index = tuple(slab(centre[axis], shape[axis]) if k == axis else slice(None) for k in range(3))
            planes.append(plane(reference[index], floating[index], warped[index], displacement[(slice(None), *index)],
                                {name: None if mask is None else mask[index] for name, mask in masks.items()},
                                axis, spacing, f"{'kji'[axis]} = {centre[axis]}"))
    save_qa_planes(path, planes, folded_fraction, by_label, title)


def save_qa_planes(path, planes: list[Plane], folded_fraction: float, by_label: bool, title=None) -> None:
    """Write the figure of :func:`save_qa_figure` from its planes, a row each (:func:`plane`)."""
    has_masks = any(mask is not None for mask in planes[0].masks.values())
    n_panels = 5 if has_masks else 3
    fig = Figure(figsize=(4.0 * n_panels, 4.4 * len(planes)), layout="constrained")
    axes = np.reshape(fig.subplots(len(planes), n_panels), (len(planes), n_panels))
    titles = ["before: reference / floating", "after: reference / warped", "masks before", "masks after",
              f"Jacobian determinant ({folded_fraction:.2%} folded)"]
    for row, (cut, row_axes) in enumerate(zip(planes, axes)):
        before, after, *masks_and_jacobian = titles if row == 0 else [None] * len(titles)  # on the first row only
        _show_image(row_axes[0], checkerboard(cut.reference, cut.floating), before, cut, **_GRAY)
        _show_image(row_axes[1], checkerboard(cut.reference, cut.warped), after, cut, **_GRAY)
        if has_masks:
            moving_masks = [(cut.masks["floating_mask"], "yellow", "floating"), (cut.masks["warped_mask"], "lime", "warped")]
            for ax, (moving, colour, label), heading in zip(row_axes[2:4], moving_masks, masks_and_jacobian):
                _show_image(ax, cut.reference, heading, cut, **_GRAY)
                _draw_masks(ax, cut.masks["reference_mask"], moving, colour, label, by_label)
        _draw_jacobian(fig, row_axes[-1], cut, masks_and_jacobian[-1])
        if cut.name:
            row_axes[0].text(-0.03, 0.5, cut.name, transform=row_axes[0].transAxes, rotation=90,
                             ha="right", va="center", fontsize="large")
    if title:
        fig.suptitle(title)
    write_atomically(path, lambda temporary: _render_png(fig, temporary))
