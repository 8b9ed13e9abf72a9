"""Materializers for the project's own artifact types.

``EncodedPairs`` is stored as safetensors + json (never pickled), through the
artifact store's file API so the same code works on local disk, GCS and S3.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from alignment.encoding import EncodedPairs


class EncodedPairsMaterializer(BaseMaterializer):
    """The latent / prompt-embedding cache that training reuses across runs."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (EncodedPairs,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: EncodedPairs) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            data.save(local)
            for name in os.listdir(local):
                fileio.copy(os.path.join(local, name), os.path.join(self.uri, name), overwrite=True)

    def load(self, data_type: type[Any]) -> EncodedPairs:
        with self.get_temporary_directory(delete_at_exit=True) as local:
            for name in fileio.listdir(self.uri):
                name = str(name)
                fileio.copy(os.path.join(self.uri, name), os.path.join(local, name), overwrite=True)
            return EncodedPairs.load(local)

    def extract_metadata(self, data: EncodedPairs) -> dict[str, Any]:
        return data.summary()
