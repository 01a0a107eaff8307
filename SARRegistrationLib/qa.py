"""Quality-assurance figure of one registration, written as a PNG without a display.

Arrays follow the conventions of :mod:`SARRegistrationLib.spatial`: numpy axis order ``z, y, x``, a
displacement ``(ndims, *spatial)`` in voxels. Only matplotlib's object-oriented API is used (no
pyplot), so the figure renders with Agg whatever backend the caller's process has selected.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import CenteredNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .files import write_atomically
from .imageio import normalise_intensity
from .metrics import jacobian_determinant, label_values

_QUIVER_ARROWS_PER_AXIS = 16
_LEGEND_ENTRIES = 10
# Colours of a label map's labels, by value: matplotlib's ten categorical colours ("tab10").
_LABEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:gray", "tab:olive", "tab:cyan")


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    """Interleave two same-shaped 2D or 3D images in a checkerboard of ``tiles`` tiles per axis.

    The tile at the origin, and every other tile from it, shows ``a``; the rest show ``b``. When an
    axis does not divide evenly, the remainder forms a last, thinner tile. Returns a float64 array.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"checkerboard needs two 2D or 3D images of the same shape, got {a.shape} and {b.shape}")
    board = sitk.CheckerBoard(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b), [tiles] * a.ndim)
    return sitk.GetArrayFromImage(board)


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """The array itself in 2D, its middle slice along axis 0 in 3D."""
    return array[array.shape[0] // 2] if array.ndim == 3 else array


def _show_image(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
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


def _draw_jacobian(fig, ax, determinant: np.ndarray, in_plane: np.ndarray, folded_fraction: float) -> None:
    """Determinant map centred at 1, folds in magenta, and a sparse quiver of the in-plane displacement."""
    # A robust range: a few extreme voxels (folds are shown apart) would otherwise flatten the map.
    halfrange = max(float(np.percentile(np.abs(determinant - 1.0), 99)), 1e-3)
    shown = ax.imshow(determinant, cmap="RdBu_r", norm=CenteredNorm(vcenter=1.0, halfrange=halfrange))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, extend="both")
    folded = determinant <= 0
    if folded.any():
        ax.imshow(np.ma.masked_where(~folded, folded), cmap=ListedColormap(["magenta"]), interpolation="nearest")
    step = max(1, max(determinant.shape) // _QUIVER_ARROWS_PER_AXIS)
    rows, cols = np.mgrid[0:determinant.shape[0]:step, 0:determinant.shape[1]:step]
    # Data-unit arrows: true length in voxels; the inverted image y-axis makes +row point down.
    ax.quiver(cols, rows, in_plane[1, ::step, ::step], in_plane[0, ::step, ::step],
              angles="xy", scale_units="xy", scale=1.0, color="black", width=0.004)
    ax.set_title(f"Jacobian determinant ({folded_fraction:.2%} folded)")
    ax.set_axis_off()


def _render_png(fig: Figure, path) -> None:
    with open(path, "wb") as stream:
        fig.savefig(stream, format="png")


def save_qa_figure(path, reference, floating, warped, displacement, reference_mask=None,
                   floating_mask=None, warped_mask=None, title=None, folded_fraction=None, by_label=None) -> None:
    """Write a PNG summarising a registration of ``floating`` onto ``reference``.

    Panels: checkerboards of reference/floating (before) and reference/warped (after); when masks
    are given, the reference with contours of the reference mask (red) and the floating mask
    (yellow, before) or the warped mask (lime green, after), or, for label maps, of each label in
    a colour of its own (the reference's dashed); the Jacobian determinant of the field on a
    diverging colormap centred at 1, folded voxels (det <= 0) in magenta, the percentage folded over
    the whole field in its title, and a sparse quiver of the in-plane displacement. Intensities are
    normalised per image to their 1st-99th percentiles. 3D inputs show their middle slice along
    axis 0; the determinant is computed on the full field first.

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

    determinant = jacobian_determinant(displacement)
    if folded_fraction is None:
        folded_fraction = float(np.mean(determinant <= 0))
    # The in-plane components of an axial slice are those along axes 1 and 2 (y, x).
    in_plane = displacement[1:, shape[0] // 2] if len(shape) == 3 else displacement
    reference_2d, floating_2d, warped_2d = (normalise_intensity(_middle_slice(image))
                                            for image in (reference, floating, warped))
    masks_2d = {name: None if mask is None else _middle_slice(mask) for name, mask in masks.items()}
    has_masks = any(mask is not None for mask in masks_2d.values())
    if by_label is None:
        by_label = has_masks and all(len(label_values(mask)) > 1 for mask in masks.values() if mask is not None)

    n_panels = 5 if has_masks else 3
    fig = Figure(figsize=(4.0 * n_panels, 4.4), layout="constrained")
    axes = fig.subplots(1, n_panels)
    _show_image(axes[0], checkerboard(reference_2d, floating_2d), "before: reference / floating")
    _show_image(axes[1], checkerboard(reference_2d, warped_2d), "after: reference / warped")
    if has_masks:
        moving_masks = [(masks_2d["floating_mask"], "yellow", "floating", "before"),
                        (masks_2d["warped_mask"], "lime", "warped", "after")]
        for ax, (moving, colour, label, when) in zip(axes[2:4], moving_masks):
            _show_image(ax, reference_2d, f"masks {when}")
            _draw_masks(ax, masks_2d["reference_mask"], moving, colour, label, by_label)
    _draw_jacobian(fig, axes[-1], _middle_slice(determinant), in_plane, folded_fraction)
    if title:
        fig.suptitle(title)
    write_atomically(path, lambda temporary: _render_png(fig, temporary))
