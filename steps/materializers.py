"""Materializers for the project's own artifact types.

``EncodedPairs`` and ``InversionCache`` are stored as safetensors + json (never pickled), through the
artifact store's file API so the same code works on local disk, GCS and S3.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from alignment.encoding import EncodedPairs
from alignment.inversion import InversionCache


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
