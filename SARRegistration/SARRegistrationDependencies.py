"""The Python packages the engine needs inside Slicer, checked by version and installed as Slicer does.

Slicer ships numpy and SimpleITK. PyTorch comes from the PyTorch Utils module of the PyTorch
extension (declared in the extension's ``EXTENSION_DEPENDS``), which picks the build that fits the
computer's GPU driver; a plain ``pip install torch`` would give a CPU-only build on Windows. The
others come from ``slicer.pydeps.pip_ensure`` (Slicer 5.11 and later) or ``slicer.util.pip_install``.

Checking reads package metadata only: nothing is imported, so the check is instant even before
PyTorch has been loaded. The minimum versions here must admit the versions ``requirements.txt``
pins (a test checks it).
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

TORCH_REQUIREMENT = "torch>=2.0"
PIP_REQUIREMENTS = ("scipy>=1.10", "scikit-image>=0.22", "tqdm>=4.60")
REQUESTER = "SAR Registration"


def _requirementClass():
    """packaging's Requirement: the package where Slicer has it (5.11 and later), else pip's copy."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unsatisfied(requirements, versionOf: Callable[[str], str | None] | None = None) -> list[str]:
    """The requirements (strings) that are not installed, or installed at a version they exclude.

    ``versionOf(distribution)`` gives an installed version or None (default: :func:`installedVersion`).
    """
    Requirement = _requirementClass()
    versionOf = versionOf or installedVersion
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        version = versionOf(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def describe(requirements, versionOf: Callable[[str], str | None] | None = None) -> list[str]:
    """Each unsatisfied requirement as the user reads it: ``scipy>=1.10 (1.8.0 is installed)``."""
    Requirement = _requirementClass()
    versionOf = versionOf or installedVersion
    described = []
    for text in unsatisfied(requirements, versionOf):
        version = versionOf(Requirement(text).name)
        described.append(text if version is None else f"{text} ({version} is installed)")
    return described


def missingPackages(versionOf: Callable[[str], str | None] | None = None) -> list[str]:
    """Every unsatisfied requirement of the engine, PyTorch first."""
    return unsatisfied((TORCH_REQUIREMENT, *PIP_REQUIREMENTS), versionOf)


def installMissing(askConfirmation: bool = True) -> bool:
    """Install what is missing or too old, after one confirmation; False if the user declined.

    Runs on the main thread: the installers show their own progress (pip_ensure's dialog) and
    may ask to restart Slicer when a package that was already loaded changed.
    """
    import slicer

    Requirement = _requirementClass()
    missing = missingPackages()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "SAR Registration needs these Python packages: {packages}.\n\nDownload and install them now? "
            "PyTorch is large: this can take several minutes.".format(packages=", ".join(describe(missing)))):
        return False
    if TORCH_REQUIREMENT in missing:
        _installTorch()
    others = [text for text in missing if text != TORCH_REQUIREMENT]
    if others:
        try:
            import slicer.pydeps as pydeps
        except ImportError:  # Slicer before 5.11
            slicer.util.pip_install(others)
        else:
            pydeps.pip_ensure([Requirement(text) for text in others], prompt_install=False, requester=REQUESTER)
    still = missingPackages()
    if still:
        raise RuntimeError("These packages are still missing or too old after installing: {packages}. Install "
                           "them from the Python console with slicer.util.pip_install.".format(
                               packages=", ".join(describe(still))))
    return True


def _installTorch() -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError("SAR Registration needs the PyTorch extension, which installs the PyTorch build that "
                           "fits this computer's GPU. Install 'PyTorch' from the Extensions Manager, restart "
                           "Slicer, and register again.") from None
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    version = installedVersion("torch")
    if version is not None:  # installed, but too old: replacing a loaded PyTorch needs a restart
        raise RuntimeError(f"PyTorch {version} is installed but SAR Registration needs {TORCH_REQUIREMENT}. Update "
                           "it in the PyTorch Utils module (uninstall, then install), restart Slicer, and register "
                           "again.")
    specifier = str(_requirementClass()(TORCH_REQUIREMENT).specifier)
    if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=specifier) is None:
        raise RuntimeError("PyTorch could not be installed. Install it with the PyTorch Utils module.")
