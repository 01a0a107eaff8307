"""The SAR model as one object, and its weights files.

A weights file is a plain ``torch.save`` dictionary of configurations and state dicts, read back
with ``weights_only=True`` so that opening a file never runs code from it. Shipped weights come
with a JSON model card beside them (same name, ``.json``) whose SHA-256 must match the file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsError
from .files import write_atomically
from .networks.discriminator import SARDiscriminator
from .networks.feature_extractor import FeatureExtractor, VGG16Features
from .networks.generator import SARGenerator

CHECKPOINT_FORMAT = "sar-registration"
CHECKPOINT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Weights"


@dataclass
class SARModel:
    """Generator, discriminator and the feature extractor of the content loss, trained together.

    ``working_size`` is the largest number of voxels per axis of the grid the model works on;
    images are resampled to it and the field is brought back to the image's own grid.
    """

    generator: SARGenerator
    discriminator: SARDiscriminator
    feature_extractor: FeatureExtractor
    working_size: int
    metadata: dict = field(default_factory=dict)

    @classmethod
    def create(cls, ndims: int, working_size: int, generator_channels=(16, 32, 32, 64),
               discriminator_width: int = 64, feature_channels=(16, 32, 64), diffeomorphic: bool = False,
               vgg16_weights=None) -> "SARModel":
        """A new, untrained model; ``vgg16_weights`` (a local torchvision VGG16 file) replaces the
        project's own feature extractor in the content loss."""
        features = VGG16Features(vgg16_weights) if vgg16_weights else FeatureExtractor(ndims, feature_channels)
        return cls(SARGenerator(ndims, generator_channels, diffeomorphic),
                   SARDiscriminator(ndims, discriminator_width), features, working_size)

    @property
    def ndims(self) -> int:
        return self.generator.ndims

    def to(self, device) -> "SARModel":
        for network in self.networks.values():
            network.to(device)
        return self

    def eval(self) -> "SARModel":
        for network in self.networks.values():
            network.eval()
        return self

    @property
    def networks(self) -> dict:
        return {"generator": self.generator, "discriminator": self.discriminator,
                "feature_extractor": self.feature_extractor}

    def state(self) -> dict:
        """Everything a weights file holds: configurations and state dicts, no Python objects."""
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "working_size": self.working_size,
            "metadata": self.metadata,
            "configs": {name: network.config for name, network in self.networks.items()},
            "weights": {name: network.state_dict() for name, network in self.networks.items()
                        if not getattr(network, "external_weights", False)},
        }


def default_weights_path(ndims: int) -> Path:
    """The shipped weights of the ``ndims``-D model."""
    return WEIGHTS_DIR / f"sar_{ndims}d.pt"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: SARModel, path, extra: dict | None = None) -> Path:
    """Write the model (and ``extra`` training state) atomically: a crash never leaves half a file."""
    state = model.state()
    if extra:
        state["training"] = extra
    return save_state(state, path)


def save_state(state: dict, path) -> Path:
    """``torch.save`` a dictionary of weights atomically: a crash never leaves half a file."""
    return write_atomically(path, lambda temporary: torch.save(state, temporary))


def write_model_card(weights_path, metadata: dict) -> Path:
    """Write the JSON model card beside a weights file, with the file's SHA-256."""
    weights_path = Path(weights_path)
    card = {**metadata, "weights_file": weights_path.name, "sha256": sha256_of(weights_path)}
    card.pop("weights_path", None)
    card_path = weights_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def read_checkpoint(path) -> dict:
    """The dictionary of a weights file, after checking that it exists, matches its card and is ours."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"The weights file {str(path)!r} does not exist. Give an existing file, or train one "
                           "with 'python -m SARRegistrationLib train'.")
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        try:
            expected = json.loads(card_path.read_text()).get("sha256")
        except (ValueError, AttributeError):
            raise WeightsError(f"The model card {str(card_path)!r} beside the weights is not valid JSON; "
                               "restore it or remove it.") from None
        actual = sha256_of(path)
        if expected and expected != actual:
            raise WeightsError(f"The weights file {str(path)!r} does not match its model card {card_path.name} "
                               f"(SHA-256 {actual[:12]}… instead of {expected[:12]}…): it is corrupt or was replaced.")
    try:
        # weights_only=True: the file can hold tensors and plain containers only, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{str(path)!r} is not a readable SAR weights file: it holds Python objects other than "
                           "weights, which SAR never loads because loading them could run code.") from None
    except Exception as error:  # noqa: BLE001 - whatever a foreign or broken file raises, the answer is the same
        raise WeightsError(f"{str(path)!r} is not a readable SAR weights file: it is corrupt, truncated, "
                           f"or not a PyTorch weights file ({type(error).__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{str(path)!r} is a PyTorch file but not a SAR weights file.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{str(path)!r} has SAR weights format version {state.get('version')}; "
                           f"this version reads {CHECKPOINT_VERSION}.")
    return state


def model_from_state(state: dict) -> SARModel:
    configs = state["configs"]
    generator_config = dict(configs["generator"])
    feature_config = configs["feature_extractor"]
    model = SARModel(
        SARGenerator(generator_config.pop("ndims"), **generator_config),
        SARDiscriminator(**configs["discriminator"]),
        VGG16Features(**feature_config) if "state_dict_path" in feature_config else FeatureExtractor(**feature_config),
        int(state["working_size"]),
        dict(state.get("metadata", {})))
    for name, network in model.networks.items():
        if name in state["weights"]:
            network.load_state_dict(state["weights"][name])
    return model


def load_model(path=None, ndims: int = 2, device="cpu") -> SARModel:
    """Load a SAR model in evaluation mode; ``path=None`` takes the shipped ``ndims``-D weights."""
    if path is None and not default_weights_path(ndims).is_file():
        raise WeightsError(f"No {ndims}D weights are shipped at {default_weights_path(ndims)}."
                           + (" Register volumes slice by slice with the 2D model (mode 'slicewise'), or give "
                              "3D weights." if ndims == 3 else " Give a weights file."))
    path = Path(path) if path is not None else default_weights_path(ndims)
    state = read_checkpoint(path)
    try:
        model = model_from_state(state)
    except (KeyError, TypeError, RuntimeError, FileNotFoundError, ValueError, AttributeError) as error:
        raise WeightsError(f"{str(path)!r} holds SAR weights that do not fit this version's networks: {error}") from None
    model.metadata.setdefault("weights_path", str(path))
    for network in model.networks.values():  # a loaded model is only read; finetuning tunes a copy
        network.requires_grad_(False)
    return model.to(device).eval()
