"""Does each peer's field, converted to the benchmark's convention, undo a known motion?

    python benchmarks/convention_check.py [--methods elastix ants greedy convexadam] [--dims 2 3] [--threads 1]

The benchmark compares methods through their displacement fields in one convention (millimetres,
ITK/LPS physical components, on the reference grid, reference point ``p`` -> floating point
``p + d(p)``). A wrong sign, axis order, voxel-versus-mm unit or composition order in converting a
peer's output would make that peer look bad for nothing, so each conversion is checked here on a
motion whose field is known exactly: the floating image is the reference moved by a translation of
(3, -2[, 1]) mm, or by that translation and a 4° rotation about the image centre (which also
checks the order in which affine and deformable parts are composed), on a grid with a non-trivial
origin, anisotropic spacing and an oblique direction.

For each method and motion it reports, over the foreground voxels of the reference: the median
field vector (translation: it must equal the shift), the median and 95th percentile of
``|d(p) - d_true(p)|`` in voxels of the finest spacing (pass: median below ``MAX_ERROR_VOXELS``),
and the mean absolute intensity difference to the reference after warping the floating image
through the converted field, as a fraction of that before (pass: below ``MAX_RESIDUAL``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make SARRegistrationLib and benchmarks importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from SARRegistrationLib.deformations import image_centre  # noqa: E402
from SARRegistrationLib.fields import transform_to_displacement, index_to_physical  # noqa: E402

from benchmarks import baselines  # noqa: E402
from benchmarks.baselines import Pair  # noqa: E402
from benchmarks.brain_benchmark import set_threads  # noqa: E402

DATA_DIR = REPO / "Testing" / "Data"
SHIFT_MM = (3.0, -2.0, 1.0)
ROTATION_DEG = 4.0
MOTIONS = ("translation", "rigid")
# A grid unlike the data's own: origin, anisotropic spacing and an oblique direction all matter.
ORIGIN_MM = (10.0, -20.0, 5.0)
SPACING_MM = {2: (1.2, 0.9), 3: (1.8, 1.5, 2.4)}
MAX_ERROR_VOXELS = 0.5
MAX_RESIDUAL = 0.5


def _oblique_direction(ndims: int) -> tuple:
    rotation = sitk.Euler2DTransform() if ndims == 2 else sitk.Euler3DTransform()
    if ndims == 2:
        rotation.SetAngle(0.5)
    else:
        rotation.SetRotation(0.2, -0.3, 0.5)
    return rotation.GetMatrix()


def reference_image(ndims: int) -> sitk.Image:
    """The brain T1 slice (2D) or volume (3D, halved in-plane), float32, on the oblique grid."""
    if ndims == 2:
        image = sitk.ReadImage(str(DATA_DIR / "brain_t1.nrrd"))
    else:
        image = sitk.Shrink(sitk.ReadImage(str(DATA_DIR / "brain3d_t1.nii.gz")), [2, 2, 1])
    image = sitk.Cast(image, sitk.sitkFloat32)
    image.SetOrigin(ORIGIN_MM[:ndims])
    image.SetSpacing(SPACING_MM[ndims])
    image.SetDirection(_oblique_direction(ndims))
    return image


def known_motion(reference: sitk.Image, motion: str) -> sitk.Transform:
    """The reference-to-floating transform ``T`` (``p -> T(p)``) of a check: a shift, or a shift and a rotation."""
    ndims = reference.GetDimension()
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    transform = sitk.Euler2DTransform() if ndims == 2 else sitk.Euler3DTransform()
    transform.SetCenter(image_centre(reference))
    transform.SetTranslation(SHIFT_MM[:ndims])
    if motion == "rigid":
        angle = np.deg2rad(ROTATION_DEG)
        if ndims == 2:
            transform.SetAngle(angle)
        else:
            transform.SetRotation(angle / 2, -angle / 2, angle)
    return transform


def known_motion_pair(ndims: int, motion: str) -> tuple[Pair, sitk.Transform]:
    """``(pair, T)``: the floating image is the reference moved so that ``floating(T(p)) = reference(p)``."""
    reference = reference_image(ndims)
    transform = known_motion(reference, motion)
    floating = sitk.Resample(reference, reference, transform.GetInverse(), sitk.sitkLinear, 0.0)
    mask = sitk.Cast(reference > 0.1 * float(sitk.GetArrayViewFromImage(reference).max()), sitk.sitkUInt8)
    moved_mask = sitk.Resample(mask, mask, transform.GetInverse(), sitk.sitkNearestNeighbor, 0)
    return Pair(f"{ndims}D {motion} check", 0, reference, floating, mask, moved_mask), transform


def check(method: baselines.Method, ndims: int, motion: str) -> dict:
    """Run ``method`` on the known motion and measure its converted field against the true one."""
    pair, transform = known_motion_pair(ndims, motion)
    method.prepare()
    output = method.run(pair)
    reference = pair.reference
    # Foreground away from the border, where every method's field is determined by the images.
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(pair.reference_mask, [2] * ndims)).astype(bool)
    to_mm = index_to_physical(reference)
    true_mm = _voxels_to_mm(transform_to_displacement(transform, reference), to_mm)
    field_mm = sitk.GetArrayFromImage(output.displacement)  # (*spatial, ndims), physical x, y, z
    error_voxels = np.linalg.norm(field_mm[inside] - true_mm[inside], axis=-1) / min(reference.GetSpacing())
    warped = sitk.Resample(pair.floating, reference, sitk.DisplacementFieldTransform(sitk.Image(output.displacement)),
                           sitk.sitkLinear, 0.0)
    reference_values = sitk.GetArrayFromImage(reference)[inside]
    before = np.abs(sitk.GetArrayFromImage(pair.floating)[inside] - reference_values).mean()
    after = np.abs(sitk.GetArrayFromImage(warped)[inside] - reference_values).mean()
    result = {"method": method.label, "ndims": ndims, "motion": motion,
              "median_field_mm": np.median(field_mm[inside], axis=0).round(3).tolist(),
              "true_median_field_mm": np.median(true_mm[inside], axis=0).round(3).tolist(),
              "median_error_voxels": float(np.median(error_voxels)),
              "p95_error_voxels": float(np.percentile(error_voxels, 95)),
              "residual": float(after / before), "seconds": output.seconds}
    result["passed"] = result["median_error_voxels"] < MAX_ERROR_VOXELS and result["residual"] < MAX_RESIDUAL
    return result


def _voxels_to_mm(displacement_voxels: np.ndarray, to_mm: np.ndarray) -> np.ndarray:
    """``(ndims, *spatial)`` voxel field (array axis order) -> ``(*spatial, ndims)`` mm, physical x, y, z."""
    index_steps = np.moveaxis(displacement_voxels, 0, -1)[..., ::-1]
    return index_steps @ to_mm.T


def peers(threads: int | None = 1, seed: int = 0) -> dict:
    """The checked peers, as the benchmark configures them (Elastix and ANTs with fewer iterations)."""
    return {"elastix": baselines.ElastixBSpline(resolutions=3, iterations=128, threads=threads, seed=seed),
            "ants": baselines.AntsSyN(reg_iterations=(40, 20, 0), seed=seed),
            "greedy": baselines.GreedyMethod(threads=threads, seed=seed),
            "convexadam": baselines.ConvexAdamMethod(device="cpu")}


def markdown(results: list[dict]) -> str:
    lines = ["| method | dims | motion | median field (mm) | true median field (mm) | median error (voxels) | "
             "95th pct error (voxels) | residual after / before | passed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "status" in r:
            lines.append(f"| {r['method']} | {r['ndims']}D | {r['motion']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['ndims']}D | {r['motion']} | {r['median_field_mm']} | "
                     f"{r['true_median_field_mm']} | {r['median_error_voxels']:.3f} | {r['p95_error_voxels']:.3f} | "
                     f"{r['residual']:.3f} | {'yes' if r['passed'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=tuple(peers()), default=list(peers()))
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--motions", nargs="+", choices=MOTIONS, default=list(MOTIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    results = []
    for key in args.methods:
        for ndims in args.dims:
            if key == "convexadam" and ndims == 2:
                continue
            for motion in args.motions:
                method = peers(args.threads)[key]
                try:
                    results.append(check(method, ndims, motion))
                except baselines.NotRun as reason:
                    results.append({"method": method.label, "ndims": ndims, "motion": motion,
                                    "status": f"not run: {reason}"})
                print(markdown(results[-1:]).splitlines()[-1], flush=True)
    table = markdown(results)
    print("\n" + table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0 if all(r.get("passed", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
