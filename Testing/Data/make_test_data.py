"""Rebuild the files of Testing/Data from Debian's ``insighttoolkit5-examples`` package.

    apt-get download insighttoolkit5-examples && dpkg -x insighttoolkit5-examples_*.deb itk/
    python Testing/Data/make_test_data.py itk/usr/share/doc/insighttoolkit5-examples/examples/Data

The colour PNGs hold three equal channels; one is kept. The 3D CSF mask is the k-means CSF class
(label 4) inside the skull-stripped brain (label 6 of the strip image): its largest connected
component, which is the lateral ventricles. The sample floating image is the T1 slice moved by a
fixed, seeded B-spline so the sample pair has a known answer.
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent


def first_channel(image):
    return sitk.VectorIndexSelectionCast(image, 0) if image.GetNumberOfComponentsPerPixel() > 1 else image


def main(source: Path):
    read = lambda name: sitk.ReadImage(str(source / name))
    write = lambda image, name: sitk.WriteImage(image, str(HERE / name), True)

    pd = first_channel(read("BrainProtonDensitySlice.png"))
    t1 = first_channel(read("BrainT1Slice.png"))
    ventricles = sitk.Cast(first_channel(read("VentricleModel.png")) > 127, sitk.sitkUInt8)
    write(pd, "brain_pd.nrrd")
    write(t1, "brain_t1.nrrd")
    write(ventricles, "brain_ventricles.nrrd")
    write(read("RatLungSlice1.mha"), "rat_lung_1.nrrd")
    write(read("RatLungSlice2.mha"), "rat_lung_2.nrrd")
    write(first_channel(read("FatMRISlice.png")), "fat_mri.nrrd")

    t1_volume = read("KmeansTest_T1UCharRaw.nii.gz")
    classes = read("KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
    brain = read("KmeansTest_T1RawSkullStrip.nii.gz") == 6
    csf = sitk.RelabelComponent(sitk.ConnectedComponent((classes == 4) & brain), sortByObjectSize=True) == 1
    write(sitk.Cast(t1_volume, sitk.sitkInt16), "brain3d_t1.nii.gz")
    write(sitk.Cast(csf, sitk.sitkUInt8), "brain3d_ventricles.nii.gz")

    # Sample pair: PD reference, T1 floating moved by a known B-spline of up to ~6 mm.
    transform = sitk.BSplineTransformInitializer(t1, [4, 4], order=3)
    rng = np.random.default_rng(7)
    params = rng.uniform(-6.0, 6.0, len(transform.GetParameters()))
    transform.SetParameters(params.tolist())
    write(sitk.Resample(t1, t1, transform, sitk.sitkLinear, 0.0), "sample_floating_t1.nrrd")
    write(sitk.Resample(ventricles, ventricles, transform, sitk.sitkNearestNeighbor, 0), "sample_floating_ventricles.nrrd")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
