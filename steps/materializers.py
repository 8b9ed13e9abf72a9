"""Materializers for the project's own artifact types.

``EncodedPairs``, ``InversionCache``, ``PairEmbeddings`` and ``TrainingInputs`` are stored as safetensors + json (never
pickled), through the artifact store's file API so the same code works on local disk, GCS and S3.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs
from alignment.inversion import InversionCache
from alignment.mining import PairEmbeddings


class SafetensorsDirectoryMaterializer(BaseMaterializer):
    """Objects with ``save(dir)`` / ``load(dir)`` of safetensors + json files (never pickle)."""

    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA
    # A base class: ZenML registers only the concrete subclasses below.
    SKIP_REGISTRATION: ClassVar[bool] = True

    def save(self, data: Any) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            data.save(local)
            for name in os.listdir(local):
                fileio.copy(os.path.join(local, name), os.path.join(self.uri, name), overwrite=True)

    def load(self, data_type: type[Any]) -> Any:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            for name in fileio.listdir(self.uri):
                name = str(name)
                fileio.copy(os.path.join(self.uri, name), os.path.join(local, name), overwrite=True)
            return data_type.load(local)


class EncodedPairsMaterializer(SafetensorsDirectoryMaterializer):
    """The latent / prompt-embedding cache that training reuses across runs."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (EncodedPairs,)

    def extract_metadata(self, data: EncodedPairs) -> dict[str, Any]:
        return data.summary()


class InversionCacheMaterializer(SafetensorsDirectoryMaterializer):
    """SmPO's cached inversion trajectories (x_t and target noise per image)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (InversionCache,)

    def extract_metadata(self, data: InversionCache) -> dict[str, Any]:
        return {"rows": len(data)}


class PairEmbeddingsMaterializer(SafetensorsDirectoryMaterializer):
    """Every pair's prompt and both images in a CLIP-type space (Diffusion-RPO's mining input)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (PairEmbeddings,)

    def extract_metadata(self, data: PairEmbeddings) -> dict[str, Any]:
        return {"pairs": len(data), "dimension": int(data.text.shape[1]), "embedder": data.embedder}


class TrainingInputsMaterializer(SafetensorsDirectoryMaterializer):
    """The per-pair training bundle; it points at the stored ``encoded_pairs`` instead of copying them."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (TrainingInputs,)

    def save(self, data: TrainingInputs) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            data.save(local)
            for name in os.listdir(local):
                self._copy_tree(os.path.join(local, name), os.path.join(self.uri, name))

    def _copy_tree(self, source: str, target: str) -> None:
        if os.path.isdir(source):
            fileio.makedirs(target)
            for name in os.listdir(source):
                self._copy_tree(os.path.join(source, name), os.path.join(target, name))
        else:
            fileio.copy(source, target, overwrite=True)

    def load(self, data_type: type[Any]) -> TrainingInputs:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            self._download(self.uri, local)

            def load_encoded(uri: str) -> EncodedPairs:
                return EncodedPairsMaterializer(uri, artifact_store=self.artifact_store).load(EncodedPairs)

            return TrainingInputs.load(local, load_encoded=load_encoded)

    def _download(self, source: str, target: str) -> None:
        os.makedirs(target, exist_ok=True)
        for name in fileio.listdir(source):
            name = str(name)
            if fileio.isdir(os.path.join(source, name)):
                self._download(os.path.join(source, name), os.path.join(target, name))
            else:
                fileio.copy(os.path.join(source, name), os.path.join(target, name), overwrite=True)

    def extract_metadata(self, data: TrainingInputs) -> dict[str, Any]:
        return data.summary()


def pointing_at_input(inputs: TrainingInputs, input_name: str) -> TrainingInputs:
    """Mark ``inputs`` to be stored as a pointer to the step input ``input_name``'s artifact (its encoded pairs)."""
    from zenml import get_step_context

    artifacts = get_step_context().inputs.get(input_name) or []
    if artifacts:
        inputs.encoded_source = artifacts[0].uri
    return inputs
