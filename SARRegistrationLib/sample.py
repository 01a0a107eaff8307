"""The bundled sample pair (``register --sample``, Slicer's Sample Data): where its four files are.

It imports nothing heavy, so Slicer can list and load the pair on its main thread without PyTorch.
"""

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Testing" / "Data"
SAMPLE = {"reference": SAMPLE_DIR / "brain_pd.nrrd", "floating": SAMPLE_DIR / "sample_floating_t1.nrrd",
          "reference_mask": SAMPLE_DIR / "brain_ventricles.nrrd",
          "floating_mask": SAMPLE_DIR / "sample_floating_ventricles.nrrd"}
